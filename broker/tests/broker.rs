//! The embedded broker with real clients: mosquitto_pub and mosquitto_sub.

mod common;

use std::{process::Command, time::Duration};

use termopar_broker::BrokerSettings;
use termopar_core::{directory::SensorDirectory, ids::SensorId, settings::MqttEndpoint};
use test_support::{mosquitto_pub_status, TestDb};
use uuid::Uuid;

type Credentials<'a> = Option<(&'a str, &'a str)>;

async fn sensor_with_secret(db: &TestDb) -> (Uuid, String) {
    let client = Uuid::new_v4();
    sqlx::query("INSERT INTO clients (id, name, timezone) VALUES ($1, 'c', 'UTC')")
        .bind(client)
        .execute(&db.pool)
        .await
        .unwrap();
    let (sensor, secret) = (Uuid::new_v4(), termopar_core::secrets::generate());
    sqlx::query("INSERT INTO sensors (id, client_id, name, secret_hash) VALUES ($1, $2, 's', $3)")
        .bind(sensor)
        .bind(client)
        .bind(termopar_core::secrets::hash(&secret))
        .execute(&db.pool)
        .await
        .unwrap();
    (sensor, secret)
}

// Multi-threaded: the broker checks credentials on this runtime while the test blocks
// on mosquitto_pub.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_credentials_are_checked_at_connect() {
    let db = TestDb::new().await;
    let (sensor, secret) = sensor_with_secret(&db).await;
    let directory = SensorDirectory::new(db.pool.clone());
    let mut settings = BrokerSettings::ephemeral();
    settings.require_auth = true;
    settings.service = Some((
        "termopar-service".into(),
        "service-password-1".to_owned().into(),
    ));
    let broker = termopar_broker::start(&settings, Some(directory.clone()))
        .await
        .unwrap();
    let port = MqttEndpoint::parse(&broker.url()).unwrap();
    let (v4, v5) = (port.clone(), port);
    let sensor_name = sensor.to_string();
    let unknown = Uuid::new_v4().to_string();
    // (what, credentials, accepted)
    let cases: Vec<(&str, Credentials, bool)> = vec![
        ("right secret", Some((&sensor_name, &secret)), true),
        (
            "service account",
            Some(("termopar-service", "service-password-1")),
            true,
        ),
        (
            "wrong secret",
            Some((&sensor_name, "not-the-secret")),
            false,
        ),
        ("another sensor's name", Some((&unknown, &secret)), false),
        ("not a sensor id", Some(("admin", &secret)), false),
        (
            "wrong service password",
            Some(("termopar-service", "guess")),
            false,
        ),
        ("no credentials", None, false),
    ];
    for (endpoint, version) in [(&v4, "mqttv311"), (&v5, "mqttv5")] {
        for (what, credentials, accepted) in &cases {
            let status = mosquitto_pub_status(
                endpoint,
                "clients/x/sensors/y/readings",
                b"{}",
                1,
                version,
                *credentials,
            );
            assert_eq!(
                status.success(),
                *accepted,
                "{what} over {version}: {status}"
            );
        }
    }

    // A rotated secret: the old one stops working once the directory forgets it.
    let new_secret = termopar_core::secrets::generate();
    sqlx::query("UPDATE sensors SET secret_hash = $2 WHERE id = $1")
        .bind(sensor)
        .bind(termopar_core::secrets::hash(&new_secret))
        .execute(&db.pool)
        .await
        .unwrap();
    directory.invalidate(SensorId(sensor)).await;
    let old = mosquitto_pub_status(
        &v4,
        "t",
        b"{}",
        1,
        "mqttv311",
        Some((&sensor_name, &secret)),
    );
    let new = mosquitto_pub_status(
        &v4,
        "t",
        b"{}",
        1,
        "mqttv311",
        Some((&sensor_name, &new_secret)),
    );
    assert!(!old.success() && new.success());
}

#[tokio::test]
async fn mqtt_5_subscribers_get_what_mqtt_3_publishers_send_on_the_same_port() {
    let broker = termopar_broker::start(&BrokerSettings::ephemeral(), None)
        .await
        .unwrap();
    let port = broker.addr;
    let topic = format!(
        "clients/{}/sensors/{}/readings",
        Uuid::new_v4(),
        Uuid::new_v4()
    );
    let mut sub = Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.port().to_string(),
            "-V",
            "mqttv5",
            "-q",
            "1",
        ])
        .args(["-t", &topic, "-C", "1", "-W", "20"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("mosquitto_sub is installed (make services)");
    let v4 = MqttEndpoint::parse(&broker.url()).unwrap();
    // Publish until the subscriber, which may not be subscribed yet, has its message.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while sub.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
        assert!(
            mosquitto_pub_status(&v4, &topic, br#"{"temperature": 1}"#, 1, "mqttv311", None)
                .success()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = sub.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        r#"{"temperature": 1}"#
    );
}

/// Edge mode: the PUBACK of a QoS 1 reading waits until the consumer reports it finished;
/// PUBACKs keep the order of their publishes (one on another topic waits behind them).
#[tokio::test]
async fn a_readings_puback_waits_until_the_consumer_finished_it() {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

    let topics = termopar_core::topic::Topics::new("");
    let mut settings = BrokerSettings::ephemeral();
    settings.ack_when_finished = Some(topics.readings_filter());
    let broker = termopar_broker::start(&settings, None).await.unwrap();
    let finished = broker
        .finished()
        .expect("the broker acknowledges when finished");
    // (No consumer here: its subscription is not waited for.)
    broker.admit();
    let without = termopar_broker::start(&BrokerSettings::ephemeral(), None)
        .await
        .unwrap();
    assert!(without.finished().is_none());

    let endpoint = MqttEndpoint::parse(&broker.url()).unwrap();
    let mut options = MqttOptions::new("waits", &endpoint.host, endpoint.port);
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(options, 16);
    let (acks_tx, mut acks) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(event) = eventloop.poll().await {
            if let Event::Incoming(Packet::PubAck(ack)) = event {
                let _ = acks_tx.send(ack.pkid);
            }
        }
    });
    let client_id = termopar_core::ids::ClientId(Uuid::new_v4());
    let a = topics.readings(client_id, SensorId(Uuid::new_v4()));
    let b = topics.readings(client_id, SensorId(Uuid::new_v4()));
    for (topic, payload) in [(&a, "1"), (&b, "2"), (&"other/topic".to_owned(), "3")] {
        client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }
    // rumqttd acknowledged all three to the front, which holds them.
    test_support::eventually(
        "the front holding three PUBACKs",
        Duration::from_secs(20),
        || async { (broker.stats().acks_held >= 3).then_some(()) },
    )
    .await;
    assert!(acks.try_recv().is_err(), "no PUBACK before the consumer");

    // The second one finished first: it still waits for the first (a PUBACK sent now
    // would arrive before the first's).
    finished.finished(&b, b"2");
    finished.finished(&a, b"1");
    let mut order = Vec::new();
    for _ in 0..3 {
        order.push(
            tokio::time::timeout(Duration::from_secs(20), acks.recv())
                .await
                .expect("a PUBACK")
                .unwrap(),
        );
    }
    assert_eq!(order, [1, 2, 3], "PUBACKs in the order of their publishes");

    // A publish off the filter is answered at once when nothing waits before it.
    client
        .publish("other/topic", QoS::AtLeastOnce, false, "4")
        .await
        .unwrap();
    let pkid = tokio::time::timeout(Duration::from_secs(20), acks.recv())
        .await
        .expect("a PUBACK without the consumer")
        .unwrap();
    assert_eq!(pkid, 4);
}

/// Edge mode restarting with devices reconnecting at once: a device that connects and
/// publishes before the consumer has subscribed waits in the listener's backlog until
/// the consumer's subscription is in rumqttd, so its reading reaches the consumer and is
/// acknowledged. (Taken earlier, rumqttd put the reading in a log of its topic that the
/// subscription never reads, and its PUBACK waited forever.)
#[tokio::test]
async fn a_device_that_connects_before_the_consumer_subscribed_is_taken_after_it() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let topics = termopar_core::topic::Topics::new("");
    let mut settings = BrokerSettings::ephemeral();
    settings.ack_when_finished = Some(topics.readings_filter());
    let broker = termopar_broker::start(&settings, None).await.unwrap();
    let finished = broker.finished().unwrap();

    // The device's CONNECT and QoS 1 PUBLISH (MQTT 3.1.1), sent at once.
    let topic = topics.readings(
        termopar_core::ids::ClientId(Uuid::new_v4()),
        SensorId(Uuid::new_v4()),
    );
    let payload = b"{\"temperature\":4.5}";
    let mut connect = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 5];
    connect.extend_from_slice(b"early");
    let mut publish = (topic.len() as u16).to_be_bytes().to_vec();
    publish.extend_from_slice(topic.as_bytes());
    publish.extend_from_slice(&[0, 7]);
    publish.extend_from_slice(payload);
    let mut bytes = vec![0x10, connect.len() as u8];
    bytes.extend_from_slice(&connect);
    bytes.extend_from_slice(&[0x32, publish.len() as u8]);
    bytes.extend_from_slice(&publish);
    let mut device = tokio::net::TcpStream::connect(termopar_broker::reachable(broker.addr))
        .await
        .unwrap();
    device.write_all(&bytes).await.unwrap();

    // Then the consumer subscribes on rumqttd's own port, as edge mode's does.
    let (_consumer, mut got) = common::direct_subscriber(&broker, &topics.readings_filter()).await;
    let wait = Duration::from_secs(20);
    assert_eq!(
        broker.stats().connects_accepted,
        0,
        "no client taken before the consumer subscribed"
    );
    broker.admit();

    let mut connack = [0u8; 4];
    tokio::time::timeout(wait, device.read_exact(&mut connack))
        .await
        .expect("a CONNACK once admitted")
        .unwrap();
    assert_eq!(connack, [0x20, 2, 0, 0]);
    let (got_topic, got_payload) = tokio::time::timeout(wait, got.recv())
        .await
        .expect("the early reading reaches the consumer")
        .unwrap();
    assert_eq!(
        (got_topic.as_str(), &got_payload[..]),
        (topic.as_str(), &payload[..])
    );
    finished.finished(&got_topic, &got_payload);
    let mut puback = [0u8; 4];
    tokio::time::timeout(wait, device.read_exact(&mut puback))
        .await
        .expect("the PUBACK once finished")
        .unwrap();
    assert_eq!(puback, [0x40, 2, 0, 7]);
}
