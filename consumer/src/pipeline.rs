//! Batching, validation, storage and acknowledgement.
//!
//! A QoS 1 message is acknowledged only after everything it carried is stored (or
//! dead-lettered): a consumer killed at any point loses nothing, since the broker keeps
//! unacknowledged messages of a persistent session and sends them again. Store failures
//! are retried with backoff and never acknowledged meanwhile; bad data is dead-lettered
//! and acknowledged, so one poison message cannot block the stream.

use std::time::{Duration, Instant};

use rumqttc::AsyncClient;
use termopar_core::{
    directory::SensorDirectory,
    ingest::DeadLetter,
    reading::{parse_message, Reading, Reject, RejectReason},
    topic::Topics,
};
use tokio::sync::{mpsc, watch};

use crate::{
    mqtt::{Epoch, Message},
    settings::ConsumerSettings,
    sink::Sink,
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
    pub(crate) topics: Topics,
    pub(crate) directory: SensorDirectory,
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
        let mut readings: Vec<Reading> = Vec::new();
        // For each reading, the message it came from (to dead-letter store refusals).
        let mut origin: Vec<usize> = Vec::new();
        let mut letters: Vec<DeadLetter> = Vec::new();
        for (i, message) in batch.iter().enumerate() {
            let letter = |reject: Reject, sensor| DeadLetter {
                source: "mqtt",
                topic: Some(message.topic.clone()),
                sensor_id: sensor,
                payload: message.payload.to_vec(),
                reason: reject.reason,
                detail: reject.detail,
                index: reject.index,
                received_at: message.received_at,
            };
            let (client, sensor) = match self.topics.parse(&message.topic) {
                Ok(ids) => ids,
                Err(e) => {
                    letters.push(letter(
                        Reject::message(RejectReason::InvalidTopic, e.to_string()),
                        None,
                    ));
                    continue;
                }
            };
            let Some(entry) = retry("sensor lookup", stop, || self.directory.get(sensor)).await
            else {
                return; // stopping: nothing acknowledged, the broker sends it again
            };
            let reject = match entry {
                None => Some(Reject::message(
                    RejectReason::UnknownSensor,
                    format!("no sensor {sensor}"),
                )),
                Some(e) if e.client_id != client => Some(Reject::message(
                    RejectReason::ClientMismatch,
                    format!("sensor {sensor} does not belong to client {client}"),
                )),
                Some(_) => None,
            };
            if let Some(reject) = reject {
                letters.push(letter(reject, Some(sensor)));
                continue;
            }
            match parse_message(
                &message.payload,
                sensor,
                client,
                message.received_at,
                &self.settings.limits,
            ) {
                Ok(parsed) => {
                    origin.extend(std::iter::repeat_n(i, parsed.readings.len()));
                    readings.extend(parsed.readings);
                    letters.extend(parsed.rejects.into_iter().map(|r| letter(r, Some(sensor))));
                }
                Err(reject) => letters.push(letter(reject, Some(sensor))),
            }
        }

        let Some(outcome) = retry("store readings", stop, || self.sink.store(&readings)).await
        else {
            return;
        };
        for (index, message) in &outcome.refused {
            let m = &batch[origin[*index]];
            letters.push(DeadLetter {
                source: "mqtt",
                topic: Some(m.topic.clone()),
                sensor_id: Some(readings[*index].sensor_id),
                payload: m.payload.to_vec(),
                reason: RejectReason::StoreRejected,
                detail: message.clone(),
                index: None,
                received_at: m.received_at,
            });
        }
        if retry("store dead letters", stop, || {
            self.sink.dead_letter(&letters)
        })
        .await
        .is_none()
        {
            return;
        }

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
            stored = outcome.inserted,
            duplicates = outcome.duplicates,
            rejected = letters.len(),
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
