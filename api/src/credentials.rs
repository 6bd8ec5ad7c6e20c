//! Passwords and refresh tokens: what logging in (`auth`) and managing users (`users`)
//! both need, so that neither imports the other's internals.

use sqlx::PgConnection;
use termopar_web::error::ApiResult;
use uuid::Uuid;

/// Argon2id password hashing, off the async threads (each hash costs tens of ms).
pub(crate) mod password {
    use argon2::{
        password_hash::{rand_core::OsRng, PasswordHash, SaltString},
        Argon2, PasswordHasher, PasswordVerifier,
    };
    use std::sync::LazyLock;

    /// Hash compared against when the e-mail is unknown, so that a login for a missing
    /// user costs as much as one for an existing user (no user enumeration by timing).
    static DUMMY_HASH: LazyLock<String> = LazyLock::new(|| hash_blocking("not a real password"));

    fn hash_blocking(password: &str) -> String {
        let salt = SaltString::generate(&mut OsRng);
        Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .expect("argon2 with default parameters cannot fail on a salt it generated")
            .to_string()
    }

    fn verify_blocking(password: &str, hash: &str) -> bool {
        PasswordHash::new(hash)
            .map(|parsed| {
                Argon2::default()
                    .verify_password(password.as_bytes(), &parsed)
                    .is_ok()
            })
            .unwrap_or(false)
    }

    /// Hashes a password.
    pub(crate) async fn hash(password: String) -> String {
        tokio::task::spawn_blocking(move || hash_blocking(&password))
            .await
            .expect("hashing does not panic")
    }

    /// Verifies `password` against `hash`; with `None`, spends the same time and fails.
    pub(crate) async fn verify(password: String, hash: Option<String>) -> bool {
        tokio::task::spawn_blocking(move || match hash {
            Some(hash) => verify_blocking(&password, &hash),
            None => {
                verify_blocking(&password, &DUMMY_HASH);
                false
            }
        })
        .await
        .expect("verifying does not panic")
    }
}

/// Revokes every live refresh token of a user.
pub(crate) async fn revoke_all(conn: &mut PgConnection, user_id: Uuid) -> ApiResult<()> {
    sqlx::query(
        "UPDATE refresh_tokens SET revoked_at = now() WHERE user_id = $1 AND revoked_at IS NULL",
    )
    .bind(user_id)
    .execute(&mut *conn)
    .await?;
    Ok(())
}
