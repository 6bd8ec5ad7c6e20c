//! Console logins: a random secret in an HttpOnly cookie, its hash in PostgreSQL
//! (`console_sessions`), with idle and absolute expiry.

use std::time::Duration;

use poem::{http::header, Request};
use rand::RngCore;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use termopar_web::error::ApiResult;
use uuid::Uuid;

use crate::settings::{ConsoleSettings, SecureCookie};

/// The session cookie's name.
pub const COOKIE: &str = "termopar_session";

/// How stale `last_seen_at` may get before a request writes it again: a busy page does
/// not write a row per request.
const TOUCH_EVERY: Duration = Duration::from_secs(15);

/// A live session.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Session {
    /// Who logged in.
    pub user_id: Uuid,
    /// The user's token version at login; tokens minted for the session carry it, so a
    /// password or role change ends the session.
    pub token_version: i32,
    /// The synchronizer token the session's state-changing requests must carry.
    pub csrf: String,
}

/// The sessions table.
#[derive(Clone)]
pub struct Sessions {
    pg: PgPool,
    idle: Duration,
    max_age: Duration,
    secure: SecureCookie,
}

fn random_hex() -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

fn digest(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

impl Sessions {
    /// Sessions in `pg`, with the expiries of `settings`.
    pub fn new(pg: PgPool, settings: &ConsoleSettings) -> Self {
        Self {
            pg,
            idle: settings.idle,
            max_age: settings.max_age,
            secure: settings.secure_cookie,
        }
    }

    /// Opens a session for a user who just proved who they are; returns the cookie
    /// secret. Expired sessions of every user are removed on the way.
    pub async fn open(&self, user_id: Uuid, token_version: i32) -> ApiResult<String> {
        let secret = random_hex();
        let mut tx = self.pg.begin().await?;
        sqlx::query(
            "DELETE FROM console_sessions
              WHERE last_seen_at < now() - make_interval(secs => $1)
                 OR created_at < now() - make_interval(secs => $2)",
        )
        .bind(self.idle.as_secs_f64())
        .bind(self.max_age.as_secs_f64())
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO console_sessions (id_hash, user_id, token_version, csrf)
             VALUES ($1, $2, $3, $4)",
        )
        .bind(digest(&secret))
        .bind(user_id)
        .bind(token_version)
        .bind(random_hex())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(secret)
    }

    /// The live session of a cookie secret, if any. `activity` marks a request of the
    /// person (it keeps the session from idling out); a page's own polling is not.
    pub async fn find(&self, secret: &str, activity: bool) -> ApiResult<Option<Session>> {
        let row: Option<(Uuid, i32, String, bool)> = sqlx::query_as(
            "SELECT user_id, token_version, csrf, last_seen_at < now() - make_interval(secs => $4)
               FROM console_sessions
              WHERE id_hash = $1
                AND last_seen_at >= now() - make_interval(secs => $2)
                AND created_at >= now() - make_interval(secs => $3)",
        )
        .bind(digest(secret))
        .bind(self.idle.as_secs_f64())
        .bind(self.max_age.as_secs_f64())
        .bind(TOUCH_EVERY.as_secs_f64())
        .fetch_optional(&self.pg)
        .await?;
        let Some((user_id, token_version, csrf, stale)) = row else {
            return Ok(None);
        };
        if activity && stale {
            sqlx::query("UPDATE console_sessions SET last_seen_at = now() WHERE id_hash = $1")
                .bind(digest(secret))
                .execute(&self.pg)
                .await?;
        }
        Ok(Some(Session {
            user_id,
            token_version,
            csrf,
        }))
    }

    /// Ends the session of a cookie secret (logging out).
    pub async fn close(&self, secret: &str) -> ApiResult<()> {
        sqlx::query("DELETE FROM console_sessions WHERE id_hash = $1")
            .bind(digest(secret))
            .execute(&self.pg)
            .await?;
        Ok(())
    }

    /// The `Set-Cookie` value that stores `secret` (or, for `None`, removes the cookie).
    pub fn cookie(&self, req: &Request, secret: Option<&str>) -> String {
        set_cookie(self.secure, req, secret, self.max_age)
    }
}

fn set_cookie(
    mode: SecureCookie,
    req: &Request,
    secret: Option<&str>,
    max_age: Duration,
) -> String {
    let secure = match mode {
        SecureCookie::Always => true,
        SecureCookie::Never => false,
        SecureCookie::Auto => over_tls(req),
    };
    let (value, max_age) = match secret {
        Some(secret) => (secret, max_age.as_secs()),
        None => ("", 0),
    };
    let mut cookie =
        format!("{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}");
    if secure {
        cookie.push_str("; Secure");
    }
    cookie
}

/// Whether `req` reached us over TLS, directly or through a proxy that says so.
fn over_tls(req: &Request) -> bool {
    req.uri().scheme_str() == Some("https")
        || req
            .headers()
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("https"))
}

/// The session cookie's secret in `req`, if it carries one.
pub fn secret_of(req: &Request) -> Option<String> {
    req.headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, value)| *name == COOKIE && !value.is_empty())
        .map(|(_, value)| value.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let req = Request::builder()
            .header(header::COOKIE, "a=1; termopar_session=abc; b=2")
            .finish();
        assert_eq!(secret_of(&req).as_deref(), Some("abc"));
        let req = Request::builder()
            .header(header::COOKIE, "termopar_session=")
            .finish();
        assert_eq!(secret_of(&req), None);
    }

    #[test]
    fn the_cookie_is_secure_only_over_tls_in_auto_mode() {
        let plain = Request::builder().finish();
        let proxied = Request::builder()
            .header("x-forwarded-proto", "https")
            .finish();
        let hour = Duration::from_secs(3600);
        let set = set_cookie(SecureCookie::Auto, &plain, Some("s"), hour);
        assert_eq!(
            set,
            "termopar_session=s; Path=/; HttpOnly; SameSite=Strict; Max-Age=3600"
        );
        assert!(set_cookie(SecureCookie::Auto, &proxied, Some("s"), hour).ends_with("; Secure"));
        assert!(set_cookie(SecureCookie::Always, &plain, Some("s"), hour).ends_with("; Secure"));
        assert!(!set_cookie(SecureCookie::Never, &proxied, Some("s"), hour).contains("Secure"));
        assert!(set_cookie(SecureCookie::Auto, &plain, None, hour)
            .contains("=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"));
    }
}
