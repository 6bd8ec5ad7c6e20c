//! Reading settings from the environment.
//!
//! Only settings modules read the environment; they go through these helpers so a
//! malformed value always names the variable it came from.

use std::{str::FromStr, time::Duration};

use anyhow::Context;
use secrecy::SecretString;

/// Default PostgreSQL URL (the public contract in SPEC.md).
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/termopar";
/// Default broker URL of the consumer and the simulator (`MQTT_URL`).
pub const DEFAULT_MQTT_URL: &str = "mqtt://127.0.0.1:1883";
/// Default MongoDB URI.
pub const DEFAULT_MONGODB_URI: &str = "mongodb://127.0.0.1:27017";
/// Default MongoDB database name.
pub const DEFAULT_MONGODB_DB: &str = "termopar";

/// The value of `name`, or `None` when it is unset or empty.
pub fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// Two variables that only make sense together: both, or neither.
pub fn env_pair(a: &str, b: &str) -> anyhow::Result<Option<(String, String)>> {
    match (env_var(a), env_var(b)) {
        (Some(x), Some(y)) => Ok(Some((x, y))),
        (None, None) => Ok(None),
        _ => anyhow::bail!("{a} and {b} must be set together"),
    }
}

/// Whether logs are JSON lines (`LOG_FORMAT=json`) rather than text.
pub fn log_format_json() -> bool {
    env_var("LOG_FORMAT").is_some_and(|f| f == "json")
}

/// The value of `name`, or `default` when it is unset or empty.
pub fn env_or(name: &str, default: &str) -> String {
    env_var(name).unwrap_or_else(|| default.to_owned())
}

/// Parses `name` as `T`, or returns `default` when it is unset or empty.
pub fn env_parse<T>(name: &str, default: T) -> anyhow::Result<T>
where
    T: FromStr,
    T::Err: std::error::Error + Send + Sync + 'static,
{
    match env_var(name) {
        None => Ok(default),
        Some(raw) => raw
            .trim()
            .parse()
            .with_context(|| format!("invalid value {raw:?} for {name}")),
    }
}

/// Parses `name` as a whole number of seconds.
pub fn env_secs(name: &str, default: Duration) -> anyhow::Result<Duration> {
    env_parse(name, default.as_secs()).map(Duration::from_secs)
}

/// Where PostgreSQL is and how many connections to keep.
#[derive(Debug, Clone)]
pub struct DatabaseSettings {
    /// Connection URL (`DATABASE_URL`). The database is created if missing.
    pub url: SecretString,
    /// Upper bound of the pool (`DATABASE_MAX_CONNECTIONS`, default 16).
    pub max_connections: u32,
    /// How long a caller waits for a connection before storage counts as unavailable
    /// (`DATABASE_ACQUIRE_TIMEOUT_SECS`, default 3).
    pub acquire_timeout: Duration,
}

impl DatabaseSettings {
    /// Reads `DATABASE_URL`, `DATABASE_MAX_CONNECTIONS`, `DATABASE_ACQUIRE_TIMEOUT_SECS`.
    pub fn from_env() -> anyhow::Result<Self> {
        Ok(Self {
            url: SecretString::from(env_or("DATABASE_URL", DEFAULT_DATABASE_URL)),
            max_connections: env_parse("DATABASE_MAX_CONNECTIONS", 16)?,
            acquire_timeout: env_secs("DATABASE_ACQUIRE_TIMEOUT_SECS", Duration::from_secs(3))?,
        })
    }

    /// Settings for `url` with the defaults for everything else.
    pub fn with_url(url: impl Into<String>) -> Self {
        Self {
            url: SecretString::from(url.into()),
            max_connections: 16,
            acquire_timeout: Duration::from_secs(3),
        }
    }
}

/// Where the MongoDB-compatible server is.
#[derive(Debug, Clone)]
pub struct MongoSettings {
    /// Connection URI (`MONGODB_URI`).
    pub uri: String,
    /// Database name (`MONGODB_DB`).
    pub database: String,
}

impl MongoSettings {
    /// Reads `MONGODB_URI` and `MONGODB_DB`.
    pub fn from_env() -> Self {
        Self {
            uri: env_or("MONGODB_URI", DEFAULT_MONGODB_URI),
            database: env_or("MONGODB_DB", DEFAULT_MONGODB_DB),
        }
    }
}

/// An MQTT broker to connect to, and the credentials to present.
#[derive(Debug, Clone)]
pub struct MqttEndpoint {
    /// Host name or address.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Username and password, when the broker requires them.
    pub credentials: Option<(String, SecretString)>,
}

impl MqttEndpoint {
    /// `MQTT_URL` (default `mqtt://127.0.0.1:1883`) with `MQTT_USERNAME`/`MQTT_PASSWORD`.
    pub fn from_env() -> anyhow::Result<Self> {
        let mut endpoint = Self::parse(&env_or("MQTT_URL", DEFAULT_MQTT_URL))?;
        endpoint.credentials =
            env_pair("MQTT_USERNAME", "MQTT_PASSWORD")?.map(|(u, p)| (u, SecretString::from(p)));
        Ok(endpoint)
    }

    /// Parses `mqtt://host:port` (also `tcp://`, or a bare `host:port`; port 1883 when
    /// absent). Credentials do not belong in the URL.
    pub fn parse(url: &str) -> anyhow::Result<Self> {
        let rest = url
            .strip_prefix("mqtt://")
            .or_else(|| url.strip_prefix("tcp://"))
            .unwrap_or(url)
            .trim_end_matches('/');
        if rest.contains('@') {
            anyhow::bail!("put MQTT credentials in MQTT_USERNAME/MQTT_PASSWORD, not in the URL");
        }
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) => (
                h,
                p.parse()
                    .with_context(|| format!("invalid port in {url:?}"))?,
            ),
            None => (rest, 1883),
        };
        let host = host.trim_matches(['[', ']']);
        if host.is_empty() {
            anyhow::bail!("no host in {url:?}");
        }
        Ok(Self {
            host: host.to_owned(),
            port,
            credentials: None,
        })
    }

    /// Adds credentials.
    pub fn with_credentials(mut self, username: &str, password: &str) -> Self {
        self.credentials = Some((username.to_owned(), SecretString::from(password.to_owned())));
        self
    }
}

/// How the store sizes its work; the defaults suit production, tests shorten the waits.
#[derive(Debug, Clone)]
pub struct StoreTuning {
    /// How long written but unregistered segments wait before they are deleted
    /// (`CONSUMER_RECOVER_AFTER_SECS`): longer than any store call takes.
    pub intent_ttl: Duration,
    /// Readings of recently written or read segments kept in memory (merges and
    /// history read them from here instead of the document store).
    pub cache_readings: u64,
    /// How long after a bucket's end it counts as closed (late readings still come).
    pub close_after: Duration,
    /// The most readings a merge holds in memory at once: a pass reads, merges and
    /// writes its segments in rounds of about this many.
    pub merge_round: usize,
}

impl Default for StoreTuning {
    fn default() -> Self {
        Self {
            intent_ttl: Duration::from_secs(30),
            cache_readings: 64 * 1024,
            close_after: Duration::from_secs(120),
            merge_round: 32 * 1024,
        }
    }
}

impl StoreTuning {
    /// `CONSUMER_RECOVER_AFTER_SECS` (default 30) and `RAW_CACHE_READINGS` (default
    /// 65536) from the environment; the rest at its default.
    pub fn from_env() -> anyhow::Result<Self> {
        let default = Self::default();
        Ok(Self {
            intent_ttl: env_secs("CONSUMER_RECOVER_AFTER_SECS", default.intent_ttl)?,
            cache_readings: env_parse("RAW_CACHE_READINGS", default.cache_readings)?,
            ..default
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mqtt_urls_parse_into_host_and_port() {
        let parse = |u| MqttEndpoint::parse(u).map(|e| (e.host, e.port));
        assert_eq!(
            parse("mqtt://127.0.0.1:1884").unwrap(),
            ("127.0.0.1".into(), 1884)
        );
        assert_eq!(parse("tcp://broker").unwrap(), ("broker".into(), 1883));
        assert_eq!(parse("localhost:1").unwrap(), ("localhost".into(), 1));
        assert!(parse("mqtt://u:p@host:1").is_err());
        assert!(parse("mqtt://host:notaport").is_err());
        assert!(parse("mqtt://").is_err());
    }
}
