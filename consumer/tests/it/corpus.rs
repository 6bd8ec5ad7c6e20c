//! Bad data of every kind is dead-lettered with its reason; the consumer keeps going and
//! the good readings in between are stored.

use std::collections::BTreeMap;

use serde_json::json;
use termopar_broker::BrokerSettings;
use termopar_core::{ids::ClientId, settings::MqttEndpoint, topic::Topics};
use test_support::DEFAULT_DEADLINE;
use uuid::Uuid;

use crate::harness::*;

#[tokio::test]
async fn malformed_payloads_are_dead_lettered_and_good_readings_between_them_are_stored() {
    let stores = Stores::new().await;
    let (client, sensors) = stores.client_with_sensors(1).await;
    let (other_client, other_sensors) = stores.client_with_sensors(1).await;
    let sensor = sensors[0].0;
    let broker = termopar_broker::start(&BrokerSettings::ephemeral(), None)
        .await
        .unwrap();
    let endpoint = MqttEndpoint::parse(&broker.url()).unwrap();
    let consumer = RunningConsumer::start(consumer_settings(endpoint.clone()), &stores).await;
    let topics = Topics::new("");
    let good_topic = topics.readings(client, sensor);

    let mut huge = br#"[{"temperature": 1.0, "pad": ""#.to_vec();
    huge.extend(std::iter::repeat_n(b'x', 1024 * 1024));
    huge.extend(br#""}]"#);
    let garbage: Vec<u8> = (0..=255u8).rev().cycle().take(300).collect();
    // (what, topic, payload, expected reason)
    let corpus: Vec<(&str, String, Vec<u8>, &str)> = vec![
        (
            "truncated JSON",
            good_topic.clone(),
            br#"{"temperature": 21.5, "ts": "2026"#.to_vec(),
            "malformed_json",
        ),
        (
            "temperature as a string",
            good_topic.clone(),
            br#"{"temperature": "21.5"}"#.to_vec(),
            "invalid_temperature",
        ),
        (
            "temperature as an object",
            good_topic.clone(),
            br#"{"temperature": {"c": 1}}"#.to_vec(),
            "invalid_temperature",
        ),
        (
            "NaN",
            good_topic.clone(),
            br#"{"temperature": NaN}"#.to_vec(),
            "malformed_json",
        ),
        (
            "Infinity",
            good_topic.clone(),
            br#"{"temperature": Infinity}"#.to_vec(),
            "malformed_json",
        ),
        (
            "beyond f64",
            good_topic.clone(),
            br#"{"temperature": 1e999}"#.to_vec(),
            "malformed_json",
        ),
        (
            "absurdly hot",
            good_topic.clone(),
            br#"{"temperature": 1000000}"#.to_vec(),
            "temperature_out_of_range",
        ),
        (
            "below absolute zero",
            good_topic.clone(),
            br#"{"temperature": -300}"#.to_vec(),
            "temperature_out_of_range",
        ),
        (
            "no temperature",
            good_topic.clone(),
            br#"{"humidity": 40}"#.to_vec(),
            "missing_temperature",
        ),
        (
            "bad timestamp",
            good_topic.clone(),
            br#"{"temperature": 1, "ts": "yesterday"}"#.to_vec(),
            "invalid_timestamp",
        ),
        (
            "timestamp in the far future",
            good_topic.clone(),
            br#"{"temperature": 1, "ts": "2999-01-01T00:00:00Z"}"#.to_vec(),
            "timestamp_out_of_range",
        ),
        (
            "bad id",
            good_topic.clone(),
            br#"{"temperature": 1, "id": "123"}"#.to_vec(),
            "invalid_id",
        ),
        (
            "a bare number",
            good_topic.clone(),
            b"21.5".to_vec(),
            "invalid_shape",
        ),
        (
            "empty array",
            good_topic.clone(),
            b"[]".to_vec(),
            "empty_batch",
        ),
        (
            "unstorable field name",
            good_topic.clone(),
            br#"{"temperature": 1, "$set": 1}"#.to_vec(),
            "invalid_extra",
        ),
        (
            "binary garbage",
            good_topic.clone(),
            garbage,
            "malformed_json",
        ),
        (
            "1 MB payload",
            good_topic.clone(),
            huge,
            "payload_too_large",
        ),
        (
            "unknown sensor",
            topics.readings(client, termopar_core::ids::SensorId(Uuid::new_v4())),
            br#"{"temperature": 1}"#.to_vec(),
            "unknown_sensor",
        ),
        (
            "sensor of another client",
            topics.readings(client, other_sensors[0].0),
            br#"{"temperature": 1}"#.to_vec(),
            "client_mismatch",
        ),
        (
            "unknown client for the sensor",
            topics.readings(ClientId(Uuid::new_v4()), sensor),
            br#"{"temperature": 1}"#.to_vec(),
            "client_mismatch",
        ),
        (
            "ids that are not UUIDs",
            "clients/acme/sensors/probe-1/readings".to_owned(),
            br#"{"temperature": 1}"#.to_vec(),
            "invalid_topic",
        ),
    ];
    let _ = other_client;

    let mut good = Vec::new();
    for (i, (_, topic, payload, _)) in corpus.iter().enumerate() {
        let id = Uuid::new_v4();
        good.push(id);
        mosquitto_pub(
            &endpoint,
            &good_topic,
            reading(id, i as i64, i as f64).to_string().as_bytes(),
            1,
            "mqttv311",
        );
        mosquitto_pub(&endpoint, topic, payload, 1, "mqttv311");
    }
    // One array with good and bad elements: the good ones are stored.
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let mixed = json!([reading(a, 100, 1.0), {"temperature": "bad"}, reading(b, 101, 2.0), 42]);
    mosquitto_pub(
        &endpoint,
        &good_topic,
        mixed.to_string().as_bytes(),
        1,
        "mqttv311",
    );
    good.extend([a, b]);
    // The consumer is still alive after all of it.
    let last = Uuid::new_v4();
    mosquitto_pub(
        &endpoint,
        &good_topic,
        reading(last, 500, 9.0).to_string().as_bytes(),
        1,
        "mqttv311",
    );
    good.push(last);

    stores
        .wait_for_readings(good.len() as u64, DEFAULT_DEADLINE)
        .await;
    test_support::eventually("every dead letter", DEFAULT_DEADLINE, || async {
        (stores.dead_letters().await.len() >= corpus.len() + 2).then_some(())
    })
    .await;
    consumer.stop().await;

    let mut stored: Vec<Uuid> = stores.readings().await.iter().map(|r| r.id).collect();
    stored.sort();
    good.sort();
    assert_eq!(stored, good, "exactly the good readings are stored");

    let letters = stores.dead_letters().await;
    let mut expected: BTreeMap<String, usize> = BTreeMap::new();
    for (_, _, _, reason) in &corpus {
        *expected.entry(reason.to_string()).or_default() += 1;
    }
    *expected.entry("invalid_temperature".into()).or_default() += 1;
    *expected.entry("invalid_shape".into()).or_default() += 1;
    let mut got: BTreeMap<String, usize> = BTreeMap::new();
    for letter in &letters {
        *got.entry(letter.get_str("reason").unwrap().to_owned())
            .or_default() += 1;
        assert!(letter.get_str("topic").is_ok(), "{letter}");
        assert!(!letter.get_str("detail").unwrap().is_empty(), "{letter}");
        assert!(letter.get_datetime("received_at").is_ok(), "{letter}");
        assert!(letter.get_i64("payload_size").unwrap() > 0, "{letter}");
    }
    assert_eq!(got, expected);
    let huge = letters
        .iter()
        .find(|l| l.get_str("reason") == Ok("payload_too_large"))
        .unwrap();
    assert!(huge.get_i64("payload_size").unwrap() > 1024 * 1024);
    assert_eq!(
        huge.get_binary_generic("payload").unwrap().len(),
        termopar_core::store::DEAD_LETTER_PAYLOAD_BYTES
    );
    let mixed_letters: Vec<i64> = letters
        .iter()
        .filter_map(|l| l.get_i64("index").ok())
        .collect();
    assert_eq!(mixed_letters, vec![1, 3]);
    stores.assert_rollups_match_raw().await;
}
