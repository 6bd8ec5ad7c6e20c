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
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use rumqttc::AsyncClient;
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
}

/// How far a consumer got: QoS 1 messages received from the broker, and how many of
/// them it is done with (stored and acknowledged, or left for the broker to resend).
/// Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    received: Arc<AtomicU64>,
    done: Arc<AtomicU64>,
}

impl Progress {
    pub(crate) fn received(&self) {
        self.received.fetch_add(1, Ordering::AcqRel);
    }

    pub(crate) fn done(&self, n: u64) {
        self.done.fetch_add(n, Ordering::AcqRel);
    }

    /// Resolves once every message received is done and none came for `quiet` (the
    /// broker sends what it holds as soon as acknowledgements free room, so a broker
    /// that stopped taking publishes is then empty for this consumer); false when that
    /// did not happen within `limit`. Edge mode waits for this at shutdown, after the
    /// embedded broker stopped accepting devices: what it acknowledged to them is then
    /// stored before the process ends.
    pub async fn drained(&self, quiet: Duration, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        let mut idle_since: Option<(tokio::time::Instant, u64)> = None;
        loop {
            let now = tokio::time::Instant::now();
            let received = self.received.load(Ordering::Acquire);
            let all_done = self.done.load(Ordering::Acquire) >= received;
            match idle_since {
                Some((since, seen)) if all_done && seen == received => {
                    if now >= since + quiet {
                        return true;
                    }
                }
                _ if all_done => idle_since = Some((now, received)),
                _ => idle_since = None,
            }
            if now >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl<S: Sink> Consumer<S> {
    /// A consumer of readings from `settings.broker` into `sink`.
    pub fn new(settings: ConsumerSettings, directory: SensorDirectory, sink: S) -> Self {
        Self {
            settings,
            directory,
            sink,
            subscribed: watch::channel(false).0,
            progress: Progress::default(),
        }
    }

    /// How far the consumer got (see [`Progress::drained`]).
    pub fn progress(&self) -> Progress {
        self.progress.clone()
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

        let (client, eventloop) = AsyncClient::new(mqtt::options(&settings), 4096);
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
