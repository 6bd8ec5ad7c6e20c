//! The consumer against Mosquitto: a real second broker, and share groups.

use std::{process::Command, time::Duration};

use termopar_core::settings::MqttEndpoint;
use termopar_core::topic::Topics;
use termopar_device_sim::SimConfig;
use test_support::{
    eventually, free_port, mosquitto_endpoint, unique_prefix, ChildGuard, Proxy, DEFAULT_DEADLINE,
};
use uuid::Uuid;

use crate::harness::*;

#[tokio::test]
async fn the_consumer_reads_from_mosquitto() {
    let stores = Stores::new().await;
    let (client, sensors) = stores.client_with_sensors(1).await;
    let mut settings = consumer_settings(mosquitto_endpoint());
    settings.topic_prefix = unique_prefix();
    let topic = Topics::new(&settings.topic_prefix).readings(client, sensors[0].0);
    let consumer = RunningConsumer::start(settings, &stores).await;

    let ids: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
    for (i, id) in ids.iter().enumerate() {
        mosquitto_pub(
            &mosquitto_endpoint(),
            &topic,
            reading(*id, i as i64, 2.0).to_string().as_bytes(),
            1,
            "mqttv5",
        );
    }
    stores.wait_for_readings(5, DEFAULT_DEADLINE).await;
    consumer.stop().await;
    stores.assert_rollups_match_raw().await;
}

/// Draining waits for the broker, however long it is silent: a consumer whose broker
/// holds messages back is not drained, and once it sends them, the consumer is drained
/// only when every message the broker took before the drain is stored.
#[tokio::test]
async fn a_consumer_is_drained_only_once_it_stored_everything_the_broker_took_before() {
    let stores = Stores::new().await;
    let (client, sensors) = stores.client_with_sensors(1).await;
    let mosquitto = mosquitto_endpoint();
    let proxy = Proxy::start(
        format!("{}:{}", mosquitto.host, mosquitto.port)
            .parse()
            .unwrap(),
    )
    .await;
    let mut settings =
        consumer_settings(MqttEndpoint::parse(&format!("mqtt://{}", proxy.addr)).unwrap());
    settings.topic_prefix = unique_prefix();
    let topic = Topics::new(&settings.topic_prefix).readings(client, sensors[0].0);
    let consumer = RunningConsumer::start(settings, &stores).await;

    // Mosquitto takes 300 readings while nothing moves between it and the consumer.
    proxy.hold();
    let lines: String = (0..300)
        .map(|i| format!("{}\n", reading(Uuid::new_v4(), i, 3.0)))
        .collect();
    let mut publisher = Command::new("mosquitto_pub")
        .args(["-h", &mosquitto.host, "-p", &mosquitto.port.to_string()])
        .args(["-t", &topic, "-q", "1", "-l"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("mosquitto_pub is installed (make services)");
    std::io::Write::write_all(&mut publisher.stdin.take().unwrap(), lines.as_bytes()).unwrap();
    assert!(publisher.wait().unwrap().success(), "mosquitto_pub failed");

    assert!(
        !consumer.drainer.drained(Duration::from_secs(1)).await,
        "drained while the broker held 300 readings back"
    );
    assert_eq!(stores.reading_count().await, 0);
    proxy.release();
    assert!(
        consumer.drainer.drained(DEFAULT_DEADLINE).await,
        "not drained"
    );
    assert_eq!(
        stores.reading_count().await,
        300,
        "drained before everything the broker took was stored"
    );
    consumer.stop().await;
    assert!(
        stores.dead_letters().await.is_empty(),
        "a drain marker was dead-lettered"
    );
    stores.assert_rollups_match_raw().await;
}

/// A consumer process in a share group on Mosquitto, and the port of its `/metrics`
/// once it serves them. A port picked free can be taken (by any process's outgoing
/// connection) before the consumer binds it; the consumer then exits at once, and
/// another port is tried.
async fn shared_consumer(stores: &Stores, client_id: &str, prefix: &str) -> (ChildGuard, u16) {
    let endpoint = mosquitto_endpoint();
    for _ in 0..5 {
        let metrics_port = free_port();
        let mut child = ChildGuard(
            Command::new(env!("CARGO_BIN_EXE_termopar-consumer"))
                .envs(stores.consumer_env())
                .env(
                    "MQTT_URL",
                    format!("mqtt://{}:{}", endpoint.host, endpoint.port),
                )
                .env("MQTT_CLIENT_ID", client_id)
                .env("MQTT_TOPIC_PREFIX", prefix)
                .env("CONSUMER_SHARE_GROUP", "ingest")
                .env("CONSUMER_RECOVER_AFTER_SECS", "2")
                .env("CONSUMER_METRICS_ADDR", format!("127.0.0.1:{metrics_port}"))
                .spawn()
                .expect("start the consumer binary"),
        );
        let serving = eventually("the consumer serving or gone", DEFAULT_DEADLINE, || {
            let exited = child.0.try_wait().expect("poll the consumer").is_some();
            async move {
                if exited {
                    return Some(false);
                }
                let url = format!("http://127.0.0.1:{metrics_port}/health");
                reqwest::get(url).await.ok().map(|_| true)
            }
        })
        .await;
        if serving {
            return (child, metrics_port);
        }
    }
    panic!("the consumer could not bind a metrics port in 5 tries");
}

/// The consumer's own count of received messages, from its /metrics.
async fn received(metrics_port: u16) -> Option<f64> {
    let text = reqwest::get(format!("http://127.0.0.1:{metrics_port}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let value = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    if value("consumer_subscribed") != Some(1.0) {
        return None;
    }
    Some(value("consumer_messages_received_total").unwrap_or(0.0))
}

#[tokio::test]
async fn two_consumers_in_a_share_group_split_the_load_and_lose_nothing_when_one_is_killed() {
    let stores = Stores::new().await;
    let (client, sensors) = stores.client_with_sensors(4).await;
    let prefix = unique_prefix();
    let id_a = format!("shared-a-{}", Uuid::new_v4().simple());
    let id_b = format!("shared-b-{}", Uuid::new_v4().simple());
    let (mut a, port_a) = shared_consumer(&stores, &id_a, &prefix).await;
    let (b, port_b) = shared_consumer(&stores, &id_b, &prefix).await;
    for port in [port_a, port_b] {
        eventually("both consumers subscribed", DEFAULT_DEADLINE, || {
            received(port)
        })
        .await;
    }

    let config = SimConfig {
        rate: 400.0,
        count: Some(2000),
        seed: 1,
        ..SimConfig::new(
            mosquitto_endpoint(),
            Topics::new(&prefix),
            sim_sensors(client, &sensors),
        )
    };
    let publisher = tokio::spawn(termopar_device_sim::run(config));

    // Kill A in the middle of the stream, then bring it back with the same session.
    eventually("a share of the stream at A", DEFAULT_DEADLINE, || async {
        received(port_a).await.filter(|n| *n >= 200.0)
    })
    .await;
    a.kill();
    let summary = publisher.await.unwrap().unwrap();
    assert_eq!(summary.acked, 2000);
    let _a = shared_consumer(&stores, &id_a, &prefix).await;

    stores
        .wait_for_readings(2000, Duration::from_secs(60))
        .await;
    let b_received = received(port_b).await.unwrap_or(0.0);
    assert!(b_received >= 200.0, "B took part: {b_received}");
    stores.wait_no_pending_writes().await;
    drop(b);

    let mut stored: Vec<Uuid> = stores.readings().await.iter().map(|r| r.id).collect();
    let mut sent = summary.reading_ids.clone();
    stored.sort();
    sent.sort();
    assert_eq!(stored, sent, "every reading stored exactly once");
    stores.assert_rollups_match_raw().await;
}
