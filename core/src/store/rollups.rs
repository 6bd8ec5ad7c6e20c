//! Rollups (15-minute buckets, hours, each sensor's latest reading and count) and the
//! notices of changes to days caches may hold.
//!
//! Ingest adds to the rollups in the statement that registers its segments (see
//! [`super::write`]); this module recomputes them from the raw segments when readings
//! change in place (corrections, deletions) and announces changed buckets of possibly
//! finished days.

use std::{collections::HashMap, time::Duration};

use chrono::{DateTime, Timelike, Utc};
use sqlx::{PgConnection, Postgres, Transaction};
use uuid::Uuid;

use super::{codec::bucket_of, ReadingStore, StoreError};
use crate::{ids::SensorId, reading::Reading};

/// Readings older than this are "late": they may land in a day some cache considers
/// finished, so their buckets are announced on [`BUCKETS_CHANNEL`].
pub const LATE_AFTER: Duration = Duration::from_secs(3600);
/// PostgreSQL NOTIFY channel announcing changed buckets of finished days, as JSON
/// `[{"sensor_id", "from", "to"}]` (bucket starts, inclusive), or `"*"` for everything.
pub const BUCKETS_CHANNEL: &str = "termopar_buckets";
/// NOTIFY payloads are limited to 8000 bytes; larger change sets say "everything".
const NOTIFY_LIMIT: usize = 7900;

/// A change announced on [`BUCKETS_CHANNEL`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BucketChange {
    /// The sensor.
    pub sensor_id: Uuid,
    /// First changed bucket.
    pub from: DateTime<Utc>,
    /// Last changed bucket.
    pub to: DateTime<Utc>,
}

/// Called after a commit with the buckets of finished days it changed, so caches in
/// this process forget them at once (other processes learn from NOTIFY).
pub type ChangeHook = std::sync::Arc<dyn Fn(&[BucketChange]) + Send + Sync>;

/// The buckets of late readings among `readings`, per sensor, and the NOTIFY payload
/// announcing them (`None` when there are none).
pub(super) fn late_changes<'a>(
    readings: impl IntoIterator<Item = &'a Reading>,
) -> (Vec<BucketChange>, Option<String>) {
    let late_before = Utc::now() - chrono::Duration::from_std(LATE_AFTER).expect("small");
    let mut late: HashMap<Uuid, (DateTime<Utc>, DateTime<Utc>)> = HashMap::new();
    for r in readings.into_iter().filter(|r| r.ts < late_before) {
        let b = bucket_of(r.ts);
        let span = late.entry(r.sensor_id.0).or_insert((b, b));
        span.0 = span.0.min(b);
        span.1 = span.1.max(b);
    }
    let changes: Vec<BucketChange> = late
        .into_iter()
        .map(|(sensor_id, (from, to))| BucketChange {
            sensor_id,
            from,
            to,
        })
        .collect();
    let payload = notice(&changes);
    (changes, payload)
}

/// The NOTIFY payload announcing `changes`.
fn notice(changes: &[BucketChange]) -> Option<String> {
    if changes.is_empty() {
        return None;
    }
    let payload = serde_json::to_string(changes).expect("serializable");
    Some(if payload.len() > NOTIFY_LIMIT {
        "\"*\"".to_owned()
    } else {
        payload
    })
}

/// Announces `changes` when the transaction commits.
async fn notify(tx: &mut PgConnection, changes: &[BucketChange]) -> Result<(), sqlx::Error> {
    if let Some(payload) = notice(changes) {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(BUCKETS_CHANNEL)
            .bind(payload)
            .execute(tx)
            .await?;
    }
    Ok(())
}

impl ReadingStore {
    /// Recomputes a sensor's bucket from its registered segments and replaces the
    /// bucket's and its hour's rollups: what ingestion added up must always equal this.
    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn recompute_bucket(
        &self,
        sensor: SensorId,
        bucket: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let mut tx = self.pg.begin().await?;
        let locked: Option<i64> = sqlx::query_scalar(
            "SELECT id FROM reading_buckets WHERE sensor_id = $1 AND bucket = $2 FOR UPDATE",
        )
        .bind(sensor.0)
        .bind(bucket)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(bucket_id) = locked {
            self.rollup_from_segments(&mut tx, sensor, bucket_id, bucket)
                .await?;
        }
        self.announce(tx, sensor, bucket).await
    }

    /// Replaces a bucket's rollup by what its registered segments hold. The caller holds
    /// the bucket's row lock.
    pub(super) async fn rollup_from_segments(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        sensor: SensorId,
        bucket_id: i64,
        bucket: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let temps: Vec<f64> = self
            .bucket_readings(tx, bucket_id)
            .await?
            .iter()
            .map(|r| r.temperature.get())
            .collect();
        replace_rollup(tx, sensor, bucket, &temps).await?;
        Ok(())
    }

    /// Commits `tx`, which changed one bucket, announcing the change.
    pub(super) async fn announce(
        &self,
        mut tx: Transaction<'_, Postgres>,
        sensor: SensorId,
        bucket: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let changes = [BucketChange {
            sensor_id: sensor.0,
            from: bucket,
            to: bucket,
        }];
        notify(&mut tx, &changes).await?;
        tx.commit().await?;
        self.changed(&changes);
        Ok(())
    }

    /// Every reading of a bucket, from its registered segments, read under the bucket's
    /// row lock (the caller holds it).
    pub(super) async fn bucket_readings(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        bucket_id: i64,
    ) -> Result<Vec<Reading>, StoreError> {
        let docs: Vec<super::DocRef> = sqlx::query_as::<_, (Vec<u8>, bool)>(
            "SELECT doc, fragment FROM raw_docs WHERE bucket_id = $1",
        )
        .bind(bucket_id)
        .fetch_all(&mut **tx)
        .await?
        .iter()
        .map(|(doc, fragment)| super::DocRef::from_row(doc, *fragment))
        .collect::<Result<_, _>>()?;
        let segments = self.fetch_segments(&docs, true).await?;
        let mut readings: Vec<Reading> = segments
            .into_iter()
            .map(|s| {
                s.ok_or_else(|| {
                    StoreError::Corrupt(format!("a segment of bucket {bucket_id} is missing"))
                })
            })
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .flat_map(|s| s.readings.clone())
            .collect();
        readings.sort_by_key(|r| (r.ts, r.id));
        Ok(readings)
    }

    /// Recomputes a sensor's latest row and count from its newest bucket's segments and
    /// its buckets' counts; `None` when the sensor has no reading left.
    pub(super) async fn recompute_latest(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        sensor: SensorId,
    ) -> Result<(), StoreError> {
        let newest: Option<(i64, i64)> = sqlx::query_as(
            "SELECT id, (SELECT sum(count)::int8 FROM reading_buckets WHERE sensor_id = $1)
             FROM reading_buckets WHERE sensor_id = $1 ORDER BY bucket DESC LIMIT 1",
        )
        .bind(sensor.0)
        .fetch_optional(&mut **tx)
        .await?;
        let Some((bucket_id, count)) = newest else {
            sqlx::query("DELETE FROM sensor_latest WHERE sensor_id = $1")
                .bind(sensor.0)
                .execute(&mut **tx)
                .await?;
            return Ok(());
        };
        let readings = self.bucket_readings(tx, bucket_id).await?;
        let r = readings.last().ok_or_else(|| {
            StoreError::Corrupt(format!("bucket {bucket_id} has a count but no segments"))
        })?;
        sqlx::query(
            "INSERT INTO sensor_latest (sensor_id, reading_id, ts, temperature, received_at, extra, count)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (sensor_id) DO UPDATE SET reading_id = excluded.reading_id,
                ts = excluded.ts, temperature = excluded.temperature,
                received_at = excluded.received_at, extra = excluded.extra,
                count = excluded.count, updated_at = now()",
        )
        .bind(sensor.0)
        .bind(r.id)
        .bind(r.ts)
        .bind(r.temperature.get())
        .bind(r.received_at)
        .bind(serde_json::Value::Object(r.extra.clone()))
        .bind(count)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }
}

/// Replaces a bucket's rollup (deleting it when `temps` is empty) and recomputes its
/// day's cell of that hour from the hour's buckets, and its day's quarter. The caller holds the bucket's row
/// lock.
pub(super) async fn replace_rollup(
    tx: &mut Transaction<'_, Postgres>,
    sensor: SensorId,
    bucket: DateTime<Utc>,
    temps: &[f64],
) -> Result<(), sqlx::Error> {
    if temps.is_empty() {
        sqlx::query("DELETE FROM reading_buckets WHERE sensor_id = $1 AND bucket = $2")
            .bind(sensor.0)
            .bind(bucket)
            .execute(&mut **tx)
            .await?;
    } else {
        sqlx::query(
            "UPDATE reading_buckets b SET count = t.count, sum = t.sum, min = t.min, max = t.max
             FROM (SELECT count(*) AS count, sum(t::numeric) AS sum, min(t) AS min, max(t) AS max
                   FROM unnest($3::float8[]) t) t
             WHERE b.sensor_id = $1 AND b.bucket = $2",
        )
        .bind(sensor.0)
        .bind(bucket)
        .bind(temps)
        .execute(&mut **tx)
        .await?;
    }
    // The day's cell of that hour is its buckets' aggregate.
    sqlx::query(
        "WITH h AS (
            SELECT coalesce(sum(count), 0)::bigint AS n, coalesce(sum(sum), 0)::float8 AS s,
                   coalesce(min(min), 'Infinity') AS lo, coalesce(max(max), '-Infinity') AS hi
            FROM reading_buckets
            WHERE sensor_id = $1 AND bucket >= date_trunc('hour', $2::timestamptz, 'UTC')
              AND bucket < date_trunc('hour', $2::timestamptz, 'UTC') + interval '1 hour'
         )
         UPDATE reading_days d
         SET counts[$3] = h.n, sums[$3] = h.s, mins[$3] = h.lo, maxs[$3] = h.hi
         FROM h WHERE d.sensor_id = $1 AND d.day = ($2::timestamptz AT TIME ZONE 'UTC')::date",
    )
    .bind(sensor.0)
    .bind(bucket)
    .bind(bucket.hour() as i32 + 1)
    .execute(&mut **tx)
    .await?;
    // And the day's quarter of that bucket is the bucket.
    sqlx::query(
        "WITH q AS (
            SELECT coalesce(sum(count), 0)::bigint AS n, coalesce(sum(sum), 0)::float8 AS s,
                   coalesce(min(min), 'Infinity') AS lo, coalesce(max(max), '-Infinity') AS hi
            FROM reading_buckets WHERE sensor_id = $1 AND bucket = $2
         )
         UPDATE reading_day_quarters d
         SET counts[$3] = q.n, sums[$3] = q.s, mins[$3] = q.lo, maxs[$3] = q.hi
         FROM q WHERE d.sensor_id = $1 AND d.day = ($2::timestamptz AT TIME ZONE 'UTC')::date",
    )
    .bind(sensor.0)
    .bind(bucket)
    .bind((bucket.hour() * 4 + bucket.minute() / 15) as i32 + 1)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_change_set_is_announced_as_everything() {
        let changes: Vec<BucketChange> = (0..200)
            .map(|i| BucketChange {
                sensor_id: Uuid::from_u128(i),
                from: Utc::now(),
                to: Utc::now(),
            })
            .collect();
        assert_eq!(notice(&changes).as_deref(), Some("\"*\""));
        assert_eq!(notice(&[]), None);
        let one = notice(&changes[..1]).unwrap();
        let back: Vec<BucketChange> = serde_json::from_str(&one).unwrap();
        assert_eq!(back, changes[..1]);
    }
}
