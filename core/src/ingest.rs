//! Storing readings: raw documents in MongoDB, each sensor's latest reading and
//! 15-minute rollup buckets in PostgreSQL, exactly once across both stores.
//!
//! # How exactly-once holds
//!
//! MongoDB's unique `_id` (the reading id) makes raw inserts idempotent. The rollups
//! must count each reading once, although no transaction spans both stores. Each call to
//! [`IngestStore::store`] is a *batch*:
//!
//! 1. PostgreSQL: record the batch (`ingest_batches`, with its reading ids) as pending.
//! 2. MongoDB: insert the documents unordered, each tagged with the batch id. Duplicates
//!    (`E11000`) were inserted, and counted, by an earlier batch.
//! 3. PostgreSQL, one transaction: delete the batch row and, only if it was still there,
//!    add the newly inserted readings to the buckets and the latest rows.
//!
//! A crash (or a store outage) between 1 and 3 leaves the batch pending. [`IngestStore::
//! recover`] later finds the documents that carry that batch id, which are exactly the
//! ones the batch inserted, and applies step 3 for them. Whoever deletes the batch row
//! applies its rollup; nobody else can. Retrying a failed `store` uses a new batch, for
//! which the earlier documents are duplicates. Buckets can always be recomputed from the
//! raw documents ([`IngestStore::recompute_bucket`]).

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use mongodb::{
    bson::{self, doc, Binary, Bson, Document},
    error::ErrorKind,
    options::IndexOptions,
    Collection, Database, IndexModel,
};
use serde_json::{Map, Value};
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

use crate::{
    ids::{ClientId, SensorId},
    latest::LatestCache,
    reading::{Reading, RejectReason},
};

/// Collection of raw readings.
pub const READINGS: &str = "readings";
/// Collection of refused messages and readings.
pub const DEAD_LETTERS: &str = "dead_letters";
/// Width of a rollup bucket.
pub const BUCKET_MINUTES: i64 = 15;
/// Largest part of a refused payload kept in a dead letter.
pub const DEAD_LETTER_PAYLOAD_BYTES: usize = 64 * 1024;
/// Advisory-lock class of per-sensor rollup locks: ingestion takes them shared, a
/// recomputation exclusive (see [`IngestStore::recompute_bucket`]).
const ROLLUP_LOCK_CLASS: i32 = 0x7470_0001;

/// A store failed. Every variant is worth retrying: the data is kept by the caller and
/// nothing half-applied is lost (see the module docs).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// PostgreSQL failed.
    #[error("PostgreSQL: {0}")]
    Postgres(#[from] sqlx::Error),
    /// MongoDB failed.
    #[error("MongoDB: {0}")]
    Mongo(#[from] mongodb::error::Error),
}

/// What a [`IngestStore::store`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StoreOutcome {
    /// Readings stored now.
    pub inserted: usize,
    /// Readings already stored before (redeliveries, replays).
    pub duplicates: usize,
    /// Readings the document store refused, by index into the input, with its message.
    /// Callers dead-letter them; they are not retried.
    pub refused: Vec<(usize, String)>,
}

/// A refused message or reading, kept for inspection and replay.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Where it came from: `mqtt` or `http`.
    pub source: &'static str,
    /// The MQTT topic, when it came over MQTT.
    pub topic: Option<String>,
    /// The sensor, when known.
    pub sensor_id: Option<SensorId>,
    /// The raw payload (truncated to [`DEAD_LETTER_PAYLOAD_BYTES`] when stored).
    pub payload: Vec<u8>,
    /// Why.
    pub reason: RejectReason,
    /// Details.
    pub detail: String,
    /// Element index within an array payload.
    pub index: Option<usize>,
    /// When it was received.
    pub received_at: DateTime<Utc>,
}

/// One reading as the rollups need it.
struct RollupRow {
    id: Uuid,
    sensor_id: Uuid,
    client_id: Uuid,
    ts: DateTime<Utc>,
    temperature: f64,
    received_at: DateTime<Utc>,
    extra: Value,
}

impl RollupRow {
    fn stored(&self) -> StoredReading {
        StoredReading {
            id: self.id,
            sensor_id: SensorId(self.sensor_id),
            client_id: ClientId(self.client_id),
            ts: self.ts,
            temperature: self.temperature,
            received_at: self.received_at,
            extra: match &self.extra {
                Value::Object(m) => m.clone(),
                _ => Map::new(),
            },
        }
    }
}

impl From<&Reading> for RollupRow {
    fn from(r: &Reading) -> Self {
        Self {
            id: r.id,
            sensor_id: r.sensor_id.0,
            client_id: r.client_id.0,
            ts: r.ts,
            temperature: r.temperature.get(),
            received_at: r.received_at,
            extra: Value::Object(r.extra.clone()),
        }
    }
}

/// The two stores behind ingestion. Cheap to clone.
#[derive(Clone)]
pub struct IngestStore {
    pg: PgPool,
    readings: Collection<Document>,
    dead_letters: Collection<Document>,
    latest: Option<LatestCache>,
    on_change: Option<ChangeHook>,
}

/// Called after a commit with the buckets of finished days it changed, so caches in
/// this process forget them at once (other processes learn from NOTIFY).
pub type ChangeHook = std::sync::Arc<dyn Fn(&[BucketChange]) + Send + Sync>;

/// A BSON date (milliseconds) from a UTC time.
pub fn bson_time(t: DateTime<Utc>) -> bson::DateTime {
    bson::DateTime::from_millis(t.timestamp_millis())
}

fn chrono_time(t: bson::DateTime) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(t.timestamp_millis()).unwrap_or_default()
}

/// The raw document of a reading.
fn reading_doc(r: &Reading, batch: Uuid) -> Document {
    doc! {
        "_id": r.id.to_string(),
        "sensor_id": r.sensor_id.to_string(),
        "client_id": r.client_id.to_string(),
        "ts": bson_time(r.ts),
        "temperature": r.temperature.get(),
        "received_at": bson_time(r.received_at),
        "batch": batch.to_string(),
        // Validated at parse time to be representable (see reading::check_extra).
        "extra": bson::to_bson(&r.extra).unwrap_or_else(|_| Bson::Document(Document::new())),
    }
}

/// A stored reading read back from MongoDB.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredReading {
    /// Reading id.
    pub id: Uuid,
    /// Sensor.
    pub sensor_id: SensorId,
    /// Client.
    pub client_id: ClientId,
    /// Measurement time.
    pub ts: DateTime<Utc>,
    /// Degrees Celsius.
    pub temperature: f64,
    /// Receive time.
    pub received_at: DateTime<Utc>,
    /// Extra fields.
    pub extra: Map<String, Value>,
}

impl StoredReading {
    /// Decodes a document of the `readings` collection.
    pub fn from_doc(d: &Document) -> Option<Self> {
        let uuid = |k: &str| d.get_str(k).ok().and_then(|s| Uuid::parse_str(s).ok());
        let extra = match d.get("extra") {
            Some(b) => match b.clone().into_relaxed_extjson() {
                Value::Object(m) => m,
                _ => Map::new(),
            },
            None => Map::new(),
        };
        Some(Self {
            id: uuid("_id")?,
            sensor_id: SensorId(uuid("sensor_id")?),
            client_id: ClientId(uuid("client_id")?),
            ts: chrono_time(*d.get_datetime("ts").ok()?),
            temperature: d.get_f64("temperature").ok()?,
            received_at: chrono_time(*d.get_datetime("received_at").ok()?),
            extra,
        })
    }

    fn rollup_row(&self) -> RollupRow {
        RollupRow {
            id: self.id,
            sensor_id: self.sensor_id.0,
            client_id: self.client_id.0,
            ts: self.ts,
            temperature: self.temperature,
            received_at: self.received_at,
            extra: Value::Object(self.extra.clone()),
        }
    }
}

impl IngestStore {
    /// A store over PostgreSQL (migrated) and a MongoDB database.
    pub fn new(pg: PgPool, mongo: &Database) -> Self {
        Self {
            pg,
            readings: mongo.collection(READINGS),
            dead_letters: mongo.collection(DEAD_LETTERS),
            latest: None,
            on_change: None,
        }
    }

    /// Calls `hook` after every commit that changed buckets of possibly finished days.
    pub fn with_change_hook(mut self, hook: ChangeHook) -> Self {
        self.on_change = Some(hook);
        self
    }

    fn changed(&self, changes: &[BucketChange]) {
        if let (Some(hook), false) = (&self.on_change, changes.is_empty()) {
            hook(changes);
        }
    }

    /// Offers every new latest reading this store commits to `cache` (edge mode shares
    /// the API's cache, so the latest reading is current without a short TTL).
    pub fn with_latest_cache(mut self, cache: LatestCache) -> Self {
        self.latest = Some(cache);
        self
    }

    async fn offer_latest(&self, winners: Vec<StoredReading>) {
        if let Some(cache) = &self.latest {
            for w in winners {
                cache.offer(w).await;
            }
        }
    }

    /// The raw readings collection.
    pub fn readings(&self) -> &Collection<Document> {
        &self.readings
    }

    /// The dead-letter collection.
    pub fn dead_letters(&self) -> &Collection<Document> {
        &self.dead_letters
    }

    /// The PostgreSQL pool.
    pub fn pg(&self) -> &PgPool {
        &self.pg
    }

    /// Creates the MongoDB indexes (idempotent): readings by sensor and time (history
    /// pages, recomputation), dead letters by time.
    pub async fn ensure_indexes(&self) -> Result<(), StoreError> {
        self.readings
            .create_index(
                IndexModel::builder()
                    .keys(doc! { "sensor_id": 1, "ts": -1, "_id": -1 })
                    .options(IndexOptions::builder().name("sensor_ts".to_owned()).build())
                    .build(),
            )
            .await?;
        self.dead_letters
            .create_index(
                IndexModel::builder()
                    .keys(doc! { "received_at": -1 })
                    .options(
                        IndexOptions::builder()
                            .name("received_at".to_owned())
                            .build(),
                    )
                    .build(),
            )
            .await?;
        Ok(())
    }

    /// Stores readings once each; see the module docs. Safe to call again with the same
    /// readings after any error.
    pub async fn store(&self, readings: &[Reading]) -> Result<StoreOutcome, StoreError> {
        if readings.is_empty() {
            return Ok(StoreOutcome::default());
        }
        let started = Instant::now();
        // The same reading twice in one call is stored once.
        let mut seen = HashSet::with_capacity(readings.len());
        let unique: Vec<(usize, &Reading)> = readings
            .iter()
            .enumerate()
            .filter(|(_, r)| seen.insert(r.id))
            .collect();
        let mut outcome = StoreOutcome {
            duplicates: readings.len() - unique.len(),
            ..Default::default()
        };

        let batch = Uuid::new_v4();
        let ids: Vec<Uuid> = unique.iter().map(|(_, r)| r.id).collect();
        sqlx::query("INSERT INTO ingest_batches (id, reading_ids) VALUES ($1, $2)")
            .bind(batch)
            .bind(&ids)
            .execute(&self.pg)
            .await?;

        let docs: Vec<Document> = unique.iter().map(|(_, r)| reading_doc(r, batch)).collect();
        let mut not_new: HashSet<usize> = HashSet::new();
        if let Err(e) = self.readings.insert_many(docs).ordered(false).await {
            match *e.kind {
                ErrorKind::InsertMany(ref failure) if failure.write_concern_error.is_none() => {
                    for we in failure.write_errors.iter().flatten() {
                        not_new.insert(we.index);
                        if we.code == crate::mongo::DUPLICATE_KEY {
                            outcome.duplicates += 1;
                        } else {
                            outcome
                                .refused
                                .push((unique[we.index].0, we.message.clone()));
                        }
                    }
                }
                // Unknown what was inserted: the batch stays pending for `recover`.
                _ => return Err(e.into()),
            }
        }
        let new: Vec<RollupRow> = unique
            .iter()
            .enumerate()
            .filter(|(i, _)| !not_new.contains(i))
            .map(|(_, (_, r))| RollupRow::from(*r))
            .collect();
        outcome.inserted = new.len();

        let mut tx = self.pg.begin().await?;
        let claimed = sqlx::query("DELETE FROM ingest_batches WHERE id = $1")
            .bind(batch)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        // Zero when a slow store was overtaken by `recover`, which then rolled it up.
        let (winners, changes) = if claimed == 1 {
            apply_rollups(&mut tx, &new).await?
        } else {
            Default::default()
        };
        tx.commit().await?;
        self.changed(&changes);
        self.offer_latest(winners).await;

        metrics::histogram!("ingest_store_seconds").record(started.elapsed().as_secs_f64());
        metrics::histogram!("ingest_batch_readings").record(readings.len() as f64);
        metrics::counter!("readings_stored_total").increment(outcome.inserted as u64);
        metrics::counter!("readings_duplicate_total").increment(outcome.duplicates as u64);
        Ok(outcome)
    }

    /// Rolls up batches left pending for longer than `older_than` by a crash or an
    /// outage. Returns how many batches it finished.
    pub async fn recover(&self, older_than: Duration) -> Result<usize, StoreError> {
        let mut finished = 0;
        loop {
            let mut tx = self.pg.begin().await?;
            let pending: Vec<(Uuid, Vec<Uuid>)> = sqlx::query_as(
                "SELECT id, reading_ids FROM ingest_batches
                 WHERE created_at < now() - make_interval(secs => $1)
                 ORDER BY created_at LIMIT 20 FOR UPDATE SKIP LOCKED",
            )
            .bind(older_than.as_secs_f64())
            .fetch_all(&mut *tx)
            .await?;
            if pending.is_empty() {
                tx.commit().await?;
                return Ok(finished);
            }
            let mut winners = Vec::new();
            let mut changes = Vec::new();
            for (batch, ids) in &pending {
                let ids: Vec<String> = ids.iter().map(Uuid::to_string).collect();
                let mut cursor = self
                    .readings
                    .find(doc! { "_id": { "$in": ids }, "batch": batch.to_string() })
                    .await?;
                let mut rows = Vec::new();
                while cursor.advance().await? {
                    let d = Document::try_from(cursor.current())
                        .map_err(mongodb::error::Error::from)?;
                    if let Some(r) = StoredReading::from_doc(&d) {
                        rows.push(r.rollup_row());
                    }
                }
                let (w, c) = apply_rollups(&mut tx, &rows).await?;
                winners.extend(w);
                changes.extend(c);
                sqlx::query("DELETE FROM ingest_batches WHERE id = $1")
                    .bind(batch)
                    .execute(&mut *tx)
                    .await?;
                tracing::info!(%batch, readings = rows.len(), "recovered a pending ingest batch");
            }
            tx.commit().await?;
            self.changed(&changes);
            self.offer_latest(winners).await;
            finished += pending.len();
            metrics::counter!("ingest_batches_recovered_total").increment(pending.len() as u64);
        }
    }

    /// Recomputes one bucket of a sensor from the raw readings and replaces it. Readings
    /// of batches still pending are left out: their rollup is still to come.
    pub async fn recompute_bucket(
        &self,
        sensor: SensorId,
        bucket: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let mut tx = self.pg.begin().await?;
        // Exclusive: no ingestion for this sensor commits while we read and replace.
        lock_sensor(&mut tx, sensor).await?;
        let end = bucket + chrono::Duration::minutes(BUCKET_MINUTES);
        let mut cursor = self
            .readings
            .find(doc! {
                "sensor_id": sensor.to_string(),
                "ts": { "$gte": bson_time(bucket), "$lt": bson_time(end) },
            })
            .projection(doc! { "temperature": 1, "batch": 1 })
            .await?;
        let mut temps = Vec::new();
        let mut batches = Vec::new();
        while cursor.advance().await? {
            let d = Document::try_from(cursor.current()).map_err(mongodb::error::Error::from)?;
            if let Ok(t) = d.get_f64("temperature") {
                temps.push(t);
                batches.push(d.get_str("batch").unwrap_or_default().to_owned());
            }
        }
        let pending: HashSet<String> =
            sqlx::query_scalar::<_, Uuid>("SELECT id FROM ingest_batches")
                .fetch_all(&mut *tx)
                .await?
                .into_iter()
                .map(|id| id.to_string())
                .collect();
        let temps: Vec<f64> = temps
            .into_iter()
            .zip(batches)
            .filter(|(_, b)| !pending.contains(b))
            .map(|(t, _)| t)
            .collect();
        let change = notify_changed(&mut tx, &[(sensor.0, bucket, bucket)]).await?;
        if temps.is_empty() {
            sqlx::query("DELETE FROM reading_buckets WHERE sensor_id = $1 AND bucket = $2")
                .bind(sensor.0)
                .bind(bucket)
                .execute(&mut *tx)
                .await?;
        } else {
            sqlx::query(
                "INSERT INTO reading_buckets AS b (sensor_id, bucket, count, sum, min, max)
                 SELECT $1, $2, count(*), sum(t::numeric), min(t), max(t) FROM unnest($3::float8[]) t
                 WHERE EXISTS (SELECT 1 FROM sensors WHERE id = $1)
                 ON CONFLICT (sensor_id, bucket) DO UPDATE SET
                    count = excluded.count, sum = excluded.sum, min = excluded.min, max = excluded.max",
            )
            .bind(sensor.0)
            .bind(bucket)
            .bind(&temps)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        self.changed(&change);
        Ok(())
    }

    /// A stored reading by id.
    pub async fn find(&self, id: Uuid) -> Result<Option<StoredReading>, StoreError> {
        Ok(self
            .readings
            .find_one(doc! { "_id": id.to_string() })
            .await?
            .and_then(|d| StoredReading::from_doc(&d)))
    }

    /// Sets a reading's temperature (an admin correction; the first original value is
    /// kept in `original_temperature`) and brings its bucket, the latest row and the
    /// caches up to date. Returns the corrected reading, or `None` if there is none.
    pub async fn correct(
        &self,
        id: Uuid,
        temperature: f64,
    ) -> Result<Option<StoredReading>, StoreError> {
        let Some(before) = self.find(id).await? else {
            return Ok(None);
        };
        let mut set = doc! { "temperature": temperature, "corrected_at": bson_time(Utc::now()) };
        if before.extra.get("original_temperature").is_none() {
            set.insert("extra.original_temperature", before.temperature);
        }
        self.readings
            .update_one(doc! { "_id": id.to_string() }, doc! { "$set": set })
            .await?;
        self.refresh_sensor(before.sensor_id, bucket_of(before.ts))
            .await?;
        self.find(id).await
    }

    /// Deletes a reading and brings its bucket, the latest row and the caches up to
    /// date. Returns the deleted reading, or `None` if there was none.
    pub async fn delete(&self, id: Uuid) -> Result<Option<StoredReading>, StoreError> {
        let Some(before) = self.find(id).await? else {
            return Ok(None);
        };
        self.readings
            .delete_one(doc! { "_id": id.to_string() })
            .await?;
        self.refresh_sensor(before.sensor_id, bucket_of(before.ts))
            .await?;
        Ok(Some(before))
    }

    async fn refresh_sensor(
        &self,
        sensor: SensorId,
        bucket: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.recompute_bucket(sensor, bucket).await?;
        self.recompute_latest(sensor).await?;
        if let Some(cache) = &self.latest {
            cache.invalidate(sensor).await;
        }
        Ok(())
    }

    /// Recomputes a sensor's latest row from the raw readings.
    pub async fn recompute_latest(&self, sensor: SensorId) -> Result<(), StoreError> {
        let mut tx = self.pg.begin().await?;
        lock_sensor(&mut tx, sensor).await?;
        let newest = self
            .readings
            .find_one(doc! { "sensor_id": sensor.to_string() })
            .sort(doc! { "ts": -1, "_id": -1 })
            .await?
            .and_then(|d| StoredReading::from_doc(&d));
        match newest {
            None => {
                sqlx::query("DELETE FROM sensor_latest WHERE sensor_id = $1")
                    .bind(sensor.0)
                    .execute(&mut *tx)
                    .await?;
            }
            Some(r) => {
                sqlx::query(
                    "INSERT INTO sensor_latest (sensor_id, reading_id, ts, temperature, received_at, extra)
                     SELECT $1, $2, $3, $4, $5, $6 WHERE EXISTS (SELECT 1 FROM sensors WHERE id = $1)
                     ON CONFLICT (sensor_id) DO UPDATE SET reading_id = excluded.reading_id,
                        ts = excluded.ts, temperature = excluded.temperature,
                        received_at = excluded.received_at, extra = excluded.extra, updated_at = now()",
                )
                .bind(sensor.0)
                .bind(r.id)
                .bind(r.ts)
                .bind(r.temperature)
                .bind(r.received_at)
                .bind(Value::Object(r.extra))
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    /// Stores dead letters.
    pub async fn dead_letter(&self, letters: &[DeadLetter]) -> Result<(), StoreError> {
        if letters.is_empty() {
            return Ok(());
        }
        let docs: Vec<Document> = letters
            .iter()
            .map(|l| {
                let kept = &l.payload[..l.payload.len().min(DEAD_LETTER_PAYLOAD_BYTES)];
                let mut d = doc! {
                    "_id": Uuid::new_v4().to_string(),
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
        self.dead_letters.insert_many(docs).ordered(false).await?;
        for l in letters {
            metrics::counter!("readings_rejected_total", "reason" => l.reason.as_str())
                .increment(1);
        }
        Ok(())
    }
}

/// Takes the exclusive per-sensor rollup lock for the rest of the transaction: no
/// ingestion for this sensor commits meanwhile (ingestion takes it shared).
async fn lock_sensor(
    tx: &mut Transaction<'_, Postgres>,
    sensor: SensorId,
) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2::text))")
        .bind(ROLLUP_LOCK_CLASS)
        .bind(sensor.0)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Adds readings to the buckets and the latest rows. Readings of sensors deleted in the
/// meantime are skipped (their raw documents remain in MongoDB).
async fn apply_rollups(
    tx: &mut Transaction<'_, Postgres>,
    rows: &[RollupRow],
) -> Result<(Vec<StoredReading>, Vec<BucketChange>), sqlx::Error> {
    if rows.is_empty() {
        return Ok(Default::default());
    }
    let mut sensors: Vec<Uuid> = rows
        .iter()
        .map(|r| r.sensor_id)
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    sensors.sort();
    // Shared: ingesters never wait for each other here, only for a recomputation.
    sqlx::query(
        "SELECT pg_advisory_xact_lock_shared($1, hashtext(s::text)) FROM unnest($2::uuid[]) s ORDER BY s",
    )
    .bind(ROLLUP_LOCK_CLASS)
    .bind(&sensors)
    .execute(&mut **tx)
    .await?;

    let sensor_ids: Vec<Uuid> = rows.iter().map(|r| r.sensor_id).collect();
    let ts: Vec<DateTime<Utc>> = rows.iter().map(|r| r.ts).collect();
    let temps: Vec<f64> = rows.iter().map(|r| r.temperature).collect();
    // Rows in a fixed order, so concurrent ingesters lock buckets in the same order.
    sqlx::query(
        "INSERT INTO reading_buckets AS b (sensor_id, bucket, count, sum, min, max)
         SELECT r.s, date_bin('15 minutes', r.ts, TIMESTAMPTZ '2000-01-01 00:00:00+00') AS bucket,
                count(*), sum(r.t::numeric), min(r.t), max(r.t)
         FROM unnest($1::uuid[], $2::timestamptz[], $3::float8[]) AS r(s, ts, t)
         JOIN sensors ON sensors.id = r.s
         GROUP BY r.s, bucket
         ORDER BY r.s, bucket
         ON CONFLICT (sensor_id, bucket) DO UPDATE SET
            count = b.count + excluded.count,
            sum = b.sum + excluded.sum,
            min = least(b.min, excluded.min),
            max = greatest(b.max, excluded.max)",
    )
    .bind(&sensor_ids)
    .bind(&ts)
    .bind(&temps)
    .execute(&mut **tx)
    .await?;

    // Only the newest reading per sensor goes to the latest row.
    let mut newest: HashMap<Uuid, &RollupRow> = HashMap::new();
    for r in rows {
        let slot = newest.entry(r.sensor_id).or_insert(r);
        if (r.ts, r.id) > (slot.ts, slot.id) {
            *slot = r;
        }
    }
    let mut newest: Vec<&RollupRow> = newest.into_values().collect();
    newest.sort_by_key(|r| r.sensor_id);
    let won: Vec<(Uuid, Uuid)> = sqlx::query_as(
        "INSERT INTO sensor_latest AS l (sensor_id, reading_id, ts, temperature, received_at, extra)
         SELECT r.s, r.id, r.ts, r.t, r.received_at, r.extra
         FROM unnest($1::uuid[], $2::uuid[], $3::timestamptz[], $4::float8[], $5::timestamptz[], $6::jsonb[])
              AS r(s, id, ts, t, received_at, extra)
         JOIN sensors ON sensors.id = r.s
         ORDER BY r.s
         ON CONFLICT (sensor_id) DO UPDATE SET
            reading_id = excluded.reading_id, ts = excluded.ts, temperature = excluded.temperature,
            received_at = excluded.received_at, extra = excluded.extra, updated_at = now()
         WHERE (excluded.ts, excluded.reading_id) > (l.ts, l.reading_id)
         RETURNING l.sensor_id, l.reading_id",
    )
    .bind(newest.iter().map(|r| r.sensor_id).collect::<Vec<_>>())
    .bind(newest.iter().map(|r| r.id).collect::<Vec<_>>())
    .bind(newest.iter().map(|r| r.ts).collect::<Vec<_>>())
    .bind(newest.iter().map(|r| r.temperature).collect::<Vec<_>>())
    .bind(newest.iter().map(|r| r.received_at).collect::<Vec<_>>())
    .bind(newest.iter().map(|r| r.extra.clone()).collect::<Vec<_>>())
    .fetch_all(&mut **tx)
    .await?;

    // Late readings change days that may be finished and cached somewhere.
    let late_before = Utc::now() - chrono::Duration::from_std(LATE_AFTER).expect("small");
    let mut late: HashMap<Uuid, (DateTime<Utc>, DateTime<Utc>)> = HashMap::new();
    for r in rows.iter().filter(|r| r.ts < late_before) {
        let b = bucket_of(r.ts);
        let span = late.entry(r.sensor_id).or_insert((b, b));
        span.0 = span.0.min(b);
        span.1 = span.1.max(b);
    }
    let late: Vec<(Uuid, DateTime<Utc>, DateTime<Utc>)> =
        late.into_iter().map(|(s, (a, b))| (s, a, b)).collect();
    let changes = notify_changed(tx, &late).await?;

    let winners = newest
        .into_iter()
        .filter(|r| won.contains(&(r.sensor_id, r.id)))
        .map(RollupRow::stored)
        .collect();
    Ok((winners, changes))
}

/// Readings older than this are "late": they may land in a day some cache considers
/// finished, so their buckets are announced on [`BUCKETS_CHANNEL`].
pub const LATE_AFTER: Duration = Duration::from_secs(3600);
/// PostgreSQL NOTIFY channel announcing changed buckets of finished days, as JSON
/// `[{"sensor_id", "from", "to"}]` (bucket starts, inclusive), or `"*"` for everything.
pub const BUCKETS_CHANNEL: &str = "termopar_buckets";

/// A change announced on [`BUCKETS_CHANNEL`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BucketChange {
    /// The sensor.
    pub sensor_id: Uuid,
    /// First changed bucket.
    pub from: DateTime<Utc>,
    /// Last changed bucket.
    pub to: DateTime<Utc>,
}

/// Announces changed buckets (delivered when the transaction commits); returns them.
async fn notify_changed(
    tx: &mut Transaction<'_, Postgres>,
    changes: &[(Uuid, DateTime<Utc>, DateTime<Utc>)],
) -> Result<Vec<BucketChange>, sqlx::Error> {
    if changes.is_empty() {
        return Ok(Vec::new());
    }
    let changes: Vec<BucketChange> = changes
        .iter()
        .map(|&(sensor_id, from, to)| BucketChange {
            sensor_id,
            from,
            to,
        })
        .collect();
    let mut payload = serde_json::to_string(&changes).expect("serializable");
    // NOTIFY payloads are limited to 8000 bytes.
    if payload.len() > 7900 {
        payload = "\"*\"".to_owned();
    }
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(BUCKETS_CHANNEL)
        .bind(payload)
        .execute(&mut **tx)
        .await?;
    Ok(changes)
}

/// The start of the 15-minute bucket holding `t` (the same `date_bin` the SQL uses).
pub fn bucket_of(t: DateTime<Utc>) -> DateTime<Utc> {
    let width = BUCKET_MINUTES * 60;
    let secs = t.timestamp().div_euclid(width) * width;
    DateTime::from_timestamp(secs, 0).expect("in range")
}
