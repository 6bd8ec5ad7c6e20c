//! The chat webhook product (seed 001): conversation and message events from a
//! customer-service chat system, applied exactly once to PostgreSQL and kept raw in
//! MongoDB, with the conversations readable through the API and a page to browse them.
//!
//! The API composes it: [`Chat::start`] starts its background tasks on the
//! application's [`Tasks`], [`ChatApi`] is its OpenAPI routes (taking the [`Chat`] as
//! request data), [`page`] its web page and [`seed`] fills demo data through the
//! webhook's own path.

// Items are `pub(crate)` unless another crate uses them.
#![warn(unreachable_pub)]

mod routes;
mod settings;
mod ui;
pub mod webhook;

use std::sync::Arc;

use mongodb::Database;
use secrecy::ExposeSecret;
use sqlx::PgPool;
use termopar_core::tasks::Tasks;
use tokio::sync::{mpsc, Notify};

pub use routes::ChatApi;
pub use settings::ChatSettings;
pub use ui::page;
pub use webhook::{deliver, seed, sign, Event, WebhookAck, EVENTS};

/// The running chat product: what its routes need. Cheap to clone; the writers stop
/// once every clone is dropped (see [`Chat::start`]).
#[derive(Clone)]
pub struct Chat(Arc<Inner>);

struct Inner {
    pg: PgPool,
    writer: webhook::writer::EventWriter,
    secret: Option<String>,
}

impl Chat {
    fn pg(&self) -> &PgPool {
        &self.0.pg
    }

    /// Starts the writers, the raw log and the relay on `tasks`. At shutdown, once every
    /// `Chat` handle is dropped, the writers answer what is queued, and the relay moves
    /// everything they committed to MongoDB before it stops.
    pub fn start(settings: &ChatSettings, pg: PgPool, mongo: &Database, tasks: &Tasks) -> Self {
        let raw_events = mongo.collection(EVENTS);
        let relay_wake = Arc::new(Notify::new());
        let (alive, writers_gone) = mpsc::channel(1);
        let writer = webhook::writer::EventWriter::start(
            tasks,
            pg.clone(),
            settings,
            relay_wake.clone(),
            webhook::relay::RawLog::start(tasks, raw_events.clone()),
            alive,
        );
        let relay_pg = pg.clone();
        tasks.spawn("webhook relay", move |stop| {
            webhook::relay::run(relay_pg, raw_events, relay_wake, stop, writers_gone)
        });
        Self(Arc::new(Inner {
            pg,
            writer,
            secret: settings
                .secret
                .as_ref()
                .map(|s| s.expose_secret().to_owned()),
        }))
    }
}
