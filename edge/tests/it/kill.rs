//! The edge node killed with SIGKILL, again and again, while devices publish with QoS 1:
//! whatever a device was acknowledged is stored at the moment of each kill, devices
//! resend the rest, and in the end every reading is stored exactly once.

use std::time::Duration;

use termopar_core::settings::MqttEndpoint;
use test_support::{eventually, free_port, ChildGuard, TestDb, TestMongo};
use uuid::Uuid;

use crate::{assert_acknowledged_stored, assert_acknowledged_stored_once, publish_window, Acked};

const ADMIN: (&str, &str) = ("admin@kill.test", "kill-admin-password");

fn node(db: &TestDb, mongo: &TestMongo, ports: (u16, u16)) -> ChildGuard {
    ChildGuard(
        test_support::edge_node(env!("CARGO_BIN_EXE_termopar"), db, mongo, ports, ADMIN)
            .env("MQTT_AUTH", "devices")
            .env("MQTT_USERNAME", "sim")
            .env("MQTT_PASSWORD", "sim-password-1")
            .spawn()
            .expect("run termopar"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_edge_node_under_qos_1_loses_no_acknowledged_reading() {
    // Sensors per client (the simulator provisions two clients).
    const SENSORS: usize = 4;
    const EACH: usize = 2_000;
    let (db, mongo) = (TestDb::new().await, TestMongo::new());
    let ports = (free_port(), free_port());
    let base = format!("http://127.0.0.1:{}", ports.0);
    let mut running = node(&db, &mongo, ports);
    test_support::wait_until_healthy(ports.0).await;
    let sensors = termopar_device_sim::provision(&base, ADMIN.0, ADMIN.1, SENSORS, false)
        .await
        .unwrap();
    let mqtt = MqttEndpoint::parse(&format!("mqtt://127.0.0.1:{}", ports.1)).unwrap();

    let acked = Acked::default();
    let devices: Vec<_> = sensors
        .iter()
        .map(|s| {
            tokio::spawn(publish_window(
                mqtt.clone(),
                s.clone(),
                50,
                Some(EACH),
                true,
                acked.clone(),
            ))
        })
        .collect();
    let documents = mongo.database().await;
    let mut kills = Vec::new();
    for _ in 0..3 {
        let before = acked.lock().unwrap().len();
        eventually(
            "readings acknowledged between kills",
            Duration::from_secs(60),
            || async { (acked.lock().unwrap().len() >= before + 1_000).then_some(()) },
        )
        .await;
        running.kill();
        // Everything acknowledged up to the kill is stored, now (the write the kill
        // interrupted, acknowledged to nobody, is recovered after the restart).
        let at_kill = acked.lock().unwrap().clone();
        let stored = assert_acknowledged_stored(&db, &documents, &at_kill).await;
        kills.push((at_kill.len(), stored));
        running = node(&db, &mongo, ports);
    }
    let mut published = Vec::new();
    for device in devices {
        published.extend(
            tokio::time::timeout(Duration::from_secs(180), device)
                .await
                .expect("every reading acknowledged after the kills")
                .unwrap(),
        );
    }
    let acked = acked.lock().unwrap().clone();
    eventually(
        // (after `CONSUMER_RECOVER_AFTER_SECS`, 30 s: shorter, a store call slowed by a
        // loaded machine is taken for an interrupted one)
        "the writes the kills interrupted recovered",
        Duration::from_secs(120),
        || async {
            let pending: i64 =
                sqlx::query_scalar("SELECT count(*) FROM raw_doc_expiry WHERE pending_write")
                    .fetch_one(&db.pool)
                    .await
                    .unwrap();
            (pending == 0).then_some(())
        },
    )
    .await;
    let stored = assert_acknowledged_stored_once(&db, &documents, &acked).await;
    let mut ids: Vec<Uuid> = test_support::stored_readings(&db.pool, &documents)
        .await
        .iter()
        .map(|r| r.id)
        .collect();
    ids.sort();
    published.sort();
    // The subscription check of `provision` published nothing: what is stored is exactly
    // what the devices published.
    assert_eq!(
        ids, published,
        "every published reading stored exactly once"
    );
    drop(running);
    eprintln!(
        "edge SIGKILL under QoS 1: {} readings published by {} devices, acknowledged \
         and stored at each kill (acknowledged, stored): {kills:?}; in the end {} acknowledged, \
         {stored} stored, lost 0, twice 0",
        published.len(),
        sensors.len(),
        acked.len()
    );
}
