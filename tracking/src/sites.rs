//! `/sites`: the web sites of a client whose pages send hits, with the origins allowed
//! to send them.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use poem::web::Data;
use poem_openapi::{
    param::{Path, Query},
    payload::Json,
    Object, OpenApi,
};
use sqlx::FromRow;
use uuid::Uuid;

use termopar_web::{
    openapi::Constraint,
    pagination::{Listing, Page, PageParams},
    responses::{Created, Deleted, Found},
    validate, ApiError, ApiResult, BearerAuth, ErrorCode,
};

use crate::{routes::TrackingTags, Tracking};

/// Most origins of one site.
const MAX_ORIGINS: usize = 50;

/// A tracked web site.
#[derive(Debug, Clone, Object, FromRow)]
pub(crate) struct Site {
    /// Id: the `site_id` its pages send (and the tracker's `data-site`).
    pub id: Uuid,
    /// The client that owns it (fixed at creation).
    pub client_id: Uuid,
    /// Name, unique within the client regardless of case.
    pub name: String,
    /// Origins (`https://shop.example.com`) whose pages may send hits; `*` for any.
    pub origins: Vec<String>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

macro_rules! columns {
    () => {
        "id, client_id, name, origins, created_at, updated_at"
    };
}

/// A new site.
#[derive(Debug, Object)]
pub(crate) struct NewSite {
    /// Owning client. Required for admins; operators may omit it (their own client).
    pub client_id: Option<Uuid>,
    /// Name (1 to 200 characters).
    pub name: String,
    /// Origins allowed to send hits (`scheme://host[:port]`, or `*` for any), at most 50.
    pub origins: Vec<String>,
}

/// Changes to a site; absent fields stay as they are.
#[derive(Debug, Object)]
pub(crate) struct SitePatch {
    /// New name.
    pub name: Option<String>,
    /// New origins (replaces the list).
    pub origins: Option<Vec<String>>,
}

/// What the handlers check of the request bodies, for the OpenAPI document.
pub const CONSTRAINTS: &[Constraint] = &[
    Constraint::length("NewSite", "name", 1, 200),
    Constraint::length("SitePatch", "name", 1, 200),
];

/// A site as the tracking endpoint needs it.
#[derive(Debug)]
pub(crate) struct SiteInfo {
    client_id: Uuid,
    origins: Vec<String>,
}

impl SiteInfo {
    /// Whether a page of `origin` (the request's `Origin` header) may send hits.
    pub(crate) fn allows(&self, origin: &str) -> bool {
        self.origins
            .iter()
            .any(|o| o == "*" || o.eq_ignore_ascii_case(origin))
    }
}

/// `scheme://host[:port]` of an http(s) origin, lowercased, or `*`.
fn origin(value: &str) -> ApiResult<String> {
    let value = value.trim();
    if value == "*" {
        return Ok(value.to_owned());
    }
    let bad = || {
        ApiError::validation(
            "origins",
            format!("{value:?} is not an origin such as https://shop.example.com"),
        )
    };
    let url = url::Url::parse(value).map_err(|_| bad())?;
    let bare = url.path() == "/" && url.query().is_none() && url.fragment().is_none();
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() || !bare {
        return Err(bad());
    }
    Ok(url.origin().ascii_serialization())
}

fn origins(values: &[String]) -> ApiResult<Vec<String>> {
    if values.len() > MAX_ORIGINS {
        return Err(ApiError::validation(
            "origins",
            format!("at most {MAX_ORIGINS} origins"),
        ));
    }
    let mut out: Vec<String> = Vec::with_capacity(values.len());
    for v in values {
        let o = origin(v)?;
        if !out.contains(&o) {
            out.push(o);
        }
    }
    Ok(out)
}

fn name_taken(e: sqlx::Error) -> ApiError {
    match termopar_core::db::constraint(&e) {
        Some("sites_client_name_key") => {
            ApiError::conflict("the client already has a site of that name").with_field("name")
        }
        _ => e.into(),
    }
}

/// Loads a site the caller can see (404 otherwise, also for other tenants' sites).
pub(crate) async fn visible(tracking: &Tracking, auth: &BearerAuth, id: Uuid) -> ApiResult<Site> {
    sqlx::query_as::<_, Site>(concat!("SELECT ", columns!(), " FROM sites WHERE id = $1"))
        .bind(id)
        .fetch_optional(tracking.pg())
        .await?
        .filter(|s| auth.0.sees_client(s.client_id))
        .ok_or_else(|| ApiError::not_found("site"))
}

/// Sites by id, cached for the tracking endpoint (`None`: no such site).
pub(crate) async fn lookup(tracking: &Tracking, id: Uuid) -> ApiResult<Option<Arc<SiteInfo>>> {
    let pg = tracking.pg().clone();
    tracking
        .0
        .sites
        .try_get_with(id, async move {
            let site: Option<(Uuid, Vec<String>)> =
                sqlx::query_as("SELECT client_id, origins FROM sites WHERE id = $1")
                    .bind(id)
                    .fetch_optional(&pg)
                    .await?;
            Ok::<_, sqlx::Error>(
                site.map(|(client_id, origins)| Arc::new(SiteInfo { client_id, origins })),
            )
        })
        .await
        .map_err(|e| ApiError::from(termopar_core::db::shared_error(&e)))
}

impl Tracking {
    /// The client of `site`, for a form or hit posted from a page of `origin` (the
    /// request's `Origin`, when it has one): 422 `unknown_site` when there is no such
    /// site, 403 `origin_not_allowed` when the site does not allow that origin.
    pub async fn site_client(&self, site: Uuid, origin: Option<&str>) -> ApiResult<Uuid> {
        let info = lookup(self, site).await?.ok_or_else(|| {
            ApiError::new(ErrorCode::UnknownSite, format!("no site {site}")).with_field("site_id")
        })?;
        match origin {
            Some(origin) if !info.allows(origin) => Err(ApiError::new(
                ErrorCode::OriginNotAllowed,
                format!("site {site} does not allow pages of {origin}"),
            )),
            _ => Ok(info.client_id),
        }
    }

    /// The answer to a CORS preflight of a `POST` from pages of `origin`: allowed when
    /// some site allows that origin.
    pub async fn preflight(&self, origin: Option<String>) -> ApiResult<crate::routes::Preflight> {
        let allowed = match origin {
            Some(origin) if self.origin_known(&origin).await? => Some(origin),
            _ => None,
        };
        Ok(crate::routes::Preflight::Answered(
            allowed,
            "POST, OPTIONS".into(),
            "Content-Type".into(),
            86_400,
            "Origin".into(),
        ))
    }
}

/// Site management.
pub struct SitesApi;

#[OpenApi(prefix_path = "/sites", tag = "TrackingTags::Tracking")]
impl SitesApi {
    /// Create a site (admins, and operators for their client).
    #[oai(path = "/", method = "post", operation_id = "createSite")]
    #[tracing::instrument(skip_all)]
    async fn create(
        &self,
        tracking: Data<&Tracking>,
        auth: BearerAuth,
        body: Json<NewSite>,
    ) -> ApiResult<Created<Site>> {
        let client_id = auth.0.client_for_new(body.client_id, "sites")?;
        let name = validate::name("name", &body.name, 200)?;
        let origins = origins(&body.origins)?;
        let site = sqlx::query_as::<_, Site>(concat!(
            "INSERT INTO sites (id, client_id, name, origins) VALUES ($1, $2, $3, $4) RETURNING ",
            columns!()
        ))
        .bind(Uuid::new_v4())
        .bind(client_id)
        .bind(name)
        .bind(origins)
        .fetch_one(tracking.pg())
        .await
        .map_err(|e| match termopar_core::db::sqlstate(&e).as_deref() {
            Some("23503") => ApiError::validation("client_id", "no such client"),
            _ => name_taken(e),
        })?;
        tracking.forget_origins();
        tracing::info!(site_id = %site.id, client_id = %site.client_id, "site created");
        Ok(Created::Created(Json(site)))
    }

    /// List sites, newest first. Operators and viewers see their client's only.
    #[oai(path = "/", method = "get", operation_id = "listSites")]
    #[tracing::instrument(skip_all)]
    async fn list(
        &self,
        tracking: Data<&Tracking>,
        auth: BearerAuth,
        /// Only sites of this client.
        client_id: Query<Option<Uuid>>,
        /// Only those whose name contains this text (case-insensitive).
        q: Query<Option<String>>,
        /// Page number, from 1.
        #[oai(validator(minimum(value = "1")))]
        page: Query<Option<u32>>,
        /// Items per page (1 to 1000, default 50).
        #[oai(validator(minimum(value = "1"), maximum(value = "1000")))]
        page_size: Query<Option<u32>>,
    ) -> ApiResult<Found<Page<Site>>> {
        let params = PageParams::new(page.0, page_size.0);
        let Ok(scope) = auth.0.list_scope(client_id.0) else {
            return Ok(Found::Ok(Json(params.page(Vec::new(), 0))));
        };
        let page = Listing::new("sites", columns!(), "created_at DESC, id DESC")
            .uuid("client_id", scope)
            .search(&["name"], q.0.as_deref())?
            .page::<Site, _>(tracking.pg(), params)
            .await?;
        Ok(Found::Ok(Json(page)))
    }

    /// Get a site.
    #[oai(path = "/:id", method = "get", operation_id = "getSite")]
    #[tracing::instrument(skip_all, fields(id = %id.0))]
    async fn get(
        &self,
        tracking: Data<&Tracking>,
        auth: BearerAuth,
        id: Path<Uuid>,
    ) -> ApiResult<Found<Site>> {
        Ok(Found::Ok(Json(visible(&tracking, &auth, id.0).await?)))
    }

    /// Change a site (admins, and operators of its client).
    #[oai(path = "/:id", method = "patch", operation_id = "updateSite")]
    #[tracing::instrument(skip_all, fields(id = %id.0))]
    async fn update(
        &self,
        tracking: Data<&Tracking>,
        auth: BearerAuth,
        id: Path<Uuid>,
        body: Json<SitePatch>,
    ) -> ApiResult<Found<Site>> {
        let current = visible(&tracking, &auth, id.0).await?;
        auth.0.require_manager_of(current.client_id)?;
        let name = body
            .name
            .as_deref()
            .map(|n| validate::name("name", n, 200))
            .transpose()?;
        let origins = body.origins.as_deref().map(origins).transpose()?;
        let site = sqlx::query_as::<_, Site>(concat!(
            "UPDATE sites SET name = coalesce($2, name), origins = coalesce($3, origins),
                 updated_at = now()
             WHERE id = $1 RETURNING ",
            columns!()
        ))
        .bind(id.0)
        .bind(name)
        .bind(origins)
        .fetch_optional(tracking.pg())
        .await
        .map_err(name_taken)?
        .ok_or_else(|| ApiError::not_found("site"))?;
        tracking.forget_site(id.0).await;
        Ok(Found::Ok(Json(site)))
    }

    /// Delete a site with its hits and counts (admins, and operators of its client).
    #[oai(path = "/:id", method = "delete", operation_id = "deleteSite")]
    #[tracing::instrument(skip_all, fields(id = %id.0))]
    async fn delete(
        &self,
        tracking: Data<&Tracking>,
        auth: BearerAuth,
        id: Path<Uuid>,
    ) -> ApiResult<Deleted> {
        let current = visible(&tracking, &auth, id.0).await?;
        auth.0.require_manager_of(current.client_id)?;
        let mut tx = tracking.pg().begin().await?;
        // The site's raw pages are deleted below: never while a backup copies them.
        if !termopar_core::backup::fenced(&mut tx).await? {
            return Err(ApiError::new(
                ErrorCode::StorageUnavailable,
                "a backup is running; delete the site when it has finished",
            ));
        }
        let deleted = sqlx::query("DELETE FROM sites WHERE id = $1")
            .bind(id.0)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if deleted == 0 {
            return Err(ApiError::not_found("site"));
        }
        for table in [
            "tracking_site_counts",
            "tracking_url_counts",
            "tracking_context_counts",
            "tracking_user_contexts",
        ] {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "DELETE FROM {table} WHERE site_id = $1"
            )))
            .bind(id.0)
            .execute(&mut *tx)
            .await?;
        }
        let pages: Vec<String> = sqlx::query_as::<_, (i64, i32)>(
            "DELETE FROM tracking_pages WHERE site_id = $1 RETURNING row_id, part",
        )
        .bind(id.0)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .map(|(row, part)| crate::relay::page_id(id.0, row, part))
        .collect();
        tx.commit().await?;
        tracking.forget_site(id.0).await;
        // The raw pages go after the commit, one by one by `_id` (the only delete the
        // document store does without a scan); a failure leaves unreachable pages
        // behind, never a site with missing hits.
        let removed = tracking.delete_pages(&pages).await;
        tracing::info!(site_id = %id.0, pages = pages.len(), removed, "site deleted");
        Ok(Deleted::Deleted)
    }
}
