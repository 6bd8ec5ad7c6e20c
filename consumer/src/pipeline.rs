//! Batching, validation, storage and acknowledgement.
//!
//! A QoS 1 message is acknowledged only after everything it carried is stored (or
//! dead-lettered): a consumer killed at any point loses nothing, since the broker keeps
//! unacknowledged messages of a persistent session and sends them again. Store failures
//! are retried with backoff and never acknowledged meanwhile; bad data is dead-lettered
//! and acknowledged, so one poison message cannot block the stream.
//!
//! Up to `CONSUMER_PIPELINE` batches are stored at once: the broker sends a subscriber
//! only so many unacknowledged messages (100 for rumqttd), so a batch that took them all
//! would leave the broker idle while it is stored. Each batch takes its share of that
//! window instead, and is acknowledged only after the batch before it was (in order, as
//! brokers expect); a batch before it that was not acknowledged (the consumer is
//! stopping) holds back the ones after it too.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use rumqttc::AsyncClient;
use termopar_core::intake::{Address, Incoming, Intake, Sink};
use tokio::{
    sync::{mpsc, watch, Semaphore},
    task::JoinHandle,
};

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
    pub(crate) progress: crate::Progress,
}

impl<S: Sink> Pipeline<S> {
    /// Runs until `messages` ends or `stop` turns true; the batches in hand are finished
    /// (stored and acknowledged) before returning, unless storage is down.
    pub async fn run(self, mut messages: mpsc::Receiver<Message>, mut stop: watch::Receiver<bool>) {
        let depth = self.settings.pipeline.max(1);
        let unacked_per_batch = self.settings.max_unacked.div_ceil(depth);
        let this = Arc::new(self);
        let slots = Arc::new(Semaphore::new(depth));
        // The newest batch in progress; each one waits for the one before it.
        let mut newest: Option<JoinHandle<bool>> = None;
        let mut batch: Vec<Message> = Vec::new();
        let mut readings_estimate = 0usize;
        let mut unacked = 0usize;
        let mut first_at: Option<Instant> = None;
        loop {
            let deadline = first_at.map(|t| t + this.settings.batch_delay);
            let (flush, last) = tokio::select! {
                biased;
                _ = stop.changed() => (true, true),
                m = messages.recv() => match m {
                    Some(m) => {
                        // A rough count: each `{` of an array payload is about one reading.
                        readings_estimate += if m.payload.first() == Some(&b'[') {
                            m.payload.iter().filter(|&&b| b == b'{').count().max(1)
                        } else { 1 };
                        unacked += usize::from(m.ack.is_some());
                        first_at.get_or_insert_with(Instant::now);
                        batch.push(m);
                        (readings_estimate >= this.settings.batch_size || unacked >= unacked_per_batch, false)
                    }
                    None => (true, true),
                },
                _ = sleep_until(deadline) => (true, false),
            };
            if flush && !batch.is_empty() {
                let slot = Arc::clone(&slots)
                    .acquire_owned()
                    .await
                    .expect("the semaphore is never closed");
                let (pipeline, batch, before, mut stop) = (
                    Arc::clone(&this),
                    std::mem::take(&mut batch),
                    newest.take(),
                    stop.clone(),
                );
                newest = Some(tokio::spawn(async move {
                    let stored = pipeline.store(&batch, &mut stop).await;
                    let in_order = match before {
                        Some(before) => before.await.unwrap_or(false),
                        None => true,
                    };
                    let acked = stored && in_order;
                    if acked {
                        pipeline.ack(&batch).await;
                    }
                    drop(slot);
                    acked
                }));
                readings_estimate = 0;
                unacked = 0;
                first_at = None;
            }
            if last {
                if let Some(newest) = newest {
                    let _ = newest.await;
                }
                return;
            }
        }
    }

    /// Validates, stores and dead-letters one batch; false when stopped first.
    async fn store(&self, batch: &[Message], stop: &mut watch::Receiver<bool>) -> bool {
        let started = Instant::now();
        let incoming: Vec<Incoming> = batch
            .iter()
            .filter(|m| !m.marker)
            .map(|m| Incoming {
                address: Address::Topic(&m.topic),
                payload: m.payload.clone(),
                received_at: m.received_at,
            })
            .collect();
        if incoming.is_empty() {
            return true;
        }
        // Nothing is acknowledged while either step fails: when stopping, the broker
        // sends the messages again.
        let Some(prepared) = retry("sensor lookup", stop, || self.intake.prepare(&incoming)).await
        else {
            return false;
        };
        let Some(report) = retry("store readings", stop, || {
            self.intake.commit(&self.sink, &prepared)
        })
        .await
        else {
            return false;
        };
        metrics::histogram!("consumer_batch_messages").record(batch.len() as f64);
        metrics::histogram!("consumer_batch_seconds").record(started.elapsed().as_secs_f64());
        tracing::debug!(
            messages = batch.len(),
            stored = report.stored,
            duplicates = report.duplicates,
            rejected = report.rejected.len(),
            "batch done"
        );
        true
    }

    /// Acknowledges a stored batch's QoS 1 messages.
    async fn ack(&self, batch: &[Message]) {
        let epoch = self.epoch.current();
        for message in batch {
            if let Some(publish) = &message.ack {
                // An acknowledgement on a newer connection would be unsolicited (rumqttd
                // drops the connection for it); the broker resends those messages anyway.
                if message.epoch == epoch {
                    if let Err(e) = self.client.ack(publish).await {
                        tracing::warn!(error = %e, "could not queue an acknowledgement");
                    }
                }
                self.progress.done(1);
            }
            self.progress.finished(&message.topic, &message.payload);
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use bytes::Bytes;
    use chrono::Utc;
    use rumqttc::{Publish, QoS, Request};
    use termopar_core::{
        directory::SensorDirectory,
        reading::Reading,
        settings::MqttEndpoint,
        store::{DeadLetter, StoreError, StoreOutcome},
        topic::Topics,
    };
    use test_support::{eventually, TestDb, DEFAULT_DEADLINE};
    use uuid::Uuid;

    use super::*;

    /// Records what it stores; a call with reading `hold` waits for a `release` permit.
    #[derive(Clone)]
    struct Gated {
        hold: Uuid,
        release: Arc<Semaphore>,
        stored: Arc<Mutex<Vec<Uuid>>>,
    }

    impl Sink for Gated {
        async fn store(&self, readings: &[Reading]) -> Result<StoreOutcome, StoreError> {
            if readings.iter().any(|r| r.id == self.hold) {
                let _permit = self.release.acquire().await;
            }
            let mut stored = self.stored.lock().expect("not poisoned");
            stored.extend(readings.iter().map(|r| r.id));
            Ok(StoreOutcome {
                inserted: readings.len(),
                ..Default::default()
            })
        }

        async fn dead_letter(&self, _letters: &[DeadLetter]) -> Result<(), StoreError> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_batch_stored_before_the_one_ahead_of_it_is_acknowledged_after_it() {
        let db = TestDb::new().await;
        let (client, sensors) = db.client_with_sensors(1).await;
        let mut settings = ConsumerSettings::new(
            MqttEndpoint::parse("mqtt://127.0.0.1:1").unwrap(),
            "pipeline-test",
        );
        // Each QoS 1 message is a batch of its own; two are stored at once.
        (settings.max_unacked, settings.pipeline) = (2, 2);
        settings.batch_delay = Duration::from_secs(60);
        let (first, second) = (Uuid::new_v4(), Uuid::new_v4());
        let sink = Gated {
            hold: first,
            release: Arc::new(Semaphore::new(0)),
            stored: Arc::default(),
        };
        let (requests, acks) = flume::unbounded();
        let pipeline = Pipeline {
            intake: Intake::new(
                SensorDirectory::new(db.pool.clone()),
                Topics::new(""),
                settings.limits.clone(),
            ),
            settings,
            sink: sink.clone(),
            client: AsyncClient::from_senders(requests),
            epoch: Epoch::default(),
            progress: crate::Progress::default(),
        };
        let (messages, incoming) = mpsc::channel(8);
        let (stop, stopped) = watch::channel(false);
        let running = tokio::spawn(pipeline.run(incoming, stopped));
        let topic = Topics::new("").readings(client, sensors[0]);
        for (pkid, id) in [(1, first), (2, second)] {
            let payload = Bytes::from(
                serde_json::json!({"id": id, "ts": "2026-03-01T00:00:00Z", "temperature": 1.0})
                    .to_string(),
            );
            let mut publish = Publish::new(&topic, QoS::AtLeastOnce, payload.clone());
            publish.pkid = pkid;
            messages
                .send(Message {
                    topic: topic.clone(),
                    payload,
                    received_at: Utc::now(),
                    ack: Some(publish),
                    epoch: 0,
                    marker: false,
                })
                .await
                .unwrap();
        }

        // The second batch is stored while the first is held, but not acknowledged.
        eventually("the second batch stored", DEFAULT_DEADLINE, || async {
            (sink.stored.lock().unwrap().as_slice() == [second]).then_some(())
        })
        .await;
        assert!(
            acks.is_empty(),
            "nothing acknowledged before the first batch"
        );

        sink.release.add_permits(1);
        let mut order = Vec::new();
        for _ in 0..2 {
            match acks.recv_async().await.unwrap() {
                Request::PubAck(ack) => order.push(ack.pkid),
                other => panic!("not an acknowledgement: {other:?}"),
            }
        }
        assert_eq!(order, [1, 2], "acknowledged in order");
        stop.send(true).unwrap();
        running.await.unwrap();
        assert_eq!(*sink.stored.lock().unwrap(), [second, first]);
    }
}
