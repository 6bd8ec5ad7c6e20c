//! Which sensors exist, which client owns each, and their device secrets: read from
//! PostgreSQL through a cache, by the consumer (validation), the broker (device auth)
//! and HTTP ingest.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use moka::{future::Cache, Expiry};
use sqlx::PgPool;
use uuid::Uuid;

use crate::ids::{ClientId, SensorId};

/// What the directory knows of a sensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SensorEntry {
    /// Its client.
    pub client_id: ClientId,
    /// SHA-256 of its device secret.
    pub secret_hash: Vec<u8>,
}

/// Known sensors are kept longer than unknown ids: a sensor created a moment ago must
/// become usable quickly, while a deletion elsewhere may take up to the longer TTL to be
/// noticed by another process (changes made in this process invalidate at once).
struct TwoTtls {
    known: Duration,
    unknown: Duration,
}

impl Expiry<SensorId, Option<SensorEntry>> for TwoTtls {
    fn expire_after_create(
        &self,
        _key: &SensorId,
        value: &Option<SensorEntry>,
        _now: Instant,
    ) -> Option<Duration> {
        Some(if value.is_some() {
            self.known
        } else {
            self.unknown
        })
    }
}

/// The cached sensor directory. Cheap to clone.
#[derive(Clone)]
pub struct SensorDirectory {
    pg: PgPool,
    cache: Cache<SensorId, Option<SensorEntry>>,
}

impl SensorDirectory {
    /// Known sensors cached for 60 s, unknown ids for 2 s.
    pub fn new(pg: PgPool) -> Self {
        Self::with_ttls(pg, Duration::from_secs(60), Duration::from_secs(2))
    }

    /// With explicit cache lifetimes.
    pub fn with_ttls(pg: PgPool, known: Duration, unknown: Duration) -> Self {
        Self {
            pg,
            cache: Cache::builder()
                .max_capacity(1_000_000)
                .expire_after(TwoTtls { known, unknown })
                .build(),
        }
    }

    /// The sensor, or `None` when no sensor has this id. Errors only when PostgreSQL
    /// cannot answer and the cache does not know.
    pub async fn get(&self, id: SensorId) -> Result<Option<SensorEntry>, Arc<sqlx::Error>> {
        let pg = self.pg.clone();
        metrics::counter!("sensor_directory_lookups_total").increment(1);
        self.cache
            .try_get_with(id, async move {
                // Only misses get here; hits = lookups - loads.
                metrics::counter!("sensor_directory_loads_total").increment(1);
                let row: Option<(Uuid, Vec<u8>)> =
                    sqlx::query_as("SELECT client_id, secret_hash FROM sensors WHERE id = $1")
                        .bind(id.0)
                        .fetch_optional(&pg)
                        .await?;
                Ok::<_, sqlx::Error>(row.map(|(client, secret_hash)| SensorEntry {
                    client_id: ClientId(client),
                    secret_hash,
                }))
            })
            .await
    }

    /// Forgets a sensor after it changed (secret rotated, deleted).
    pub async fn invalidate(&self, id: SensorId) {
        self.cache.invalidate(&id).await;
    }
}
