//! Reading readings back: history pages, a reading by id, daily statistics.
//!
//! PostgreSQL says which segments can hold what is asked (buckets newest first, each
//! with its segments' counts and time spans); only those are fetched, by `_id`, from the
//! cache of recently written or read segments or the document store. A segment that
//! vanished between the two (a merge replaced it, and its grace period ran out) restarts
//! the query.

use std::{
    collections::{BTreeSet, HashMap},
    sync::Arc,
};

use chrono::{DateTime, Duration, NaiveDate, Timelike, Utc};
use chrono_tz::Tz;
use futures::future::try_join_all;
use mongodb::bson::doc;
use uuid::Uuid;

use super::{codec::BUCKET_MINUTES, DocRef, ReadingStore, Segment, StoreError};
use crate::{ids::SensorId, reading::Reading, tz::local_day_start};

/// How many times a query starts over when a segment it listed is gone.
const ATTEMPTS: usize = 3;

/// The lower bound of a listing without one: bounds are always bound as values, so that
/// PostgreSQL can keep one generic plan whose index range uses them (`$2 IS NULL OR
/// bucket <= $2` is planned again at every call).
const EARLIEST: DateTime<Utc> = match DateTime::from_timestamp(-30_610_224_000, 0) {
    Some(t) => t, // 1000-01-01
    None => panic!("a valid time"),
};

/// Where a history page starts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Position {
    /// After skipping this many readings (page numbers).
    Offset(u64),
    /// After this reading (`ts`, `id`), in newest-first order (a keyset cursor).
    After(DateTime<Utc>, Uuid),
}

/// A history request: a sensor's readings newest first by `(ts, id)`.
#[derive(Debug, Clone)]
pub struct HistoryQuery {
    /// The sensor.
    pub sensor: SensorId,
    /// Only readings measured at or after this.
    pub from: Option<DateTime<Utc>>,
    /// Only readings measured before this.
    pub to: Option<DateTime<Utc>>,
    /// Where the page starts.
    pub position: Position,
    /// Readings per page.
    pub limit: usize,
}

/// A page of history.
#[derive(Debug, Clone)]
pub struct HistoryPage {
    /// The readings, newest first.
    pub readings: Vec<Reading>,
    /// Whether more readings follow.
    pub more: bool,
    /// The sensor's readings in all, when the query had no window and no cursor.
    pub total: Option<i64>,
}

/// One local day's statistics of one sensor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DayStat {
    /// Readings.
    pub count: i64,
    /// Their sum.
    pub sum: f64,
    /// The lowest.
    pub min: f64,
    /// The highest.
    pub max: f64,
}

impl DayStat {
    /// Both days' readings together.
    pub fn merge(self, other: DayStat) -> DayStat {
        DayStat {
            count: self.count + other.count,
            sum: self.sum + other.sum,
            min: self.min.min(other.min),
            max: self.max.max(other.max),
        }
    }
}

/// A bucket with one of its segments (none for a bucket without any, which only a bulk
/// load of rollups makes); the first listing also says how many readings the sensor has,
/// and lists a row without a bucket when it has none.
#[derive(sqlx::FromRow)]
struct BucketRow {
    total: Option<i64>,
    bucket: Option<DateTime<Utc>>,
    bucket_count: Option<i64>,
    doc: Option<Vec<u8>>,
    fragment: Option<bool>,
    count: Option<i32>,
    first_ts: Option<DateTime<Utc>>,
    last_ts: Option<DateTime<Utc>>,
}

/// A reading's place: its bucket, its time in it, and a segment of that bucket.
#[derive(sqlx::FromRow)]
struct PlaceRow {
    bucket_id: i64,
    sensor_id: Uuid,
    bucket: DateTime<Utc>,
    offset_ms: i32,
    doc: Vec<u8>,
    fragment: bool,
    first_ts: DateTime<Utc>,
    last_ts: DateTime<Utc>,
}

/// Where a stored reading is: its bucket and the segments whose span holds its time
/// (one of them holds it).
pub(super) struct Place {
    pub bucket_id: i64,
    pub sensor: SensorId,
    pub bucket: DateTime<Utc>,
    pub candidates: Vec<DocRef>,
}

/// A segment as the index lists it.
#[derive(Debug, Clone)]
struct Listed {
    doc: DocRef,
    count: i32,
    first_ts: DateTime<Utc>,
    last_ts: DateTime<Utc>,
}

/// The bounds a query puts on readings.
struct Window {
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
    after: Option<(DateTime<Utc>, Uuid)>,
}

impl Window {
    fn holds(&self, r: &Reading) -> bool {
        self.from.is_none_or(|f| r.ts >= f)
            && self.to.is_none_or(|t| r.ts < t)
            && self.after.is_none_or(|a| (r.ts, r.id) < a)
    }

    /// Whether every reading measured in `[first, last]` is inside.
    fn covers(&self, first: DateTime<Utc>, last: DateTime<Utc>) -> bool {
        self.from.is_none_or(|f| first >= f)
            && self.to.is_none_or(|t| last < t)
            && self.after.is_none_or(|(ts, _)| last < ts)
    }

    /// Whether no reading measured in `[first, last]` can be inside.
    fn excludes(&self, first: DateTime<Utc>, last: DateTime<Utc>) -> bool {
        self.from.is_some_and(|f| last < f)
            || self.to.is_some_and(|t| first >= t)
            || self.after.is_some_and(|(ts, _)| first > ts)
    }
}

/// The segments of one bucket that can hold its newest `need` readings inside `window`.
/// Segments wholly inside the window guarantee their counts: with T the latest time
/// such that they hold at least `need` readings measured at or after T, every one of
/// the newest `need` is at or after T, so segments ending before T cannot contribute.
fn prune(mut docs: Vec<Listed>, window: &Window, need: u64) -> Vec<Listed> {
    docs.retain(|d| !window.excludes(d.first_ts, d.last_ts));
    let mut inside: Vec<&Listed> = docs
        .iter()
        .filter(|d| window.covers(d.first_ts, d.last_ts))
        .collect();
    inside.sort_by_key(|d| std::cmp::Reverse(d.first_ts));
    let mut guaranteed = 0u64;
    let mut threshold = None;
    for d in inside {
        guaranteed += d.count as u64;
        if guaranteed >= need {
            threshold = Some(d.first_ts);
            break;
        }
    }
    if let Some(t) = threshold {
        docs.retain(|d| d.last_ts >= t);
    }
    docs
}

impl ReadingStore {
    /// Segments by `_id`, in order, from the cache of recent segments or the document
    /// store (concurrently; with `keep`, what is fetched is cached: a segment never
    /// changes under its `_id`); `None` for one that does not exist.
    pub(super) async fn fetch_segments(
        &self,
        docs: &[DocRef],
        keep: bool,
    ) -> Result<Vec<Option<Arc<Segment>>>, StoreError> {
        let fetches = docs.iter().map(|d| async move {
            if let Some(hit) = self.recent.get(&d.id) {
                metrics::counter!("raw_segment_reads_total", "from" => "cache").increment(1);
                return Ok::<_, StoreError>(Some(hit));
            }
            metrics::counter!("raw_segment_reads_total", "from" => "store").increment(1);
            match self.collection(d).find_one(doc! { "_id": d.id }).await? {
                Some(raw) => {
                    let segment = Arc::new(Segment::decode(&raw)?);
                    if keep {
                        self.recent.insert(d.id, Arc::clone(&segment));
                    }
                    Ok(Some(segment))
                }
                None => Ok(None),
            }
        });
        try_join_all(fetches).await
    }

    /// A page of a sensor's readings, newest first by `(ts, id)`.
    #[tracing::instrument(skip_all, fields(sensor_id = %query.sensor))]
    pub async fn history(&self, query: &HistoryQuery) -> Result<HistoryPage, StoreError> {
        for _ in 1..ATTEMPTS {
            if let Some(page) = self.try_history(query).await? {
                return Ok(page);
            }
            metrics::counter!("raw_query_restarts_total").increment(1);
        }
        self.try_history(query).await?.ok_or_else(|| {
            StoreError::Corrupt("registered segments kept vanishing during a query".into())
        })
    }

    async fn try_history(&self, q: &HistoryQuery) -> Result<Option<HistoryPage>, StoreError> {
        let window = Window {
            from: q.from,
            to: q.to,
            after: match q.position {
                Position::After(ts, id) => Some((ts, id)),
                Position::Offset(_) => None,
            },
        };
        let mut skip = match q.position {
            Position::Offset(n) => n,
            Position::After(..) => 0,
        };
        let want = q.limit + 1;
        let width = Duration::minutes(BUCKET_MINUTES);
        // Newest bucket that can hold anything inside the window.
        let mut upper = [
            q.to.map(|t| super::bucket_of(t - Duration::milliseconds(1))),
            window.after.map(|(ts, _)| super::bucket_of(ts)),
        ]
        .into_iter()
        .flatten()
        .min();
        let lower = q.from.map(super::bucket_of);
        // Asked for with the first listing (one round trip for a first page).
        let mut count_total = q.from.is_none() && q.to.is_none() && window.after.is_none();
        let mut total = None;
        let mut found: Vec<Reading> = Vec::with_capacity(want);
        // Buckets are listed a few at a time; more at a time while skipping far.
        let mut batch: i64 = if skip > 0 { 64 } else { 4 };
        'listing: loop {
            // Buckets with their segments (a bucket without any, which only a bulk load
            // of rollups makes, lists once with none).
            let listed: Vec<BucketRow> = sqlx::query_as(
                "SELECT t.total, b.bucket, b.count AS bucket_count, d.doc, d.fragment, d.count,
                        d.first_ts, d.last_ts
                 FROM (SELECT CASE WHEN $5 THEN coalesce(
                           (SELECT count FROM sensor_latest WHERE sensor_id = $1), 0) END AS total) t
                 LEFT JOIN LATERAL (SELECT id, bucket, count FROM reading_buckets
                       WHERE sensor_id = $1 AND bucket <= $2 AND bucket >= $3
                       ORDER BY bucket DESC LIMIT $4) b ON true
                 LEFT JOIN raw_docs d ON d.bucket_id = b.id
                 ORDER BY b.bucket DESC NULLS LAST",
            )
            .bind(q.sensor.0)
            .bind(upper.unwrap_or(DateTime::<Utc>::MAX_UTC))
            .bind(lower.unwrap_or(EARLIEST))
            .bind(batch)
            .bind(count_total)
            .fetch_all(&self.pg)
            .await?;
            if std::mem::take(&mut count_total) {
                total = listed.first().and_then(|row| row.total);
            }
            let mut buckets: Vec<(DateTime<Utc>, i64, Vec<Listed>)> = Vec::new();
            for row in listed {
                let (Some(bucket), Some(bucket_count)) = (row.bucket, row.bucket_count) else {
                    continue; // the sensor has no bucket in range
                };
                if buckets.last().is_none_or(|(b, ..)| *b != bucket) {
                    buckets.push((bucket, bucket_count, Vec::new()));
                }
                if let (Some(doc), Some(fragment), Some(count), Some(first_ts), Some(last_ts)) =
                    (row.doc, row.fragment, row.count, row.first_ts, row.last_ts)
                {
                    let docs = &mut buckets.last_mut().expect("pushed").2;
                    docs.push(Listed {
                        doc: DocRef::from_row(&doc, fragment)?,
                        count,
                        first_ts,
                        last_ts,
                    });
                }
            }
            let exhausted = (buckets.len() as i64) < batch;
            for (bucket, count, docs) in buckets {
                upper = Some(bucket - width);
                let whole = window.covers(bucket, bucket + width - Duration::milliseconds(1));
                if whole && skip >= count as u64 {
                    skip -= count as u64;
                    continue;
                }
                let need = skip + (want - found.len()) as u64;
                let chosen = prune(docs, &window, need);
                let ids: Vec<DocRef> = chosen.iter().map(|d| d.doc).collect();
                let segments = self.fetch_segments(&ids, true).await?;
                let Some(segments) = segments.into_iter().collect::<Option<Vec<_>>>() else {
                    return Ok(None);
                };
                // Each segment is sorted: its newest `need` inside the window, from its end;
                // only the readings of the page are copied.
                let need = usize::try_from(need).unwrap_or(usize::MAX);
                let mut newest: Vec<&Reading> = Vec::new();
                for segment in &segments {
                    newest.extend(
                        segment
                            .readings
                            .iter()
                            .rev()
                            .filter(|r| window.holds(r))
                            .take(need),
                    );
                }
                newest.sort_unstable_by_key(|r| std::cmp::Reverse((r.ts, r.id)));
                newest.truncate(need);
                let dropped = (skip as usize).min(newest.len());
                skip -= dropped as u64;
                found.extend(newest[dropped..].iter().map(|r| (*r).clone()));
                if found.len() >= want {
                    break 'listing;
                }
            }
            if exhausted {
                break;
            }
            batch = (batch * 4).min(4096);
        }
        let more = found.len() > q.limit;
        found.truncate(q.limit);
        Ok(Some(HistoryPage {
            readings: found,
            more,
            total,
        }))
    }

    /// Where reading `id` is, from the index; `None` when it is not stored.
    pub(super) async fn place(&self, id: Uuid) -> Result<Option<Place>, StoreError> {
        let listed: Vec<PlaceRow> = sqlx::query_as(
            "SELECT b.id AS bucket_id, b.sensor_id, b.bucket, r.offset_ms, d.doc, d.fragment,
                    d.first_ts, d.last_ts
             FROM reading_ids r
             JOIN reading_buckets b ON b.id = r.bucket_id
             JOIN raw_docs d ON d.bucket_id = b.id
             WHERE r.id = $1",
        )
        .bind(id)
        .fetch_all(&self.pg)
        .await?;
        let Some(first) = listed.first() else {
            return Ok(None);
        };
        let ts = first.bucket + Duration::milliseconds(i64::from(first.offset_ms));
        Ok(Some(Place {
            bucket_id: first.bucket_id,
            sensor: SensorId(first.sensor_id),
            bucket: first.bucket,
            candidates: listed
                .iter()
                .filter(|p| p.first_ts <= ts && ts <= p.last_ts)
                .map(|p| DocRef::from_row(&p.doc, p.fragment))
                .collect::<Result<_, _>>()?,
        }))
    }

    /// A reading by id.
    #[tracing::instrument(skip_all, fields(reading_id = %id))]
    pub async fn reading(&self, id: Uuid) -> Result<Option<Reading>, StoreError> {
        for _ in 0..ATTEMPTS {
            let Some(place) = self.place(id).await? else {
                return Ok(None);
            };
            let docs = place.candidates;
            let segments = self.fetch_segments(&docs, true).await?;
            if segments.iter().any(Option::is_none) {
                continue;
            }
            return Ok(segments
                .into_iter()
                .flatten()
                .find_map(|s| s.readings.iter().find(|r| r.id == id).cloned()));
        }
        Err(StoreError::Corrupt(format!(
            "the segments of reading {id} kept vanishing"
        )))
    }

    /// Statistics per sensor and local day in `tz`, for the days `from..=to`, from the
    /// days' hourly cells; where a day starts inside an hour (zones at :30 and :45), that
    /// hour's 15-minute buckets, from the days' quarters. Never reads raw readings.
    #[tracing::instrument(skip_all, fields(sensors = sensors.len(), tz = %tz))]
    pub async fn daily(
        &self,
        sensors: &[SensorId],
        tz: Tz,
        from: NaiveDate,
        to: NaiveDate,
    ) -> Result<HashMap<(SensorId, NaiveDate), DayStat>, StoreError> {
        let days: Vec<NaiveDate> = from.iter_days().take_while(|d| *d <= to).collect();
        let starts: Vec<DateTime<Utc>> = days
            .iter()
            .chain(std::iter::once(&(to + chrono::Days::new(1))))
            .map(|d| local_day_start(tz, *d))
            .collect();
        let (first, last) = (starts[0], starts[starts.len() - 1]);
        let (first_day, last_day) = (first.date_naive(), last.date_naive());
        // Hours a day boundary falls inside (zones at :30 and :45) are read as their four
        // quarters: the first such hour of each UTC day from the days' quarters, by its
        // quarter's index per day; any other (two local midnights in one UTC day, in
        // zones within an hour of UTC, of the past) from the buckets.
        let split_hours: BTreeSet<DateTime<Utc>> = starts
            .iter()
            .filter(|s| s.timestamp().rem_euclid(3600) != 0)
            .map(|s| {
                let hour = s.timestamp() - s.timestamp().rem_euclid(3600);
                DateTime::from_timestamp(hour, 0).expect("in range")
            })
            .collect();
        let mut quarter_at: Vec<Option<i32>> =
            vec![None; (last_day - first_day).num_days() as usize + 1];
        let mut other_hours = Vec::new();
        for hour in split_hours {
            let slot = &mut quarter_at[(hour.date_naive() - first_day).num_days() as usize];
            match slot {
                None => *slot = Some(hour.hour() as i32 * 4),
                Some(_) => other_hours.push(hour),
            }
        }
        let ids: Vec<Uuid> = sensors.iter().map(|s| s.0).collect();
        // The cells packed in one bytea (migration 12): a year's arrays element by element
        // cost PostgreSQL ~6x more to send.
        let cells = sqlx::query_as::<_, (Uuid, NaiveDate, Vec<u8>)>(
            "SELECT sensor_id, day, packed FROM reading_days
             WHERE sensor_id = ANY($1) AND day >= $2 AND day <= $3
             ORDER BY sensor_id, day",
        )
        .bind(&ids)
        .bind(first_day)
        .bind(last_day)
        .fetch_all(&self.pg);
        let quarters = async {
            if quarter_at.iter().all(Option::is_none) {
                return Ok(Vec::new());
            }
            sqlx::query_as::<_, QuarterRow>(
                "SELECT d.sensor_id, d.day, h.q, d.counts[h.q + 1 : h.q + 4],
                        d.sums[h.q + 1 : h.q + 4], d.mins[h.q + 1 : h.q + 4],
                        d.maxs[h.q + 1 : h.q + 4]
                 FROM reading_day_quarters d
                 CROSS JOIN LATERAL (SELECT ($2::int[])[d.day - $3 + 1] AS q) h
                 WHERE d.sensor_id = ANY($1) AND d.day >= $3 AND d.day <= $4
                   AND h.q IS NOT NULL",
            )
            .bind(&ids)
            .bind(&quarter_at)
            .bind(first_day)
            .bind(last_day)
            .fetch_all(&self.pg)
            .await
        };
        let buckets = async {
            if other_hours.is_empty() {
                return Ok(Vec::new());
            }
            // One index range per hour (fewer probes than one per bucket).
            sqlx::query_as::<_, (Uuid, DateTime<Utc>, i64, f64, f64, f64)>(
                "SELECT b.sensor_id, b.bucket, b.count, b.sum::float8, b.min, b.max
                 FROM unnest($2::timestamptz[]) AS h(at)
                 CROSS JOIN LATERAL (
                     SELECT * FROM reading_buckets
                     WHERE sensor_id = ANY($1) AND bucket >= h.at
                       AND bucket < h.at + interval '1 hour') b",
            )
            .bind(&ids)
            .bind(&other_hours)
            .fetch_all(&self.pg)
            .await
        };
        let (cells, quarters, mut buckets) = tokio::try_join!(cells, quarters, buckets)?;
        for (sensor, day, q, counts, sums, mins, maxs) in quarters {
            let midnight = day.and_hms_opt(0, 0, 0).expect("midnight").and_utc();
            for j in 0..counts.len().min(sums.len()).min(mins.len()).min(maxs.len()) {
                let at = midnight + Duration::minutes(BUCKET_MINUTES * (i64::from(q) + j as i64));
                buckets.push((sensor, at, counts[j], sums[j], mins[j], maxs[j]));
            }
        }
        let cells = cells
            .into_iter()
            .map(|(sensor_id, day, packed)| {
                DayRow::unpack(sensor_id, day, &packed).ok_or_else(|| {
                    StoreError::Corrupt(format!(
                        "the hourly cells of sensor {sensor_id} on {day} cannot be read"
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;

        // Per sensor, a statistic per day (by index into `days`).
        let mut acc: HashMap<Uuid, Vec<Option<DayStat>>> = HashMap::new();
        let mut add = |sensor: Uuid, day: usize, stat: DayStat| {
            if stat.count == 0 {
                return;
            }
            let slot = &mut acc.entry(sensor).or_insert_with(|| vec![None; days.len()])[day];
            *slot = Some(slot.map_or(stat, |s| s.merge(stat)));
        };
        // Cells are in time order per sensor: walk them beside the days' starts.
        // `next` is the index of the first start after the cell's hour begins.
        let (mut sensor, mut next) = (None, 0);
        for row in &cells {
            if sensor != Some(row.sensor_id) {
                (sensor, next) = (Some(row.sensor_id), 0);
            }
            let midnight = row.day.and_hms_opt(0, 0, 0).expect("midnight").and_utc();
            for h in 0..24.min(row.counts.len()) {
                let at = midnight + Duration::hours(h as i64);
                while next < starts.len() && starts[next] <= at {
                    next += 1;
                }
                let inside = next > 0 && next < starts.len();
                // A boundary inside this hour: its buckets are counted instead.
                let split = next < starts.len() && starts[next] < at + Duration::hours(1);
                if inside && !split {
                    let stat = DayStat {
                        count: row.counts[h],
                        sum: row.sums[h],
                        min: row.mins[h],
                        max: row.maxs[h],
                    };
                    add(row.sensor_id, next - 1, stat);
                }
            }
        }
        for (sensor, bucket, count, sum, min, max) in buckets {
            // The day whose span holds the bucket; none before the first or after the last.
            let next = starts.partition_point(|s| *s <= bucket);
            if next > 0 && next < starts.len() {
                add(
                    sensor,
                    next - 1,
                    DayStat {
                        count,
                        sum,
                        min,
                        max,
                    },
                );
            }
        }
        Ok(acc
            .into_iter()
            .flat_map(|(sensor, stats)| {
                let days = &days;
                stats
                    .into_iter()
                    .enumerate()
                    .filter_map(move |(i, stat)| Some(((SensorId(sensor), days[i]), stat?)))
            })
            .collect())
    }
}

/// A sensor's UTC day, the quarter index of the first of four of its quarters, and their
/// counts, sums, mins and maxs.
type QuarterRow = (Uuid, NaiveDate, i32, Vec<i64>, Vec<f64>, Vec<f64>, Vec<f64>);

/// A sensor's UTC day in hourly cells.
#[derive(Debug, PartialEq)]
struct DayRow {
    sensor_id: Uuid,
    day: NaiveDate,
    counts: Vec<i64>,
    sums: Vec<f64>,
    mins: Vec<f64>,
    maxs: Vec<f64>,
}

impl DayRow {
    /// From `reading_days.packed`: the four arrays in PostgreSQL's binary array format,
    /// one after the other. `None` if it is not that.
    fn unpack(sensor_id: Uuid, day: NaiveDate, packed: &[u8]) -> Option<DayRow> {
        let mut p = Packed(packed);
        let row = DayRow {
            sensor_id,
            day,
            counts: p.array(i64::from_be_bytes)?,
            sums: p.array(f64::from_be_bytes)?,
            mins: p.array(f64::from_be_bytes)?,
            maxs: p.array(f64::from_be_bytes)?,
        };
        let len = row.counts.len();
        (p.0.is_empty()
            && [&row.sums, &row.mins, &row.maxs]
                .iter()
                .all(|a| a.len() == len))
        .then_some(row)
    }
}

/// Reads arrays of 8-byte elements in PostgreSQL's binary format (what `array_send`
/// writes): dimensions, a has-nulls flag, the element type, each dimension's length and
/// lower bound, then each element's length and bytes.
struct Packed<'a>(&'a [u8]);

impl Packed<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, tail) = self.0.split_first_chunk::<N>()?;
        self.0 = tail;
        Some(*head)
    }

    fn int(&mut self) -> Option<i32> {
        self.take::<4>().map(i32::from_be_bytes)
    }

    fn array<T>(&mut self, element: impl Fn([u8; 8]) -> T) -> Option<Vec<T>> {
        let (dimensions, _has_nulls, _element_type) = (self.int()?, self.int()?, self.int()?);
        match dimensions {
            0 => return Some(Vec::new()),
            1 => {}
            _ => return None,
        }
        let (len, _lower_bound) = (self.int()?, self.int()?);
        (0..len)
            .map(|_| match self.int()? {
                8 => self.take::<8>().map(&element),
                _ => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use mongodb::bson::oid::ObjectId;

    fn listed(first: i64, last: i64, count: i32) -> Listed {
        let t0 = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        Listed {
            doc: DocRef {
                id: ObjectId::from_bytes([first as u8; 12]),
                fragment: false,
            },
            count,
            first_ts: t0 + Duration::seconds(first),
            last_ts: t0 + Duration::seconds(last),
        }
    }

    fn open() -> Window {
        Window {
            from: None,
            to: None,
            after: None,
        }
    }

    #[test]
    fn pruning_keeps_only_segments_that_can_hold_the_newest_readings() {
        // In order, one segment per minute: the newest two hold 50 readings.
        let docs: Vec<Listed> = (0..10).map(|m| listed(m * 60, m * 60 + 59, 30)).collect();
        let kept = prune(docs.clone(), &open(), 50);
        let mut firsts: Vec<i64> = kept.iter().map(|d| d.first_ts.timestamp() % 3600).collect();
        firsts.sort();
        assert_eq!(firsts, vec![480, 540]);
        // A late segment spanning everything must be read too.
        let mut with_late = docs;
        with_late.push(listed(0, 599, 5));
        assert_eq!(prune(with_late, &open(), 50).len(), 3);
    }

    #[test]
    fn pruning_never_drops_a_segment_straddling_the_cursor() {
        let t0 = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let docs = vec![
            listed(0, 100, 10),
            listed(100, 200, 10),
            listed(200, 300, 10),
        ];
        let window = Window {
            from: None,
            to: None,
            after: Some((t0 + Duration::seconds(100), Uuid::max())),
        };
        let kept = prune(docs, &window, 5);
        // The newest segment is after the cursor; the one ending at it may hold some.
        assert_eq!(kept.len(), 2);
        assert!(kept
            .iter()
            .all(|d| d.first_ts <= t0 + Duration::seconds(100)));
    }

    /// `array_send` of a one-dimensional array of 8-byte elements (oid 701: float8).
    fn array_send(elements: &[[u8; 8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for header in [1, 0, 701, elements.len() as i32, 1] {
            out.extend_from_slice(&i32::to_be_bytes(header));
        }
        for e in elements {
            out.extend_from_slice(&8i32.to_be_bytes());
            out.extend_from_slice(e);
        }
        out
    }

    #[test]
    fn packed_cells_are_read_back_and_anything_else_is_refused() {
        let (sensor, day) = (
            Uuid::from_u128(7),
            NaiveDate::from_ymd_opt(2026, 3, 1).unwrap(),
        );
        let floats = |v: [f64; 2]| v.map(f64::to_be_bytes);
        let mut packed = array_send(&[3i64.to_be_bytes(), 0i64.to_be_bytes()]);
        packed.extend(array_send(&floats([61.5, 0.0])));
        packed.extend(array_send(&floats([20.25, f64::INFINITY])));
        packed.extend(array_send(&floats([20.75, f64::NEG_INFINITY])));
        assert_eq!(
            DayRow::unpack(sensor, day, &packed),
            Some(DayRow {
                sensor_id: sensor,
                day,
                counts: vec![3, 0],
                sums: vec![61.5, 0.0],
                mins: vec![20.25, f64::INFINITY],
                maxs: vec![20.75, f64::NEG_INFINITY],
            })
        );
        // Cut short, one array missing, trailing bytes, arrays of unequal length.
        assert_eq!(
            DayRow::unpack(sensor, day, &packed[..packed.len() - 1]),
            None
        );
        let three = packed.len() - array_send(&floats([0.0, 0.0])).len();
        assert_eq!(DayRow::unpack(sensor, day, &packed[..three]), None);
        let mut longer = packed.clone();
        longer.push(0);
        assert_eq!(DayRow::unpack(sensor, day, &longer), None);
        let mut uneven = packed[..three].to_vec();
        uneven.extend(array_send(&floats([1.0, 2.0])[..1]));
        assert_eq!(DayRow::unpack(sensor, day, &uneven), None);
        // A NULL element (length -1) is not a cell.
        let mut with_null = packed.clone();
        with_null[20..24].copy_from_slice(&(-1i32).to_be_bytes());
        assert_eq!(DayRow::unpack(sensor, day, &with_null), None);
    }
}
