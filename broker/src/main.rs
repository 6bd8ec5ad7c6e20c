use termopar_broker::BrokerSettings;
use termopar_core::{db, directory::SensorDirectory, settings::DatabaseSettings};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    termopar_core::telemetry::init("info");
    let settings = BrokerSettings::from_env()?;
    let directory = if settings.require_auth {
        let pg = db::connect_and_migrate(&DatabaseSettings::from_env()?).await?;
        Some(SensorDirectory::new(pg))
    } else {
        None
    };
    // Bound first, so that nothing the broker records is lost.
    let metrics =
        termopar_core::metrics::serve(settings.metrics_addr, termopar_core::shutdown::signal())
            .await?;
    termopar_broker::start(&settings, directory).await?;
    metrics.await
}
