//! Daily averages: avg, min, max and count per local day in any IANA time zone, from the
//! reading store's rollups (`ReadingStore::daily`), with finished days cached.
//!
//! Every time-zone offset in use today is a multiple of 15 minutes, so a local day is a
//! whole number of 15-minute buckets (92, 96 or 100 across DST changes).
//!
//! Finished days are cached a local month at a time (one entry per sensor, zone and
//! month: a year is 12 entries, not 365, whose inserts slowed the requests around them):
//! a month once its last day ended more than [`LATE_AFTER`] ago.
//! Later changes to it (late readings, corrections) are announced by the reading store on
//! a NOTIFY channel, which every API process listens to; while not listening, the cache is
//! bypassed. Months read while a change was announced are not cached (a generation count
//! tells).

use std::{
    collections::{BTreeMap, HashSet},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use chrono::{Datelike, NaiveDate, Utc};
use chrono_tz::Tz;
use moka::sync::Cache;
use poem::web::Data;
use poem_openapi::{
    param::{Path, Query},
    payload::Json,
    Object, OpenApi,
};
use sqlx::PgPool;
use termopar_core::{
    ids::SensorId,
    store::{BucketChange, DayStat, BUCKETS_CHANNEL, BUCKET_MINUTES, LATE_AFTER},
    tasks::Stop,
    tz::local_day_start,
};
use uuid::Uuid;

use crate::{
    auth::BearerAuth,
    error::{ApiError, ApiResult},
    responses::Found,
    state::AppState,
    ApiTags,
};

/// (sensor, zone, first day of the local month).
type Key = (SensorId, Tz, NaiveDate);

/// A month's days in order; `None`: no data that day.
type Month = Arc<[Option<DayStat>]>;

/// Finished months by (sensor, zone, month).
#[derive(Clone)]
pub struct DailyCache {
    days: Cache<Key, Month>,
    /// True while changes are being listened to; the cache is bypassed otherwise.
    live: Arc<AtomicBool>,
    /// Counts changes applied: days read from the store are cached only if no change
    /// came between the read and the caching.
    generation: Arc<AtomicU64>,
}

impl Default for DailyCache {
    fn default() -> Self {
        Self::new()
    }
}

impl DailyCache {
    /// An empty cache, bypassed until [`DailyCache::listen`] connects.
    pub fn new() -> Self {
        Self {
            days: Cache::builder()
                .max_capacity(200_000)
                .time_to_live(Duration::from_secs(24 * 3600))
                .support_invalidation_closures()
                .build(),
            live: Arc::new(AtomicBool::new(false)),
            generation: Arc::new(AtomicU64::new(0)),
        }
    }

    /// True while the cache is in use (its change listener is connected).
    pub fn is_live(&self) -> bool {
        self.live.load(Ordering::Acquire)
    }

    /// Months cached now (all sensors and zones).
    pub fn cached_months(&self) -> u64 {
        self.days.run_pending_tasks();
        self.days.entry_count()
    }

    /// Whether `sensor`'s days of the month that holds `day`, in `tz`, are cached.
    pub fn has_month(&self, sensor: SensorId, tz: Tz, day: NaiveDate) -> bool {
        self.days.contains_key(&(sensor, tz, month_of(day)))
    }

    /// A hook for a reading store of this process: its changes apply at once.
    pub fn hook(&self) -> termopar_core::store::ChangeHook {
        let cache = self.clone();
        Arc::new(move |changes: &[BucketChange]| changes.iter().for_each(|c| cache.apply(c)))
    }

    /// Forgets every cached month that overlaps a change.
    pub fn apply(&self, change: &BucketChange) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        let sensor = SensorId(change.sensor_id);
        let (from, to) = (
            change.from,
            change.to + chrono::Duration::minutes(BUCKET_MINUTES),
        );
        let _ = self.days.invalidate_entries_if(move |key, _| {
            key.0 == sensor && {
                let start = local_day_start(key.1, key.2);
                let end = local_day_start(key.1, next_month(key.2));
                start < to && from < end
            }
        });
    }

    /// Listens to bucket changes until stopped, reconnecting as needed.
    pub(crate) async fn listen(self, pg: PgPool, mut stop: Stop) {
        tokio::select! {
            () = self.follow(pg) => {}
            () = stop.requested() => {}
        }
    }

    async fn follow(&self, pg: PgPool) {
        let mut backoff = Duration::from_millis(200);
        loop {
            let listener = async {
                let mut l = sqlx::postgres::PgListener::connect_with(&pg).await?;
                l.listen(BUCKETS_CHANNEL).await?;
                Ok::<_, sqlx::Error>(l)
            };
            let mut listener = match listener.await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "daily-average cache: cannot listen for changes");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    continue;
                }
            };
            // Changes made while not listening are unknown: start from nothing.
            self.forget_all();
            self.live.store(true, Ordering::Release);
            backoff = Duration::from_millis(200);
            loop {
                match listener.try_recv().await {
                    Ok(Some(n)) => self.on_payload(n.payload()),
                    // The connection dropped; notifications may have been missed.
                    Ok(None) | Err(_) => {
                        self.live.store(false, Ordering::Release);
                        self.forget_all();
                        break;
                    }
                }
            }
        }
    }

    fn on_payload(&self, payload: &str) {
        match serde_json::from_str::<Vec<BucketChange>>(payload) {
            Ok(changes) => changes.iter().for_each(|c| self.apply(c)),
            Err(_) => self.forget_all(),
        }
    }

    fn forget_all(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.days.invalidate_all();
    }

    /// Caches months read from the store when no change came since `generation` was
    /// taken (before the read), off the request's path. A change that comes while they
    /// are inserted is seen afterwards, and they are forgotten again.
    fn offer(&self, generation: u64, months: Vec<(Key, Month)>) {
        if months.is_empty() {
            return;
        }
        let cache = self.clone();
        tokio::spawn(async move {
            if cache.generation.load(Ordering::Acquire) != generation {
                return;
            }
            for (key, month) in &months {
                cache.days.insert(*key, month.clone());
            }
            if cache.generation.load(Ordering::Acquire) != generation {
                for (key, _) in &months {
                    cache.days.invalidate(key);
                }
            }
        });
    }
}

fn month_of(day: NaiveDate) -> NaiveDate {
    day.with_day(1).expect("every month has a first day")
}

fn next_month(month: NaiveDate) -> NaiveDate {
    month + chrono::Months::new(1)
}

/// The days of `month` within `from..=to`, with their index in the month.
fn days_within(
    month: NaiveDate,
    from: NaiveDate,
    to: NaiveDate,
) -> impl Iterator<Item = (usize, NaiveDate)> {
    month
        .iter_days()
        .take_while(move |d| *d < next_month(month))
        .enumerate()
        .filter(move |(_, d)| from <= *d && *d <= to)
}

/// Per-sensor statistics of the days `from..=to`, from the cache where possible.
async fn sensor_days(
    state: &AppState,
    cache: &DailyCache,
    sensors: &[SensorId],
    tz: Tz,
    from: NaiveDate,
    to: NaiveDate,
) -> ApiResult<BTreeMap<NaiveDate, Vec<DayStat>>> {
    let now = Utc::now();
    let late = chrono::Duration::from_std(LATE_AFTER).expect("small");
    let finished = |month: NaiveDate| local_day_start(tz, next_month(month)) + late <= now;
    let use_cache = cache.is_live();
    let mut out: BTreeMap<NaiveDate, Vec<DayStat>> = BTreeMap::new();
    let mut add = |day: NaiveDate, stat: Option<DayStat>| {
        if let Some(stat) = stat {
            out.entry(day).or_default().push(stat);
        }
    };
    // The first month anything must be read for; everything after it is queried at once.
    let mut query_from: Option<NaiveDate> = None;
    let mut month = month_of(from);
    'months: while month <= to {
        if !(use_cache && finished(month)) {
            query_from = Some(month);
            break;
        }
        let mut hits = Vec::with_capacity(sensors.len());
        for s in sensors {
            match cache.days.get(&(*s, tz, month)) {
                Some(days) => hits.push(days),
                None => {
                    query_from = Some(month);
                    break 'months;
                }
            }
        }
        metrics::counter!("daily_cache_hits_total").increment(1);
        for (i, day) in days_within(month, from, to) {
            hits.iter().for_each(|days| add(day, days[i]));
        }
        month = next_month(month);
    }
    let Some(query_from) = query_from else {
        return Ok(out);
    };
    metrics::counter!("daily_cache_misses_total").increment(1);
    let generation = cache.generation.load(Ordering::Acquire);
    // Whole months, so that the finished ones can be cached.
    let last = next_month(month_of(to)).pred_opt().expect("a day before");
    let fetched = state.store.daily(sensors, tz, query_from, last).await?;
    let mut to_cache = Vec::new();
    let mut month = query_from;
    while month <= to {
        let cache = use_cache && finished(month);
        for s in sensors {
            let days: Month = month
                .iter_days()
                .take_while(|d| *d < next_month(month))
                .map(|d| fetched.get(&(*s, d)).copied())
                .collect();
            for (i, day) in days_within(month, from, to) {
                add(day, days[i]);
            }
            if cache {
                to_cache.push(((*s, tz, month), days));
            }
        }
        month = next_month(month);
    }
    cache.offer(generation, to_cache);
    Ok(out)
}

/// Averages of one local day.
#[derive(Debug, Object)]
pub(crate) struct DailyAverage {
    /// The local date (`YYYY-MM-DD`).
    pub date: NaiveDate,
    /// Mean temperature, °C.
    pub avg: f64,
    /// Lowest temperature, °C.
    pub min: f64,
    /// Highest temperature, °C.
    pub max: f64,
    /// Readings that day.
    pub count: i64,
}

/// Daily averages, oldest day first; days without readings are omitted.
#[derive(Debug, Object)]
pub(crate) struct DailyAverages {
    /// The time zone the days are in.
    pub tz: String,
    /// One item per local day with data.
    pub items: Vec<DailyAverage>,
}

/// The client's time zone (cached).
async fn client_tz(state: &AppState, client: Uuid) -> ApiResult<Tz> {
    let pg = state.pg.clone();
    let name = state
        .client_tz
        .try_get_with(client, async move {
            sqlx::query_scalar::<_, String>("SELECT timezone FROM clients WHERE id = $1")
                .bind(client)
                .fetch_one(&pg)
                .await
        })
        .await
        .map_err(|e| match &*e {
            sqlx::Error::RowNotFound => ApiError::not_found("client"),
            _ => ApiError::from(termopar_core::db::shared_error(&e)),
        })?;
    Ok(termopar_core::tz::parse(&name).unwrap_or(chrono_tz::UTC))
}

async fn respond(
    state: &AppState,
    cache: &DailyCache,
    sensors: &[SensorId],
    tz: Tz,
    from: NaiveDate,
    to: NaiveDate,
) -> ApiResult<Found<DailyAverages>> {
    let days = sensor_days(state, cache, sensors, tz, from, to).await?;
    let items = days
        .into_iter()
        .filter_map(|(date, stats)| {
            let total = stats.into_iter().reduce(DayStat::merge)?;
            (total.count > 0).then(|| DailyAverage {
                date,
                avg: total.sum / total.count as f64,
                min: total.min,
                max: total.max,
                count: total.count,
            })
        })
        .collect();
    Ok(Found::Ok(Json(DailyAverages {
        tz: tz.name().to_owned(),
        items,
    })))
}

/// Daily averages.
pub(crate) struct DailyApi;

#[OpenApi(tag = "ApiTags::Readings")]
impl DailyApi {
    /// Daily averages of a sensor.
    ///
    /// One item per local day in `tz` (default: the client's time zone) with the mean,
    /// lowest and highest temperature and the number of readings, oldest day first.
    /// Correct across DST changes and for offsets such as +05:30 and +05:45. Computed
    /// from 15-minute rollups, never from raw readings. At most 1000 days per request;
    /// the default range is the 30 days up to today.
    #[oai(
        path = "/sensors/:id/daily-averages",
        method = "get",
        operation_id = "sensorDailyAverages"
    )]
    #[tracing::instrument(skip_all, fields(sensor = %id.0))]
    // Each query parameter is its own documented argument.
    #[allow(clippy::too_many_arguments)]
    async fn sensor(
        &self,
        state: Data<&AppState>,
        cache: Data<&DailyCache>,
        auth: BearerAuth,
        id: Path<Uuid>,
        /// First local day (inclusive).
        from: Query<Option<NaiveDate>>,
        /// Last local day (inclusive).
        to: Query<Option<NaiveDate>>,
        /// IANA time zone, e.g. `America/Sao_Paulo`.
        tz: Query<Option<String>>,
    ) -> ApiResult<Found<DailyAverages>> {
        let sensor = crate::tenancy::visible_sensor(&state, &auth, id.0).await?;
        let tz = match termopar_web::days::timezone(tz.0.as_deref())? {
            Some(tz) => tz,
            None => client_tz(&state, sensor.client_id.0).await?,
        };
        let (from, to) = termopar_web::days::range(from.0, to.0, tz)?;
        respond(&state, &cache, &[SensorId(id.0)], tz, from, to).await
    }

    /// Daily averages over all sensors of a client.
    ///
    /// Like the per-sensor form, with every reading of every sensor of the client.
    #[oai(
        path = "/clients/:id/daily-averages",
        method = "get",
        operation_id = "clientDailyAverages"
    )]
    #[tracing::instrument(skip_all, fields(client = %id.0))]
    // Each query parameter is its own documented argument.
    #[allow(clippy::too_many_arguments)]
    async fn client(
        &self,
        state: Data<&AppState>,
        cache: Data<&DailyCache>,
        auth: BearerAuth,
        id: Path<Uuid>,
        /// First local day (inclusive).
        from: Query<Option<NaiveDate>>,
        /// Last local day (inclusive).
        to: Query<Option<NaiveDate>>,
        /// IANA time zone, e.g. `America/Sao_Paulo`.
        tz: Query<Option<String>>,
    ) -> ApiResult<Found<DailyAverages>> {
        crate::tenancy::check_client(&auth, id.0)?;
        let client_zone = client_tz(&state, id.0).await?;
        let tz = termopar_web::days::timezone(tz.0.as_deref())?.unwrap_or(client_zone);
        let (from, to) = termopar_web::days::range(from.0, to.0, tz)?;
        let sensors: Vec<SensorId> =
            sqlx::query_scalar::<_, Uuid>("SELECT id FROM sensors WHERE client_id = $1")
                .bind(id.0)
                .fetch_all(&state.pg)
                .await?
                .into_iter()
                .map(SensorId)
                .collect::<HashSet<_>>()
                .into_iter()
                .collect();
        respond(&state, &cache, &sensors, tz, from, to).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(month: u32) -> Key {
        (
            SensorId(Uuid::nil()),
            chrono_tz::UTC,
            NaiveDate::from_ymd_opt(2026, month, 1).expect("a date"),
        )
    }

    #[tokio::test]
    async fn months_read_before_a_change_are_not_cached() {
        let cache = DailyCache::new();
        let stat = DayStat {
            count: 1,
            sum: 1.0,
            min: 1.0,
            max: 1.0,
        };
        let month: Month = vec![Some(stat), None].into();
        let before = cache.generation.load(Ordering::Acquire);
        cache.apply(&BucketChange {
            sensor_id: Uuid::nil(),
            from: Utc::now(),
            to: Utc::now(),
        });
        cache.offer(before, vec![(key(1), month.clone())]);
        let now = cache.generation.load(Ordering::Acquire);
        cache.offer(now, vec![(key(2), month.clone())]);
        test_support::eventually(
            "the fresh month cached",
            test_support::DEFAULT_DEADLINE,
            || async { (cache.cached_months() == 1).then_some(()) },
        )
        .await;
        assert!(cache.days.get(&key(1)).is_none());
        assert_eq!(cache.days.get(&key(2)), Some(month));
    }
}
