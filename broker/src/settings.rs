//! The embedded broker's settings: the only place the broker reads the environment.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{bail, Context};
use secrecy::SecretString;
use termopar_core::settings::{env_or, env_pair, env_parse, env_secs, env_var};

/// Settings of the embedded broker.
#[derive(Debug, Clone)]
pub struct BrokerSettings {
    /// The MQTT port, for 3.1.1 and 5 alike (`MQTT_ADDR`, default `127.0.0.1:1883`; port
    /// 0 picks one).
    pub addr: SocketAddr,
    /// A second plain port serving the same (`MQTT_V5_ADDR`, default off): kept as an
    /// alias for deployments of the time when MQTT 5 had a port of its own.
    pub alias_addr: Option<SocketAddr>,
    /// MQTT over TLS (`MQTT_TLS_ADDR`, default `127.0.0.1:8883`), on when
    /// `MQTT_TLS_CERT` and `MQTT_TLS_KEY` name PEM files (the chain, and its key).
    pub tls: Option<TlsSettings>,
    /// Require credentials at CONNECT (`MQTT_AUTH=devices`; default `off`): username =
    /// sensor id and password = its device secret, or the service credentials below.
    /// Devices may then publish only to their own readings topic and subscribe only
    /// inside their own subtree.
    pub require_auth: bool,
    /// Credentials of termopar's own clients, the consumer and the simulator
    /// (`MQTT_USERNAME` / `MQTT_PASSWORD`): full access.
    pub service: Option<(String, SecretString)>,
    /// Topic prefix of the readings topics (`MQTT_TOPIC_PREFIX`, as the consumer's).
    pub topic_prefix: String,
    /// How often live device connections are checked against the directory even without
    /// a change notice (`MQTT_AUTH_RECHECK_SECS`, default 60, the directory's lifetime).
    pub recheck_every: Duration,
    /// How often the front pings rumqttd for a client that connected with keepalive 0
    /// ("no keepalive", which rumqttd refuses): rumqttd is told twice this (default 30 s).
    pub no_keepalive_ping: Duration,
    /// Largest PUBLISH payload accepted (`MQTT_MAX_PAYLOAD_BYTES`, default 2 MiB). Larger
    /// than the consumer's own limit on purpose: an oversized reading then reaches the
    /// consumer and is dead-lettered with a reason instead of dropping the connection.
    pub max_payload_bytes: usize,
    /// Most connections (`MQTT_MAX_CONNECTIONS`, default 10000).
    pub max_connections: usize,
    /// `/metrics` of the standalone broker (`BROKER_METRICS_ADDR`, default
    /// `127.0.0.1:9102`); edge mode serves its metrics on the API's port instead.
    pub metrics_addr: SocketAddr,
    /// Memory for each subscription filter's messages, counted as rumqttd counts them
    /// (topic + payload + 4 bytes each; `MQTT_BUFFER_BYTES`). rumqttd keeps a filter's
    /// messages until this is full, read or not, and then drops the oldest eighth: a
    /// subscriber further behind loses messages. Unset: 32 MiB in edge mode, whose front
    /// holds devices back before the consumer falls that far behind, and
    /// [`DEFAULT_BUFFER_BYTES`] for the standalone broker, whose subscribers are not known.
    pub buffer_bytes: Option<usize>,
    /// Edge mode's in-process consumer's filter (not read from the environment): the
    /// PUBACK of a client's QoS 1 publish on it waits until the consumer reports that
    /// message finished (see [`crate::RunningBroker::finished`]), and every client
    /// connection is framed packet by packet. The front then takes no client until
    /// [`crate::RunningBroker::admit`]: the consumer must have subscribed first.
    pub ack_when_finished: Option<String>,
}

/// The standalone broker's buffer per subscription filter unless `MQTT_BUFFER_BYTES` says
/// otherwise (rumqttd's 10 segments of 100 MiB before it was a setting).
pub const DEFAULT_BUFFER_BYTES: usize = 1000 * 1024 * 1024;

/// The TLS listener.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// Where it listens.
    pub addr: SocketAddr,
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// Where the MQTT port listens unless `MQTT_ADDR` says otherwise.
pub const DEFAULT_MQTT_ADDR: &str = "127.0.0.1:1883";

impl BrokerSettings {
    /// Reads the settings from the environment, over the defaults of [`Self::ephemeral`]
    /// (but on [`DEFAULT_MQTT_ADDR`]).
    pub fn from_env() -> anyhow::Result<Self> {
        let auth = env_or("MQTT_AUTH", "off");
        let require_auth = match auth.as_str() {
            "off" => false,
            "devices" => true,
            other => bail!("MQTT_AUTH must be `off` or `devices`, not {other:?}"),
        };
        let alias = env_or("MQTT_V5_ADDR", "off");
        let tls = match env_pair("MQTT_TLS_CERT", "MQTT_TLS_KEY")? {
            Some((cert, key)) => Some(TlsSettings {
                addr: env_or("MQTT_TLS_ADDR", "127.0.0.1:8883")
                    .parse()
                    .context("invalid MQTT_TLS_ADDR")?,
                cert: cert.into(),
                key: key.into(),
            }),
            None if env_var("MQTT_TLS_ADDR").is_some() => {
                bail!("MQTT_TLS_ADDR needs MQTT_TLS_CERT and MQTT_TLS_KEY")
            }
            None => None,
        };
        let d = Self::ephemeral();
        Ok(Self {
            addr: env_or("MQTT_ADDR", DEFAULT_MQTT_ADDR)
                .parse()
                .context("invalid MQTT_ADDR")?,
            alias_addr: if alias == "off" {
                None
            } else {
                Some(alias.parse().context("invalid MQTT_V5_ADDR")?)
            },
            tls,
            require_auth,
            service: env_pair("MQTT_USERNAME", "MQTT_PASSWORD")?
                .map(|(u, p)| (u, SecretString::from(p))),
            topic_prefix: env_or("MQTT_TOPIC_PREFIX", &d.topic_prefix),
            recheck_every: env_secs("MQTT_AUTH_RECHECK_SECS", d.recheck_every)?,
            no_keepalive_ping: d.no_keepalive_ping,
            max_payload_bytes: env_parse("MQTT_MAX_PAYLOAD_BYTES", d.max_payload_bytes)?,
            max_connections: env_parse("MQTT_MAX_CONNECTIONS", d.max_connections)?,
            metrics_addr: env_or("BROKER_METRICS_ADDR", "127.0.0.1:9102")
                .parse()
                .context("invalid BROKER_METRICS_ADDR")?,
            buffer_bytes: env_var("MQTT_BUFFER_BYTES")
                .map(|b| b.parse().context("invalid MQTT_BUFFER_BYTES"))
                .transpose()?,
            ack_when_finished: None,
        })
    }

    /// One port on a free loopback port, no TLS, no authentication: for tests and
    /// benchmarks.
    pub fn ephemeral() -> Self {
        Self {
            addr: "127.0.0.1:0".parse().unwrap(),
            alias_addr: None,
            tls: None,
            require_auth: false,
            service: None,
            topic_prefix: String::new(),
            recheck_every: Duration::from_secs(60),
            no_keepalive_ping: Duration::from_secs(30),
            max_payload_bytes: 2 * 1024 * 1024,
            max_connections: 10_000,
            metrics_addr: "127.0.0.1:0".parse().unwrap(),
            buffer_bytes: None,
            ack_when_finished: None,
        }
    }
}
