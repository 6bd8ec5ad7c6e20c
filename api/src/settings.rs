//! Settings of the API process, read once from the environment and validated.

use std::{net::SocketAddr, time::Duration};

use anyhow::{bail, Context};
use secrecy::{ExposeSecret, SecretString};
use termopar_core::settings::{
    env_or, env_pair, env_parse, env_secs, env_var, DatabaseSettings, MongoSettings, MqttEndpoint,
};

/// The JWT secret used when `JWT_SECRET` is unset. Only for development: the API logs a
/// loud warning at start when it is in use.
pub const DEV_JWT_SECRET: &str = "termopar-development-secret-do-not-use-in-production";

/// Everything the API needs to start.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where the HTTP server listens (`API_ADDR`, default `127.0.0.1:8080`; port 0 picks
    /// a free port, and the bound address is reported by `Application::addr`).
    pub addr: SocketAddr,
    /// PostgreSQL.
    pub database: DatabaseSettings,
    /// The MongoDB-compatible store.
    pub mongo: MongoSettings,
    /// Token signing and lifetimes.
    pub auth: AuthSettings,
    /// An admin created at start when no admin exists (`ADMIN_EMAIL`/`ADMIN_PASSWORD`).
    pub bootstrap_admin: Option<BootstrapAdmin>,
    /// Largest request body accepted, in bytes (`API_MAX_BODY_BYTES`, default 1 MiB).
    pub max_body_bytes: usize,
    /// An MQTT broker `/ready` checks for reachability: the embedded one in edge mode,
    /// `MQTT_URL` when set for a standalone API.
    pub ready_broker: Option<MqttEndpoint>,
    /// How long a cached latest reading may be served (`LATEST_CACHE_TTL_MS`, default
    /// 1000). Edge mode raises it: its consumer updates the cache as it stores.
    pub latest_cache_ttl: Duration,
    /// The chat webhook.
    pub webhook: WebhookSettings,
    /// The reading store (`CONSUMER_RECOVER_AFTER_SECS`, `RAW_CACHE_READINGS`).
    pub store: termopar_core::store::Tuning,
}

/// The chat webhook processor.
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    /// HMAC-SHA256 key senders sign bodies with (`WEBHOOK_SECRET`); when unset,
    /// signatures are not checked.
    pub secret: Option<SecretString>,
    /// Concurrent webhook transactions (`WEBHOOK_WRITERS`, default 1, at most 16). One
    /// writer makes the largest groups; more overlap one group's commit with the next.
    pub writers: usize,
    /// Longest a writer waits for its next group to grow half as large as its last one
    /// (`WEBHOOK_GATHER_US`, default 1000 µs, at most 100 ms; 0 takes what is queued).
    pub gather: Duration,
}

impl WebhookSettings {
    /// Reads `WEBHOOK_SECRET`, `WEBHOOK_WRITERS` and `WEBHOOK_GATHER_US`.
    pub fn from_env() -> anyhow::Result<Self> {
        Ok(Self {
            secret: env_var("WEBHOOK_SECRET").map(SecretString::from),
            writers: env_parse("WEBHOOK_WRITERS", 1)?,
            gather: Duration::from_micros(env_parse("WEBHOOK_GATHER_US", 1000)?),
        })
    }
}

impl Default for WebhookSettings {
    fn default() -> Self {
        Self {
            secret: None,
            writers: 1,
            gather: Duration::from_millis(1),
        }
    }
}

/// How tokens are signed and how long they live.
#[derive(Debug, Clone)]
pub struct AuthSettings {
    /// HMAC-SHA256 key for access and refresh tokens (`JWT_SECRET`, at least 32 bytes).
    pub jwt_secret: SecretString,
    /// Lifetime of an access token (`ACCESS_TOKEN_TTL_SECS`, default 900).
    pub access_ttl: Duration,
    /// Lifetime of a refresh token (`REFRESH_TOKEN_TTL_SECS`, default 30 days).
    pub refresh_ttl: Duration,
    /// How long a user's role and token version are cached before PostgreSQL is asked
    /// again (`AUTH_CACHE_TTL_SECS`, default 30). Changes made through this process are
    /// seen at once; this bounds how stale another replica's view can be.
    pub user_cache_ttl: Duration,
}

/// The admin account ensured at start.
#[derive(Debug, Clone)]
pub struct BootstrapAdmin {
    /// Its e-mail (`ADMIN_EMAIL`).
    pub email: String,
    /// Its password (`ADMIN_PASSWORD`).
    pub password: SecretString,
}

impl Settings {
    /// Reads every setting from the environment and validates it.
    pub fn from_env() -> anyhow::Result<Self> {
        let bootstrap_admin =
            env_pair("ADMIN_EMAIL", "ADMIN_PASSWORD")?.map(|(email, password)| BootstrapAdmin {
                email,
                password: SecretString::from(password),
            });
        let settings = Self {
            addr: env_or("API_ADDR", "127.0.0.1:8080")
                .parse()
                .context("invalid API_ADDR")?,
            database: DatabaseSettings::from_env()?,
            mongo: MongoSettings::from_env(),
            auth: AuthSettings {
                jwt_secret: SecretString::from(env_or("JWT_SECRET", DEV_JWT_SECRET)),
                access_ttl: env_secs("ACCESS_TOKEN_TTL_SECS", Duration::from_secs(900))?,
                refresh_ttl: env_secs(
                    "REFRESH_TOKEN_TTL_SECS",
                    Duration::from_secs(30 * 24 * 3600),
                )?,
                user_cache_ttl: env_secs("AUTH_CACHE_TTL_SECS", Duration::from_secs(30))?,
            },
            bootstrap_admin,
            max_body_bytes: env_parse("API_MAX_BODY_BYTES", 1024 * 1024)?,
            latest_cache_ttl: Duration::from_millis(env_parse("LATEST_CACHE_TTL_MS", 1000)?),
            webhook: WebhookSettings::from_env()?,
            store: termopar_core::settings::store_tuning()?,
            ready_broker: env_var("MQTT_URL")
                .map(|url| MqttEndpoint::parse(&url))
                .transpose()?,
        };
        settings.validate()?;
        Ok(settings)
    }

    /// Checks the values that can be wrong even when they parse.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.auth.jwt_secret.expose_secret().len() < 32 {
            bail!("JWT_SECRET must be at least 32 bytes long");
        }
        if self.auth.access_ttl.is_zero() || self.auth.refresh_ttl.is_zero() {
            bail!("token lifetimes must be positive");
        }
        if self.auth.refresh_ttl < self.auth.access_ttl {
            bail!("REFRESH_TOKEN_TTL_SECS must not be shorter than ACCESS_TOKEN_TTL_SECS");
        }
        if !(1..=16).contains(&self.webhook.writers) {
            bail!("WEBHOOK_WRITERS must be between 1 and 16");
        }
        if self.webhook.gather > Duration::from_millis(100) {
            bail!("WEBHOOK_GATHER_US must be at most 100000");
        }
        if self.max_body_bytes < 1024 {
            bail!("API_MAX_BODY_BYTES must be at least 1024");
        }
        if let Some(admin) = &self.bootstrap_admin {
            crate::users::validate_email(&admin.email)
                .map_err(|e| anyhow::anyhow!("ADMIN_EMAIL: {}", e.message()))?;
            crate::users::validate_password(admin.password.expose_secret())
                .map_err(|e| anyhow::anyhow!("ADMIN_PASSWORD: {}", e.message()))?;
        }
        Ok(())
    }

    /// True when the development JWT secret is in use.
    pub fn uses_dev_jwt_secret(&self) -> bool {
        self.auth.jwt_secret.expose_secret() == DEV_JWT_SECRET
    }
}
