//! Settings of the web console, read once from the environment.

use std::time::Duration;

use anyhow::bail;
use termopar_core::settings::{env_parse, env_var};

/// Whether the session cookie carries `Secure`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecureCookie {
    /// When the request came over TLS: an `https` URI, or `X-Forwarded-Proto: https`
    /// from the proxy in front (`auto`, the default).
    Auto,
    /// Always (`always`): the console is only ever reached over TLS.
    Always,
    /// Never (`never`): plain HTTP on a trusted network.
    Never,
}

/// The web console.
#[derive(Debug, Clone)]
pub struct ConsoleSettings {
    /// A session ends after this long without a request of the person using it
    /// (`CONSOLE_IDLE_MINUTES`, default 30). The live pages' polling does not count.
    pub idle: Duration,
    /// A session ends this long after its login, active or not
    /// (`CONSOLE_SESSION_HOURS`, default 12).
    pub max_age: Duration,
    /// `CONSOLE_SECURE_COOKIE`: `auto` (default), `always` or `never`.
    pub secure_cookie: SecureCookie,
    /// The MQTT URL devices connect to, for the ready `mosquitto_pub` line shown with a
    /// new sensor's secret (`MQTT_PUBLIC_URL`; default: the host the console was opened
    /// at, port 1883).
    pub mqtt_public_url: Option<url::Url>,
    /// The MQTT port shown when `MQTT_PUBLIC_URL` is unset (edge mode: the embedded
    /// broker's; otherwise 1883).
    pub mqtt_port: u16,
    /// The readings topics' prefix (`MQTT_TOPIC_PREFIX`, as the consumer's).
    pub topics: termopar_core::topic::Topics,
    /// A sensor whose latest reading is older than this is marked stale
    /// (`CONSOLE_STALE_SECS`, default 600).
    pub stale_after: Duration,
    /// How often the live pages ask for the latest readings (`CONSOLE_POLL_MS`,
    /// default 2000).
    pub poll_every: Duration,
}

impl Default for ConsoleSettings {
    fn default() -> Self {
        Self {
            idle: Duration::from_secs(30 * 60),
            max_age: Duration::from_secs(12 * 3600),
            secure_cookie: SecureCookie::Auto,
            mqtt_public_url: None,
            mqtt_port: 1883,
            topics: termopar_core::topic::Topics::default(),
            stale_after: Duration::from_secs(600),
            poll_every: Duration::from_millis(2000),
        }
    }
}

impl ConsoleSettings {
    /// Reads the settings; refuses values that cannot work.
    pub fn from_env() -> anyhow::Result<Self> {
        let d = Self::default();
        let secure_cookie = match env_var("CONSOLE_SECURE_COOKIE").as_deref() {
            None | Some("auto") => SecureCookie::Auto,
            Some("always") => SecureCookie::Always,
            Some("never") => SecureCookie::Never,
            Some(other) => {
                bail!("CONSOLE_SECURE_COOKIE must be `auto`, `always` or `never`, not {other:?}")
            }
        };
        let mqtt_public_url = match env_var("MQTT_PUBLIC_URL") {
            None => None,
            Some(raw) => {
                let url = url::Url::parse(&raw)
                    .map_err(|e| anyhow::anyhow!("MQTT_PUBLIC_URL {raw:?}: {e}"))?;
                if !matches!(url.scheme(), "mqtt" | "mqtts") || url.host_str().is_none() {
                    bail!("MQTT_PUBLIC_URL must look like mqtt://host:1883 or mqtts://host:8883");
                }
                Some(url)
            }
        };
        let settings = Self {
            idle: Duration::from_secs(60 * env_parse("CONSOLE_IDLE_MINUTES", 30u64)?),
            max_age: Duration::from_secs(3600 * env_parse("CONSOLE_SESSION_HOURS", 12u64)?),
            secure_cookie,
            mqtt_public_url,
            mqtt_port: d.mqtt_port,
            topics: termopar_core::topic::Topics::new(&termopar_core::settings::env_or(
                "MQTT_TOPIC_PREFIX",
                "",
            )),
            stale_after: Duration::from_secs(env_parse(
                "CONSOLE_STALE_SECS",
                d.stale_after.as_secs(),
            )?),
            poll_every: Duration::from_millis(env_parse(
                "CONSOLE_POLL_MS",
                d.poll_every.as_millis() as u64,
            )?),
        };
        if settings.idle.is_zero() || settings.max_age.is_zero() {
            bail!("CONSOLE_IDLE_MINUTES and CONSOLE_SESSION_HOURS must be at least 1");
        }
        if settings.poll_every < Duration::from_millis(250) {
            bail!("CONSOLE_POLL_MS must be at least 250");
        }
        Ok(settings)
    }
}
