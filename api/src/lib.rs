//! termopar's REST API: authentication, tenants, users, sensors, and (in later parts)
//! readings, tracking, webhooks and leads.
//!
//! [`Application::build`] turns [`Settings`] into a bound server; `main.rs` only adds
//! telemetry and signals.

pub mod auth;
mod bootstrap;
pub mod clients;
pub mod conversations;
pub mod daily;
pub mod dead_letters;
pub mod error;
mod health;
mod http;
pub mod pagination;
pub mod readings;
pub mod responses;
pub mod sensors;
pub mod settings;
mod startup;
pub mod state;
mod ui;
pub mod users;
mod validate;
pub mod webhook;

pub use settings::Settings;
pub use startup::{openapi_json, routes, Application, API_PREFIX};

/// Groups of operations in the OpenAPI document.
#[derive(poem_openapi::Tags)]
pub enum ApiTags {
    /// Log in, refresh and revoke tokens.
    Auth,
    /// User accounts (admins).
    Users,
    /// Client companies: the tenants.
    Clients,
    /// Temperature sensors.
    Sensors,
    /// Readings: history, latest, daily averages, HTTP ingest.
    Readings,
    /// Chat webhook events and conversations.
    Conversations,
}

/// The allocator of every process that serves the API. The webhook's hot path allocates
/// per delivery (JSON, records, answers); glibc's malloc and free took ~15% of the API
/// process's CPU under `make bench-webhook`.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
