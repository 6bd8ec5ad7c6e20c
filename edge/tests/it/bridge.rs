//! The container stack's topology without containers: devices publish to termopar's
//! broker, a Mosquitto bridge (ops/mosquitto/mosquitto.conf) takes every reading from it,
//! and two consumers share them in one group on Mosquitto.

use std::{io::Write, os::unix::fs::MetadataExt, process::Command, time::Duration};

use termopar_broker::BrokerSettings;
use termopar_consumer::{Consumer, ConsumerSettings};
use termopar_core::{
    directory::SensorDirectory, settings::MqttEndpoint, store::ReadingStore, topic::Topics,
};
use test_support::{eventually, free_port, ChildGuard, TestDb, TestMongo};
use uuid::Uuid;

/// ops/mosquitto/mosquitto.conf for a private Mosquitto on `port` bridging from
/// `broker`: the stack's file with its placeholders, port and data directory filled in.
fn bridge_config(port: u16, broker: std::net::SocketAddr, dir: &std::path::Path) -> String {
    let stack = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../ops/mosquitto/mosquitto.conf"
    ))
    .unwrap();
    let mut config = stack
        .replace("@MQTT_USERNAME@", "sim")
        .replace("@MQTT_PASSWORD@", "sim-password-1")
        .replace("listener 1883", &format!("listener {port} 127.0.0.1"))
        .replace("address broker:1883", &format!("address {broker}"))
        .replace(
            "persistence_location /mosquitto/data/",
            &format!("persistence_location {}/", dir.display()),
        );
    assert!(config.contains(&format!("address {broker}")), "{config}");
    // As root, Mosquitto would drop to a `mosquitto` user that cannot write `dir`.
    if std::fs::metadata("/proc/self").unwrap().uid() == 0 {
        config.push_str("\nuser root\n");
    }
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_reach_two_consumers_in_a_share_group_through_a_mosquitto_bridge() {
    let (db, mongo) = (TestDb::new().await, TestMongo::new());
    let directory = SensorDirectory::new(db.pool.clone());
    let mut settings = BrokerSettings::ephemeral();
    settings.require_auth = true;
    settings.service = Some(("sim".into(), secrecy::SecretString::from("sim-password-1")));
    let broker = termopar_broker::start(&settings, Some(directory.clone()))
        .await
        .unwrap();

    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("bridge-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let port = free_port();
    let conf = dir.join("mosquitto.conf");
    std::fs::write(&conf, bridge_config(port, broker.addr, &dir)).unwrap();
    let _mosquitto = ChildGuard(
        Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stderr(std::fs::File::create(dir.join("mosquitto.log")).unwrap())
            .spawn()
            .expect("mosquitto is installed (make services)"),
    );
    eventually(
        "the bridge connected to termopar's broker",
        Duration::from_secs(20),
        || async { (broker.stats().connects_accepted > 0).then_some(()) },
    )
    .await;

    let store =
        ReadingStore::with_tuning(db.pool.clone(), &mongo.database().await, Default::default());
    let mosquitto = MqttEndpoint::parse(&format!("mqtt://127.0.0.1:{port}")).unwrap();
    let mut stops = Vec::new();
    let mut runs = Vec::new();
    for n in 0..2 {
        let mut consumer = ConsumerSettings::new(
            mosquitto.clone(),
            format!("consumer-{n}-{}", Uuid::new_v4().simple()),
        );
        consumer.share_group = Some("consumers".into());
        let consumer = Consumer::new(consumer, directory.clone(), store.clone());
        let mut subscribed = consumer.subscribed();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        runs.push(tokio::spawn(consumer.run(async move {
            let _ = stopped.await;
        })));
        stops.push(stop);
        tokio::time::timeout(Duration::from_secs(20), subscribed.wait_for(|s| *s))
            .await
            .expect("subscribed on Mosquitto")
            .unwrap();
    }

    // 300 readings published to termopar's broker (the service account may publish for
    // any sensor), with QoS 1.
    let (client, sensors) = db.client_with_sensors(3).await;
    let topics = Topics::new("");
    let t0 = chrono::Utc::now() - chrono::Duration::hours(1);
    let mut ids = Vec::new();
    for (s, sensor) in sensors.iter().enumerate() {
        let lines: String = (0..100)
            .map(|i| {
                let id = Uuid::new_v4();
                ids.push(id);
                let ts = t0 + chrono::Duration::seconds(i * 3 + s as i64);
                format!(
                    "{}\n",
                    serde_json::json!({"id": id, "ts": ts.to_rfc3339(), "temperature": 5.5})
                )
            })
            .collect();
        let mut publisher = Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &broker.addr.port().to_string()])
            .args(["-u", "sim", "-P", "sim-password-1", "-q", "1", "-l"])
            .args(["-t", &topics.readings(client, *sensor)])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        publisher
            .stdin
            .take()
            .unwrap()
            .write_all(lines.as_bytes())
            .unwrap();
        assert!(publisher.wait().unwrap().success());
    }
    eventually("every reading stored", Duration::from_secs(30), || async {
        (test_support::stored_count(&db.pool).await >= 300).then_some(())
    })
    .await;
    for stop in stops {
        stop.send(()).unwrap();
    }
    for run in runs {
        run.await.unwrap().unwrap();
    }
    let stored = test_support::stored_readings(&db.pool, &mongo.database().await).await;
    let mut stored: Vec<Uuid> = stored.iter().map(|r| r.id).collect();
    stored.sort();
    ids.sort();
    assert_eq!(stored, ids, "each reading stored once");
    assert_eq!(test_support::stored_count(&db.pool).await, 300);
}
