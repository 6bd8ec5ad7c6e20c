//! Shared pieces of termopar: settings helpers, PostgreSQL and MongoDB plumbing,
//! telemetry, metrics, device secrets and time-zone handling.
//!
//! Everything the broker, consumer, simulator and API must agree on lives here, so the
//! parts can never drift apart.

pub mod backup;
pub mod db;
pub mod directory;
pub mod ids;
pub mod intake;
pub mod metrics;
pub mod mongo;
pub mod outbox;
pub mod reading;
pub mod secrets;
pub mod settings;
pub mod shutdown;
pub mod store;
pub mod tasks;
pub mod telemetry;
pub mod topic;
pub mod tz;
