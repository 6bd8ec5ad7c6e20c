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
    /// Back up PostgreSQL and the document store together, at one consistent point,
    /// into a new directory (nodes keep running; deletions of raw documents wait).
    Backup {
        /// The directory to create (or an empty one).
        #[arg(long)]
        to: std::path::PathBuf,
    },
    /// Restore a backup into an empty database and document store (created and
    /// migrated first), with this version of termopar.
    Restore {
        /// The backup's directory.
        #[arg(long)]
        from: std::path::PathBuf,
    },
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
        Command::Backup { to } => {
            let manifest = termopar::backup(&settings, &to).await?;
            println!("backed up into {}: {}", to.display(), summary(&manifest));
            Ok(())
        }
        Command::Restore { from } => {
            let manifest = termopar::restore(&settings, &from).await?;
            println!(
                "restored from {} (made {}): {}",
                from.display(),
                manifest.created_at,
                summary(&manifest)
            );
            Ok(())
        }
    }
}

/// "N rows in T tables, M documents in C collections".
fn summary(manifest: &termopar_core::backup::Manifest) -> String {
    format!(
        "{} rows in {} tables, {} documents in {} collections",
        manifest.tables.iter().map(|t| t.rows).sum::<u64>(),
        manifest.tables.len(),
        manifest
            .collections
            .iter()
            .map(|c| c.documents)
            .sum::<u64>(),
        manifest.collections.len()
    )
}
