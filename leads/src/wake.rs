//! Waking the job workers when jobs are enqueued: one `LISTEN` connection per process
//! for every queue (apalis's own pubsub holds a pool connection per worker for as long
//! as it runs: five queues took five of the API's sixteen), and a second look shortly
//! after each wake-up.
//!
//! The second look closes a gap in apalis's polling: a wake-up that arrives while the
//! worker's claim query is running is spent on that query, and if the query's snapshot
//! was taken before the new job committed, the worker goes back to sleep with the job
//! waiting for the next poll (a second). `make bench-jobs` measured p50 1.6 ms but p99
//! 716 ms for that reason; looking once more [`RECHECK`] after a wake-up bounds it.

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use apalis::prelude::{PollSnapshot, PollStrategy};
use apalis_postgres::InsertEvent;
use sqlx::{postgres::PgListener, PgPool};
use tokio::sync::{futures::OwnedNotified, Notify};

use termopar_core::tasks::Tasks;

/// How long after a wake-up a worker claims once more.
const RECHECK: Duration = Duration::from_millis(20);

/// The channel apalis's insert trigger notifies, with the job's queue and id.
const CHANNEL: &str = "apalis::job::insert";

/// Wake-ups per queue, fed by one listener.
#[derive(Clone, Default)]
pub struct Wakeups {
    queues: Arc<HashMap<&'static str, Arc<Notify>>>,
}

impl Wakeups {
    /// Listens on `pg` (one connection) for the jobs of `queues`, until `tasks` stop.
    pub fn start(tasks: &Tasks, pg: &PgPool, queues: &[&'static str]) -> Self {
        let wakeups = Self {
            queues: Arc::new(
                queues
                    .iter()
                    .map(|q| (*q, Arc::new(Notify::new())))
                    .collect(),
            ),
        };
        let (pg, me) = (pg.clone(), wakeups.clone());
        tasks.spawn("job-wakeups", move |mut stop| async move {
            let mut listener = loop {
                match listen(&pg).await {
                    Ok(listener) => break listener,
                    Err(e) => {
                        tracing::warn!(error = %e, "job wake-ups: cannot listen; polling only");
                        tokio::select! {
                            () = stop.requested() => return,
                            () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                    }
                }
            };
            loop {
                tokio::select! {
                    () = stop.requested() => return,
                    received = listener.try_recv() => match received {
                        Ok(Some(n)) => me.wake(n.payload()),
                        // The connection was lost; sqlx reconnects on the next call. Jobs
                        // enqueued meanwhile sent no notice anyone heard: look now.
                        Ok(None) => me.wake_all(),
                        Err(e) => {
                            tracing::warn!(error = %e, "job wake-ups: listener failed");
                            me.wake_all();
                            tokio::select! {
                                () = stop.requested() => return,
                                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                            }
                        }
                    },
                }
            }
        });
        wakeups
    }

    fn wake(&self, payload: &str) {
        let Ok(event) = serde_json::from_str::<InsertEvent>(payload) else {
            return;
        };
        if let Some(notify) = self.queues.get(event.job_type.as_str()) {
            notify.notify_one();
        }
    }

    fn wake_all(&self) {
        for notify in self.queues.values() {
            notify.notify_waiters();
            notify.notify_one();
        }
    }

    /// The poll strategy of a worker of `queue`: ready when a job of the queue was
    /// enqueued, and once more [`RECHECK`] later.
    pub(crate) fn strategy(&self, queue: &'static str) -> Wake {
        Wake {
            notify: self.queues.get(queue).cloned().unwrap_or_default(),
            waiting: None,
            recheck: None,
        }
    }
}

async fn listen(pg: &PgPool) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pg).await?;
    listener.listen(CHANNEL).await?;
    Ok(listener)
}

/// A worker's wake-ups (see [`Wakeups::strategy`]).
pub(crate) struct Wake {
    notify: Arc<Notify>,
    waiting: Option<Pin<Box<OwnedNotified>>>,
    recheck: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl PollStrategy for Wake {
    // Every future is left polled, so that this task's waker is registered with each:
    // apalis polls the strategy again only once it was woken.
    fn poll_drive(&mut self, cx: &mut Context<'_>, _: &PollSnapshot) -> Poll<Option<()>> {
        let mut ready = false;
        loop {
            let notify = &self.notify;
            let waiting = self
                .waiting
                .get_or_insert_with(|| Box::pin(notify.clone().notified_owned()));
            if waiting.as_mut().poll(cx).is_pending() {
                break;
            }
            self.waiting = None;
            self.recheck = Some(Box::pin(tokio::time::sleep(RECHECK)));
            ready = true;
        }
        if let Some(recheck) = &mut self.recheck {
            if recheck.as_mut().poll(cx).is_ready() {
                self.recheck = None;
                ready = true;
            }
        }
        if ready {
            Poll::Ready(Some(()))
        } else {
            Poll::Pending
        }
    }
}
