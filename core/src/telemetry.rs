//! Structured logging with `tracing`.

use tracing_subscriber::{fmt, EnvFilter};

/// Log targets that are noise at their own level. rumqttd logs every ordinary client
/// disconnect at ERROR, which would drown real errors.
const QUIET_TARGETS: &str = "rumqttd::server::broker=off,rumqttd::router::routing=warn";

/// Installs the global subscriber once. `RUST_LOG` overrides `default_filter`;
/// `LOG_FORMAT=json` switches to JSON lines (what the containers use).
pub fn init(default_filter: &str) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{default_filter},{QUIET_TARGETS}")));
    let json = crate::settings::log_format_json();
    let builder = fmt().with_env_filter(filter).with_target(true);
    // A second init (tests start several services in one process) is not an error.
    let _ = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.compact().try_init()
    };
}
