//! Shared state of the API: stores, keys and caches.

use std::{ops::Deref, sync::Arc};

use moka::future::Cache;
use mongodb::Database;
use sqlx::PgPool;
use termopar_core::{
    directory::SensorDirectory,
    intake::Intake,
    reading::Limits,
    settings::MqttEndpoint,
    store::{LatestCache, ReadingStore},
    topic::Topics,
};

use crate::{
    daily::DailyCache,
    webhook::{relay, store::EventWriter},
};
use uuid::Uuid;

use crate::{
    auth::{Jwt, Principal, Role, TokenType},
    error::{ApiError, ApiResult},
    settings::Settings,
};

/// What a token check needs to know of a user, cached.
#[derive(Debug, Clone)]
pub struct AuthUser {
    role: Role,
    client_id: Option<Uuid>,
    token_version: i32,
}

/// Cheap to clone; attached to every request.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

/// The state behind [`AppState`].
pub struct Inner {
    /// PostgreSQL: users, clients, sensors, rollups.
    pub pg: PgPool,
    /// The MongoDB-compatible store: raw readings and events.
    pub mongo: Database,
    /// Token keys.
    pub jwt: Jwt,
    /// Users by id, as token checks see them. `None` caches "no such user".
    auth_users: Cache<Uuid, Option<AuthUser>>,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// Sensors by id (shared with the broker and consumer in edge mode, so a rotated
    /// secret or a deleted sensor takes effect there at once).
    pub directory: SensorDirectory,
    /// The broker `/ready` checks, if any.
    pub ready_broker: Option<MqttEndpoint>,
    /// Readings: raw, rollups, latest, dead letters (HTTP ingest, history, corrections).
    pub store: ReadingStore,
    /// HTTP ingest: the same checks, parsing and dead letters as MQTT's.
    pub intake: Intake,
    /// Finished days of daily averages.
    pub daily: DailyCache,
    /// Client time zones (the default `tz` of daily averages).
    pub client_tz: Cache<Uuid, String>,
    /// The key webhook bodies must be signed with, if any.
    pub webhook_secret: Option<String>,
    /// Webhook deliveries, applied and recorded in groups.
    pub webhook: EventWriter,
}

impl Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl AppState {
    /// State over already-connected stores.
    pub fn new(settings: &Settings, pg: PgPool, mongo: Database) -> Self {
        let directory = SensorDirectory::new(pg.clone());
        let daily = DailyCache::new();
        let store = ReadingStore::with_tuning(pg.clone(), &mongo, settings.store.clone())
            .with_latest_cache(LatestCache::new(settings.latest_cache_ttl))
            .with_change_hook(daily.hook());
        let raw_events = mongo.collection(crate::webhook::EVENTS);
        let relay_wake = Arc::new(tokio::sync::Notify::new());
        tokio::spawn(relay::run(
            pg.clone(),
            raw_events.clone(),
            relay_wake.clone(),
        ));
        let webhook = EventWriter::start(
            pg.clone(),
            settings.webhook.writers,
            settings.webhook.gather,
            relay_wake,
            relay::RawLog::start(raw_events),
        );
        Self(Arc::new(Inner {
            webhook,
            pg,
            mongo,
            jwt: Jwt::new(&settings.auth),
            auth_users: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(settings.auth.user_cache_ttl)
                .build(),
            max_body_bytes: settings.max_body_bytes,
            intake: Intake::new(directory.clone(), Topics::new(""), Limits::default()),
            directory,
            ready_broker: settings.ready_broker.clone(),
            store,
            daily,
            client_tz: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(std::time::Duration::from_secs(60))
                .build(),
            webhook_secret: settings
                .webhook
                .secret
                .as_ref()
                .map(|s| secrecy::ExposeSecret::expose_secret(s).to_owned()),
        }))
    }

    /// Checks an access token and returns who it speaks for. The role and tenant come
    /// from the user as stored now (through a short cache), so a demoted or deleted user
    /// loses access without waiting for the token to expire.
    pub async fn authenticate(&self, token: &str) -> ApiResult<Principal> {
        let claims = self.jwt.verify(token, TokenType::Access)?;
        let user = self
            .auth_users
            .try_get_with(claims.sub, self.load_auth_user(claims.sub))
            .await
            .map_err(|e| (*e).clone())?
            .ok_or_else(|| ApiError::unauthorized("user no longer exists"))?;
        if user.token_version != claims.ver {
            return Err(ApiError::unauthorized("token revoked"));
        }
        Ok(Principal {
            user_id: claims.sub,
            role: user.role,
            client_id: user.client_id,
        })
    }

    async fn load_auth_user(&self, id: Uuid) -> ApiResult<Option<AuthUser>> {
        let row: Option<(String, Option<Uuid>, i32)> =
            sqlx::query_as("SELECT role, client_id, token_version FROM users WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pg)
                .await?;
        Ok(row.map(|(role, client_id, token_version)| AuthUser {
            role: Role::from_db(&role).expect("role is constrained in the schema"),
            client_id,
            token_version,
        }))
    }

    /// Forgets the cached view of a user after it changed.
    pub async fn forget_user(&self, id: Uuid) {
        self.auth_users.invalidate(&id).await;
    }
}
