//! The embedded broker with real clients: mosquitto_pub and mosquitto_sub.

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
