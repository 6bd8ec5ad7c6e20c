//! The MongoDB-compatible store (MongoDB ≥ 6 in containers, FerretDB 1.24 in development).
//!
//! Only features both servers serve are used: find with filter/sort/skip/limit, ordered
//! and unordered inserts, unique indexes, count, and aggregate with
//! `$match/$group/$sort/$skip/$limit/$sum/$count/$project`.

use std::time::Duration;

use anyhow::Context;
use mongodb::{bson::doc, options::ClientOptions, Client, Database};

use crate::settings::MongoSettings;

/// Builds a client. It does not connect until first used, so a process can start while
/// the server is down and report it through `/ready`.
pub async fn connect(settings: &MongoSettings) -> anyhow::Result<Database> {
    let mut options = ClientOptions::parse(&settings.uri)
        .await
        .context("invalid MONGODB_URI")?;
    options.app_name = Some("termopar".into());
    // Fail fast when the server is down so callers can answer 503 or retry with backoff.
    options.server_selection_timeout = Some(Duration::from_secs(3));
    options.connect_timeout = Some(Duration::from_secs(2));
    let client = Client::with_options(options).context("failed to build the MongoDB client")?;
    Ok(client.database(&settings.database))
}

/// Asks the server to answer a `ping`.
pub async fn ping(db: &Database) -> mongodb::error::Result<()> {
    db.run_command(doc! { "ping": 1 }).await.map(|_| ())
}

/// True when `err` means the server could not be reached or could not serve right now.
pub fn is_unavailable(err: &mongodb::error::Error) -> bool {
    use mongodb::error::ErrorKind;
    matches!(
        *err.kind,
        ErrorKind::ServerSelection { .. }
            | ErrorKind::Io(_)
            | ErrorKind::ConnectionPoolCleared { .. }
            | ErrorKind::DnsResolve { .. }
    ) || err.contains_label(mongodb::error::RETRYABLE_WRITE_ERROR)
}

/// The server's code for a write refused by a unique index (`E11000`).
pub const DUPLICATE_KEY: i32 = 11000;

/// True when `err` is an unordered insert whose only failures are duplicate keys
/// (`E11000`): every document is stored, some of them by an earlier insert.
pub fn only_duplicate_keys(err: &mongodb::error::Error) -> bool {
    use mongodb::error::ErrorKind;
    match &*err.kind {
        ErrorKind::InsertMany(failure) => {
            failure.write_concern_error.is_none()
                && failure
                    .write_errors
                    .iter()
                    .flatten()
                    .all(|we| we.code == DUPLICATE_KEY)
        }
        _ => false,
    }
}
