//! Edge mode: the embedded broker, the consumer and the API in one process, over one
//! PostgreSQL pool, one MongoDB client and one sensor directory.

mod settings;

use termopar_api::Application;
use termopar_broker::{reachable, RunningBroker};
use termopar_core::{
    settings::MqttEndpoint,
    store::{MigrationReport, ReadingStore},
};

pub use settings::EdgeSettings;

/// Applies the database migrations and moves readings of a previous version's shape
/// (see `termopar_core::store`), without starting anything.
pub async fn migrate(settings: &EdgeSettings) -> anyhow::Result<MigrationReport> {
    let pg = termopar_core::db::connect_and_migrate(&settings.api.database).await?;
    let mongo = termopar_core::mongo::connect(&settings.api.mongo).await?;
    Ok(
        ReadingStore::with_tuning(pg, &mongo, settings.api.store.clone())
            .prepare()
            .await?,
    )
}

/// Writes a backup of PostgreSQL and the document store into `dir` (see
/// `termopar_core::backup`), while nodes keep running.
pub async fn backup(
    settings: &EdgeSettings,
    dir: &std::path::Path,
) -> anyhow::Result<termopar_core::backup::Manifest> {
    let pg = termopar_core::db::connect_lazy(&settings.api.database)?;
    let mongo = termopar_core::mongo::connect(&settings.api.mongo).await?;
    termopar_core::backup::backup(&pg, &mongo, dir).await
}

/// Restores the backup in `dir` into empty stores: creates the database and its tables
/// when missing (every migration of this version, the job queue's too), then copies.
pub async fn restore(
    settings: &EdgeSettings,
    dir: &std::path::Path,
) -> anyhow::Result<termopar_core::backup::Manifest> {
    let pg = termopar_core::db::connect_and_migrate(&settings.api.database).await?;
    termopar_leads::migrate(&pg).await?;
    let mongo = termopar_core::mongo::connect(&settings.api.mongo).await?;
    termopar_core::backup::restore(&pg, &mongo, dir).await
}

/// A running edge node.
pub struct Edge {
    /// The API, bound but not yet serving.
    pub app: Application,
    /// The embedded broker.
    pub broker: RunningBroker,
    consumer: tokio::task::JoinHandle<anyhow::Result<()>>,
    drainer: termopar_consumer::Drainer,
    stop_consumer: tokio::sync::oneshot::Sender<()>,
}

/// At shutdown, the longest the edge waits for the MQTT front's connections to end, and
/// then for the consumer to store anything more of what the embedded broker holds (it is
/// waited for as long as it keeps storing).
const CLOSE_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);
const DRAIN_STALL: std::time::Duration = std::time::Duration::from_secs(30);

/// The embedded broker's buffer per subscription filter unless `MQTT_BUFFER_BYTES` says
/// otherwise (see `BrokerSettings::buffer_bytes`).
const EDGE_BUFFER_BYTES: usize = 32 * 1024 * 1024;

impl Edge {
    /// Connects the stores (creating the database and applying migrations), starts the
    /// broker and the consumer, and binds the API.
    pub async fn start(mut settings: EdgeSettings) -> anyhow::Result<Self> {
        settings.validate()?;
        let pg = termopar_core::db::connect_and_migrate(&settings.api.database).await?;
        let mongo = termopar_core::mongo::connect(&settings.api.mongo).await?;
        // The MQTT port is resolved first so /ready can check the embedded broker.
        settings.broker.addr = termopar_broker::resolve(settings.broker.addr)?;
        settings.api.ready_broker = Some(MqttEndpoint::parse(&format!(
            "mqtt://{}",
            reachable(settings.broker.addr)
        ))?);
        // The console's ready `mosquitto_pub` line names the embedded broker.
        settings.api.console.mqtt_port = settings.broker.addr.port();
        settings.api.console.topics =
            termopar_core::topic::Topics::new(&settings.broker.topic_prefix);
        let app = Application::prepare(&settings.api, pg, mongo).await?;
        let directory = app.state().directory.clone();
        // A small broker buffer: the front holds devices back while the consumer is half
        // of it behind, so it never drops what the consumer has not read.
        settings
            .broker
            .buffer_bytes
            .get_or_insert(EDGE_BUFFER_BYTES);
        // A device's reading is acknowledged once stored: a node killed at any point has
        // told devices only of what is stored, and they resend the rest.
        let filter =
            termopar_core::topic::Topics::new(&settings.consumer.topic_prefix).readings_filter();
        settings.broker.ack_when_finished = Some(filter.clone());
        let broker = termopar_broker::start(&settings.broker, Some(directory.clone())).await?;
        // The in-process consumer talks to rumqttd directly, past the front.
        settings.consumer.broker = broker.direct_endpoint();

        // The consumer stores through the API's store, so the API's caches (latest
        // readings, finished days, recent segments) follow what it commits at once, and
        // its alarm evaluator (one state per rule and sensor, with HTTP ingest's).
        let store = app.state().ingest.clone();
        let (stop_consumer, stopped) = tokio::sync::oneshot::channel::<()>();
        let mut consumer = termopar_consumer::Consumer::new(settings.consumer, directory, store);
        if let Some(finished) = broker.finished() {
            consumer.on_finished(move |topic, payload| finished.finished(topic, payload));
        }
        let drainer = consumer.drainer();
        broker.hold_back(filter, consumer.done_bytes());
        // Devices are taken once the consumer's subscription is in rumqttd (see
        // `RunningBroker::admit`); it keeps it from then on (a persistent session).
        let mut subscribed = consumer.subscribed();
        let admitting = broker.clone();
        tokio::spawn(async move {
            if subscribed.wait_for(|s| *s).await.is_ok() {
                admitting.admit();
            }
        });
        let consumer = tokio::spawn(consumer.run(async move {
            let _ = stopped.await;
        }));
        Ok(Self {
            app,
            broker,
            consumer,
            drainer,
            stop_consumer,
        })
    }

    /// Serves the API until `shutdown` (finishing its requests and background tasks),
    /// then closes the MQTT front door, lets the consumer store and acknowledge
    /// everything the embedded broker took from devices (it lives in memory and ends
    /// with the process), and stops the consumer.
    pub async fn run_until(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> anyhow::Result<()> {
        let served = self.app.run_until(shutdown).await;
        if !self.broker.close(CLOSE_LIMIT).await {
            tracing::warn!(
                "MQTT client connections did not end within {CLOSE_LIMIT:?}; a reading \
                 acknowledged to a device after this may be lost"
            );
        }
        if !self.drainer.drained(DRAIN_STALL).await {
            tracing::warn!(
                "the consumer stored nothing for {DRAIN_STALL:?} before finishing what the embedded broker holds; \
                 readings it acknowledged to devices and not yet stored are lost"
            );
        }
        let _ = self.stop_consumer.send(());
        self.consumer.await??;
        served
    }
}
