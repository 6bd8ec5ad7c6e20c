//! Authentication: JWT access and refresh tokens, argon2 passwords, and the
//! [`Principal`] every protected operation receives.

mod routes;
pub mod tokens;

pub use routes::AuthApi;
pub use tokens::{Claims, Jwt, TokenType};

use poem::Request;
use poem_openapi::{auth::Bearer, Enum, SecurityScheme};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::{
    error::{ApiError, ApiResult},
    state::AppState,
};

/// What a user may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "lowercase")]
pub enum Role {
    /// Everything, across every client.
    Admin,
    /// One client: manage its sensors, read its data.
    Operator,
    /// One client: read only.
    Viewer,
}

impl Role {
    /// The value stored in `users.role`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Viewer => "viewer",
        }
    }

    /// Parses the value stored in `users.role`.
    pub fn from_db(s: &str) -> Option<Self> {
        match s {
            "admin" => Some(Role::Admin),
            "operator" => Some(Role::Operator),
            "viewer" => Some(Role::Viewer),
            _ => None,
        }
    }
}

/// The authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The user's id.
    pub user_id: Uuid,
    /// The user's role, as stored now (not as it was when the token was issued).
    pub role: Role,
    /// The user's client; `None` for admins.
    pub client_id: Option<Uuid>,
}

impl Principal {
    /// True for admins.
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }

    /// 403 unless the caller is an admin.
    pub fn require_admin(&self) -> ApiResult<()> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(ApiError::forbidden("only admins may do this"))
        }
    }

    /// Whether the caller may read data of `client_id`. When this is false the caller
    /// must get a 404, never a 403, so that other tenants' ids do not leak.
    pub fn sees_client(&self, client_id: Uuid) -> bool {
        self.is_admin() || self.client_id == Some(client_id)
    }

    /// For a resource of `client_id` the caller can see: 403 unless it may also change
    /// it (admins, and operators of that client).
    pub fn require_manager_of(&self, client_id: Uuid) -> ApiResult<()> {
        match self.role {
            Role::Admin => Ok(()),
            Role::Operator if self.client_id == Some(client_id) => Ok(()),
            _ => Err(ApiError::forbidden("your role may not change this")),
        }
    }

    /// The client a query must be limited to: `None` (everything) for admins.
    pub fn tenant_scope(&self) -> Option<Uuid> {
        if self.is_admin() {
            None
        } else {
            self.client_id
        }
    }
}

/// Bearer JWT access token from `POST /auth/login`.
#[derive(SecurityScheme)]
#[oai(ty = "bearer", bearer_format = "JWT", checker = "check_bearer")]
pub struct BearerAuth(pub Principal);

async fn check_bearer(req: &Request, bearer: Bearer) -> poem::Result<Principal> {
    let state = req
        .data::<AppState>()
        .expect("AppState is attached to every route");
    Ok(state.authenticate(&bearer.token).await?)
}

/// Argon2id password hashing, off the async threads (each hash costs tens of ms).
pub mod password {
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
    pub async fn hash(password: String) -> String {
        tokio::task::spawn_blocking(move || hash_blocking(&password))
            .await
            .expect("hashing does not panic")
    }

    /// Verifies `password` against `hash`; with `None`, spends the same time and fails.
    pub async fn verify(password: String, hash: Option<String>) -> bool {
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
