//! The two halves of "answer once durable, move later" that the products share: writers
//! that commit requests in groups ([`next_group`]), and a relay that moves what they
//! committed out of a PostgreSQL outbox ([`relay`]).

use std::{future::Future, sync::Arc, time::Duration};

use tokio::sync::{mpsc, Mutex, Notify};

use crate::tasks::Stop;

/// Takes the next group of jobs (at most `max`): whatever is queued, and when that is
/// fewer than half the last group (`expected`), what arrives within `gather` until it is
/// half as large. Senders waiting for answers send again as soon as they get them;
/// without the wait the first of them would make a group of one and the others would
/// wait a whole transaction behind it. Waiting for the whole last group instead lost
/// ~10% of the events/s under `make bench-webhook`: its last few senders were often
/// late, so most groups waited out `gather` with the cores idle. The last group's size
/// tracks the load, so a lone sender never waits. False once every sender is dropped
/// and the queue is empty.
pub async fn next_group<T>(
    rx: &Mutex<mpsc::Receiver<T>>,
    jobs: &mut Vec<T>,
    expected: usize,
    gather: Duration,
    max: usize,
) -> bool {
    let mut rx = rx.lock().await;
    if rx.recv_many(jobs, max).await == 0 {
        return false;
    }
    let deadline = tokio::time::Instant::now() + gather;
    let enough = (expected / 2).clamp(1, max);
    while jobs.len() < enough && !gather.is_zero() {
        let room = max - jobs.len();
        match tokio::time::timeout_at(deadline, rx.recv_many(jobs, room)).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    true
}

/// How a relay paces itself.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    /// Pause after a step that emptied the outbox, so that under load each step carries
    /// many records (a document store's cost per record falls with the size of the
    /// insert), at the price of records arriving that much later.
    pub pause: Duration,
    /// How often to look without being woken (rows committed by other processes, or
    /// left behind by a failed step).
    pub idle_check: Duration,
}

/// Runs `step` until stopped. `step` moves some of the outbox and says whether more may
/// be waiting; `wake` is notified after each commit of a new row. Asked to stop, it
/// waits for the writers to finish (`writers` closes when the last one is done) and
/// steps until the outbox is empty; what it cannot move then (a store down) stays for
/// the next start. `what` names the records in the log.
pub async fn relay<S, F>(
    what: &'static str,
    mut step: S,
    pace: Pace,
    wake: Arc<Notify>,
    mut stop: Stop,
    mut writers: mpsc::Receiver<()>,
) where
    S: FnMut() -> F,
    F: Future<Output = anyhow::Result<bool>>,
{
    let mut backoff = Duration::from_millis(100);
    loop {
        if stop.is_requested() {
            break;
        }
        match step().await {
            Ok(true) => continue,
            Ok(false) => {
                backoff = Duration::from_millis(100);
                tokio::select! {
                    _ = tokio::time::timeout(pace.idle_check, wake.notified()) => {
                        tokio::time::sleep(pace.pause).await;
                    }
                    () = stop.requested() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = format!("{e:#}"), retry_in = ?backoff, "could not relay {what}");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = stop.requested() => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
    // The last steps: after the writers are done, until the outbox is empty.
    while writers.recv().await.is_some() {}
    loop {
        match step().await {
            Ok(true) => continue,
            Ok(false) => return tracing::info!("{what} relayed"),
            Err(e) => {
                return tracing::warn!(
                    error = format!("{e:#}"),
                    "could not relay every one of the {what} before stopping; the rest stays \
                     in the outbox for the next start"
                )
            }
        }
    }
}
