//! Settings of web tracking, read once from the environment.

use std::time::Duration;

use anyhow::bail;
use termopar_core::settings::env_parse;

/// Web tracking.
#[derive(Debug, Clone)]
pub struct TrackingSettings {
    /// Concurrent group-commit writers (`TRACKING_WRITERS`, default 1, at most 16).
    pub writers: usize,
    /// Longest a writer waits for its next group to grow half as large as its last one
    /// (`TRACKING_GATHER_US`, default 1000 µs, at most 100 ms; 0 takes what is queued).
    pub gather: Duration,
    /// Largest body of `POST /track` (`TRACKING_MAX_BODY_BYTES`, default 64 KiB).
    pub max_body_bytes: usize,
    /// Most hits in one request (`TRACKING_MAX_HITS`, default 100).
    pub max_hits: usize,
    /// Most contexts in one hit (`TRACKING_MAX_CONTEXTS`, default 32).
    pub max_contexts: usize,
    /// Hits per second each site may send, with bursts of twice as many
    /// (`TRACKING_RATE_PER_SITE`, default 1000; 0 for no limit).
    pub rate_per_site: u32,
    /// Whether hits from crawlers and bots (by user agent) are dropped, counted, and
    /// answered as ignored (`TRACKING_BOT_FILTER`, default true).
    pub bot_filter: bool,
    /// How long a site's origins are cached before a change made by another process is
    /// seen (`TRACKING_SITE_CACHE_SECS`, default 5).
    pub site_cache: Duration,
}

impl Default for TrackingSettings {
    fn default() -> Self {
        Self {
            writers: 1,
            gather: Duration::from_millis(1),
            max_body_bytes: 64 * 1024,
            max_hits: 100,
            max_contexts: 32,
            rate_per_site: 1000,
            bot_filter: true,
            site_cache: Duration::from_secs(5),
        }
    }
}

impl TrackingSettings {
    /// Reads the `TRACKING_*` variables over the defaults, and validates them.
    pub fn from_env() -> anyhow::Result<Self> {
        let d = Self::default();
        let settings = Self {
            writers: env_parse("TRACKING_WRITERS", d.writers)?,
            gather: Duration::from_micros(env_parse(
                "TRACKING_GATHER_US",
                d.gather.as_micros() as u64,
            )?),
            max_body_bytes: env_parse("TRACKING_MAX_BODY_BYTES", d.max_body_bytes)?,
            max_hits: env_parse("TRACKING_MAX_HITS", d.max_hits)?,
            max_contexts: env_parse("TRACKING_MAX_CONTEXTS", d.max_contexts)?,
            rate_per_site: env_parse("TRACKING_RATE_PER_SITE", d.rate_per_site)?,
            bot_filter: env_parse("TRACKING_BOT_FILTER", d.bot_filter)?,
            site_cache: Duration::from_secs(env_parse(
                "TRACKING_SITE_CACHE_SECS",
                d.site_cache.as_secs(),
            )?),
        };
        settings.validate()?;
        Ok(settings)
    }

    /// Checks the values that can be wrong even when they parse.
    pub fn validate(&self) -> anyhow::Result<()> {
        if !(1..=16).contains(&self.writers) {
            bail!("TRACKING_WRITERS must be between 1 and 16");
        }
        if self.gather > Duration::from_millis(100) {
            bail!("TRACKING_GATHER_US must be at most 100000");
        }
        if !(1024..=16 << 20).contains(&self.max_body_bytes) {
            bail!("TRACKING_MAX_BODY_BYTES must be between 1024 and 16777216");
        }
        if !(1..=10_000).contains(&self.max_hits) {
            bail!("TRACKING_MAX_HITS must be between 1 and 10000");
        }
        if !(1..=1000).contains(&self.max_contexts) {
            bail!("TRACKING_MAX_CONTEXTS must be between 1 and 1000");
        }
        if self.site_cache > Duration::from_secs(3600) {
            bail!("TRACKING_SITE_CACHE_SECS must be at most 3600");
        }
        Ok(())
    }
}
