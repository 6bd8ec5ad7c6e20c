//! Settings every product's routes share: how tokens are signed and checked.

use std::time::Duration;

use anyhow::bail;
use secrecy::{ExposeSecret, SecretString};
use termopar_core::settings::{env_or, env_secs};

/// The JWT secret used when `JWT_SECRET` is unset. Only for development: the API logs a
/// loud warning at start when it is in use.
pub const DEV_JWT_SECRET: &str = "termopar-development-secret-do-not-use-in-production";

/// How tokens are signed and how long they live.
#[derive(Debug, Clone)]
pub struct AuthSettings {
    /// HMAC-SHA256 key for access and refresh tokens (`JWT_SECRET`, at least 32 bytes).
    pub jwt_secret: SecretString,
    /// Lifetime of an access token (`ACCESS_TOKEN_TTL_SECS`, default 900).
    pub access_ttl: Duration,
    /// Lifetime of a refresh token (`REFRESH_TOKEN_TTL_SECS`, default 30 days).
    pub refresh_ttl: Duration,
    /// How long a user's role and token version are cached before PostgreSQL is asked
    /// again (`AUTH_CACHE_TTL_SECS`, default 30). Changes made through this process are
    /// seen at once; this bounds how stale another replica's view can be.
    pub user_cache_ttl: Duration,
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            jwt_secret: SecretString::from(DEV_JWT_SECRET),
            access_ttl: Duration::from_secs(900),
            refresh_ttl: Duration::from_secs(30 * 24 * 3600),
            user_cache_ttl: Duration::from_secs(30),
        }
    }
}

impl AuthSettings {
    /// Reads `JWT_SECRET`, `ACCESS_TOKEN_TTL_SECS`, `REFRESH_TOKEN_TTL_SECS` and
    /// `AUTH_CACHE_TTL_SECS` over the defaults.
    pub fn from_env() -> anyhow::Result<Self> {
        let d = Self::default();
        Ok(Self {
            jwt_secret: SecretString::from(env_or("JWT_SECRET", d.jwt_secret.expose_secret())),
            access_ttl: env_secs("ACCESS_TOKEN_TTL_SECS", d.access_ttl)?,
            refresh_ttl: env_secs("REFRESH_TOKEN_TTL_SECS", d.refresh_ttl)?,
            user_cache_ttl: env_secs("AUTH_CACHE_TTL_SECS", d.user_cache_ttl)?,
        })
    }

    /// Checks the values that can be wrong even when they parse.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.jwt_secret.expose_secret().len() < 32 {
            bail!("JWT_SECRET must be at least 32 bytes long");
        }
        if self.access_ttl.is_zero() || self.refresh_ttl.is_zero() {
            bail!("token lifetimes must be positive");
        }
        if self.refresh_ttl < self.access_ttl {
            bail!("REFRESH_TOKEN_TTL_SECS must not be shorter than ACCESS_TOKEN_TTL_SECS");
        }
        Ok(())
    }

    /// True when the development JWT secret is in use.
    pub fn uses_dev_jwt_secret(&self) -> bool {
        self.jwt_secret.expose_secret() == DEV_JWT_SECRET
    }
}
