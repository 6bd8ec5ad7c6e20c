use termopar_consumer::ConsumerSettings;
use termopar_core::{
    db, directory::SensorDirectory, ingest::IngestStore, mongo, settings::DatabaseSettings,
    settings::MongoSettings, shutdown,
};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    termopar_core::telemetry::init("info");
    let settings = ConsumerSettings::from_env()?;
    let pg = db::connect_and_migrate(&DatabaseSettings::from_env()?).await?;
    let mongo = mongo::connect(&MongoSettings::from_env()).await?;
    let store = IngestStore::new(pg.clone(), &mongo);
    store.ensure_indexes().await?;
    if let Some(addr) = settings.metrics_addr {
        tokio::spawn(termopar_core::metrics::serve(addr, shutdown::signal()));
    }
    termopar_consumer::run(
        settings,
        SensorDirectory::new(pg),
        store,
        shutdown::signal(),
    )
    .await
}
