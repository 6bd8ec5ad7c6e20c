//! Each sensor's latest reading, cached in front of PostgreSQL's `sensor_latest`.
//!
//! Whoever commits a newer latest row (the store in this process) offers it to the
//! cache, which keeps the newer of what it has and what is offered. Another process's
//! writes are seen when the entry expires, so in cloud mode the TTL is short.

use std::{sync::Arc, time::Duration};

use moka::future::Cache;
use moka::ops::compute::Op;
use serde_json::{Map, Value};
use sqlx::PgPool;
use uuid::Uuid;

use super::{ReadingStore, StoreError};
use crate::{
    ids::{ClientId, SensorId},
    reading::{Celsius, Reading},
};

/// The latest-reading cache. Cheap to clone.
#[derive(Clone)]
pub struct LatestCache {
    cache: Cache<SensorId, Option<Arc<Reading>>>,
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
    async fn get(
        &self,
        pg: &PgPool,
        sensor: SensorId,
    ) -> Result<Option<Arc<Reading>>, Arc<sqlx::Error>> {
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
    pub(super) async fn offer(&self, reading: Reading) {
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
    pub(super) async fn invalidate(&self, sensor: SensorId) {
        self.cache.invalidate(&sensor).await;
    }
}

impl ReadingStore {
    /// The latest reading of `sensor` by measurement time (`None` before its first),
    /// through the cache.
    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn latest(&self, sensor: SensorId) -> Result<Option<Arc<Reading>>, StoreError> {
        self.latest
            .get(&self.pg, sensor)
            .await
            .map_err(|e| StoreError::Postgres(crate::db::shared_error(&e)))
    }

    /// The latest readings of `sensors` (those without readings are absent), uncached.
    #[tracing::instrument(level = "debug", skip_all, fields(sensors = sensors.len()))]
    pub async fn latest_of(&self, sensors: &[SensorId]) -> Result<Vec<Reading>, StoreError> {
        Ok(load(&self.pg, sensors).await?)
    }
}

/// The latest rows of `sensors` from PostgreSQL (sensors without readings are absent).
async fn load(pg: &PgPool, sensors: &[SensorId]) -> Result<Vec<Reading>, sqlx::Error> {
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
            |(sensor, client, id, ts, temperature, received_at, extra)| Reading {
                id,
                sensor_id: SensorId(sensor),
                client_id: ClientId(client),
                ts,
                temperature: Celsius::from_store(temperature),
                received_at,
                extra: match extra {
                    Value::Object(m) => m,
                    _ => Map::new(),
                },
            },
        )
        .collect())
}
