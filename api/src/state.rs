//! Shared state of the API's own resources: stores and caches. Products keep their own
//! state (the chat webhook's is `termopar_chat::Chat`); the caller's identity is the
//! [`Authenticator`]'s.

use std::{ops::Deref, sync::Arc, time::Duration};

use moka::future::Cache;
use mongodb::Database;
use sqlx::PgPool;
use termopar_alarms::{Alarming, Alarms};
use termopar_core::{
    directory::SensorDirectory,
    intake::Intake,
    reading::Limits,
    settings::MqttEndpoint,
    store::{ChangeHook, LatestCache, ReadingStore},
    topic::Topics,
};
use termopar_web::Authenticator;
use uuid::Uuid;

use crate::settings::Settings;

/// Cheap to clone; attached to every request.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

/// The state behind [`AppState`].
pub struct Inner {
    /// PostgreSQL: users, clients, sensors, rollups.
    pub pg: PgPool,
    /// The MongoDB-compatible store: raw readings.
    pub mongo: Database,
    /// Checks tokens; issues them (its keys) and forgets changed users.
    pub auth: Authenticator,
    /// Sensors by id (shared with the broker and consumer in edge mode, so a rotated
    /// secret or a deleted sensor takes effect there at once).
    pub directory: SensorDirectory,
    /// The broker `/ready` checks, if any.
    pub ready_broker: Option<MqttEndpoint>,
    /// Readings: raw, rollups, latest, dead letters (HTTP ingest, history, corrections).
    pub store: ReadingStore,
    /// HTTP ingest: the same checks, parsing and dead letters as MQTT's.
    pub intake: Intake,
    /// The alarm rules' evaluator of this process (HTTP ingest's, and in edge mode the
    /// consumer's too: one state per rule and sensor).
    pub alarms: Alarms,
    /// Where ingest stores: [`Self::store`], evaluated by [`Self::alarms`].
    pub ingest: Alarming,
    /// Client time zones (the default `tz` of daily averages).
    pub client_tz: Cache<Uuid, String>,
}

impl Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl AppState {
    /// State over already-connected stores; `on_change` hears of every change of the
    /// rollups the store commits (the daily-average cache's invalidation).
    pub fn new(settings: &Settings, pg: PgPool, mongo: Database, on_change: ChangeHook) -> Self {
        let directory = SensorDirectory::new(pg.clone());
        let store = ReadingStore::with_tuning(pg.clone(), &mongo, settings.store.clone())
            .with_latest_cache(LatestCache::new(settings.latest_cache_ttl))
            .with_change_hook(on_change);
        let alarms = Alarms::new(pg.clone(), store.clone());
        Self(Arc::new(Inner {
            ingest: Alarming::new(store.clone(), alarms.clone()),
            alarms,
            auth: Authenticator::new(&settings.auth, pg.clone()),
            pg,
            mongo,
            intake: Intake::new(directory.clone(), Topics::new(""), Limits::default()),
            directory,
            ready_broker: settings.ready_broker.clone(),
            store,
            client_tz: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(60))
                .build(),
        }))
    }
}
