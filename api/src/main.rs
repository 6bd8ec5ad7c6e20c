use termopar_api::{Application, Settings};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    termopar_core::telemetry::init("info");
    let settings = Settings::from_env()?;
    let app = Application::build(settings).await?;
    tracing::info!(addr = %app.addr(), "API listening (docs at /docs)");
    app.run_until(termopar_core::shutdown::signal()).await
}
