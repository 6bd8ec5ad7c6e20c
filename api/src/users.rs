//! `/users`: accounts and their roles (admins only; everyone has `/auth/me`).

use chrono::{DateTime, Utc};
use poem::web::Data;
use poem_openapi::{
    param::{Path, Query},
    payload::Json,
    types::MaybeUndefined,
    Object, OpenApi,
};
use sqlx::{FromRow, PgPool, Postgres, Transaction};
use termopar_web::{openapi::Constraint, BearerAuth, Role};
use uuid::Uuid;

use crate::{
    credentials::password,
    error::{ApiError, ApiResult},
    pagination::{Listing, Page, PageParams},
    responses::{Created, Deleted, Found},
    state::AppState,
    validate, ApiTags,
};

/// A user account. The password hash never leaves the server.
#[derive(Debug, Clone, Object)]
pub(crate) struct User {
    /// Id.
    pub id: Uuid,
    /// E-mail, unique regardless of case.
    pub email: String,
    /// Role.
    pub role: Role,
    /// The client an operator or viewer belongs to; absent for admins.
    pub client_id: Option<Uuid>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

#[derive(FromRow)]
struct UserRow {
    id: Uuid,
    email: String,
    role: String,
    client_id: Option<Uuid>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl From<UserRow> for User {
    fn from(r: UserRow) -> Self {
        User {
            id: r.id,
            email: r.email,
            role: Role::from_db(&r.role).expect("role is constrained in the schema"),
            client_id: r.client_id,
            created_at: r.created_at,
            updated_at: r.updated_at,
        }
    }
}

/// The columns every query of this module returns.
macro_rules! columns {
    () => {
        "id, email, role, client_id, created_at, updated_at"
    };
}

/// A new user.
#[derive(Debug, Object)]
pub(crate) struct NewUser {
    /// E-mail (3 to 254 characters, with an `@`).
    pub email: String,
    /// Password (8 to 256 characters).
    pub password: String,
    /// Role.
    pub role: Role,
    /// Required for operators and viewers; must be absent for admins.
    pub client_id: Option<Uuid>,
}

/// Changes to a user; absent fields stay as they are.
#[derive(Debug, Object)]
pub(crate) struct UserPatch {
    /// New e-mail.
    pub email: Option<String>,
    /// New password: revokes every token of the user.
    pub password: Option<String>,
    /// New role.
    pub role: Option<Role>,
    /// New client (`null` when becoming admin).
    pub client_id: MaybeUndefined<Uuid>,
}

/// What the handlers check of the request bodies, for the OpenAPI document.
pub(crate) const CONSTRAINTS: &[Constraint] = &[
    Constraint::length("NewUser", "email", 3, 254),
    Constraint::length("NewUser", "password", 8, 256),
    Constraint::length("UserPatch", "email", 3, 254),
    Constraint::length("UserPatch", "password", 8, 256),
    Constraint::length("PasswordChange", "new_password", 8, 256),
];

fn validate_role_client(role: Role, client_id: Option<Uuid>) -> ApiResult<()> {
    match (role, client_id) {
        (Role::Admin, Some(_)) => Err(ApiError::validation(
            "client_id",
            "admins do not belong to a client",
        )),
        (Role::Operator | Role::Viewer, None) => Err(ApiError::validation(
            "client_id",
            "operators and viewers need a client_id",
        )),
        _ => Ok(()),
    }
}

/// Fails with 422 when `client_id` names no client.
async fn require_client(
    tx: &mut Transaction<'_, Postgres>,
    client_id: Option<Uuid>,
) -> ApiResult<()> {
    if let Some(id) = client_id {
        let exists = sqlx::query_scalar::<_, bool>(
            "SELECT EXISTS (SELECT 1 FROM clients WHERE id = $1 FOR KEY SHARE)",
        )
        .bind(id)
        .fetch_one(&mut **tx)
        .await?;
        if !exists {
            return Err(ApiError::validation("client_id", "no such client"));
        }
    }
    Ok(())
}

/// Fails with 409 when removing admin rights from `user_id` would leave no admin.
/// Locks the admin rows so two concurrent demotions cannot both pass.
async fn keep_an_admin(tx: &mut Transaction<'_, Postgres>, user_id: Uuid) -> ApiResult<()> {
    let admins: Vec<Uuid> =
        sqlx::query_scalar("SELECT id FROM users WHERE role = 'admin' FOR UPDATE")
            .fetch_all(&mut **tx)
            .await?;
    if admins.len() <= 1 && admins.contains(&user_id) {
        return Err(ApiError::conflict(
            "the last admin cannot be removed or demoted",
        ));
    }
    Ok(())
}

/// Loads a user by id.
pub(crate) async fn fetch(pg: &PgPool, id: Uuid) -> ApiResult<Option<User>> {
    let row =
        sqlx::query_as::<_, UserRow>(concat!("SELECT ", columns!(), " FROM users WHERE id = $1"))
            .bind(id)
            .fetch_optional(pg)
            .await?;
    Ok(row.map(User::from))
}

/// Sets a new password hash and revokes every token of the user.
pub(crate) async fn set_password(state: &AppState, user_id: Uuid, hash: &str) -> ApiResult<()> {
    let mut tx = state.pg.begin().await?;
    sqlx::query(
        "UPDATE users SET password_hash = $2, token_version = token_version + 1, updated_at = now()
         WHERE id = $1",
    )
    .bind(user_id)
    .bind(hash)
    .execute(&mut *tx)
    .await?;
    crate::credentials::revoke_all(&mut tx, user_id).await?;
    tx.commit().await?;
    state.auth.forget(user_id).await;
    Ok(())
}

/// Inserts a user (also used by the admin bootstrap).
pub(crate) async fn insert(
    tx: &mut Transaction<'_, Postgres>,
    email: &str,
    password_hash: &str,
    role: Role,
    client_id: Option<Uuid>,
) -> ApiResult<User> {
    let row = sqlx::query_as::<_, UserRow>(concat!(
        "INSERT INTO users (id, email, password_hash, role, client_id)
         VALUES ($1, $2, $3, $4, $5) RETURNING ",
        columns!(),
        ""
    ))
    .bind(Uuid::new_v4())
    .bind(email)
    .bind(password_hash)
    .bind(role.as_str())
    .bind(client_id)
    .fetch_one(&mut **tx)
    .await?;
    Ok(row.into())
}

/// User management. Admins only.
pub(crate) struct UsersApi;

#[OpenApi(prefix_path = "/users", tag = "ApiTags::Users")]
impl UsersApi {
    /// Create a user.
    #[oai(path = "/", method = "post", operation_id = "createUser")]
    #[tracing::instrument(skip_all)]
    async fn create(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        body: Json<NewUser>,
    ) -> ApiResult<Created<User>> {
        auth.0.require_admin()?;
        let body = body.0;
        let email = body.email.trim().to_owned();
        validate::email(&email)?;
        validate::password(&body.password)?;
        validate_role_client(body.role, body.client_id)?;
        let hash = password::hash(body.password).await;
        let mut tx = state.pg.begin().await?;
        require_client(&mut tx, body.client_id).await?;
        let user = insert(&mut tx, &email, &hash, body.role, body.client_id).await?;
        tx.commit().await?;
        tracing::info!(user_id = %user.id, role = user.role.as_str(), "user created");
        Ok(Created::Created(Json(user)))
    }

    /// List users, newest first.
    #[oai(path = "/", method = "get", operation_id = "listUsers")]
    #[tracing::instrument(skip_all)]
    // Each query parameter is its own documented argument.
    #[allow(clippy::too_many_arguments)]
    async fn list(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        /// Only users of this client.
        client_id: Query<Option<Uuid>>,
        /// Only users with this role.
        role: Query<Option<Role>>,
        /// Only those whose e-mail contains this text (case-insensitive).
        q: Query<Option<String>>,
        /// Page number, from 1.
        #[oai(validator(minimum(value = "1")))]
        page: Query<Option<u32>>,
        /// Items per page (1 to 1000, default 50).
        #[oai(validator(minimum(value = "1"), maximum(value = "1000")))]
        page_size: Query<Option<u32>>,
    ) -> ApiResult<Found<Page<User>>> {
        auth.0.require_admin()?;
        let params = PageParams::new(page.0, page_size.0);
        let page = Listing::new("users", columns!(), "created_at DESC, id DESC")
            .uuid("client_id", client_id.0)
            .text("role", role.0.map(Role::as_str))
            .search(&["email"], q.0.as_deref())?
            .page::<UserRow, User>(&state.pg, params)
            .await?;
        Ok(Found::Ok(Json(page)))
    }

    /// Get a user.
    #[oai(path = "/:id", method = "get", operation_id = "getUser")]
    #[tracing::instrument(skip_all, fields(id = %id.0))]
    async fn get(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        id: Path<Uuid>,
    ) -> ApiResult<Found<User>> {
        auth.0.require_admin()?;
        let user = fetch(&state.pg, id.0)
            .await?
            .ok_or_else(|| ApiError::not_found("user"))?;
        Ok(Found::Ok(Json(user)))
    }

    /// Change a user.
    ///
    /// A new password, role or client revokes every token of the user. The last admin
    /// cannot be demoted.
    #[oai(path = "/:id", method = "patch", operation_id = "updateUser")]
    #[tracing::instrument(skip_all, fields(id = %id.0))]
    async fn update(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        id: Path<Uuid>,
        body: Json<UserPatch>,
    ) -> ApiResult<Found<User>> {
        auth.0.require_admin()?;
        let patch = body.0;
        let email = patch.email.as_deref().map(str::trim).map(str::to_owned);
        if let Some(email) = &email {
            validate::email(email)?;
        }
        if let Some(pw) = &patch.password {
            validate::password(pw)?;
        }
        let new_hash = match patch.password {
            Some(pw) => Some(password::hash(pw).await),
            None => None,
        };
        let mut tx = state.pg.begin().await?;
        let current = sqlx::query_as::<_, UserRow>(concat!(
            "SELECT ",
            columns!(),
            " FROM users WHERE id = $1 FOR UPDATE"
        ))
        .bind(id.0)
        .fetch_optional(&mut *tx)
        .await?
        .map(User::from)
        .ok_or_else(|| ApiError::not_found("user"))?;
        let role = patch.role.unwrap_or(current.role);
        let client_id = match patch.client_id {
            MaybeUndefined::Undefined => {
                if role == Role::Admin {
                    None
                } else {
                    current.client_id
                }
            }
            MaybeUndefined::Null => None,
            MaybeUndefined::Value(c) => Some(c),
        };
        validate_role_client(role, client_id)?;
        if current.role == Role::Admin && role != Role::Admin {
            keep_an_admin(&mut tx, current.id).await?;
        }
        if client_id != current.client_id {
            require_client(&mut tx, client_id).await?;
        }
        let revoke = new_hash.is_some() || role != current.role || client_id != current.client_id;
        let row = sqlx::query_as::<_, UserRow>(concat!(
            "UPDATE users SET
                email = coalesce($2, email),
                password_hash = coalesce($3, password_hash),
                role = $4,
                client_id = $5,
                token_version = token_version + CASE WHEN $6 THEN 1 ELSE 0 END,
                updated_at = now()
             WHERE id = $1 RETURNING ",
            columns!(),
            ""
        ))
        .bind(id.0)
        .bind(email)
        .bind(new_hash)
        .bind(role.as_str())
        .bind(client_id)
        .bind(revoke)
        .fetch_one(&mut *tx)
        .await?;
        if revoke {
            crate::credentials::revoke_all(&mut tx, id.0).await?;
        }
        tx.commit().await?;
        state.auth.forget(id.0).await;
        Ok(Found::Ok(Json(row.into())))
    }

    /// Delete a user. The last admin cannot be deleted.
    #[oai(path = "/:id", method = "delete", operation_id = "deleteUser")]
    #[tracing::instrument(skip_all, fields(id = %id.0))]
    async fn delete(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        id: Path<Uuid>,
    ) -> ApiResult<Deleted> {
        auth.0.require_admin()?;
        let mut tx = state.pg.begin().await?;
        keep_an_admin(&mut tx, id.0).await?;
        let deleted = sqlx::query("DELETE FROM users WHERE id = $1")
            .bind(id.0)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if deleted == 0 {
            return Err(ApiError::not_found("user"));
        }
        tx.commit().await?;
        state.auth.forget(id.0).await;
        Ok(Deleted::Deleted)
    }
}
