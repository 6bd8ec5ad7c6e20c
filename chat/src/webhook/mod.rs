//! The chat webhook processor: conversation and message events from a WhatsApp
//! customer-service system (`POST /webhook/`).
//!
//! Rules: a conversation starts OPEN; CLOSE_CONVERSATION closes it; a message needs an
//! existing conversation and is refused once the conversation is closed (unless it was
//! sent before the close, per its timestamp: a late delivery of an earlier message);
//! ids are unique. The same event delivered again gets the same answer; a different
//! event reusing an id is a 409. Database constraints and row locks decide races, never
//! check-then-insert: a message and a close of the same conversation serialize on the
//! conversation row.
//!
//! Every delivery is also kept raw with its answer: committed to `webhook_outbox` with
//! the events it applies ([`writer`]), then moved to MongoDB (`webhook_events`) by the
//! [`relay`].

mod body;
pub mod relay;
pub mod writer;

use std::sync::LazyLock;

use body::{Loose, Shaped};
use chrono::{
    format::{Item, Parsed, StrftimeItems},
    DateTime, Datelike, Utc,
};
use hmac::{Hmac, Mac};
use poem::http::HeaderMap;
use serde_json::{json, Value};
use sha2::Sha256;
use uuid::Uuid;

use termopar_web::{ApiError, ErrorCode};

use crate::Chat;

/// Collection of raw deliveries.
pub const EVENTS: &str = "webhook_events";
/// Longest message content accepted, in bytes.
pub(crate) const MAX_CONTENT_BYTES: usize = 64 * 1024;
/// Largest body kept raw.
pub const MAX_RAW_BYTES: usize = 256 * 1024;

/// Who sent a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Sent by the company.
    Sent,
    /// Received from the customer.
    Received,
}

impl Direction {
    /// As sent: `SENT` or `RECEIVED`.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Sent => "SENT",
            Direction::Received => "RECEIVED",
        }
    }
}

/// A webhook event.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// `NEW_CONVERSATION`.
    NewConversation {
        /// Conversation id.
        id: Uuid,
        /// Event time.
        timestamp: DateTime<Utc>,
    },
    /// `NEW_MESSAGE`.
    NewMessage {
        /// Message id.
        id: Uuid,
        /// Its conversation.
        conversation_id: Uuid,
        /// SENT or RECEIVED.
        direction: Direction,
        /// Text.
        content: String,
        /// Event time.
        timestamp: DateTime<Utc>,
    },
    /// `CLOSE_CONVERSATION`.
    CloseConversation {
        /// Conversation id.
        id: Uuid,
        /// Event time.
        timestamp: DateTime<Utc>,
    },
}

impl Event {
    /// The event type as sent.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::NewConversation { .. } => "NEW_CONVERSATION",
            Event::NewMessage { .. } => "NEW_MESSAGE",
            Event::CloseConversation { .. } => "CLOSE_CONVERSATION",
        }
    }

    /// The id the event is about.
    pub fn id(&self) -> Uuid {
        match self {
            Event::NewConversation { id, .. }
            | Event::NewMessage { id, .. }
            | Event::CloseConversation { id, .. } => *id,
        }
    }

    /// The JSON the sender posts (what the `seed` command sends).
    pub fn to_json(&self) -> Value {
        let ts = |t: &DateTime<Utc>| t.naive_utc().format("%Y-%m-%dT%H:%M:%S%.6f").to_string();
        match self {
            Event::NewConversation { id, timestamp }
            | Event::CloseConversation { id, timestamp } => {
                json!({ "type": self.kind(), "timestamp": ts(timestamp), "data": { "id": id } })
            }
            Event::NewMessage {
                id,
                conversation_id,
                direction,
                content,
                timestamp,
            } => json!({
                "type": self.kind(),
                "timestamp": ts(timestamp),
                "data": {
                    "id": id, "direction": direction.as_str(), "content": content,
                    "conversation_id": conversation_id,
                },
            }),
        }
    }
}

/// What applying an event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Applied now.
    Processed,
    /// The same event was applied before; nothing changed.
    Duplicate,
}

fn invalid(field: &str, message: impl Into<String>) -> ApiError {
    ApiError::validation(field, message)
}

/// Event times: RFC 3339, or without offset (as in the sender's examples) meaning UTC,
/// in the years 1 to 9999 (chrono reads signed years far beyond what PostgreSQL stores).
/// Kept to the microsecond, PostgreSQL's precision, so a redelivery compares equal.
fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    /// `%Y-%m-%dT%H:%M:%S%.f`, read once.
    static WITHOUT_OFFSET: LazyLock<Vec<Item<'static>>> = LazyLock::new(|| {
        StrftimeItems::new("%Y-%m-%dT%H:%M:%S%.f")
            .parse()
            .expect("a valid format")
    });
    let without_offset = || {
        let mut parsed = Parsed::new();
        chrono::format::parse(&mut parsed, s, WITHOUT_OFFSET.iter()).ok()?;
        parsed.to_naive_datetime_with_offset(0).ok()
    };
    let t = match without_offset() {
        Some(t) => t.and_utc(),
        None => DateTime::parse_from_rfc3339(s).ok()?.with_timezone(&Utc),
    };
    if !(1..=9999).contains(&t.year()) {
        return None;
    }
    DateTime::from_timestamp_micros(t.timestamp_micros())
}

/// The string in `value`, the field `name` of an event: 422 when it is missing or not a
/// string.
fn string<'a>(value: &'a Option<Loose<'a>>, name: &str) -> Result<&'a str, ApiError> {
    match value {
        Some(Loose::Str(s)) => Ok(s),
        Some(Loose::Other) => Err(invalid(name, format!("{name} must be a string"))),
        None => Err(invalid(name, format!("{name} is required"))),
    }
}

fn uuid_field(value: &Option<Loose<'_>>, name: &str) -> Result<Uuid, ApiError> {
    match value {
        Some(Loose::Str(s)) => {
            Uuid::parse_str(s).map_err(|_| invalid(name, format!("{name} is not a UUID")))
        }
        Some(Loose::Other) => Err(invalid(name, format!("{name} must be a UUID string"))),
        None => Err(invalid(name, format!("{name} is required"))),
    }
}

/// Parses a delivery. Not JSON is a 400; JSON of the wrong shape a 422 naming the field.
pub fn parse(body: &[u8]) -> Result<Event, ApiError> {
    let event =
        body::read(body).map_err(|e| ApiError::bad_request(format!("body is not JSON: {e}")))?;
    let Shaped::Object(event) = event else {
        return Err(invalid("body", "the event must be a JSON object"));
    };
    let kind = string(&event.kind, "type")?;
    let timestamp = string(&event.timestamp, "timestamp")?;
    let timestamp = parse_time(timestamp).ok_or_else(|| {
        invalid(
            "timestamp",
            format!("timestamp {timestamp:?} is not an ISO 8601 date-time in the years 1 to 9999"),
        )
    })?;
    let data = match &event.data {
        Some(Shaped::Object(d)) => d,
        Some(Shaped::Other) => return Err(invalid("data", "data must be an object")),
        None => return Err(invalid("data", "data is required")),
    };
    match kind {
        "NEW_CONVERSATION" => Ok(Event::NewConversation { id: uuid_field(&data.id, "data.id")?, timestamp }),
        "CLOSE_CONVERSATION" => Ok(Event::CloseConversation { id: uuid_field(&data.id, "data.id")?, timestamp }),
        "NEW_MESSAGE" => {
            let direction = match &data.direction {
                Some(Loose::Str(s)) if s == "SENT" => Direction::Sent,
                Some(Loose::Str(s)) if s == "RECEIVED" => Direction::Received,
                _ => return Err(invalid("data.direction", "data.direction must be SENT or RECEIVED")),
            };
            let content = string(&data.content, "data.content")?;
            if content.len() > MAX_CONTENT_BYTES {
                return Err(invalid(
                    "data.content",
                    format!("data.content is longer than {MAX_CONTENT_BYTES} bytes"),
                ));
            }
            if content.contains('\0') {
                return Err(invalid("data.content", "data.content must not contain NUL characters"));
            }
            Ok(Event::NewMessage {
                id: uuid_field(&data.id, "data.id")?,
                conversation_id: uuid_field(&data.conversation_id, "data.conversation_id")?,
                direction,
                content: content.to_owned(),
                timestamp,
            })
        }
        other => Err(ApiError::new(
            ErrorCode::UnknownEventType,
            format!("unknown event type {other:?}: expected NEW_CONVERSATION, NEW_MESSAGE or CLOSE_CONVERSATION"),
        )
        .with_field("type")),
    }
}

fn conversation_not_found(id: Uuid) -> ApiError {
    ApiError::new(
        ErrorCode::ConversationNotFound,
        format!("conversation {id} does not exist (yet): retry after its NEW_CONVERSATION"),
    )
}

/// Checks `X-Signature: sha256=<hex>` (HMAC-SHA256 of the raw body).
fn signature_ok(secret: &str, header: Option<&str>, body: &[u8]) -> bool {
    let Some(hex_sig) = header.and_then(|h| h.trim().strip_prefix("sha256=")) else {
        return false;
    };
    let Ok(expected) = hex::decode(hex_sig) else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(body);
    mac.verify_slice(&expected).is_ok()
}

/// The signature header value for `body` (for senders and tests).
pub fn sign(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// The answer to an accepted delivery.
#[derive(Debug, poem_openapi::Object)]
pub struct WebhookAck {
    /// `processed`, or `duplicate` for a redelivery of an event already applied.
    pub status: String,
    /// The event type.
    #[oai(rename = "type")]
    pub kind: String,
    /// The conversation or message id.
    pub id: Uuid,
}

/// A delivery as received, kept raw with its answer.
#[derive(Debug, Clone)]
pub struct RawRecord {
    /// When it arrived.
    pub received_at: DateTime<Utc>,
    /// `Content-Type` header.
    pub content_type: Option<String>,
    /// `User-Agent` header.
    pub user_agent: Option<String>,
    /// `X-Request-Id` header.
    pub request_id: Option<String>,
    /// Whether an `X-Signature` header came with it.
    pub signed: bool,
    /// The body as received, up to [`MAX_RAW_BYTES`].
    pub body: Vec<u8>,
    /// Size of the whole body.
    pub body_size: i32,
}

impl RawRecord {
    /// The record of a delivery arriving now.
    pub fn new(headers: &HeaderMap, body: &[u8]) -> Self {
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        Self {
            received_at: Utc::now(),
            content_type: header("content-type"),
            user_agent: header("user-agent"),
            request_id: header("x-request-id"),
            signed: headers.contains_key("x-signature"),
            body: body[..body.len().min(MAX_RAW_BYTES)].to_vec(),
            body_size: i32::try_from(body.len()).unwrap_or(i32::MAX),
        }
    }
}

/// Handles one delivery end to end: signature, parsing, then applying and recording it
/// raw (group-committed by [`writer::EventWriter`]).
#[tracing::instrument(skip_all, fields(bytes = body.len()))]
pub async fn deliver(
    chat: &Chat,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<WebhookAck, ApiError> {
    let signature = headers.get("x-signature").and_then(|v| v.to_str().ok());
    let event = match &chat.0.secret {
        Some(secret) if !signature_ok(secret, signature, body) => Err(ApiError::new(
            ErrorCode::InvalidSignature,
            "missing or wrong X-Signature (sha256=<hex HMAC-SHA256 of the body>)",
        )),
        _ => parse(body),
    };
    let about = event.as_ref().ok().map(|e| (e.kind(), e.id()));
    let delivery = writer::Delivery::new(&RawRecord::new(headers, body), event);
    let answer = chat.0.writer.submit(delivery).await;
    let (status, _) = writer::recorded(&answer);
    metrics::counter!("webhook_deliveries_total",
        "type" => about.map_or("invalid", |(kind, _)| kind), "status" => status.as_str().to_owned())
    .increment(1);
    let outcome = answer?;
    let (kind, id) = about.expect("an applied delivery carries an event");
    Ok(WebhookAck {
        status: match outcome {
            Outcome::Processed => "processed".into(),
            Outcome::Duplicate => "duplicate".into(),
        },
        kind: kind.into(),
        id,
    })
}

/// Fills demo data: `conversations` conversations of `messages` messages each (every
/// other one then closed), posted through [`deliver`], the webhook's own path. Returns
/// the events sent.
pub async fn seed(
    chat: &Chat,
    conversations: usize,
    messages: usize,
) -> Result<Vec<Event>, ApiError> {
    const LINES: &[&str] = &[
        "Olá, tudo bem?",
        "Tudo ótimo e você?",
        "Meu pedido ainda não chegou.",
        "Vou verificar para você, um momento.",
        "O código de rastreio é BR123456789.",
        "Obrigado pela paciência!",
        "Posso ajudar em algo mais?",
        "Não, era só isso. Obrigado!",
    ];
    let mut events = Vec::new();
    let start = Utc::now() - chrono::Duration::hours(conversations as i64 + 1);
    for c in 0..conversations {
        let id = Uuid::new_v4();
        let mut t = start + chrono::Duration::hours(c as i64);
        events.push(Event::NewConversation { id, timestamp: t });
        for m in 0..messages {
            t += chrono::Duration::seconds(1 + (m as i64 * 7) % 40);
            events.push(Event::NewMessage {
                id: Uuid::new_v4(),
                conversation_id: id,
                direction: if m % 2 == 0 {
                    Direction::Received
                } else {
                    Direction::Sent
                },
                content: LINES[m % LINES.len()].to_owned(),
                timestamp: t,
            });
        }
        if c % 2 == 1 {
            events.push(Event::CloseConversation {
                id,
                timestamp: t + chrono::Duration::minutes(1),
            });
        }
    }
    let headers = HeaderMap::new();
    for event in &events {
        let body = serde_json::to_vec(&event.to_json()).expect("serializable");
        let mut headers = headers.clone();
        if let Some(secret) = &chat.0.secret {
            headers.insert("x-signature", sign(secret, &body).parse().expect("ASCII"));
        }
        deliver(chat, &headers, &body).await?;
    }
    Ok(events)
}
