//! Storing readings exactly once, and deleting what expired (the segments of writes
//! that never committed, and those merges and corrections replaced).

use std::{
    collections::{BTreeMap, HashSet},
    sync::{Arc, LazyLock},
    time::Instant,
};

use chrono::{DateTime, Utc};
use mongodb::{
    bson::{doc, oid::ObjectId, Bson, RawDocumentBuf},
    error::ErrorKind,
};
use uuid::Uuid;

use super::{
    codec::{bucket_of, offset_in_bucket, Segment},
    rollups::{late_changes, BUCKETS_CHANNEL},
    DocRef, ReadingStore, StoreError, SEGMENTS, SEGMENT_BYTES, SEGMENT_READINGS,
};
use crate::{ids::SensorId, reading::Reading};

/// What a [`ReadingStore::store`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StoreOutcome {
    /// Readings stored now.
    pub inserted: usize,
    /// Readings already stored before (redeliveries, replays).
    pub duplicates: usize,
    /// The ids of readings stored before this call (repeats within the call count once,
    /// and are not here).
    pub already_stored: Vec<Uuid>,
    /// How many readings each sensor this call stored readings of has in all, as its
    /// own commit left them (those of writers that committed first included): a reader
    /// that knew the count before can tell whether anyone else stored meanwhile.
    pub sensor_counts: Vec<(SensorId, i64)>,
    /// Readings that cannot be stored, by index into the input, with the reason (the
    /// document store refused them, or their sensor was deleted meanwhile). Callers
    /// dead-letter them; they are not retried.
    pub refused: Vec<(usize, String)>,
}

/// How many times a store call starts over after another writer claimed one of its
/// reading ids first, before it reports the conflict as an error.
const RACE_RETRIES: usize = 5;

/// One segment about to be written: its readings as indexes into the input.
struct Planned {
    id: ObjectId,
    members: Vec<usize>,
}

impl Planned {
    /// Small segments are fragments, merged later (see [`super::FRAGMENTS`]); the rest
    /// are written in their lasting form.
    fn is_fragment(&self) -> bool {
        self.members.len() < SEGMENT_READINGS / 2
    }
}

/// A readings' size in a segment, for the byte cap: the columns and the extra fields.
fn weight(r: &Reading) -> usize {
    36 + if r.extra.is_empty() {
        0
    } else {
        serde_json::to_vec(&r.extra)
            .map(|v| v.len() + 8)
            .unwrap_or(0)
    }
}

/// Splits readings of one sensor and bucket (sorted) into segments of at most
/// [`SEGMENT_READINGS`] readings and [`SEGMENT_BYTES`].
pub(super) fn chunks<T>(items: Vec<T>, weigh: impl Fn(&T) -> usize) -> Vec<Vec<T>> {
    let mut out: Vec<Vec<T>> = Vec::new();
    let mut bytes = 0;
    for item in items {
        let w = weigh(&item);
        match out.last_mut() {
            Some(last) if last.len() < SEGMENT_READINGS && bytes + w <= SEGMENT_BYTES => {
                bytes += w;
                last.push(item);
            }
            _ => {
                bytes = w;
                out.push(vec![item]);
            }
        }
    }
    out
}

/// The readings' segments: grouped by sensor and bucket, sorted, cut by the caps, each
/// with a fresh `_id`. `ids` gives each group the `_id`s to use, in order (so a plan made
/// after leaving out duplicates reuses the `_id`s recorded as expiring before).
fn plan(
    readings: &[&Reading],
    keep: impl Fn(usize) -> bool,
    ids: &mut BTreeMap<(SensorId, DateTime<Utc>), Vec<ObjectId>>,
) -> Vec<Planned> {
    let mut groups: BTreeMap<(SensorId, DateTime<Utc>), Vec<usize>> = BTreeMap::new();
    for (i, r) in readings.iter().enumerate().filter(|(i, _)| keep(*i)) {
        groups
            .entry((r.sensor_id, bucket_of(r.ts)))
            .or_default()
            .push(i);
    }
    let mut out = Vec::new();
    for (key, mut members) in groups {
        members.sort_by_key(|&i| (readings[i].ts, readings[i].id));
        let ids = ids.entry(key).or_default();
        for (n, members) in chunks(members, |&i| weight(readings[i]))
            .into_iter()
            .enumerate()
        {
            if ids.len() <= n {
                ids.push(ObjectId::new());
            }
            out.push(Planned {
                id: ids[n],
                members,
            });
        }
    }
    out
}

impl ReadingStore {
    /// Stores readings once each; see the module docs. Safe to call again with the same
    /// readings after any error.
    #[tracing::instrument(skip_all, fields(readings = readings.len()))]
    pub async fn store(&self, readings: &[Reading]) -> Result<StoreOutcome, StoreError> {
        if readings.is_empty() {
            return Ok(StoreOutcome::default());
        }
        let started = Instant::now();
        // The same reading twice in one call is stored once.
        let mut seen = HashSet::with_capacity(readings.len());
        let (positions, unique): (Vec<usize>, Vec<&Reading>) = readings
            .iter()
            .enumerate()
            .filter(|(_, r)| seen.insert(r.id))
            .unzip();
        let mut attempt = 0;
        let mut outcome = loop {
            match self.store_unique(&unique).await? {
                Some(outcome) => break outcome,
                None if attempt < RACE_RETRIES => attempt += 1,
                None => {
                    return Err(StoreError::Corrupt(
                        "other writers kept claiming these reading ids first".into(),
                    ))
                }
            }
        };
        outcome.duplicates += readings.len() - unique.len();
        for refused in &mut outcome.refused {
            refused.0 = positions[refused.0];
        }
        metrics::histogram!("ingest_store_seconds").record(started.elapsed().as_secs_f64());
        metrics::histogram!("ingest_batch_readings").record(readings.len() as f64);
        metrics::counter!("readings_stored_total").increment(outcome.inserted as u64);
        metrics::counter!("readings_duplicate_total").increment(outcome.duplicates as u64);
        Ok(outcome)
    }

    /// One attempt; `None` when another writer claimed one of the ids meanwhile (the
    /// caller starts over: this attempt registered nothing).
    async fn store_unique(
        &self,
        readings: &[&Reading],
    ) -> Result<Option<StoreOutcome>, StoreError> {
        // 1. Record every segment this call may write as expiring, and learn which
        //    readings are stored already.
        let mut ids = BTreeMap::new();
        let all = plan(readings, |_| true, &mut ids);
        // A plan made after leaving duplicates out has at most as many segments per
        // group, and smaller ones: each may become a fragment, so every `_id` is named
        // as both kinds may be (a document that never exists is deleted harmlessly).
        let expiring: Vec<Vec<u8>> = all
            .iter()
            .filter(|p| !p.is_fragment())
            .map(|p| p.id.bytes().to_vec())
            .collect();
        let fragments: Vec<Vec<u8>> = all.iter().map(|p| p.id.bytes().to_vec()).collect();
        let reading_ids: Vec<Uuid> = readings.iter().map(|r| r.id).collect();
        let (intent, stored): (i64, Vec<Uuid>) = sqlx::query_as(
            "WITH intent AS (
                INSERT INTO raw_doc_expiry (docs, fragments, due_at, pending_write)
                VALUES ($1, $2, now() + make_interval(secs => $3), true) RETURNING id
             )
             SELECT (SELECT id FROM intent),
                    coalesce((SELECT array_agg(id) FROM reading_ids WHERE id = ANY($4)), '{}')",
        )
        .bind(&expiring)
        .bind(&fragments)
        .bind(self.tuning.intent_ttl.as_secs_f64())
        .bind(&reading_ids)
        .fetch_one(&self.pg)
        .await?;
        let mut outcome = StoreOutcome {
            duplicates: stored.len(),
            already_stored: stored.clone(),
            ..Default::default()
        };
        let stored: HashSet<Uuid> = stored.into_iter().collect();
        let planned = if stored.is_empty() {
            all
        } else {
            plan(readings, |i| !stored.contains(&readings[i].id), &mut ids)
        };

        // 2. The segments, into the document store.
        let segments: Vec<Arc<Segment>> = planned
            .iter()
            .map(|p| {
                Arc::new(Segment::new(
                    p.id,
                    p.members.iter().map(|&i| readings[i].clone()).collect(),
                ))
            })
            .collect();
        let docs: Vec<RawDocumentBuf> = segments.iter().map(|s| s.encode()).collect();
        let lens: Vec<i32> = docs.iter().map(|d| d.as_bytes().len() as i32).collect();
        let refs: Vec<DocRef> = planned
            .iter()
            .map(|p| DocRef {
                id: p.id,
                fragment: p.is_fragment(),
            })
            .collect();
        let refused_docs = self.insert_documents(&refs, &docs).await?;
        for (n, message) in &refused_docs {
            for &i in &planned[*n].members {
                outcome.refused.push((i, message.clone()));
            }
        }
        let refused_docs: HashSet<usize> = refused_docs.into_iter().map(|(n, _)| n).collect();
        let bytes: i64 = lens.iter().map(|&l| i64::from(l)).sum();
        metrics::counter!("raw_store_bytes_written_total", "by" => "ingest")
            .increment(bytes as u64);

        // 3. Register, claim and roll up, atomically.
        let written: Vec<(&Arc<Segment>, i32)> = segments
            .iter()
            .zip(lens)
            .enumerate()
            .filter(|(n, _)| !refused_docs.contains(n))
            .map(|(_, s)| s)
            .collect();
        let mut tries = 0;
        let registered = loop {
            tries += 1;
            match self.register(intent, &written).await {
                Err(StoreError::Postgres(e))
                    if crate::db::sqlstate(&e).as_deref() == Some("23505")
                        && crate::db::constraint(&e) == Some("reading_ids_pkey") =>
                {
                    return Ok(None)
                }
                // A deadlock or serialization failure rolled the statement back whole:
                // the same statement may pass now.
                Err(StoreError::Postgres(e))
                    if tries < 3
                        && matches!(
                            crate::db::sqlstate(&e).as_deref(),
                            Some("40P01" | "40001")
                        ) =>
                {
                    continue
                }
                other => break other?,
            }
        };
        let Some(registered) = registered else {
            // The expiry ran first (this call took longer than the intent's TTL): the
            // segments are gone or going. Start over.
            return Ok(None);
        };
        for ((segment, _), members) in written.iter().zip(
            planned
                .iter()
                .enumerate()
                .filter(|(n, _)| !refused_docs.contains(n))
                .map(|(_, p)| &p.members),
        ) {
            if registered.sensors.contains(&segment.sensor()) {
                outcome.inserted += segment.readings.len();
                self.recent.insert(segment.id, Arc::clone(segment));
            } else {
                outcome.refused.extend(
                    members
                        .iter()
                        .map(|&i| (i, "the sensor no longer exists".to_owned())),
                );
            }
        }
        outcome.refused.sort_by_key(|r| r.0);
        self.changed(&registered.changes);
        outcome.sensor_counts = registered.counts;
        for reading in registered.new_latest {
            self.latest.offer(reading).await;
        }
        Ok(Some(outcome))
    }

    /// Inserts segments, each into its collection. Returns the documents the server
    /// refused (by index, with its message); an error when it is unknown what was
    /// written (the caller's intent makes that expire).
    pub(super) async fn insert_documents(
        &self,
        refs: &[DocRef],
        docs: &[RawDocumentBuf],
    ) -> Result<Vec<(usize, String)>, StoreError> {
        let mut by_collection: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (n, r) in refs.iter().enumerate() {
            let name = if r.fragment {
                super::fragments_collection(r.id)
            } else {
                super::SEGMENTS.to_owned()
            };
            by_collection.entry(name).or_default().push(n);
        }
        let mut refused = Vec::new();
        for (name, members) in by_collection {
            let collection = self.db.collection::<RawDocumentBuf>(&name);
            let result = collection
                .insert_many(members.iter().map(|&n| &docs[n]))
                .ordered(false)
                .await;
            if let Err(e) = result {
                match *e.kind {
                    ErrorKind::InsertMany(ref failure) if failure.write_concern_error.is_none() => {
                        for we in failure.write_errors.iter().flatten() {
                            if we.code == crate::mongo::DUPLICATE_KEY {
                                // Fresh ObjectIds never collide: something else is wrong.
                                return Err(e.into());
                            }
                            refused.push((members[we.index], we.message.clone()));
                        }
                    }
                    _ => return Err(e.into()),
                }
            }
        }
        Ok(refused)
    }

    /// Step 3 of a store: one statement, so all of it happens or none. `None` when the
    /// intent `intent` was expired by someone else first.
    async fn register(
        &self,
        intent: i64,
        segments: &[(&Arc<Segment>, i32)],
    ) -> Result<Option<Registered>, StoreError> {
        let fragment: Vec<bool> = segments
            .iter()
            .map(|(s, _)| s.readings.len() < SEGMENT_READINGS / 2)
            .collect();
        let mut d = DocColumns::default();
        let mut r = ReadingColumns::default();
        let mut newest: BTreeMap<SensorId, (&Reading, i64)> = BTreeMap::new();
        for (n, (s, len)) in segments.iter().enumerate() {
            let (first, last) = s.span();
            d.doc.push(s.id.bytes().to_vec());
            d.sensor.push(s.sensor().0);
            d.bucket.push(s.bucket);
            d.count.push(s.readings.len() as i32);
            d.first.push(first);
            d.last.push(last);
            d.bytes.push(*len);
            for reading in &s.readings {
                r.id.push(reading.id);
                r.ord.push(n as i32 + 1);
                r.offset.push(offset_in_bucket(reading.ts));
                r.t.push(reading.temperature.get());
                let slot = newest.entry(reading.sensor_id).or_insert((reading, 0));
                slot.1 += 1;
                if (reading.ts, reading.id) > (slot.0.ts, slot.0.id) {
                    slot.0 = reading;
                }
            }
        }
        let (changes, notice) = late_changes(segments.iter().flat_map(|(s, _)| s.readings.iter()));
        let latest: Vec<&Reading> = newest.values().map(|(r, _)| *r).collect();
        let row: (i64, Vec<Uuid>, Vec<Uuid>, i64, Vec<Uuid>, Vec<i64>) =
            sqlx::query_as(REGISTER.as_str())
                .bind(intent)
                .bind(&d.doc)
                .bind(&d.sensor)
                .bind(&d.bucket)
                .bind(&d.count)
                .bind(&d.first)
                .bind(&d.last)
                .bind(&d.bytes)
                .bind(&r.id)
                .bind(&r.ord)
                .bind(&r.offset)
                .bind(&r.t)
                .bind(latest.iter().map(|r| r.sensor_id.0).collect::<Vec<_>>())
                .bind(latest.iter().map(|r| r.id).collect::<Vec<_>>())
                .bind(latest.iter().map(|r| r.ts).collect::<Vec<_>>())
                .bind(
                    latest
                        .iter()
                        .map(|r| r.temperature.get())
                        .collect::<Vec<_>>(),
                )
                .bind(latest.iter().map(|r| r.received_at).collect::<Vec<_>>())
                .bind(
                    latest
                        .iter()
                        .map(|r| serde_json::Value::Object(r.extra.clone()))
                        .collect::<Vec<_>>(),
                )
                .bind(newest.values().map(|(_, n)| *n).collect::<Vec<i64>>())
                .bind(notice)
                .bind(BUCKETS_CHANNEL)
                .bind(&fragment)
                .fetch_one(&self.pg)
                .await?;
        let (intents, sensors, won, _notified, counted, counts) = row;
        if intents == 0 {
            return Ok(None);
        }
        let sensors: HashSet<SensorId> = sensors.into_iter().map(SensorId).collect();
        Ok(Some(Registered {
            counts: counted.into_iter().map(SensorId).zip(counts).collect(),
            new_latest: latest
                .into_iter()
                .filter(|r| won.contains(&r.id))
                .cloned()
                .collect(),
            changes: changes
                .into_iter()
                .filter(|c| sensors.contains(&SensorId(c.sensor_id)))
                .collect(),
            sensors,
        }))
    }

    /// Deletes the segments whose expiry is due: those of writes that never committed
    /// (a crash, an outage, a lost race) and those merges, corrections and deleted
    /// sensors left behind. Returns how many expiry rows it finished. Safe to run in
    /// several processes at once.
    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn expire_due(&self) -> Result<usize, StoreError> {
        let mut finished = 0;
        loop {
            let mut tx = self.pg.begin().await?;
            // Never while a backup runs (it may be copying what this would delete).
            if !crate::backup::fenced(&mut tx).await? {
                return Ok(finished);
            }
            let due: Vec<(i64, Vec<Vec<u8>>)> = sqlx::query_as(
                "SELECT id, docs FROM raw_doc_expiry WHERE due_at <= now()
                 ORDER BY due_at LIMIT 64 FOR UPDATE SKIP LOCKED",
            )
            .fetch_all(&mut *tx)
            .await?;
            if due.is_empty() {
                tx.commit().await?;
                return Ok(finished);
            }
            let docs: Vec<ObjectId> = due
                .iter()
                .flat_map(|(_, docs)| docs.iter())
                .filter_map(|d| {
                    <[u8; 12]>::try_from(d.as_slice())
                        .ok()
                        .map(ObjectId::from_bytes)
                })
                .collect();
            self.delete_documents(&docs).await?;
            let ids: Vec<i64> = due.iter().map(|(id, _)| *id).collect();
            sqlx::query("DELETE FROM raw_doc_expiry WHERE id = ANY($1)")
                .bind(&ids)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            finished += due.len();
            metrics::counter!("raw_segments_expired_total").increment(docs.len() as u64);
        }
    }

    /// Drops the fragment collections of hours that ended more than
    /// [`super::FRAGMENT_HOURS_KEPT`] hours ago, when nothing registers a fragment of
    /// theirs and no pending write names one: their merged readings live in the main
    /// collection by then. One `drop` instead of a delete per fragment. Returns how many
    /// it dropped.
    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn drop_fragments(&self) -> Result<usize, StoreError> {
        let kept_until = Utc::now() - chrono::Duration::hours(super::FRAGMENT_HOURS_KEPT + 1);
        let mut dropped = 0;
        // Held until every drop is done; never while a backup runs.
        let mut fence = self.pg.begin().await?;
        if !crate::backup::fenced(&mut fence).await? {
            return Ok(0);
        }
        for name in self.db.list_collection_names().await? {
            let Some(hour) = name
                .strip_prefix(super::FRAGMENTS)
                .and_then(|h| {
                    chrono::NaiveDateTime::parse_from_str(&format!("{h}00"), "%Y%m%d%H%M").ok()
                })
                .map(|h| h.and_utc())
            else {
                continue;
            };
            if hour >= kept_until {
                continue;
            }
            let bound = |t: DateTime<Utc>| {
                let mut b = vec![0u8; 12];
                b[..4].copy_from_slice(
                    &(t.timestamp().clamp(0, i64::from(u32::MAX)) as u32).to_be_bytes(),
                );
                b
            };
            let (lo, hi) = (bound(hour), bound(hour + chrono::Duration::hours(1)));
            let in_use: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM raw_docs WHERE fragment AND doc >= $1 AND doc < $2)
                     OR EXISTS (SELECT 1 FROM raw_doc_expiry e, unnest(e.fragments) f
                                WHERE e.pending_write AND f >= $1 AND f < $2)",
            )
            .bind(&lo)
            .bind(&hi)
            .fetch_one(&self.pg)
            .await?;
            if !in_use {
                self.db.collection::<RawDocumentBuf>(&name).drop().await?;
                tracing::debug!(collection = name, "dropped a fragment collection");
                dropped += 1;
            }
        }
        fence.commit().await?;
        metrics::counter!("raw_fragment_collections_dropped_total").increment(dropped as u64);
        Ok(dropped)
    }

    /// Deletes segments by `_id`, one statement each (a filter on several `_id`s is a
    /// scan on FerretDB), in one command.
    async fn delete_documents(&self, docs: &[ObjectId]) -> Result<(), StoreError> {
        for chunk in docs.chunks(500) {
            for id in chunk {
                self.recent.invalidate(id);
            }
            let deletes: Vec<Bson> = chunk
                .iter()
                .map(|id| Bson::Document(doc! { "q": { "_id": id }, "limit": 1 }))
                .collect();
            self.segments
                .client()
                .database(self.segments.namespace().db.as_str())
                .run_command(doc! { "delete": SEGMENTS, "deletes": deletes, "ordered": false })
                .await?;
        }
        Ok(())
    }
}

/// What a registration did.
struct Registered {
    /// Sensors whose segments were registered (the others were deleted meanwhile).
    sensors: HashSet<SensorId>,
    /// Their readings in all after this commit.
    counts: Vec<(SensorId, i64)>,
    /// Readings that became their sensor's latest.
    new_latest: Vec<Reading>,
    /// Late buckets announced.
    changes: Vec<super::BucketChange>,
}

#[derive(Default)]
struct DocColumns {
    doc: Vec<Vec<u8>>,
    sensor: Vec<Uuid>,
    bucket: Vec<DateTime<Utc>>,
    count: Vec<i32>,
    first: Vec<DateTime<Utc>>,
    last: Vec<DateTime<Utc>>,
    bytes: Vec<i32>,
}

#[derive(Default)]
struct ReadingColumns {
    id: Vec<Uuid>,
    ord: Vec<i32>,
    offset: Vec<i32>,
    t: Vec<f64>,
}

/// Step 3 of a store. Deletes the intent and, only if it was there, registers the
/// segments of sensors that still exist, claims their reading ids (a plain insert: an id
/// claimed by another writer since step 1 fails the whole statement), adds the readings
/// to their buckets, days' hourly cells and days' quarters, counts them and moves the latest rows; the
/// segments of deleted sensors expire at once. Rows are locked in (sensor, bucket)
/// order, so concurrent writers do not deadlock. Returns whether the intent was there,
/// the sensors registered, and the reading ids that became their sensor's latest.
static REGISTER: LazyLock<String> = LazyLock::new(|| {
    format!(
        "
WITH intent AS (
    DELETE FROM raw_doc_expiry WHERE id = $1 RETURNING id
), input AS (
    SELECT d.*, EXISTS (SELECT 1 FROM sensors s WHERE s.id = d.sensor_id) AS known
    FROM unnest($2::bytea[], $3::uuid[], $4::timestamptz[], $5::int[], $6::timestamptz[],
                $7::timestamptz[], $8::int[], $22::bool[])
         WITH ORDINALITY AS d(doc, sensor_id, bucket, count, first_ts, last_ts, bytes, fragment, ord)
    WHERE EXISTS (SELECT 1 FROM intent)
), docs AS (
    SELECT * FROM input WHERE known
), readings AS (
    SELECT r.id, r.offset_ms, r.t, d.sensor_id, d.bucket
    FROM unnest($9::uuid[], $10::int[], $11::int[], $12::float8[]) AS r(id, ord, offset_ms, t)
    JOIN docs d ON d.ord = r.ord
), buckets AS (
    INSERT INTO reading_buckets AS b (sensor_id, bucket, count, sum, min, max, docs)
    SELECT r.sensor_id, r.bucket, count(*), sum(r.t::numeric), min(r.t), max(r.t),
           (SELECT count(*) FROM docs d WHERE d.sensor_id = r.sensor_id AND d.bucket = r.bucket)
    FROM readings r
    GROUP BY r.sensor_id, r.bucket
    ORDER BY r.sensor_id, r.bucket
    ON CONFLICT (sensor_id, bucket) DO UPDATE SET
        count = b.count + excluded.count,
        sum = b.sum + excluded.sum,
        min = least(b.min, excluded.min),
        max = greatest(b.max, excluded.max),
        docs = b.docs + excluded.docs,
        settled = false
    RETURNING b.id, b.sensor_id, b.bucket
), hours AS (
    {hours}
), days AS (
    INSERT INTO reading_days AS d (sensor_id, day, counts, sums, mins, maxs)
    {add_hours}
), quarters AS (
    {quarters}
), day_quarters AS (
    INSERT INTO reading_day_quarters AS d (sensor_id, day, counts, sums, mins, maxs)
    {add_quarters}
), registered AS (
    INSERT INTO raw_docs (doc, bucket_id, count, first_ts, last_ts, bytes, fragment)
    SELECT d.doc, b.id, d.count, d.first_ts, d.last_ts, d.bytes, d.fragment
    FROM docs d JOIN buckets b ON b.sensor_id = d.sensor_id AND b.bucket = d.bucket
), claimed AS (
    INSERT INTO reading_ids (id, bucket_id, offset_ms)
    SELECT r.id, b.id, r.offset_ms
    FROM readings r JOIN buckets b ON b.sensor_id = r.sensor_id AND b.bucket = r.bucket
), orphaned AS (
    INSERT INTO raw_doc_expiry (docs, due_at)
    SELECT array_agg(doc), now() FROM input WHERE NOT known AND NOT fragment HAVING count(*) > 0
), latest AS (
    INSERT INTO sensor_latest AS l (sensor_id, reading_id, ts, temperature, received_at, extra, count)
    SELECT n.*
    FROM unnest($13::uuid[], $14::uuid[], $15::timestamptz[], $16::float8[], $17::timestamptz[],
                $18::jsonb[], $19::int8[])
         AS n(sensor_id, reading_id, ts, temperature, received_at, extra, count)
    WHERE n.sensor_id IN (SELECT sensor_id FROM docs)
    ORDER BY n.sensor_id
    ON CONFLICT (sensor_id) DO UPDATE SET
        count = l.count + excluded.count,
        reading_id = CASE WHEN (excluded.ts, excluded.reading_id) > (l.ts, l.reading_id)
                          THEN excluded.reading_id ELSE l.reading_id END,
        ts = CASE WHEN (excluded.ts, excluded.reading_id) > (l.ts, l.reading_id)
                  THEN excluded.ts ELSE l.ts END,
        temperature = CASE WHEN (excluded.ts, excluded.reading_id) > (l.ts, l.reading_id)
                           THEN excluded.temperature ELSE l.temperature END,
        received_at = CASE WHEN (excluded.ts, excluded.reading_id) > (l.ts, l.reading_id)
                           THEN excluded.received_at ELSE l.received_at END,
        extra = CASE WHEN (excluded.ts, excluded.reading_id) > (l.ts, l.reading_id)
                     THEN excluded.extra ELSE l.extra END,
        updated_at = now()
    RETURNING l.reading_id, l.sensor_id, l.count
), notified AS (
    SELECT pg_notify($21, $20) FROM intent WHERE $20 IS NOT NULL
)
SELECT (SELECT count(*) FROM intent)::int8,
       coalesce((SELECT array_agg(DISTINCT sensor_id) FROM docs), '{{}}'),
       coalesce((SELECT array_agg(reading_id) FROM latest), '{{}}'),
       (SELECT count(*) FROM notified)::int8,
       coalesce((SELECT array_agg(sensor_id ORDER BY sensor_id) FROM latest), '{{}}'),
       coalesce((SELECT array_agg(count ORDER BY sensor_id) FROM latest), '{{}}')
",
        hours = per_cell("extract(hour FROM bucket AT TIME ZONE 'UTC')::int"),
        add_hours = add_cells("hours", 24),
        quarters = per_cell(
            "extract(hour FROM bucket AT TIME ZONE 'UTC')::int * 4
             + extract(minute FROM bucket AT TIME ZONE 'UTC')::int / 15"
        ),
        add_quarters = add_cells("quarters", 96),
    )
});

/// The readings' statistics per sensor, UTC day and cell `k` of the day (`cell`, an
/// expression of their `bucket`).
fn per_cell(cell: &str) -> String {
    format!(
        "SELECT sensor_id, (bucket AT TIME ZONE 'UTC')::date AS day, {cell} AS k,
           count(*)::bigint AS n, sum(t) AS s, min(t) AS lo, max(t) AS hi
    FROM readings
    GROUP BY 1, 2, 3"
    )
}

/// The upsert of `n` cells per sensor and day from the rows of `source` (`sensor_id`,
/// `day`, `k` the cell, `n`, `s`, `lo`, `hi`) into a table of cell arrays aliased `d`,
/// cell by cell. The arrays are built and merged by expressions written out here:
/// PostgreSQL ran the same as SQL functions (`day_cells`, `cells_add`) 3-4x slower
/// (a day's 24 hourly cells ~110 µs a row, 30 µs written out).
fn add_cells(source: &str, n: usize) -> String {
    let build = |vals: &str, empty: &str| {
        format!(
            "array(SELECT coalesce({vals}[array_position(ks, i)], {empty}) \
             FROM generate_series(0, {last}) i)",
            last = n - 1
        )
    };
    let merge = |column: &str, op: &str| {
        let (a, b) = (format!("d.{column}[i]"), format!("excluded.{column}[i]"));
        let cell = match op {
            "+" => format!("{a} + {b}"),
            f => format!("{f}({a}, {b})"),
        };
        format!("{column} = array(SELECT {cell} FROM generate_series(1, {n}) i)")
    };
    format!(
        "SELECT sensor_id, day, {counts}, {sums}, {mins}, {maxs}
    FROM (SELECT sensor_id, day, array_agg(k) AS ks, array_agg(n) AS ns, array_agg(s) AS ss,
                 array_agg(lo) AS los, array_agg(hi) AS his
          FROM {source} GROUP BY sensor_id, day) c
    ORDER BY sensor_id, day
    ON CONFLICT (sensor_id, day) DO UPDATE SET {add}, {sum}, {least}, {greatest}",
        counts = build("ns", "0"),
        sums = build("ss", "0"),
        mins = build("los", "'Infinity'"),
        maxs = build("his", "'-Infinity'"),
        add = merge("counts", "+"),
        sum = merge("sums", "+"),
        least = merge("mins", "least"),
        greatest = merge("maxs", "greatest"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_respect_both_caps_and_keep_order() {
        let items: Vec<usize> = (0..600).collect();
        let cut = chunks(items.clone(), |_| 36);
        assert_eq!(
            cut.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![
                SEGMENT_READINGS,
                SEGMENT_READINGS,
                600 - 2 * SEGMENT_READINGS
            ]
        );
        assert_eq!(cut.concat(), items);
        // One reading over the byte cap still gets a segment of its own.
        let cut = chunks(vec![10, SEGMENT_BYTES + 1, 10, 10], |&w| w);
        assert_eq!(cut, vec![vec![10], vec![SEGMENT_BYTES + 1], vec![10, 10]]);
    }
}
