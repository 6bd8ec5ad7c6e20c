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

use crate::{downstream::Downstream, settings::LeadsSettings, wake::Wakeups};

/// The queues: the seed's flow, in order, and the no-op queue.
pub const QUEUES: [&str; 5] = [
    Queue::LeadToMarketing.name(),
    Queue::LeadToCrm.name(),
    Queue::QualifiedEmail.name(),
    Queue::CustomerToCrm.name(),
    Queue::Noop.name(),
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
    let tasks = jobs
        .iter()
        .map(|job| {
            let bytes = serde_json::to_vec(job).expect("a job serializes");
            TaskBuilder::new(bytes)
                .max_attempts(max_attempts as usize)
                .build()
        })
        .collect::<Vec<_>>();
    apalis_postgres::queries::push_tasks(db, queue.name(), tasks)
        .await
        .map_err(|e| match e {
            apalis_postgres::Error::Database(e) => e,
            other => sqlx::Error::Protocol(other.to_string()),
        })?;
    metrics::counter!("jobs_enqueued_total", "queue" => queue.name()).increment(jobs.len() as u64);
    Ok(())
}

/// Runs `work` for one job, recording its metrics: latency from enqueue to start,
/// success, and failure (a retry to come, or dead at the last attempt).
async fn observe<F, Fut>(
    queue: Queue,
    job: Job,
    attempt: &Attempt,
    max_attempts: u32,
    work: F,
) -> Result<(), BoxDynError>
where
    F: FnOnce(Job) -> Fut,
    Fut: std::future::Future<Output = Result<(), BoxDynError>>,
{
    let q = queue.name();
    if attempt.current() <= 1 {
        let waited = (Utc::now() - job.enqueued_at).to_std().unwrap_or_default();
        metrics::histogram!("jobs_start_latency_seconds", "queue" => q)
            .record(waited.as_secs_f64());
    }
    let started = std::time::Instant::now();
    let result = work(job).await;
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
    observe(queue, job, &attempt, w.max_attempts, |job| async move {
        w.downstream.carry(queue, &job).await
    })
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
    observe(Queue::Noop, job, &attempt, max_attempts, |_| async {
        Ok(())
    })
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
pub(crate) fn start_workers(tasks: &Tasks, pg: &PgPool, settings: &LeadsSettings, worker: Worker) {
    let wakeups = Wakeups::start(tasks, pg, &QUEUES);
    fn spawn<F, Fut>(
        tasks: &Tasks,
        pg: &PgPool,
        settings: &LeadsSettings,
        wakeups: &Wakeups,
        worker: Worker,
        queue: Queue,
        handler: F,
    ) where
        F: Fn(Job, Data<Worker>, Attempt) -> Fut + Send + Sync + Clone + 'static,
        Fut: std::future::Future<Output = Result<(), BoxDynError>> + Send + 'static,
    {
        let config = Config::default()
            .queue(queue.name())
            .batch_size(settings.concurrency)
            .heartbeat_interval(settings.orphan_after / 3)
            .missed_heartbeats(3);
        // Woken when a job of the queue is enqueued (see `wake`); polled every second
        // too, for retried jobs and ones re-enqueued from dead workers.
        let strategy = Strategy::new()
            .apply(wakeups.strategy(queue.name()))
            .interval(Duration::from_secs(1));
        let backend = PostgresStorage::<Job>::new(pg)
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
        let name = format!("{}-{}", queue.name(), Uuid::new_v4().simple());
        let retries = settings.max_attempts.saturating_sub(1) as usize;
        let concurrency = settings.concurrency;
        let built = WorkerBuilder::new(name)
            .backend(backend)
            .data(worker)
            .retry(RetryPolicy::retries(retries).with_backoff(backoff))
            .concurrency(concurrency)
            .build(handler);
        tasks.spawn(queue.name(), move |mut stop| async move {
            let stopped = async move {
                stop.requested().await;
                Ok::<(), std::io::Error>(())
            };
            if let Err(e) = built.run_until(stopped).await {
                tracing::error!(queue = queue.name(), error = %e, "job worker stopped");
            }
        });
    }
    spawn(
        tasks,
        pg,
        settings,
        &wakeups,
        worker.clone(),
        Queue::LeadToMarketing,
        lead_to_marketing,
    );
    spawn(
        tasks,
        pg,
        settings,
        &wakeups,
        worker.clone(),
        Queue::LeadToCrm,
        lead_to_crm,
    );
    spawn(
        tasks,
        pg,
        settings,
        &wakeups,
        worker.clone(),
        Queue::QualifiedEmail,
        qualified_email,
    );
    spawn(
        tasks,
        pg,
        settings,
        &wakeups,
        worker.clone(),
        Queue::CustomerToCrm,
        customer_to_crm,
    );
    spawn(tasks, pg, settings, &wakeups, worker, Queue::Noop, noop);
}

/// Decodes a job's payload as stored (for the dashboard).
pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    serde_json::from_slice(bytes).ok()
}
