//! `make bench-webhook`: webhook events accepted and persisted per second with 32
//! concurrent senders (wrk), against a Django REST Framework implementation of the same
//! seed (bench/drf) on the same machine, the same PostgreSQL and the same load.

use std::{
    net::TcpStream,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use termopar_bench::{ms, per_sec, print_table, wrk_with, Load, Row};
use termopar_core::settings::env_parse;
use test_support::{free_port, TestDb, TestMongo};
use uuid::Uuid;

const CONNECTIONS: u32 = 32;

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("webhook.lua")
}

/// Runs the load against `base`, each request a new message in one of `conversations`
/// (handed to the wrk script in a temporary file).
fn run_load(base: &str, conversations: &[String], seconds: u32) -> anyhow::Result<(Load, u64)> {
    let file = std::env::temp_dir().join(format!("conversations-{}", Uuid::new_v4().simple()));
    std::fs::write(&file, conversations.join("\n"))?;
    let env = [("CONVERSATIONS", file.to_str().unwrap())];
    let result = wrk_with(
        &format!("{base}/webhook/"),
        &[],
        Some((&script(), &env)),
        seconds,
        CONNECTIONS,
    );
    let _ = std::fs::remove_file(&file);
    result
}

/// The DRF baseline on a fresh database; `None` when it cannot be set up here.
async fn drf(seconds: u32, conversations: usize) -> anyhow::Result<(Load, u64, u64)> {
    let db = TestDb::new().await;
    let port = free_port();
    let out = Command::new(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("drf/run.sh"))
        .arg(port.to_string())
        .env("DRF_DATABASE_URL", &db.url)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "DRF setup failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pid: i32 = String::from_utf8_lossy(&out.stdout).trim().parse()?;
    let stop = Gunicorn(pid);
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "gunicorn did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let mut ids = Vec::new();
    for _ in 0..conversations {
        let id = Uuid::new_v4();
        let resp = http
            .post(format!("{base}/webhook/"))
            .json(&serde_json::json!({"type": "NEW_CONVERSATION", "timestamp": "2026-01-01T09:00:00", "data": {"id": id}}))
            .send()
            .await?;
        anyhow::ensure!(
            resp.status().is_success(),
            "DRF refused a conversation: {}",
            resp.status()
        );
        ids.push(id.to_string());
    }
    let (load, errors) = run_load(&base, &ids, seconds)?;
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM chat_message")
        .fetch_one(&db.pool)
        .await?;
    drop(stop);
    Ok((load, errors, stored as u64))
}

/// Flushes PostgreSQL's dirty pages.
async fn checkpoint() -> anyhow::Result<()> {
    let db = TestDb::new().await;
    sqlx::query("CHECKPOINT").execute(&db.pool).await?;
    Ok(())
}

/// Kills the gunicorn process group when dropped.
struct Gunicorn(i32);
impl Drop for Gunicorn {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("--")
            .arg(format!("-{}", self.0))
            .status();
        let _ = Command::new("kill").arg(self.0.to_string()).status();
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let seconds: u32 = env_parse("BENCH_SECONDS", 10)?;
    let conversations = 500;

    // The baseline first, then termopar, each on a fresh database after a checkpoint, so
    // neither pays for the other's writes (dirty pages, autovacuum).
    checkpoint().await?;
    let baseline = match drf(seconds, conversations).await {
        Ok(b) => Some(b),
        Err(e) => {
            eprintln!("DRF baseline not measured: {e:#}");
            None
        }
    };
    checkpoint().await?;
    let db = TestDb::new().await;
    let mongo = TestMongo::new();
    let (base, state) = termopar_bench::start_api(&db, &mongo).await?;
    let events = termopar_api::webhook::seed(&state, conversations, 0)
        .await
        .map_err(|e| anyhow::anyhow!("{}", e.message()))?;
    let ids: Vec<String> = events
        .iter()
        .map(|e| e.id().to_string())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let (ours, our_errors) = run_load(&base, &ids, seconds)?;
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM messages")
        .fetch_one(&state.pg)
        .await?;
    // The raw copies reach MongoDB through the outbox: time how long after the load the
    // relay has moved them all, and count them.
    let drain_started = Instant::now();
    loop {
        let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM webhook_outbox")
            .fetch_one(&state.pg)
            .await?;
        if pending == 0 {
            break;
        }
        anyhow::ensure!(
            drain_started.elapsed() < Duration::from_secs(300),
            "{pending} raw records still in the outbox after 5 minutes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drained = drain_started.elapsed();
    let raw_copies = mongo
        .database()
        .await
        .collection::<mongodb::bson::Document>(termopar_api::webhook::EVENTS)
        .count_documents(mongodb::bson::doc! {})
        .await?
        - events.len() as u64;
    let with_raw = raw_copies as f64 / (f64::from(seconds) + drained.as_secs_f64());
    eprintln!(
        "termopar: {:.0} events/s, p99 {:?}, {our_errors} non-2xx, {stored} messages stored, \
         {raw_copies} raw copies in MongoDB {drained:?} after the load",
        ours.rps, ours.p99
    );

    let mut rows = vec![Row {
        name: format!("webhook NEW_MESSAGE events/s, {CONNECTIONS} concurrent senders (persisted in PostgreSQL, kept raw in MongoDB)"),
        value: per_sec(ours.rps),
        baseline: match &baseline {
            Some((drf, _, _)) => format!("{} Django REST Framework + gunicorn ({} workers), same PostgreSQL", per_sec(drf.rps), num_cpus()),
            None => "DRF baseline could not be set up here".into(),
        },
        ratio: baseline.as_ref().map(|(drf, _, _)| ours.rps / drf.rps),
        target: "≥ 20×".into(),
        met: baseline.as_ref().map(|(drf, _, _)| ours.rps / drf.rps >= 20.0),
    }];
    rows.push(Row {
        name: format!(
            "the same, counted until every raw copy is in MongoDB ({} after the load)",
            ms(drained)
        ),
        value: per_sec(with_raw),
        baseline: match &baseline {
            Some((drf, _, _)) => format!("{} DRF", per_sec(drf.rps)),
            None => String::new(),
        },
        ratio: baseline.as_ref().map(|(drf, _, _)| with_raw / drf.rps),
        target: "≥ 20×".into(),
        met: baseline
            .as_ref()
            .map(|(drf, _, _)| with_raw / drf.rps >= 20.0),
    });
    rows.push(Row {
        name: "p99 latency".into(),
        value: ms(ours.p99),
        baseline: baseline
            .as_ref()
            .map_or(String::new(), |(drf, _, _)| format!("{} DRF", ms(drf.p99))),
        ratio: None,
        target: "".into(),
        met: None,
    });
    rows.push(Row {
        name: "answers that were not 2xx / messages stored".into(),
        value: format!("{our_errors} / {stored}"),
        baseline: baseline
            .as_ref()
            .map_or(String::new(), |(_, e, s)| format!("{e} / {s} DRF")),
        ratio: None,
        target: "0 errors".into(),
        met: Some(our_errors == 0),
    });
    print_table(
        "Webhook processor (2 cores; wrk with 1 thread on the same machine)",
        &rows,
    );
    Ok(())
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
