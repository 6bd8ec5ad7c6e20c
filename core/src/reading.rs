//! The reading message schema and its validation, shared by MQTT and HTTP ingest.
//!
//! A message is a JSON object or an array of objects:
//! `{"id": "<uuid, optional>", "ts": "<RFC 3339, optional>", "temperature": 21.7, ...}`.
//! Whatever else an object carries is kept as `extra`.

use chrono::{DateTime, Duration, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::ids::{ClientId, SensorId};

/// Lowest temperature accepted: absolute zero.
pub const MIN_CELSIUS: f64 = -273.15;
/// Highest temperature accepted.
pub const MAX_CELSIUS: f64 = 1000.0;
/// Field names the schema owns; they never appear in `extra`.
pub const RESERVED_FIELDS: &[&str] = &[
    "id",
    "ts",
    "temperature",
    "sensor_id",
    "client_id",
    "received_at",
];
/// Namespace of the ids derived for readings that arrive without one.
const READING_ID_NAMESPACE: Uuid = Uuid::from_u128(0x6f0a_55c1_8d8e_4c0c_9b3f_2a7e_7c1d_5e21);
/// Deepest nesting accepted inside `extra` (MongoDB allows 100; nobody needs more).
const MAX_EXTRA_DEPTH: usize = 16;

/// A temperature in degrees Celsius, finite and within [`MIN_CELSIUS`]..=[`MAX_CELSIUS`].
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Serialize, Deserialize)]
#[serde(try_from = "f64", into = "f64")]
pub struct Celsius(f64);

impl Celsius {
    /// The value.
    pub fn get(self) -> f64 {
        self.0
    }

    /// A value read back from a store, which checked it on its way in.
    pub(crate) fn from_store(value: f64) -> Self {
        Self(value)
    }
}

impl TryFrom<f64> for Celsius {
    type Error = String;
    fn try_from(value: f64) -> Result<Self, String> {
        if !value.is_finite() {
            Err(format!("temperature {value} is not a finite number"))
        } else if !(MIN_CELSIUS..=MAX_CELSIUS).contains(&value) {
            Err(format!(
                "temperature {value} is outside {MIN_CELSIUS}..={MAX_CELSIUS} °C"
            ))
        } else {
            Ok(Self(value))
        }
    }
}

impl From<Celsius> for f64 {
    fn from(c: Celsius) -> f64 {
        c.0
    }
}

/// One reading as a device sends it (what the simulator serializes).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReadingPayload {
    /// Idempotency key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<Uuid>,
    /// Measurement time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ts: Option<DateTime<Utc>>,
    /// Degrees Celsius.
    pub temperature: f64,
    /// Anything else.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A validated reading: what ingest stores and what the store reads back.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    /// The payload's id, or one derived from its content (see [`parse_message`]).
    pub id: Uuid,
    /// The sensor.
    pub sensor_id: SensorId,
    /// The sensor's client.
    pub client_id: ClientId,
    /// Measurement time (the receive time when the device sent none), in milliseconds.
    pub ts: DateTime<Utc>,
    /// Temperature.
    pub temperature: Celsius,
    /// When termopar received it, in milliseconds.
    pub received_at: DateTime<Utc>,
    /// Fields beyond the schema, kept as they came.
    pub extra: Map<String, Value>,
}

/// Why a message or a reading was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    /// The topic is not a readings topic.
    InvalidTopic,
    /// No sensor has the topic's id.
    UnknownSensor,
    /// The sensor belongs to another client than the topic names.
    ClientMismatch,
    /// The payload is larger than accepted.
    PayloadTooLarge,
    /// The payload is not JSON.
    MalformedJson,
    /// JSON, but neither an object nor an array of objects.
    InvalidShape,
    /// An empty array.
    EmptyBatch,
    /// An array with more readings than accepted.
    BatchTooLarge,
    /// No `temperature`.
    MissingTemperature,
    /// `temperature` is not a number.
    InvalidTemperature,
    /// `temperature` is outside -273.15..=1000.
    TemperatureOutOfRange,
    /// `id` is not a UUID string.
    InvalidId,
    /// `ts` is not an RFC 3339 string.
    InvalidTimestamp,
    /// `ts` is before 2000 or too far in the future.
    TimestampOutOfRange,
    /// An extra field cannot be stored (a name with `$` or `.`, or nested too deep).
    InvalidExtra,
    /// The store refused the document.
    StoreRejected,
}

impl RejectReason {
    /// The snake_case name (metrics label, dead-letter field, HTTP error detail).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidTopic => "invalid_topic",
            Self::UnknownSensor => "unknown_sensor",
            Self::ClientMismatch => "client_mismatch",
            Self::PayloadTooLarge => "payload_too_large",
            Self::MalformedJson => "malformed_json",
            Self::InvalidShape => "invalid_shape",
            Self::EmptyBatch => "empty_batch",
            Self::BatchTooLarge => "batch_too_large",
            Self::MissingTemperature => "missing_temperature",
            Self::InvalidTemperature => "invalid_temperature",
            Self::TemperatureOutOfRange => "temperature_out_of_range",
            Self::InvalidId => "invalid_id",
            Self::InvalidTimestamp => "invalid_timestamp",
            Self::TimestampOutOfRange => "timestamp_out_of_range",
            Self::InvalidExtra => "invalid_extra",
            Self::StoreRejected => "store_rejected",
        }
    }
}

/// A refusal, with what was wrong and, for one element of an array, which.
#[derive(Debug, Clone, PartialEq)]
pub struct Reject {
    /// The reason.
    pub reason: RejectReason,
    /// Details for people.
    pub detail: String,
    /// Index of the refused element when the message is an array.
    pub index: Option<usize>,
}

impl Reject {
    /// A refusal of the whole message.
    pub fn message(reason: RejectReason, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
            index: None,
        }
    }
}

/// Limits applied while parsing.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest payload, in bytes.
    pub max_payload_bytes: usize,
    /// Most readings in one array.
    pub max_batch: usize,
    /// How far ahead of the receive time a `ts` may be (device clocks drift).
    pub max_future_skew: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_payload_bytes: 256 * 1024,
            max_batch: 10_000,
            max_future_skew: Duration::minutes(5),
        }
    }
}

/// Earliest `ts` accepted.
fn min_ts() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2000, 1, 1, 0, 0, 0).unwrap()
}

/// Truncates to milliseconds, the precision both stores keep.
pub fn to_millis(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(t.timestamp_millis()).expect("a valid time stays valid")
}

/// The result of parsing a message: the good readings and the refused elements.
#[derive(Debug, Default)]
pub struct Parsed {
    /// Valid readings.
    pub readings: Vec<Reading>,
    /// Refused elements (each with its index).
    pub rejects: Vec<Reject>,
}

/// Parses and validates a message for `sensor` of `client`, received at `received_at`.
///
/// A message-level problem (not JSON, wrong shape, too large) refuses the whole message;
/// a problem in one element of an array refuses that element only.
///
/// Reading ids: the payload's `id`, or else a UUIDv5 of the sensor and the element's
/// canonical JSON, so a redelivered message gets the same ids and is stored once. An
/// element with neither `id` nor `ts` gets the receive time as `ts` and that time in its
/// id too: without a key, a redelivery cannot be told from a new reading with the same
/// value, and dropping real readings would be worse than the rare double count.
pub fn parse_message(
    payload: &[u8],
    sensor: SensorId,
    client: ClientId,
    received_at: DateTime<Utc>,
    limits: &Limits,
) -> Result<Parsed, Reject> {
    if payload.len() > limits.max_payload_bytes {
        return Err(Reject::message(
            RejectReason::PayloadTooLarge,
            format!(
                "payload of {} bytes exceeds {}",
                payload.len(),
                limits.max_payload_bytes
            ),
        ));
    }
    let value: Value = serde_json::from_slice(payload)
        .map_err(|e| Reject::message(RejectReason::MalformedJson, e.to_string()))?;
    let received_at = to_millis(received_at);
    let mut parsed = Parsed::default();
    match value {
        Value::Object(object) => match parse_element(object, sensor, client, received_at, limits) {
            Ok(r) => parsed.readings.push(r),
            Err(reject) => return Err(reject),
        },
        Value::Array(items) => {
            if items.is_empty() {
                return Err(Reject::message(RejectReason::EmptyBatch, "empty array"));
            }
            if items.len() > limits.max_batch {
                return Err(Reject::message(
                    RejectReason::BatchTooLarge,
                    format!("{} readings exceed {}", items.len(), limits.max_batch),
                ));
            }
            for (index, item) in items.into_iter().enumerate() {
                let result = match item {
                    Value::Object(object) => {
                        parse_element(object, sensor, client, received_at, limits)
                    }
                    other => Err(Reject::message(
                        RejectReason::InvalidShape,
                        format!("element is {}, not an object", kind(&other)),
                    )),
                };
                match result {
                    Ok(r) => parsed.readings.push(r),
                    Err(mut reject) => {
                        reject.index = Some(index);
                        parsed.rejects.push(reject);
                    }
                }
            }
        }
        other => {
            return Err(Reject::message(
                RejectReason::InvalidShape,
                format!("payload is {}, not an object or an array", kind(&other)),
            ))
        }
    }
    Ok(parsed)
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn parse_element(
    mut object: Map<String, Value>,
    sensor: SensorId,
    client: ClientId,
    received_at: DateTime<Utc>,
    limits: &Limits,
) -> Result<Reading, Reject> {
    let mut canonical = Vec::with_capacity(64);
    write_canonical(&Value::Object(object.clone()), &mut canonical);
    let reject = |reason, detail: String| Reject::message(reason, detail);

    let temperature = match object.remove("temperature") {
        None | Some(Value::Null) => {
            return Err(reject(
                RejectReason::MissingTemperature,
                "no temperature".into(),
            ))
        }
        Some(Value::Number(n)) => n.as_f64().ok_or_else(|| {
            reject(
                RejectReason::InvalidTemperature,
                format!("{n} is not representable"),
            )
        })?,
        Some(other) => {
            return Err(reject(
                RejectReason::InvalidTemperature,
                format!("temperature is {}, not a number", kind(&other)),
            ))
        }
    };
    let temperature = Celsius::try_from(temperature)
        .map_err(|e| reject(RejectReason::TemperatureOutOfRange, e))?;

    let id = match object.remove("id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(
            Uuid::parse_str(&s)
                .map_err(|_| reject(RejectReason::InvalidId, format!("id {s:?} is not a UUID")))?,
        ),
        Some(other) => {
            return Err(reject(
                RejectReason::InvalidId,
                format!("id is {}, not a UUID string", kind(&other)),
            ))
        }
    };

    let ts = match object.remove("ts") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => {
            let ts = DateTime::parse_from_rfc3339(&s)
                .map_err(|e| reject(RejectReason::InvalidTimestamp, format!("ts {s:?}: {e}")))?
                .with_timezone(&Utc);
            if ts < min_ts() || ts > received_at + limits.max_future_skew {
                return Err(reject(
                    RejectReason::TimestampOutOfRange,
                    format!(
                        "ts {s} is before 2000 or more than {} s after receipt",
                        limits.max_future_skew.num_seconds()
                    ),
                ));
            }
            Some(to_millis(ts))
        }
        Some(other) => {
            return Err(reject(
                RejectReason::InvalidTimestamp,
                format!("ts is {}, not an RFC 3339 string", kind(&other)),
            ))
        }
    };

    for reserved in RESERVED_FIELDS {
        object.remove(*reserved);
    }
    check_extra(&Value::Object(object.clone()), 0)
        .map_err(|e| reject(RejectReason::InvalidExtra, e))?;

    let id = id.unwrap_or_else(|| {
        let mut name = Vec::with_capacity(16 + canonical.len() + 8);
        name.extend_from_slice(sensor.0.as_bytes());
        name.extend_from_slice(&canonical);
        if ts.is_none() {
            name.extend_from_slice(&received_at.timestamp_millis().to_be_bytes());
        }
        Uuid::new_v5(&READING_ID_NAMESPACE, &name)
    });
    Ok(Reading {
        id,
        sensor_id: sensor,
        client_id: client,
        ts: ts.unwrap_or(received_at),
        temperature,
        received_at,
        extra: object,
    })
}

/// JSON with object keys sorted at every level: the same content gives the same bytes
/// whatever order the device wrote the keys in (serde_json may preserve input order).
fn write_canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push(b'{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                serde_json::to_writer(&mut *out, key).expect("a string serializes");
                out.push(b':');
                write_canonical(&map[key], out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        scalar => serde_json::to_writer(&mut *out, scalar).expect("a scalar serializes"),
    }
}

/// Field names MongoDB cannot store, and nesting beyond [`MAX_EXTRA_DEPTH`].
fn check_extra(value: &Value, depth: usize) -> Result<(), String> {
    if depth > MAX_EXTRA_DEPTH {
        return Err(format!("extra fields nested deeper than {MAX_EXTRA_DEPTH}"));
    }
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                if key.is_empty() || key.starts_with('$') || key.contains('.') || key.contains('\0')
                {
                    return Err(format!("field name {key:?} cannot be stored"));
                }
                check_extra(v, depth + 1)?;
            }
        }
        Value::Array(items) => {
            for v in items {
                check_extra(v, depth + 1)?;
            }
        }
        // BSON has 64-bit signed integers and doubles: a larger unsigned integer has no
        // faithful representation.
        Value::Number(n) if n.as_i64().is_none() && !n.is_f64() => {
            return Err(format!("number {n} cannot be stored"));
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ids() -> (SensorId, ClientId) {
        (SensorId(Uuid::new_v4()), ClientId(Uuid::new_v4()))
    }

    fn parse(payload: &[u8]) -> Result<Parsed, Reject> {
        let (s, c) = ids();
        parse_message(payload, s, c, Utc::now(), &Limits::default())
    }

    #[test]
    fn an_object_with_every_field_parses_and_keeps_extras() {
        let (s, c) = ids();
        let id = Uuid::new_v4();
        let payload = json!({"id": id, "ts": "2026-01-31T10:00:00.123456Z", "temperature": 21.7, "humidity": 40, "sensor_id": "x"});
        let parsed = parse_message(
            payload.to_string().as_bytes(),
            s,
            c,
            Utc::now(),
            &Limits::default(),
        )
        .unwrap();
        let r = &parsed.readings[0];
        assert_eq!(r.id, id);
        assert_eq!(r.temperature.get(), 21.7);
        assert_eq!(r.ts.to_rfc3339(), "2026-01-31T10:00:00.123+00:00");
        assert_eq!(
            r.extra,
            json!({"humidity": 40}).as_object().unwrap().clone()
        );
    }

    #[test]
    fn derived_ids_are_stable_for_the_same_content_and_differ_otherwise() {
        let (s, c) = ids();
        let now = Utc::now();
        let a = br#"{"ts": "2026-01-31T10:00:00Z", "temperature": 1.5, "x": 1}"#;
        let reordered = br#"{"x": 1, "temperature": 1.5, "ts": "2026-01-31T10:00:00Z"}"#;
        let other = br#"{"ts": "2026-01-31T10:00:01Z", "temperature": 1.5, "x": 1}"#;
        let id = |p: &[u8], at| {
            parse_message(p, s, c, at, &Limits::default())
                .unwrap()
                .readings[0]
                .id
        };
        assert_eq!(
            id(a, now),
            id(a, now + Duration::seconds(30)),
            "redelivery later"
        );
        assert_eq!(id(a, now), id(reordered, now), "key order does not matter");
        assert_ne!(id(a, now), id(other, now));
        // Without id or ts the receive time is the only key.
        let bare = br#"{"temperature": 1.5}"#;
        assert_ne!(id(bare, now), id(bare, now + Duration::seconds(1)));
    }

    #[test]
    fn every_bad_element_is_refused_with_its_reason_and_index() {
        let future = (Utc::now() + Duration::hours(1)).to_rfc3339();
        let payload = json!([
            {"temperature": 20.0},
            {"temperature": "20"},
            {"temperature": 1000.5},
            {"temperature": -300},
            {"humidity": 1},
            {"temperature": 1, "id": "nope"},
            {"temperature": 1, "id": 5},
            {"temperature": 1, "ts": "yesterday"},
            {"temperature": 1, "ts": "1999-12-31T23:59:59Z"},
            {"temperature": 1, "ts": future},
            {"temperature": 1, "$where": 1},
            {"temperature": 1, "a.b": 1},
            7,
            {"temperature": 1e300},
        ]);
        let parsed = parse(payload.to_string().as_bytes()).unwrap();
        assert_eq!(parsed.readings.len(), 1);
        let reasons: Vec<_> = parsed
            .rejects
            .iter()
            .map(|r| (r.index.unwrap(), r.reason))
            .collect();
        use RejectReason::*;
        assert_eq!(
            reasons,
            vec![
                (1, InvalidTemperature),
                (2, TemperatureOutOfRange),
                (3, TemperatureOutOfRange),
                (4, MissingTemperature),
                (5, InvalidId),
                (6, InvalidId),
                (7, InvalidTimestamp),
                (8, TimestampOutOfRange),
                (9, TimestampOutOfRange),
                (10, InvalidExtra),
                (11, InvalidExtra),
                (12, InvalidShape),
                (13, TemperatureOutOfRange),
            ]
        );
    }

    #[test]
    fn whole_message_problems_refuse_the_message() {
        let cases: [(&str, &[u8], RejectReason); 7] = [
            (
                "truncated",
                br#"{"temperature": 2"#,
                RejectReason::MalformedJson,
            ),
            (
                "NaN",
                br#"{"temperature": NaN}"#,
                RejectReason::MalformedJson,
            ),
            (
                "huge number",
                br#"{"temperature": 1e999}"#,
                RejectReason::MalformedJson,
            ),
            ("binary", &[0xff, 0x00, 0xfe], RejectReason::MalformedJson),
            ("string", br#""21.5""#, RejectReason::InvalidShape),
            ("empty array", b"[]", RejectReason::EmptyBatch),
            (
                "bad single object",
                br#"{"temperature": "x"}"#,
                RejectReason::InvalidTemperature,
            ),
        ];
        for (what, payload, reason) in cases {
            assert_eq!(parse(payload).unwrap_err().reason, reason, "{what}");
        }
        let big = vec![b' '; Limits::default().max_payload_bytes + 1];
        assert_eq!(
            parse(&big).unwrap_err().reason,
            RejectReason::PayloadTooLarge
        );
    }

    #[test]
    fn limits_are_inclusive_at_the_physical_bounds() {
        assert!(Celsius::try_from(-273.15).is_ok());
        assert!(Celsius::try_from(1000.0).is_ok());
        assert!(Celsius::try_from(f64::NAN).is_err());
        assert!(Celsius::try_from(f64::INFINITY).is_err());
    }
}
