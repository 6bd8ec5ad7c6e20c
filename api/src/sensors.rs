//! `/sensors`: temperature sensors of a client, with their device secrets.

use chrono::{DateTime, Utc};
use poem::web::Data;
use poem_openapi::{
    param::{Path, Query},
    payload::Json,
    types::MaybeUndefined,
    Object, OpenApi,
};
use sqlx::FromRow;
use termopar_core::ids::SensorId;
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

/// Largest `metadata` object accepted, serialized.
const MAX_METADATA_BYTES: usize = 16 * 1024;

/// A sensor. Its device secret is shown only when created or rotated.
#[derive(Debug, Clone, Object, FromRow)]
pub(crate) struct Sensor {
    /// Id; also the MQTT username of the device and part of its topic.
    pub id: Uuid,
    /// The client that owns it (fixed at creation).
    pub client_id: Uuid,
    /// Name, unique within the client regardless of case.
    pub name: String,
    /// Where it is installed.
    pub location: Option<String>,
    /// Display unit. Readings are always stored in degrees Celsius.
    pub unit: String,
    /// Free-form attributes (a JSON object).
    pub metadata: serde_json::Value,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

/// The columns every query of this module returns.
macro_rules! columns {
    () => {
        "id, client_id, name, location, unit, metadata, created_at, updated_at"
    };
}

/// A sensor just created, with its device secret. Store the secret now: it is never
/// shown again (rotate it to get a new one).
#[derive(Debug, Object)]
pub(crate) struct SensorWithSecret {
    #[oai(flatten)]
    sensor: Sensor,
    /// The device's password for MQTT (username = sensor id) and HTTP ingest.
    device_secret: String,
}

/// A new device secret.
#[derive(Debug, Object)]
pub(crate) struct RotatedSecret {
    /// The sensor.
    sensor_id: Uuid,
    /// The new secret; the old one stops working at once.
    device_secret: String,
}

/// A new sensor.
#[derive(Debug, Object)]
pub(crate) struct NewSensor {
    /// Owning client. Required for admins; operators may omit it (their own client).
    pub client_id: Option<Uuid>,
    /// Name (1 to 200 characters).
    pub name: String,
    /// Where it is installed (at most 500 characters).
    pub location: Option<String>,
    /// Display unit (default `celsius`).
    pub unit: Option<String>,
    /// Free-form attributes (a JSON object of at most 16 KiB).
    pub metadata: Option<serde_json::Value>,
}

/// Changes to a sensor; absent fields stay as they are.
#[derive(Debug, Object)]
pub(crate) struct SensorPatch {
    /// New name.
    pub name: Option<String>,
    /// New location; `null` clears it.
    pub location: MaybeUndefined<String>,
    /// New display unit.
    pub unit: Option<String>,
    /// New attributes (replaces the object).
    pub metadata: Option<serde_json::Value>,
}

/// What the handlers check of the request bodies, for the OpenAPI document.
pub(crate) const CONSTRAINTS: &[Constraint] = &[
    Constraint::length("NewSensor", "name", 1, 200),
    Constraint::length("NewSensor", "unit", 1, 32),
    Constraint::length("NewSensor", "location", 0, 500),
    Constraint::length("SensorPatch", "name", 1, 200),
    Constraint::length("SensorPatch", "unit", 1, 32),
    Constraint::length("SensorPatch", "location", 0, 500),
];

/// Loads a sensor the caller can see (404 otherwise, also for other tenants' sensors).
pub(crate) async fn visible(state: &AppState, auth: &BearerAuth, id: Uuid) -> ApiResult<Sensor> {
    let sensor = sqlx::query_as::<_, Sensor>(concat!(
        "SELECT ",
        columns!(),
        " FROM sensors WHERE id = $1"
    ))
    .bind(id)
    .fetch_optional(&state.pg)
    .await?
    .filter(|s| auth.0.sees_client(s.client_id))
    .ok_or_else(|| ApiError::not_found("sensor"))?;
    Ok(sensor)
}

fn unit(value: Option<&str>) -> ApiResult<Option<String>> {
    value.map(|u| validate::name("unit", u, 32)).transpose()
}

fn location(value: Option<&str>) -> ApiResult<Option<String>> {
    value
        .map(|l| validate::text("location", l.trim(), 500))
        .transpose()
}

fn metadata(value: Option<serde_json::Value>) -> ApiResult<Option<serde_json::Value>> {
    value
        .map(|m| validate::json_object("metadata", m, MAX_METADATA_BYTES))
        .transpose()
}

/// Sensor management.
pub(crate) struct SensorsApi;

#[OpenApi(prefix_path = "/sensors", tag = "ApiTags::Sensors")]
impl SensorsApi {
    /// Create a sensor (admins, and operators for their client).
    ///
    /// The response holds the device secret, shown only this once.
    #[oai(path = "/", method = "post", operation_id = "createSensor")]
    #[tracing::instrument(skip_all)]
    async fn create(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        body: Json<NewSensor>,
    ) -> ApiResult<Created<SensorWithSecret>> {
        let body = body.0;
        let client_id = auth.0.client_for_new(body.client_id, "sensors")?;
        let name = validate::name("name", &body.name, 200)?;
        let location = location(body.location.as_deref())?;
        let unit = unit(body.unit.as_deref())?.unwrap_or_else(|| "celsius".into());
        let metadata = metadata(body.metadata)?.unwrap_or_else(|| serde_json::json!({}));
        let secret = termopar_core::secrets::generate();
        let sensor = sqlx::query_as::<_, Sensor>(concat!(
            "INSERT INTO sensors (id, client_id, name, location, unit, metadata, secret_hash)
             VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING ",
            columns!(),
            ""
        ))
        .bind(Uuid::new_v4())
        .bind(client_id)
        .bind(name)
        .bind(location)
        .bind(unit)
        .bind(metadata)
        .bind(termopar_core::secrets::hash(&secret))
        .fetch_one(&state.pg)
        .await
        .map_err(|e| match termopar_core::db::sqlstate(&e).as_deref() {
            Some("23503") => ApiError::validation("client_id", "no such client"),
            _ => e.into(),
        })?;
        tracing::info!(sensor_id = %sensor.id, client_id = %sensor.client_id, "sensor created");
        Ok(Created::Created(Json(SensorWithSecret {
            sensor,
            device_secret: secret,
        })))
    }

    /// List sensors, newest first. Operators and viewers see their client's only.
    #[oai(path = "/", method = "get", operation_id = "listSensors")]
    #[tracing::instrument(skip_all)]
    async fn list(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        /// Only sensors of this client.
        client_id: Query<Option<Uuid>>,
        /// Only those whose name or location contains this text (case-insensitive).
        q: Query<Option<String>>,
        /// Page number, from 1.
        #[oai(validator(minimum(value = "1")))]
        page: Query<Option<u32>>,
        /// Items per page (1 to 1000, default 50).
        #[oai(validator(minimum(value = "1"), maximum(value = "1000")))]
        page_size: Query<Option<u32>>,
    ) -> ApiResult<Found<Page<Sensor>>> {
        let params = PageParams::new(page.0, page_size.0);
        let Ok(scope) = auth.0.list_scope(client_id.0) else {
            // Filtering on another tenant finds nothing, exactly like an unknown id.
            return Ok(Found::Ok(Json(params.page(Vec::new(), 0))));
        };
        let page = Listing::new("sensors", columns!(), "created_at DESC, id DESC")
            .uuid("client_id", scope)
            .search(&["name", "location"], q.0.as_deref())?
            .page::<Sensor, _>(&state.pg, params)
            .await?;
        Ok(Found::Ok(Json(page)))
    }

    /// Get a sensor.
    #[oai(path = "/:id", method = "get", operation_id = "getSensor")]
    #[tracing::instrument(skip_all, fields(id = %id.0))]
    async fn get(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        id: Path<Uuid>,
    ) -> ApiResult<Found<Sensor>> {
        Ok(Found::Ok(Json(visible(&state, &auth, id.0).await?)))
    }

    /// Change a sensor (admins, and operators of its client).
    #[oai(path = "/:id", method = "patch", operation_id = "updateSensor")]
    #[tracing::instrument(skip_all, fields(id = %id.0))]
    async fn update(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        id: Path<Uuid>,
        body: Json<SensorPatch>,
    ) -> ApiResult<Found<Sensor>> {
        let current = visible(&state, &auth, id.0).await?;
        auth.0.require_manager_of(current.client_id)?;
        let body = body.0;
        let name = body
            .name
            .as_deref()
            .map(|n| validate::name("name", n, 200))
            .transpose()?;
        let (set_location, location) = match body.location {
            MaybeUndefined::Undefined => (false, None),
            MaybeUndefined::Null => (true, None),
            MaybeUndefined::Value(l) => (true, location(Some(&l))?),
        };
        let unit = unit(body.unit.as_deref())?;
        let metadata = metadata(body.metadata)?;
        let sensor = sqlx::query_as::<_, Sensor>(concat!(
            "UPDATE sensors SET
                name = coalesce($2, name),
                location = CASE WHEN $3 THEN $4 ELSE location END,
                unit = coalesce($5, unit),
                metadata = coalesce($6, metadata),
                updated_at = now()
             WHERE id = $1 RETURNING ",
            columns!(),
            ""
        ))
        .bind(id.0)
        .bind(name)
        .bind(set_location)
        .bind(location)
        .bind(unit)
        .bind(metadata)
        .fetch_optional(&state.pg)
        .await?
        .ok_or_else(|| ApiError::not_found("sensor"))?;
        Ok(Found::Ok(Json(sensor)))
    }

    /// Delete a sensor (admins, and operators of its client).
    #[oai(path = "/:id", method = "delete", operation_id = "deleteSensor")]
    #[tracing::instrument(skip_all, fields(id = %id.0))]
    async fn delete(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        id: Path<Uuid>,
    ) -> ApiResult<Deleted> {
        let current = visible(&state, &auth, id.0).await?;
        auth.0.require_manager_of(current.client_id)?;
        let deleted = sqlx::query("DELETE FROM sensors WHERE id = $1")
            .bind(id.0)
            .execute(&state.pg)
            .await?
            .rows_affected();
        if deleted == 0 {
            return Err(ApiError::not_found("sensor"));
        }
        state.directory.invalidate(SensorId(id.0)).await;
        tracing::info!(sensor_id = %id.0, "sensor deleted");
        Ok(Deleted::Deleted)
    }

    /// Replace a sensor's device secret (admins, and operators of its client).
    ///
    /// The old secret stops working at once; the new one is shown only in this response.
    #[oai(
        path = "/:id/secret",
        method = "post",
        operation_id = "rotateSensorSecret"
    )]
    #[tracing::instrument(skip_all, fields(id = %id.0))]
    async fn rotate_secret(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        id: Path<Uuid>,
    ) -> ApiResult<Found<RotatedSecret>> {
        let current = visible(&state, &auth, id.0).await?;
        auth.0.require_manager_of(current.client_id)?;
        let secret = termopar_core::secrets::generate();
        let updated =
            sqlx::query("UPDATE sensors SET secret_hash = $2, updated_at = now() WHERE id = $1")
                .bind(id.0)
                .bind(termopar_core::secrets::hash(&secret))
                .execute(&state.pg)
                .await?
                .rows_affected();
        if updated == 0 {
            return Err(ApiError::not_found("sensor"));
        }
        state.directory.invalidate(SensorId(id.0)).await;
        Ok(Found::Ok(Json(RotatedSecret {
            sensor_id: id.0,
            device_secret: secret,
        })))
    }
}
