//! Settings of the API process, read once from the environment and validated.

use std::{net::SocketAddr, time::Duration};

use anyhow::{bail, Context};
use secrecy::{ExposeSecret, SecretString};
pub use termopar_chat::ChatSettings;
pub use termopar_console::ConsoleSettings;
use termopar_core::settings::{
    env_or, env_pair, env_parse, env_var, DatabaseSettings, MongoSettings, MqttEndpoint,
};
pub use termopar_leads::LeadsSettings;
pub use termopar_tracking::TrackingSettings;
pub use termopar_web::settings::AuthSettings;

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
    pub webhook: ChatSettings,
    /// Web tracking.
    pub tracking: TrackingSettings,
    /// The lead pipeline and its job workers.
    pub leads: LeadsSettings,
    /// The web console.
    pub console: ConsoleSettings,
    /// The reading store (`CONSUMER_RECOVER_AFTER_SECS`, `RAW_CACHE_READINGS`).
    pub store: termopar_core::store::Tuning,
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
            auth: AuthSettings::from_env()?,
            bootstrap_admin,
            max_body_bytes: env_parse("API_MAX_BODY_BYTES", 1024 * 1024)?,
            latest_cache_ttl: Duration::from_millis(env_parse("LATEST_CACHE_TTL_MS", 1000)?),
            webhook: ChatSettings::from_env()?,
            tracking: TrackingSettings::from_env()?,
            leads: LeadsSettings::from_env()?,
            console: ConsoleSettings::from_env()?,
            store: termopar_core::settings::StoreTuning::from_env()?,
            ready_broker: env_var("MQTT_URL")
                .map(|url| MqttEndpoint::parse(&url))
                .transpose()?,
        };
        settings.validate()?;
        Ok(settings)
    }

    /// Checks the values that can be wrong even when they parse.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.auth.validate()?;
        self.webhook.validate()?;
        self.tracking.validate()?;
        self.leads.validate()?;
        if self.max_body_bytes < 1024 {
            bail!("API_MAX_BODY_BYTES must be at least 1024");
        }
        if let Some(admin) = &self.bootstrap_admin {
            crate::validate::email(&admin.email)
                .map_err(|e| anyhow::anyhow!("ADMIN_EMAIL: {}", e.message()))?;
            crate::validate::password(admin.password.expose_secret())
                .map_err(|e| anyhow::anyhow!("ADMIN_PASSWORD: {}", e.message()))?;
        }
        Ok(())
    }
}
