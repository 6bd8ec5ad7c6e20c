//! Publishing readings at a rate, on a real or accelerated clock.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use chrono::{DateTime, Utc};
use indicatif::{ProgressBar, ProgressStyle};
use rand::{rngs::StdRng, seq::SliceRandom, Rng, SeedableRng};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use secrecy::ExposeSecret;
use termopar_core::{
    ids::{ClientId, SensorId},
    reading::ReadingPayload,
    settings::MqttEndpoint,
    topic::Topics,
};
use uuid::Uuid;

use crate::Profile;

/// One simulated sensor.
#[derive(Debug, Clone)]
pub struct SimSensor {
    /// Its client.
    pub client_id: ClientId,
    /// Its id.
    pub sensor_id: SensorId,
    /// How it behaves.
    pub profile: Profile,
    /// Its device secret, when provisioning asked for one (see `per_device`).
    pub secret: Option<String>,
}

/// What to publish, where and how fast.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// The broker.
    pub broker: MqttEndpoint,
    /// MQTT client id.
    pub client_id: String,
    /// Topic names.
    pub topics: Topics,
    /// The sensors, published round-robin.
    pub sensors: Vec<SimSensor>,
    /// Messages per second, in total.
    pub rate: f64,
    /// Stop after this many messages.
    pub count: Option<u64>,
    /// Stop after this long.
    pub duration: Option<Duration>,
    /// QoS 0 or 1.
    pub qos: QoS,
    /// Readings per message (a JSON array when more than 1).
    pub batch: usize,
    /// Simulated time at start (default: now).
    pub start: Option<DateTime<Utc>>,
    /// Simulated seconds per real second.
    pub speed: f64,
    /// Fraction of messages that are deliberately bad.
    pub bad_ratio: f64,
    /// Random seed (reproducible runs).
    pub seed: u64,
    /// Show a progress bar.
    pub progress: bool,
    /// Connect each sensor as its own device (username = sensor id, password = its
    /// secret) instead of one client with the broker credentials: the way a real fleet
    /// exercises authentication, the device ACL and many connections.
    pub per_device: bool,
}

impl SimConfig {
    /// `sensors` on `broker` with the defaults of the CLI: 10 messages/s until stopped
    /// by `count` or `duration`, QoS 1, one reading per message, a live clock, no bad
    /// data, seed 42, no progress bar, a client id of its own.
    pub fn new(broker: MqttEndpoint, topics: Topics, sensors: Vec<SimSensor>) -> Self {
        Self {
            broker,
            client_id: format!("termopar-device-sim-{}", Uuid::new_v4().simple()),
            topics,
            sensors,
            rate: 10.0,
            count: None,
            duration: None,
            qos: QoS::AtLeastOnce,
            batch: 1,
            start: None,
            speed: 1.0,
            bad_ratio: 0.0,
            seed: 42,
            progress: false,
            per_device: false,
        }
    }
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Messages published.
    pub messages: u64,
    /// Good readings in them.
    pub readings: u64,
    /// Deliberately bad messages.
    pub bad: u64,
    /// Messages the broker acknowledged (QoS 1; equals `messages` for QoS 0).
    pub acked: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Ids of the good readings, in publish order.
    pub reading_ids: Vec<Uuid>,
}

impl Summary {
    /// Messages per second achieved.
    pub fn rate(&self) -> f64 {
        self.messages as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// A deliberately bad payload, and the topic to send it to (some are bad because of
/// the topic).
fn bad_message(rng: &mut StdRng, sensor: &SimSensor, topics: &Topics) -> (String, Vec<u8>) {
    let topic = topics.readings(sensor.client_id, sensor.sensor_id);
    match rng.gen_range(0..8) {
        0 => (topic, br#"{"temperature": 21.5, "ts": "#.to_vec()),
        1 => (topic, br#"{"temperature": "hot"}"#.to_vec()),
        2 => (topic, br#"{"temperature": NaN}"#.to_vec()),
        3 => (topic, br#"{"temperature": 5000}"#.to_vec()),
        4 => (
            topic,
            br#"{"temperature": 20, "ts": "last tuesday"}"#.to_vec(),
        ),
        5 => (topic, (0..64).map(|_| rng.gen()).collect()),
        6 => (
            topics.readings(sensor.client_id, SensorId(Uuid::new_v4())),
            br#"{"temperature": 20}"#.to_vec(),
        ),
        _ => (
            topics.readings(ClientId(Uuid::new_v4()), sensor.sensor_id),
            br#"{"temperature": 20}"#.to_vec(),
        ),
    }
}

/// Publishes until the count or duration is reached (or, on an accelerated clock, until
/// simulated time reaches now), waits for the acknowledgements, and reports.
pub async fn run(config: SimConfig) -> anyhow::Result<Summary> {
    anyhow::ensure!(!config.sensors.is_empty(), "no sensors to simulate");
    anyhow::ensure!(config.rate > 0.0, "rate must be positive");
    anyhow::ensure!(config.batch >= 1, "batch must be at least 1");
    anyhow::ensure!(
        (0.0..=1.0).contains(&config.bad_ratio),
        "bad ratio must be within 0..=1"
    );

    let acked = Arc::new(AtomicU64::new(0));
    let mut links = Vec::new();
    if config.per_device {
        for sensor in &config.sensors {
            let secret = sensor.secret.clone().with_context(|| {
                format!(
                    "sensor {} has no device secret to connect with",
                    sensor.sensor_id
                )
            })?;
            let id = format!("{}-{}", config.client_id, sensor.sensor_id.0.simple());
            let credentials = Some((sensor.sensor_id.to_string(), secret));
            links.push(Link::open(&config.broker, &id, credentials, acked.clone()).await?);
        }
    } else {
        let credentials = config
            .broker
            .credentials
            .as_ref()
            .map(|(u, p)| (u.clone(), p.expose_secret().to_owned()));
        links.push(
            Link::open(
                &config.broker,
                &config.client_id,
                credentials,
                acked.clone(),
            )
            .await?,
        );
    }

    let mut rng = StdRng::seed_from_u64(config.seed);
    let mut summary = Summary::default();
    let started = Instant::now();
    let sim_start = config.start.unwrap_or_else(Utc::now);
    let bar = progress_bar(&config);
    let mut order: Vec<usize> = (0..config.sensors.len()).collect();
    let mut next = 0usize;
    let tick = Duration::from_millis(10);
    'publishing: loop {
        let elapsed = started.elapsed();
        if config.duration.is_some_and(|d| elapsed >= d) {
            break;
        }
        let due = (elapsed.as_secs_f64() * config.rate).ceil() as u64;
        while summary.messages < due.max(1) {
            if config.count.is_some_and(|c| summary.messages >= c) {
                break 'publishing;
            }
            let sim_now = sim_start
                + chrono::Duration::from_std(started.elapsed().mul_f64(config.speed))
                    .unwrap_or_default();
            if config.start.is_some() && sim_now > Utc::now() {
                break 'publishing; // an accelerated clock caught up with real time
            }
            if next == 0 {
                order.shuffle(&mut rng);
            }
            let sensor = &config.sensors[order[next]];
            let link = &links[if config.per_device { order[next] } else { 0 }];
            next = (next + 1) % order.len();

            let (topic, payload) = if rng.gen_bool(config.bad_ratio) {
                summary.bad += 1;
                bad_message(&mut rng, sensor, &config.topics)
            } else {
                let readings: Vec<ReadingPayload> = (0..config.batch)
                    .map(|i| {
                        // Readings of one batch are spread over the last second.
                        let ts = sim_now
                            - chrono::Duration::milliseconds(
                                (config.batch - 1 - i) as i64 * 1000 / config.batch as i64,
                            );
                        let id = Uuid::new_v4();
                        summary.reading_ids.push(id);
                        ReadingPayload {
                            id: Some(id),
                            ts: Some(ts),
                            temperature: sensor.profile.sample(ts, &mut rng),
                            extra: Default::default(),
                        }
                    })
                    .collect();
                summary.readings += readings.len() as u64;
                let payload = if config.batch == 1 {
                    serde_json::to_vec(&readings[0])
                } else {
                    serde_json::to_vec(&readings)
                }
                .expect("readings serialize");
                (
                    config.topics.readings(sensor.client_id, sensor.sensor_id),
                    payload,
                )
            };
            link.client
                .publish(topic, config.qos, false, payload)
                .await
                .context("the MQTT client stopped")?;
            summary.messages += 1;
            if let Some(bar) = &bar {
                bar.set_position(summary.messages);
            }
        }
        if links.iter().any(|l| l.driver.is_finished()) {
            break;
        }
        tokio::time::sleep(tick).await;
    }

    // Wait for the broker to acknowledge everything (QoS 1).
    let deadline = Instant::now() + Duration::from_secs(30);
    if config.qos != QoS::AtMostOnce {
        while acked.load(Ordering::Relaxed) < summary.messages
            && Instant::now() < deadline
            && !links.iter().any(|l| l.driver.is_finished())
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    summary.elapsed = started.elapsed();
    summary.acked = if config.qos == QoS::AtMostOnce {
        summary.messages
    } else {
        acked.load(Ordering::Relaxed)
    };
    for link in links {
        let _ = link.client.disconnect().await;
        if let Ok(Ok(Err(e))) = tokio::time::timeout(Duration::from_secs(2), link.driver).await {
            return Err(e);
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok(summary)
}

/// One MQTT connection and the task driving it.
struct Link {
    client: AsyncClient,
    driver: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Link {
    /// Connects and returns once the broker accepted (CONNACK), counting PUBACKs in
    /// `acked`.
    async fn open(
        broker: &MqttEndpoint,
        client_id: &str,
        credentials: Option<(String, String)>,
        acked: Arc<AtomicU64>,
    ) -> anyhow::Result<Self> {
        let mut options = MqttOptions::new(client_id, &broker.host, broker.port);
        options
            .set_keep_alive(Duration::from_secs(15))
            .set_clean_session(true)
            // An edge node acknowledges a reading once stored: a link keeps the broker's
            // log fed while earlier readings are stored only with more in flight than
            // the consumer takes at once (1,000). Measured (debug build, one link,
            // 40,000 readings into an edge node): 1,000 in flight stored ~22,000/s,
            // 4,000 ~27,000/s.
            .set_inflight(4000)
            .set_max_packet_size(4 * 1024 * 1024, 4 * 1024 * 1024)
            .set_request_channel_capacity(1024);
        if let Some((user, pass)) = credentials {
            options.set_credentials(user, pass);
        }
        let (client, mut eventloop) = AsyncClient::new(options, 1024);
        let connected = Arc::new(tokio::sync::Notify::new());
        let mut driver = {
            let connected = connected.clone();
            tokio::spawn(async move {
                loop {
                    match eventloop.poll().await {
                        Ok(Event::Incoming(Packet::ConnAck(_))) => connected.notify_one(),
                        Ok(Event::Incoming(Packet::PubAck(_))) => {
                            acked.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Event::Outgoing(Outgoing::Disconnect)) => return Ok(()),
                        Ok(_) => {}
                        Err(e) => {
                            return Err(anyhow::Error::new(e).context("MQTT connection failed"))
                        }
                    }
                }
            })
        };
        tokio::select! {
            _ = connected.notified() => Ok(Self { client, driver }),
            r = &mut driver => Err(r.map_err(anyhow::Error::new).and_then(|r| r).err()
                .unwrap_or_else(|| anyhow::anyhow!("the MQTT connection closed"))),
            _ = tokio::time::sleep(Duration::from_secs(10)) => {
                driver.abort();
                anyhow::bail!("no CONNACK from {}:{} within 10 s", broker.host, broker.port)
            }
        }
    }
}

fn progress_bar(config: &SimConfig) -> Option<ProgressBar> {
    if !config.progress {
        return None;
    }
    let bar = match config.count {
        Some(n) => ProgressBar::new(n),
        None => ProgressBar::no_length(),
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} msgs {per_sec}",
        )
        .expect("a valid template"),
    );
    Some(bar)
}
