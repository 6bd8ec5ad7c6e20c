//! The lead pipeline product (seed 003): three systems, a website (lead and customer
//! forms posted from a client's site), a marketing automation system and a CRM, joined
//! by durable background jobs on PostgreSQL (apalis), with a jobs dashboard.
//!
//! Path of a lead: the form post stores it and enqueues its jobs in one transaction
//! ([`routes`]); workers ([`jobs`]) post it to marketing and the CRM over HTTP with an
//! idempotency key ([`downstream`]); a CRM lead turned qualified enqueues an e-mail,
//! sent over SMTP once per qualification.
//!
//! The API composes it: [`migrate`] creates apalis's tables, [`Leads::start`] starts
//! the workers (when `JOBS_WORKERS` is on) on the application's [`Tasks`]; the routes
//! take the [`Leads`] as request data.

// Items are `pub(crate)` unless another crate uses them.
#![warn(unreachable_pub)]

mod dashboard;
mod downstream;
pub mod jobs;
mod records;
mod routes;
mod settings;
mod wake;

use std::sync::Arc;

use sqlx::PgPool;
use termopar_core::tasks::Tasks;
use termopar_tracking::Tracking;
use termopar_web::tokens::Jwt;
use uuid::Uuid;

pub use dashboard::{page, JobsApi};
pub use downstream::mailer;
pub use routes::{
    CrmCustomersApi, CrmLeadsApi, MarketingLeadsApi, WebsiteCustomersApi, WebsiteLeadsApi,
};
pub use settings::{LeadsSettings, SmtpSettings, SmtpTls};

/// Creates (or brings up to date) apalis's tables, beside the application's own.
pub async fn migrate(pg: &PgPool) -> anyhow::Result<()> {
    jobs::migrate(pg).await
}

/// The running pipeline: what its routes need. Cheap to clone.
#[derive(Clone)]
pub struct Leads(Arc<Inner>);

struct Inner {
    pg: PgPool,
    settings: LeadsSettings,
    tracking: Tracking,
    limiter: termopar_web::rate::PerKey,
}

/// Starts one job worker per queue on `tasks` (what `Leads::start` does when
/// `JOBS_WORKERS` is on, and what `termopar-api workers` runs alone), woken by
/// `wakeups` (the job system's one listener, see [`jobs::Wakeups`]). `api_url` is the
/// default base URL of marketing and the CRM; `jwt` signs the workers' tokens for them.
pub fn run_workers(
    settings: &LeadsSettings,
    pg: &PgPool,
    jwt: Jwt,
    api_url: &str,
    tasks: &Tasks,
    wakeups: &jobs::Wakeups,
) -> anyhow::Result<()> {
    let downstream = downstream::Downstream::new(pg.clone(), settings, jwt, api_url)?;
    let worker = jobs::Worker {
        downstream: Arc::new(downstream),
        max_attempts: settings.max_attempts,
    };
    jobs::start_workers(tasks, pg, settings, wakeups, worker);
    Ok(())
}

impl Leads {
    /// Starts the job workers on `tasks` when given the job system's `wakeups` (the API
    /// starts them when `settings.workers` is on). `api_url` is where this API answers
    /// (the default of marketing's and the CRM's base URLs); `jwt` signs the workers'
    /// tokens for them.
    pub fn start(
        settings: &LeadsSettings,
        pg: PgPool,
        tracking: Tracking,
        jwt: Jwt,
        api_url: &str,
        tasks: &Tasks,
        wakeups: Option<&jobs::Wakeups>,
    ) -> anyhow::Result<Self> {
        if let Some(wakeups) = wakeups {
            run_workers(settings, &pg, jwt, api_url, tasks, wakeups)?;
        }
        let limiter = termopar_web::rate::PerKey::new(settings.rate_per_site);
        Ok(Self(Arc::new(Inner {
            pg,
            settings: settings.clone(),
            tracking,
            limiter,
        })))
    }

    fn pg(&self) -> &PgPool {
        &self.0.pg
    }

    fn settings(&self) -> &LeadsSettings {
        &self.0.settings
    }

    fn tracking(&self) -> &Tracking {
        &self.0.tracking
    }

    fn within_rate(&self, site: Uuid) -> bool {
        self.0.limiter.allows(site, 1)
    }
}
