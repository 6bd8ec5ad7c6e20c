//! termopar's consumer: subscribes to readings over MQTT, validates them, stores raw
//! readings in MongoDB and rollups in PostgreSQL exactly once, dead-letters what is
//! wrong, and acknowledges each QoS 1 message only after it is persisted.
//!
//! Works against any MQTT 3.1.1 broker (the embedded rumqttd, Mosquitto, EMQX). Several
//! consumers split the load with a share group, on a broker that keeps persistent
//! shared sessions (not rumqttd 0.20, which crashes; see docs/ARCHITECTURE.md).

pub mod mqtt;
pub mod pipeline;
pub mod settings;

use std::{
    future::Future,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use rumqttc::{AsyncClient, QoS};
use termopar_core::{directory::SensorDirectory, intake::Intake, topic::Topics};
use tokio::sync::{mpsc, watch};

pub use settings::ConsumerSettings;
pub use termopar_core::intake::Sink;

/// A consumer, ready to run.
pub struct Consumer<S> {
    settings: ConsumerSettings,
    directory: SensorDirectory,
    sink: S,
    subscribed: watch::Sender<bool>,
    progress: Progress,
    client: AsyncClient,
    eventloop: rumqttc::EventLoop,
}

/// How far a consumer got: QoS 1 messages received from the broker, how many of them it
/// is done with (stored and acknowledged, or left for the broker to resend), and where
/// an awaited drain marker came. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    received: Arc<AtomicU64>,
    done: Arc<AtomicU64>,
    /// Bytes of every message done (QoS 0 too), as rumqttd counts a message in its log:
    /// topic + payload + 4.
    done_bytes: Arc<AtomicU64>,
    marker: Arc<Mutex<Marker>>,
    awaiting: Arc<AtomicBool>,
    finished: Finished,
}

/// What is told of a finished message: its topic and payload.
type Tell = dyn Fn(&str, &[u8]) + Send + Sync;

/// Told of every message the consumer finished (see [`Consumer::on_finished`]).
#[derive(Clone, Default)]
struct Finished(Option<Arc<Tell>>);

impl std::fmt::Debug for Finished {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Finished(set)"
        } else {
            "Finished(none)"
        })
    }
}

#[derive(Debug, Default)]
struct Marker {
    /// Where drain markers' topics start, once a drain was asked for: a marker of an
    /// earlier drain that comes late is acknowledged and never stored.
    markers: Option<String>,
    /// The marker's topic awaited now.
    topic: String,
    /// `received` once it came.
    at: Option<u64>,
}

impl Progress {
    /// Counts a message (QoS 1 when `acknowledged`); true when it is a drain marker.
    pub(crate) fn received(&self, topic: &str, acknowledged: bool) -> bool {
        let received = if acknowledged {
            self.received.fetch_add(1, Ordering::AcqRel) + 1
        } else {
            self.received.load(Ordering::Acquire)
        };
        if !self.awaiting.load(Ordering::Acquire) {
            return false;
        }
        let mut marker = self.marker.lock().unwrap_or_else(|e| e.into_inner());
        if !marker
            .markers
            .as_deref()
            .is_some_and(|markers| topic.starts_with(markers))
        {
            return false;
        }
        if marker.topic == topic {
            marker.at = Some(received);
        }
        true
    }

    pub(crate) fn done(&self, n: u64) {
        self.done.fetch_add(n, Ordering::AcqRel);
    }

    /// A message (QoS 0 too) is stored or dead-lettered, and acknowledged to the broker.
    pub(crate) fn finished(&self, topic: &str, payload: &[u8]) {
        let size = 4 + topic.len() + payload.len();
        self.done_bytes.fetch_add(size as u64, Ordering::AcqRel);
        if let Some(tell) = &self.finished.0 {
            tell(topic, payload);
        }
    }

    fn done_so_far(&self) -> u64 {
        self.done.load(Ordering::Acquire)
    }

    fn await_marker(&self, markers: String, topic: String) {
        *self.marker.lock().unwrap_or_else(|e| e.into_inner()) = Marker {
            markers: Some(markers),
            topic,
            at: None,
        };
        self.awaiting.store(true, Ordering::Release);
    }

    /// The awaited marker came and everything received up to it is done (batches are
    /// done in the order they were received).
    fn marker_done(&self) -> bool {
        let at = self.marker.lock().unwrap_or_else(|e| e.into_inner()).at;
        at.is_some_and(|at| self.done.load(Ordering::Acquire) >= at)
    }
}

/// Tells when a running consumer has stored everything its broker had logged for it.
#[derive(Clone)]
pub struct Drainer {
    client: AsyncClient,
    topics: Topics,
    progress: Progress,
}

impl Drainer {
    /// Publishes a drain marker to the consumer's broker on the consumer's own connection
    /// and resolves once the marker came back and every message received before it is
    /// stored and acknowledged (true), or once the consumer finished nothing for `stall`
    /// (false: its stores are down, say). A broker delivers a subscription's messages in
    /// the order it logged them, so whatever it had taken before the marker is then
    /// stored, however slow the machine: a consumer that keeps storing is waited for.
    /// Edge mode waits for this at shutdown, after the embedded broker stopped accepting
    /// devices: what it acknowledged to them is then stored before the process ends.
    pub async fn drained(&self, stall: Duration) -> bool {
        let topic = self.topics.drain_marker(uuid::Uuid::new_v4());
        self.progress
            .await_marker(self.topics.drain_markers(), topic.clone());
        let published = tokio::time::timeout(
            stall,
            self.client
                .publish(topic, QoS::AtLeastOnce, false, Vec::<u8>::new()),
        )
        .await;
        if !matches!(published, Ok(Ok(()))) {
            return false;
        }
        let mut done = self.progress.done_so_far();
        let mut since = tokio::time::Instant::now();
        loop {
            if self.progress.marker_done() {
                return true;
            }
            let now = self.progress.done_so_far();
            if now != done {
                (done, since) = (now, tokio::time::Instant::now());
            } else if since.elapsed() >= stall {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl<S: Sink> Consumer<S> {
    /// A consumer of readings from `settings.broker` into `sink`.
    pub fn new(settings: ConsumerSettings, directory: SensorDirectory, sink: S) -> Self {
        let (client, eventloop) = AsyncClient::new(mqtt::options(&settings), 4096);
        Self {
            settings,
            directory,
            sink,
            subscribed: watch::channel(false).0,
            progress: Progress::default(),
            client,
            eventloop,
        }
    }

    /// How to wait, once the broker takes no more publishes, until the consumer has
    /// stored everything the broker holds for it (see [`Drainer::drained`]).
    pub fn drainer(&self) -> Drainer {
        Drainer {
            client: self.client.clone(),
            topics: Topics::new(&self.settings.topic_prefix),
            progress: self.progress.clone(),
        }
    }

    /// Bytes of the messages this consumer is done with (stored, dead-lettered, or left
    /// for the broker to send again), counted as rumqttd counts its log (topic + payload +
    /// 4): what the embedded broker's hold-back compares with what its log took.
    pub fn done_bytes(&self) -> Arc<AtomicU64> {
        self.progress.done_bytes.clone()
    }

    /// Tells `tell` the topic and payload of every message finished (stored or
    /// dead-lettered, then acknowledged to the broker), as received: the embedded
    /// broker's front acknowledges a device's publish only then.
    pub fn on_finished(&mut self, tell: impl Fn(&str, &[u8]) + Send + Sync + 'static) {
        self.progress.finished = Finished(Some(Arc::new(tell)));
    }

    /// Turns true once the broker confirmed the subscription (and false while
    /// disconnected): from then on nothing published is missed.
    pub fn subscribed(&self) -> watch::Receiver<bool> {
        self.subscribed.subscribe()
    }

    /// Runs until `shutdown` resolves, then finishes the batch in hand, disconnects
    /// (keeping the persistent session) and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
        let Self {
            settings,
            directory,
            sink,
            subscribed,
            progress,
            client,
            eventloop,
        } = self;
        settings.validate()?;
        let topics = Topics::new(&settings.topic_prefix);
        let filter = match &settings.share_group {
            Some(group) => {
                tracing::warn!(
                    group,
                    "shared subscription with a persistent session: the broker must keep \
                     persistent shared sessions (Mosquitto, EMQX). rumqttd 0.20 crashes when \
                     such a subscriber disconnects abruptly."
                );
                topics.shared_readings_filter(group)
            }
            None => topics.readings_filter(),
        };

        // The sink's background work (for the reading store: deleting what writes that
        // never committed left behind, and merging segments) runs beside consuming.
        let (stop_tx, stop_rx) = watch::channel(false);
        let maintenance = tokio::spawn(sink.maintain(stop_rx.clone()));

        let (tx, rx) = mpsc::channel(settings.max_unacked.max(settings.batch_size).min(100_000));
        let epoch = mqtt::Epoch::default();
        let driver = tokio::spawn(mqtt::drive(
            client.clone(),
            eventloop,
            filter,
            tx,
            epoch.clone(),
            subscribed,
            progress.clone(),
        ));
        let intake = Intake::new(directory, topics, settings.limits.clone());
        let pipeline = pipeline::Pipeline {
            settings,
            intake,
            sink,
            client: client.clone(),
            epoch,
            progress,
        };
        let worker = tokio::spawn(pipeline.run(rx, stop_rx));

        shutdown.await;
        let _ = stop_tx.send(true);
        let _ = worker.await;
        // Let the queued acknowledgements go out before saying goodbye.
        let _ = client.disconnect().await;
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), driver).await;
        let _ = maintenance.await;
        Ok(())
    }
}

/// Runs a consumer until `shutdown` (see [`Consumer::run`]).
pub async fn run<S: Sink>(
    settings: ConsumerSettings,
    directory: SensorDirectory,
    sink: S,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    Consumer::new(settings, directory, sink).run(shutdown).await
}
