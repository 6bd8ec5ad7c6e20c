//! The raw documents: a *segment* holds readings of one sensor in one 15-minute bucket,
//! column by column.
//!
//! ```text
//! { _id: ObjectId, sensor_id: "<uuid>", client_id: "<uuid>", bucket: Date, count: n,
//!   ids: Binary(16 n), ts: Binary(4 n), temperature: Binary(8 n), received_at: Binary(8 n),
//!   extra: { "<i>": { ...fields the i-th reading arrived with } } }
//! ```
//!
//! Readings are sorted by `(ts, id)`. `ids` are the readings' UUIDs; `ts` each reading's
//! milliseconds after `bucket` (u32, little-endian); `temperature` IEEE 754 doubles;
//! `received_at` milliseconds since the epoch (i64). `extra` is there only when a reading
//! has extra fields, keyed by its place. Columns of binary are what MongoDB's own time
//! series buckets do, and what the embedded FerretDB stores cheapest: it pays per field
//! and per array element (a segment of 256 readings as arrays took it ~1.5 ms to insert,
//! as binary ~0.27 ms), while a binary column costs it a base64 string.

use chrono::{DateTime, Utc};
use mongodb::bson::{
    self, doc, oid::ObjectId, spec::BinarySubtype, Bson, Document, RawBinaryRef, RawBsonRef,
    RawDocument, RawDocumentBuf,
};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::{
    ids::{ClientId, SensorId},
    reading::{Celsius, Reading},
};

/// Width of a bucket, in minutes: a segment's span, and the rollups' granularity.
pub const BUCKET_MINUTES: i64 = 15;
const BUCKET_MILLIS: i64 = BUCKET_MINUTES * 60_000;

/// A raw document that cannot be read back as readings.
#[derive(Debug, thiserror::Error)]
#[error("raw document {id}: {what}")]
pub struct CodecError {
    id: String,
    what: String,
}

/// The start of the 15-minute bucket holding `t` (the same `date_bin` the SQL uses).
pub fn bucket_of(t: DateTime<Utc>) -> DateTime<Utc> {
    let millis = t.timestamp_millis().div_euclid(BUCKET_MILLIS) * BUCKET_MILLIS;
    DateTime::from_timestamp_millis(millis).expect("in range")
}

/// Milliseconds of `t` after the start of its bucket.
pub fn offset_in_bucket(t: DateTime<Utc>) -> i32 {
    t.timestamp_millis().rem_euclid(BUCKET_MILLIS) as i32
}

/// A BSON date (milliseconds) from a UTC time.
pub fn bson_time(t: DateTime<Utc>) -> bson::DateTime {
    bson::DateTime::from_millis(t.timestamp_millis())
}

fn chrono_time(t: bson::DateTime) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(t.timestamp_millis()).unwrap_or_default()
}

/// A segment: readings of one sensor in one bucket, sorted by `(ts, id)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    /// The document's `_id`.
    pub id: ObjectId,
    /// Start of the bucket every reading's `ts` falls in.
    pub bucket: DateTime<Utc>,
    /// The readings (at least one), all of the same sensor and client.
    pub readings: Vec<Reading>,
}

impl Segment {
    /// A segment of `readings`, which must share a sensor and a bucket; sorts them.
    pub fn new(id: ObjectId, mut readings: Vec<Reading>) -> Self {
        assert!(!readings.is_empty(), "a segment holds readings");
        readings.sort_by_key(|r| (r.ts, r.id));
        let bucket = bucket_of(readings[0].ts);
        debug_assert!(readings
            .iter()
            .all(|r| bucket_of(r.ts) == bucket && r.sensor_id == readings[0].sensor_id));
        Self {
            id,
            bucket,
            readings,
        }
    }

    /// The sensor.
    pub fn sensor(&self) -> SensorId {
        self.readings[0].sensor_id
    }

    /// The first and the last measurement time.
    pub fn span(&self) -> (DateTime<Utc>, DateTime<Utc>) {
        (
            self.readings[0].ts,
            self.readings[self.readings.len() - 1].ts,
        )
    }

    /// The document, as BSON.
    pub fn encode(&self) -> RawDocumentBuf {
        let n = self.readings.len();
        let (mut ids, mut ts, mut temps, mut received) = (
            Vec::with_capacity(16 * n),
            Vec::with_capacity(4 * n),
            Vec::with_capacity(8 * n),
            Vec::with_capacity(8 * n),
        );
        let mut extra = RawDocumentBuf::new();
        for (i, r) in self.readings.iter().enumerate() {
            ids.extend_from_slice(r.id.as_bytes());
            ts.extend_from_slice(&(offset_in_bucket(r.ts) as u32).to_le_bytes());
            temps.extend_from_slice(&r.temperature.get().to_le_bytes());
            received.extend_from_slice(&r.received_at.timestamp_millis().to_le_bytes());
            if !r.extra.is_empty() {
                extra.append(i.to_string(), json_document(&r.extra));
            }
        }
        let first = &self.readings[0];
        let mut d = RawDocumentBuf::new();
        d.append_ref("_id", self.id);
        d.append_ref("sensor_id", first.sensor_id.to_string().as_str());
        d.append_ref("client_id", first.client_id.to_string().as_str());
        d.append_ref("bucket", bson_time(self.bucket));
        d.append_ref("count", n as i32);
        for (name, bytes) in [
            ("ids", &ids),
            ("ts", &ts),
            ("temperature", &temps),
            ("received_at", &received),
        ] {
            d.append_ref(
                name,
                RawBinaryRef {
                    subtype: BinarySubtype::Generic,
                    bytes,
                },
            );
        }
        if !extra.is_empty() {
            d.append("extra", bson::RawBson::Document(extra));
        }
        d
    }

    /// Reads a segment document back.
    pub fn decode(raw: &RawDocument) -> Result<Self, CodecError> {
        let id = raw
            .get_object_id("_id")
            .map_err(|_| CodecError::new("?", "no ObjectId _id"))?;
        let bad = |what: &str| CodecError::new(&id.to_hex(), what);
        let uuid = |k: &str| {
            raw.get_str(k)
                .ok()
                .and_then(|s| Uuid::parse_str(s).ok())
                .ok_or_else(|| bad(&format!("no UUID {k}")))
        };
        let sensor = SensorId(uuid("sensor_id")?);
        let client = ClientId(uuid("client_id")?);
        let bucket = chrono_time(raw.get_datetime("bucket").map_err(|_| bad("no bucket"))?);
        let n = raw.get_i32("count").map_err(|_| bad("no count"))?;
        let n = usize::try_from(n).map_err(|_| bad("negative count"))?;
        let column = |k: &str, width: usize| {
            raw.get_binary(k)
                .ok()
                .map(|b| b.bytes)
                .filter(|b| b.len() == width * n)
                .ok_or_else(|| bad(&format!("column {k} is not {width} x {n} bytes")))
        };
        let (ids, ts, temps, received) = (
            column("ids", 16)?,
            column("ts", 4)?,
            column("temperature", 8)?,
            column("received_at", 8)?,
        );
        let extra = match raw.get("extra") {
            Ok(Some(RawBsonRef::Document(d))) => Some(d),
            Ok(None) => None,
            _ => return Err(bad("extra is not a document")),
        };
        let mut readings = Vec::with_capacity(n);
        for i in 0..n {
            let offset = u32::from_le_bytes(ts[4 * i..4 * i + 4].try_into().expect("4 bytes"));
            let millis = i64::from_le_bytes(received[8 * i..8 * i + 8].try_into().expect("8"));
            let extra = match extra.map(|x| x.get(i.to_string())) {
                Some(Ok(Some(RawBsonRef::Document(d)))) => json_object(d)?,
                _ => Map::new(),
            };
            readings.push(Reading {
                id: Uuid::from_slice(&ids[16 * i..16 * i + 16]).expect("16 bytes"),
                sensor_id: sensor,
                client_id: client,
                ts: bucket + chrono::Duration::milliseconds(i64::from(offset)),
                temperature: Celsius::from_store(f64::from_le_bytes(
                    temps[8 * i..8 * i + 8].try_into().expect("8 bytes"),
                )),
                received_at: DateTime::from_timestamp_millis(millis)
                    .ok_or_else(|| bad("received_at out of range"))?,
                extra,
            });
        }
        if readings.is_empty() {
            return Err(bad("no readings"));
        }
        Ok(Self {
            id,
            bucket,
            readings,
        })
    }
}

impl CodecError {
    fn new(id: &str, what: &str) -> Self {
        Self {
            id: id.to_owned(),
            what: what.to_owned(),
        }
    }
}

/// Extra fields as BSON. They were checked at parse time to be representable (see
/// `reading::check_extra`).
fn json_document(extra: &Map<String, Value>) -> RawDocumentBuf {
    match bson::to_bson(extra) {
        Ok(Bson::Document(d)) => RawDocumentBuf::from_document(&d).unwrap_or_default(),
        _ => RawDocumentBuf::new(),
    }
}

fn json_object(raw: &RawDocument) -> Result<Map<String, Value>, CodecError> {
    let d = Document::try_from(raw).map_err(|e| CodecError::new("?", &e.to_string()))?;
    match Bson::Document(d).into_relaxed_extjson() {
        Value::Object(m) => Ok(m),
        _ => Ok(Map::new()),
    }
}

/// The BSON size of a reading as one document of its own (`_id`, `sensor_id`,
/// `client_id`, `ts`, `temperature`, `received_at` and its extra fields): what storing
/// readings one document each costs, the yardstick of the segments' size.
pub fn single_document_len(r: &Reading) -> usize {
    let mut d = doc! {
        "_id": r.id.to_string(),
        "sensor_id": r.sensor_id.to_string(),
        "client_id": r.client_id.to_string(),
        "ts": bson_time(r.ts),
        "temperature": r.temperature.get(),
        "received_at": bson_time(r.received_at),
    };
    if let Ok(Bson::Document(extra)) = bson::to_bson(&r.extra) {
        if !extra.is_empty() {
            d.insert("extra", extra);
        }
    }
    bson::to_vec(&d).map(|v| v.len()).unwrap_or(0)
}

/// Readings as the previous version stored them: one document each in `readings`
/// (`_id` = reading id, `sensor_id`, `client_id`, `ts`, `temperature`, `received_at`,
/// `batch`, `extra`). Only `termopar migrate` reads them.
pub mod legacy {
    use super::*;

    /// The collection.
    pub const COLLECTION: &str = "readings";

    /// A legacy document as a reading; `None` if it is not one.
    pub fn decode(d: &Document) -> Option<Reading> {
        let uuid = |k: &str| d.get_str(k).ok().and_then(|s| Uuid::parse_str(s).ok());
        let extra = match d.get("extra").cloned().map(Bson::into_relaxed_extjson) {
            Some(Value::Object(m)) => m,
            _ => Map::new(),
        };
        let temperature = match d.get("temperature") {
            Some(Bson::Double(t)) => *t,
            Some(Bson::Int32(t)) => f64::from(*t),
            Some(Bson::Int64(t)) => *t as f64,
            _ => return None,
        };
        Some(Reading {
            id: uuid("_id")?,
            sensor_id: SensorId(uuid("sensor_id")?),
            client_id: ClientId(uuid("client_id")?),
            ts: chrono_time(*d.get_datetime("ts").ok()?),
            temperature: Celsius::try_from(temperature).ok()?,
            received_at: chrono_time(*d.get_datetime("received_at").ok()?),
            extra,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use serde_json::json;

    fn reading(secs: i64, t: f64, extra: Value) -> Reading {
        let ts = Utc.with_ymd_and_hms(2026, 3, 1, 10, 0, 0).unwrap()
            + chrono::Duration::milliseconds(secs * 1000 + 7);
        Reading {
            id: Uuid::new_v4(),
            sensor_id: SensorId(Uuid::from_u128(1)),
            client_id: ClientId(Uuid::from_u128(2)),
            ts,
            temperature: Celsius::try_from(t).unwrap(),
            received_at: ts + chrono::Duration::milliseconds(1234),
            extra: extra.as_object().cloned().unwrap_or_default(),
        }
    }

    #[test]
    fn a_segment_reads_back_as_the_readings_it_was_made_of_sorted() {
        let readings = vec![
            reading(899, -18.25, json!({})),
            reading(0, 21.5, json!({"door": "open", "n": [1, 2.5, {"x": null}]})),
            reading(300, 4.0, json!({"big": 9007199254740993_i64})),
        ];
        let segment = Segment::new(ObjectId::new(), readings.clone());
        let back = Segment::decode(&segment.encode()).unwrap();
        let mut want = readings;
        want.sort_by_key(|r| (r.ts, r.id));
        assert_eq!(back.readings, want);
        assert_eq!(back.bucket, bucket_of(want[0].ts));
        assert_eq!(back, segment);
    }

    #[test]
    fn columns_are_what_the_size_budget_says() {
        let n = 256;
        let readings: Vec<Reading> = (0..n).map(|i| reading(i, 1.0, json!({}))).collect();
        let one = single_document_len(&readings[0]);
        let len = Segment::new(ObjectId::new(), readings)
            .encode()
            .as_bytes()
            .len();
        // 36 bytes a reading plus a fixed header, against ~200 for a document each.
        assert!(len < 36 * n as usize + 300, "{len}");
        assert!(one > 150, "{one}");
    }

    #[test]
    fn a_damaged_document_is_an_error_not_a_panic() {
        let segment = Segment::new(ObjectId::new(), vec![reading(1, 1.0, json!({}))]);
        let mut d = Document::try_from(segment.encode().as_ref()).unwrap();
        d.insert("count", 2);
        let raw = RawDocumentBuf::from_document(&d).unwrap();
        assert!(Segment::decode(&raw).is_err());
        d.insert("count", -1);
        let raw = RawDocumentBuf::from_document(&d).unwrap();
        assert!(Segment::decode(&raw).is_err());
    }

    #[test]
    fn buckets_are_quarter_hours_before_and_after_the_epoch() {
        let t = Utc.with_ymd_and_hms(2026, 3, 1, 10, 14, 59).unwrap();
        assert_eq!(
            bucket_of(t),
            Utc.with_ymd_and_hms(2026, 3, 1, 10, 0, 0).unwrap()
        );
        assert_eq!(offset_in_bucket(t), 899_000);
        let before = Utc.with_ymd_and_hms(1969, 12, 31, 23, 59, 0).unwrap();
        assert_eq!(
            bucket_of(before),
            Utc.with_ymd_and_hms(1969, 12, 31, 23, 45, 0).unwrap()
        );
    }
}
