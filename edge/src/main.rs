use clap::{Parser, Subcommand};
use termopar::{Edge, EdgeSettings};

/// termopar in edge mode: the MQTT broker, the consumer and the API in one process.
#[derive(Parser)]
#[command(name = "termopar", version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the edge node (the default).
    Run,
    /// Apply database migrations and move readings stored by a previous version into
    /// the current shape, then exit. Every process that stores readings also does this
    /// at start; run it first to see it finish.
    Migrate,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    termopar_core::telemetry::init("info");
    let settings = EdgeSettings::from_env()?;
    match Cli::parse().command.unwrap_or(Command::Run) {
        Command::Run => {
            let edge = Edge::start(settings).await?;
            let api = edge.app.addr();
            let mqtt = edge.broker.url();
            tracing::info!(%api, %mqtt, "termopar edge node running");
            eprintln!(
                "\ntermopar is running:\n  API      http://{api}  (docs at http://{api}/docs)\n  MQTT     {mqtt}  (3.1.1 and 5{})\n\
                 Simulate two clients' sensors in another terminal:\n  \
                 cargo run --release -p termopar-device-sim -- --api-url http://{api} --mqtt-url {mqtt} --rate 20 --duration 60\n",
                edge.broker
                    .tls_addr
                    .map(|a| format!("; TLS on {a}"))
                    .unwrap_or_default()
            );
            edge.run_until(termopar_core::shutdown::signal()).await
        }
        Command::Migrate => {
            let report = termopar::migrate(&settings).await?;
            println!(
                "migrated: {} legacy documents read, {} readings moved, {} moved before, {} skipped",
                report.read, report.stored, report.already, report.skipped
            );
            Ok(())
        }
    }
}
