//! Which sensors exist, which client owns each, and their device secrets: read from
//! PostgreSQL through a cache, by the consumer (validation), the broker (device auth)
//! and HTTP ingest.
//!
//! Changes are announced: [`SensorDirectory::invalidate`] in this process, and the
//! `sensor_changes` NOTIFY channel (a trigger on `sensors`) from any process, which
//! [`SensorDirectory::follow_changes`] turns into invalidations. Both reach
//! [`SensorDirectory::changes`], where the MQTT front learns which live devices to
//! check again.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use moka::{future::Cache, Expiry};
use sqlx::PgPool;
use tokio::sync::broadcast;
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

/// What changed in the directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SensorChange {
    /// This sensor's secret or client changed, or it was deleted.
    One(SensorId),
    /// Notices may have been missed (the listening connection was lost): anything may
    /// have changed.
    Any,
}

/// PostgreSQL NOTIFY channel of sensor changes (see the `sensor_changes` migration).
pub const CHANGES_CHANNEL: &str = "sensor_changes";

/// The cached sensor directory. Cheap to clone.
#[derive(Clone)]
pub struct SensorDirectory {
    pg: PgPool,
    cache: Cache<SensorId, Option<SensorEntry>>,
    changes: broadcast::Sender<SensorChange>,
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
            changes: broadcast::channel(1024).0,
        }
    }

    /// Changes from now on (a receiver that lags has missed some: treat it as
    /// [`SensorChange::Any`]).
    pub fn changes(&self) -> broadcast::Receiver<SensorChange> {
        self.changes.subscribe()
    }

    /// Listens on the `sensor_changes` channel until the pool closes, invalidating what
    /// other processes changed. Resolves once listening, returning the listening task.
    pub async fn follow_changes(&self) -> Result<tokio::task::JoinHandle<()>, sqlx::Error> {
        let mut listener = sqlx::postgres::PgListener::connect_with(&self.pg).await?;
        listener.listen(CHANGES_CHANNEL).await?;
        let directory = self.clone();
        Ok(tokio::spawn(async move {
            loop {
                match listener.try_recv().await {
                    Ok(Some(notice)) => match notice.payload().parse::<Uuid>() {
                        Ok(id) => directory.invalidate(SensorId(id)).await,
                        Err(_) => tracing::warn!(
                            payload = notice.payload(),
                            "unreadable sensor change notice"
                        ),
                    },
                    // The connection was lost and is made again on the next call: what
                    // was announced meanwhile is unknown.
                    Ok(None) => directory.invalidate_all(),
                    Err(sqlx::Error::PoolClosed) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, "listening for sensor changes failed; retrying");
                        directory.invalidate_all();
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        }))
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

    /// Forgets a sensor after it changed (secret rotated, deleted), and announces it.
    pub async fn invalidate(&self, id: SensorId) {
        self.cache.invalidate(&id).await;
        let _ = self.changes.send(SensorChange::One(id));
    }

    /// Forgets every sensor, and announces that anything may have changed.
    pub fn invalidate_all(&self) {
        self.cache.invalidate_all();
        let _ = self.changes.send(SensorChange::Any);
    }
}
