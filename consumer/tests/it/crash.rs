//! SIGKILL the consumer again and again in the middle of a QoS 1 stream through the
//! embedded broker: nothing is lost, nothing is counted twice.

use std::{process::Command, time::Duration};

use termopar_broker::BrokerSettings;
use termopar_core::{settings::MqttEndpoint, topic::Topics};
use termopar_device_sim::SimConfig;
use test_support::{eventually, ChildGuard};
use uuid::Uuid;

use crate::harness::*;

fn consumer_process(stores: &Stores, endpoint: &MqttEndpoint, client_id: &str) -> ChildGuard {
    let child = Command::new(env!("CARGO_BIN_EXE_termopar-consumer"))
        .envs(stores.consumer_env())
        .env(
            "MQTT_URL",
            format!("mqtt://{}:{}", endpoint.host, endpoint.port),
        )
        .env("MQTT_CLIENT_ID", client_id)
        .env("CONSUMER_RECOVER_AFTER_SECS", "2")
        .env("CONSUMER_METRICS_ADDR", "off")
        .spawn()
        .expect("start the consumer binary");
    ChildGuard(child)
}

/// What [`stream_through_kills`] did.
pub(crate) struct Killed {
    /// The consumer running now.
    pub consumer: ChildGuard,
    /// The publisher's summary.
    pub summary: termopar_device_sim::Summary,
    /// The reading published first, to see the consumer subscribed.
    pub probe: Uuid,
}

/// Starts the consumer binary on an embedded broker, then publishes `total` readings of
/// `sensors` with QoS 1 (at 600/s, simulator seed `seed`) while killing the consumer with
/// SIGKILL three times (after at least 300 more readings were stored each time) and
/// starting it again; returns once every reading acknowledged is stored.
pub(crate) async fn stream_through_kills(
    stores: &Stores,
    client: termopar_core::ids::ClientId,
    sensors: &[(termopar_core::ids::SensorId, String)],
    total: u64,
    seed: u64,
) -> Killed {
    let broker = termopar_broker::start(&BrokerSettings::ephemeral(), None)
        .await
        .unwrap();
    let endpoint = MqttEndpoint::parse(&broker.url()).unwrap();
    let client_id = format!("crashy-{}", Uuid::new_v4().simple());

    // The first run creates the persistent session; readings are only published after.
    let mut consumer = consumer_process(stores, &endpoint, &client_id);
    let probe = Uuid::new_v4();
    let topic = Topics::new("").readings(client, sensors[0].0);
    eventually(
        "the consumer subscribed",
        Duration::from_secs(20),
        || async {
            mosquitto_pub(
                &endpoint,
                &topic,
                reading(probe, 0, 1.0).to_string().as_bytes(),
                1,
                "mqttv311",
            );
            (stores.reading_count().await >= 1).then_some(())
        },
    )
    .await;

    let config = SimConfig {
        rate: 600.0,
        count: Some(total),
        seed,
        ..SimConfig::new(
            endpoint.clone(),
            Topics::new(""),
            sim_sensors(client, sensors),
        )
    };
    let publisher = tokio::spawn(termopar_device_sim::run(config));

    let mut kills = 0;
    let mut last = stores.reading_count().await;
    while kills < 3 {
        let seen = eventually(
            "progress between kills",
            Duration::from_secs(30),
            || async {
                let n = stores.reading_count().await;
                (n >= last + 300 || n > total).then_some(n)
            },
        )
        .await;
        if seen > total {
            break;
        }
        consumer.kill();
        kills += 1;
        last = seen;
        consumer = consumer_process(stores, &endpoint, &client_id);
    }
    assert!(
        kills >= 2,
        "the stream ended before the consumer could be killed twice"
    );
    let summary = publisher.await.unwrap().unwrap();
    assert_eq!(summary.acked, total);

    stores
        .wait_for_readings(total + 1, Duration::from_secs(60))
        .await;
    Killed {
        consumer,
        summary,
        probe,
    }
}

#[tokio::test]
async fn killing_the_consumer_repeatedly_loses_nothing_and_counts_nothing_twice() {
    let stores = Stores::new().await;
    let (client, sensors) = stores.client_with_sensors(5).await;
    let total = 3000u64;
    let Killed {
        consumer,
        summary,
        probe,
    } = stream_through_kills(&stores, client, &sensors, total, 2).await;
    stores.wait_no_pending_writes().await;
    drop(consumer);

    let mut stored: Vec<Uuid> = stores
        .readings()
        .await
        .iter()
        .map(|r| r.id)
        .filter(|id| *id != probe)
        .collect();
    let mut sent = summary.reading_ids.clone();
    stored.sort();
    sent.sort();
    assert_eq!(stored.len(), sent.len());
    assert_eq!(stored, sent, "every reading stored exactly once");
    stores.assert_rollups_match_raw().await;
}
