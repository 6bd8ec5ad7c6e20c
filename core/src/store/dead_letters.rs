//! Refused messages and readings, kept for inspection: the payload in MongoDB
//! (`dead_letters`, by `_id`), what it is and why in PostgreSQL (`dead_letters`), which
//! lists them newest first, by client, sensor or reason, without touching MongoDB.

use chrono::{DateTime, Utc};
use mongodb::bson::{self, doc, Binary, Document};
use uuid::Uuid;

use super::{codec::bson_time, ReadingStore, StoreError};
use crate::{
    ids::{ClientId, SensorId},
    reading::RejectReason,
};

/// Largest part of a refused payload kept in a dead letter.
pub const DEAD_LETTER_PAYLOAD_BYTES: usize = 64 * 1024;
/// Namespace of dead-letter ids: the same refusal retried gets the same id.
const DEAD_LETTER_NAMESPACE: Uuid = Uuid::from_u128(0x3c1f_9a4e_71b2_4d8f_a6e0_5b9d_2f41_c7a3);

/// A refused message or reading, kept for inspection and replay.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Where it came from: `mqtt` or `http`.
    pub source: &'static str,
    /// The MQTT topic, when it came over MQTT.
    pub topic: Option<String>,
    /// The sensor, when known.
    pub sensor_id: Option<SensorId>,
    /// The sensor's client, when the sensor is known.
    pub client_id: Option<ClientId>,
    /// The raw payload (truncated to [`DEAD_LETTER_PAYLOAD_BYTES`] when stored).
    pub payload: bytes::Bytes,
    /// Why.
    pub reason: RejectReason,
    /// Details.
    pub detail: String,
    /// Element index within an array payload.
    pub index: Option<usize>,
    /// When it was received.
    pub received_at: DateTime<Utc>,
}

impl DeadLetter {
    /// Its id: derived from what it is, so storing it again after a failure (the
    /// consumer retries) stores it once.
    pub fn id(&self) -> Uuid {
        let mut name = Vec::with_capacity(64 + self.payload.len().min(DEAD_LETTER_PAYLOAD_BYTES));
        name.extend_from_slice(self.source.as_bytes());
        name.push(0);
        name.extend_from_slice(self.topic.as_deref().unwrap_or("").as_bytes());
        name.push(0);
        if let Some(s) = self.sensor_id {
            name.extend_from_slice(s.0.as_bytes());
        }
        name.extend_from_slice(self.reason.as_str().as_bytes());
        name.extend_from_slice(&self.index.map_or(-1, |i| i as i64).to_be_bytes());
        name.extend_from_slice(
            &self
                .received_at
                .timestamp_nanos_opt()
                .unwrap_or_default()
                .to_be_bytes(),
        );
        name.extend_from_slice(&self.payload[..self.payload.len().min(DEAD_LETTER_PAYLOAD_BYTES)]);
        Uuid::new_v5(&DEAD_LETTER_NAMESPACE, &name)
    }
}

/// A stored dead letter, as listed.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StoredDeadLetter {
    /// Its id.
    pub id: Uuid,
    /// When it was received.
    pub received_at: DateTime<Utc>,
    /// `mqtt` or `http`.
    pub source: String,
    /// The reason's name (`malformed_json`, ...).
    pub reason: String,
    /// Details.
    pub detail: String,
    /// The sensor, when known.
    pub sensor_id: Option<Uuid>,
    /// Its client, when known.
    pub client_id: Option<Uuid>,
    /// The MQTT topic, when it came over MQTT.
    pub topic: Option<String>,
    /// Element index within an array payload.
    pub element: Option<i32>,
    /// Size of the whole payload, in bytes.
    pub payload_size: i32,
    /// The payload as kept (only when asked for one dead letter).
    #[sqlx(skip)]
    pub payload: Option<Vec<u8>>,
}

/// Which dead letters to list, newest first.
#[derive(Debug, Clone, Default)]
pub struct DeadLetterQuery {
    /// Only those of this client's sensors.
    pub client: Option<ClientId>,
    /// Only those of this sensor.
    pub sensor: Option<SensorId>,
    /// Only those refused for this reason.
    pub reason: Option<String>,
    /// Skip this many.
    pub offset: i64,
    /// At most this many.
    pub limit: i64,
}

impl ReadingStore {
    /// Stores dead letters (again after a failure: each is stored once).
    #[tracing::instrument(level = "debug", skip_all, fields(letters = letters.len()))]
    pub async fn dead_letter(&self, letters: &[DeadLetter]) -> Result<(), StoreError> {
        if letters.is_empty() {
            return Ok(());
        }
        let ids: Vec<Uuid> = letters.iter().map(DeadLetter::id).collect();
        let docs: Vec<Document> = letters
            .iter()
            .zip(&ids)
            .map(|(l, id)| {
                let kept = &l.payload[..l.payload.len().min(DEAD_LETTER_PAYLOAD_BYTES)];
                let mut d = doc! {
                    "_id": id.to_string(),
                    "source": l.source,
                    "reason": l.reason.as_str(),
                    "detail": &l.detail,
                    "payload": Binary { subtype: bson::spec::BinarySubtype::Generic, bytes: kept.to_vec() },
                    "payload_size": l.payload.len() as i64,
                    "received_at": bson_time(l.received_at),
                };
                if let Ok(text) = std::str::from_utf8(kept) {
                    d.insert("payload_text", text);
                }
                if let Some(topic) = &l.topic {
                    d.insert("topic", topic);
                }
                if let Some(sensor) = l.sensor_id {
                    d.insert("sensor_id", sensor.to_string());
                }
                if let Some(index) = l.index {
                    d.insert("index", index as i64);
                }
                d
            })
            .collect();
        // Payloads first: a listed dead letter always has its payload.
        if let Err(e) = self.dead_letters.insert_many(docs).ordered(false).await {
            if !crate::mongo::only_duplicate_keys(&e) {
                return Err(e.into());
            }
        }
        let inserted: Vec<String> = sqlx::query_scalar(
            "INSERT INTO dead_letters
                (id, received_at, source, reason, detail, sensor_id, client_id, topic, element, payload_size)
             SELECT * FROM unnest($1::uuid[], $2::timestamptz[], $3::text[], $4::text[], $5::text[],
                                  $6::uuid[], $7::uuid[], $8::text[], $9::int[], $10::int[])
             ON CONFLICT (id) DO NOTHING
             RETURNING reason",
        )
        .bind(&ids)
        .bind(letters.iter().map(|l| l.received_at).collect::<Vec<_>>())
        .bind(letters.iter().map(|l| l.source).collect::<Vec<_>>())
        .bind(letters.iter().map(|l| l.reason.as_str()).collect::<Vec<_>>())
        .bind(letters.iter().map(|l| l.detail.as_str()).collect::<Vec<_>>())
        .bind(letters.iter().map(|l| l.sensor_id.map(|s| s.0)).collect::<Vec<_>>())
        .bind(letters.iter().map(|l| l.client_id.map(|c| c.0)).collect::<Vec<_>>())
        .bind(letters.iter().map(|l| l.topic.clone()).collect::<Vec<_>>())
        .bind(letters.iter().map(|l| l.index.map(|i| i as i32)).collect::<Vec<_>>())
        .bind(
            letters
                .iter()
                .map(|l| i32::try_from(l.payload.len()).unwrap_or(i32::MAX))
                .collect::<Vec<_>>(),
        )
        .fetch_all(&self.pg)
        .await?;
        // Counted once, whatever the retries.
        for reason in inserted {
            metrics::counter!("readings_rejected_total", "reason" => reason).increment(1);
        }
        Ok(())
    }

    /// Dead letters, newest first.
    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn dead_letters(
        &self,
        q: &DeadLetterQuery,
    ) -> Result<Vec<StoredDeadLetter>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT id, received_at, source, reason, detail, sensor_id, client_id, topic, element,
                    payload_size
             FROM dead_letters
             WHERE ($1::uuid IS NULL OR client_id = $1)
               AND ($2::uuid IS NULL OR sensor_id = $2)
               AND ($3::text IS NULL OR reason = $3)
             ORDER BY received_at DESC, id DESC
             OFFSET $4 LIMIT $5",
        )
        .bind(q.client.map(|c| c.0))
        .bind(q.sensor.map(|s| s.0))
        .bind(&q.reason)
        .bind(q.offset)
        .bind(q.limit)
        .fetch_all(&self.pg)
        .await?)
    }

    /// A dead letter with its payload.
    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn dead_letter_by_id(
        &self,
        id: Uuid,
    ) -> Result<Option<StoredDeadLetter>, StoreError> {
        let row: Option<StoredDeadLetter> = sqlx::query_as(
            "SELECT id, received_at, source, reason, detail, sensor_id, client_id, topic, element,
                    payload_size
             FROM dead_letters WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pg)
        .await?;
        let Some(mut letter) = row else {
            return Ok(None);
        };
        letter.payload = self
            .dead_letters
            .find_one(doc! { "_id": id.to_string() })
            .await?
            .and_then(|d| d.get_binary_generic("payload").ok().cloned());
        Ok(Some(letter))
    }
}
