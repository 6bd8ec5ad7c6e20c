use termopar::{Edge, EdgeSettings};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    termopar_core::telemetry::init("info");
    let settings = EdgeSettings::from_env()?;
    let edge = Edge::start(settings).await?;
    let api = edge.app.addr();
    let mqtt = edge.broker.url();
    tracing::info!(%api, %mqtt, "termopar edge node running");
    eprintln!(
        "\ntermopar is running:\n  API      http://{api}  (docs at http://{api}/docs)\n  MQTT     {mqtt}  (MQTT 5: {:?})\n\
         Simulate two clients' sensors in another terminal:\n  \
         cargo run --release -p termopar-device-sim -- --api-url http://{api} --mqtt-url {mqtt} --rate 20 --duration 60\n",
        edge.broker.v5_addr
    );
    edge.run_until(termopar_core::shutdown::signal()).await
}
