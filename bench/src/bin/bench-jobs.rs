//! `make bench-jobs`: no-op jobs through the lead pipeline's job system (apalis on
//! PostgreSQL, the same workers and settings as the pipeline's queues): jobs/s end to
//! end (enqueued in transactions of 100 by 4 producers, until every one is done), and
//! enqueue-to-start latency when jobs arrive one per transaction at a steady rate.
//! Baseline, in the same run on the same PostgreSQL: a bare queue of our own on the
//! same table shape cost (claim a batch with `FOR UPDATE SKIP LOCKED`, run, mark done),
//! the least a durable PostgreSQL queue with job history does.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use termopar_bench::{ms, per_sec, percentile, print_table, Row};
use termopar_core::{settings::env_parse, tasks::Tasks};
use termopar_leads::jobs::{self, Job, Queue};
use test_support::TestDb;

const PRODUCERS: usize = 4;
const BATCH: usize = 100;

/// What one run measured.
struct Run {
    jobs_per_sec: f64,
    latency: Option<(Duration, Duration)>,
}

/// A pool on `db` as large as the API's default.
async fn pool(db: &TestDb) -> anyhow::Result<PgPool> {
    Ok(sqlx::postgres::PgPoolOptions::new()
        .max_connections(16)
        .connect(&db.url)
        .await?)
}

fn job() -> Job {
    Job {
        record_id: uuid::Uuid::nil(),
        qualified_at: None,
        enqueued_at: Utc::now(),
    }
}

/// Polls `count_done` until it reaches `n` (or 5 minutes pass).
async fn until_done<F, Fut>(n: i64, mut count_done: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<i64>>,
{
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let done = count_done().await?;
        if done >= n {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "only {done} of {n} jobs done");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Enqueues `total` jobs from [`PRODUCERS`] tasks in transactions of [`BATCH`].
async fn burst<F, Fut>(pg: &PgPool, total: usize, enqueue: F) -> anyhow::Result<()>
where
    F: Fn(PgPool, usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let mut producers = Vec::new();
    for p in 0..PRODUCERS {
        let (pg, enqueue) = (pg.clone(), enqueue.clone());
        let mine = total / PRODUCERS + usize::from(p < total % PRODUCERS);
        producers.push(tokio::spawn(async move {
            let mut left = mine;
            while left > 0 {
                let n = left.min(BATCH);
                enqueue(pg.clone(), n).await?;
                left -= n;
            }
            anyhow::Ok(())
        }));
    }
    for p in producers {
        p.await??;
    }
    Ok(())
}

/// Enqueues `total` jobs one per transaction at `rate` per second.
async fn paced<F, Fut>(pg: &PgPool, total: usize, rate: u32, enqueue: F) -> anyhow::Result<()>
where
    F: Fn(PgPool, usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
    for _ in 0..total {
        tick.tick().await;
        enqueue(pg.clone(), 1).await?;
    }
    Ok(())
}

fn latencies(samples: Vec<(DateTime<Utc>, DateTime<Utc>)>) -> (Duration, Duration) {
    percentiles(
        samples
            .into_iter()
            .map(|(enq, start)| (start - enq).to_std().unwrap_or_default())
            .collect(),
    )
}

fn percentiles(mut d: Vec<Duration>) -> (Duration, Duration) {
    (percentile(&mut d, 50.0), percentile(&mut d, 99.0))
}

/// Every `jobs_start_latency_seconds` the workers record: the time from a job's
/// enqueueing to its handler's start, as the handler sees it. (The job's row says when
/// it was claimed, but apalis writes a claim's `Running` and `Done` only when the
/// worker next polls, up to its poll interval later.)
struct Starts(std::sync::Mutex<Vec<Duration>>);

static STARTS: Starts = Starts(std::sync::Mutex::new(Vec::new()));

impl Starts {
    fn take(&self) -> Vec<Duration> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

/// A recorder that keeps the start latencies and drops every other metric.
struct StartRecorder;

impl metrics::Recorder for StartRecorder {
    fn describe_counter(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_gauge(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_histogram(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn register_counter(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        metrics::Counter::noop()
    }
    fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::noop()
    }
    fn register_histogram(
        &self,
        key: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        if key.name() == "jobs_start_latency_seconds" {
            metrics::Histogram::from_arc(std::sync::Arc::new(StartsRef))
        } else {
            metrics::Histogram::noop()
        }
    }
}

/// [`STARTS`] as a histogram handle.
struct StartsRef;

impl metrics::HistogramFn for StartsRef {
    fn record(&self, value: f64) {
        STARTS
            .0
            .lock()
            .unwrap()
            .push(Duration::from_secs_f64(value));
    }
}

// ---- termopar: apalis-postgres with the pipeline's workers ----

async fn apalis_enqueue(pg: PgPool, n: usize) -> anyhow::Result<()> {
    let jobs: Vec<Job> = (0..n).map(|_| job()).collect();
    let mut tx = pg.begin().await?;
    jobs::enqueue(&mut tx, Queue::Noop, &jobs, 3).await?;
    tx.commit().await?;
    Ok(())
}

async fn apalis_done(pg: &PgPool) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM apalis.jobs WHERE job_type = 'noop' AND status = 'Done'",
    )
    .fetch_one(pg)
    .await?)
}

async fn apalis_run(total: usize, paced_total: usize, rate: u32) -> anyhow::Result<(Run, Run)> {
    let db = TestDb::new().await;
    let pg = pool(&db).await?;
    termopar_leads::migrate(&pg).await?;
    let tasks = Tasks::new();
    let settings = termopar_api::settings::LeadsSettings::from_env()?;
    let jwt = termopar_web::tokens::Jwt::new(&termopar_web::settings::AuthSettings::default());
    let wakeups = termopar_leads::jobs::Wakeups::start(&tasks, &pg, &termopar_leads::jobs::QUEUES);
    termopar_leads::run_workers(&settings, &pg, jwt, "http://127.0.0.1:9", &tasks, &wakeups)?;

    let started = Instant::now();
    burst(&pg, total, apalis_enqueue).await?;
    until_done(total as i64, || apalis_done(&pg)).await?;
    let burst_run = Run {
        jobs_per_sec: total as f64 / started.elapsed().as_secs_f64(),
        latency: None,
    };
    sqlx::query("DELETE FROM apalis.jobs WHERE job_type = 'noop'")
        .execute(&pg)
        .await?;

    STARTS.take();
    paced(&pg, paced_total, rate, apalis_enqueue).await?;
    until_done(paced_total as i64, || apalis_done(&pg)).await?;
    let samples = STARTS.take();
    anyhow::ensure!(
        samples.len() >= paced_total,
        "only {} of {paced_total} starts recorded",
        samples.len()
    );
    let paced_run = Run {
        jobs_per_sec: rate as f64,
        latency: Some(percentiles(samples)),
    };
    tasks.shutdown(Duration::from_secs(10)).await;
    Ok((burst_run, paced_run))
}

// ---- baseline: a bare PostgreSQL queue ----

async fn bare_enqueue(pg: PgPool, n: usize) -> anyhow::Result<()> {
    let payloads: Vec<serde_json::Value> = (0..n)
        .map(|_| serde_json::to_value(job()).expect("a job serializes"))
        .collect();
    sqlx::query("INSERT INTO bare_jobs (payload) SELECT * FROM unnest($1::jsonb[])")
        .bind(payloads)
        .execute(&pg)
        .await?;
    sqlx::query("SELECT pg_notify('bare_jobs', '')")
        .execute(&pg)
        .await?;
    Ok(())
}

async fn bare_done(pg: &PgPool) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM bare_jobs WHERE status = 'done'")
            .fetch_one(pg)
            .await?,
    )
}

/// One worker of the bare queue: claims up to `batch` jobs, runs them (no-ops), marks
/// them done; waits for a `NOTIFY` (or 100 ms) when there are none.
async fn bare_worker(pg: PgPool, batch: i64, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    let mut listener = sqlx::postgres::PgListener::connect_with(&pg).await?;
    listener.listen("bare_jobs").await?;
    while !stop.load(Ordering::Relaxed) {
        let claimed: Vec<i64> = sqlx::query_scalar(
            "UPDATE bare_jobs SET status = 'running', started_at = clock_timestamp()
             WHERE id IN (SELECT id FROM bare_jobs WHERE status = 'pending'
                          ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)
             RETURNING id",
        )
        .bind(batch)
        .fetch_all(&pg)
        .await?;
        if claimed.is_empty() {
            let _ = tokio::time::timeout(Duration::from_millis(100), listener.recv()).await;
            continue;
        }
        sqlx::query("UPDATE bare_jobs SET status = 'done', done_at = now() WHERE id = ANY($1)")
            .bind(&claimed)
            .execute(&pg)
            .await?;
    }
    Ok(())
}

async fn bare_run(
    total: usize,
    paced_total: usize,
    rate: u32,
    workers: usize,
    batch: i64,
) -> anyhow::Result<(Run, Run)> {
    let db = TestDb::new().await;
    let pg = pool(&db).await?;
    sqlx::query(
        "CREATE TABLE bare_jobs (id bigserial PRIMARY KEY, payload jsonb NOT NULL,
             status text NOT NULL DEFAULT 'pending', enqueued_at timestamptz NOT NULL
             DEFAULT clock_timestamp(), started_at timestamptz, done_at timestamptz)",
    )
    .execute(&pg)
    .await?;
    sqlx::query("CREATE INDEX bare_jobs_pending ON bare_jobs (id) WHERE status = 'pending'")
        .execute(&pg)
        .await?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for _ in 0..workers {
        handles.push(tokio::spawn(bare_worker(pg.clone(), batch, stop.clone())));
    }
    let started = Instant::now();
    burst(&pg, total, bare_enqueue).await?;
    until_done(total as i64, || bare_done(&pg)).await?;
    let burst_run = Run {
        jobs_per_sec: total as f64 / started.elapsed().as_secs_f64(),
        latency: None,
    };
    sqlx::query("TRUNCATE bare_jobs").execute(&pg).await?;
    paced(&pg, paced_total, rate, bare_enqueue).await?;
    until_done(paced_total as i64, || bare_done(&pg)).await?;
    let samples: Vec<(DateTime<Utc>, DateTime<Utc>)> =
        sqlx::query_as("SELECT enqueued_at, started_at FROM bare_jobs WHERE status = 'done'")
            .fetch_all(&pg)
            .await?;
    let paced_run = Run {
        jobs_per_sec: rate as f64,
        latency: Some(latencies(samples)),
    };
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.await??;
    }
    Ok((burst_run, paced_run))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    termopar_core::telemetry::init("warn");
    metrics::set_global_recorder(StartRecorder).expect("no recorder installed yet");
    let total: usize = env_parse("BENCH_JOBS", 20_000)?;
    let paced_total: usize = env_parse("BENCH_JOBS_PACED", 1_000)?;
    let rate: u32 = env_parse("BENCH_JOBS_RATE", 200)?;
    let settings = termopar_api::settings::LeadsSettings::from_env()?;
    // The bare queue gets as many workers as apalis has queues' workers for this one
    // queue (one), claiming batches of the same size.
    let (t_burst, t_paced) = apalis_run(total, paced_total, rate).await?;
    let (b_burst, b_paced) =
        bare_run(total, paced_total, rate, 1, settings.concurrency as i64).await?;
    let (t_lat, b_lat) = (
        t_paced.latency.expect("measured"),
        b_paced.latency.expect("measured"),
    );
    let rows = vec![
        Row {
            name: format!(
                "no-op jobs/s end to end ({total} jobs enqueued by {PRODUCERS} producers in transactions of {BATCH}, until all done)"
            ),
            value: per_sec(t_burst.jobs_per_sec),
            baseline: format!("{} bare SKIP LOCKED queue", per_sec(b_burst.jobs_per_sec)),
            ratio: Some(t_burst.jobs_per_sec / b_burst.jobs_per_sec),
            target: "≥ 5,000/s".into(),
            met: Some(t_burst.jobs_per_sec >= 5_000.0),
        },
        Row {
            name: format!("enqueue→start p50, {paced_total} jobs one per transaction at {rate}/s"),
            value: ms(t_lat.0),
            baseline: format!("{} bare queue", ms(b_lat.0)),
            ratio: Some(t_lat.0.as_secs_f64() / b_lat.0.as_secs_f64().max(1e-6)),
            target: "≤ 10 ms".into(),
            met: Some(t_lat.0 <= Duration::from_millis(10)),
        },
        Row {
            name: "enqueue→start p99, same".into(),
            value: ms(t_lat.1),
            baseline: format!("{} bare queue", ms(b_lat.1)),
            ratio: Some(t_lat.1.as_secs_f64() / b_lat.1.as_secs_f64().max(1e-6)),
            target: String::new(),
            met: None,
        },
        Row::info(
            "worker settings",
            format!(
                "JOBS_CONCURRENCY={} (also the batch a worker claims), one worker per queue, woken by NOTIFY (one listener per process) + 1 s poll",
                settings.concurrency
            ),
        ),
    ];
    print_table(
        "Jobs (2 cores; workers and PostgreSQL on the same machine)",
        &rows,
    );
    Ok(())
}
