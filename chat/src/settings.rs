//! Settings of the chat webhook, read once from the environment.

use std::time::Duration;

use anyhow::bail;
use secrecy::SecretString;
use termopar_core::settings::{env_parse, env_var};

/// The chat webhook processor.
#[derive(Debug, Clone)]
pub struct ChatSettings {
    /// HMAC-SHA256 key senders sign bodies with (`WEBHOOK_SECRET`); when unset,
    /// signatures are not checked.
    pub secret: Option<SecretString>,
    /// Concurrent webhook transactions (`WEBHOOK_WRITERS`, default 1, at most 16). One
    /// writer makes the largest groups; more overlap one group's commit with the next.
    pub writers: usize,
    /// Longest a writer waits for its next group to grow half as large as its last one
    /// (`WEBHOOK_GATHER_US`, default 1000 µs, at most 100 ms; 0 takes what is queued).
    pub gather: Duration,
}

impl Default for ChatSettings {
    fn default() -> Self {
        Self {
            secret: None,
            writers: 1,
            gather: Duration::from_millis(1),
        }
    }
}

impl ChatSettings {
    /// Reads `WEBHOOK_SECRET`, `WEBHOOK_WRITERS` and `WEBHOOK_GATHER_US` over the
    /// defaults, and validates them.
    pub fn from_env() -> anyhow::Result<Self> {
        let d = Self::default();
        let settings = Self {
            secret: env_var("WEBHOOK_SECRET").map(SecretString::from),
            writers: env_parse("WEBHOOK_WRITERS", d.writers)?,
            gather: Duration::from_micros(env_parse(
                "WEBHOOK_GATHER_US",
                d.gather.as_micros() as u64,
            )?),
        };
        settings.validate()?;
        Ok(settings)
    }

    /// Checks the values that can be wrong even when they parse.
    pub fn validate(&self) -> anyhow::Result<()> {
        if !(1..=16).contains(&self.writers) {
            bail!("WEBHOOK_WRITERS must be between 1 and 16");
        }
        if self.gather > Duration::from_millis(100) {
            bail!("WEBHOOK_GATHER_US must be at most 100000");
        }
        Ok(())
    }
}
