//! Background tasks owned by the application: each starts with a [`Stop`] signal, and
//! [`Tasks::shutdown`] asks them all to stop and waits for them to drain what they hold.

use std::{
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{sync::watch, task::JoinHandle};

/// A task's view of the stop request.
#[derive(Clone)]
pub struct Stop(watch::Receiver<bool>);

impl Stop {
    /// Resolves once stopping was asked for.
    pub async fn requested(&mut self) {
        let _ = self.0.wait_for(|stop| *stop).await;
    }

    /// Whether stopping was asked for.
    pub fn is_requested(&self) -> bool {
        *self.0.borrow()
    }
}

/// The application's background tasks. Cheap to clone.
#[derive(Clone)]
pub struct Tasks(Arc<Inner>);

struct Inner {
    stop: watch::Sender<bool>,
    running: Mutex<Vec<(&'static str, JoinHandle<()>)>>,
}

impl Default for Tasks {
    fn default() -> Self {
        Self::new()
    }
}

impl Tasks {
    /// No tasks yet.
    pub fn new() -> Self {
        Self(Arc::new(Inner {
            stop: watch::channel(false).0,
            running: Mutex::new(Vec::new()),
        }))
    }

    /// Starts `task` with its stop signal; it should return soon after the signal, having
    /// finished or handed on what it holds.
    pub fn spawn<F, Fut>(&self, name: &'static str, task: F)
    where
        F: FnOnce(Stop) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let handle = tokio::spawn(task(Stop(self.0.stop.subscribe())));
        self.0
            .running
            .lock()
            .expect("not poisoned")
            .push((name, handle));
    }

    /// The signal tasks started elsewhere can follow.
    pub fn stop_signal(&self) -> Stop {
        Stop(self.0.stop.subscribe())
    }

    /// Asks every task to stop and waits for each, in the order they were started, up
    /// to `grace` in all; a task still running then is aborted and named in the log.
    pub async fn shutdown(&self, grace: Duration) {
        self.0.stop.send_replace(true);
        let deadline = tokio::time::Instant::now() + grace;
        let running = std::mem::take(&mut *self.0.running.lock().expect("not poisoned"));
        for (name, mut handle) in running {
            match tokio::time::timeout_at(deadline, &mut handle).await {
                Ok(Ok(())) => tracing::debug!(task = name, "stopped"),
                Ok(Err(e)) => tracing::error!(task = name, error = %e, "task failed"),
                Err(_) => {
                    tracing::warn!(task = name, "did not stop in time; aborted");
                    handle.abort();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn shutdown_waits_for_each_task_to_finish_what_it_holds() {
        let tasks = Tasks::new();
        let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
        for k in 0..3 {
            let done = done_tx.clone();
            tasks.spawn("worker", move |mut stop| async move {
                stop.requested().await;
                tokio::task::yield_now().await;
                done.send(k).expect("receiver alive");
            });
        }
        drop(done_tx);
        tasks.shutdown(Duration::from_secs(10)).await;
        // Without waiting: every task had finished when shutdown returned.
        let mut finished = Vec::new();
        while let Ok(k) = done_rx.try_recv() {
            finished.push(k);
        }
        finished.sort();
        assert_eq!(finished, vec![0, 1, 2]);
    }

    #[tokio::test]
    async fn a_task_that_ignores_the_signal_is_aborted_at_the_deadline() {
        let tasks = Tasks::new();
        let (held, aborted) = tokio::sync::oneshot::channel::<()>();
        tasks.spawn("stubborn", |_stop| async move {
            let _held = held;
            std::future::pending::<()>().await
        });
        tasks.shutdown(Duration::from_millis(50)).await;
        // Dropped with the aborted task, never sent.
        assert!(aborted.await.is_err());
    }
}
