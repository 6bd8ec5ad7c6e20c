//! The ingest path measured from outside: fixtures, a QoS 1 publisher, the consumer
//! binary end to end. Shared by `bench-ingest` and `bench-store`.

use std::{
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use mongodb::bson::Document;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use termopar_broker::BrokerSettings;
use termopar_core::{
    ids::{ClientId, SensorId},
    reading::{parse_message, Limits, Reading},
    settings::MqttEndpoint,
    store::ReadingStore,
    topic::Topics,
};
use test_support::{free_port, ChildGuard, TestDb, TestMongo};
use uuid::Uuid;

use crate::{peak_rss_mib, sibling_binary};

/// Sensors of the ingest fixture.
pub const SENSORS: usize = 100;

/// Fresh stores with one client and its sensors.
pub struct Fixture {
    /// PostgreSQL.
    pub db: TestDb,
    /// The document store.
    pub mongo: TestMongo,
    /// The reading store over both.
    pub store: ReadingStore,
    /// The client.
    pub client: ClientId,
    /// Its sensors.
    pub sensors: Vec<SensorId>,
}

impl Fixture {
    pub async fn new() -> anyhow::Result<Self> {
        let db = TestDb::new().await;
        let mongo = TestMongo::new();
        let store = ReadingStore::new(db.pool.clone(), &mongo.database().await);
        let (client, sensors) = db.client_with_sensors(SENSORS).await;
        Ok(Self {
            db,
            mongo,
            store,
            client,
            sensors,
        })
    }

    /// `messages` payloads of `batch` readings each, spread over the sensors, with
    /// timestamps one second apart per sensor starting a day ago.
    pub fn messages(&self, messages: usize, batch: usize) -> Vec<(String, Vec<u8>)> {
        let topics = Topics::new("");
        let start = Utc::now() - chrono::Duration::days(1);
        (0..messages)
            .map(|m| {
                let sensor = self.sensors[m % SENSORS];
                let readings: Vec<serde_json::Value> = (0..batch)
                    .map(|i| {
                        let seq = (m / SENSORS * batch + i) as i64;
                        serde_json::json!({
                            "id": Uuid::new_v4(),
                            "ts": (start + chrono::Duration::seconds(seq)).to_rfc3339(),
                            "temperature": 20.0 + (seq % 100) as f64 / 10.0,
                        })
                    })
                    .collect();
                (
                    topics.readings(self.client, sensor),
                    serde_json::to_vec(&readings).unwrap(),
                )
            })
            .collect()
    }

    pub fn readings(&self, messages: &[(String, Vec<u8>)]) -> Vec<Reading> {
        let topics = Topics::new("");
        messages
            .iter()
            .flat_map(|(topic, payload)| {
                let (client, sensor) = topics.parse(topic).unwrap();
                parse_message(payload, sensor, client, Utc::now(), &Limits::default())
                    .unwrap()
                    .readings
            })
            .collect()
    }
}

/// MongoDB alone: unordered insert_many of the same documents, 1000 at a time.
pub async fn raw_mongo_rate(readings: &[Reading]) -> anyhow::Result<f64> {
    let mongo = TestMongo::new();
    let db = mongo.database().await;
    let coll = db.collection::<Document>("readings");
    coll.create_index(
        mongodb::IndexModel::builder()
            .keys(mongodb::bson::doc! {"sensor_id": 1, "ts": -1, "_id": -1})
            .build(),
    )
    .await?;
    let docs: Vec<Document> = readings
        .iter()
        .map(|r| {
            mongodb::bson::doc! {
                "_id": r.id.to_string(), "sensor_id": r.sensor_id.to_string(), "client_id": r.client_id.to_string(),
                "ts": mongodb::bson::DateTime::from_millis(r.ts.timestamp_millis()), "temperature": r.temperature.get(),
                "received_at": mongodb::bson::DateTime::from_millis(r.received_at.timestamp_millis()),
                "batch": "b", "extra": {},
            }
        })
        .collect();
    let started = Instant::now();
    for chunk in docs.chunks(1000) {
        coll.insert_many(chunk).ordered(false).await?;
    }
    Ok(readings.len() as f64 / started.elapsed().as_secs_f64())
}

/// Our write path alone (ReadingStore::store), `per_call` readings a call, `at_once`
/// calls at a time (in order of start), as the consumer makes them.
pub async fn ingest_store_rate(
    fixture: &Fixture,
    readings: &[Reading],
    per_call: usize,
    at_once: usize,
) -> anyhow::Result<f64> {
    use futures::{StreamExt, TryStreamExt};
    let started = Instant::now();
    futures::stream::iter(readings.chunks(per_call))
        .map(|chunk| fixture.store.store(chunk))
        .buffered(at_once.max(1))
        .try_collect::<Vec<_>>()
        .await?;
    Ok(readings.len() as f64 / started.elapsed().as_secs_f64())
}

/// Publishes every message with QoS 1, as fast as the broker acknowledges.
pub async fn publish_all(
    endpoint: &MqttEndpoint,
    messages: Vec<(String, Vec<u8>)>,
    pace: Option<f64>,
) -> anyhow::Result<()> {
    let mut options = MqttOptions::new(
        format!("bench-pub-{}", Uuid::new_v4().simple()),
        &endpoint.host,
        endpoint.port,
    );
    options
        .set_inflight(100)
        .set_max_packet_size(1 << 22, 1 << 22)
        .set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(options, 1000);
    let acked = Arc::new(AtomicU64::new(0));
    let acked2 = acked.clone();
    let driver = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    acked2.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    let total = messages.len() as u64;
    let started = Instant::now();
    for (i, (topic, payload)) in messages.into_iter().enumerate() {
        if let Some(rate) = pace {
            let due = started + Duration::from_secs_f64(i as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
        }
        let payload = match pace {
            // Paced runs measure latency: stamp the readings with the publish time.
            Some(_) => restamp(&payload, Utc::now()),
            None => payload,
        };
        client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await?;
    }
    while acked.load(Ordering::Relaxed) < total {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), driver).await;
    Ok(())
}

pub fn restamp(payload: &[u8], now: DateTime<Utc>) -> Vec<u8> {
    let mut readings: Vec<serde_json::Value> = serde_json::from_slice(payload).unwrap();
    for r in &mut readings {
        r["ts"] =
            serde_json::Value::String(now.to_rfc3339_opts(chrono::SecondsFormat::Micros, true));
    }
    serde_json::to_vec(&readings).unwrap()
}

/// Reads a counter from a consumer's /metrics.
pub async fn counter(port: u16, name: &str) -> Option<f64> {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// End to end through the real consumer binary: readings/s and its peak RSS.
pub async fn end_to_end(
    fixture: &Fixture,
    messages: Vec<(String, Vec<u8>)>,
    readings: u64,
) -> anyhow::Result<(f64, f64)> {
    let broker = termopar_broker::start(&BrokerSettings::ephemeral(), None).await?;
    let metrics_port = free_port();
    let child = Command::new(sibling_binary("termopar-consumer")?)
        .env("DATABASE_URL", &fixture.db.url)
        .env("MONGODB_URI", &fixture.mongo.settings.uri)
        .env("MONGODB_DB", &fixture.mongo.settings.database)
        .env("MQTT_URL", broker.url())
        .env(
            "MQTT_CLIENT_ID",
            format!("bench-consumer-{}", Uuid::new_v4().simple()),
        )
        .env("CONSUMER_METRICS_ADDR", format!("127.0.0.1:{metrics_port}"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()?;
    let pid = child.id();
    let _guard = ChildGuard(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while counter(metrics_port, "consumer_subscribed").await != Some(1.0) {
        anyhow::ensure!(Instant::now() < deadline, "the consumer did not subscribe");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let endpoint = MqttEndpoint::parse(&broker.url())?;
    let started = Instant::now();
    let publisher = tokio::spawn(async move { publish_all(&endpoint, messages, None).await });
    loop {
        if counter(metrics_port, "readings_stored_total")
            .await
            .unwrap_or(0.0) as u64
            >= readings
        {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "end to end did not finish"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rate = readings as f64 / started.elapsed().as_secs_f64();
    publisher.await??;
    Ok((rate, peak_rss_mib(pid).unwrap_or(f64::NAN)))
}
