//! Hits made durable in groups before they are answered.
//!
//! Requests queue for the writer tasks. A writer takes what is queued (up to
//! [`MAX_GROUP`] requests), writes all their hits as one `tracking_outbox` row, commits,
//! and only then answers them: a 202 is never given for a hit a crash could still lose.
//! One row per group keeps PostgreSQL's work per hit to a few bytes of one insert; the
//! [`crate::relay`] spreads them into MongoDB and the rollups afterwards.

use std::sync::Arc;

use sqlx::{postgres::PgPoolOptions, PgPool};
use tokio::sync::{mpsc, oneshot, Mutex, Notify};
use tracing::Instrument;

use termopar_core::{outbox::next_group, tasks::Tasks};
use termopar_web::ApiError;

use crate::{hit::StoredHit, TrackingSettings};

/// Most requests one group takes.
pub(crate) const MAX_GROUP: usize = 512;

type Job = (Vec<StoredHit>, oneshot::Sender<Result<(), ApiError>>);

/// The queue in front of the writers. Cheap to clone.
#[derive(Clone)]
pub(crate) struct HitWriter {
    tx: mpsc::Sender<Job>,
}

impl HitWriter {
    /// Starts the writers on `tasks`. `relay` is woken after each commit. A writer stops
    /// once every handle is dropped and it has answered everything queued; `alive` is
    /// held until then.
    pub(crate) fn start(
        tasks: &Tasks,
        pg: &PgPool,
        settings: &TrackingSettings,
        relay: Arc<Notify>,
        alive: mpsc::Sender<()>,
    ) -> Self {
        let (tx, rx) = mpsc::channel::<Job>(16 * MAX_GROUP);
        let rx = Arc::new(Mutex::new(rx));
        // Their own connections, not checked with a round trip each time they are handed
        // out (a writer's insert is a single statement: a connection that went away fails
        // it, and is then dropped).
        let pool = PgPoolOptions::new()
            .max_connections(settings.writers as u32)
            .acquire_timeout(pg.options().get_acquire_timeout())
            .test_before_acquire(false)
            .connect_lazy_with((*pg.connect_options()).clone());
        let gather = settings.gather;
        for _ in 0..settings.writers {
            let (rx, pool, relay, alive) = (rx.clone(), pool.clone(), relay.clone(), alive.clone());
            tasks.spawn("tracking writer", move |_stop| async move {
                let _alive = alive;
                let mut jobs = Vec::with_capacity(MAX_GROUP);
                let mut expected = 1;
                while next_group(&rx, &mut jobs, expected, gather, MAX_GROUP).await {
                    expected = jobs.len();
                    let (hits, waiters): (Vec<_>, Vec<_>) = jobs.drain(..).unzip();
                    let count: usize = hits.iter().map(Vec::len).sum();
                    metrics::histogram!("tracking_group_hits").record(count as f64);
                    let answer = write(&pool, &hits, count)
                        .instrument(tracing::debug_span!("tracking_group", hits = count))
                        .await;
                    if answer.is_ok() {
                        relay.notify_one();
                        metrics::counter!("tracking_hits_accepted_total").increment(count as u64);
                    }
                    for waiter in waiters {
                        let _ = waiter.send(answer.clone());
                    }
                }
            });
        }
        Self { tx }
    }

    /// Makes `hits` durable; returns once they are committed.
    pub(crate) async fn submit(&self, hits: Vec<StoredHit>) -> Result<(), ApiError> {
        let stopped = || ApiError::unavailable("the tracking writer");
        let (done, answer) = oneshot::channel();
        self.tx.send((hits, done)).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

/// One outbox row holding every hit of the group, as a JSON array.
async fn write(pool: &PgPool, groups: &[Vec<StoredHit>], count: usize) -> Result<(), ApiError> {
    let all: Vec<&StoredHit> = groups.iter().flatten().collect();
    let bytes = serde_json::to_vec(&all).map_err(|e| ApiError::internal(&e))?;
    sqlx::query("INSERT INTO tracking_outbox (hits, count) VALUES ($1, $2)")
        .bind(bytes)
        .bind(count as i32)
        .execute(pool)
        .await?;
    Ok(())
}
