//! `termopar backup` and `termopar restore`, through the binary: a backup taken while
//! readings keep arriving restores into empty stores as a node that answers as the
//! original did, whose index and raw documents agree, and that takes new data.

use std::{path::Path, time::Duration};

use reqwest::StatusCode;
use serde_json::{json, Value};
use termopar_core::{settings::MqttEndpoint, topic::Topics};
use termopar_device_sim::SimConfig;
use test_support::{eventually, TestDb, TestMongo};
use uuid::Uuid;

use crate::{edge_settings, Node};

/// Runs `termopar <args>` on `db` and `mongo`; its output, or a panic with it.
fn termopar(args: &[&str], db: &TestDb, mongo: &TestMongo) -> Result<String, String> {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_termopar"))
        .args(args)
        .env("DATABASE_URL", &db.url)
        .env("MONGODB_URI", &mongo.settings.uri)
        .env("MONGODB_DB", &mongo.settings.database)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run termopar");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if output.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

/// An admin's HTTP view of a node.
struct Admin {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Admin {
    async fn login(base: &str) -> Self {
        let http = reqwest::Client::new();
        let token = termopar_device_sim::login(&http, base, "admin@edge.test", "edge-admin-pw")
            .await
            .unwrap();
        Self {
            http,
            base: base.to_owned(),
            token,
        }
    }

    async fn get(&self, path: &str) -> Value {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "GET {path}");
        response.json().await.unwrap()
    }

    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let response = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .header("Origin", "https://shop.example")
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// What each of `paths` answers.
    async fn answers(&self, paths: &[String]) -> Vec<Value> {
        let mut answers = Vec::new();
        for path in paths {
            answers.push(self.get(path).await);
        }
        answers
    }
}

async fn count(pg: &sqlx::PgPool, table: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
        .fetch_one(pg)
        .await
        .unwrap()
}

fn sim(
    broker: &str,
    sensors: Vec<termopar_device_sim::SimSensor>,
    count: Option<u64>,
) -> SimConfig {
    SimConfig {
        rate: 400.0,
        count,
        batch: 2,
        ..SimConfig::new(
            MqttEndpoint::parse(broker)
                .unwrap()
                .with_credentials("sim", "sim-password-1"),
            Topics::new(""),
            sensors,
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_under_load_restores_into_a_node_that_answers_the_same() {
    let (db, mongo) = (TestDb::new().await, TestMongo::new());
    let node = Node::start(edge_settings(&db, &mongo)).await;
    let (base, broker) = (node.base.clone(), node.broker.url());
    let sensors =
        termopar_device_sim::provision(&base, "admin@edge.test", "edge-admin-pw", 2, false)
            .await
            .unwrap();
    let (quiet, busy) = (sensors[..2].to_vec(), sensors[2..].to_vec());
    let admin = Admin::login(&base).await;

    // Readings of two sensors, then they stay quiet.
    eventually(
        "the edge consumer subscribed",
        Duration::from_secs(20),
        || async {
            termopar_device_sim::run(sim(&broker, quiet.clone(), Some(1)))
                .await
                .unwrap();
            (test_support::stored_count(&db.pool).await > 0).then_some(())
        },
    )
    .await;
    let sent = termopar_device_sim::run(sim(&broker, quiet.clone(), Some(200)))
        .await
        .unwrap();
    assert_eq!(sent.acked, 200);
    // Page views of a site, a conversation, and a lead from the site's form.
    let (status, site) = admin
        .post(
            "/api/v1/sites",
            json!({"client_id": quiet[0].client_id, "name": "shop", "origins": ["https://shop.example"]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{site}");
    let site = site["id"].as_str().unwrap().to_owned();
    let hits: Vec<Value> = (0..30)
        .map(|i| {
            json!({"site_id": site, "url": format!("https://shop.example/p/{}", i % 4),
                        "context": [format!("c{}", i % 3)], "user": {"id": format!("u{}", i % 5)}})
        })
        .collect();
    let (status, ack) = admin.post("/api/v1/track", Value::Array(hits)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{ack}");
    let conversation = Uuid::new_v4();
    let mut events = vec![
        json!({"type": "NEW_CONVERSATION", "timestamp": "2026-11-30T10:00:00",
                                 "data": {"id": conversation}}),
    ];
    for i in 0..3 {
        events.push(
            json!({"type": "NEW_MESSAGE", "timestamp": format!("2026-11-30T10:00:0{}", i + 1),
            "data": {"id": Uuid::new_v4(), "direction": "RECEIVED", "content": format!("olá {i}"),
                     "conversation_id": conversation}}),
        );
    }
    for event in events {
        let (status, ack) = admin.post("/api/v1/webhook", event).await;
        assert_eq!(status, StatusCode::OK, "{ack}");
    }
    let (status, lead) = admin
        .post(
            "/api/v1/leads",
            json!({"site_id": site, "name": "Ana Souza", "email": "ana@example.com"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{lead}");
    eventually(
        "everything stored and relayed",
        Duration::from_secs(30),
        || async {
            let stored = test_support::stored_count(&db.pool).await;
            let outboxes =
                count(&db.pool, "tracking_outbox").await + count(&db.pool, "webhook_outbox").await;
            (stored > sent.readings && outboxes == 0).then_some(())
        },
    )
    .await;

    let (from, to) = ("2020-01-01T00:00:00Z", "2030-01-01T00:00:00Z");
    let mut paths = vec![
        format!("/api/v1/sites/{site}/accesses?from={from}&to={to}&page_size=100"),
        format!("/api/v1/sites/{site}/accesses/daily?from=2026-01-01&to=2027-12-31"),
        "/api/v1/tracked-users/u1/contexts".to_owned(),
        format!("/api/v1/conversations/{conversation}"),
        "/api/v1/leads".to_owned(),
        "/api/v1/clients".to_owned(),
        "/api/v1/sensors?page_size=100".to_owned(),
    ];
    for s in &quiet {
        let id = s.sensor_id;
        paths.push(format!("/api/v1/sensors/{id}/readings?page_size=500"));
        paths.push(format!("/api/v1/sensors/{id}/readings/latest"));
        paths.push(format!(
            "/api/v1/sensors/{id}/daily-averages?from=2026-01-01&to=2027-12-31&tz=America/Sao_Paulo"
        ));
    }
    let before = admin.answers(&paths).await;

    // The other two sensors keep publishing while the backup runs.
    let load = tokio::spawn(termopar_device_sim::run(sim(&broker, busy.clone(), None)));
    eventually(
        "readings of the busy sensors arrive",
        Duration::from_secs(20),
        || async {
            (test_support::stored_count(&db.pool).await > 1 + sent.readings + 50).then_some(())
        },
    )
    .await;
    let dir = tempdir();
    let backed_up = termopar(&["backup", "--to", dir.to_str().unwrap()], &db, &mongo).unwrap();
    assert!(backed_up.contains("backed up into"), "{backed_up}");
    assert!(
        termopar(&["backup", "--to", dir.to_str().unwrap()], &db, &mongo)
            .unwrap_err()
            .contains("is not empty"),
        "a second backup into the same directory"
    );
    load.abort();
    node.stop().await;

    let (restored_db, restored_mongo) = (TestDb::new().await, TestMongo::new());
    let restored = termopar(
        &["restore", "--from", dir.to_str().unwrap()],
        &restored_db,
        &restored_mongo,
    )
    .unwrap();
    assert!(restored.contains("restored from"), "{restored}");
    // Every reading the index counts is in the document store, once, although the
    // backup ran while readings were stored and segments merged.
    let readings =
        test_support::stored_readings(&restored_db.pool, &restored_mongo.database().await).await;
    let mut ids: Vec<Uuid> = readings.iter().map(|r| r.id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), readings.len(), "a reading restored twice");
    assert_eq!(
        readings.len() as u64,
        test_support::stored_count(&restored_db.pool).await,
        "the index and the raw documents disagree"
    );
    assert!(readings.len() as u64 > 1 + sent.readings + 50);
    // Restoring again into what is now not empty is refused, and changes nothing.
    let refused = termopar(
        &["restore", "--from", dir.to_str().unwrap()],
        &restored_db,
        &restored_mongo,
    )
    .unwrap_err();
    assert!(refused.contains("not empty"), "{refused}");
    assert_eq!(
        test_support::stored_count(&restored_db.pool).await,
        readings.len() as u64
    );

    // A node on the restored stores answers as the original did, and takes new readings.
    let node = Node::start(edge_settings(&restored_db, &restored_mongo)).await;
    let (base, broker) = (node.base.clone(), node.broker.url());
    let admin = Admin::login(&base).await;
    let after = admin.answers(&paths).await;
    for ((path, before), after) in paths.iter().zip(&before).zip(&after) {
        assert_eq!(
            before, after,
            "GET {path} answers differently after the restore"
        );
    }
    let stored = test_support::stored_count(&restored_db.pool).await;
    eventually(
        "a restored node stores new readings",
        Duration::from_secs(20),
        || async {
            termopar_device_sim::run(sim(&broker, quiet.clone(), Some(2)))
                .await
                .unwrap();
            (test_support::stored_count(&restored_db.pool).await > stored).then_some(())
        },
    )
    .await;
    let (status, _) = admin
        .post(
            "/api/v1/sites",
            json!({"client_id": quiet[0].client_id, "name": "second", "origins": []}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    node.stop().await;
}

/// A new directory under the target directory, removed by nobody (tests leave their
/// backups for a look).
fn tempdir() -> std::path::PathBuf {
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("backup-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(dir.parent().unwrap()).unwrap();
    dir
}
