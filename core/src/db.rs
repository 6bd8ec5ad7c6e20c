//! PostgreSQL: pool, database creation, migrations and error classification.

use std::str::FromStr;

use anyhow::Context;
use secrecy::ExposeSecret;
use sqlx::{
    migrate::{MigrateDatabase, Migrator},
    postgres::{PgConnectOptions, PgPoolOptions},
    PgPool, Postgres,
};

use crate::settings::DatabaseSettings;

/// The migrations in `migrations/`, embedded at build time.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

/// Creates the database named in `url` when it does not exist yet.
pub async fn ensure_database(url: &str) -> anyhow::Result<()> {
    if Postgres::database_exists(url)
        .await
        .context("failed to check whether the database exists")?
    {
        return Ok(());
    }
    match Postgres::create_database(url).await {
        Ok(()) => Ok(()),
        // Two processes starting together may race to create it: losing is fine.
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => Ok(()),
        Err(e) => Err(e).context("failed to create the database"),
    }
}

fn pool_options(settings: &DatabaseSettings) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(settings.acquire_timeout)
}

fn connect_options(settings: &DatabaseSettings) -> anyhow::Result<PgConnectOptions> {
    Ok(PgConnectOptions::from_str(settings.url.expose_secret())
        .context("invalid DATABASE_URL")?
        // Every query here is short. PostgreSQL's row estimates for joins against arrays
        // of parameters are often far too high, and past its cost thresholds it then
        // compiles the query (JIT, ~25 ms) and starts parallel workers: a year of daily
        // averages in a :30 zone took ~100 ms that way, 11 ms without.
        .options([("jit", "off"), ("max_parallel_workers_per_gather", "0")]))
}

/// Creates the database if missing, connects and applies every pending migration.
pub async fn connect_and_migrate(settings: &DatabaseSettings) -> anyhow::Result<PgPool> {
    ensure_database(settings.url.expose_secret()).await?;
    let pool = pool_options(settings)
        .connect_with(connect_options(settings)?)
        .await
        .context("failed to connect to PostgreSQL")?;
    MIGRATOR
        .run(&pool)
        .await
        .context("failed to apply migrations")?;
    Ok(pool)
}

/// A pool that connects on first use: for processes that must start (and answer 503)
/// while PostgreSQL is down.
pub fn connect_lazy(settings: &DatabaseSettings) -> anyhow::Result<PgPool> {
    Ok(pool_options(settings).connect_lazy_with(connect_options(settings)?))
}

/// True when `err` means PostgreSQL cannot be reached or cannot serve right now, so the
/// caller should answer 503 or retry, rather than treat the request as bad.
pub fn is_unavailable(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // 08: connection exception; 53: insufficient resources;
            // 57P01-57P03: shutdown or starting up; 40001/40P01 are retryable too.
            code.starts_with("08")
                || code.starts_with("53")
                || matches!(&*code, "57P01" | "57P02" | "57P03" | "40001" | "40P01")
        }),
        _ => false,
    }
}

/// True when PostgreSQL could not be reached or cannot serve at all, as opposed to a
/// transaction it refused (deadlock, serialization failure) that a retry may pass.
pub fn is_unreachable(err: &sqlx::Error) -> bool {
    is_unavailable(err) && !matches!(sqlstate(err).as_deref(), Some("40001" | "40P01"))
}

/// The SQLSTATE of a database error, if `err` is one.
pub fn sqlstate(err: &sqlx::Error) -> Option<String> {
    match err {
        sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
        _ => None,
    }
}

/// The constraint a database error names, if any.
pub fn constraint(err: &sqlx::Error) -> Option<&str> {
    match err {
        sqlx::Error::Database(db) => db.constraint(),
        _ => None,
    }
}

/// A copy of a shared sqlx error (from a cache, which hands errors out behind an `Arc`)
/// that keeps what callers decide on: whether PostgreSQL was unavailable.
pub fn shared_error(err: &sqlx::Error) -> sqlx::Error {
    if is_unavailable(err) {
        sqlx::Error::PoolTimedOut
    } else {
        sqlx::Error::Protocol(err.to_string())
    }
}
