//! The reading store: raw readings in MongoDB, found through PostgreSQL, exactly once.
//!
//! # Shape
//!
//! Raw readings live in MongoDB as *segments* ([`codec`]): one document holds readings
//! of one sensor in one 15-minute bucket, column by column, up to
//! [`SEGMENT_READINGS`]. Nothing reads MongoDB except by `_id`: the embedded FerretDB
//! answers any other filter by reading the whole collection. PostgreSQL is the index:
//!
//! - `reading_buckets`: per sensor and bucket, the rollup (count, exact sum, min, max)
//!   and how many segments hold its readings; `raw_docs`: each segment's `_id`, bucket,
//!   count and first and last `ts`. History walks buckets newest first and fetches only
//!   the segments a page needs ([`queries`]).
//! - `reading_ids`: every reading id with its bucket: idempotency (a reading id is stored
//!   once) and a reading by id.
//! - `reading_days`: per sensor and UTC day, 24 hourly cells (count, sum, min, max), so a
//!   year of daily averages in any zone reads ~366 rows, not ~35,000 buckets; `packed`
//!   (generated) holds the cells in one bytea, which PostgreSQL sends ~6x faster.
//!   `reading_day_quarters`: the same day in 96 cells, one per bucket, for local days
//!   that start inside an hour (zones at :30 and :45).
//! - `sensor_latest`: each sensor's newest reading and its reading count.
//! - `raw_doc_expiry`: segments that exist, or may, in MongoDB without being registered:
//!   written by an ingest that has not committed yet (expire unless it commits), or
//!   replaced by a merge or a correction (expire after a grace period, so readers that
//!   listed them a moment ago still find them).
//!
//! # Exactly once
//!
//! [`ReadingStore::store`] (see [`write`]):
//!
//! 1. PostgreSQL, one statement: record the segments about to be written as expiring, and
//!    find which reading ids are stored already (redeliveries): those are left out.
//! 2. MongoDB: insert the segments (fresh `_id`s).
//! 3. PostgreSQL, one statement (atomic): delete the expiry row, and only if it was
//!    there register the segments, claim the reading ids (a plain insert: an id another
//!    writer claimed in between fails the statement, and the call starts over), add the
//!    rollups and move the latest rows.
//!
//! A crash or an outage between 1 and 3 registers nothing and counts nothing; the
//! written segments expire and are deleted ([`ReadingStore::expire_due`]), and the
//! redelivered readings are stored anew. After 3 they are stored and counted, and a
//! redelivery finds their ids in step 1. Rollups are always what the registered segments
//! hold ([`ReadingStore::recompute_bucket`]).
//!
//! # Merging
//!
//! A sensor that sends one reading a message makes one segment a reading. Segments of a
//! bucket are merged in the background ([`compact`]): while the bucket is open, in size
//! tiers (four small segments into one), so a bucket never has more than about three
//! segments per size class and each reading is rewritten a few times at most; once the
//! bucket is closed, into as few segments as its readings need.

pub mod codec;
mod compact;
mod corrections;
mod dead_letters;
mod latest;
mod migrate;
mod queries;
mod rollups;
mod write;

use std::{sync::Arc, time::Duration};

use mongodb::{
    bson::{oid::ObjectId, Document, RawDocumentBuf},
    Collection, Database,
};
use sqlx::PgPool;

pub use codec::{bson_time, bucket_of, Segment, BUCKET_MINUTES};
pub use compact::CompactReport;
pub use dead_letters::{DeadLetter, DeadLetterQuery, StoredDeadLetter, DEAD_LETTER_PAYLOAD_BYTES};
pub use latest::LatestCache;
pub use migrate::MigrationReport;
pub use queries::{DayStat, HistoryPage, HistoryQuery, Position};
pub use rollups::{BucketChange, ChangeHook, BUCKETS_CHANNEL, LATE_AFTER};
pub use write::StoreOutcome;

/// Collection of segments (raw readings) in their lasting form.
pub const SEGMENTS: &str = "reading_segments";
/// Prefix of the hourly collections of fragments: small segments of open buckets,
/// written by ingest and tier merges, moved into [`SEGMENTS`] when their bucket closes.
pub const FRAGMENTS: &str = "reading_fragments_";
/// How long after its hour a fragment collection may be dropped, once nothing
/// registers a fragment of it: longer than any clock skew between writers is expected
/// to be.
pub const FRAGMENT_HOURS_KEPT: i64 = 2;

/// The collection a fragment made at `id`'s creation time lives in:
/// `reading_fragments_YYYYMMDDHH` (UTC).
pub fn fragments_collection(id: ObjectId) -> String {
    let made = chrono::DateTime::<chrono::Utc>::from_timestamp(
        i64::from(u32::from_be_bytes(
            id.bytes()[..4].try_into().expect("4 bytes"),
        )),
        0,
    )
    .unwrap_or_default();
    format!("{FRAGMENTS}{}", made.format("%Y%m%d%H"))
}

/// A registered segment: its `_id` and where it lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct DocRef {
    /// The `_id`.
    pub id: ObjectId,
    /// In a fragment collection, not [`SEGMENTS`].
    pub fragment: bool,
}

impl DocRef {
    /// From the index's bytes.
    pub(crate) fn from_row(doc: &[u8], fragment: bool) -> Result<Self, StoreError> {
        let id = <[u8; 12]>::try_from(doc)
            .map(ObjectId::from_bytes)
            .map_err(|_| StoreError::Corrupt("a registered segment id is not 12 bytes".into()))?;
        Ok(Self { id, fragment })
    }
}
/// Collection of refused messages and readings.
pub const DEAD_LETTERS: &str = "dead_letters";
/// Most readings in one segment: a history page of 50 costs the fetch of a document of
/// at most this many (the embedded FerretDB pays per byte it returns).
pub const SEGMENT_READINGS: usize = 256;
/// Most bytes of readings in one segment (extra fields can be large), unless one reading
/// alone is larger. Far below MongoDB's 16 MiB.
pub const SEGMENT_BYTES: usize = 1 << 20;

/// A store failed. Every variant but [`StoreError::Corrupt`] is worth retrying: the data
/// is kept by the caller and nothing half-applied is lost (see the module docs).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// PostgreSQL failed.
    #[error("PostgreSQL: {0}")]
    Postgres(#[from] sqlx::Error),
    /// MongoDB failed.
    #[error("MongoDB: {0}")]
    Mongo(#[from] mongodb::error::Error),
    /// A raw document cannot be read back, or is missing although registered.
    #[error("raw store: {0}")]
    Corrupt(String),
}

impl From<codec::CodecError> for StoreError {
    fn from(e: codec::CodecError) -> Self {
        Self::Corrupt(e.to_string())
    }
}

impl StoreError {
    /// True when a store could not be reached (the caller answers 503 or retries).
    pub fn is_unavailable(&self) -> bool {
        match self {
            Self::Postgres(e) => crate::db::is_unavailable(e),
            Self::Mongo(e) => crate::mongo::is_unavailable(e),
            Self::Corrupt(_) => false,
        }
    }
}

pub use crate::settings::StoreTuning as Tuning;

/// The reading store. Cheap to clone; clones share caches.
#[derive(Clone)]
pub struct ReadingStore {
    pg: PgPool,
    db: Database,
    segments: Collection<RawDocumentBuf>,
    dead_letters: Collection<Document>,
    legacy: Collection<Document>,
    latest: LatestCache,
    recent: moka::sync::Cache<ObjectId, Arc<Segment>>,
    on_change: Option<ChangeHook>,
    tuning: Tuning,
}

impl ReadingStore {
    /// A store over PostgreSQL (migrated) and a MongoDB database.
    pub fn new(pg: PgPool, mongo: &Database) -> Self {
        Self::with_tuning(pg, mongo, Tuning::default())
    }

    /// A store with explicit tuning.
    pub fn with_tuning(pg: PgPool, mongo: &Database, tuning: Tuning) -> Self {
        Self {
            pg,
            db: mongo.clone(),
            segments: mongo.collection(SEGMENTS),
            dead_letters: mongo.collection(DEAD_LETTERS),
            legacy: mongo.collection(codec::legacy::COLLECTION),
            latest: LatestCache::new(Duration::from_secs(1)),
            recent: moka::sync::Cache::builder()
                .max_capacity(tuning.cache_readings)
                .weigher(|_, s: &Arc<Segment>| s.readings.len().try_into().unwrap_or(u32::MAX))
                .time_to_live(Duration::from_secs(30 * 60))
                .build(),
            on_change: None,
            tuning,
        }
    }

    /// Calls `hook` after every commit that changed buckets of possibly finished days.
    pub fn with_change_hook(mut self, hook: ChangeHook) -> Self {
        self.on_change = Some(hook);
        self
    }

    /// Serves latest readings through `cache` (edge mode shares the API's, so what the
    /// consumer commits is current there at once).
    pub fn with_latest_cache(mut self, cache: LatestCache) -> Self {
        self.latest = cache;
        self
    }

    /// The collection a segment lives in.
    fn collection(&self, doc: &DocRef) -> Collection<RawDocumentBuf> {
        if doc.fragment {
            self.db.collection(&fragments_collection(doc.id))
        } else {
            self.segments.clone()
        }
    }

    fn changed(&self, changes: &[BucketChange]) {
        if let (Some(hook), false) = (&self.on_change, changes.is_empty()) {
            hook(changes);
        }
    }
}

impl ReadingStore {
    /// What every process that stores readings does at start, before storing any:
    /// creates the segment collection, warns when the document store cannot look
    /// segments up by `_id` without scanning, and moves readings a previous version
    /// stored (see [`migrate`]).
    pub async fn prepare(&self) -> Result<MigrationReport, StoreError> {
        let db = &self.db;
        if let Err(e) = db.create_collection(SEGMENTS).await {
            // 48: NamespaceExists.
            if !matches!(*e.kind, mongodb::error::ErrorKind::Command(ref c) if c.code == 48) {
                return Err(e.into());
            }
        }
        self.check_lookups(db).await?;
        self.migrate_legacy().await
    }

    /// Asks the document store how it would find a segment by `_id`. FerretDB 1.24.2 as
    /// released scans its whole table for that (see `scripts/services.sh`, which builds
    /// it fixed); real MongoDB uses its `_id` index.
    async fn check_lookups(&self, db: &Database) -> Result<(), StoreError> {
        let explained = db
            .run_command(mongodb::bson::doc! {
                "explain": { "find": SEGMENTS, "filter": { "_id": ObjectId::new() } },
            })
            .await?;
        let plan: Vec<String> = explained
            .get_document("queryPlanner")
            .ok()
            .and_then(|q| q.get_array("Plan").ok())
            .map(|p| {
                p.iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        let scans = plan.iter().any(|p| p.contains(" SCAN "))
            && !plan.iter().any(|p| p.contains("USING INDEX"));
        metrics::gauge!("raw_store_lookups_scan").set(if scans { 1.0 } else { 0.0 });
        if scans {
            tracing::warn!(
                ?plan,
                "the document store scans its whole collection to find a segment by _id: \
                 history and readings by id will slow down as data grows. This is FerretDB \
                 1.24's SQLite backend as released; scripts/services.sh builds it with the fix"
            );
        }
        Ok(())
    }

    /// Runs the store's background work every `every` until `stop` turns true: deletes
    /// expired segments (recovering from writes that never committed) and merges the
    /// buckets that are due. Several processes may run it at once.
    pub async fn maintain(self, every: Duration, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            if let Err(e) = self.expire_due().await {
                tracing::warn!(error = %e, "deleting expired segments failed; will retry");
            }
            if let Err(e) = self.drop_fragments().await {
                tracing::warn!(error = %e, "dropping fragment collections failed; will retry");
            }
            // A few passes a round at most: a bucket whose merge lost a race stays due.
            for _ in 0..16 {
                match self.compact(chrono::Utc::now()).await {
                    Ok(report) if report.buckets > 0 && !*stop.borrow() => continue,
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "merging segments failed; will retry");
                        break;
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.changed() => return,
            }
        }
    }
}
