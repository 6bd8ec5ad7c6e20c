//! Request ids, and what a shutdown keeps.

use std::sync::{Arc, Mutex};

use reqwest::StatusCode;
use serde_json::json;
use termopar_api::Application;
use test_support::{TestDb, TestMongo};
use uuid::Uuid;

use crate::harness::*;

/// Every log line the test process writes, for tests that look for theirs.
fn logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: std::sync::OnceLock<Arc<Mutex<Vec<u8>>>> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let writer = buffer.clone();
        tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || Capture(writer.clone()))
            .try_init()
            .expect("no other subscriber in the test binary");
        buffer
    })
    .clone()
}

struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn a_request_id_is_kept_or_made_and_always_returned() {
    let app = TestApp::spawn().await;
    let get = |id: Option<String>| {
        let mut req = app
            .http
            .get(app.url("/api/v1/clients"))
            .bearer_auth(&app.admin);
        if let Some(id) = id {
            req = req.header("x-request-id", id);
        }
        req.send()
    };
    let theirs = format!("their-id-{}", Uuid::new_v4().simple());
    let resp = get(Some(theirs.clone())).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-request-id"], theirs.as_str());

    // None, or one that is not a sensible id (too long): a new UUID.
    for sent in [None, Some("x".repeat(200))] {
        let resp = get(sent).await.unwrap();
        let made = resp.headers()["x-request-id"].to_str().unwrap();
        assert!(Uuid::parse_str(made).is_ok(), "{made}");
    }
    // Errors carry it too, including routes that do not exist.
    let resp = app
        .http
        .get(app.url("/nope"))
        .header("x-request-id", "lost-1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(resp.headers()["x-request-id"], "lost-1");
}

#[tokio::test]
async fn a_log_line_written_while_serving_names_the_request() {
    let logs = logs();
    let mongo = TestMongo::new();
    let db = TestDb::new().await;
    let mut settings = settings(&db, &mongo);
    settings.database = dead_postgres();
    let pg = termopar_core::db::connect_lazy(&settings.database).unwrap();
    let mongo_db = termopar_core::mongo::connect(&settings.mongo)
        .await
        .unwrap();
    let base = serve(Application::with_stores(&settings, pg, mongo_db).unwrap());
    let id = format!("req-{}", Uuid::new_v4().simple());
    let resp = reqwest::Client::new()
        .post(format!("{base}/api/v1/auth/login"))
        .header("x-request-id", &id)
        .json(&json!({"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(resp.headers()["x-request-id"], id.as_str());
    let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    let line = text
        .lines()
        .find(|l| l.contains("PostgreSQL unavailable") && l.contains(&id));
    assert!(
        line.is_some(),
        "no log line of the failure names {id}:\n{text}"
    );
}

/// Shutdown while senders keep posting: every delivery answered is stored once, and its
/// raw record is in MongoDB when the application has stopped (the relay drained the
/// outbox); nothing unanswered is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_under_webhook_load_keeps_every_answered_delivery() {
    let db = TestDb::new().await;
    let mongo = TestMongo::new();
    let app = Application::build(settings(&db, &mongo)).await.unwrap();
    let base = format!("http://{}", app.addr());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until(async move {
        let _ = stopped.await;
    }));
    let answered = Arc::new(Mutex::new(Vec::new()));
    let senders: Vec<_> = (0..16)
        .map(|_| {
            let (base, answered) = (base.clone(), answered.clone());
            tokio::spawn(async move {
                // A connection per sender, kept alive: graceful shutdown finishes the
                // request in flight on each.
                let http = reqwest::Client::new();
                loop {
                    let id = Uuid::new_v4();
                    let event = json!({"type": "NEW_CONVERSATION",
                        "timestamp": "2026-12-02T10:00:00", "data": {"id": id}});
                    match http
                        .post(format!("{base}/webhook/"))
                        .json(&event)
                        .send()
                        .await
                    {
                        Ok(resp) => {
                            assert_eq!(resp.status(), StatusCode::OK);
                            answered.lock().unwrap().push(id);
                        }
                        Err(_) => return, // the server stopped accepting
                    }
                }
            })
        })
        .collect();
    test_support::eventually(
        "deliveries answered under load",
        test_support::DEFAULT_DEADLINE,
        || async { (answered.lock().unwrap().len() >= 500).then_some(()) },
    )
    .await;
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
    for s in senders {
        s.await.unwrap();
    }
    let answered = answered.lock().unwrap().clone();
    let mut stored: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM conversations")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    let mut expected = answered.clone();
    stored.sort();
    expected.sort();
    assert_eq!(
        stored, expected,
        "stored conversations are exactly the answered ones"
    );
    let outbox: i64 = sqlx::query_scalar("SELECT count(*) FROM webhook_outbox")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(outbox, 0, "the relay drained the outbox before stopping");
    let raw = raw_count(&mongo.database().await).await;
    assert_eq!(
        raw,
        answered.len() as u64,
        "one raw record per answered delivery"
    );
}
