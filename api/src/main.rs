use clap::{Parser, Subcommand};
use termopar_api::{Application, Settings};

/// termopar's REST API.
#[derive(Parser)]
#[command(name = "termopar-api", version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the API (the default).
    Serve,
    /// Run the lead pipeline's job workers only (cloud mode; the API processes then run
    /// with `JOBS_WORKERS=false`). Marketing and the CRM default to `http://<API_ADDR>`.
    Workers,
    /// Fill demo conversations through the webhook's own code path.
    Seed {
        /// Conversations to create.
        #[arg(long, default_value_t = 1)]
        conversations: usize,
        /// Messages per conversation.
        #[arg(long, default_value_t = 5)]
        messages: usize,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    termopar_core::telemetry::init("info");
    let mut settings = Settings::from_env()?;
    match Cli::parse().command.unwrap_or(Command::Serve) {
        Command::Serve => {
            let app = Application::build(settings).await?;
            tracing::info!(addr = %app.addr(), "API listening (docs at /docs)");
            app.run_until(termopar_core::shutdown::signal()).await
        }
        Command::Workers => {
            termopar_api::run_workers(settings, termopar_core::shutdown::signal()).await
        }
        Command::Seed {
            conversations,
            messages,
        } => {
            settings.addr = "127.0.0.1:0".parse()?;
            let app = Application::build(settings).await?;
            let seeded = termopar_chat::seed(&app.handles().chat, conversations, messages).await;
            app.stop().await;
            let events = seeded.map_err(|e| anyhow::anyhow!("{}", e.message()))?;
            println!(
                "seeded {conversations} conversations with {messages} messages each ({} events)",
                events.len()
            );
            Ok(())
        }
    }
}
