//! Each sensor's latest reading, cached in front of PostgreSQL's `sensor_latest`.
//!
//! Whoever commits a newer latest row (the ingest store in this process) offers it to
//! the cache, which keeps the newer of what it has and what is offered. Another
//! process's writes are seen when the entry expires, so in cloud mode the TTL is short.

use std::{sync::Arc, time::Duration};

use moka::future::Cache;
use moka::ops::compute::Op;
use serde_json::{Map, Value};
use sqlx::PgPool;
use uuid::Uuid;

use crate::{
    ids::{ClientId, SensorId},
    ingest::StoredReading,
};

/// The latest-reading cache. Cheap to clone.
#[derive(Clone)]
pub struct LatestCache {
    cache: Cache<SensorId, Option<Arc<StoredReading>>>,
}

impl LatestCache {
    /// Entries live for `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Self {
            cache: Cache::builder()
                .max_capacity(1_000_000)
                .time_to_live(ttl)
                .build(),
        }
    }

    /// The latest reading of `sensor` (`None` before its first reading).
    pub async fn get(
        &self,
        pg: &PgPool,
        sensor: SensorId,
    ) -> Result<Option<Arc<StoredReading>>, Arc<sqlx::Error>> {
        metrics::counter!("latest_cache_lookups_total").increment(1);
        let pg = pg.clone();
        self.cache
            .try_get_with(sensor, async move {
                metrics::counter!("latest_cache_loads_total").increment(1);
                load(&pg, &[sensor])
                    .await
                    .map(|mut v| v.pop().map(Arc::new))
            })
            .await
    }

    /// Keeps `reading` if it is newer than what the cache holds for its sensor.
    pub async fn offer(&self, reading: StoredReading) {
        let reading = Arc::new(reading);
        self.cache
            .entry(reading.sensor_id)
            .and_compute_with(|current| {
                let newer = match current.as_ref().map(|e| e.value()) {
                    Some(Some(held)) => (reading.ts, reading.id) > (held.ts, held.id),
                    _ => true,
                };
                let op = if newer {
                    Op::Put(Some(reading.clone()))
                } else {
                    Op::Nop
                };
                std::future::ready(op)
            })
            .await;
    }

    /// Forgets a sensor (after a correction or deletion).
    pub async fn invalidate(&self, sensor: SensorId) {
        self.cache.invalidate(&sensor).await;
    }
}

/// The latest rows of `sensors` from PostgreSQL (sensors without readings are absent).
pub async fn load(pg: &PgPool, sensors: &[SensorId]) -> Result<Vec<StoredReading>, sqlx::Error> {
    type Row = (
        Uuid,
        Uuid,
        Uuid,
        chrono::DateTime<chrono::Utc>,
        f64,
        chrono::DateTime<chrono::Utc>,
        Value,
    );
    let ids: Vec<Uuid> = sensors.iter().map(|s| s.0).collect();
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT l.sensor_id, s.client_id, l.reading_id, l.ts, l.temperature, l.received_at, l.extra
         FROM sensor_latest l JOIN sensors s ON s.id = l.sensor_id
         WHERE l.sensor_id = ANY($1) ORDER BY l.sensor_id",
    )
    .bind(&ids)
    .fetch_all(pg)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(sensor, client, id, ts, temperature, received_at, extra)| StoredReading {
                id,
                sensor_id: SensorId(sensor),
                client_id: ClientId(client),
                ts,
                temperature,
                received_at,
                extra: match extra {
                    Value::Object(m) => m,
                    _ => Map::new(),
                },
            },
        )
        .collect())
}
