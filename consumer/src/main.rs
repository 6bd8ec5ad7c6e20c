use termopar_consumer::ConsumerSettings;
use termopar_core::{
    db, directory::SensorDirectory, mongo, settings::DatabaseSettings, settings::MongoSettings,
    shutdown, store::ReadingStore,
};

/// The standalone consumer's allocator (edge mode gets the API's, the same). glibc's
/// malloc and free were ~20% of the consumer's CPU under `make bench-store`'s ingest.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    termopar_core::telemetry::init("info");
    let settings = ConsumerSettings::from_env()?;
    // First, so that nothing recorded from here on is lost.
    if let Some(addr) = settings.metrics_addr {
        tokio::spawn(termopar_core::metrics::serve(addr, shutdown::signal()).await?);
    }
    let pg = db::connect_and_migrate(&DatabaseSettings::from_env()?).await?;
    let mongo = mongo::connect(&MongoSettings::from_env()).await?;
    let store = ReadingStore::with_tuning(
        pg.clone(),
        &mongo,
        termopar_core::settings::StoreTuning::from_env()?,
    );
    // Before anything new is stored: readings of a previous version are moved.
    store.prepare().await?;
    // What it stores is evaluated by the alarm rules before it is acknowledged.
    let alarms = termopar_alarms::Alarms::new(pg.clone(), store.clone());
    termopar_consumer::run(
        settings,
        SensorDirectory::new(pg),
        termopar_alarms::Alarming::new(store, alarms),
        shutdown::signal(),
    )
    .await
}
