//! Test harness shared by the crates' integration tests.
//!
//! Every test gets its own PostgreSQL database and its own MongoDB database, both
//! dropped when the test ends, so tests share nothing and can run in parallel.
//! The services themselves are started by `scripts/services.sh` (`make services`).

use std::{future::Future, str::FromStr, time::Duration};

use sqlx::{
    postgres::{PgConnectOptions, PgPoolOptions},
    ConnectOptions, Connection, Executor, PgConnection, PgPool,
};
use termopar_core::settings::{
    env_or, DatabaseSettings, MongoSettings, DEFAULT_DATABASE_URL, DEFAULT_MONGODB_URI,
};
use uuid::Uuid;

/// Default deadline of [`eventually`].
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(20);

fn server_options() -> PgConnectOptions {
    let url = env_or("DATABASE_URL", DEFAULT_DATABASE_URL);
    PgConnectOptions::from_str(&url).expect("DATABASE_URL is a valid PostgreSQL URL")
}

fn url_of(options: &PgConnectOptions) -> String {
    options.to_url_lossy().to_string()
}

/// A fresh, migrated PostgreSQL database, dropped when this value is dropped.
pub struct TestDb {
    /// A small pool on it.
    pub pool: PgPool,
    /// Its URL.
    pub url: String,
    name: String,
}

impl TestDb {
    /// Creates the database and applies every migration.
    pub async fn new() -> Self {
        let name = format!("termopar_test_{}", Uuid::new_v4().simple());
        let mut admin = PgConnection::connect_with(&server_options().database("postgres"))
            .await
            .expect("PostgreSQL is up (run `make services`)");
        admin
            // The name is generated here, never taken from input.
            .execute(sqlx::AssertSqlSafe(format!(r#"CREATE DATABASE "{name}""#)))
            .await
            .expect("create the test database");
        admin.close().await.ok();
        let options = server_options().database(&name);
        let url = url_of(&options);
        let pool = PgPoolOptions::new()
            .max_connections(5)
            .connect_with(options)
            .await
            .expect("connect to the test database");
        termopar_core::db::MIGRATOR
            .run(&pool)
            .await
            .expect("migrations apply to an empty database");
        Self { pool, url, name }
    }

    /// Settings pointing at this database.
    pub fn settings(&self) -> DatabaseSettings {
        DatabaseSettings::with_url(&self.url)
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop cannot await: use a thread with its own runtime, and wait for it so the
        // database is gone when the test ends. The pools on it (ours and the app's) live
        // on the test's runtime, which this blocks, so they are not closed gracefully:
        // FORCE terminates their sessions server-side.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for cleanup");
            rt.block_on(async move {
                if let Ok(mut admin) =
                    PgConnection::connect_with(&server_options().database("postgres")).await
                {
                    let _ = admin
                        .execute(sqlx::AssertSqlSafe(format!(
                            r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#
                        )))
                        .await;
                }
            });
        })
        .join();
    }
}

/// A fresh MongoDB database name on the shared server, dropped when this is dropped.
pub struct TestMongo {
    /// Settings pointing at it.
    pub settings: MongoSettings,
}

impl TestMongo {
    /// Picks a unique database name (nothing is created until first written).
    pub fn new() -> Self {
        Self {
            settings: MongoSettings {
                uri: env_or("MONGODB_URI", DEFAULT_MONGODB_URI),
                database: format!("termopar_test_{}", Uuid::new_v4().simple()),
            },
        }
    }

    /// A handle on the database.
    pub async fn database(&self) -> mongodb::Database {
        termopar_core::mongo::connect(&self.settings)
            .await
            .expect("valid MongoDB settings")
    }
}

impl Default for TestMongo {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestMongo {
    fn drop(&mut self) {
        let settings = self.settings.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for cleanup");
            rt.block_on(async move {
                if let Ok(db) = termopar_core::mongo::connect(&settings).await {
                    let _ = db.drop().await;
                }
            });
        })
        .join();
    }
}

/// Polls `check` until it returns `Some`, or panics after `deadline` naming `what`.
/// Tests wait for effects this way, never with fixed sleeps.
pub async fn eventually<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let until = tokio::time::Instant::now() + deadline;
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() >= until {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// A TCP port on 127.0.0.1 that nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}
