//! termopar's embedded MQTT broker: rumqttd started in-process, listening for MQTT 3.1.1
//! and MQTT 5, optionally checking device credentials against PostgreSQL.
//!
//! rumqttd 0.20 binds its listeners inside a blocking `start()` that never returns and
//! never reports the bound address, and it has no stop. [`start`] wraps that: it resolves
//! port 0 to a free port first, runs the broker on a named thread, and returns once the
//! listeners accept connections. The broker lives as long as the process.

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;
use termopar_core::{
    directory::SensorDirectory,
    ids::SensorId,
    settings::{env_or, env_parse, env_var},
};

/// Settings of the embedded broker.
#[derive(Debug, Clone)]
pub struct BrokerSettings {
    /// MQTT 3.1.1 listener (`MQTT_ADDR`, default `127.0.0.1:1883`; port 0 picks one).
    pub v4_addr: SocketAddr,
    /// MQTT 5 listener (`MQTT_V5_ADDR`, default `127.0.0.1:1885`; `off` disables it).
    /// rumqttd serves one protocol version per listener.
    pub v5_addr: Option<SocketAddr>,
    /// Require credentials at CONNECT (`MQTT_AUTH=devices`; default `off`): username =
    /// sensor id and password = its device secret, or the service credentials below.
    pub require_auth: bool,
    /// Credentials of termopar's own clients, the consumer and the simulator
    /// (`MQTT_USERNAME` / `MQTT_PASSWORD`).
    pub service: Option<(String, SecretString)>,
    /// Largest PUBLISH payload accepted (`MQTT_MAX_PAYLOAD_BYTES`, default 2 MiB). Larger
    /// than the consumer's own limit on purpose: an oversized reading then reaches the
    /// consumer and is dead-lettered with a reason instead of dropping the connection.
    pub max_payload_bytes: usize,
    /// Most connections (`MQTT_MAX_CONNECTIONS`, default 10000).
    pub max_connections: usize,
}

impl BrokerSettings {
    /// Reads the settings from the environment.
    pub fn from_env() -> anyhow::Result<Self> {
        let v5 = env_or("MQTT_V5_ADDR", "127.0.0.1:1885");
        let auth = env_or("MQTT_AUTH", "off");
        let require_auth = match auth.as_str() {
            "off" => false,
            "devices" => true,
            other => bail!("MQTT_AUTH must be `off` or `devices`, not {other:?}"),
        };
        let service = match (env_var("MQTT_USERNAME"), env_var("MQTT_PASSWORD")) {
            (Some(u), Some(p)) => Some((u, SecretString::from(p))),
            (None, None) => None,
            _ => bail!("MQTT_USERNAME and MQTT_PASSWORD must be set together"),
        };
        let settings = Self {
            v4_addr: env_or("MQTT_ADDR", "127.0.0.1:1883")
                .parse()
                .context("invalid MQTT_ADDR")?,
            v5_addr: if v5 == "off" {
                None
            } else {
                Some(v5.parse().context("invalid MQTT_V5_ADDR")?)
            },
            require_auth,
            service,
            max_payload_bytes: env_parse("MQTT_MAX_PAYLOAD_BYTES", 2 * 1024 * 1024)?,
            max_connections: env_parse("MQTT_MAX_CONNECTIONS", 10_000)?,
        };
        Ok(settings)
    }

    /// Listeners on free loopback ports, no authentication: for tests and benchmarks.
    pub fn ephemeral() -> Self {
        Self {
            v4_addr: "127.0.0.1:0".parse().unwrap(),
            v5_addr: Some("127.0.0.1:0".parse().unwrap()),
            require_auth: false,
            service: None,
            max_payload_bytes: 2 * 1024 * 1024,
            max_connections: 10_000,
        }
    }
}

/// A broker that accepts connections.
#[derive(Debug, Clone, Copy)]
pub struct RunningBroker {
    /// The MQTT 3.1.1 listener.
    pub v4_addr: SocketAddr,
    /// The MQTT 5 listener.
    pub v5_addr: Option<SocketAddr>,
}

impl RunningBroker {
    /// `mqtt://host:port` of the 3.1.1 listener, for clients.
    pub fn url(&self) -> String {
        format!("mqtt://{}", self.v4_addr)
    }
}

/// Port 0 becomes a free port now: rumqttd would bind it without telling which.
pub fn resolve(addr: SocketAddr) -> anyhow::Result<SocketAddr> {
    if addr.port() != 0 {
        return Ok(addr);
    }
    let listener = TcpListener::bind(addr).with_context(|| format!("failed to bind {addr}"))?;
    Ok(listener.local_addr()?)
}

fn listener_json(name: &str, addr: SocketAddr, max_payload: usize) -> serde_json::Value {
    serde_json::json!({
        name: {
            "name": name,
            "listen": addr.to_string(),
            "next_connection_delay_ms": 1,
            "connections": {
                "connection_timeout_ms": 60000,
                "max_payload_size": max_payload,
                "max_inflight_count": 1000,
                "dynamic_filters": true
            }
        }
    })
}

/// Checks CONNECT credentials.
struct Authenticator {
    directory: SensorDirectory,
    service: Option<(String, SecretString)>,
    runtime: tokio::runtime::Handle,
}

impl Authenticator {
    async fn check(&self, username: String, password: String) -> bool {
        if let Some((user, pass)) = &self.service {
            if username == *user {
                return password
                    .as_bytes()
                    .ct_eq(pass.expose_secret().as_bytes())
                    .into();
            }
        }
        let Ok(sensor) = username.parse::<SensorId>() else {
            return false;
        };
        // The check runs on the caller's runtime, where the pool lives, not on rumqttd's
        // per-listener runtimes.
        let directory = self.directory.clone();
        let lookup = self
            .runtime
            .spawn(async move { directory.get(sensor).await });
        match lookup.await {
            Ok(Ok(Some(entry))) => termopar_core::secrets::verify(&password, &entry.secret_hash),
            Ok(Ok(None)) => false,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "device authentication could not reach PostgreSQL");
                false
            }
            Err(_) => false,
        }
    }
}

/// Starts the broker and returns once every listener accepts connections. With
/// `require_auth`, `directory` checks device credentials.
pub async fn start(
    settings: &BrokerSettings,
    directory: Option<SensorDirectory>,
) -> anyhow::Result<RunningBroker> {
    let v4 = resolve(settings.v4_addr)?;
    let v5 = settings.v5_addr.map(resolve).transpose()?;
    let mut config = serde_json::json!({
        "id": 0,
        "router": {
            "id": 0,
            "max_connections": settings.max_connections,
            "max_outgoing_packet_count": 200,
            "max_segment_size": 104_857_600,
            "max_segment_count": 10
        },
        "v4": listener_json("v4", v4, settings.max_payload_bytes),
        // Meters feed the broker metrics (see `export_meters`). rumqttd's timer unwraps
        // both intervals whichever is configured, so alerts need one too.
        "metrics": { "meters": { "push_interval": 1 }, "alerts": { "push_interval": 60 } }
    });
    if let Some(v5) = v5 {
        config["v5"] = listener_json("v5", v5, settings.max_payload_bytes);
    }
    // Built through serde: some of rumqttd's config fields are private.
    let mut config: rumqttd::Config =
        serde_json::from_value(config).context("invalid rumqttd configuration")?;

    if settings.require_auth {
        let directory = directory.context("device authentication needs the sensor directory")?;
        let auth = Arc::new(Authenticator {
            directory,
            service: settings.service.clone(),
            runtime: tokio::runtime::Handle::current(),
        });
        let listeners = config
            .v4
            .iter_mut()
            .chain(config.v5.iter_mut())
            .flat_map(|m| m.values_mut());
        for listener in listeners {
            let auth = auth.clone();
            listener.set_auth_handler(move |_client_id, username, password| {
                let auth = auth.clone();
                async move {
                    let ok = auth.check(username, password).await;
                    let result = if ok { "accepted" } else { "refused" };
                    metrics::counter!("mqtt_broker_connects_total", "result" => result)
                        .increment(1);
                    ok
                }
            });
        }
    }

    let mut broker = rumqttd::Broker::new(config);
    let meters = broker
        .meters()
        .context("failed to open the broker's meters link")?;
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded MQTT broker stopped");
            }
        })
        .context("failed to start the broker thread")?;
    export_meters(meters);

    let deadline = Instant::now() + Duration::from_secs(10);
    for addr in std::iter::once(v4).chain(v5) {
        loop {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                bail!("the embedded broker did not listen on {addr} within 10 s");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    tracing::info!(%v4, v5 = ?v5, auth = settings.require_auth, "embedded MQTT broker listening");
    Ok(RunningBroker {
        v4_addr: v4,
        v5_addr: v5,
    })
}

/// Turns rumqttd's meters (pushed every second while there is traffic) into Prometheus
/// metrics: connections, messages in, failed publishes, and messages per subscription
/// filter (what is forwarded to subscribers).
fn export_meters(meters: rumqttd::meters::MetersLink) {
    std::thread::Builder::new()
        .name("mqtt-meters".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the meters thread");
            rt.block_on(async move {
                while let Ok(batch) = meters.next().await {
                    for meter in batch {
                        match meter {
                            rumqttd::Meter::Router(_, r) => {
                                metrics::gauge!("mqtt_broker_connections")
                                    .set(r.total_connections as f64);
                                metrics::gauge!("mqtt_broker_subscriptions")
                                    .set(r.total_subscriptions as f64);
                                metrics::counter!("mqtt_broker_messages_in_total")
                                    .increment(r.total_publishes as u64);
                                metrics::counter!("mqtt_broker_failed_publishes_total")
                                    .increment(r.failed_publishes as u64);
                            }
                            rumqttd::Meter::Subscription(filter, s) => {
                                metrics::counter!("mqtt_broker_filter_messages_total", "filter" => filter)
                                    .increment(s.count as u64);
                            }
                        }
                    }
                }
            });
        })
        .expect("failed to start the meters thread");
}
