//! Per-key rate limits (per site, for the public endpoints of client sites).

use std::num::NonZeroU32;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use uuid::Uuid;

/// `rate` events per second per key, in bursts of up to twice that; no limit at 0.
pub struct PerKey(Option<DefaultKeyedRateLimiter<Uuid>>);

impl PerKey {
    /// A limit of `rate` per second per key (0: none).
    pub fn new(rate: u32) -> Self {
        Self(NonZeroU32::new(rate).map(|rate| {
            let burst = rate.saturating_mul(NonZeroU32::new(2).expect("2 > 0"));
            RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
        }))
    }

    /// Whether `key` may have `n` (at least 1) more events now; takes them if so.
    pub fn allows(&self, key: Uuid, n: u32) -> bool {
        let Some(limiter) = &self.0 else {
            return true;
        };
        let n = NonZeroU32::new(n.max(1)).expect("at least 1");
        matches!(limiter.check_key_n(&key, n), Ok(Ok(())))
    }
}
