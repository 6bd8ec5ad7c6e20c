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
use termopar_core::{
    outbox::{self, Pace},
    tasks::{Stop, Tasks},
};
use tokio::sync::{mpsc, Notify};

use super::RawRecord;

/// Most outbox rows (groups of records) one relay step moves.
const RELAY_ROWS: i64 = 128;
/// Most bytes of records one relay step moves (unless its first row alone is larger):
/// a row holds up to [`super::store::MAX_BATCH`] records of up to
/// [`super::MAX_RAW_BYTES`] each.
const RELAY_BYTES: i64 = 8 << 20;
/// Pause between relay steps that emptied the outbox. Fewer, larger steps cost less of
/// everyone's CPU per record: under `make bench-webhook` (about 1,000 records a step)
/// 128 rows and 100 ms relayed ~9% more events/s than 64 rows and 50 ms, and 16 rows and
/// 10 ms ~15% fewer. The price is that a record reaches MongoDB ~0.1 s later.
const PACE: Pace = Pace {
    pause: Duration::from_millis(100),
    idle_check: Duration::from_secs(1),
};

/// A delivery's raw record as MongoDB keeps it, without `_id` and answer (see
/// [`answered`]): flat, and only what the body does not already say. Every field costs
/// the document store time (FerretDB, inserting 1,000 at a time: ~45 us of CPU for a
/// record of 9 fields, ~30 us for 6), so the event's type and id, which are in the
/// body, are not repeated, and `body_size` is there only for a body kept `truncated`.
/// The body is a string when it is UTF-8 (`body`), else binary (`body_bytes`). Built as
/// raw BSON: it is only ever written out.
pub fn document(raw: &RawRecord) -> RawDocumentBuf {
    let mut d = RawDocumentBuf::new();
    d.append_ref(
        "received_at",
        bson::DateTime::from_millis(raw.received_at.timestamp_millis()),
    );
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
        d.append_ref("body_size", raw.body_size);
    }
    d
}

/// `record` with the answer its delivery got: `status` (HTTP) and `code`.
pub(crate) fn answered(mut record: RawDocumentBuf, status: i32, code: &str) -> RawDocumentBuf {
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

/// Moves outbox rows to `collection` until stopped, then drains what the writers
/// committed (see [`termopar_core::outbox::relay`]).
pub(crate) async fn run(
    pg: PgPool,
    collection: Collection<RawDocumentBuf>,
    wake: Arc<Notify>,
    stop: Stop,
    writers: mpsc::Receiver<()>,
) {
    let step = move || {
        let (pg, collection) = (pg.clone(), collection.clone());
        async move { step(&pg, &collection).await }
    };
    outbox::relay("raw webhook deliveries", step, PACE, wake, stop, writers).await
}

/// Moves the oldest unclaimed rows, up to [`RELAY_ROWS`] of them and [`RELAY_BYTES`] of
/// records; returns whether it stopped at one of those limits (more may be waiting).
#[tracing::instrument(skip_all)]
async fn step(pg: &PgPool, collection: &Collection<RawDocumentBuf>) -> anyhow::Result<bool> {
    let mut tx = pg.begin().await?;
    let claimed: Vec<(i64, i32)> = sqlx::query_as(
        "SELECT id, octet_length(documents) FROM webhook_outbox
         ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
    )
    .bind(RELAY_ROWS)
    // Planned each time: the outbox swings between empty and large.
    .persistent(false)
    .fetch_all(&mut *tx)
    .await?;
    let mut ids = Vec::with_capacity(claimed.len());
    let mut bytes = 0;
    for (id, size) in &claimed {
        if !ids.is_empty() && bytes + i64::from(*size) > RELAY_BYTES {
            break;
        }
        bytes += i64::from(*size);
        ids.push(*id);
    }
    let more = claimed.len() as i64 == RELAY_ROWS || ids.len() < claimed.len();
    if ids.is_empty() {
        return Ok(false);
    }
    let rows: Vec<OutboxRow> = sqlx::query_as(
        "DELETE FROM webhook_outbox WHERE id = ANY($1)
         RETURNING id, created_at, documents, statuses, codes",
    )
    .bind(&ids)
    .fetch_all(&mut *tx)
    .await?;
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
    Ok(more)
}

/// Raw records written straight to MongoDB, for deliveries PostgreSQL could not take.
/// Concurrent records are written together in one unordered `insert_many`.
#[derive(Clone)]
pub(crate) struct RawLog {
    tx: mpsc::Sender<RawDocumentBuf>,
}

impl RawLog {
    /// Starts the writer for `collection` on `tasks` (it stops when the last handle is
    /// dropped, after writing what is queued).
    pub(crate) fn start(tasks: &Tasks, collection: Collection<RawDocumentBuf>) -> Self {
        let (tx, mut rx) = mpsc::channel::<RawDocumentBuf>(10_000);
        tasks.spawn("webhook raw log", |_stop| async move {
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
    pub(crate) fn keep_detached(&self, doc: RawDocumentBuf) {
        if self.tx.try_send(doc).is_err() {
            tracing::warn!("raw webhook log is full: a record of a refused delivery is dropped");
        }
    }
}

#[cfg(test)]
mod tests {
    use poem::http::HeaderMap;

    use super::*;
    use crate::webhook::MAX_RAW_BYTES;

    fn keys(d: &RawDocument) -> Vec<&str> {
        d.iter().map(|e| e.expect("valid BSON").0).collect()
    }

    #[test]
    fn a_record_holds_the_headers_that_came_and_the_body() {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", "application/json".parse().unwrap());
        headers.insert("x-request-id", "r-1".parse().unwrap());
        headers.insert("x-signature", "sha256=00".parse().unwrap());
        let d = document(&RawRecord::new(&headers, br#"{"type":"NEW_MESSAGE"}"#));
        assert_eq!(
            keys(&d),
            [
                "received_at",
                "content_type",
                "request_id",
                "signed",
                "body"
            ]
        );
        assert_eq!(d.get_str("body").unwrap(), r#"{"type":"NEW_MESSAGE"}"#);

        let d = document(&RawRecord::new(&HeaderMap::new(), &[0xff, 0x00]));
        assert_eq!(keys(&d), ["received_at", "body_bytes"]);
        assert_eq!(d.get_binary("body_bytes").unwrap().bytes, [0xff, 0x00]);
    }

    #[test]
    fn a_body_too_large_to_keep_whole_is_kept_truncated_with_its_size() {
        let body = vec![b'a'; MAX_RAW_BYTES + 10];
        let d = document(&RawRecord::new(&HeaderMap::new(), &body));
        assert_eq!(keys(&d), ["received_at", "body", "truncated", "body_size"]);
        assert_eq!(d.get_str("body").unwrap().len(), MAX_RAW_BYTES);
        assert_eq!(d.get_i32("body_size").unwrap() as usize, MAX_RAW_BYTES + 10);
        assert!(d.get_bool("truncated").unwrap());
    }
}
