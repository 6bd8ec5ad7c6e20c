//! `/auth`: login, refresh, logout, the current user and password change.

use chrono::{Duration as ChronoDuration, Utc};
use poem_openapi::{payload::Json, ApiResponse, Object, OpenApi};
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use super::{BearerAuth, TokenType};
use crate::credentials::{password, revoke_all};
use crate::{
    error::{ApiError, ApiResult},
    responses::Found,
    state::AppState,
    users::{self, User},
    ApiTags,
};

/// Credentials for `POST /auth/login`.
#[derive(Debug, Object)]
pub(super) struct LoginRequest {
    /// The user's e-mail (case-insensitive).
    #[oai(validator(max_length = 254))]
    pub email: String,
    /// The user's password.
    #[oai(validator(max_length = 256))]
    pub password: String,
}

/// An access token and the refresh token that renews it.
#[derive(Debug, Object)]
pub(super) struct TokenPair {
    /// Send as `Authorization: Bearer <access_token>`.
    pub access_token: String,
    /// Exchange at `POST /auth/refresh` for a new pair (single use).
    pub refresh_token: String,
    /// Always `Bearer`.
    pub token_type: String,
    /// Seconds until the access token expires.
    pub expires_in: u64,
}

/// A refresh token.
#[derive(Debug, Object)]
pub(super) struct RefreshRequest {
    /// The refresh token from login or a previous refresh.
    #[oai(validator(max_length = 4096))]
    pub refresh_token: String,
}

/// A logout.
#[derive(Debug, Object)]
pub(super) struct LogoutRequest {
    /// The refresh token to revoke.
    #[oai(validator(max_length = 4096))]
    pub refresh_token: String,
    /// Revoke every refresh token of the user (log out everywhere).
    #[oai(default)]
    pub all: bool,
}

/// A password change.
#[derive(Debug, Object)]
pub(super) struct PasswordChange {
    /// The password in use now.
    #[oai(validator(max_length = 256))]
    pub current_password: String,
    /// The new password (8 to 256 characters).
    pub new_password: String,
}

#[derive(ApiResponse)]
enum NoContent {
    /// Done.
    #[oai(status = 204)]
    Done,
}

/// Authentication operations.
pub(crate) struct AuthApi;

#[OpenApi(prefix_path = "/auth", tag = "ApiTags::Auth")]
impl AuthApi {
    /// Log in with e-mail and password.
    ///
    /// Returns a short-lived access token and a single-use refresh token.
    #[oai(path = "/login", method = "post", operation_id = "login")]
    #[tracing::instrument(skip_all)]
    async fn login(
        &self,
        state: poem::web::Data<&AppState>,
        body: Json<LoginRequest>,
    ) -> ApiResult<Found<TokenPair>> {
        let row = sqlx::query(
            "SELECT id, password_hash, token_version FROM users WHERE lower(email) = lower($1)",
        )
        .bind(body.email.trim())
        .fetch_optional(&state.pg)
        .await?;
        let (user_id, hash, ver) = match row {
            Some(r) => (
                Some(r.get::<Uuid, _>("id")),
                Some(r.get::<String, _>("password_hash")),
                r.get::<i32, _>("token_version"),
            ),
            None => (None, None, 0),
        };
        if !password::verify(body.0.password, hash).await {
            return Err(ApiError::unauthorized("invalid email or password"));
        }
        let user_id = user_id.expect("a verified password has a user");
        let mut conn = state.pg.acquire().await?;
        let pair = issue_pair(&state, &mut conn, user_id, ver).await?;
        tracing::info!(%user_id, "login");
        Ok(Found::Ok(Json(pair)))
    }

    /// Exchange a refresh token for a new token pair.
    ///
    /// Refresh tokens are single use: the one presented is revoked. Presenting an
    /// already-used refresh token revokes every session of the user, since it means the
    /// token was copied.
    #[oai(path = "/refresh", method = "post", operation_id = "refreshToken")]
    #[tracing::instrument(skip_all)]
    async fn refresh(
        &self,
        state: poem::web::Data<&AppState>,
        body: Json<RefreshRequest>,
    ) -> ApiResult<Found<TokenPair>> {
        let claims = state
            .auth
            .jwt()
            .verify(&body.refresh_token, TokenType::Refresh)?;
        let new_jti = Uuid::new_v4();
        let mut tx = state.pg.begin().await?;
        let rotated = sqlx::query(
            "UPDATE refresh_tokens SET revoked_at = now(), replaced_by = $2
             WHERE id = $1 AND user_id = $3 AND revoked_at IS NULL AND expires_at > now()
             RETURNING id",
        )
        .bind(claims.jti)
        .bind(new_jti)
        .bind(claims.sub)
        .fetch_optional(&mut *tx)
        .await?;
        if rotated.is_none() {
            // A token that was rotated away (not merely logged out) coming back means
            // someone kept a copy.
            let reused = sqlx::query_scalar::<_, bool>(
                "SELECT replaced_by IS NOT NULL FROM refresh_tokens WHERE id = $1",
            )
            .bind(claims.jti)
            .fetch_optional(&mut *tx)
            .await?
            .unwrap_or(false);
            if reused {
                revoke_all(&mut tx, claims.sub).await?;
                tx.commit().await?;
                tracing::warn!(user_id = %claims.sub, "refresh token reused: all sessions revoked");
            }
            return Err(ApiError::unauthorized("refresh token revoked or expired"));
        }
        let ver = sqlx::query_scalar::<_, i32>("SELECT token_version FROM users WHERE id = $1")
            .bind(claims.sub)
            .fetch_optional(&mut *tx)
            .await?;
        if ver != Some(claims.ver) {
            return Err(ApiError::unauthorized("refresh token revoked"));
        }
        let pair = issue_pair_with_jti(&state, &mut tx, claims.sub, claims.ver, new_jti).await?;
        tx.commit().await?;
        Ok(Found::Ok(Json(pair)))
    }

    /// Revoke a refresh token, or with `all`, every refresh token of its user.
    ///
    /// Revoking a token that is already revoked succeeds. Access tokens already issued
    /// stay valid until they expire (minutes); `all` after a password change is not
    /// needed, since a password change revokes everything itself.
    #[oai(path = "/logout", method = "post", operation_id = "logout")]
    #[tracing::instrument(skip_all)]
    async fn logout(
        &self,
        state: poem::web::Data<&AppState>,
        body: Json<LogoutRequest>,
    ) -> ApiResult<NoContent> {
        let claims = state
            .auth
            .jwt()
            .verify(&body.refresh_token, TokenType::Refresh)?;
        let mut conn = state.pg.acquire().await?;
        if body.all {
            revoke_all(&mut conn, claims.sub).await?;
        } else {
            sqlx::query(
                "UPDATE refresh_tokens SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL",
            )
            .bind(claims.jti)
            .execute(&mut *conn)
            .await?;
        }
        Ok(NoContent::Done)
    }

    /// The authenticated user.
    #[oai(path = "/me", method = "get", operation_id = "getMe")]
    #[tracing::instrument(skip_all)]
    async fn me(
        &self,
        state: poem::web::Data<&AppState>,
        auth: BearerAuth,
    ) -> ApiResult<Found<User>> {
        let user = users::fetch(&state.pg, auth.0.user_id)
            .await?
            .ok_or_else(|| ApiError::unauthorized("user no longer exists"))?;
        Ok(Found::Ok(Json(user)))
    }

    /// Change the authenticated user's password.
    ///
    /// Every token of the user, access and refresh, stops working: log in again.
    #[oai(path = "/password", method = "post", operation_id = "changePassword")]
    #[tracing::instrument(skip_all)]
    async fn change_password(
        &self,
        state: poem::web::Data<&AppState>,
        auth: BearerAuth,
        body: Json<PasswordChange>,
    ) -> ApiResult<NoContent> {
        crate::validate::password(&body.new_password).map_err(|e| e.with_field("new_password"))?;
        let user_id = auth.0.user_id;
        let hash = sqlx::query_scalar::<_, String>("SELECT password_hash FROM users WHERE id = $1")
            .bind(user_id)
            .fetch_optional(&state.pg)
            .await?;
        if !password::verify(body.current_password.clone(), hash).await {
            return Err(ApiError::validation(
                "current_password",
                "current password is wrong",
            ));
        }
        let new_hash = password::hash(body.0.new_password).await;
        users::set_password(&state, user_id, &new_hash).await?;
        Ok(NoContent::Done)
    }
}

/// Issues an access token and a new stored refresh token.
async fn issue_pair(
    state: &AppState,
    conn: &mut PgConnection,
    user_id: Uuid,
    ver: i32,
) -> ApiResult<TokenPair> {
    issue_pair_with_jti(state, conn, user_id, ver, Uuid::new_v4()).await
}

async fn issue_pair_with_jti(
    state: &AppState,
    conn: &mut PgConnection,
    user_id: Uuid,
    ver: i32,
    jti: Uuid,
) -> ApiResult<TokenPair> {
    let expires_at = Utc::now()
        + ChronoDuration::from_std(state.auth.jwt().refresh_ttl).expect("refresh ttl fits chrono");
    sqlx::query("INSERT INTO refresh_tokens (id, user_id, expires_at) VALUES ($1, $2, $3)")
        .bind(jti)
        .bind(user_id)
        .bind(expires_at)
        .execute(&mut *conn)
        .await?;
    Ok(TokenPair {
        access_token: state
            .auth
            .jwt()
            .issue(TokenType::Access, user_id, ver, Uuid::new_v4()),
        refresh_token: state
            .auth
            .jwt()
            .issue(TokenType::Refresh, user_id, ver, jti),
        token_type: "Bearer".into(),
        expires_in: state.auth.jwt().access_ttl.as_secs(),
    })
}
