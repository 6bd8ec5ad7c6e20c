//! `/clients`: the tenants. Admins manage them; operators and viewers see their own.

use chrono::{DateTime, Utc};
use poem::web::Data;
use poem_openapi::{
    param::{Path, Query},
    payload::Json,
    Object, OpenApi,
};
use sqlx::FromRow;
use termopar_web::openapi::Constraint;
use uuid::Uuid;

use crate::{
    auth::BearerAuth,
    error::{ApiError, ApiResult},
    pagination::{Listing, Page, PageParams},
    responses::{Created, Deleted, Found},
    state::AppState,
    validate, ApiTags,
};

/// A client company: the tenant that owns sensors and users.
#[derive(Debug, Clone, Object, FromRow)]
pub(crate) struct Client {
    /// Id.
    pub id: Uuid,
    /// Name, unique regardless of case.
    pub name: String,
    /// IANA time zone used for its daily averages by default.
    pub timezone: String,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

/// The columns every query of this module returns.
macro_rules! columns {
    () => {
        "id, name, timezone, created_at, updated_at"
    };
}

/// A new client.
#[derive(Debug, Object)]
pub(crate) struct NewClient {
    /// Name (1 to 200 characters).
    pub name: String,
    /// IANA time zone, e.g. `America/Sao_Paulo`.
    pub timezone: String,
}

/// Changes to a client; absent fields stay as they are.
#[derive(Debug, Object)]
pub(crate) struct ClientPatch {
    /// New name.
    pub name: Option<String>,
    /// New IANA time zone.
    pub timezone: Option<String>,
}

/// What the handlers check of the request bodies, for the OpenAPI document.
pub(crate) const CONSTRAINTS: &[Constraint] = &[
    Constraint::length("NewClient", "name", 1, 200),
    Constraint::length("ClientPatch", "name", 1, 200),
];

/// Loads a client the caller can see, or 404.
pub(crate) async fn visible(state: &AppState, auth: &BearerAuth, id: Uuid) -> ApiResult<Client> {
    crate::tenancy::check_client(auth, id)?;
    sqlx::query_as::<_, Client>(concat!(
        "SELECT ",
        columns!(),
        " FROM clients WHERE id = $1"
    ))
    .bind(id)
    .fetch_optional(&state.pg)
    .await?
    .ok_or_else(|| ApiError::not_found("client"))
}

/// Tenant management.
pub(crate) struct ClientsApi;

#[OpenApi(prefix_path = "/clients", tag = "ApiTags::Clients")]
impl ClientsApi {
    /// Create a client (admins).
    #[oai(path = "/", method = "post", operation_id = "createClient")]
    #[tracing::instrument(skip_all)]
    async fn create(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        body: Json<NewClient>,
    ) -> ApiResult<Created<Client>> {
        auth.0.require_admin()?;
        let name = validate::name("name", &body.name, 200)?;
        let timezone = validate::timezone("timezone", &body.timezone)?;
        let client = sqlx::query_as::<_, Client>(concat!(
            "INSERT INTO clients (id, name, timezone) VALUES ($1, $2, $3) RETURNING ",
            columns!(),
            ""
        ))
        .bind(Uuid::new_v4())
        .bind(name)
        .bind(timezone)
        .fetch_one(&state.pg)
        .await?;
        tracing::info!(client_id = %client.id, "client created");
        Ok(Created::Created(Json(client)))
    }

    /// List clients, newest first. Operators and viewers see only their own.
    #[oai(path = "/", method = "get", operation_id = "listClients")]
    #[tracing::instrument(skip_all)]
    async fn list(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        /// Only those whose name contains this text (case-insensitive).
        q: Query<Option<String>>,
        /// Page number, from 1.
        #[oai(validator(minimum(value = "1")))]
        page: Query<Option<u32>>,
        /// Items per page (1 to 1000, default 50).
        #[oai(validator(minimum(value = "1"), maximum(value = "1000")))]
        page_size: Query<Option<u32>>,
    ) -> ApiResult<Found<Page<Client>>> {
        let params = PageParams::new(page.0, page_size.0);
        let page = Listing::new("clients", columns!(), "created_at DESC, id DESC")
            .uuid("id", auth.0.tenant_scope())
            .search(&["name"], q.0.as_deref())?
            .page::<Client, _>(&state.pg, params)
            .await?;
        Ok(Found::Ok(Json(page)))
    }

    /// Get a client.
    #[oai(path = "/:id", method = "get", operation_id = "getClient")]
    #[tracing::instrument(skip_all, fields(id = %id.0))]
    async fn get(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        id: Path<Uuid>,
    ) -> ApiResult<Found<Client>> {
        Ok(Found::Ok(Json(visible(&state, &auth, id.0).await?)))
    }

    /// Change a client (admins).
    #[oai(path = "/:id", method = "patch", operation_id = "updateClient")]
    #[tracing::instrument(skip_all, fields(id = %id.0))]
    async fn update(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        id: Path<Uuid>,
        body: Json<ClientPatch>,
    ) -> ApiResult<Found<Client>> {
        auth.0.require_admin()?;
        let name = body
            .name
            .as_deref()
            .map(|n| validate::name("name", n, 200))
            .transpose()?;
        let timezone = body
            .timezone
            .as_deref()
            .map(|tz| validate::timezone("timezone", tz))
            .transpose()?;
        let client = sqlx::query_as::<_, Client>(concat!(
            "UPDATE clients SET name = coalesce($2, name), timezone = coalesce($3, timezone),
                    updated_at = now()
             WHERE id = $1 RETURNING ",
            columns!(),
            ""
        ))
        .bind(id.0)
        .bind(name)
        .bind(timezone)
        .fetch_optional(&state.pg)
        .await?
        .ok_or_else(|| ApiError::not_found("client"))?;
        Ok(Found::Ok(Json(client)))
    }

    /// Delete a client (admins). Refused with 409 while it still has sensors or users.
    #[oai(path = "/:id", method = "delete", operation_id = "deleteClient")]
    #[tracing::instrument(skip_all, fields(id = %id.0))]
    async fn delete(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        id: Path<Uuid>,
    ) -> ApiResult<Deleted> {
        auth.0.require_admin()?;
        let deleted = sqlx::query("DELETE FROM clients WHERE id = $1")
            .bind(id.0)
            .execute(&state.pg)
            .await
            .map_err(|e| match termopar_core::db::sqlstate(&e).as_deref() {
                Some("23503") => ApiError::conflict(
                    "the client still has sensors or users: delete or move them first",
                ),
                _ => e.into(),
            })?
            .rows_affected();
        if deleted == 0 {
            return Err(ApiError::not_found("client"));
        }
        Ok(Deleted::Deleted)
    }
}
