//! End to end: simulator → embedded broker → consumer → MongoDB and PostgreSQL, in one
//! edge process, with the API provisioning the sensors.

use std::time::Duration;

use mongodb::bson::{doc, Document};
use secrecy::SecretString;
use termopar::{Edge, EdgeSettings};
use termopar_api::settings::{AuthSettings, BootstrapAdmin};
use termopar_broker::BrokerSettings;
use termopar_consumer::ConsumerSettings;
use termopar_core::{settings::MqttEndpoint, topic::Topics};
use termopar_device_sim::SimConfig;
use test_support::{eventually, TestDb, TestMongo};
use uuid::Uuid;

fn edge_settings(db: &TestDb, mongo: &TestMongo) -> EdgeSettings {
    let mut broker = BrokerSettings::ephemeral();
    broker.require_auth = true;
    broker.service = Some(("sim".into(), SecretString::from("sim-password-1")));
    let consumer = ConsumerSettings::new(
        MqttEndpoint::parse("mqtt://127.0.0.1:1").unwrap(),
        format!("edge-{}", Uuid::new_v4().simple()),
    );
    EdgeSettings {
        api: termopar_api::Settings {
            addr: "127.0.0.1:0".parse().unwrap(),
            database: db.settings(),
            mongo: mongo.settings.clone(),
            auth: AuthSettings {
                jwt_secret: SecretString::from("edge-test-secret-of-at-least-32-bytes"),
                access_ttl: Duration::from_secs(600),
                refresh_ttl: Duration::from_secs(3600),
                user_cache_ttl: Duration::from_secs(30),
            },
            bootstrap_admin: Some(BootstrapAdmin {
                email: "admin@edge.test".into(),
                password: SecretString::from("edge-admin-pw"),
            }),
            max_body_bytes: 1 << 20,
            ready_broker: None,
            latest_cache_ttl: std::time::Duration::from_secs(1),
            store: termopar_core::store::Tuning::default(),
            webhook: Default::default(),
            tracking: Default::default(),
            leads: Default::default(),
            console: Default::default(),
        },
        broker,
        consumer,
    }
}

/// An edge node serving until [`Node::stop`].
struct Node {
    /// `http://addr` of its API.
    base: String,
    /// Its MQTT front door.
    broker: termopar_broker::RunningBroker,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Node {
    async fn start(settings: EdgeSettings) -> Self {
        let edge = Edge::start(settings).await.unwrap();
        let base = format!("http://{}", edge.app.addr());
        let broker = edge.broker.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(edge.run_until(async move {
            let _ = stopped.await;
        }));
        Self {
            base,
            broker,
            stop,
            task,
        }
    }

    /// The MQTT port, for clients.
    fn mqtt(&self) -> MqttEndpoint {
        MqttEndpoint::parse(&self.broker.url()).unwrap()
    }

    /// SIGTERM's path: returns once the node has drained and stopped.
    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap().unwrap();
    }
}

/// Readings the broker acknowledged, by id.
type Acked = std::sync::Arc<std::sync::Mutex<Vec<Uuid>>>;

/// One QoS 1 publisher per sensor through the node's front door (see
/// [`publish_until_closed`]), each ending when the front closes.
fn publish_from_each(
    node: &Node,
    sensors: &[termopar_device_sim::SimSensor],
    every: Duration,
) -> (Acked, Vec<tokio::task::JoinHandle<()>>) {
    let acked = Acked::default();
    let publishers = sensors
        .iter()
        .map(|s| {
            tokio::spawn(publish_until_closed(
                node.mqtt(),
                s.clone(),
                acked.clone(),
                every,
            ))
        })
        .collect();
    (acked, publishers)
}

/// Publishes readings of `sensor` until the node stored one: from then on its consumer's
/// subscription is in place.
async fn wait_until_subscribed(node: &Node, sensor: &termopar_device_sim::SimSensor, db: &TestDb) {
    let warmup = tokio::spawn(publish_until_closed(
        node.mqtt(),
        sensor.clone(),
        std::sync::Arc::default(),
        Duration::ZERO,
    ));
    eventually(
        "the edge consumer subscribed",
        Duration::from_secs(20),
        || async { (test_support::stored_count(&db.pool).await > 0).then_some(()) },
    )
    .await;
    warmup.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulator_feeds_both_stores_through_an_edge_node() {
    let db = TestDb::new().await;
    let mongo = TestMongo::new();
    let node = Node::start(edge_settings(&db, &mongo)).await;
    let (api, broker) = (node.base.clone(), node.broker.clone());

    let sensors =
        termopar_device_sim::provision(&api, "admin@edge.test", "edge-admin-pw", 2, false)
            .await
            .unwrap();
    assert_eq!(sensors.len(), 4, "two clients with two sensors each");
    // Provisioning again reuses what exists (here with new device secrets).
    let again = termopar_device_sim::provision(&api, "admin@edge.test", "edge-admin-pw", 2, true)
        .await
        .unwrap();
    assert_eq!(
        again.iter().map(|s| s.sensor_id).collect::<Vec<_>>(),
        sensors.iter().map(|s| s.sensor_id).collect::<Vec<_>>()
    );

    let store_db = mongo.database().await;
    // The consumer subscribes right after start; wait until a first message gets through.
    let config = |count, bad_ratio, seed| SimConfig {
        rate: 500.0,
        count: Some(count),
        batch: 3,
        bad_ratio,
        seed,
        ..SimConfig::new(
            MqttEndpoint::parse(&broker.url())
                .unwrap()
                .with_credentials("sim", "sim-password-1"),
            Topics::new(""),
            sensors.clone(),
        )
    };
    let warmup = eventually(
        "the edge consumer subscribed",
        Duration::from_secs(20),
        || async {
            let s = termopar_device_sim::run(config(1, 0.0, 0)).await.unwrap();
            let n = test_support::stored_count(&db.pool).await;
            (n > 0).then_some(s)
        },
    )
    .await;
    let before = test_support::stored_count(&db.pool).await;

    let summary = termopar_device_sim::run(config(300, 0.1, 7)).await.unwrap();
    assert_eq!(summary.acked, 300);
    assert!(summary.bad > 0);
    // Each of them, not a count: a warm-up reading may land after `before` was taken.
    eventually("every reading stored", Duration::from_secs(30), || async {
        let stored = test_support::stored_readings(&db.pool, &store_db).await;
        let ids: std::collections::HashSet<Uuid> = stored.iter().map(|r| r.id).collect();
        (test_support::stored_count(&db.pool).await >= before + summary.readings
            && summary.reading_ids.iter().all(|id| ids.contains(id)))
        .then_some(())
    })
    .await;
    let dead = store_db.collection::<Document>("dead_letters");
    eventually(
        "every bad message dead-lettered",
        Duration::from_secs(30),
        || async { (dead.count_documents(doc! {}).await.unwrap() >= summary.bad).then_some(()) },
    )
    .await;

    let stored = test_support::stored_readings(&db.pool, &store_db).await;
    let mut ids: Vec<String> = stored.iter().map(|r| r.id.to_string()).collect();
    ids.sort();
    // Warm-up attempts before the subscription may or may not have arrived; the last one
    // did.
    assert!(ids.len() > summary.readings as usize);
    assert!(ids
        .binary_search(&warmup.reading_ids[0].to_string())
        .is_ok());
    for id in summary.reading_ids.iter().map(Uuid::to_string) {
        assert!(ids.binary_search(&id).is_ok(), "reading {id} missing");
    }
    assert_eq!(dead.count_documents(doc! {}).await.unwrap(), summary.bad);
    let bucket_total: i64 = sqlx::query_scalar("SELECT sum(count)::bigint FROM reading_buckets")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(bucket_total as usize, stored.len());
    let latest: i64 = sqlx::query_scalar("SELECT count(*) FROM sensor_latest")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(latest, 4);

    // Each sensor as its own device, with its own secret, through the device ACL.
    assert!(again.iter().all(|s| s.secret.is_some()));
    let before = test_support::stored_count(&db.pool).await;
    let fleet = termopar_device_sim::run(SimConfig {
        per_device: true,
        sensors: again.clone(),
        ..config(100, 0.0, 11)
    })
    .await
    .unwrap();
    assert_eq!(fleet.acked, 100);
    eventually(
        "every device's reading stored",
        Duration::from_secs(30),
        || async {
            (test_support::stored_count(&db.pool).await == before + fleet.readings).then_some(())
        },
    )
    .await;
    assert_eq!(broker.stats().publishes_refused, 0);

    let ready: serde_json::Value = reqwest::get(format!("{api}/ready"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["checks"]["mqtt"], "ok", "{ready}");

    // The edge node's single /metrics shows the broker, the consumer and the store.
    let metrics = reqwest::get(format!("{api}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "readings_stored_total",
        "readings_rejected_total",
        "consumer_messages_received_total",
        "mqtt_broker_connects_total",
        "ingest_store_seconds",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }

    node.stop().await;
}

#[test]
fn edge_mode_refuses_a_share_group_on_the_embedded_broker() {
    let db_settings =
        termopar_core::settings::DatabaseSettings::with_url("postgres://x@127.0.0.1/x");
    let mut settings = EdgeSettings {
        api: termopar_api::Settings {
            addr: "127.0.0.1:0".parse().unwrap(),
            database: db_settings,
            mongo: termopar_core::settings::MongoSettings {
                uri: "mongodb://127.0.0.1".into(),
                database: "x".into(),
            },
            auth: AuthSettings {
                jwt_secret: SecretString::from("x".repeat(32)),
                access_ttl: Duration::from_secs(1),
                refresh_ttl: Duration::from_secs(1),
                user_cache_ttl: Duration::from_secs(1),
            },
            bootstrap_admin: None,
            max_body_bytes: 1 << 20,
            ready_broker: None,
            latest_cache_ttl: std::time::Duration::from_secs(1),
            store: termopar_core::store::Tuning::default(),
            webhook: Default::default(),
            tracking: Default::default(),
            leads: Default::default(),
            console: Default::default(),
        },
        broker: BrokerSettings::ephemeral(),
        consumer: ConsumerSettings::new(MqttEndpoint::parse("mqtt://127.0.0.1:1").unwrap(), "c"),
    };
    assert!(settings.validate().is_ok());
    settings.consumer.share_group = Some("ingest".into());
    let err = settings.validate().unwrap_err().to_string();
    assert!(err.contains("rumqttd"), "{err}");
}

#[tokio::test]
async fn the_migrate_command_moves_readings_of_the_previous_shape() {
    let db = TestDb::new().await;
    let mongo = TestMongo::new();
    let (client, sensors) = db.client_with_sensors(1).await;
    let (client, sensor) = (client.0, sensors[0].0);
    let store_db = mongo.database().await;
    let t0 = mongodb::bson::DateTime::parse_rfc3339_str("2026-02-01T00:00:00Z").unwrap();
    let legacy: Vec<Document> = (0..25)
        .map(|i| {
            doc! {
                "_id": Uuid::new_v4().to_string(), "sensor_id": sensor.to_string(),
                "client_id": client.to_string(),
                "ts": mongodb::bson::DateTime::from_millis(t0.timestamp_millis() + i * 60_000),
                "temperature": i as f64, "received_at": t0, "batch": Uuid::new_v4().to_string(),
                "extra": {},
            }
        })
        .collect();
    store_db
        .collection::<Document>("readings")
        .insert_many(legacy)
        .await
        .unwrap();

    let output = std::process::Command::new(env!("CARGO_BIN_EXE_termopar"))
        .arg("migrate")
        .env("DATABASE_URL", &db.url)
        .env("MONGODB_URI", &mongo.settings.uri)
        .env("MONGODB_DB", &mongo.settings.database)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run termopar migrate");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("25 readings moved"), "{stdout}");
    assert_eq!(test_support::stored_count(&db.pool).await, 25);
    assert_eq!(
        test_support::stored_readings(&db.pool, &store_db)
            .await
            .len(),
        25
    );
    let count: i64 = sqlx::query_scalar("SELECT count FROM sensor_latest WHERE sensor_id = $1")
        .bind(sensor)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(count, 25);
}

/// Publishes readings of `sensor` over QoS 1 through `broker`, one at a time (at most
/// one per `every`, when not zero), recording each reading whose PUBACK came; returns
/// when the connection ends.
async fn publish_until_closed(
    broker: MqttEndpoint,
    sensor: termopar_device_sim::SimSensor,
    acked: std::sync::Arc<std::sync::Mutex<Vec<Uuid>>>,
    every: Duration,
) {
    use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
    let mut options = MqttOptions::new(
        format!("pub-{}", Uuid::new_v4().simple()),
        &broker.host,
        broker.port,
    );
    options
        .set_keep_alive(Duration::from_secs(15))
        .set_credentials("sim", "sim-password-1");
    let (client, mut eventloop) = AsyncClient::new(options, 16);
    let topic = Topics::new("").readings(sensor.client_id, sensor.sensor_id);
    let start = chrono::Utc::now() - chrono::Duration::hours(1);
    let mut pace = (!every.is_zero()).then(|| tokio::time::interval(every));
    for k in 0.. {
        if let Some(pace) = &mut pace {
            pace.tick().await;
        }
        let id = Uuid::new_v4();
        let ts = start + chrono::Duration::milliseconds(k);
        let payload = serde_json::json!({"id": id, "ts": ts.to_rfc3339(), "temperature": 4.5});
        if client
            .publish(&topic, QoS::AtLeastOnce, false, payload.to_string())
            .await
            .is_err()
        {
            return;
        }
        let mut pkid = None;
        loop {
            match eventloop.poll().await {
                Ok(Event::Outgoing(Outgoing::Publish(p))) => pkid = Some(p),
                Ok(Event::Incoming(Packet::PubAck(ack))) if Some(ack.pkid) == pkid => {
                    acked.lock().unwrap().push(id);
                    break;
                }
                Ok(_) => {}
                Err(_) => return, // the front door closed
            }
        }
    }
}

/// A device publishing `sensor`'s readings with QoS 1 as fast as the broker takes them,
/// up to `window` unacknowledged, recording each acknowledged reading in `acked`:
/// `total` readings (without end when `None`). When `resend`, a lost connection is opened
/// again and every reading not acknowledged is published again first, as a device does
/// when its broker went away, until all are acknowledged; otherwise it returns when the
/// connection ends. Returns the readings it published.
async fn publish_window(
    broker: MqttEndpoint,
    sensor: termopar_device_sim::SimSensor,
    window: u16,
    total: Option<usize>,
    resend: bool,
    acked: Acked,
) -> Vec<Uuid> {
    use std::collections::{HashMap, VecDeque};

    use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
    let topic = Topics::new("").readings(sensor.client_id, sensor.sensor_id);
    let start = chrono::Utc::now() - chrono::Duration::hours(1);
    let mut made = 0usize;
    let mut published = Vec::new();
    // Readings to publish next, those resent first.
    let mut todo: VecDeque<(Uuid, String)> = VecDeque::new();
    loop {
        let mut options = MqttOptions::new(
            format!("win-{}", sensor.sensor_id.0.simple()),
            &broker.host,
            broker.port,
        );
        options
            .set_keep_alive(Duration::from_secs(15))
            .set_credentials("sim", "sim-password-1")
            .set_inflight(window);
        let (client, mut eventloop) = AsyncClient::new(options, window as usize + 1);
        // Published on this connection: waiting for a packet id, then for the PUBACK.
        let mut queued: VecDeque<(Uuid, String)> = VecDeque::new();
        let mut sent: HashMap<u16, (Uuid, String)> = HashMap::new();
        let mut connected = false;
        loop {
            while connected && queued.len() + sent.len() < window as usize {
                let next = todo.pop_front().or_else(|| {
                    (total.is_none_or(|t| made < t)).then(|| {
                        let id = Uuid::new_v4();
                        let ts = start + chrono::Duration::milliseconds(made as i64);
                        made += 1;
                        published.push(id);
                        let payload =
                            serde_json::json!({"id": id, "ts": ts.to_rfc3339(), "temperature": 4.5});
                        (id, payload.to_string())
                    })
                });
                let Some((id, payload)) = next else { break };
                client
                    .try_publish(&topic, QoS::AtLeastOnce, false, payload.clone())
                    .expect("the request channel holds a window");
                queued.push_back((id, payload));
            }
            if total.is_some_and(|t| made == t)
                && todo.is_empty()
                && queued.is_empty()
                && sent.is_empty()
            {
                let _ = client.disconnect().await;
                return published;
            }
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => connected = true,
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                    let reading = queued.pop_front().expect("a publish was queued");
                    sent.insert(pkid, reading);
                }
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    if let Some((id, _)) = sent.remove(&ack.pkid) {
                        acked.lock().unwrap().push(id);
                    }
                }
                Ok(_) => {}
                Err(_) if !resend => return published,
                Err(_) => break,
            }
        }
        // Not acknowledged: published again on the next connection, oldest first.
        let again: Vec<(Uuid, String)> = sent.into_values().chain(queued).collect();
        for reading in again.into_iter().rev() {
            todo.push_front(reading);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The node's warnings go to the output of the test that caused them (libtest shows it
/// when the test fails; a test's runtime threads inherit its capture).
fn warnings_in_test_output() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_ansi(false)
        .with_max_level(tracing::Level::WARN)
        .try_init();
}

/// SIGTERM's path under MQTT load: every reading the broker acknowledged to a device is
/// stored, once, when the edge node has stopped, although the consumer was still behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_under_mqtt_load_stores_every_acknowledged_reading() {
    warnings_in_test_output();
    let started = std::time::Instant::now();
    let db = TestDb::new().await;
    let mongo = TestMongo::new();
    let node = Node::start(edge_settings(&db, &mongo)).await;
    let sensors =
        termopar_device_sim::provision(&node.base, "admin@edge.test", "edge-admin-pw", 2, false)
            .await
            .unwrap();
    wait_until_subscribed(&node, &sensors[0], &db).await;

    let (acked, publishers) = publish_from_each(&node, &sensors, Duration::ZERO);
    eventually(
        "readings acknowledged under load",
        Duration::from_secs(30),
        || async { (acked.lock().unwrap().len() >= 400).then_some(()) },
    )
    .await;
    eprintln!("{:?}: stopping the node", started.elapsed());
    node.stop().await;
    eprintln!("{:?}: the node stopped", started.elapsed());
    for p in publishers {
        p.await.unwrap();
    }
    eprintln!("{:?}: the publishers ended", started.elapsed());

    let acked = acked.lock().unwrap().clone();
    assert_acknowledged_stored_once(&db, &mongo.database().await, &acked).await;
}

/// Every acknowledged reading is stored, none twice, and the index counts what is
/// stored; returns how many are.
async fn assert_acknowledged_stored_once(
    db: &TestDb,
    documents: &mongodb::Database,
    acked: &[Uuid],
) -> usize {
    let total = assert_acknowledged_stored(db, documents, acked).await;
    let counted = test_support::stored_count(&db.pool).await;
    assert_eq!(counted as usize, total, "the index counts what is stored");
    total
}

/// Every acknowledged reading is stored and none twice (the index may still count a
/// write a killed process left pending, until it is recovered); returns how many are.
async fn assert_acknowledged_stored(
    db: &TestDb,
    documents: &mongodb::Database,
    acked: &[Uuid],
) -> usize {
    let stored = test_support::stored_readings(&db.pool, documents).await;
    let mut ids: Vec<Uuid> = stored.iter().map(|r| r.id).collect();
    ids.sort();
    let total = ids.len();
    ids.dedup();
    assert_eq!(ids.len(), total, "a reading stored twice");
    let lost: Vec<_> = acked
        .iter()
        .filter(|id| ids.binary_search(id).is_err())
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged readings lost: {:?}",
        lost.len(),
        acked.len(),
        &lost[..lost.len().min(5)]
    );
    total
}

mod backup;
mod bridge;
mod console;
mod dashboard;
mod faults;
mod kill;
