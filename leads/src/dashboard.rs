//! The jobs dashboard's data (what Flower shows Celery users), admin only: queues with
//! counts by state, jobs with payload, attempts, last error and timings, workers with
//! their heartbeats; retry a dead or failed job, cancel a waiting one. Read straight
//! from apalis's tables; `/ui/jobs` is the page over it.

use chrono::{DateTime, Utc};
use poem::web::{Data, Html};
use poem_openapi::{
    param::{Path, Query},
    payload::Json,
    Object, OpenApi,
};
use termopar_web::{
    pagination::{Page, PageParams},
    responses::Found,
    ApiError, ApiResult, BearerAuth,
};

use crate::{jobs::QUEUES, Leads};

/// The dashboard's group in the OpenAPI document.
#[derive(poem_openapi::Tags)]
pub(crate) enum JobsTags {
    /// Background jobs: queues, jobs, workers (admins).
    Jobs,
}

/// A job's state as apalis stores it, except that a failed job out of attempts (which
/// apalis never fetches again) is dead.
macro_rules! state_sql {
    () => {
        "CASE WHEN status = 'Failed' AND attempts >= max_attempts THEN 'Killed' ELSE status END"
    };
}
const STATE: &str = state_sql!();

/// apalis's job states, as the dashboard names them.
const STATES: [(&str, &str); 6] = [
    ("Pending", "pending"),
    ("Queued", "queued"),
    ("Running", "running"),
    ("Done", "done"),
    ("Failed", "failed"),
    ("Killed", "dead"),
];

fn state_name(status: &str) -> String {
    STATES
        .iter()
        .find(|(s, _)| *s == status)
        .map_or_else(|| status.to_ascii_lowercase(), |(_, n)| (*n).to_owned())
}

fn status_of(name: &str) -> ApiResult<&'static str> {
    STATES
        .iter()
        .find(|(_, n)| *n == name)
        .map(|(s, _)| *s)
        .ok_or_else(|| {
            ApiError::validation(
                "state",
                "one of pending, queued, running, done, failed, dead",
            )
        })
}

/// A queue with its jobs counted by state.
#[derive(Debug, Object)]
pub(crate) struct QueueCounts {
    /// The queue.
    pub queue: String,
    /// Waiting to run.
    pub pending: i64,
    /// Taken by a worker, not started.
    pub queued: i64,
    /// Running.
    pub running: i64,
    /// Done.
    pub done: i64,
    /// Failed, to be tried again.
    pub failed: i64,
    /// Dead: out of attempts, or cancelled.
    pub dead: i64,
}

/// A job.
#[derive(Debug, Object)]
pub(crate) struct JobView {
    /// Id.
    pub id: String,
    /// Its queue.
    pub queue: String,
    /// pending, queued, running, done, failed or dead.
    pub state: String,
    /// What it carries.
    pub payload: serde_json::Value,
    /// Tries so far.
    pub attempts: i32,
    /// Tries before it is dead.
    pub max_attempts: i32,
    /// Its last result: `{"Ok": ...}` or `{"Err": "<the error>"}`.
    pub last_result: Option<serde_json::Value>,
    /// When it may run.
    pub run_at: DateTime<Utc>,
    /// When a worker took it.
    pub lock_at: Option<DateTime<Utc>>,
    /// The worker that took it.
    pub lock_by: Option<String>,
    /// When it finished.
    pub done_at: Option<DateTime<Utc>>,
}

#[derive(sqlx::FromRow)]
struct JobRow {
    id: String,
    job_type: String,
    status: String,
    job: Vec<u8>,
    attempts: i32,
    max_attempts: i32,
    last_result: Option<serde_json::Value>,
    run_at: DateTime<Utc>,
    lock_at: Option<DateTime<Utc>>,
    lock_by: Option<String>,
    done_at: Option<DateTime<Utc>>,
}

impl From<JobRow> for JobView {
    fn from(r: JobRow) -> Self {
        Self {
            id: r.id,
            queue: r.job_type,
            state: state_name(&r.status),
            payload: crate::jobs::decode(&r.job).unwrap_or(serde_json::Value::Null),
            attempts: r.attempts,
            max_attempts: r.max_attempts,
            last_result: r.last_result,
            run_at: r.run_at,
            lock_at: r.lock_at,
            lock_by: r.lock_by,
            done_at: r.done_at,
        }
    }
}

macro_rules! job_columns {
    () => {
        concat!(
            "id, job_type, ",
            state_sql!(),
            " AS status, job, attempts, max_attempts, last_result, run_at, lock_at, lock_by, \
             done_at"
        )
    };
}

/// A worker.
#[derive(Debug, Object, sqlx::FromRow)]
pub(crate) struct WorkerView {
    /// Its name.
    pub id: String,
    /// The queue it serves.
    pub queue: String,
    /// Its storage.
    pub storage_name: String,
    /// Its middleware.
    pub layers: Option<String>,
    /// Its last heartbeat.
    pub last_seen: DateTime<Utc>,
    /// Whether it was seen within the orphan timeout.
    pub alive: bool,
}

/// The jobs dashboard (admins).
pub struct JobsApi;

#[OpenApi(prefix_path = "/jobs", tag = "JobsTags::Jobs")]
impl JobsApi {
    /// Every queue with its jobs counted by state.
    #[oai(path = "/queues", method = "get", operation_id = "listJobQueues")]
    #[tracing::instrument(skip_all)]
    async fn queues(
        &self,
        leads: Data<&Leads>,
        auth: BearerAuth,
    ) -> ApiResult<Found<Vec<QueueCounts>>> {
        auth.0.require_admin()?;
        let rows: Vec<(String, String, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT job_type, {STATE}, count(*) FROM apalis.jobs
             WHERE job_type = ANY($1) GROUP BY 1, 2"
        )))
        .bind(QUEUES.to_vec())
        .fetch_all(leads.pg())
        .await?;
        let counts = QUEUES
            .iter()
            .map(|q| {
                let n = |status: &str| {
                    rows.iter()
                        .filter(|(queue, s, _)| queue == q && s == status)
                        .map(|r| r.2)
                        .sum()
                };
                QueueCounts {
                    queue: (*q).to_owned(),
                    pending: n("Pending"),
                    queued: n("Queued"),
                    running: n("Running"),
                    done: n("Done"),
                    failed: n("Failed"),
                    dead: n("Killed"),
                }
            })
            .collect();
        Ok(Found::Ok(Json(counts)))
    }

    /// Jobs, newest first, by queue and state.
    #[oai(path = "/", method = "get", operation_id = "listJobs")]
    #[tracing::instrument(skip_all)]
    async fn list(
        &self,
        leads: Data<&Leads>,
        auth: BearerAuth,
        /// Only jobs of this queue.
        queue: Query<Option<String>>,
        /// Only jobs in this state: pending, queued, running, done, failed or dead.
        state: Query<Option<String>>,
        /// Page number, from 1.
        #[oai(validator(minimum(value = "1")))]
        page: Query<Option<u32>>,
        /// Items per page (1 to 1000, default 50).
        #[oai(validator(minimum(value = "1"), maximum(value = "1000")))]
        page_size: Query<Option<u32>>,
    ) -> ApiResult<Found<Page<JobView>>> {
        auth.0.require_admin()?;
        let params = PageParams::new(page.0, page_size.0);
        let status = state.0.as_deref().map(status_of).transpose()?;
        let queues: Vec<&str> = match queue.0.as_deref() {
            Some(q) => vec![q],
            None => QUEUES.to_vec(),
        };
        let filter = format!("job_type = ANY($1) AND ($2::text IS NULL OR {STATE} = $2)");
        let total: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM apalis.jobs WHERE {filter}"
        )))
        .bind(&queues)
        .bind(status)
        .fetch_one(leads.pg())
        .await?;
        let rows: Vec<JobRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {} FROM apalis.jobs WHERE {filter}
             ORDER BY run_at DESC, id DESC LIMIT $3 OFFSET $4",
            job_columns!()
        )))
        .bind(&queues)
        .bind(status)
        .bind(params.limit())
        .bind(params.offset())
        .fetch_all(leads.pg())
        .await?;
        Ok(Found::Ok(Json(params.page(
            rows.into_iter().map(JobView::from).collect(),
            total,
        ))))
    }

    /// A job.
    #[oai(path = "/:id", method = "get", operation_id = "getJob")]
    #[tracing::instrument(skip_all)]
    async fn get(
        &self,
        leads: Data<&Leads>,
        auth: BearerAuth,
        id: Path<String>,
    ) -> ApiResult<Found<JobView>> {
        auth.0.require_admin()?;
        Ok(Found::Ok(Json(job(&leads, &id.0).await?)))
    }

    /// Run a dead or failed job again, from its first attempt.
    #[oai(path = "/:id/retry", method = "post", operation_id = "retryJob")]
    #[tracing::instrument(skip_all, fields(id = %id.0))]
    async fn retry(
        &self,
        leads: Data<&Leads>,
        auth: BearerAuth,
        id: Path<String>,
    ) -> ApiResult<Found<JobView>> {
        auth.0.require_admin()?;
        let changed = sqlx::query(
            "UPDATE apalis.jobs SET status = 'Pending', attempts = 0, run_at = now(),
                 lock_by = NULL, lock_at = NULL, done_at = NULL
             WHERE id = $1 AND job_type = ANY($2) AND status IN ('Killed', 'Failed')",
        )
        .bind(&id.0)
        .bind(QUEUES.to_vec())
        .execute(leads.pg())
        .await?
        .rows_affected();
        let view = job(&leads, &id.0).await?;
        if changed == 0 {
            return Err(ApiError::conflict(format!(
                "only dead or failed jobs are retried; this one is {}",
                view.state
            )));
        }
        // Workers are woken by the insert trigger only: tell them as it does.
        sqlx::query("SELECT pg_notify('apalis::job::insert', json_build_object('job_type', $1::text, 'id', $2::text, 'run_at', now())::text)")
            .bind(&view.queue)
            .bind(&view.id)
            .execute(leads.pg())
            .await?;
        metrics::counter!("jobs_manual_retries_total", "queue" => view.queue.clone()).increment(1);
        tracing::info!(job = %view.id, queue = %view.queue, "job retried from the dashboard");
        Ok(Found::Ok(Json(view)))
    }

    /// Cancel a job that has not started: it becomes dead, with the reason kept.
    #[oai(path = "/:id/cancel", method = "post", operation_id = "cancelJob")]
    #[tracing::instrument(skip_all, fields(id = %id.0))]
    async fn cancel(
        &self,
        leads: Data<&Leads>,
        auth: BearerAuth,
        id: Path<String>,
    ) -> ApiResult<Found<JobView>> {
        auth.0.require_admin()?;
        let changed = sqlx::query(
            "UPDATE apalis.jobs SET status = 'Killed', done_at = now(),
                 last_result = jsonb_build_object('Err', 'cancelled by ' || $3::text)
             WHERE id = $1 AND job_type = ANY($2)
               AND (status = 'Pending' OR (status = 'Failed' AND attempts < max_attempts))",
        )
        .bind(&id.0)
        .bind(QUEUES.to_vec())
        .bind(auth.0.user_id.to_string())
        .execute(leads.pg())
        .await?
        .rows_affected();
        let view = job(&leads, &id.0).await?;
        if changed == 0 {
            return Err(ApiError::conflict(format!(
                "only jobs waiting to run are cancelled; this one is {}",
                view.state
            )));
        }
        Ok(Found::Ok(Json(view)))
    }

    /// Workers, most recently seen first.
    #[oai(path = "/workers", method = "get", operation_id = "listJobWorkers")]
    #[tracing::instrument(skip_all)]
    async fn workers(
        &self,
        leads: Data<&Leads>,
        auth: BearerAuth,
    ) -> ApiResult<Found<Vec<WorkerView>>> {
        auth.0.require_admin()?;
        let workers = sqlx::query_as::<_, WorkerView>(
            "SELECT id, worker_type AS queue, storage_name, layers, last_seen,
                    last_seen > now() - make_interval(secs => $2) AS alive
             FROM apalis.workers WHERE worker_type = ANY($1)
             ORDER BY last_seen DESC LIMIT 1000",
        )
        .bind(QUEUES.to_vec())
        .bind(leads.settings().orphan_after.as_secs_f64())
        .fetch_all(leads.pg())
        .await?;
        Ok(Found::Ok(Json(workers)))
    }
}

async fn job(leads: &Leads, id: &str) -> ApiResult<JobView> {
    sqlx::query_as::<_, JobRow>(concat!(
        "SELECT ",
        job_columns!(),
        " FROM apalis.jobs WHERE id = $1 AND job_type = ANY($2)"
    ))
    .bind(id)
    .bind(QUEUES.to_vec())
    .fetch_optional(leads.pg())
    .await?
    .map(JobView::from)
    .ok_or_else(|| ApiError::not_found("job"))
}

/// `GET /ui/jobs`: the dashboard page, linked from the console (log in there as an admin;
/// the page calls the API with the console's session).
pub fn page() -> impl poem::Endpoint {
    poem::endpoint::make_sync(|_| Html(include_str!("../static/jobs.html")))
}
