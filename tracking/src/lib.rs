//! The web tracking product (seed 000): a script on client sites sends page views
//! (`/t.js`); `POST /track` takes them fast and answers only once they are durable; the
//! questions (a site's accesses over a period, every context a user accessed) are
//! answered from PostgreSQL rollups and from raw hits found by `_id`.
//!
//! Path of a hit: the handler checks it and queues it for a writer ([`writer`]), which
//! commits a group of requests as one `tracking_outbox` row and then answers them 202;
//! the [`relay`] moves rows into MongoDB (`tracking_hits`, one document per site per
//! row) and the rollups, in one PostgreSQL transaction per step.
//!
//! The API composes it: [`Tracking::start`] starts its background tasks on the
//! application's [`Tasks`]; [`TrackApi`], [`SitesApi`] and [`AccessesApi`] are its
//! routes (taking the [`Tracking`] as request data); [`script`] serves the tracker.

// Items are `pub(crate)` unless another crate uses them.
#![warn(unreachable_pub)]

mod accesses;
mod hit;
pub mod relay;
mod routes;
mod settings;
mod sites;
mod writer;

use std::sync::Arc;

use moka::future::Cache;
use mongodb::{
    bson::{doc, Document},
    Collection, Database,
};
use sqlx::PgPool;
use termopar_core::tasks::Tasks;
use termopar_web::ApiError;
use tokio::sync::{mpsc, Notify};
use uuid::Uuid;

pub use accesses::AccessesApi;
pub use relay::HITS;
pub use routes::{script, Preflight, TrackApi, SCRIPT};
pub use settings::TrackingSettings;
pub use sites::{SitesApi, CONSTRAINTS};

/// The running tracking product: what its routes need. Cheap to clone; the writers stop
/// once every clone is dropped (see [`Tracking::start`]).
#[derive(Clone)]
pub struct Tracking(Arc<Inner>);

struct Inner {
    pg: PgPool,
    hits: Collection<Document>,
    settings: TrackingSettings,
    writer: writer::HitWriter,
    /// Sites by id (`None`: no such site), for `POST /track`.
    sites: Cache<Uuid, Option<Arc<sites::SiteInfo>>>,
    /// Whether any site allows an origin, for CORS preflights.
    origins: Cache<String, bool>,
    limiter: termopar_web::rate::PerKey,
}

impl Tracking {
    /// Starts the writers and the relay on `tasks`. At shutdown, once every `Tracking`
    /// handle is dropped, the writers answer what is queued, and the relay moves what
    /// they committed before it stops (what it cannot move stays in the outbox).
    pub fn start(settings: &TrackingSettings, pg: PgPool, mongo: &Database, tasks: &Tasks) -> Self {
        let hits = mongo.collection::<Document>(HITS);
        let wake = Arc::new(Notify::new());
        let (alive, writers_gone) = mpsc::channel(1);
        let writer = writer::HitWriter::start(tasks, &pg, settings, wake.clone(), alive);
        let (relay_pg, relay_hits) = (pg.clone(), hits.clone());
        tasks.spawn("tracking relay", move |stop| {
            relay::run(relay_pg, relay_hits, wake, stop, writers_gone)
        });
        let limiter = termopar_web::rate::PerKey::new(settings.rate_per_site);
        Self(Arc::new(Inner {
            pg,
            hits,
            settings: settings.clone(),
            writer,
            sites: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(settings.site_cache)
                .build(),
            origins: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(settings.site_cache)
                .build(),
            limiter,
        }))
    }

    fn pg(&self) -> &PgPool {
        &self.0.pg
    }

    fn settings(&self) -> &TrackingSettings {
        &self.0.settings
    }

    fn writer(&self) -> &writer::HitWriter {
        &self.0.writer
    }

    /// Forgets a changed or deleted site (other processes see it within
    /// `TRACKING_SITE_CACHE_SECS`).
    async fn forget_site(&self, id: Uuid) {
        self.0.sites.invalidate(&id).await;
        self.forget_origins();
    }

    fn forget_origins(&self) {
        self.0.origins.invalidate_all();
    }

    /// Whether some site allows pages of `origin`.
    async fn origin_known(&self, origin: &str) -> Result<bool, ApiError> {
        let pg = self.pg().clone();
        let asked = origin.to_owned();
        self.0
            .origins
            .try_get_with(origin.to_ascii_lowercase(), async move {
                sqlx::query_scalar::<_, bool>(
                    "SELECT EXISTS (SELECT 1 FROM sites
                     WHERE origins @> ARRAY[lower($1)] OR origins @> ARRAY['*'])",
                )
                .bind(asked)
                .fetch_one(&pg)
                .await
            })
            .await
            .map_err(|e| ApiError::from(termopar_core::db::shared_error(&e)))
    }

    /// Deletes raw pages by `_id`; returns how many were deleted.
    async fn delete_pages(&self, ids: &[String]) -> u64 {
        let mut removed = 0;
        for id in ids {
            match self.0.hits.delete_one(doc! { "_id": id }).await {
                Ok(r) => removed += r.deleted_count,
                Err(e) => {
                    tracing::warn!(error = %e, "could not delete a page of raw hits");
                    break;
                }
            }
        }
        removed
    }
}
