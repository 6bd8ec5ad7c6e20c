//! The pipeline's background jobs, on apalis with its PostgreSQL storage: each arrow of
//! the seed's flow is a queue; a job is enqueued in the transaction that saves what
//! triggers it, run by a worker woken by `NOTIFY` (`wake`), retried with exponential backoff
//! and jitter, dead after `JOBS_MAX_ATTEMPTS` (or at once when a retry cannot help),
//! and run again elsewhere when its worker stops sending heartbeats.

use std::{sync::Arc, time::Duration};

use apalis::{
    layers::retry::RetryPolicy,
    layers::retry::{backoff::ExponentialBackoffMaker, backoff::MakeBackoff, HasherRng},
    prelude::*,
};
use apalis_postgres::{Config, PostgresStorage};
use chrono::{DateTime, Utc};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use termopar_core::tasks::Tasks;

pub use crate::wake::Wakeups;
use crate::{downstream::Downstream, settings::LeadsSettings};

/// The queues of the alarms' notifications (run by `termopar-alarms` on this job
/// system): an e-mail, a webhook.
pub const ALARM_QUEUES: [&str; 2] = ["alarm_email", "alarm_webhook"];

/// Every queue of the job system (the dashboard's): the seed's flow, in order, the
/// no-op queue, and the alarms'.
pub const QUEUES: [&str; 7] = [
    Queue::LeadToMarketing.name(),
    Queue::LeadToCrm.name(),
    Queue::QualifiedEmail.name(),
    Queue::CustomerToCrm.name(),
    Queue::Noop.name(),
    ALARM_QUEUES[0],
    ALARM_QUEUES[1],
];

/// One arrow of the flow, or the no-op queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queue {
    /// 1.1: a website lead posted to marketing.
    LeadToMarketing,
    /// 1.2: a website lead posted to the CRM.
    LeadToCrm,
    /// 2.1: a qualified CRM lead gets an e-mail.
    QualifiedEmail,
    /// 3.1: a website customer posted to the CRM.
    CustomerToCrm,
    /// Jobs that do nothing: the job system's own cost (`make bench-jobs`), and a probe
    /// that workers are taking jobs.
    Noop,
}

impl Queue {
    /// The queue's name (apalis's `job_type`).
    pub const fn name(self) -> &'static str {
        match self {
            Self::LeadToMarketing => "lead_to_marketing",
            Self::LeadToCrm => "lead_to_crm",
            Self::QualifiedEmail => "qualified_lead_email",
            Self::CustomerToCrm => "customer_to_crm",
            Self::Noop => "noop",
        }
    }
}

/// What a job of the pipeline carries: the record it is about, and when it was
/// enqueued (for the enqueue-to-start latency).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    /// The record (a website lead or customer, or a CRM lead).
    pub record_id: Uuid,
    /// CRM leads: the qualification the e-mail is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qualified_at: Option<DateTime<Utc>>,
    /// When it was enqueued.
    pub enqueued_at: DateTime<Utc>,
}

/// Enqueues `jobs` on `queue` within the caller's transaction: they exist exactly when
/// what triggered them does.
pub async fn enqueue(
    db: &mut PgConnection,
    queue: Queue,
    jobs: &[Job],
    max_attempts: u32,
) -> Result<(), sqlx::Error> {
    push(db, queue.name(), jobs, max_attempts).await
}

/// Enqueues `jobs` (any payload) on the queue named `queue`, within the caller's
/// transaction.
pub async fn push<J: Serialize>(
    db: &mut PgConnection,
    queue: &'static str,
    jobs: &[J],
    max_attempts: u32,
) -> Result<(), sqlx::Error> {
    let tasks = jobs
        .iter()
        .map(|job| {
            let bytes = serde_json::to_vec(job).expect("a job serializes");
            TaskBuilder::new(bytes)
                .max_attempts(max_attempts as usize)
                .build()
        })
        .collect::<Vec<_>>();
    apalis_postgres::queries::push_tasks(db, queue, tasks)
        .await
        .map_err(|e| match e {
            apalis_postgres::Error::Database(e) => e,
            other => sqlx::Error::Protocol(other.to_string()),
        })?;
    metrics::counter!("jobs_enqueued_total", "queue" => queue).increment(jobs.len() as u64);
    Ok(())
}

/// Runs `work` for one job of `queue` enqueued at `enqueued_at`, recording its metrics:
/// latency from enqueue to start, success, and failure (a retry to come, or dead at the
/// last attempt or when `work` aborted).
pub async fn observe<Fut>(
    queue: &'static str,
    enqueued_at: DateTime<Utc>,
    attempt: &Attempt,
    max_attempts: u32,
    work: Fut,
) -> Result<(), BoxDynError>
where
    Fut: std::future::Future<Output = Result<(), BoxDynError>>,
{
    let q = queue;
    if attempt.current() <= 1 {
        let waited = (Utc::now() - enqueued_at).to_std().unwrap_or_default();
        metrics::histogram!("jobs_start_latency_seconds", "queue" => q)
            .record(waited.as_secs_f64());
    }
    let started = std::time::Instant::now();
    let result = work.await;
    metrics::histogram!("jobs_run_seconds", "queue" => q).record(started.elapsed().as_secs_f64());
    match &result {
        Ok(()) => metrics::counter!("jobs_succeeded_total", "queue" => q).increment(1),
        Err(e) => {
            metrics::counter!("jobs_failed_total", "queue" => q).increment(1);
            let aborted = e.downcast_ref::<AbortError>().is_some();
            if aborted || attempt.current() >= max_attempts as usize {
                metrics::counter!("jobs_dead_total", "queue" => q).increment(1);
                tracing::warn!(queue = q, error = %e, attempt = attempt.current(), "job dead");
            } else {
                metrics::counter!("jobs_retried_total", "queue" => q).increment(1);
                tracing::info!(queue = q, error = %e, attempt = attempt.current(), "job failed; retrying");
            }
        }
    }
    result
}

/// What the workers need.
#[derive(Clone)]
pub(crate) struct Worker {
    pub downstream: Arc<Downstream>,
    pub max_attempts: u32,
}

async fn run(
    job: Job,
    worker: Data<Worker>,
    attempt: Attempt,
    queue: Queue,
) -> Result<(), BoxDynError> {
    let w = (*worker).clone();
    let enqueued_at = job.enqueued_at;
    observe(
        queue.name(),
        enqueued_at,
        &attempt,
        w.max_attempts,
        async move { w.downstream.carry(queue, &job).await },
    )
    .await
}

async fn lead_to_marketing(
    job: Job,
    worker: Data<Worker>,
    attempt: Attempt,
) -> Result<(), BoxDynError> {
    run(job, worker, attempt, Queue::LeadToMarketing).await
}

async fn lead_to_crm(job: Job, worker: Data<Worker>, attempt: Attempt) -> Result<(), BoxDynError> {
    run(job, worker, attempt, Queue::LeadToCrm).await
}

async fn qualified_email(
    job: Job,
    worker: Data<Worker>,
    attempt: Attempt,
) -> Result<(), BoxDynError> {
    run(job, worker, attempt, Queue::QualifiedEmail).await
}

async fn customer_to_crm(
    job: Job,
    worker: Data<Worker>,
    attempt: Attempt,
) -> Result<(), BoxDynError> {
    run(job, worker, attempt, Queue::CustomerToCrm).await
}

async fn noop(job: Job, worker: Data<Worker>, attempt: Attempt) -> Result<(), BoxDynError> {
    let max_attempts = worker.max_attempts;
    observe(
        Queue::Noop.name(),
        job.enqueued_at,
        &attempt,
        max_attempts,
        async { Ok(()) },
    )
    .await
}

/// apalis's tables (schema `apalis`), with their own migrations table so that neither
/// set of migrations sees the other's as missing.
pub(crate) async fn migrate(pg: &PgPool) -> anyhow::Result<()> {
    let mut migrator = PostgresStorage::<()>::migrations();
    migrator.dangerous_set_table_name("_apalis_migrations");
    migrator.run(pg).await?;
    Ok(())
}

/// Starts one worker per queue on `tasks`; each stops taking jobs when asked and
/// finishes the ones it holds.
pub(crate) fn start_workers(
    tasks: &Tasks,
    pg: &PgPool,
    settings: &LeadsSettings,
    wakeups: &Wakeups,
    worker: Worker,
) {
    let queues: [(Queue, Handler); 5] = [
        (Queue::LeadToMarketing, |j, w, a| {
            Box::pin(lead_to_marketing(j, w, a))
        }),
        (Queue::LeadToCrm, |j, w, a| Box::pin(lead_to_crm(j, w, a))),
        (Queue::QualifiedEmail, |j, w, a| {
            Box::pin(qualified_email(j, w, a))
        }),
        (Queue::CustomerToCrm, |j, w, a| {
            Box::pin(customer_to_crm(j, w, a))
        }),
        (Queue::Noop, |j, w, a| Box::pin(noop(j, w, a))),
    ];
    for (queue, handler) in queues {
        spawn_worker(
            tasks,
            pg,
            settings,
            wakeups,
            queue.name(),
            worker.clone(),
            handler,
        );
    }
}

/// A lead job's handler.
type Handler =
    fn(
        Job,
        Data<Worker>,
        Attempt,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), BoxDynError>> + Send>>;

/// Starts a worker of `queue` on `tasks`, running `handler` (with `data`) for its jobs
/// of payload `J`: woken by `wakeups` when one is enqueued, polled every second too (for
/// retries and jobs of dead workers), retried with `settings`' backoff. It stops taking
/// jobs when asked and finishes the ones it holds.
pub fn spawn_worker<J, D, F, Fut>(
    tasks: &Tasks,
    pg: &PgPool,
    settings: &LeadsSettings,
    wakeups: &Wakeups,
    queue: &'static str,
    data: D,
    handler: F,
) where
    J: Serialize + DeserializeOwned + Clone + Send + Sync + Unpin + 'static,
    D: Clone + Send + Sync + 'static,
    F: Fn(J, Data<D>, Attempt) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = Result<(), BoxDynError>> + Send + 'static,
{
    let config = Config::default()
        .queue(queue)
        .batch_size(settings.concurrency)
        .heartbeat_interval(settings.orphan_after / 3)
        .missed_heartbeats(3);
    let strategy = Strategy::new()
        .apply(wakeups.strategy(queue))
        .interval(Duration::from_secs(1));
    let backend = PostgresStorage::<J>::new(pg)
        .with_config(config)
        .poll_with_strategy(strategy);
    let backoff = ExponentialBackoffMaker::new(
        settings.backoff,
        settings.backoff_max,
        0.5,
        HasherRng::default(),
    )
    .expect("backoff bounds were validated")
    .make_backoff();
    let name = format!("{queue}-{}", Uuid::new_v4().simple());
    let retries = settings.max_attempts.saturating_sub(1) as usize;
    let concurrency = settings.concurrency;
    let built = WorkerBuilder::new(name)
        .backend(backend)
        .data(data)
        .retry(RetryPolicy::retries(retries).with_backoff(backoff))
        .concurrency(concurrency)
        .build(handler);
    tasks.spawn(queue, move |mut stop| async move {
        let stopped = async move {
            stop.requested().await;
            Ok::<(), std::io::Error>(())
        };
        if let Err(e) = built.run_until(stopped).await {
            tracing::error!(queue, error = %e, "job worker stopped");
        }
    });
}

/// Decodes a job's payload as stored (for the dashboard).
pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    serde_json::from_slice(bytes).ok()
}
