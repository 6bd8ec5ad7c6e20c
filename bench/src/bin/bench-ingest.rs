//! `make bench-ingest`: readings/s stored end to end (QoS 1, acknowledged after
//! persistence) against the stores' own bulk-insert rates, latency at half load, the
//! pipeline alone into a discarding sink, our broker against Mosquitto, and the
//! consumer's memory. Every number is measured in this run.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use chrono::Utc;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use termopar_bench::{
    ingest::{end_to_end, ingest_store_rate, publish_all, raw_mongo_rate, Fixture, SENSORS},
    per_sec, percentile, print_table, Row,
};
use termopar_broker::BrokerSettings;
use termopar_consumer::{Consumer, ConsumerSettings, Sink};
use termopar_core::{
    directory::SensorDirectory,
    reading::Reading,
    settings::{env_parse, MqttEndpoint},
    store::{DeadLetter, ReadingStore, StoreError, StoreOutcome},
};
use test_support::{mosquitto_endpoint, unique_prefix};
use uuid::Uuid;

/// A sink that stores through ReadingStore and records publish→stored latency.
#[derive(Clone)]
struct Timed {
    inner: ReadingStore,
    latencies: Arc<Mutex<Vec<Duration>>>,
    stored: Arc<AtomicU64>,
}

impl Sink for Timed {
    async fn store(&self, readings: &[Reading]) -> Result<StoreOutcome, StoreError> {
        let outcome = self.inner.store(readings).await?;
        let now = Utc::now();
        let mut latencies = self.latencies.lock().unwrap();
        latencies.extend(
            readings
                .iter()
                .map(|r| (now - r.ts).to_std().unwrap_or_default()),
        );
        self.stored
            .fetch_add(readings.len() as u64, Ordering::Relaxed);
        Ok(outcome)
    }
    async fn dead_letter(&self, letters: &[DeadLetter]) -> Result<(), StoreError> {
        self.inner.dead_letter(letters).await
    }
}

/// Counts and drops: the pipeline without the stores.
#[derive(Clone, Default)]
struct Discard {
    stored: Arc<AtomicU64>,
}

impl Sink for Discard {
    async fn store(&self, readings: &[Reading]) -> Result<StoreOutcome, StoreError> {
        self.stored
            .fetch_add(readings.len() as u64, Ordering::Relaxed);
        Ok(StoreOutcome {
            inserted: readings.len(),
            ..Default::default()
        })
    }
    async fn dead_letter(&self, _: &[DeadLetter]) -> Result<(), StoreError> {
        Ok(())
    }
}

/// An in-process consumer into `sink` on a fresh embedded broker; publishes the messages
/// (paced or not) and returns readings/s once `stored` reaches `readings`.
async fn in_process<S: Sink>(
    fixture: &Fixture,
    sink: S,
    stored: Arc<AtomicU64>,
    messages: Vec<(String, Vec<u8>)>,
    readings: u64,
    pace: Option<f64>,
) -> anyhow::Result<f64> {
    let broker = termopar_broker::start(&BrokerSettings::ephemeral(), None).await?;
    let endpoint = MqttEndpoint::parse(&broker.url())?;
    let settings = ConsumerSettings::new(
        endpoint.clone(),
        format!("bench-{}", Uuid::new_v4().simple()),
    );
    let consumer = Consumer::new(
        settings,
        SensorDirectory::new(fixture.db.pool.clone()),
        sink,
    );
    let mut subscribed = consumer.subscribed();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(consumer.run(async move {
        let _ = stopped.await;
    }));
    subscribed.wait_for(|s| *s).await?;
    let started = Instant::now();
    let publisher = tokio::spawn(async move { publish_all(&endpoint, messages, pace).await });
    while stored.load(Ordering::Relaxed) < readings {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "the pipeline did not finish"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rate = readings as f64 / started.elapsed().as_secs_f64();
    publisher.await??;
    let _ = stop.send(());
    task.await??;
    Ok(rate)
}

/// Messages/s through a broker alone: one QoS 1 publisher, one QoS 1 subscriber.
async fn broker_rate(
    endpoint: &MqttEndpoint,
    prefix: &str,
    payload: &[u8],
    count: u64,
) -> anyhow::Result<f64> {
    let mut options = MqttOptions::new(
        format!("bench-sub-{}", Uuid::new_v4().simple()),
        &endpoint.host,
        endpoint.port,
    );
    options
        .set_max_packet_size(1 << 22, 1 << 22)
        .set_keep_alive(Duration::from_secs(30));
    let (sub, mut eventloop) = AsyncClient::new(options, 1000);
    sub.subscribe(format!("{prefix}/#"), QoS::AtLeastOnce)
        .await?;
    let received = Arc::new(AtomicU64::new(0));
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let r2 = received.clone();
    let driver = tokio::spawn(async move {
        let mut ready = Some(ready_tx);
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(tx) = ready.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(_))) => {
                    r2.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    ready_rx.await?;
    let messages: Vec<(String, Vec<u8>)> = (0..count)
        .map(|i| (format!("{prefix}/{}", i % 100), payload.to_vec()))
        .collect();
    let started = Instant::now();
    publish_all(endpoint, messages, None).await?;
    while received.load(Ordering::Relaxed) < count {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(300),
            "the broker did not deliver everything"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rate = count as f64 / started.elapsed().as_secs_f64();
    let _ = sub.disconnect().await;
    driver.abort();
    Ok(rate)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let total: usize = env_parse("BENCH_READINGS", 100_000)?;
    let batch: usize = env_parse("BENCH_BATCH", 10)?;
    let message_count = total / batch;
    let total = (message_count * batch) as u64;
    println!("# bench-ingest: {total} readings in {message_count} QoS 1 messages of {batch}, {SENSORS} sensors");

    let fixture = Fixture::new().await?;
    let messages = fixture.messages(message_count, batch);
    let readings = fixture.readings(&messages);
    let mongo_rate = raw_mongo_rate(&readings).await?;
    eprintln!("raw MongoDB insert_many: {mongo_rate:.0}/s");
    let store_rate = ingest_store_rate(&Fixture::new().await?, &readings, 1000).await?;
    eprintln!("ReadingStore::store: {store_rate:.0}/s");

    let e2e_fixture = Fixture::new().await?;
    let (e2e_rate, rss) = end_to_end(
        &e2e_fixture,
        e2e_fixture.messages(message_count, batch),
        total,
    )
    .await?;
    eprintln!("end to end: {e2e_rate:.0}/s, consumer peak RSS {rss:.1} MiB");

    // Latency at half the end-to-end rate, for ~10 s.
    let half = e2e_rate / 2.0;
    let lat_messages = ((half * 10.0) as usize / batch).max(100);
    let lat_fixture = Fixture::new().await?;
    let timed = Timed {
        inner: lat_fixture.store.clone(),
        latencies: Default::default(),
        stored: Default::default(),
    };
    let msgs = lat_fixture.messages(lat_messages, batch);
    in_process(
        &lat_fixture,
        timed.clone(),
        timed.stored.clone(),
        msgs,
        (lat_messages * batch) as u64,
        Some(half / batch as f64),
    )
    .await?;
    let mut lat = timed.latencies.lock().unwrap().clone();
    let (p50, p99) = (percentile(&mut lat, 50.0), percentile(&mut lat, 99.0));
    eprintln!("latency at {half:.0} readings/s: p50 {p50:?} p99 {p99:?}");

    let pipe_fixture = Fixture::new().await?;
    let discard = Discard::default();
    let pipeline_rate = in_process(
        &pipe_fixture,
        discard.clone(),
        discard.stored.clone(),
        pipe_fixture.messages(message_count, batch),
        total,
        None,
    )
    .await?;
    eprintln!("pipeline alone: {pipeline_rate:.0}/s");

    let payload = &messages[0].1;
    let broker_count = (message_count as u64).min(20_000);
    let ours = termopar_broker::start(&BrokerSettings::ephemeral(), None).await?;
    let ours_rate = broker_rate(
        &MqttEndpoint::parse(&ours.url())?,
        &unique_prefix(),
        payload,
        broker_count,
    )
    .await?;
    let mosquitto_rate = broker_rate(
        &mosquitto_endpoint(),
        &unique_prefix(),
        payload,
        broker_count,
    )
    .await?;
    eprintln!("brokers: ours {ours_rate:.0} msgs/s, mosquitto {mosquitto_rate:.0} msgs/s");

    print_table(
        "Ingest (2 cores, PostgreSQL + FerretDB/SQLite on the same machine)",
        &[
            Row {
                name: "end to end, QoS 1, ack after persist (readings/s)".into(),
                value: per_sec(e2e_rate),
                baseline: format!("{} raw MongoDB insert_many", per_sec(mongo_rate)),
                ratio: Some(e2e_rate / mongo_rate),
                target: "≥ 0.70 of the store's ceiling".into(),
                met: Some(e2e_rate / mongo_rate >= 0.7),
            },
            Row {
                name: "end to end vs our store path alone".into(),
                value: per_sec(e2e_rate),
                baseline: format!(
                    "{} ReadingStore::store (journal + MongoDB + rollups)",
                    per_sec(store_rate)
                ),
                ratio: Some(e2e_rate / store_rate),
                target: "≥ 0.70".into(),
                met: Some(e2e_rate / store_rate >= 0.7),
            },
            Row {
                name: format!("publish→stored latency p50 at {} readings/s", half as u64),
                value: format!("{:.1} ms", p50.as_secs_f64() * 1e3),
                baseline: "".into(),
                ratio: None,
                target: "".into(),
                met: None,
            },
            Row {
                name: format!("publish→stored latency p99 at {} readings/s", half as u64),
                value: format!("{:.1} ms", p99.as_secs_f64() * 1e3),
                baseline: "".into(),
                ratio: None,
                target: "".into(),
                met: None,
            },
            Row {
                name: "pipeline alone: broker + consumer into a discarding sink (readings/s)"
                    .into(),
                value: per_sec(pipeline_rate),
                baseline: "30000/s".into(),
                ratio: Some(pipeline_rate / 30_000.0),
                target: "≥ 30000/s".into(),
                met: Some(pipeline_rate >= 30_000.0),
            },
            Row {
                name: format!(
                    "broker alone, QoS 1 pub → sub, {}-byte messages (msgs/s)",
                    payload.len()
                ),
                value: format!("{} embedded rumqttd", per_sec(ours_rate)),
                baseline: format!("{} Mosquitto", per_sec(mosquitto_rate)),
                ratio: Some(ours_rate / mosquitto_rate),
                target: "".into(),
                met: None,
            },
            Row::info(
                "consumer peak RSS during end to end",
                format!("{rss:.1} MiB"),
            ),
        ],
    );
    Ok(())
}
