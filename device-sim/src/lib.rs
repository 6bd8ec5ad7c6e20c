//! Simulated temperature sensors: provisioning of demo clients through the API, and
//! publishing of realistic readings (daily cycle, noise, spikes, deliberate bad
//! payloads) to any MQTT broker.

pub mod profile;
pub mod provision;
pub mod publish;

pub use profile::Profile;
pub use provision::{login, provision};
pub use publish::{run, SimConfig, SimSensor, Summary};
