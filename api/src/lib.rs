//! termopar's REST API: the shell that composes the products. It owns authentication
//! (log in, tokens), users, clients, sensors, readings and daily averages, health and
//! metrics; each other product is its own crate with its routes, store and background
//! tasks (the chat webhook: `termopar-chat`), composed in [`startup`]. What every
//! product's routes share (errors, the caller's identity, pages, request ids) is
//! `termopar-web`'s.
//!
//! [`Application::build`] turns [`Settings`] into a bound server; `main.rs` only adds
//! telemetry and signals.

// Items are `pub(crate)` unless another crate uses them.
#![warn(unreachable_pub)]

mod auth;
mod bootstrap;
mod clients;
mod credentials;
mod daily;
mod dead_letters;
mod health;
mod readings;
mod sensors;
pub mod settings;
mod startup;
mod state;
mod tenancy;
mod users;

// The shared HTTP toolkit under the names the modules use.
use termopar_web::{error, pagination, responses, validate};

pub use daily::DailyCache;
pub use settings::Settings;
pub use startup::{openapi_json, run_workers, Application, Handles, API_PREFIX};
pub use state::AppState;

/// Groups of the API's own operations in the OpenAPI document.
#[derive(poem_openapi::Tags)]
enum ApiTags {
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
}

/// The allocator of every process that serves the API. The webhook's hot path allocates
/// per delivery (JSON, records, answers); glibc's malloc and free took ~15% of the API
/// process's CPU under `make bench-webhook`.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
