//! Devices as the broker sees them: each its own MQTT 3.1.1 connection with its own
//! secret. A raw client (CONNECT, PUBLISH QoS 1, PUBACK and nothing else), small enough
//! that 10,000 of them fit in the benchmark process beside what they measure, over TCP
//! or TLS.

use std::{
    net::SocketAddr,
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::bail;
use chrono::Utc;
use termopar_core::ids::{ClientId, SensorId};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};

/// The secret the benchmarks give a sensor (see [`give_secrets`]).
pub fn secret_of(sensor: SensorId) -> String {
    format!("bench-{sensor}")
}

/// Sets every sensor of `client` to the secret [`secret_of`] names, in one statement.
pub async fn give_secrets(pool: &sqlx::PgPool, client: ClientId) -> anyhow::Result<()> {
    sqlx::query(
        "UPDATE sensors SET secret_hash = sha256(convert_to('bench-' || id::text, 'UTF8'))
         WHERE client_id = $1",
    )
    .bind(client.0)
    .execute(pool)
    .await?;
    Ok(())
}

/// How devices reach the broker.
#[derive(Clone)]
pub enum Transport {
    /// Plain TCP.
    Plain,
    /// TLS, trusting one CA.
    Tls(tokio_rustls::TlsConnector),
}

impl Transport {
    /// TLS trusting the PEM certificate `ca` (a self-signed server certificate).
    pub fn tls(ca: &Path) -> anyhow::Result<Self> {
        use rustls::pki_types::{pem::PemObject, CertificateDer};
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca)? {
            roots.add(cert?)?;
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        Ok(Self::Tls(tokio_rustls::TlsConnector::from(Arc::new(
            config,
        ))))
    }
}

/// A connection of either kind.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

fn with_header(first: u8, body: Vec<u8>) -> Vec<u8> {
    let mut out = vec![first];
    let mut n = body.len();
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if n == 0 {
            break;
        }
    }
    out.extend(body);
    out
}

fn publish_packet(topic: &str, id: u16, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(topic.len() + payload.len() + 4);
    put_str(&mut body, topic.as_bytes());
    body.extend_from_slice(&id.to_be_bytes());
    body.extend_from_slice(payload);
    with_header(0x32, body)
}

/// Reads one packet: its first byte and body.
async fn read_packet<S: AsyncRead + Unpin>(stream: &mut S) -> std::io::Result<(u8, Vec<u8>)> {
    let first = stream.read_u8().await?;
    let mut len = 0usize;
    for i in 0..4 {
        let byte = stream.read_u8().await?;
        len |= ((byte & 0x7F) as usize) << (7 * i);
        if byte & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0; len];
    stream.read_exact(&mut body).await?;
    Ok((first, body))
}

/// Connects as `username`/`password` (MQTT 3.1.1, clean session) and returns once the
/// broker accepted.
pub async fn open(
    addr: SocketAddr,
    transport: &Transport,
    client_id: &str,
    username: &str,
    password: &str,
) -> anyhow::Result<Box<dyn Stream>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let mut stream: Box<dyn Stream> = match transport {
        Transport::Plain => Box::new(tcp),
        Transport::Tls(connector) => {
            let name = rustls::pki_types::ServerName::try_from("localhost")?;
            Box::new(connector.connect(name, tcp).await?)
        }
    };
    let mut body = Vec::with_capacity(64 + client_id.len());
    put_str(&mut body, b"MQTT");
    body.extend_from_slice(&[4, 0xC2]); // 3.1.1; username, password, clean session
    body.extend_from_slice(&60u16.to_be_bytes());
    put_str(&mut body, client_id.as_bytes());
    put_str(&mut body, username.as_bytes());
    put_str(&mut body, password.as_bytes());
    stream.write_all(&with_header(0x10, body)).await?;
    let (first, body) = read_packet(&mut stream).await?;
    if first >> 4 != 2 || body.get(1) != Some(&0) {
        bail!("CONNECT refused: {first:#x} {body:?}");
    }
    Ok(stream)
}

/// Publishes `messages` (QoS 1) with at most `window` unacknowledged; returns once every
/// one is acknowledged. With `pace` (seconds between messages and the first one's
/// delay), readings are restamped with the time they are sent, to measure latency.
pub async fn publish(
    stream: Box<dyn Stream>,
    messages: Vec<(String, Vec<u8>)>,
    window: usize,
    pace: Option<(Duration, Duration)>,
) -> anyhow::Result<()> {
    let total = messages.len();
    let (mut rx, mut tx) = tokio::io::split(stream);
    let permits = Arc::new(tokio::sync::Semaphore::new(window));
    let acks = {
        let permits = permits.clone();
        async move {
            for _ in 0..total {
                let (first, _) = read_packet(&mut rx).await?;
                anyhow::ensure!(first >> 4 == 4, "expected a PUBACK, got {first:#x}");
                permits.add_permits(1);
            }
            anyhow::Ok(())
        }
    };
    let sends = async move {
        let start = tokio::time::Instant::now();
        for (i, (topic, payload)) in messages.into_iter().enumerate() {
            permits.acquire().await?.forget();
            let payload = match pace {
                Some((every, offset)) => {
                    tokio::time::sleep_until(start + offset + every * i as u32).await;
                    crate::ingest::restamp(&payload, Utc::now())
                }
                None => payload,
            };
            let id = (i % 65_535) as u16 + 1;
            tx.write_all(&publish_packet(&topic, id, &payload)).await?;
        }
        anyhow::Ok(tx)
    };
    let (acked, sent) = tokio::join!(acks, sends);
    acked?;
    sent?;
    Ok(())
}

/// A fleet connected at once: each device a task holding its connection.
pub struct Fleet {
    /// Connections made per second.
    pub connects_per_sec: f64,
    streams: Vec<Box<dyn Stream>>,
}

impl Fleet {
    /// Connects `devices` (client id, username, password) with up to `concurrency`
    /// CONNECTs in flight.
    pub async fn connect(
        addr: SocketAddr,
        transport: &Transport,
        devices: Vec<(String, String, String)>,
        concurrency: usize,
    ) -> anyhow::Result<Self> {
        use futures::StreamExt;
        let started = Instant::now();
        let n = devices.len();
        let streams: Vec<Box<dyn Stream>> = futures::stream::iter(devices)
            .map(|(id, user, pass)| {
                let transport = transport.clone();
                async move { open(addr, &transport, &id, &user, &pass).await }
            })
            .buffered(concurrency)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<anyhow::Result<_>>()?;
        Ok(Self {
            connects_per_sec: n as f64 / started.elapsed().as_secs_f64(),
            streams,
        })
    }

    /// Every device publishes one message every `every` (first at a random offset), the
    /// message made by `message(device index, sequence)`, for `rounds` rounds; returns
    /// the messages acknowledged.
    pub async fn run(
        self,
        every: Duration,
        rounds: usize,
        message: impl Fn(usize, usize) -> (String, Vec<u8>),
    ) -> anyhow::Result<u64> {
        let acked = Arc::new(AtomicU64::new(0));
        let n = self.streams.len();
        let mut tasks = tokio::task::JoinSet::new();
        for (i, stream) in self.streams.into_iter().enumerate() {
            let messages: Vec<_> = (0..rounds).map(|k| message(i, k)).collect();
            let offset = every.mul_f64(i as f64 / n as f64);
            let acked = acked.clone();
            tasks.spawn(async move {
                publish(stream, messages, 1, Some((every, offset))).await?;
                acked.fetch_add(rounds as u64, Ordering::Relaxed);
                anyhow::Ok(())
            });
        }
        while let Some(done) = tasks.join_next().await {
            done??;
        }
        Ok(acked.load(Ordering::Relaxed))
    }
}
