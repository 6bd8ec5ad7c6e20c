//! termopar's embedded MQTT broker: rumqttd started in-process, behind the front door
//! (`front`): one port for MQTT 3.1.1 and 5 (and one for TLS), device authentication and
//! per-device topic ACLs. The front hands rumqttd each client it accepts in process
//! (`rumqttd::Handoff`); rumqttd's own listener is on loopback, for the in-process
//! consumer and benchmarks.
//!
//! rumqttd 0.20 binds its listeners inside a blocking `start()` that never returns and
//! never reports the bound address, and it has no stop. [`start`] wraps that: it resolves
//! port 0 to a free port first, runs the broker on a named thread, and returns once the
//! listeners accept connections. The broker lives as long as the process.

mod acl;
mod front;
mod hold;
mod packet;
mod settings;
mod settle;

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;
use termopar_core::{directory::SensorDirectory, settings::MqttEndpoint, topic::Topics};

pub use front::{FrontCounts, FrontStats};
pub use settings::{BrokerSettings, TlsSettings, DEFAULT_BUFFER_BYTES, DEFAULT_MQTT_ADDR};

/// A broker that accepts connections.
#[derive(Debug, Clone)]
pub struct RunningBroker {
    /// The MQTT port (3.1.1 and 5).
    pub addr: SocketAddr,
    /// The alias port, when configured.
    pub alias_addr: Option<SocketAddr>,
    /// The TLS port, when configured.
    pub tls_addr: Option<SocketAddr>,
    direct: MqttEndpoint,
    stats: Arc<FrontStats>,
    closing: tokio::sync::watch::Sender<bool>,
    admitted: tokio::sync::watch::Sender<bool>,
    tasks: tokio_util::task::TaskTracker,
    gate: Arc<hold::Gate>,
    settle: Arc<settle::Settlement>,
    buffer_bytes: usize,
}

/// Where the in-process consumer reports the messages it finished, so that the front
/// acknowledges them to their devices (see [`RunningBroker::finished`]).
#[derive(Debug, Clone)]
pub struct Finished(Arc<settle::Settlement>);

impl Finished {
    /// The consumer is done with the message of `topic` and `payload` (stored, or
    /// dead-lettered): a device waiting for its PUBACK gets it.
    pub fn finished(&self, topic: &str, payload: &[u8]) {
        self.0.finished(topic, payload);
    }
}

impl RunningBroker {
    /// Holds devices back while the in-process consumer of `filter` is behind: the front
    /// stops reading from its clients while the bytes rumqttd's log of `filter` took exceed
    /// `finished` (the consumer's count of the bytes it stored or dead-lettered, as
    /// rumqttd counts them: topic + payload + 4) by half the broker's buffer, so the log
    /// never drops what the consumer has not read (see `hold`). Once per broker; false
    /// when it was already set.
    pub fn hold_back(&self, filter: String, finished: Arc<std::sync::atomic::AtomicU64>) -> bool {
        let set = self
            .gate
            .set(filter, finished, (self.buffer_bytes / 2) as u64);
        if set {
            tokio::spawn(self.gate.clone().announce());
        }
        set
    }

    /// Where the in-process consumer reports what it finished, when the broker was
    /// started with [`BrokerSettings::ack_when_finished`]: the PUBACK of a client's QoS 1
    /// publish on that filter waits for it, so a process killed at any point has
    /// acknowledged only what is stored, and devices resend the rest.
    pub fn finished(&self) -> Option<Finished> {
        self.settle.active().then(|| Finished(self.settle.clone()))
    }

    /// Lets the front take clients, once the in-process consumer has subscribed to the
    /// [`BrokerSettings::ack_when_finished`] filter (without it the front takes clients
    /// from the start). Before that, rumqttd would put a device's readings in a log of
    /// their own topic that the consumer's subscription never reads: their PUBACKs would
    /// wait forever, and the device's after them. Clients that connect meanwhile wait in
    /// the listener's backlog.
    pub fn admit(&self) {
        self.admitted.send_replace(true);
    }

    /// Stops taking MQTT clients: the front's listeners close and its client connections
    /// end, so nothing more is published (or acknowledged) through it. Resolves when every
    /// client connection has ended (true), or after `limit` (false). rumqttd keeps running
    /// for in-process clients (the edge consumer drains what it holds): everything it
    /// acknowledged to a device is in its log before this resolves true.
    pub async fn close(&self, limit: Duration) -> bool {
        self.closing.send_replace(true);
        self.tasks.close();
        tokio::time::timeout(limit, self.tasks.wait()).await.is_ok()
    }

    /// `mqtt://host:port` of the MQTT port, for clients.
    pub fn url(&self) -> String {
        format!("mqtt://{}", reachable(self.addr))
    }

    /// rumqttd's own MQTT 3.1.1 listener on loopback, with its internal credentials: for
    /// the in-process consumer (which needs no front) and for benchmarks of the front.
    pub fn direct_endpoint(&self) -> MqttEndpoint {
        self.direct.clone()
    }

    /// What the front has done.
    pub fn stats(&self) -> FrontCounts {
        FrontCounts {
            held_back: self.gate.holds(),
            acks_held: self.settle.holds(),
            ..self.stats.counts()
        }
    }
}

/// Where a client on this host reaches a listener bound to `addr`.
pub fn reachable(addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port())
    } else {
        addr
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
            "next_connection_delay_ms": 0,
            "connections": {
                "connection_timeout_ms": 60000,
                "max_payload_size": max_payload,
                "max_inflight_count": 1000,
                "dynamic_filters": true
            }
        }
    })
}

/// Each connection through the front holds one descriptor (the client's socket; rumqttd
/// gets its end of an in-memory stream): raises this process's limit to what
/// `connections` need, as far as it may.
fn raise_fd_limit(connections: usize) {
    let want = (connections as u64 + 1024) as libc::rlim_t;
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain system calls on a stack value.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 || limit.rlim_cur >= want {
            return;
        }
        let raised = libc::rlimit {
            rlim_cur: want,
            rlim_max: limit.rlim_max.max(want),
        };
        // Raising the hard limit needs privileges; without them, up to the hard limit.
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
            let soft = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            libc::setrlimit(libc::RLIMIT_NOFILE, &soft);
            tracing::warn!(
                limit = limit.rlim_max,
                needed = want,
                "the open files limit is below what MQTT_MAX_CONNECTIONS needs"
            );
        }
    }
}

/// A runtime built by `builder` that lives as long as the process, driven by a thread
/// named `name`.
fn process_runtime(
    builder: &mut tokio::runtime::Builder,
    name: &str,
) -> anyhow::Result<tokio::runtime::Handle> {
    let runtime = builder
        .thread_name(name)
        .enable_all()
        .build()
        .with_context(|| format!("failed to start the {name} runtime"))?;
    let handle = runtime.handle().clone();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || runtime.block_on(std::future::pending::<()>()))
        .with_context(|| format!("failed to start the {name} thread"))?;
    Ok(handle)
}

/// A single-threaded runtime on a thread named `mqtt-links`: rumqttd's side of the
/// connections the front hands it (rumqttd serves each of its listeners so too).
fn links_runtime() -> anyhow::Result<tokio::runtime::Handle> {
    process_runtime(
        &mut tokio::runtime::Builder::new_current_thread(),
        "mqtt-links",
    )
}

/// A multi-threaded runtime on threads named `mqtt-front`.
fn front_runtime() -> anyhow::Result<tokio::runtime::Handle> {
    // Half the cores: the front only moves bytes, and more threads than it needs cost
    // the processes beside it (rumqttd, the consumer, the stores) wake-ups and latency.
    let workers = std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1));
    process_runtime(
        tokio::runtime::Builder::new_multi_thread().worker_threads(workers),
        "mqtt-front",
    )
}

/// Connections through the front this process's open files limit (hard) allows: each
/// holds one descriptor, and 1,024 are left for everything else.
pub fn front_connections_allowed() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a plain system call on a stack value.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return 0;
    }
    (limit.rlim_max as usize).saturating_sub(1024)
}

fn tls_acceptor(tls: &TlsSettings) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(&tls.cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("cannot read the certificates in {}", tls.cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(&tls.key)
        .with_context(|| format!("cannot read the private key in {}", tls.key.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .context("the TLS certificate and key do not make a server configuration")?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Starts the broker and its front, and returns once every listener accepts
/// connections. With `require_auth`, `directory` checks device credentials (and its
/// change notices end live connections of changed sensors).
pub async fn start(
    settings: &BrokerSettings,
    directory: Option<SensorDirectory>,
) -> anyhow::Result<RunningBroker> {
    let loopback = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
    let internal = resolve(loopback)?;
    let internal_password = SecretString::from(termopar_core::secrets::generate());
    let tls = settings.tls.as_ref().map(tls_acceptor).transpose()?;
    if settings.require_auth && directory.is_none() {
        bail!("device authentication needs the sensor directory");
    }
    raise_fd_limit(settings.max_connections);
    let buffer_bytes = settings
        .buffer_bytes
        .unwrap_or(DEFAULT_BUFFER_BYTES)
        .max(BUFFER_SEGMENTS * 1024);
    let segment_size = buffer_bytes / BUFFER_SEGMENTS;

    let config = serde_json::json!({
        "id": 0,
        "router": {
            "id": 0,
            // The in-process consumer and the benchmarks' direct connections too.
            "max_connections": settings.max_connections + 16,
            "max_outgoing_packet_count": 200,
            "max_segment_size": segment_size,
            "max_segment_count": BUFFER_SEGMENTS
        },
        // The one listener of rumqttd's own, for the in-process consumer and benchmarks;
        // the front hands it clients of both versions in process, with these settings.
        "v4": listener_json("v4", internal, settings.max_payload_bytes),
        // Meters feed the broker metrics and the hold-back (see `export_meters`), every
        // 50 ms: the hold-back is as late as they are (at 20,000 readings/s, a second
        // was ~3.6 MiB of messages). rumqttd's timer unwraps both intervals whichever
        // is configured, so alerts need one too.
        "metrics": {
            "meters": { "push_interval": 1, "push_interval_ms": 50 },
            "alerts": { "push_interval": 60 }
        }
    });
    // Built through serde: some of rumqttd's config fields are private.
    let mut config: rumqttd::Config =
        serde_json::from_value(config).context("invalid rumqttd configuration")?;
    // rumqttd's listener is on loopback; only the front (whose handed connections are
    // checked with these settings too) and the in-process consumer know the password.
    let listeners = config
        .v4
        .iter_mut()
        .chain(config.v5.iter_mut())
        .flat_map(|m| m.values_mut());
    for listener in listeners {
        let password = internal_password.clone();
        listener.set_auth_handler(move |_client_id, _username, given: String| {
            let ok: bool = given
                .as_bytes()
                .ct_eq(password.expose_secret().as_bytes())
                .into();
            async move { ok }
        });
    }

    let mut broker = rumqttd::Broker::new(config);
    let handoff = broker.handoff();
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
    let gate = Arc::new(hold::Gate::default());
    export_meters(meters, gate.clone());
    let settle = Arc::new(settle::Settlement::default());
    if let Some(filter) = &settings.ack_when_finished {
        settle.set(filter);
    }

    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect_timeout(&internal, Duration::from_millis(200)).is_err() {
        if Instant::now() > deadline {
            bail!("the embedded broker did not listen on {internal} within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let stats = Arc::new(FrontStats::default());
    let live = Arc::new(front::LiveDevices::default());
    let topics = Topics::new(&settings.topic_prefix);
    if settings.require_auth {
        if let Some(directory) = &directory {
            directory
                .follow_changes()
                .await
                .context("cannot listen for sensor changes")?;
            live.clone()
                .watch(directory.clone(), settings.recheck_every, stats.clone());
        }
    }
    let front = Arc::new(front::Front {
        auth: acl::Authenticator {
            directory,
            service: settings.service.clone(),
            require_auth: settings.require_auth,
            topics,
            runtime: tokio::runtime::Handle::current(),
        },
        handoff,
        links: links_runtime()?,
        internal_password: internal_password.clone(),
        // A PUBLISH of the largest payload with its topic and properties.
        max_packet: settings.max_payload_bytes + 64 * 1024,
        connect_timeout: Duration::from_secs(10),
        ping_every: settings.no_keepalive_ping,
        live,
        stats: stats.clone(),
        closing: tokio::sync::watch::channel(false).0,
        admitted: tokio::sync::watch::channel(!settle.active()).0,
        tasks: tokio_util::task::TaskTracker::new(),
        gate: gate.clone(),
        settle: settle.clone(),
    });
    // The front has a runtime of its own, as rumqttd has: it serves whatever the caller's
    // runtime is doing (tests that block it included).
    let runtime = front_runtime()?;
    let bind = |addr: SocketAddr, tls: Option<tokio_rustls::TlsAcceptor>| {
        let _on_front = runtime.enter();
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket
            .bind(addr)
            .with_context(|| format!("failed to bind the MQTT port {addr}"))?;
        // A fleet reconnecting at once: the default backlog (128) drops SYNs, and each
        // dropped one costs its device a second.
        let listener = socket.listen(4096)?;
        let bound = listener.local_addr()?;
        front.clone().serve(&runtime, listener, tls);
        anyhow::Ok(bound)
    };
    let addr = bind(settings.addr, None)?;
    let alias_addr = settings.alias_addr.map(|a| bind(a, None)).transpose()?;
    let tls_addr = match (&settings.tls, tls) {
        (Some(t), Some(acceptor)) => Some(bind(t.addr, Some(acceptor))?),
        _ => None,
    };
    tracing::info!(%addr, alias = ?alias_addr, tls = ?tls_addr, auth = settings.require_auth, "embedded MQTT broker listening (3.1.1 and 5)");
    let mut direct = MqttEndpoint::parse(&format!("mqtt://{internal}"))?;
    direct.credentials = Some(("termopar-internal".to_owned(), internal_password));
    Ok(RunningBroker {
        addr,
        alias_addr,
        tls_addr,
        direct,
        stats,
        closing: front.closing.clone(),
        admitted: front.admitted.clone(),
        tasks: front.tasks.clone(),
        gate,
        settle,
        buffer_bytes,
    })
}

/// rumqttd's log of a subscription filter is this many segments of a
/// [`BrokerSettings::buffer_bytes`] share each; it drops the oldest when a new one starts,
/// so it holds at least 7/8 of the buffer of history.
const BUFFER_SEGMENTS: usize = 8;

/// Turns rumqttd's meters (pushed every 50 ms while there is traffic) into Prometheus
/// metrics: connections, messages in, failed publishes, and messages per subscription
/// filter (what is forwarded to subscribers).
fn export_meters(meters: rumqttd::meters::MetersLink, gate: Arc<hold::Gate>) {
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
                                gate.took(&filter, s.total_size as u64);
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
