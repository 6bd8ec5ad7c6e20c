//! Faults under load, on an edge node with stores of its own: FerretDB killed and
//! restarted, its disk made read-only for a while, PostgreSQL stopped and started again,
//! while devices publish with QoS 1 and the webhook takes deliveries. Each ends with exact
//! counts: every reading the broker acknowledged is stored once, every delivery answered
//! is kept once, and no request got a 500 (what needs the store that is away answers
//! 503).

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use reqwest::StatusCode;
use serde_json::json;
use test_support::{eventually, PrivateFerret, PrivatePg, ReadOnlyDisk, TestDb, TestMongo};
use uuid::Uuid;

use crate::{
    assert_acknowledged_stored_once, edge_settings, publish_from_each, publish_window,
    wait_until_subscribed, Acked, Node,
};

/// What the webhook sender got.
#[derive(Default)]
struct Deliveries {
    /// Answered with a status other than 503.
    answered: u64,
    /// Answered 503.
    unavailable: u64,
    /// Answered 5xx other than 503 (must stay 0).
    errors: Vec<String>,
}

/// Posts conversations of three messages until `stop`.
async fn deliver_until(base: String, stop: Arc<AtomicBool>, seen: Arc<Mutex<Deliveries>>) {
    let http = reqwest::Client::new();
    while !stop.load(Ordering::Acquire) {
        let conversation = Uuid::new_v4();
        let mut events = vec![
            json!({"type": "NEW_CONVERSATION", "timestamp": "2026-11-30T10:00:00",
                                     "data": {"id": conversation}}),
        ];
        for i in 0..3 {
            events.push(
                json!({"type": "NEW_MESSAGE", "timestamp": format!("2026-11-30T10:00:0{}", i + 1),
                "data": {"id": Uuid::new_v4(), "direction": "RECEIVED", "content": "olá",
                         "conversation_id": conversation}}),
            );
        }
        for event in events {
            let Ok(response) = http
                .post(format!("{base}/api/v1/webhook"))
                .json(&event)
                .send()
                .await
            else {
                return; // the node stopped
            };
            let status = response.status();
            let mut seen = seen.lock().unwrap();
            match status {
                StatusCode::SERVICE_UNAVAILABLE => seen.unavailable += 1,
                s if s.is_server_error() => seen.errors.push(format!("webhook: {s}")),
                _ => seen.answered += 1,
            }
        }
    }
}

/// The store a test takes away and brings back.
enum Store {
    /// FerretDB, killed and started again on the same files.
    Documents(PrivateFerret),
    /// PostgreSQL, stopped (`-m fast`) and started again.
    Postgres(PrivatePg),
    /// FerretDB's disk made read-only for a while (its writes fail with `EROFS`), then
    /// writable again; FerretDB itself keeps running.
    ReadOnlyDisk(PrivateFerret, Option<ReadOnlyDisk>),
}

impl Store {
    fn name(&self) -> &'static str {
        match self {
            Store::Documents(_) => "document store restarted",
            Store::Postgres(_) => "PostgreSQL restarted",
            Store::ReadOnlyDisk(..) => "document store's disk read-only",
        }
    }

    async fn take_away(&mut self) {
        match self {
            Store::Documents(ferret) => ferret.kill(),
            Store::Postgres(pg) => pg.stop(),
            Store::ReadOnlyDisk(ferret, fault) => *fault = Some(ferret.read_only_disk().await),
        }
    }

    async fn bring_back(&mut self) {
        match self {
            Store::Documents(ferret) => ferret.restart().await,
            Store::Postgres(pg) => pg.start_again().await,
            Store::ReadOnlyDisk(_, fault) => {
                let fault = fault.take().expect("the disk was made read-only");
                // Long enough for the consumer and the webhook relay to retry again and
                // again.
                let since = std::time::Instant::now();
                eventually(
                    "40 writes refused by the read-only disk",
                    Duration::from_secs(60),
                    || async { (fault.failed_writes() >= 40).then_some(()) },
                )
                .await;
                eprintln!("read-only for {:?}", since.elapsed());
                let refused = fault.end();
                eprintln!("document store's disk read-only: {refused} writes refused with EROFS");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_store_restarted_under_mqtt_and_webhook_load_loses_nothing() {
    let ferret = PrivateFerret::start(std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))).await;
    let db = TestDb::new().await;
    let mongo = TestMongo {
        settings: ferret.settings("faults"),
    };
    restart_under_load(Store::Documents(ferret), &db, &mongo).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_store_s_disk_read_only_under_mqtt_and_webhook_load_loses_nothing() {
    let ferret = PrivateFerret::start(std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))).await;
    let db = TestDb::new().await;
    let mongo = TestMongo {
        settings: ferret.settings("readonly"),
    };
    restart_under_load(Store::ReadOnlyDisk(ferret, None), &db, &mongo).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_restarted_under_mqtt_and_webhook_load_loses_nothing() {
    let pg = PrivatePg::start().await;
    let db = TestDb::on(pg.options()).await;
    let mongo = TestMongo::new();
    restart_under_load(Store::Postgres(pg), &db, &mongo).await;
}

/// A consumer kept from its store while devices publish as fast as they can, each with
/// thousands of readings in flight: nothing is acknowledged while nothing can be stored;
/// the broker's buffer (4 MiB here) would drop what the consumer has not read once full,
/// so the front stops taking publishes before that; every acknowledged reading is stored
/// once the store is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_are_held_back_while_the_consumer_cannot_store_and_nothing_is_lost() {
    const BUFFER: usize = 4 * 1024 * 1024;
    let mut ferret = PrivateFerret::start(std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))).await;
    let db = TestDb::new().await;
    let mongo = TestMongo {
        settings: ferret.settings("holdback"),
    };
    let mut settings = edge_settings(&db, &mongo);
    settings.broker.buffer_bytes = Some(BUFFER);
    let node = Node::start(settings).await;
    let sensors =
        termopar_device_sim::provision(&node.base, "admin@edge.test", "edge-admin-pw", 4, false)
            .await
            .unwrap();
    wait_until_subscribed(&node, &sensors[0], &db).await;

    ferret.kill();
    // Each device may have 5,000 readings in flight (~1 MB as the broker counts them):
    // together far more than the buffer.
    let acked = Acked::default();
    let publishers: Vec<_> = sensors
        .iter()
        .map(|s| {
            tokio::spawn(publish_window(
                node.mqtt(),
                s.clone(),
                5_000,
                None,
                false,
                acked.clone(),
            ))
        })
        .collect();
    eventually(
        "the front holding devices back",
        Duration::from_secs(120),
        || async { (node.broker.stats().held_back > 0).then_some(()) },
    )
    .await;
    let held_at = acked.lock().unwrap().len();
    assert_eq!(
        held_at, 0,
        "readings acknowledged while the document store was away"
    );

    ferret.restart().await;
    eventually(
        "publishing again once the store is back",
        Duration::from_secs(120),
        || async { (acked.lock().unwrap().len() >= 2_000).then_some(()) },
    )
    .await;
    let front = node.broker.clone();
    node.stop().await;
    let mut published = 0;
    for p in publishers {
        published += p.await.unwrap().len();
    }
    let acked = acked.lock().unwrap().clone();
    let stored = assert_acknowledged_stored_once(&db, &mongo.database().await, &acked).await;
    eprintln!(
        "held back: 0 readings acknowledged while the store was away, the front held devices \
         back {} times; {published} published, {} acknowledged, {stored} stored, lost 0, twice 0",
        front.stats().held_back,
        acked.len()
    );
}

async fn restart_under_load(mut store: Store, db: &TestDb, mongo: &TestMongo) {
    let node = Node::start(edge_settings(db, mongo)).await;
    let base = node.base.clone();
    let sensors =
        termopar_device_sim::provision(&base, "admin@edge.test", "edge-admin-pw", 2, false)
            .await
            .unwrap();
    wait_until_subscribed(&node, &sensors[0], db).await;
    let http = reqwest::Client::new();
    let token = termopar_device_sim::login(&http, &base, "admin@edge.test", "edge-admin-pw")
        .await
        .unwrap();

    // 800 readings/s in all: what a loaded CI machine still stores, so
    // the backlog the outage leaves drains at shutdown.
    let (acked, publishers) = publish_from_each(&node, &sensors, Duration::from_millis(5));
    let stop_deliveries = Arc::new(AtomicBool::new(false));
    let deliveries = Arc::new(Mutex::new(Deliveries::default()));
    let sender = tokio::spawn(deliver_until(
        base.clone(),
        stop_deliveries.clone(),
        deliveries.clone(),
    ));
    let acked_now = || acked.lock().unwrap().len();
    let answered_now = || {
        let d = deliveries.lock().unwrap();
        d.answered + d.unavailable
    };
    let progress = |what: &'static str, readings: usize, answered: u64| {
        let (acked, deliveries) = (acked.clone(), deliveries.clone());
        eventually(what, Duration::from_secs(60), move || {
            let (acked, deliveries) = (acked.clone(), deliveries.clone());
            async move {
                let d = deliveries.lock().unwrap();
                (acked.lock().unwrap().len() >= readings && d.answered + d.unavailable >= answered)
                    .then_some(())
            }
        })
    };
    progress("load before the fault", 200, 40).await;

    store.take_away().await;
    // While it lasts, devices wait for their acknowledgements (a reading is acknowledged
    // once stored; the broker holds them, the consumer retries), deliveries are answered
    // (200 while PostgreSQL keeps them, else 503), and reads answer from the caches or
    // with a 503, within seconds: never a 500, never a hang.
    let sensor = sensors[0].sensor_id;
    let reads_during = [
        format!("/api/v1/sensors/{sensor}/readings?page_size=500"),
        format!("/api/v1/sensors/{sensor}/daily-averages?from=2026-01-01&to=2027-12-31"),
    ];
    let mut reads = Vec::new();
    for path in &reads_during {
        let status = http
            .get(format!("{base}{path}"))
            .bearer_auth(&token)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path} while the document store is away: {e}"))
            .status();
        reads.push((path.clone(), status));
    }
    // (Deliveries wait for a connection up to the pool's 3 s while PostgreSQL is away.)
    progress("load during the fault", 0, answered_now() + 3).await;

    store.bring_back().await;
    progress(
        "load after the fault",
        acked_now() + 200,
        answered_now() + 40,
    )
    .await;
    for path in &reads_during {
        eventually("reads answer again", Duration::from_secs(30), || async {
            let status = http
                .get(format!("{base}{path}"))
                .bearer_auth(&token)
                .send()
                .await
                .unwrap()
                .status();
            (status == StatusCode::OK).then_some(())
        })
        .await;
    }

    // Stop: the node drains the broker into the stores before it ends.
    stop_deliveries.store(true, Ordering::Release);
    sender.await.unwrap();
    node.stop().await;
    for p in publishers {
        p.await.unwrap();
    }

    let documents = mongo.database().await;
    let acked = acked.lock().unwrap().clone();
    let total = assert_acknowledged_stored_once(db, &documents, &acked).await;
    let deliveries = std::mem::take(&mut *deliveries.lock().unwrap());
    assert!(deliveries.errors.is_empty(), "{:?}", deliveries.errors);
    assert!(
        reads
            .iter()
            .all(|(_, s)| *s == StatusCode::OK || *s == StatusCode::SERVICE_UNAVAILABLE),
        "{reads:?}"
    );
    let kept = documents
        .collection::<mongodb::bson::Document>(termopar_chat::webhook::EVENTS)
        .count_documents(mongodb::bson::doc! {})
        .await
        .unwrap();
    // A delivery answered 503 may still have been committed (its answer lost as the
    // server stopped); one answered otherwise must be kept.
    assert!(
        kept >= deliveries.answered && kept <= deliveries.answered + deliveries.unavailable,
        "{kept} deliveries kept raw, {} answered, {} answered 503",
        deliveries.answered,
        deliveries.unavailable
    );
    let outbox: i64 = sqlx::query_scalar("SELECT count(*) FROM webhook_outbox")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(outbox, 0, "the relay caught up");
    eprintln!(
        "{}: readings acknowledged {}, stored {total}, lost 0, twice 0; deliveries answered {} \
         (503: {}), kept {kept}; reads during the fault: {reads:?}",
        store.name(),
        acked.len(),
        deliveries.answered,
        deliveries.unavailable
    );
}
