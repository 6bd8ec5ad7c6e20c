//! Batching, validation, storage and acknowledgement.
//!
//! A QoS 1 message is acknowledged only after everything it carried is stored (or
//! dead-lettered): a consumer killed at any point loses nothing, since the broker keeps
//! unacknowledged messages of a persistent session and sends them again. Store failures
//! are retried with backoff and never acknowledged meanwhile; bad data is dead-lettered
//! and acknowledged, so one poison message cannot block the stream.

use std::time::{Duration, Instant};

use rumqttc::AsyncClient;
use termopar_core::intake::{Address, Incoming, Intake, Sink};
use tokio::sync::{mpsc, watch};

use crate::{
    mqtt::{Epoch, Message},
    settings::ConsumerSettings,
};

/// Retries `op` with exponential backoff (100 ms to 5 s) until it succeeds or
/// `stop` turns true; `None` when stopped.
pub async fn retry<T, E: std::fmt::Display, F, Fut>(
    what: &str,
    stop: &mut watch::Receiver<bool>,
    mut op: F,
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut backoff = Duration::from_millis(100);
    let mut attempt = 1u32;
    loop {
        match op().await {
            Ok(v) => return Some(v),
            Err(e) => {
                metrics::counter!("consumer_store_retries_total", "what" => what.to_owned())
                    .increment(1);
                tracing::warn!(error = %e, attempt, retry_in = ?backoff, "{what} failed, retrying");
            }
        }
        if *stop.borrow() {
            return None;
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return None,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
        attempt += 1;
    }
}

/// Collects messages into batches and processes them in order.
pub struct Pipeline<S> {
    pub(crate) settings: ConsumerSettings,
    pub(crate) intake: Intake,
    pub(crate) sink: S,
    pub(crate) client: AsyncClient,
    pub(crate) epoch: Epoch,
}

impl<S: Sink> Pipeline<S> {
    /// Runs until `messages` ends or `stop` turns true; the batch in hand is finished
    /// (stored and acknowledged) before returning, unless storage is down.
    pub async fn run(self, mut messages: mpsc::Receiver<Message>, mut stop: watch::Receiver<bool>) {
        let mut batch: Vec<Message> = Vec::new();
        let mut readings_estimate = 0usize;
        let mut unacked = 0usize;
        let mut first_at: Option<Instant> = None;
        loop {
            let deadline = first_at.map(|t| t + self.settings.batch_delay);
            let flush = tokio::select! {
                biased;
                _ = stop.changed() => {
                    self.process(std::mem::take(&mut batch), &mut stop).await;
                    return;
                }
                m = messages.recv() => match m {
                    Some(m) => {
                        // A rough count: each `{` of an array payload is about one reading.
                        readings_estimate += if m.payload.first() == Some(&b'[') {
                            m.payload.iter().filter(|&&b| b == b'{').count().max(1)
                        } else { 1 };
                        unacked += usize::from(m.ack.is_some());
                        first_at.get_or_insert_with(Instant::now);
                        batch.push(m);
                        readings_estimate >= self.settings.batch_size || unacked >= self.settings.max_unacked
                    }
                    None => {
                        self.process(std::mem::take(&mut batch), &mut stop).await;
                        return;
                    }
                },
                _ = sleep_until(deadline) => true,
            };
            if flush && !batch.is_empty() {
                self.process(std::mem::take(&mut batch), &mut stop).await;
                readings_estimate = 0;
                unacked = 0;
                first_at = None;
            }
        }
    }

    /// Validates, stores, dead-letters and acknowledges one batch.
    async fn process(&self, batch: Vec<Message>, stop: &mut watch::Receiver<bool>) {
        if batch.is_empty() {
            return;
        }
        let started = Instant::now();
        let incoming: Vec<Incoming> = batch
            .iter()
            .map(|m| Incoming {
                address: Address::Topic(&m.topic),
                payload: m.payload.clone(),
                received_at: m.received_at,
            })
            .collect();
        // Nothing is acknowledged while either step fails: when stopping, the broker
        // sends the messages again.
        let Some(prepared) = retry("sensor lookup", stop, || self.intake.prepare(&incoming)).await
        else {
            return;
        };
        let Some(report) = retry("store readings", stop, || {
            self.intake.commit(&self.sink, &prepared)
        })
        .await
        else {
            return;
        };

        let epoch = self.epoch.current();
        for message in &batch {
            if let Some(publish) = &message.ack {
                // An acknowledgement on a newer connection would be unsolicited (rumqttd
                // drops the connection for it); the broker resends those messages anyway.
                if message.epoch == epoch {
                    if let Err(e) = self.client.ack(publish).await {
                        tracing::warn!(error = %e, "could not queue an acknowledgement");
                    }
                }
            }
        }
        metrics::histogram!("consumer_batch_messages").record(batch.len() as f64);
        metrics::histogram!("consumer_batch_seconds").record(started.elapsed().as_secs_f64());
        tracing::debug!(
            messages = batch.len(),
            stored = report.stored,
            duplicates = report.duplicates,
            rejected = report.rejected.len(),
            "batch done"
        );
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}
