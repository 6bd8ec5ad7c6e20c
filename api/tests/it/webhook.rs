//! The chat webhook processor with the seed's own example payloads.

use reqwest::StatusCode;
use serde_json::{json, Value};
use termopar_api::Application;
use uuid::Uuid;

use crate::harness::*;

const CONVERSATION: &str = "6a41b347-8d80-4ce9-84ba-7af66f369f6a";

/// The four events of seed 001, exactly as written there.
fn seed_events() -> Vec<Value> {
    vec![
        json!({"type": "NEW_CONVERSATION", "timestamp": "2025-02-21T10:20:41.349308", "data": {"id": "6a41b347-8d80-4ce9-84ba-7af66f369f6a"}}),
        json!({"type": "NEW_MESSAGE", "timestamp": "2025-02-21T10:20:42.349308", "data": {"id": "49108c71-4dca-4af3-9f32-61bc745926e2", "direction": "RECEIVED", "content": "Olá, tudo bem?", "conversation_id": "6a41b347-8d80-4ce9-84ba-7af66f369f6a"}}),
        json!({"type": "NEW_MESSAGE", "timestamp": "2025-02-21T10:20:44.349308", "data": {"id": "16b63b04-60de-4257-b1a1-20a5154abc6d", "direction": "SENT", "content": "Tudo ótimo e você?", "conversation_id": "6a41b347-8d80-4ce9-84ba-7af66f369f6a"}}),
        json!({"type": "CLOSE_CONVERSATION", "timestamp": "2025-02-21T10:20:45.349308", "data": {"id": "6a41b347-8d80-4ce9-84ba-7af66f369f6a"}}),
    ]
}

fn message(id: Uuid, conversation: &str, ts: &str, content: &str) -> Value {
    json!({"type": "NEW_MESSAGE", "timestamp": ts, "data": {"id": id, "direction": "SENT", "content": content, "conversation_id": conversation}})
}

#[tokio::test]
async fn the_seeds_example_events_build_a_closed_conversation() {
    let app = TestApp::spawn().await;
    for event in seed_events() {
        let (status, ack) = app.webhook(&event).await;
        assert_eq!(status, StatusCode::OK, "{ack}");
        assert_eq!(ack["status"], "processed");
        assert_eq!(ack["type"], event["type"]);
    }
    let (status, c) = app.conversation(CONVERSATION).await;
    assert_eq!(status, StatusCode::OK, "{c}");
    assert_eq!(c["state"], "CLOSED");
    let time = |v: &Value| {
        v.as_str()
            .unwrap()
            .parse::<chrono::DateTime<chrono::Utc>>()
            .unwrap()
            .to_rfc3339()
    };
    assert_eq!(time(&c["created_at"]), "2025-02-21T10:20:41.349308+00:00");
    assert_eq!(time(&c["closed_at"]), "2025-02-21T10:20:45.349308+00:00");
    let contents: Vec<&str> = c["messages"]["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert_eq!(contents, vec!["Olá, tudo bem?", "Tudo ótimo e você?"]);
    assert_eq!(c["messages"]["items"][0]["direction"], "RECEIVED");
    assert_eq!(c["messages"]["total"], 2);

    // The same operations under every path the issue names.
    let (status, _) = app
        .get(&format!("/conversations/{CONVERSATION}"), &app.admin)
        .await;
    assert_eq!(status, StatusCode::OK);
    for path in ["/webhook", "/api/v1/webhook", "/api/v1/webhook/"] {
        let (status, ack) = app
            .webhook_raw(path, serde_json::to_vec(&seed_events()[0]).unwrap(), &[])
            .await;
        assert_eq!(
            (status, ack["status"].as_str()),
            (StatusCode::OK, Some("duplicate")),
            "{path}"
        );
    }
}

#[tokio::test]
async fn the_rules_of_conversations_hold_and_redeliveries_are_idempotent() {
    let app = TestApp::spawn().await;
    let c = Uuid::new_v4().to_string();
    let open =
        json!({"type": "NEW_CONVERSATION", "timestamp": "2026-01-01T10:00:00", "data": {"id": c}});
    let close = json!({"type": "CLOSE_CONVERSATION", "timestamp": "2026-01-01T11:00:00", "data": {"id": c}});
    let early = message(
        Uuid::new_v4(),
        &c,
        "2026-01-01T10:30:00",
        "before the close",
    );
    let early_late_delivery = message(
        Uuid::new_v4(),
        &c,
        "2026-01-01T10:59:59.999999",
        "sent before, delivered after",
    );
    let after = message(Uuid::new_v4(), &c, "2026-01-01T11:00:00", "after the close");

    let orphan = message(
        Uuid::new_v4(),
        &Uuid::new_v4().to_string(),
        "2026-01-01T10:00:00",
        "hello?",
    );
    let got = app.webhook(&orphan).await;
    assert_error(&got, StatusCode::NOT_FOUND, "conversation_not_found");
    let got = app.webhook(&json!({"type": "CLOSE_CONVERSATION", "timestamp": "2026-01-01T11:00:00", "data": {"id": Uuid::new_v4()}})).await;
    assert_error(&got, StatusCode::NOT_FOUND, "conversation_not_found");

    assert_eq!(app.webhook(&open).await.1["status"], "processed");
    assert_eq!(app.webhook(&open).await.1["status"], "duplicate");
    let mut other_open = open.clone();
    other_open["timestamp"] = json!("2026-01-01T10:00:01");
    assert_error(
        &app.webhook(&other_open).await,
        StatusCode::CONFLICT,
        "conflict",
    );

    assert_eq!(app.webhook(&early).await.1["status"], "processed");
    assert_eq!(app.webhook(&early).await.1["status"], "duplicate");
    let mut reused = early.clone();
    reused["data"]["content"] = json!("something else");
    assert_error(
        &app.webhook(&reused).await,
        StatusCode::CONFLICT,
        "conflict",
    );

    assert_eq!(app.webhook(&close).await.1["status"], "processed");
    assert_eq!(app.webhook(&close).await.1["status"], "duplicate");
    assert_error(
        &app.webhook(&after).await,
        StatusCode::CONFLICT,
        "conversation_closed",
    );
    assert_eq!(
        app.webhook(&early_late_delivery).await.1["status"],
        "processed"
    );
    assert_eq!(
        app.webhook(&early).await.1["status"],
        "duplicate",
        "same outcome after the close"
    );

    let (_, conv) = app.conversation(&c).await;
    assert_eq!(conv["state"], "CLOSED");
    let contents: Vec<&str> = conv["messages"]["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert_eq!(
        contents,
        vec!["before the close", "sent before, delivered after"]
    );
}

#[tokio::test]
async fn no_body_whatever_it_is_gets_a_server_error() {
    let app = TestApp::spawn().await;
    let c = Uuid::new_v4();
    app.webhook(
        &json!({"type": "NEW_CONVERSATION", "timestamp": "2026-01-01T10:00:00", "data": {"id": c}}),
    )
    .await;
    let long = "x".repeat(70_000);
    let cases: Vec<(&str, Vec<u8>, StatusCode, &str)> = vec![
        ("not JSON", b"type=NEW_CONVERSATION".to_vec(), StatusCode::BAD_REQUEST, "bad_request"),
        ("truncated", br#"{"type": "NEW_CONV"#.to_vec(), StatusCode::BAD_REQUEST, "bad_request"),
        ("empty", vec![], StatusCode::BAD_REQUEST, "bad_request"),
        ("binary", vec![0, 159, 146, 150], StatusCode::BAD_REQUEST, "bad_request"),
        ("array", b"[]".to_vec(), StatusCode::UNPROCESSABLE_ENTITY, "validation_failed"),
        ("null", b"null".to_vec(), StatusCode::UNPROCESSABLE_ENTITY, "validation_failed"),
        ("no type", json!({"timestamp": "2026-01-01T10:00:00", "data": {"id": c}}).to_string().into_bytes(), StatusCode::UNPROCESSABLE_ENTITY, "validation_failed"),
        ("type not a string", json!({"type": 5, "timestamp": "2026-01-01T10:00:00", "data": {"id": c}}).to_string().into_bytes(), StatusCode::UNPROCESSABLE_ENTITY, "validation_failed"),
        ("unknown type", json!({"type": "DELETE_EVERYTHING", "timestamp": "2026-01-01T10:00:00", "data": {"id": c}}).to_string().into_bytes(), StatusCode::UNPROCESSABLE_ENTITY, "unknown_event_type"),
        ("lowercase type", json!({"type": "new_conversation", "timestamp": "2026-01-01T10:00:00", "data": {"id": c}}).to_string().into_bytes(), StatusCode::UNPROCESSABLE_ENTITY, "unknown_event_type"),
        ("no timestamp", json!({"type": "NEW_CONVERSATION", "data": {"id": c}}).to_string().into_bytes(), StatusCode::UNPROCESSABLE_ENTITY, "validation_failed"),
        ("bad timestamp", json!({"type": "NEW_CONVERSATION", "timestamp": "yesterday", "data": {"id": c}}).to_string().into_bytes(), StatusCode::UNPROCESSABLE_ENTITY, "validation_failed"),
        ("timestamp before PostgreSQL's range", json!({"type": "NEW_CONVERSATION", "timestamp": "-5000-01-01T00:00:00", "data": {"id": Uuid::new_v4()}}).to_string().into_bytes(), StatusCode::UNPROCESSABLE_ENTITY, "validation_failed"),
        ("timestamp in year 200000", json!({"type": "NEW_CONVERSATION", "timestamp": "+200000-01-01T00:00:00", "data": {"id": Uuid::new_v4()}}).to_string().into_bytes(), StatusCode::UNPROCESSABLE_ENTITY, "validation_failed"),
        ("message in year 0", json!({"type": "NEW_MESSAGE", "timestamp": "0000-01-01T00:00:00", "data": {"id": Uuid::new_v4(), "direction": "SENT", "content": "x", "conversation_id": c}}).to_string().into_bytes(), StatusCode::UNPROCESSABLE_ENTITY, "validation_failed"),
        ("timestamp as number", json!({"type": "NEW_CONVERSATION", "timestamp": 1700000000, "data": {"id": c}}).to_string().into_bytes(), StatusCode::UNPROCESSABLE_ENTITY, "validation_failed"),
        ("no data", json!({"type": "NEW_CONVERSATION", "timestamp": "2026-01-01T10:00:00"}).to_string().into_bytes(), StatusCode::UNPROCESSABLE_ENTITY, "validation_failed"),
        ("data a string", json!({"type": "NEW_CONVERSATION", "timestamp": "2026-01-01T10:00:00", "data": "x"}).to_string().into_bytes(), StatusCode::UNPROCESSABLE_ENTITY, "validation_failed"),
        ("bad uuid", json!({"type": "NEW_CONVERSATION", "timestamp": "2026-01-01T10:00:00", "data": {"id": "123"}}).to_string().into_bytes(), StatusCode::UNPROCESSABLE_ENTITY, "validation_failed"),
        ("uuid as number", json!({"type": "CLOSE_CONVERSATION", "timestamp": "2026-01-01T10:00:00", "data": {"id": 123}}).to_string().into_bytes(), StatusCode::UNPROCESSABLE_ENTITY, "validation_failed"),
        ("bad direction", json!({"type": "NEW_MESSAGE", "timestamp": "2026-01-01T10:00:00", "data": {"id": Uuid::new_v4(), "direction": "SIDEWAYS", "content": "x", "conversation_id": c}}).to_string().into_bytes(), StatusCode::UNPROCESSABLE_ENTITY, "validation_failed"),
        ("content not a string", json!({"type": "NEW_MESSAGE", "timestamp": "2026-01-01T10:00:00", "data": {"id": Uuid::new_v4(), "direction": "SENT", "content": ["x"], "conversation_id": c}}).to_string().into_bytes(), StatusCode::UNPROCESSABLE_ENTITY, "validation_failed"),
        ("huge content", json!({"type": "NEW_MESSAGE", "timestamp": "2026-01-01T10:00:00", "data": {"id": Uuid::new_v4(), "direction": "SENT", "content": long, "conversation_id": c}}).to_string().into_bytes(), StatusCode::UNPROCESSABLE_ENTITY, "validation_failed"),
        ("NUL in content", json!({"type": "NEW_MESSAGE", "timestamp": "2026-01-01T10:00:00", "data": {"id": Uuid::new_v4(), "direction": "SENT", "content": "a\u{0}b", "conversation_id": c}}).to_string().into_bytes(), StatusCode::UNPROCESSABLE_ENTITY, "validation_failed"),
        ("bad conversation id", json!({"type": "NEW_MESSAGE", "timestamp": "2026-01-01T10:00:00", "data": {"id": Uuid::new_v4(), "direction": "SENT", "content": "x", "conversation_id": "nope"}}).to_string().into_bytes(), StatusCode::UNPROCESSABLE_ENTITY, "validation_failed"),
        ("body over the limit", vec![b' '; MAX_BODY + 1], StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
    ];
    for (what, body, status, code) in cases {
        let got = app.webhook_raw("/webhook/", body, &[]).await;
        assert_eq!(got.0, status, "{what}: {}", got.1);
        assert_eq!(got.1["code"], code, "{what}");
    }
    let text = read(
        app.http
            .post(app.url("/webhook/"))
            .header("content-type", "text/plain")
            .body("{}")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_error(
        &text,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    );
    // Extra fields are ignored, not refused.
    let extra = json!({"type": "NEW_MESSAGE", "timestamp": "2026-01-01T10:00:01", "source": "whatsapp", "data": {"id": Uuid::new_v4(), "direction": "SENT", "content": "ok", "conversation_id": c, "channel": 7}});
    assert_eq!(app.webhook(&extra).await.0, StatusCode::OK);
    let (_, conv) = app.conversation(&c.to_string()).await;
    assert_eq!(
        conv["messages"]["total"], 1,
        "only the valid message is stored"
    );
}

#[tokio::test]
async fn signatures_are_checked_when_a_secret_is_set() {
    let db = test_support::TestDb::new().await;
    let mongo = test_support::TestMongo::new();
    let mut s = settings(&db, &mongo);
    s.webhook.secret = Some(secrecy::SecretString::from("webhook-secret"));
    let base = serve(Application::build(s).await.unwrap());
    let http = reqwest::Client::new();
    let body = serde_json::to_vec(&seed_events()[0]).unwrap();
    let post = |sig: Option<String>| {
        let mut req = http
            .post(format!("{base}/webhook/"))
            .header("content-type", "application/json")
            .body(body.clone());
        if let Some(sig) = sig {
            req = req.header("x-signature", sig);
        }
        async move { read(req.send().await.unwrap()).await }
    };
    assert_error(
        &post(None).await,
        StatusCode::UNAUTHORIZED,
        "invalid_signature",
    );
    assert_error(
        &post(Some("sha256=00".into())).await,
        StatusCode::UNAUTHORIZED,
        "invalid_signature",
    );
    assert_error(
        &post(Some(termopar_chat::webhook::sign("other-secret", &body))).await,
        StatusCode::UNAUTHORIZED,
        "invalid_signature",
    );
    let ok = post(Some(termopar_chat::webhook::sign("webhook-secret", &body))).await;
    assert_eq!(ok.0, StatusCode::OK, "{}", ok.1);
}

fn recorded(d: &mongodb::bson::Document) -> (i32, String) {
    (
        d.get_i32("status").unwrap(),
        d.get_str("code").unwrap().to_owned(),
    )
}

#[tokio::test]
async fn every_delivery_is_kept_raw_with_its_outcome() {
    let app = TestApp::spawn().await;
    for event in seed_events() {
        app.webhook(&event).await;
    }
    app.webhook(&seed_events()[1]).await;
    app.webhook_raw(
        "/webhook/",
        b"garbage".to_vec(),
        &[("x-request-id", "req-42")],
    )
    .await;
    app.webhook_raw("/webhook/", vec![0xff, 0xfe, 0x00], &[])
        .await;

    let mut docs = raw_records(&app._mongo.database().await, 7).await;
    let binary = docs.pop().unwrap();
    assert_eq!(recorded(&binary), (400, "bad_request".into()));
    assert_eq!(
        binary.get_binary_generic("body_bytes").unwrap(),
        &vec![0xff, 0xfe, 0x00]
    );
    let last = docs.pop().unwrap();
    assert_eq!(recorded(&last), (400, "bad_request".into()));
    assert_eq!(last.get_str("request_id").unwrap(), "req-42");
    assert_eq!(last.get_str("body").unwrap(), "garbage");
    assert_eq!(recorded(&docs[4]), (200, "duplicate".into()));
    for d in &docs[..4] {
        assert_eq!(recorded(d), (200, "processed".into()));
    }
    assert_eq!(docs[1].get_str("content_type").unwrap(), "application/json");
    let body: serde_json::Value = serde_json::from_str(docs[1].get_str("body").unwrap()).unwrap();
    assert_eq!(body, seed_events()[1], "the body as sent");
    // Only what the body does not say: its type and id are read from it. (The document
    // store puts `_id` first.)
    let keys: Vec<&str> = docs[1].keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "_id",
            "received_at",
            "content_type",
            "body",
            "status",
            "code"
        ]
    );
    // Nothing is left in the outbox once MongoDB has everything.
    let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM webhook_outbox")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(pending, 0);
}

#[tokio::test]
async fn outbox_rows_larger_than_a_relay_step_all_reach_mongodb() {
    use termopar_chat::webhook::{relay, RawRecord, MAX_RAW_BYTES};
    let app = TestApp::spawn().await;
    // Three groups of 20 records of the largest body kept whole: ~5 MiB each, so a relay
    // step (at most 8 MiB of records) takes one row at a time.
    let mut expected = Vec::new();
    for group in 0..3 {
        let records: Vec<_> = (0..20)
            .map(|k| {
                let body = format!("{group}-{k:02}-").into_bytes();
                let mut body = body.repeat(MAX_RAW_BYTES / body.len());
                body.truncate(MAX_RAW_BYTES);
                expected.push(body.clone());
                relay::document(&RawRecord::new(&Default::default(), &body))
            })
            .collect();
        sqlx::query(
            "INSERT INTO webhook_outbox (documents, statuses, codes)
             VALUES ($1, array_fill(400::int2, ARRAY[20]), array_fill('bad_request'::text, ARRAY[20]))",
        )
        .bind(relay::pack(records.iter().map(|r| &**r)))
        .execute(&app.db.pool)
        .await
        .unwrap();
    }
    let docs = raw_records(&app._mongo.database().await, expected.len()).await;
    let bodies: Vec<Vec<u8>> = docs
        .iter()
        .map(|d| d.get_str("body").unwrap().as_bytes().to_vec())
        .collect();
    assert_eq!(bodies, expected, "every record, whole, in order of _id");
    assert!(docs
        .iter()
        .all(|d| recorded(d) == (400, "bad_request".into())));
}

#[tokio::test]
async fn a_group_relayed_again_after_a_lost_commit_is_stored_once() {
    use termopar_chat::webhook::{relay, RawRecord};
    let app = TestApp::spawn().await;
    let records: Vec<_> = [b"one".as_slice(), b"two"]
        .iter()
        .map(|body| relay::document(&RawRecord::new(&Default::default(), body)))
        .collect();
    let packed = relay::pack(records.iter().map(|r| &**r));
    let outbox_empty = || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM webhook_outbox")
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
        (n == 0).then_some(())
    };
    // The same row twice, as when MongoDB took a group and the relay's commit was lost.
    for _ in 0..2 {
        sqlx::query(
            "INSERT INTO webhook_outbox (id, created_at, documents, statuses, codes)
             OVERRIDING SYSTEM VALUE
             VALUES (1000000, '2026-11-23T10:00:00Z', $1, '{400,400}', '{bad_request,bad_request}')",
        )
        .bind(&packed)
        .execute(&app.db.pool)
        .await
        .unwrap();
        test_support::eventually(
            "the relay to take the row",
            test_support::DEFAULT_DEADLINE,
            outbox_empty,
        )
        .await;
    }
    let docs = raw_records(&app._mongo.database().await, 2).await;
    let bodies: Vec<&str> = docs.iter().map(|d| d.get_str("body").unwrap()).collect();
    assert_eq!(bodies, ["one", "two"]);
    assert!(docs
        .iter()
        .all(|d| recorded(d) == (400, "bad_request".into())));
    assert_eq!(raw_count(&app._mongo.database().await).await, 2);
}

#[tokio::test]
async fn the_webhook_keeps_working_while_mongodb_is_down_and_catches_up_after() {
    let db = test_support::TestDb::new().await;
    let mongo = test_support::TestMongo::new();
    let target = mongo.settings.uri.trim_start_matches("mongodb://");
    let proxy = test_support::Proxy::start(
        tokio::net::lookup_host(target.trim_end_matches('/'))
            .await
            .unwrap()
            .next()
            .unwrap(),
    )
    .await;
    let mut s = settings(&db, &mongo);
    s.mongo.uri = format!(
        "mongodb://{}/?serverSelectionTimeoutMS=500&connectTimeoutMS=500",
        proxy.addr
    );
    let base = serve(Application::build(s).await.unwrap());
    let http = reqwest::Client::new();
    proxy.cut();

    let mut events = seed_events();
    events.push(events[1].clone()); // a redelivery
    for event in &events {
        let got = read(
            http.post(format!("{base}/webhook/"))
                .json(event)
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    }
    let state: String = sqlx::query_scalar("SELECT state FROM conversations WHERE id = $1")
        .bind(Uuid::parse_str(CONVERSATION).unwrap())
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(state, "CLOSED");
    let pending: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(cardinality(codes)), 0)::bigint FROM webhook_outbox",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(pending, 5, "the raw records wait in PostgreSQL");

    proxy.restore();
    let docs = raw_records(&mongo.database().await, 5).await;
    let codes: Vec<(i32, String)> = docs.iter().map(recorded).collect();
    assert_eq!(codes[4], (200, "duplicate".into()));
    assert!(
        codes[..4].iter().all(|c| *c == (200, "processed".into())),
        "{codes:?}"
    );
}

#[tokio::test]
async fn with_postgresql_down_the_webhook_answers_503_and_still_keeps_the_delivery_raw() {
    let db = test_support::TestDb::new().await;
    let mongo = test_support::TestMongo::new();
    let mut s = settings(&db, &mongo);
    let dead_pg = dead_postgres();
    s.database = dead_pg.clone();
    let pg = termopar_core::db::connect_lazy(&dead_pg).unwrap();
    let app = Application::with_stores(&s, pg, mongo.database().await).unwrap();
    let base = serve(app);

    let got = read(
        reqwest::Client::new()
            .post(format!("{base}/webhook/"))
            .json(&seed_events()[0])
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_error(&got, StatusCode::SERVICE_UNAVAILABLE, "storage_unavailable");
    let docs = raw_records(&mongo.database().await, 1).await;
    assert_eq!(recorded(&docs[0]), (503, "storage_unavailable".into()));
    assert!(docs[0]
        .get_str("body")
        .unwrap()
        .contains("NEW_CONVERSATION"));
}

#[tokio::test]
async fn a_writer_whose_connection_was_cut_reconnects_and_loses_nothing() {
    let app = TestApp::spawn().await;
    let events = seed_events();
    assert_eq!(app.webhook(&events[0]).await.0, StatusCode::OK);
    // Cut every connection the API holds to its database (the writer keeps one from
    // group to group), as a PostgreSQL restart or a network cut would.
    let cut: i64 = sqlx::query_scalar(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
         WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert!(cut > 0);

    // The sender retries what is refused; the first try may meet the dead connection
    // (503, retryable), and a retry is then applied on a new one.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(15);
    let mut answers = Vec::new();
    let ack = loop {
        let (status, body) = app.webhook(&events[1]).await;
        answers.push(status);
        match status {
            StatusCode::OK => break body,
            StatusCode::SERVICE_UNAVAILABLE => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "still refused: {body}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            other => panic!("unexpected answer {other}: {body}"),
        }
    };
    assert_eq!(ack["status"], "processed", "a refused try applied nothing");
    let (_, c) = app.conversation(CONVERSATION).await;
    assert_eq!(c["messages"]["total"], 1);
    // Every answer, refused or not, is on record.
    let docs = raw_records(&app._mongo.database().await, 1 + answers.len()).await;
    let mut statuses: Vec<i32> = docs.iter().map(|d| recorded(d).0).collect();
    let mut expected: Vec<i32> = answers.iter().map(|s| i32::from(s.as_u16())).collect();
    expected.push(200); // the conversation
    statuses.sort();
    expected.sort();
    assert_eq!(statuses, expected);
}

#[tokio::test]
async fn the_outbox_compresses_its_records_with_lz4() {
    let app = TestApp::spawn().await;
    let method: String = sqlx::query_scalar(
        "SELECT attcompression::text FROM pg_attribute
         WHERE attrelid = 'webhook_outbox'::regclass AND attname = 'documents'",
    )
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(method, "l", "lz4 (PostgreSQL here is built with it)");
}

#[tokio::test]
async fn conversations_are_listed_by_state_and_their_messages_paginated() {
    let app = TestApp::spawn().await;
    let events = termopar_chat::seed(&app.handles.chat, 3, 7).await.unwrap();
    assert_eq!(events.len(), 3 + 21 + 1);

    let (status, all) = app.get("/conversations", &app.admin).await;
    assert_eq!(status, StatusCode::OK, "{all}");
    assert_eq!(all["total"], 3);
    let created: Vec<&str> = all["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["created_at"].as_str().unwrap())
        .collect();
    assert!(created.windows(2).all(|w| w[0] > w[1]), "newest first");
    assert_eq!(
        app.get("/conversations?state=CLOSED", &app.admin).await.1["total"],
        1
    );
    assert_eq!(
        app.get("/conversations?state=OPEN", &app.admin).await.1["total"],
        2
    );
    assert_error(
        &app.get("/conversations?state=closed", &app.admin).await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );

    let id = all["items"][0]["id"].as_str().unwrap();
    assert_eq!(all["items"][0]["message_count"], 7);
    let mut seen = Vec::new();
    for page in 1..=3 {
        let (_, c) = app
            .get(
                &format!("/conversations/{id}?page={page}&page_size=3"),
                &app.admin,
            )
            .await;
        assert_eq!(c["messages"]["total"], 7);
        seen.extend(
            c["messages"]["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["timestamp"].as_str().unwrap().to_owned()),
        );
    }
    assert_eq!(seen.len(), 7);
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "oldest first");

    let (_, viewer) = app
        .user_with_token("viewer", Some(id_of_new_client(&app).await.as_str()))
        .await;
    assert_error(
        &app.get(&format!("/conversations/{id}"), &viewer).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    let anonymous = read(
        app.http
            .get(app.url(&format!("/conversations/{id}")))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_error(&anonymous, StatusCode::UNAUTHORIZED, "unauthorized");
    assert_error(
        &app.get(&format!("/conversations/{}", Uuid::new_v4()), &app.admin)
            .await,
        StatusCode::NOT_FOUND,
        "not_found",
    );

    let page = app
        .http
        .get(app.url("/ui/conversations"))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let html = page.text().await.unwrap();
    assert!(html.contains("/api/v1/conversations") || html.contains("\"/conversations"));
}

async fn id_of_new_client(app: &TestApp) -> String {
    id(&app
        .create_client(&format!("c-{}", Uuid::new_v4().simple()))
        .await)
    .to_owned()
}
