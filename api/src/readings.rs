//! Readings ("measurements"): history, latest, HTTP ingest, and admin corrections.

use chrono::{DateTime, Utc};
use poem::web::Data;
use poem_openapi::{
    auth::ApiKey,
    param::{Path, Query},
    payload::{Binary, Json},
    registry::{MetaSchema, MetaSchemaRef, Registry},
    types::{ParseError, ParseFromJSON, ParseResult, ToJSON, Type},
    ApiRequest, ApiResponse, Object, OpenApi, SecurityScheme,
};
use serde_json::{Map, Value};
use termopar_core::{
    ids::SensorId,
    intake::{Address, Incoming},
    reading::{Celsius, Reading, RESERVED_FIELDS},
    store::{HistoryQuery, Position},
};
use uuid::Uuid;

use crate::{
    auth::BearerAuth,
    error::{ApiError, ApiResult},
    pagination::MAX_PAGE_SIZE,
    responses::{Deleted, Found},
    state::AppState,
    ApiTags,
};

/// A reading as the API shows it: `{"id","sensor_id","client_id","ts","temperature",
/// "received_at"}` plus the extra fields it arrived with.
#[derive(Debug, Clone)]
pub(crate) struct ReadingOut(pub Reading);

impl Type for ReadingOut {
    const IS_REQUIRED: bool = true;
    type RawValueType = Self;
    type RawElementValueType = Self;

    fn name() -> std::borrow::Cow<'static, str> {
        "Reading".into()
    }

    fn schema_ref() -> MetaSchemaRef {
        MetaSchemaRef::Reference(Self::name().into_owned())
    }

    fn register(registry: &mut Registry) {
        registry.create_schema::<Self, _>(Self::name().into_owned(), |registry| {
            Uuid::register(registry);
            DateTime::<Utc>::register(registry);
            f64::register(registry);
            let described = |schema: MetaSchemaRef, description: &'static str| match schema {
                MetaSchemaRef::Inline(s) => MetaSchemaRef::Inline(Box::new(MetaSchema {
                    description: Some(description),
                    ..*s
                })),
                reference => reference,
            };
            MetaSchema {
                description: Some(
                    "A reading. The extra fields it arrived with appear beside these.",
                ),
                required: vec!["id", "sensor_id", "client_id", "ts", "temperature", "received_at"],
                properties: vec![
                    (
                        "id",
                        described(
                            Uuid::schema_ref(),
                            "Reading id (the device's idempotency key, or one derived from its content).",
                        ),
                    ),
                    ("sensor_id", described(Uuid::schema_ref(), "The sensor.")),
                    ("client_id", described(Uuid::schema_ref(), "The sensor's client.")),
                    (
                        "ts",
                        described(
                            DateTime::<Utc>::schema_ref(),
                            "Measurement time (the receive time when the device sent none).",
                        ),
                    ),
                    ("temperature", described(f64::schema_ref(), "Degrees Celsius.")),
                    (
                        "received_at",
                        described(DateTime::<Utc>::schema_ref(), "When termopar received it."),
                    ),
                ],
                additional_properties: Some(Box::new(MetaSchemaRef::Inline(Box::new(
                    MetaSchema::ANY,
                )))),
                ..MetaSchema::new("object")
            }
        });
    }

    fn as_raw_value(&self) -> Option<&Self> {
        Some(self)
    }

    fn raw_element_iter<'a>(&'a self) -> Box<dyn Iterator<Item = &'a Self> + 'a> {
        Box::new(std::iter::once(self))
    }
}

impl ToJSON for ReadingOut {
    fn to_json(&self) -> Option<Value> {
        let r = &self.0;
        let mut m = Map::new();
        for (k, v) in &r.extra {
            if !RESERVED_FIELDS.contains(&k.as_str()) {
                m.insert(k.clone(), v.clone());
            }
        }
        m.insert("id".into(), r.id.to_string().into());
        m.insert("sensor_id".into(), r.sensor_id.to_string().into());
        m.insert("client_id".into(), r.client_id.to_string().into());
        m.insert(
            "ts".into(),
            r.ts.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
                .into(),
        );
        m.insert("temperature".into(), r.temperature.get().into());
        m.insert(
            "received_at".into(),
            r.received_at
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
                .into(),
        );
        Some(Value::Object(m))
    }
}

impl ParseFromJSON for ReadingOut {
    fn parse_from_json(_: Option<Value>) -> ParseResult<Self> {
        Err(ParseError::custom(
            "readings are only produced by the server",
        ))
    }
}

/// A page of readings, newest first.
#[derive(Debug, Object)]
pub(crate) struct ReadingPage {
    /// The readings.
    pub items: Vec<ReadingOut>,
    /// Page number (1 when paging by cursor).
    pub page: u32,
    /// Items per page.
    pub page_size: u32,
    /// Readings of the sensor in all (without `from`/`to` filters only: counting a
    /// window would cost a scan).
    #[oai(skip_serializing_if_is_none)]
    pub total: Option<i64>,
    /// Pass as `cursor` for the next page; absent on the last page. Costs the same at
    /// any depth, unlike `page`.
    #[oai(skip_serializing_if_is_none)]
    pub next_cursor: Option<String>,
}

/// Latest readings of several sensors.
#[derive(Debug, Object)]
pub(crate) struct ReadingList {
    /// One reading per sensor that has any.
    pub items: Vec<ReadingOut>,
}

/// A correction of a reading.
#[derive(Debug, Object)]
pub(crate) struct ReadingPatch {
    /// The corrected temperature, °C (-273.15 to 1000).
    pub temperature: f64,
}

/// A refused reading of an ingest request.
#[derive(Debug, Object, serde::Serialize)]
pub(crate) struct RejectedReading {
    /// Index in the array (absent when the whole body was refused).
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    /// Stable reason (`malformed_json`, `temperature_out_of_range`, ...).
    pub reason: String,
    /// Details.
    pub detail: String,
}

/// What an ingest request did.
#[derive(Debug, Object)]
pub(crate) struct IngestReport {
    /// Readings stored now.
    pub accepted: usize,
    /// Readings that were already stored (a replay).
    pub duplicates: usize,
    /// Readings refused (also kept in the dead-letter store).
    pub rejected: Vec<RejectedReading>,
    /// Ids of the accepted and duplicate readings, in request order.
    pub ids: Vec<Uuid>,
}

#[derive(ApiResponse)]
enum IngestResponse {
    /// Persisted: at least one reading is new.
    #[oai(status = 202)]
    Accepted(Json<IngestReport>),
    /// Nothing new: every reading was stored before (an idempotent replay).
    #[oai(status = 200)]
    Replayed(Json<IngestReport>),
}

/// A JSON reading or array of readings, as devices send it over MQTT.
#[derive(ApiRequest)]
enum IngestBody {
    /// `{"id"?, "ts"?, "temperature", ...}` or an array of those.
    #[oai(content_type = "application/json")]
    Json(Binary<Vec<u8>>),
}

/// The sensor's device secret (what it uses as MQTT password).
#[derive(SecurityScheme)]
#[oai(ty = "api_key", key_name = "X-Device-Secret", key_in = "header")]
pub(crate) struct DeviceSecret(ApiKey);

/// A device secret, or a JWT of an admin or of an operator of the sensor's client.
#[derive(SecurityScheme)]
pub(crate) enum IngestAuth {
    /// An operator's or admin's token.
    Bearer(BearerAuth),
    /// The sensor's own secret.
    Device(DeviceSecret),
}

/// `ts_millis.reading_id`: the position after the last item of a page.
fn encode_cursor(r: &Reading) -> String {
    format!("{}.{}", r.ts.timestamp_millis(), r.id.simple())
}

fn decode_cursor(cursor: &str) -> ApiResult<(DateTime<Utc>, Uuid)> {
    let bad = || ApiError::bad_request("invalid cursor").with_field("cursor");
    let (ts, id) = cursor.split_once('.').ok_or_else(bad)?;
    let ts = ts
        .parse::<i64>()
        .ok()
        .and_then(DateTime::from_timestamp_millis)
        .ok_or_else(bad)?;
    let id = Uuid::parse_str(id).map_err(|_| bad())?;
    Ok((ts, id))
}

/// Readings, history, ingest and corrections.
pub(crate) struct ReadingsApi;

#[OpenApi(tag = "ApiTags::Readings")]
impl ReadingsApi {
    /// Readings of a sensor, newest first.
    ///
    /// Page with `page`/`page_size`, or for deep history with `cursor` (from the previous
    /// page's `next_cursor`), which costs the same at any depth. `from` (inclusive) and
    /// `to` (exclusive) limit the measurement time. `latest=true` returns only the last
    /// reading.
    #[oai(
        path = "/sensors/:id/readings",
        method = "get",
        operation_id = "listReadings"
    )]
    #[allow(clippy::too_many_arguments)]
    #[tracing::instrument(skip_all, fields(id = %id.0))]
    async fn list(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        id: Path<Uuid>,
        /// Page number, from 1 (not with `cursor`).
        #[oai(validator(minimum(value = "1")))]
        page: Query<Option<u32>>,
        /// Items per page (1 to 1000, default 50).
        #[oai(validator(minimum(value = "1"), maximum(value = "1000")))]
        page_size: Query<Option<u32>>,
        /// Continue after this position (a `next_cursor`).
        cursor: Query<Option<String>>,
        /// Only readings measured at or after this time (RFC 3339).
        from: Query<Option<DateTime<Utc>>>,
        /// Only readings measured before this time (RFC 3339).
        to: Query<Option<DateTime<Utc>>>,
        /// Only the latest reading.
        #[oai(default)]
        latest: Query<bool>,
    ) -> ApiResult<Found<ReadingPage>> {
        crate::tenancy::visible_sensor(&state, &auth, id.0).await?;
        let page_size = page_size
            .0
            .unwrap_or(crate::pagination::DEFAULT_PAGE_SIZE)
            .min(MAX_PAGE_SIZE);
        if latest.0 {
            let latest = state.store.latest(SensorId(id.0)).await?;
            let items: Vec<ReadingOut> = latest
                .map(|r| ReadingOut((*r).clone()))
                .into_iter()
                .collect();
            return Ok(Found::Ok(Json(ReadingPage {
                total: Some(items.len() as i64),
                items,
                page: 1,
                page_size: 1,
                next_cursor: None,
            })));
        }
        if cursor.0.is_some() && page.0.is_some_and(|p| p > 1) {
            return Err(ApiError::bad_request("use either `page` or `cursor`").with_field("cursor"));
        }
        let page_number = page.0.unwrap_or(1);
        let position = match cursor.0.as_deref() {
            Some(c) => {
                let (ts, rid) = decode_cursor(c)?;
                Position::After(ts, rid)
            }
            None => Position::Offset((u64::from(page_number) - 1) * u64::from(page_size)),
        };
        let found = state
            .store
            .history(&HistoryQuery {
                sensor: SensorId(id.0),
                from: from.0,
                to: to.0,
                position,
                limit: page_size as usize,
            })
            .await?;
        let next_cursor = found
            .more
            .then(|| found.readings.last().map(encode_cursor))
            .flatten();
        Ok(Found::Ok(Json(ReadingPage {
            items: found.readings.into_iter().map(ReadingOut).collect(),
            page: if cursor.0.is_some() { 1 } else { page_number },
            page_size,
            total: found.total,
            next_cursor,
        })))
    }

    /// The latest reading of a sensor (by measurement time).
    ///
    /// Served from a cache in front of the latest row PostgreSQL keeps per sensor; never
    /// a scan of the readings. 404 `not_found` when the sensor has no reading yet.
    #[oai(
        path = "/sensors/:id/readings/latest",
        method = "get",
        operation_id = "getLatestReading"
    )]
    #[tracing::instrument(skip_all, fields(id = %id.0))]
    async fn latest(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        id: Path<Uuid>,
    ) -> ApiResult<Found<ReadingOut>> {
        crate::tenancy::visible_sensor(&state, &auth, id.0).await?;
        let latest = state
            .store
            .latest(SensorId(id.0))
            .await?
            .ok_or_else(|| ApiError::not_found("reading"))?;
        Ok(Found::Ok(Json(ReadingOut((*latest).clone()))))
    }

    /// The latest reading of every sensor of a client.
    #[oai(
        path = "/clients/:id/readings/latest",
        method = "get",
        operation_id = "listClientLatestReadings"
    )]
    #[tracing::instrument(skip_all, fields(id = %id.0))]
    async fn client_latest(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        id: Path<Uuid>,
    ) -> ApiResult<Found<ReadingList>> {
        crate::clients::visible(&state, &auth, id.0).await?;
        let sensors: Vec<SensorId> = sqlx::query_scalar::<_, Uuid>(
            "SELECT id FROM sensors WHERE client_id = $1 ORDER BY id",
        )
        .bind(id.0)
        .fetch_all(&state.pg)
        .await?
        .into_iter()
        .map(SensorId)
        .collect();
        let items = state
            .store
            .latest_of(&sensors)
            .await?
            .into_iter()
            .map(ReadingOut)
            .collect();
        Ok(Found::Ok(Json(ReadingList { items })))
    }

    /// Send readings over HTTP, for devices that cannot speak MQTT.
    ///
    /// The body is what the device would publish over MQTT: one reading or an array.
    /// Authenticate with the sensor's device secret in `X-Device-Secret`, or a token of
    /// an admin or an operator of its client. Same validation, idempotency and
    /// dead-letter rules as MQTT: 202 once persisted, 200 when every reading was already
    /// stored (a replay), 422 `rejected` (with `details`) when nothing could be accepted.
    #[oai(
        path = "/sensors/:id/readings",
        method = "post",
        operation_id = "ingestReadings"
    )]
    #[tracing::instrument(skip_all, fields(id = %id.0))]
    async fn ingest(
        &self,
        state: Data<&AppState>,
        auth: IngestAuth,
        id: Path<Uuid>,
        body: IngestBody,
    ) -> ApiResult<IngestResponse> {
        let IngestBody::Json(Binary(payload)) = body;
        let entry = state.directory.get(SensorId(id.0)).await?;
        match auth {
            IngestAuth::Bearer(user) => {
                let entry = entry
                    .filter(|e| user.0.sees_client(e.client_id.0))
                    .ok_or_else(|| ApiError::not_found("sensor"))?;
                user.0.require_manager_of(entry.client_id.0)?;
            }
            IngestAuth::Device(secret) => {
                entry
                    .filter(|e| termopar_core::secrets::verify(&secret.0.key, &e.secret_hash))
                    .ok_or_else(|| ApiError::unauthorized("wrong device secret for this sensor"))?;
            }
        }
        let prepared = state
            .intake
            .prepare(&[Incoming {
                address: Address::Sensor(SensorId(id.0)),
                payload: payload.into(),
                received_at: Utc::now(),
            }])
            .await?;
        let report = state.intake.commit(&state.ingest, &prepared).await?;
        let report = IngestReport {
            accepted: report.stored,
            duplicates: report.duplicates,
            rejected: report
                .rejected
                .iter()
                .map(|l| RejectedReading {
                    index: l.index,
                    reason: l.reason.as_str().into(),
                    detail: l.detail.clone(),
                })
                .collect(),
            ids: report.ids,
        };
        if report.accepted > 0 {
            Ok(IngestResponse::Accepted(Json(report)))
        } else if report.duplicates > 0 {
            Ok(IngestResponse::Replayed(Json(report)))
        } else {
            Err(rejected(report.rejected))
        }
    }

    /// A reading.
    #[oai(path = "/readings/:id", method = "get", operation_id = "getReading")]
    #[tracing::instrument(skip_all, fields(id = %id.0))]
    async fn get(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        id: Path<Uuid>,
    ) -> ApiResult<Found<ReadingOut>> {
        let reading = state
            .store
            .reading(id.0)
            .await?
            .filter(|r| auth.0.sees_client(r.client_id.0))
            .ok_or_else(|| ApiError::not_found("reading"))?;
        Ok(Found::Ok(Json(ReadingOut(reading))))
    }

    /// Correct a reading's temperature (admins).
    ///
    /// The first original value is kept as `original_temperature`. Its 15-minute
    /// bucket, the sensor's latest reading and the cached daily averages follow at once.
    #[oai(
        path = "/readings/:id",
        method = "patch",
        operation_id = "correctReading"
    )]
    #[tracing::instrument(skip_all, fields(id = %id.0))]
    async fn correct(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        id: Path<Uuid>,
        body: Json<ReadingPatch>,
    ) -> ApiResult<Found<ReadingOut>> {
        auth.0.require_admin()?;
        let temperature = Celsius::try_from(body.temperature)
            .map_err(|e| ApiError::validation("temperature", e))?;
        let reading = state
            .store
            .correct(id.0, temperature)
            .await?
            .ok_or_else(|| ApiError::not_found("reading"))?;
        // The alarms of its sensor follow the new value.
        state.alarms.reconsider(&reading).await?;
        Ok(Found::Ok(Json(ReadingOut(reading))))
    }

    /// Delete a reading (admins). Its bucket and the sensor's latest reading follow.
    #[oai(
        path = "/readings/:id",
        method = "delete",
        operation_id = "deleteReading"
    )]
    #[tracing::instrument(skip_all, fields(id = %id.0))]
    async fn delete(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        id: Path<Uuid>,
    ) -> ApiResult<Deleted> {
        auth.0.require_admin()?;
        let deleted = state
            .store
            .delete(id.0)
            .await?
            .ok_or_else(|| ApiError::not_found("reading"))?;
        // The alarms of its sensor follow its absence.
        state.alarms.reconsider(&deleted).await?;
        Ok(Deleted::Deleted)
    }
}

fn rejected(details: Vec<RejectedReading>) -> ApiError {
    let summary = details
        .iter()
        .map(|d| d.reason.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    ApiError::new(
        termopar_web::ErrorCode::Rejected,
        format!("no reading accepted: {summary}"),
    )
    .with_details(serde_json::to_value(details).expect("serializable"))
}
