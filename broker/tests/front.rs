//! The MQTT front door with third-party clients only: paho-mqtt 2 (Python) and
//! mosquitto_pub/sub, MQTT 3.1.1 and 5 on the one port, keepalive 0, the device ACL,
//! TLS, and credentials changed under live connections.

mod common;

use std::{process::Output, time::Duration};

use serde_json::Value;
use termopar_broker::{BrokerSettings, RunningBroker, TlsSettings};
use termopar_core::{directory::SensorDirectory, ids::ClientId, topic::Topics};
use test_support::{eventually, self_signed_cert, test_python, TestDb};
use tokio::process::Command;
use uuid::Uuid;

const SERVICE: (&str, &str) = ("termopar-service", "service-password-1");

/// Runs the paho client (tests/paho_client.py) and returns what it printed.
async fn paho(port: u16, args: &[&str]) -> Value {
    let out = Command::new(test_python())
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/paho_client.py"))
        .args(["--port", &port.to_string()])
        .args(args)
        .output()
        .await
        .expect("the test tools' Python with paho-mqtt (make services)");
    parse_paho(&out)
}

fn parse_paho(out: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap_or_else(|e| {
        panic!(
            "paho printed no JSON ({e}): {stdout} / {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// mosquitto_pub (or _sub) with these arguments, to 127.0.0.1:`port`.
async fn mosquitto(tool: &str, port: u16, args: &[&str]) -> Output {
    Command::new(tool)
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .await
        .expect("mosquitto clients are installed (make services)")
}

/// A client and one sensor of it with a fresh device secret.
async fn sensor(db: &TestDb) -> (ClientId, Uuid, String) {
    let (client, sensors) = db.client_with_sensors(1).await;
    let secret = termopar_core::secrets::generate();
    sqlx::query("UPDATE sensors SET secret_hash = $2 WHERE id = $1")
        .bind(sensors[0].0)
        .bind(termopar_core::secrets::hash(&secret))
        .execute(&db.pool)
        .await
        .unwrap();
    (client, sensors[0].0, secret)
}

async fn with_devices(db: &TestDb, adjust: impl FnOnce(&mut BrokerSettings)) -> RunningBroker {
    let mut settings = BrokerSettings::ephemeral();
    settings.require_auth = true;
    settings.service = Some((SERVICE.0.into(), SERVICE.1.to_owned().into()));
    adjust(&mut settings);
    termopar_broker::start(&settings, Some(SensorDirectory::new(db.pool.clone())))
        .await
        .unwrap()
}

#[tokio::test]
async fn mqtt_3_and_5_and_keepalive_0_share_the_one_port() {
    let mut settings = BrokerSettings::ephemeral();
    // The front pings rumqttd every second for clients without keepalive: rumqttd is
    // told 2 s and would drop a silent link after 3 s.
    settings.no_keepalive_ping = Duration::from_secs(1);
    let broker = termopar_broker::start(&settings, None).await.unwrap();
    let port = broker.addr.port();
    for version in ["4", "5"] {
        for keepalive in ["30", "0"] {
            let topic = format!("t/{}", Uuid::new_v4());
            let out = paho(
                port,
                &[
                    "--version",
                    version,
                    "--keepalive",
                    keepalive,
                    "--subscribe",
                    &topic,
                    "--publish",
                    &format!("{topic}=x"),
                ],
            )
            .await;
            assert_eq!(
                out["connack"], 0,
                "paho v{version} keepalive {keepalive}: {out}"
            );
            assert_eq!(out["subacks"], serde_json::json!([[1]]), "{out}");
            assert_eq!(out["pubacks"], serde_json::json!([0]), "{out}");
        }
    }
    // (mosquitto_pub refuses `-k 0` itself: "must be between 5 and 65535".)
    for version in ["mqttv311", "mqttv5"] {
        let out = mosquitto(
            "mosquitto_pub",
            port,
            &["-V", version, "-q", "1", "-t", "t/x", "-m", "1"],
        )
        .await;
        assert!(out.status.success(), "mosquitto_pub {version}: {out:?}");
    }
    // Without keepalive, a silent client stays connected well past what rumqttd would
    // allow a silent link, and never sees the front's PINGRESPs.
    for version in ["4", "5"] {
        let out = paho(
            port,
            &[
                "--version",
                version,
                "--keepalive",
                "0",
                "--idle",
                "5",
                "--publish",
                "t/idle=1",
            ],
        )
        .await;
        assert_eq!(out["pubacks"], serde_json::json!([0]), "v{version}: {out}");
        assert_eq!(out.get("error"), None, "v{version}: {out}");
    }
}

#[tokio::test]
async fn devices_publish_and_subscribe_only_inside_their_own_topics() {
    let db = TestDb::new().await;
    let (client, s1, secret) = sensor(&db).await;
    let s2 = termopar_core::ids::SensorId(Uuid::new_v4());
    sqlx::query("INSERT INTO sensors (id, client_id, name, secret_hash) VALUES ($1, $2, 's2', $3)")
        .bind(s2.0)
        .bind(client.0)
        .bind(termopar_core::secrets::hash("x"))
        .execute(&db.pool)
        .await
        .unwrap();
    let (other_client, s3, _) = sensor(&db).await;
    let broker = with_devices(&db, |_| {}).await;
    let port = broker.addr.port();
    let topics = Topics::new("");
    let own = topics.readings(client, termopar_core::ids::SensorId(s1));
    let same_client = topics.readings(client, s2);
    let other_tenant = topics.readings(other_client, termopar_core::ids::SensorId(s3));
    let subtree = format!("clients/{client}/sensors/{s1}/#");

    // A service account sees everything that gets through.
    let mut watcher = Watcher::start(port).await;
    let user = s1.to_string();
    let device = ["--username", user.as_str(), "--password", secret.as_str()];
    let (to_same, to_other) = (format!("{same_client}=x"), format!("{other_tenant}=x"));
    let mixed_filters = format!("{subtree},#");
    for (version, refused_pub, refused_sub) in [("5", 135, 135), ("4", 0, 128)] {
        let to_own = format!("{own}={{\"temperature\": {version}}}");
        let args = [
            &device[..],
            &["--version", version],
            &[
                "--subscribe",
                &subtree,
                "--subscribe",
                "clients/+/sensors/+/readings",
            ],
            &["--publish", &to_own],
            &["--publish", &to_same, "--publish", &to_other],
        ]
        .concat();
        let out = paho(port, &args).await;
        assert_eq!(out["connack"], 0, "{out}");
        // MQTT 5 says "not authorized"; 3.1.1 can only acknowledge (and drop).
        assert_eq!(
            out["subacks"],
            serde_json::json!([[1], [refused_sub]]),
            "v{version}: {out}"
        );
        assert_eq!(
            out["pubacks"],
            serde_json::json!([0, refused_pub, refused_pub]),
            "v{version}: {out}"
        );

        // Half refused in one SUBSCRIBE: each filter gets its own answer.
        let mixed = [
            &device[..],
            &["--version", version, "--subscribe", &mixed_filters],
        ]
        .concat();
        let out = paho(port, &mixed).await;
        assert_eq!(
            out["subacks"],
            serde_json::json!([[1, refused_sub]]),
            "{out}"
        );

        // QoS 2 refused: the exchange completes (3.1.1: PUBREC, PUBREL, PUBCOMP).
        let qos2 = [
            &device[..],
            &["--version", version, "--qos", "2", "--publish", &to_other],
        ]
        .concat();
        let out = paho(port, &qos2).await;
        assert_eq!(out["pubacks"].as_array().map(Vec::len), Some(1), "{out}");
        assert_eq!(out.get("error"), None, "{out}");
    }
    // A will outside its own topic is refused at CONNECT.
    let will = mosquitto(
        "mosquitto_pub",
        port,
        &[
            "-u",
            &user,
            "-P",
            &secret,
            "--will-topic",
            &same_client,
            "--will-payload",
            "x",
            "-t",
            &own,
            "-m",
            "{}",
        ],
    )
    .await;
    assert!(!will.status.success(), "{will:?}");

    assert_eq!(
        watcher.until_done().await,
        vec![
            format!("{own} {{\"temperature\": 5}}"),
            format!("{own} {{\"temperature\": 4}}"),
        ],
        "only the device's own readings got through"
    );
    let stats = broker.stats();
    // Per version: 2 publishes at QoS 1 and 1 at QoS 2; the wildcard and `#`; the will.
    assert_eq!(stats.publishes_refused, 2 * 3 + 1, "{stats:?}");
    assert_eq!(stats.subscriptions_refused, 2 * 2, "{stats:?}");
}

/// mosquitto_sub as the service account on every readings topic, read line by line.
struct Watcher {
    port: u16,
    child: tokio::process::Child,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl Watcher {
    /// Returns once the subscription is in place (a marker published after it arrived).
    async fn start(port: u16) -> Self {
        let mut child = Command::new("mosquitto_sub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-u",
                SERVICE.0,
                "-P",
                SERVICE.1,
            ])
            .args(["-t", "clients/#", "-t", "marker", "-v", "-q", "1"])
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("mosquitto clients are installed (make services)");
        let stdout = child.stdout.take().unwrap();
        let mut watcher = Self {
            port,
            child,
            lines: tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout)),
        };
        loop {
            watcher.marker("ready").await;
            let next =
                tokio::time::timeout(Duration::from_millis(200), watcher.lines.next_line()).await;
            if let Ok(line) = next {
                assert_eq!(line.unwrap().as_deref(), Some("marker ready"));
                return watcher;
            }
        }
    }

    async fn marker(&self, what: &str) {
        let out = mosquitto(
            "mosquitto_pub",
            self.port,
            &[
                "-u", SERVICE.0, "-P", SERVICE.1, "-q", "1", "-t", "marker", "-m", what,
            ],
        )
        .await;
        assert!(out.status.success());
    }

    /// What arrived before a `done` marker (extra `ready` markers left out).
    async fn until_done(&mut self) -> Vec<String> {
        self.marker("done").await;
        let mut seen = Vec::new();
        loop {
            let line = tokio::time::timeout(Duration::from_secs(20), self.lines.next_line())
                .await
                .expect("the done marker within 20 s")
                .unwrap()
                .expect("mosquitto_sub still running");
            match line.as_str() {
                "marker done" => break,
                "marker ready" => {}
                _ => seen.push(line),
            }
        }
        let _ = self.child.kill().await;
        seen
    }
}

#[tokio::test]
async fn tls_serves_the_same_authentication_and_acl_to_clients_that_trust_it() {
    let db = TestDb::new().await;
    let (client, s1, secret) = sensor(&db).await;
    let dir = std::env::temp_dir().join(format!("termopar-tls-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = self_signed_cert(&dir, "server");
    let (untrusted, _) = self_signed_cert(&dir, "other");
    let broker = with_devices(&db, |s| {
        s.tls = Some(TlsSettings {
            addr: "127.0.0.1:0".parse().unwrap(),
            cert: cert.clone(),
            key,
        })
    })
    .await;
    let tls = broker.tls_addr.unwrap().port();
    let own = Topics::new("").readings(client, termopar_core::ids::SensorId(s1));
    let other = Topics::new("").readings(client, termopar_core::ids::SensorId(Uuid::new_v4()));
    let user = s1.to_string();
    let cert_s = cert.to_str().unwrap();
    for version in ["4", "5"] {
        let out = paho(
            tls,
            &[
                "--cafile",
                cert_s,
                "--version",
                version,
                "--username",
                &user,
                "--password",
                &secret,
                "--publish",
                &format!("{own}=1"),
                "--publish",
                &format!("{other}=1"),
            ],
        )
        .await;
        assert_eq!(out["connack"], 0, "{out}");
        let refused = if version == "5" { 135 } else { 0 };
        assert_eq!(out["pubacks"], serde_json::json!([0, refused]), "{out}");
        let wrong = paho(
            tls,
            &[
                "--cafile",
                cert_s,
                "--version",
                version,
                "--username",
                &user,
                "--password",
                "guess",
            ],
        )
        .await;
        assert_ne!(wrong["connack"], 0, "{wrong}");
        let distrust = paho(
            tls,
            &[
                "--cafile",
                untrusted.to_str().unwrap(),
                "--version",
                version,
            ],
        )
        .await;
        assert!(
            distrust["error"]
                .as_str()
                .unwrap_or_default()
                .contains("CERTIFICATE_VERIFY_FAILED"),
            "{distrust}"
        );
    }
    let trusted = mosquitto(
        "mosquitto_pub",
        tls,
        &[
            "--cafile", cert_s, "-u", &user, "-P", &secret, "-t", &own, "-m", "1", "-q", "1",
        ],
    )
    .await;
    assert!(trusted.status.success(), "{trusted:?}");
    let system_cas = mosquitto(
        "mosquitto_pub",
        tls,
        &[
            "--capath",
            "/etc/ssl/certs",
            "-u",
            &user,
            "-P",
            &secret,
            "-t",
            &own,
            "-m",
            "1",
        ],
    )
    .await;
    assert!(
        !system_cas.status.success(),
        "a certificate no CA signed is refused: {system_cas:?}"
    );
    assert_eq!(broker.stats().publishes_refused, 2);
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn a_rotated_or_deleted_secret_ends_live_connections_and_refuses_new_ones() {
    let db = TestDb::new().await;
    let (client, s1, secret) = sensor(&db).await;
    let broker = with_devices(&db, |_| {}).await;
    let port = broker.addr.port();
    let user = s1.to_string();
    let own = Topics::new("").readings(client, termopar_core::ids::SensorId(s1));
    let connected = |n: u64| {
        let broker = broker.clone();
        async move {
            eventually("the device connected", Duration::from_secs(10), || async {
                (broker.stats().connects_accepted == n && broker.stats().connections == 1)
                    .then_some(())
            })
            .await
        }
    };

    // Rotated by another process (plain SQL here): announced over NOTIFY.
    let live = spawn_paho(
        port,
        &[
            "--version",
            "5",
            "--username",
            &user,
            "--password",
            &secret,
            "--until-disconnected",
            "30",
        ],
    );
    connected(1).await;
    let rotated = termopar_core::secrets::generate();
    sqlx::query("UPDATE sensors SET secret_hash = $2 WHERE id = $1")
        .bind(s1)
        .bind(termopar_core::secrets::hash(&rotated))
        .execute(&db.pool)
        .await
        .unwrap();
    let out = parse_paho(&live.await.unwrap());
    assert_eq!(
        out["disconnect"], 135,
        "MQTT 5 DISCONNECT, not authorized: {out}"
    );
    assert_eq!(broker.stats().revoked, 1);
    let old = mosquitto(
        "mosquitto_pub",
        port,
        &["-u", &user, "-P", &secret, "-t", &own, "-m", "1"],
    )
    .await;
    assert!(!old.status.success(), "the old secret is refused at once");

    // Deleted: a 3.1.1 connection with the new secret ends too.
    let live = spawn_paho(
        port,
        &[
            "--version",
            "4",
            "--username",
            &user,
            "--password",
            &rotated,
            "--until-disconnected",
            "30",
        ],
    );
    connected(2).await;
    sqlx::query("DELETE FROM sensors WHERE id = $1")
        .bind(s1)
        .execute(&db.pool)
        .await
        .unwrap();
    let out = parse_paho(&live.await.unwrap());
    assert!(out["disconnect"].is_number(), "{out}");
    assert_eq!(broker.stats().revoked, 2);
    let gone = mosquitto(
        "mosquitto_pub",
        port,
        &["-u", &user, "-P", &rotated, "-t", &own, "-m", "1"],
    )
    .await;
    assert!(!gone.status.success());
}

#[tokio::test]
async fn a_device_cannot_take_over_another_devices_session_by_its_client_id() {
    let db = TestDb::new().await;
    let (_, s1, secret1) = sensor(&db).await;
    let (_, s2, secret2) = sensor(&db).await;
    let broker = with_devices(&db, |_| {}).await;
    let port = broker.addr.port();
    let (user1, user2) = (s1.to_string(), s2.to_string());
    let first = spawn_paho(
        port,
        &[
            "--client-id",
            "meter-1",
            "--username",
            &user1,
            "--password",
            &secret1,
            "--until-disconnected",
            "3",
        ],
    );
    eventually(
        "the first device connected",
        Duration::from_secs(10),
        || async { (broker.stats().connections == 1).then_some(()) },
    )
    .await;
    // Another tenant's device with the same client id: in rumqttd alone it would take
    // the session over and disconnect the first.
    let second = paho(
        port,
        &[
            "--client-id",
            "meter-1",
            "--username",
            &user2,
            "--password",
            &secret2,
        ],
    )
    .await;
    assert_eq!(second["connack"], 0, "{second}");
    let first = parse_paho(&first.await.unwrap());
    assert_eq!(
        first["disconnect"],
        Value::Null,
        "the first device stayed connected: {first}"
    );
}

fn spawn_paho(port: u16, args: &[&str]) -> tokio::task::JoinHandle<Output> {
    let mut cmd = Command::new(test_python());
    cmd.arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/paho_client.py"))
        .args(["--port", &port.to_string()])
        .args(args);
    tokio::spawn(async move { cmd.output().await.unwrap() })
}

/// Edge mode with an MQTT 5 client that names its readings topic by a topic alias after
/// the first publish: the front resolves the alias, so that PUBACK too waits until the
/// consumer (here a 3.1.1 subscriber on rumqttd's own port, as edge mode's) finished it.
/// (The consumer getting an MQTT 5 publish with properties at all needed a rumqttd patch:
/// its 3.1.1 link panicked on one.)
#[tokio::test]
async fn a_puback_under_a_topic_alias_waits_for_the_consumer_too() {
    let topics = Topics::new("");
    let mut settings = BrokerSettings::ephemeral();
    settings.ack_when_finished = Some(topics.readings_filter());
    let broker = termopar_broker::start(&settings, None).await.unwrap();
    let finished = broker.finished().unwrap();

    let (_consumer, mut got) = common::direct_subscriber(&broker, &topics.readings_filter()).await;
    broker.admit();

    let topic = topics.readings(
        ClientId(Uuid::new_v4()),
        termopar_core::ids::SensorId(Uuid::new_v4()),
    );
    let paho = spawn_paho(
        broker.addr.port(),
        &[
            "--version",
            "5",
            "--alias",
            "--publish",
            &format!("{topic}=first"),
            "--publish",
            &format!("{topic}=second"),
        ],
    );
    for (n, payload) in [(1, "first"), (2, "second")] {
        let (seen, body) = tokio::time::timeout(Duration::from_secs(20), got.recv())
            .await
            .expect("the consumer got the publish")
            .unwrap();
        assert_eq!(
            (seen.as_str(), &body[..]),
            (topic.as_str(), payload.as_bytes())
        );
        eventually(
            "the front holding its PUBACK",
            Duration::from_secs(20),
            || async { (broker.stats().acks_held >= n).then_some(()) },
        )
        .await;
        finished.finished(&seen, &body);
    }
    let out = parse_paho(&paho.await.unwrap());
    assert_eq!(out["pubacks"], serde_json::json!([0, 0]), "{out}");
}
