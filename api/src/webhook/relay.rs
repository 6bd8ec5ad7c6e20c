//! Raw deliveries on their way to MongoDB (`webhook_events`).
//!
//! A group's raw records are committed to `webhook_outbox`, as one row of BSON documents
//! and their answers, with the events they apply (see [`super::store`]): an
//! answered delivery is never without its record, and MongoDB being down does not stop
//! the webhook. The relay moves rows to MongoDB in large unordered inserts: it claims the
//! oldest rows (`FOR UPDATE SKIP LOCKED`, so several API processes share the work),
//! inserts their records, and deletes them in the same transaction. A record's `_id` is
//! derived from its row, so a relay that inserted and then lost its commit inserts
//! duplicates the next time, which MongoDB refuses and the relay takes as done.

use std::{sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use mongodb::{
    bson::{self, oid::ObjectId, RawBinaryRef, RawDocument, RawDocumentBuf},
    Collection,
};
use sqlx::PgPool;
use tokio::sync::{mpsc, Notify};
use uuid::Uuid;

use super::{Event, RawRecord};

/// Most outbox rows (groups of records) one relay step moves.
const RELAY_ROWS: i64 = 64;
/// Pause between relay steps that emptied the outbox.
const RELAY_PAUSE: Duration = Duration::from_millis(50);
/// How often the relay looks at the outbox without being woken (records committed by
/// other processes, or left behind by a failed step).
const IDLE_CHECK: Duration = Duration::from_secs(1);

/// A delivery's raw record as MongoDB keeps it, without `_id` and answer (see
/// [`answered`]): flat, and only the fields that have a value (every field costs the
/// document store time). The body is a string when it is UTF-8 (`body`), else binary
/// (`body_bytes`). Built as raw BSON: it is only ever written out.
pub fn document(raw: &RawRecord, event: Option<&Event>) -> RawDocumentBuf {
    let mut d = RawDocumentBuf::new();
    d.append_ref(
        "received_at",
        bson::DateTime::from_millis(raw.received_at.timestamp_millis()),
    );
    d.append_ref("body_size", raw.body_size);
    if let Some(event) = event {
        d.append_ref("type", event.kind());
        let mut id = Uuid::encode_buffer();
        d.append_ref("event_id", &*event.id().hyphenated().encode_lower(&mut id));
    }
    for (name, value) in [
        ("content_type", &raw.content_type),
        ("user_agent", &raw.user_agent),
        ("request_id", &raw.request_id),
    ] {
        if let Some(v) = value {
            d.append_ref(name, v.as_str());
        }
    }
    if raw.signed {
        d.append_ref("signed", true);
    }
    match std::str::from_utf8(&raw.body) {
        Ok(text) => d.append_ref("body", text),
        Err(_) => d.append_ref(
            "body_bytes",
            RawBinaryRef {
                subtype: bson::spec::BinarySubtype::Generic,
                bytes: &raw.body,
            },
        ),
    };
    if raw.body.len() < raw.body_size as usize {
        d.append_ref("truncated", true);
    }
    d
}

/// `record` with the answer its delivery got: `status` (HTTP) and `code`.
pub fn answered(mut record: RawDocumentBuf, status: i32, code: &str) -> RawDocumentBuf {
    record.append_ref("status", status);
    record.append_ref("code", code);
    record
}

/// Serializes a group's records for one `webhook_outbox` row: BSON documents one after
/// another (each starts with its length).
pub fn pack<'a>(documents: impl IntoIterator<Item = &'a RawDocument>) -> Vec<u8> {
    let mut bytes = Vec::new();
    for d in documents {
        bytes.extend_from_slice(d.as_bytes());
    }
    bytes
}

/// One `webhook_outbox` row.
#[derive(sqlx::FromRow)]
struct OutboxRow {
    id: i64,
    created_at: DateTime<Utc>,
    documents: Vec<u8>,
    statuses: Vec<i16>,
    codes: Vec<String>,
}

impl OutboxRow {
    /// Its records with their answers, each with an `_id` made of the row's creation
    /// second, its id and the record's place in it: unique, ordered as received, and the
    /// same every time the row is relayed.
    fn records(&self) -> anyhow::Result<Vec<RawDocumentBuf>> {
        let mut bytes = self.documents.as_slice();
        let mut records = Vec::with_capacity(self.codes.len());
        while !bytes.is_empty() {
            let k = records.len();
            let (Some(status), Some(code)) = (self.statuses.get(k), self.codes.get(k)) else {
                anyhow::bail!("outbox row {} has more records than answers", self.id);
            };
            let mut id = [0u8; 12];
            id[..4].copy_from_slice(&(self.created_at.timestamp() as u32).to_be_bytes());
            id[4..10].copy_from_slice(&self.id.to_be_bytes()[2..]);
            id[10..].copy_from_slice(&(k as u16).to_be_bytes());
            let len = match bytes.get(..4) {
                Some(len) => i32::from_le_bytes(len.try_into().expect("4 bytes")) as usize,
                None => 0,
            };
            anyhow::ensure!(
                (5..=bytes.len()).contains(&len),
                "outbox row {} holds a truncated record",
                self.id
            );
            let (record, rest) = bytes.split_at(len);
            bytes = rest;
            let record = RawDocumentBuf::from_bytes(record.to_vec())?;
            let mut record = answered(record, i32::from(*status), code);
            record.append_ref("_id", ObjectId::from_bytes(id));
            records.push(record);
        }
        Ok(records)
    }
}

/// Moves outbox rows to `collection` until the process ends. `wake` is notified after
/// each commit of a new row. Between steps it waits [`RELAY_PAUSE`] so that, under load,
/// each insert carries many records (the document store's cost per record falls with
/// the size of the insert).
pub async fn run(pg: PgPool, collection: Collection<RawDocumentBuf>, wake: Arc<Notify>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match step(&pg, &collection).await {
            Ok(moved) if moved as i64 == RELAY_ROWS => continue,
            Ok(_) => {
                backoff = Duration::from_millis(100);
                let _ = tokio::time::timeout(IDLE_CHECK, wake.notified()).await;
                tokio::time::sleep(RELAY_PAUSE).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "could not relay raw webhook deliveries");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Moves the oldest unclaimed rows; returns how many.
async fn step(pg: &PgPool, collection: &Collection<RawDocumentBuf>) -> anyhow::Result<usize> {
    let mut tx = pg.begin().await?;
    let rows: Vec<OutboxRow> = sqlx::query_as(
        "DELETE FROM webhook_outbox WHERE id IN (
             SELECT id FROM webhook_outbox ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)
         RETURNING id, created_at, documents, statuses, codes",
    )
    .bind(RELAY_ROWS)
    // Planned each time: the outbox swings between empty and large.
    .persistent(false)
    .fetch_all(&mut *tx)
    .await?;
    if rows.is_empty() {
        return Ok(0);
    }
    let mut docs = Vec::new();
    for row in &rows {
        docs.extend(row.records()?);
    }
    let records = docs.len();
    if let Err(e) = collection.insert_many(docs).ordered(false).await {
        // Records relayed before (their commit was lost) are refused as duplicates.
        if !termopar_core::mongo::only_duplicate_keys(&e) {
            return Err(e.into());
        }
    }
    tx.commit().await?;
    metrics::counter!("webhook_raw_relayed_total").increment(records as u64);
    Ok(rows.len())
}

/// Raw records written straight to MongoDB, for deliveries PostgreSQL could not take.
/// Concurrent records are written together in one unordered `insert_many`.
#[derive(Clone)]
pub struct RawLog {
    tx: mpsc::Sender<RawDocumentBuf>,
}

impl RawLog {
    /// Starts the writer for `collection` (it stops when the last handle is dropped).
    pub fn start(collection: Collection<RawDocumentBuf>) -> Self {
        let (tx, mut rx) = mpsc::channel::<RawDocumentBuf>(10_000);
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(512);
            while rx.recv_many(&mut batch, 512).await > 0 {
                let docs = std::mem::take(&mut batch);
                let n = docs.len();
                if let Err(e) = collection.insert_many(docs).ordered(false).await {
                    tracing::warn!(error = %e, records = n, "could not keep raw webhook deliveries");
                }
            }
        });
        Self { tx }
    }

    /// Queues `doc` without waiting (best effort: this path serves deliveries that are
    /// answered 503, which their senders retry).
    pub fn keep_detached(&self, doc: RawDocumentBuf) {
        if self.tx.try_send(doc).is_err() {
            tracing::warn!("raw webhook log is full: a record of a refused delivery is dropped");
        }
    }
}
