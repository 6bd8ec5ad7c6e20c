//! `make bench-webhook`: webhook events accepted and persisted per second with 32
//! concurrent senders (wrk), against a Django REST Framework implementation of the same
//! seed (bench/drf) on the same machine, the same PostgreSQL and the same load.

use std::{path::PathBuf, time::Duration};

use termopar_bench::{ms, per_sec, print_table, wrk_with, Load, Row};
use termopar_core::settings::env_parse;
use test_support::{TestDb, TestMongo};
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

/// The DRF baseline, serving on a fresh database with `conversations` conversations.
struct Drf {
    // Stopped before its database goes.
    server: termopar_bench::Drf,
    conversations: Vec<String>,
    db: TestDb,
}

impl Drf {
    async fn start(conversations: usize) -> anyhow::Result<Self> {
        let db = TestDb::new().await;
        let server = termopar_bench::Drf::start(&db).await?;
        let http = reqwest::Client::new();
        let mut ids = Vec::new();
        for _ in 0..conversations {
            let id = Uuid::new_v4();
            let resp = http
                .post(format!("{}/webhook/", server.base))
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
        Ok(Self {
            server,
            conversations: ids,
            db,
        })
    }

    async fn stored(&self) -> anyhow::Result<u64> {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM chat_message")
            .fetch_one(&self.db.pool)
            .await?;
        Ok(n as u64)
    }
}

/// Flushes the dirty pages of the whole PostgreSQL cluster (any database's connection
/// will do).
async fn checkpoint(pg: &sqlx::PgPool) -> anyhow::Result<()> {
    sqlx::query("CHECKPOINT").execute(pg).await?;
    Ok(())
}

/// What one side's rounds add up to.
#[derive(Default)]
struct Side {
    /// Requests/s of each round.
    rates: Vec<f64>,
    /// Worst p99 of any round.
    p99: Duration,
    errors: u64,
}

impl Side {
    fn add(&mut self, (load, errors): (Load, u64)) {
        self.rates.push(load.rps);
        self.p99 = self.p99.max(load.p99);
        self.errors += errors;
    }

    /// Mean rate (the rounds are equally long).
    fn rps(&self) -> f64 {
        self.rates.iter().sum::<f64>() / self.rates.len() as f64
    }
}

/// The API's runtime threads (`BENCH_API_THREADS`, default 1). On these 2 cores the API
/// shares the machine with PostgreSQL, FerretDB and wrk; one thread spares it the
/// cross-thread wake-ups of a second (each answer woke a parked worker), which cost
/// ~30% of its CPU per event (45 -> 31 us measured, same load). `TOKIO_WORKER_THREADS`
/// sets the same for `termopar-api`.
fn main() -> anyhow::Result<()> {
    let threads: usize = env_parse("BENCH_API_THREADS", 1)?;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?
        .block_on(bench(threads))
}

async fn bench(api_threads: usize) -> anyhow::Result<()> {
    let seconds: u32 = env_parse("BENCH_SECONDS", 5)?;
    let rounds: u32 = env_parse("BENCH_ROUNDS", 4)?;
    let conversations = 500;

    // Both servers run side by side on fresh databases and take turns under the load,
    // DRF then termopar, round after round: a machine whose speed drifts (a shared
    // host) slows both alike, so the ratio holds. Each turn starts after a checkpoint,
    // and ours ends when the relay has moved every raw record to MongoDB, so neither
    // side does its work during the other's turn.
    let drf = match Drf::start(conversations).await {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("DRF baseline not measured: {e:#}");
            None
        }
    };
    let db = TestDb::new().await;
    let mongo = TestMongo::new();
    let (base, handles) = termopar_bench::start_api(&db, &mongo).await?;
    let state = &handles.state;
    let events = termopar_chat::seed(&handles.chat, conversations, 0)
        .await
        .map_err(|e| anyhow::anyhow!("{}", e.message()))?;
    let ids: Vec<String> = events
        .iter()
        .map(|e| e.id().to_string())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();

    let (mut theirs, mut ours) = (Side::default(), Side::default());
    let mut drained = Duration::ZERO;
    for round in 1..=rounds {
        if let Some(drf) = &drf {
            checkpoint(&state.pg).await?;
            theirs.add(run_load(&drf.server.base, &drf.conversations, seconds)?);
        }
        checkpoint(&state.pg).await?;
        ours.add(run_load(&base, &ids, seconds)?);
        drained += termopar_bench::drain_outbox(&state.pg, "webhook_outbox").await?;
        eprintln!(
            "round {round}: termopar {:.0}/s, DRF {}",
            ours.rates.last().unwrap(),
            theirs
                .rates
                .last()
                .map_or("-".into(), |r| format!("{r:.0}/s"))
        );
    }
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM messages")
        .fetch_one(&state.pg)
        .await?;
    let raw_copies = mongo
        .database()
        .await
        .collection::<mongodb::bson::Document>(termopar_chat::EVENTS)
        .count_documents(mongodb::bson::doc! {})
        .await?
        - events.len() as u64;
    let loaded = f64::from(seconds * rounds);
    let with_raw = raw_copies as f64 / (loaded + drained.as_secs_f64());
    let baseline = match &drf {
        Some(drf) => Some((theirs.rps(), drf.stored().await?, drf.server.workers)),
        None => None,
    };
    let ratio = |rate: f64| baseline.map(|(drf, _, _)| rate / drf);
    let round_ratios = ours
        .rates
        .iter()
        .zip(&theirs.rates)
        .map(|(o, t)| o / t)
        .collect::<Vec<_>>();

    let mut rows = vec![Row {
        name: format!("webhook NEW_MESSAGE events/s, {CONNECTIONS} concurrent senders (persisted in PostgreSQL, kept raw in MongoDB), API on {api_threads} runtime thread(s), mean of {rounds} turns of {seconds} s"),
        value: per_sec(ours.rps()),
        baseline: match baseline {
            Some((drf, _, workers)) => format!("{} Django REST Framework + gunicorn ({workers} sync workers), same PostgreSQL, turns between ours", per_sec(drf)),
            None => "DRF baseline could not be set up here".into(),
        },
        ratio: ratio(ours.rps()),
        target: "≥ 20×".into(),
        met: ratio(ours.rps()).map(|r| r >= 20.0),
    }];
    if !round_ratios.is_empty() {
        let (lo, hi) = round_ratios
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), r| (lo.min(*r), hi.max(*r)));
        rows.push(Row {
            name: "ratio of each turn to the DRF turn before it: lowest / highest".into(),
            value: format!("{lo:.1}× / {hi:.1}×"),
            baseline: String::new(),
            ratio: None,
            target: String::new(),
            met: None,
        });
    }
    rows.push(Row {
        name: format!(
            "the same, counted until every raw copy is in MongoDB ({} in all after the turns)",
            ms(drained)
        ),
        value: per_sec(with_raw),
        baseline: baseline.map_or(String::new(), |(drf, _, _)| format!("{} DRF", per_sec(drf))),
        ratio: ratio(with_raw),
        target: "≥ 20×".into(),
        met: ratio(with_raw).map(|r| r >= 20.0),
    });
    rows.push(Row {
        name: "p99 latency (worst turn)".into(),
        value: ms(ours.p99),
        baseline: baseline.map_or(String::new(), |_| format!("{} DRF", ms(theirs.p99))),
        ratio: None,
        target: "".into(),
        met: None,
    });
    rows.push(Row {
        name: "answers that were not 2xx / messages stored".into(),
        value: format!("{} / {stored}", ours.errors),
        baseline: baseline.map_or(String::new(), |(_, s, _)| {
            format!("{} / {s} DRF", theirs.errors)
        }),
        ratio: None,
        target: "0 errors".into(),
        met: Some(ours.errors == 0),
    });
    eprintln!("termopar: {stored} messages stored, {raw_copies} raw copies in MongoDB");
    print_table(
        "Webhook processor (2 cores; wrk with 1 thread on the same machine)",
        &rows,
    );
    Ok(())
}
