//! `/dead-letters`: messages and readings ingest refused, with the reason, for operators
//! to see what their devices send wrong.

use chrono::{DateTime, Utc};
use poem::web::Data;
use poem_openapi::{
    param::{Path, Query},
    payload::Json,
    Object, OpenApi,
};
use termopar_core::{
    ids::{ClientId, SensorId},
    store::{DeadLetterQuery, StoredDeadLetter},
};
use uuid::Uuid;

use crate::{
    auth::BearerAuth,
    error::{ApiError, ApiResult},
    pagination::PageParams,
    responses::Found,
    state::AppState,
    ApiTags,
};

/// A refused message or reading.
#[derive(Debug, Object)]
pub(crate) struct DeadLetterOut {
    /// Id.
    pub id: Uuid,
    /// When it was received.
    pub received_at: DateTime<Utc>,
    /// `mqtt` or `http`.
    pub source: String,
    /// Why (`malformed_json`, `unknown_sensor`, `temperature_out_of_range`, ...).
    pub reason: String,
    /// Details.
    pub detail: String,
    /// The sensor, when it is known.
    #[oai(skip_serializing_if_is_none)]
    pub sensor_id: Option<Uuid>,
    /// Its client, when the sensor is known.
    #[oai(skip_serializing_if_is_none)]
    pub client_id: Option<Uuid>,
    /// The MQTT topic, when it came over MQTT.
    #[oai(skip_serializing_if_is_none)]
    pub topic: Option<String>,
    /// The refused element's index, when one element of an array was refused.
    #[oai(skip_serializing_if_is_none)]
    pub index: Option<i32>,
    /// Size of the whole payload, in bytes (64 KiB of it are kept).
    pub payload_size: i32,
    /// The payload as kept, when it is UTF-8 text (one dead letter only).
    #[oai(skip_serializing_if_is_none)]
    pub payload: Option<String>,
    /// The payload as kept, in hex, when it is not UTF-8 (one dead letter only).
    #[oai(skip_serializing_if_is_none)]
    pub payload_hex: Option<String>,
}

impl From<StoredDeadLetter> for DeadLetterOut {
    fn from(l: StoredDeadLetter) -> Self {
        let (payload, payload_hex) = match l.payload {
            None => (None, None),
            Some(bytes) => match String::from_utf8(bytes) {
                Ok(text) => (Some(text), None),
                Err(e) => (None, Some(hex::encode(e.into_bytes()))),
            },
        };
        Self {
            id: l.id,
            received_at: l.received_at,
            source: l.source,
            reason: l.reason,
            detail: l.detail,
            sensor_id: l.sensor_id,
            client_id: l.client_id,
            topic: l.topic,
            index: l.element,
            payload_size: l.payload_size,
            payload,
            payload_hex,
        }
    }
}

/// A page of dead letters, newest first (no total: counting would cost a scan).
#[derive(Debug, Object)]
pub(crate) struct DeadLetterPage {
    /// The dead letters.
    pub items: Vec<DeadLetterOut>,
    /// Page number.
    pub page: u32,
    /// Items per page.
    pub page_size: u32,
}

/// Refused ingest.
pub(crate) struct DeadLettersApi;

#[OpenApi(prefix_path = "/dead-letters", tag = "ApiTags::Readings")]
impl DeadLettersApi {
    /// Dead letters, newest first.
    ///
    /// Operators and viewers see those of their client's sensors; admins also those of
    /// unknown sensors and unreadable topics.
    #[oai(path = "/", method = "get", operation_id = "listDeadLetters")]
    #[tracing::instrument(skip_all)]
    async fn list(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        /// Only those of this sensor.
        sensor_id: Query<Option<Uuid>>,
        /// Only those refused for this reason.
        reason: Query<Option<String>>,
        /// Page number, from 1.
        #[oai(validator(minimum(value = "1")))]
        page: Query<Option<u32>>,
        /// Items per page (1 to 1000, default 50).
        #[oai(validator(minimum(value = "1"), maximum(value = "1000")))]
        page_size: Query<Option<u32>>,
    ) -> ApiResult<Found<DeadLetterPage>> {
        let params = PageParams::new(page.0, page_size.0);
        let items = state
            .store
            .dead_letters(&DeadLetterQuery {
                client: auth.0.tenant_scope().map(ClientId),
                sensor: sensor_id.0.map(SensorId),
                reason: reason.0,
                offset: params.offset(),
                limit: params.limit(),
            })
            .await?;
        Ok(Found::Ok(Json(DeadLetterPage {
            items: items.into_iter().map(DeadLetterOut::from).collect(),
            page: params.page,
            page_size: params.page_size,
        })))
    }

    /// A dead letter, with its payload.
    #[oai(path = "/:id", method = "get", operation_id = "getDeadLetter")]
    #[tracing::instrument(skip_all, fields(id = %id.0))]
    async fn get(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        id: Path<Uuid>,
    ) -> ApiResult<Found<DeadLetterOut>> {
        let letter = state
            .store
            .dead_letter_by_id(id.0)
            .await?
            .filter(|l| auth.0.is_admin() || l.client_id.is_some_and(|c| auth.0.sees_client(c)))
            .ok_or_else(|| ApiError::not_found("dead letter"))?;
        Ok(Found::Ok(Json(letter.into())))
    }
}
