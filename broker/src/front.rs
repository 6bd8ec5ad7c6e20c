//! The MQTT front door: the one port (and the TLS port) every client connects to, in
//! front of rumqttd, which takes each client in process.
//!
//! rumqttd serves one protocol version per listener, closes a CONNECT with keepalive 0,
//! and has no publish or subscribe hook. The front reads the CONNECT (level, keepalive,
//! credentials, will), authenticates, and hands rumqttd a connection of that version
//! in process (one end of an in-memory stream, served as its listener would: no second
//! socket per client), sending on a CONNECT with rumqttd's internal password, a keepalive
//! rumqttd accepts, and everything else as sent. Then:
//! - service accounts (and everyone when authentication is off) are spliced byte for
//!   byte;
//! - devices are framed packet by packet in both directions: a PUBLISH outside their
//!   readings topic or a SUBSCRIBE outside their subtree is answered by the front and
//!   never reaches rumqttd;
//! - a client that asked for no keepalive is kept alive by the front's own PINGREQs,
//!   whose PINGRESPs it never sees;
//! - in edge mode every connection is framed, and the PUBACK of a QoS 1 reading waits
//!   until the consumer finished it (see `settle`).

use std::{
    collections::{HashMap, HashSet},
    sync::{
        atomic::{AtomicI64, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use anyhow::{bail, Context};
use bytes::{Bytes, BytesMut};
use secrecy::{ExposeSecret, SecretString};
use termopar_core::{
    directory::{SensorChange, SensorDirectory, SensorEntry},
    ids::SensorId,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt},
    net::TcpListener,
    sync::{oneshot, Notify},
};
use tokio_rustls::TlsAcceptor;

use crate::{
    acl::{Authenticator, Device, Principal, Refusal},
    packet::{self, Connect, PacketReader, Publish, Subscribe},
};

/// What the front has done since it started.
#[derive(Debug, Default)]
pub struct FrontStats {
    connects_accepted: AtomicU64,
    connects_refused: AtomicU64,
    publishes_refused: AtomicU64,
    subscriptions_refused: AtomicU64,
    revoked: AtomicU64,
    connections: AtomicI64,
}

/// A snapshot of [`FrontStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FrontCounts {
    /// CONNECTs accepted.
    pub connects_accepted: u64,
    /// CONNECTs refused (credentials, will topic, protocol).
    pub connects_refused: u64,
    /// PUBLISHes (and wills) refused by the device ACL.
    pub publishes_refused: u64,
    /// Subscription filters refused by the device ACL.
    pub subscriptions_refused: u64,
    /// Live device connections ended because their credentials changed.
    pub revoked: u64,
    /// Connections open now.
    pub connections: i64,
    /// Times a client connection was held back (not read from) because the consumer was
    /// behind (see `RunningBroker::hold_back`).
    pub held_back: u64,
    /// PUBACKs that waited for the consumer to finish their messages (see
    /// `BrokerSettings::ack_when_finished`).
    pub acks_held: u64,
}

impl FrontStats {
    /// The counts now.
    pub fn counts(&self) -> FrontCounts {
        FrontCounts {
            connects_accepted: self.connects_accepted.load(Ordering::Relaxed),
            connects_refused: self.connects_refused.load(Ordering::Relaxed),
            publishes_refused: self.publishes_refused.load(Ordering::Relaxed),
            subscriptions_refused: self.subscriptions_refused.load(Ordering::Relaxed),
            revoked: self.revoked.load(Ordering::Relaxed),
            connections: self.connections.load(Ordering::Relaxed),
            held_back: 0,
            acks_held: 0,
        }
    }

    fn refused_connect(&self, reason: &'static str) {
        self.connects_refused.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("mqtt_broker_connects_total", "result" => reason).increment(1);
    }
}

/// Device connections alive now, by sensor, so that a changed secret ends them.
#[derive(Default)]
pub(crate) struct LiveDevices {
    next: AtomicU64,
    by_sensor: Mutex<HashMap<SensorId, Vec<LiveDevice>>>,
}

struct LiveDevice {
    id: u64,
    entry: SensorEntry,
    end: oneshot::Sender<()>,
}

/// Removes a connection from [`LiveDevices`] when it ends.
struct Registered {
    live: Arc<LiveDevices>,
    sensor: SensorId,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        let mut map = self.live.by_sensor.lock().unwrap();
        if let Some(list) = map.get_mut(&self.sensor) {
            list.retain(|d| d.id != self.id);
            if list.is_empty() {
                map.remove(&self.sensor);
            }
        }
    }
}

impl LiveDevices {
    fn register(self: &Arc<Self>, device: &Device) -> (Registered, oneshot::Receiver<()>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (end, ended) = oneshot::channel();
        self.by_sensor
            .lock()
            .unwrap()
            .entry(device.sensor)
            .or_default()
            .push(LiveDevice {
                id,
                entry: device.entry.clone(),
                end,
            });
        let registered = Registered {
            live: self.clone(),
            sensor: device.sensor,
            id,
        };
        (registered, ended)
    }

    /// Ends the connections of `sensor` whose credentials the directory no longer
    /// vouches for. Keeps them when the directory cannot answer.
    async fn recheck(&self, directory: &SensorDirectory, sensor: SensorId, stats: &FrontStats) {
        let Ok(current) = directory.get(sensor).await else {
            return;
        };
        let stale: Vec<LiveDevice> = {
            let mut map = self.by_sensor.lock().unwrap();
            let Some(list) = map.get_mut(&sensor) else {
                return;
            };
            let (stale, keep) = list
                .drain(..)
                .partition(|d| current.as_ref() != Some(&d.entry));
            *list = keep;
            if list.is_empty() {
                map.remove(&sensor);
            }
            stale
        };
        for device in stale {
            stats.revoked.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("mqtt_front_revoked_total").increment(1);
            let _ = device.end.send(());
        }
    }

    fn sensors(&self) -> Vec<SensorId> {
        self.by_sensor.lock().unwrap().keys().copied().collect()
    }

    /// Rechecks the sensors the directory announces, and every live one every `every`
    /// (a notice can be lost; the directory's cache lifetime bounds how stale it is).
    pub(crate) fn watch(
        self: Arc<Self>,
        directory: SensorDirectory,
        every: Duration,
        stats: Arc<FrontStats>,
    ) {
        let mut changes = directory.changes();
        tokio::spawn(async move {
            let mut sweep = tokio::time::interval(every);
            sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let which = tokio::select! {
                    change = changes.recv() => match change {
                        Ok(SensorChange::One(sensor)) => vec![sensor],
                        Ok(SensorChange::Any) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => self.sensors(),
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    },
                    _ = sweep.tick() => self.sensors(),
                };
                for sensor in which {
                    self.recheck(&directory, sensor, &stats).await;
                }
            }
        });
    }
}

/// The front: how to authenticate, how to reach rumqttd, and what is live.
pub(crate) struct Front {
    pub auth: Authenticator,
    /// Hands rumqttd its end of each client's in-memory stream.
    pub handoff: rumqttd::Handoff,
    /// The runtime rumqttd serves handed connections on.
    pub links: tokio::runtime::Handle,
    pub internal_password: SecretString,
    pub max_packet: usize,
    pub connect_timeout: Duration,
    /// How often the front pings rumqttd for a client that asked for no keepalive.
    pub ping_every: Duration,
    pub live: Arc<LiveDevices>,
    pub stats: Arc<FrontStats>,
    /// Turns true when the front closes: listeners stop accepting and every client
    /// connection ends (what rumqttd took from them stays with it).
    pub closing: tokio::sync::watch::Sender<bool>,
    /// Turns true when the front may take clients (see `RunningBroker::admit`).
    pub admitted: tokio::sync::watch::Sender<bool>,
    /// Every client's task, from accept to its end: closing waits for them, so that no
    /// acknowledgement reaches a device after the front has closed.
    pub tasks: tokio_util::task::TaskTracker,
    /// Shut while the consumer is too far behind: clients are then not read from.
    pub gate: Arc<crate::hold::Gate>,
    /// PUBACKs that wait for the consumer (edge mode).
    pub settle: Arc<crate::settle::Settlement>,
}

/// A client whose CONNECT rumqttd has been sent.
struct Accepted<S> {
    level: u8,
    client: S,
    broker: tokio::io::DuplexStream,
    /// What the client sent after its CONNECT.
    from_client: PacketReader,
    principal: Principal,
    /// The client asked for no keepalive: the front pings rumqttd for it.
    no_keepalive: bool,
}

/// Counts an open connection for as long as it lives.
struct Open(Arc<FrontStats>);

impl Open {
    fn new(stats: &Arc<FrontStats>) -> Self {
        let now = stats.connections.fetch_add(1, Ordering::Relaxed) + 1;
        metrics::gauge!("mqtt_front_connections").set(now as f64);
        Self(stats.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        let now = self.0.connections.fetch_sub(1, Ordering::Relaxed) - 1;
        metrics::gauge!("mqtt_front_connections").set(now as f64);
    }
}

/// The state that spans both directions of a framed connection. Nothing in it
/// allocates until used: most connections never need it.
#[derive(Default)]
struct Shared {
    /// SUBSCRIBEs sent on with some filters left out: the codes to put back, by id.
    pending_subacks: HashMap<u16, Vec<Option<u8>>>,
    /// PINGRESPs owed to the front's own PINGREQs.
    owed_pings: u32,
    /// The front's own answers to refused packets, for the client.
    answers: Vec<Bytes>,
    /// QoS 1 publishes passed on whose PUBACK waits for the consumer, by packet id.
    expected: HashMap<u16, crate::settle::Expected>,
}

/// PUBACKs from rumqttd not yet sent on, in the order they came (MQTT wants QoS 1
/// acknowledgements in the order of the publishes): the first waits for the consumer,
/// the ones after it for the first.
#[derive(Default)]
struct Held(std::collections::VecDeque<(Bytes, Option<crate::settle::Expected>)>);

impl Held {
    /// Appends the PUBACKs at the head that may go now to `out`.
    fn release(&mut self, out: &mut BytesMut) {
        while let Some((_, expected)) = self.0.front_mut() {
            if let Some(rx) = expected {
                if let Err(oneshot::error::TryRecvError::Empty) = rx.try_recv() {
                    return;
                }
            }
            let (p, _) = self.0.pop_front().expect("a head");
            out.extend_from_slice(&p);
        }
    }

    /// Resolves when the head's consumer finished its message.
    async fn head(&mut self) {
        match self.0.front_mut() {
            Some((_, Some(rx))) => {
                let _ = rx.await;
                self.0.front_mut().expect("a head").1 = None;
            }
            _ => std::future::pending().await,
        }
    }
}

/// The most each direction of the in-memory stream to rumqttd holds unread: a write
/// beyond it waits for the reader, as a socket's would. Memory is taken as used.
const PIPE_BYTES: usize = 64 * 1024;

/// Answers a client that does not read them can make the front hold; past that, the
/// connection is closed.
const MAX_PENDING_ANSWERS: usize = 1024;

impl Front {
    /// Accepts connections on `listener` (through TLS with `tls`) on `runtime`.
    pub(crate) fn serve(
        self: Arc<Self>,
        runtime: &tokio::runtime::Handle,
        listener: TcpListener,
        tls: Option<TlsAcceptor>,
    ) {
        let mut closing = self.closing.subscribe();
        let mut admitted = self.admitted.subscribe();
        runtime.spawn(async move {
            tokio::select! {
                _ = admitted.wait_for(|a| *a) => {}
                _ = closing.wait_for(|c| *c) => return,
            }
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    _ = closing.wait_for(|c| *c) => return,
                };
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors, most likely: let some close.
                        tracing::warn!(error = %e, "MQTT front could not accept");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let stream = crate::hold::Gated::new(stream, self.gate.clone());
                let front = self.clone();
                let tls = tls.clone();
                let mut closing = front.closing.subscribe();
                // Every step is boxed: the task's own future is as large as its largest
                // step (a TLS handshake, a CONNECT), and it lives as long as the
                // connection; boxed, each step's memory goes when the step ends (measured:
                // 7 KB per connection less).
                front.tasks.clone().spawn(async move {
                    let served = async {
                        match tls {
                            None => Box::pin(front.connection(stream)).await,
                            Some(tls) => {
                                match Box::pin(tokio::time::timeout(
                                    front.connect_timeout,
                                    tls.accept(stream),
                                ))
                                .await
                                {
                                    Ok(Ok(stream)) => Box::pin(front.connection(stream)).await,
                                    Ok(Err(e)) => {
                                        metrics::counter!("mqtt_front_tls_failures_total")
                                            .increment(1);
                                        Err(anyhow::Error::new(e).context("TLS handshake failed"))
                                    }
                                    Err(_) => Err(anyhow::anyhow!("TLS handshake timed out")),
                                }
                            }
                        }
                    };
                    let served = tokio::select! {
                        served = served => served,
                        _ = closing.wait_for(|c| *c) => Ok(()),
                    };
                    if let Err(e) = served {
                        tracing::debug!(%peer, error = format!("{e:#}"), "MQTT connection ended");
                    }
                });
            }
        });
    }

    /// One client: its CONNECT, then its packets until either side ends.
    async fn connection<S>(self: Arc<Self>, client: S) -> anyhow::Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Some(accepted) = Box::pin(self.accept(client)).await? else {
            return Ok(());
        };
        let _open = Open::new(&self.stats);
        Box::pin(self.carry(accepted)).await
    }

    /// Reads the CONNECT, authenticates, and opens the connection to rumqttd: `None` when
    /// the client went away or was refused (and answered).
    async fn accept<S>(&self, mut client: S) -> anyhow::Result<Option<Accepted<S>>>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut from_client = PacketReader::new(self.max_packet);
        let first = tokio::time::timeout(self.connect_timeout, async {
            loop {
                if let Some(p) = from_client.next()? {
                    return Ok::<_, anyhow::Error>(Some(p));
                }
                if !from_client.fill(&mut client).await? {
                    return Ok(None);
                }
            }
        })
        .await
        .context("no CONNECT in time")??;
        let Some(first) = first else {
            return Ok(None);
        };
        if packet::kind(&first) != packet::CONNECT {
            self.stats.refused_connect("malformed");
            bail!("the first packet is not a CONNECT");
        }
        let connect = match Connect::parse(&first) {
            Ok(c) => c,
            Err(e) => {
                self.stats.refused_connect("malformed");
                return Err(e.into());
            }
        };
        let v5 = connect.level == 5;
        if !(3..=5).contains(&connect.level) {
            self.stats.refused_connect("protocol");
            client
                .write_all(&packet::connack_refused(4, packet::V4_UNSUPPORTED_VERSION))
                .await?;
            bail!("protocol level {} is not served", connect.level);
        }
        let refuse = |v5_code: u8, v4_code: u8| {
            packet::connack_refused(connect.level, if v5 { v5_code } else { v4_code })
        };
        let principal = match self.auth.check(connect.username, connect.password).await {
            Ok(p) => p,
            Err(refusal) => {
                self.stats.refused_connect("refused");
                let answer = match refusal {
                    Refusal::Credentials => {
                        refuse(packet::V5_BAD_CREDENTIALS, packet::V4_BAD_CREDENTIALS)
                    }
                    // "Server unavailable" in both versions.
                    Refusal::Unavailable => refuse(0x88, 0x03),
                };
                client.write_all(&answer).await?;
                return Ok(None);
            }
        };
        if let (Principal::Device(d), Some(will)) = (&principal, connect.will_topic) {
            if !d.may_publish(will) {
                self.stats.refused_connect("refused");
                self.stats.publishes_refused.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("mqtt_acl_refused_total", "action" => "will").increment(1);
                tracing::warn!(sensor = %d.sensor, will = %String::from_utf8_lossy(will), "device refused: a will outside its readings topic");
                client
                    .write_all(&refuse(
                        packet::V5_NOT_AUTHORIZED,
                        packet::V4_NOT_AUTHORIZED,
                    ))
                    .await?;
                return Ok(None);
            }
        }

        let (mut broker, theirs) = tokio::io::duplex(PIPE_BYTES);
        self.handoff
            .accept(&self.links, theirs, v5)
            .context("rumqttd did not take the connection")?;
        let no_keepalive = connect.keep_alive == 0;
        let keep_alive = if no_keepalive {
            (self.ping_every.as_secs() * 2).clamp(1, u16::MAX as u64) as u16
        } else {
            connect.keep_alive
        };
        // A device's session lives under its sensor's name: another device reusing its
        // client id (of another tenant, say) cannot take it over.
        let client_prefix = match &principal {
            Principal::Device(d) => format!("{}:", d.sensor),
            Principal::Full => String::new(),
        };
        broker
            .write_all(&connect.rewrite(
                keep_alive,
                client_prefix.as_bytes(),
                connect.username.unwrap_or_default(),
                self.internal_password.expose_secret().as_bytes(),
            ))
            .await?;
        self.stats.connects_accepted.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("mqtt_broker_connects_total", "result" => "accepted").increment(1);
        Ok(Some(Accepted {
            level: connect.level,
            client,
            broker,
            from_client,
            principal,
            no_keepalive,
        }))
    }

    /// Carries an accepted connection's packets both ways until either side ends.
    async fn carry<S>(&self, accepted: Accepted<S>) -> anyhow::Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Accepted {
            level,
            mut client,
            mut broker,
            mut from_client,
            principal,
            no_keepalive,
        } = accepted;
        match principal {
            Principal::Full if !no_keepalive && !self.settle.active() => {
                broker.write_all(&from_client.take_rest()).await?;
                tokio::io::copy_bidirectional(&mut client, &mut broker).await?;
                Ok(())
            }
            Principal::Full => {
                self.framed(client, broker, from_client, level, None, no_keepalive)
                    .await
            }
            Principal::Device(device) => {
                self.framed(
                    client,
                    broker,
                    from_client,
                    level,
                    Some(device),
                    no_keepalive,
                )
                .await
            }
        }
    }

    /// Both directions packet by packet, the device ACL applied to what the client sends.
    async fn framed<S>(
        &self,
        client: S,
        broker: tokio::io::DuplexStream,
        mut from_client: PacketReader,
        level: u8,
        device: Option<Device>,
        no_keepalive: bool,
    ) -> anyhow::Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (mut client_r, mut client_w) = tokio::io::split(client);
        let (mut broker_r, mut broker_w) = tokio::io::split(broker);
        let (_registered, mut revoked) = match &device {
            Some(d) => {
                let (registered, revoked) = self.live.register(d);
                (Some(registered), Some(revoked))
            }
            None => (None, None),
        };
        let shared = Mutex::new(Shared::default());
        let answered = Notify::new();

        let upstream = async {
            let mut gate = Gate {
                level,
                device: device.as_ref(),
                stats: &self.stats,
                shared: &shared,
                answered: &answered,
                refused_qos2: HashSet::new(),
                logged: false,
                settle: &self.settle,
                aliases: HashMap::new(),
            };
            let start = tokio::time::Instant::now() + self.ping_every;
            let mut ping = tokio::time::interval_at(start, self.ping_every);
            let mut out = BytesMut::new();
            loop {
                while let Some(p) = from_client.next()? {
                    gate.pass(p, &mut out)?;
                }
                if !out.is_empty() {
                    broker_w.write_all(&out).await?;
                    out.clear();
                }
                tokio::select! {
                    read = from_client.fill(&mut client_r) => if !read? {
                        return Ok::<_, anyhow::Error>(());
                    },
                    _ = ping.tick(), if no_keepalive => {
                        shared.lock().unwrap().owed_pings += 1;
                        broker_w.write_all(&packet::PINGREQ).await?;
                    }
                }
            }
        };

        let downstream = async {
            let mut from_broker = PacketReader::new(usize::MAX);
            let mut out = BytesMut::new();
            let mut held = Held::default();
            loop {
                tokio::select! {
                    read = from_broker.fill(&mut broker_r) => {
                        if !read? {
                            return Ok::<_, anyhow::Error>(());
                        }
                        while let Some(p) = from_broker.next()? {
                            match packet::kind(&p) {
                                packet::PINGRESP => {
                                    let mut shared = shared.lock().unwrap();
                                    if shared.owed_pings > 0 {
                                        shared.owed_pings -= 1;
                                        continue;
                                    }
                                }
                                packet::PUBACK => {
                                    let id = packet::packet_id(&p)?;
                                    let expected = shared.lock().unwrap().expected.remove(&id);
                                    if expected.is_some() || !held.0.is_empty() {
                                        // A copy: the packet holds on to the whole read.
                                        held.0.push_back((Bytes::copy_from_slice(&p), expected));
                                        held.release(&mut out);
                                        if !held.0.is_empty() {
                                            self.settle.held();
                                        }
                                        continue;
                                    }
                                }
                                packet::SUBACK => {
                                    let refused = shared
                                        .lock()
                                        .unwrap()
                                        .pending_subacks
                                        .remove(&packet::packet_id(&p)?);
                                    if let Some(refused) = refused {
                                        out.extend_from_slice(&packet::merge_suback(&p, level, &refused)?);
                                        continue;
                                    }
                                }
                                _ => {}
                            }
                            out.extend_from_slice(&p);
                        }
                    }
                    _ = held.head(), if !held.0.is_empty() => held.release(&mut out),
                    _ = answered.notified() => {
                        for p in std::mem::take(&mut shared.lock().unwrap().answers) {
                            out.extend_from_slice(&p);
                        }
                    }
                    _ = async { revoked.as_mut().unwrap().await }, if revoked.is_some() => {
                        tracing::info!(sensor = ?device.as_ref().map(|d| d.sensor), "device credentials changed: disconnecting");
                        if level == 5 {
                            client_w.write_all(&out).await?;
                            client_w.write_all(&packet::disconnect(packet::V5_NOT_AUTHORIZED, "device credentials changed")).await?;
                        }
                        let _ = client_w.shutdown().await;
                        return Ok(());
                    }
                }
                if !out.is_empty() {
                    client_w.write_all(&out).await?;
                    out.clear();
                }
            }
        };

        tokio::select! {
            r = upstream => r,
            r = downstream => r,
        }
    }
}

/// The device ACL on what a client sends.
struct Gate<'a> {
    level: u8,
    device: Option<&'a Device>,
    stats: &'a FrontStats,
    shared: &'a Mutex<Shared>,
    answered: &'a Notify,
    /// Refused QoS 2 publishes, whose PUBREL the front answers.
    refused_qos2: HashSet<u16>,
    logged: bool,
    settle: &'a crate::settle::Settlement,
    /// MQTT 5 topic aliases the client set.
    aliases: HashMap<u16, Vec<u8>>,
}

impl Gate<'_> {
    /// Appends `p` to `out` when it may go on; answers it when it may not.
    fn pass(&mut self, p: Bytes, out: &mut BytesMut) -> anyhow::Result<()> {
        let kind = packet::kind(&p);
        let Some(device) = self.device else {
            if kind == packet::PUBLISH && self.settle.active() {
                let publish = Publish::parse(&p, self.level)?;
                self.expect(&publish);
            }
            out.extend_from_slice(&p);
            return Ok(());
        };
        match kind {
            packet::PUBLISH => {
                let publish = Publish::parse(&p, self.level)?;
                // An empty topic is an MQTT 5 alias, which only an allowed topic set.
                if publish.topic.is_empty() || device.may_publish(publish.topic) {
                    self.expect(&publish);
                    out.extend_from_slice(&p);
                    return Ok(());
                }
                self.refused("publish", device, publish.topic);
                self.stats.publishes_refused.fetch_add(1, Ordering::Relaxed);
                if let Some(id) = publish.packet_id {
                    let first = if publish.qos == 1 { 0x40 } else { 0x50 };
                    // 3.1.1 goes on with PUBREL; some MQTT 5 clients send one even
                    // after a refusing PUBREC. rumqttd must never see it.
                    if publish.qos == 2 {
                        self.refused_qos2.insert(id);
                    }
                    self.answer(packet::publish_refused(first, self.level, id))?;
                }
            }
            packet::PUBREL if !self.refused_qos2.is_empty() => {
                let id = packet::packet_id(&p)?;
                if self.refused_qos2.remove(&id) {
                    self.answer(packet::pubcomp(id))?;
                } else {
                    out.extend_from_slice(&p);
                }
            }
            packet::SUBSCRIBE => {
                let subscribe = Subscribe::parse(&p, self.level)?;
                let keep: Vec<bool> = subscribe
                    .filters
                    .iter()
                    .map(|(f, _)| device.may_subscribe(f))
                    .collect();
                let refused = keep.iter().filter(|k| !**k).count();
                if refused == 0 {
                    out.extend_from_slice(&p);
                    return Ok(());
                }
                if let Some((filter, _)) = subscribe
                    .filters
                    .iter()
                    .zip(&keep)
                    .find(|(_, k)| !**k)
                    .map(|(f, _)| f)
                {
                    self.refused("subscribe", device, filter);
                }
                self.stats
                    .subscriptions_refused
                    .fetch_add(refused as u64, Ordering::Relaxed);
                let code = packet::subscribe_refused(self.level);
                if refused == keep.len() {
                    let codes = vec![code; refused];
                    self.answer(packet::suback(self.level, subscribe.packet_id, &codes))?;
                } else {
                    let codes = keep.iter().map(|k| (!k).then_some(code)).collect();
                    self.shared
                        .lock()
                        .unwrap()
                        .pending_subacks
                        .insert(subscribe.packet_id, codes);
                    out.extend_from_slice(&subscribe.only(&keep));
                }
            }
            _ => out.extend_from_slice(&p),
        }
        Ok(())
    }

    /// A publish going on to rumqttd: its PUBACK waits for the consumer when the
    /// consumer will see it (QoS 1 on the consumer's filter, in edge mode).
    fn expect(&mut self, publish: &Publish<'_>) {
        if let (Some(alias), false) = (publish.alias, publish.topic.is_empty()) {
            self.aliases.insert(alias, publish.topic.to_vec());
        }
        let (1, Some(id)) = (publish.qos, publish.packet_id) else {
            return;
        };
        let topic = match (publish.topic.is_empty(), publish.alias) {
            (false, _) => publish.topic,
            (true, Some(alias)) => match self.aliases.get(&alias) {
                Some(topic) => topic,
                None => return,
            },
            (true, None) => return,
        };
        if let Some(expected) = self.settle.expect(topic, publish.payload) {
            self.shared.lock().unwrap().expected.insert(id, expected);
        }
    }

    /// Queues an answer for the client (written by the other direction).
    fn answer(&self, p: Bytes) -> anyhow::Result<()> {
        let mut shared = self.shared.lock().unwrap();
        if shared.answers.len() >= MAX_PENDING_ANSWERS {
            bail!("the client does not read the answers to its refused packets");
        }
        shared.answers.push(p);
        drop(shared);
        self.answered.notify_one();
        Ok(())
    }

    fn refused(&mut self, action: &'static str, device: &Device, topic: &[u8]) {
        metrics::counter!("mqtt_acl_refused_total", "action" => action).increment(1);
        if !self.logged {
            self.logged = true;
            tracing::warn!(
                sensor = %device.sensor,
                client = %device.client(),
                action,
                topic = %String::from_utf8_lossy(topic),
                "device refused outside its own topics (logged once per connection)"
            );
        }
    }
}
