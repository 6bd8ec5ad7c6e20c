//! The reading store on its own: history against a model before and after segments are
//! merged, readings by id and corrections across merges, expiry, and the move of
//! readings stored by the previous version.

use chrono::{DateTime, Duration, TimeZone, Utc};
use mongodb::bson::{doc, Document, RawDocumentBuf};
use rand::{rngs::StdRng, seq::SliceRandom, Rng, SeedableRng};
use termopar_core::{
    ids::{ClientId, SensorId},
    reading::{Celsius, Reading},
    store::{HistoryQuery, Position, ReadingStore, Tuning, SEGMENTS},
};
use uuid::Uuid;

use crate::harness::*;

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 1, 0, 0, 0).unwrap()
}

/// `n` readings of `sensor` spread over `minutes`, some with equal times and extras.
fn readings(
    rng: &mut StdRng,
    client: ClientId,
    sensor: SensorId,
    n: usize,
    minutes: i64,
) -> Vec<Reading> {
    (0..n)
        .map(|i| {
            let ts = t0() + Duration::milliseconds(rng.gen_range(0..minutes * 60) * 1000);
            Reading {
                id: Uuid::new_v4(),
                sensor_id: sensor,
                client_id: client,
                ts,
                temperature: Celsius::try_from(rng.gen_range(-500..500) as f64 / 10.0).unwrap(),
                received_at: ts + Duration::milliseconds(rng.gen_range(0..5000)),
                extra: if i % 7 == 0 {
                    serde_json::json!({"door": i % 2 == 0, "seq": i})
                        .as_object()
                        .unwrap()
                        .clone()
                } else {
                    Default::default()
                },
            }
        })
        .collect()
}

/// The model: newest first by (ts, id).
fn newest_first(readings: &[Reading]) -> Vec<Reading> {
    let mut sorted = readings.to_vec();
    sorted.sort_by_key(|r| std::cmp::Reverse((r.ts, r.id)));
    sorted
}

/// Every kind of history query against the model.
async fn assert_history_matches(
    store: &ReadingStore,
    sensor: SensorId,
    all: &[Reading],
    what: &str,
) {
    let model = newest_first(all);
    let q = |from, to, position, limit| HistoryQuery {
        sensor,
        from,
        to,
        position,
        limit,
    };
    // Pages by number.
    for (page, size) in [(0u64, 50usize), (1, 50), (3, 37), (0, 1000), (20, 37)] {
        let got = store
            .history(&q(None, None, Position::Offset(page * size as u64), size))
            .await
            .unwrap();
        let want: Vec<Uuid> = model
            .iter()
            .skip(page as usize * size)
            .take(size)
            .map(|r| r.id)
            .collect();
        let ids: Vec<Uuid> = got.readings.iter().map(|r| r.id).collect();
        assert_eq!(ids, want, "{what}: page {page} of {size}");
        assert_eq!(got.total, Some(all.len() as i64), "{what}: total");
        assert_eq!(
            got.more,
            (page as usize + 1) * size < model.len(),
            "{what}: more after page {page}"
        );
        // Whole readings come back, extras included.
        for r in &got.readings {
            assert_eq!(Some(r), model.iter().find(|m| m.id == r.id), "{what}");
        }
    }
    // A cursor walk covers everything once, in order.
    let mut walked = Vec::new();
    let mut position = Position::Offset(0);
    loop {
        let got = store.history(&q(None, None, position, 43)).await.unwrap();
        walked.extend(got.readings.iter().map(|r| r.id));
        let Some(last) = got.readings.last().filter(|_| got.more) else {
            break;
        };
        position = Position::After(last.ts, last.id);
    }
    assert_eq!(
        walked,
        model.iter().map(|r| r.id).collect::<Vec<_>>(),
        "{what}: cursor walk"
    );
    // Windows, at and off bucket edges, with a cursor inside.
    for (from, to) in [
        (t0() + Duration::minutes(15), t0() + Duration::minutes(45)),
        (
            t0() + Duration::seconds(437),
            t0() + Duration::seconds(2711),
        ),
        (t0() + Duration::minutes(50), t0() + Duration::minutes(51)),
    ] {
        let inside: Vec<&Reading> = model.iter().filter(|r| r.ts >= from && r.ts < to).collect();
        let got = store
            .history(&q(Some(from), Some(to), Position::Offset(5), 20))
            .await
            .unwrap();
        let want: Vec<Uuid> = inside.iter().skip(5).take(20).map(|r| r.id).collect();
        assert_eq!(
            got.readings.iter().map(|r| r.id).collect::<Vec<_>>(),
            want,
            "{what}: window {from}..{to}"
        );
        assert_eq!(got.total, None);
        if let Some(cut) = inside.get(10) {
            let got = store
                .history(&q(Some(from), Some(to), Position::After(cut.ts, cut.id), 7))
                .await
                .unwrap();
            let want: Vec<Uuid> = inside.iter().skip(11).take(7).map(|r| r.id).collect();
            assert_eq!(
                got.readings.iter().map(|r| r.id).collect::<Vec<_>>(),
                want,
                "{what}: cursor in window {from}..{to}"
            );
        }
    }
}

async fn segments_per_bucket(stores: &Stores) -> Vec<(i32, i64)> {
    sqlx::query_as("SELECT docs, count FROM reading_buckets ORDER BY bucket")
        .fetch_all(&stores.db.pool)
        .await
        .unwrap()
}

/// Runs compaction passes at `now` until nothing is due.
async fn compact_all(store: &ReadingStore, now: DateTime<Utc>) {
    for _ in 0..200 {
        if store.compact(now).await.unwrap().buckets == 0 {
            return;
        }
    }
    panic!("compaction never settled");
}

#[tokio::test]
async fn history_answers_the_same_from_single_reading_segments_merged_tiers_and_final_segments() {
    let stores = Stores::new().await;
    let (client, sensors) = stores.client_with_sensors(2).await;
    let mut rng = StdRng::seed_from_u64(11);
    // One reading a call, out of order: a segment each, as a device sending one reading
    // a message makes; over an hour, so four buckets.
    let mut all = readings(&mut rng, client, sensors[0].0, 700, 60);
    all.shuffle(&mut rng);
    for r in &all {
        stores.store.store(std::slice::from_ref(r)).await.unwrap();
    }
    // Another sensor's readings in the same buckets never show up.
    let other = readings(&mut rng, client, sensors[1].0, 300, 60);
    stores.store.store(&other).await.unwrap();
    assert_history_matches(&stores.store, sensors[0].0, &all, "one segment a reading").await;

    // While the buckets are open: tier merges only.
    compact_all(&stores.store, t0() + Duration::minutes(30)).await;
    for (docs, count) in segments_per_bucket(&stores).await {
        assert!(
            docs <= 12 + (count / 256) as i32,
            "{docs} segments for {count} readings"
        );
    }
    assert_history_matches(&stores.store, sensors[0].0, &all, "tier-merged").await;

    // Closed: as few segments as their readings need.
    compact_all(&stores.store, t0() + Duration::days(1)).await;
    for (docs, count) in segments_per_bucket(&stores).await {
        assert_eq!(docs as i64, (count + 255) / 256, "{count} readings");
    }
    assert_history_matches(&stores.store, sensors[0].0, &all, "final").await;
    let mut everything = all.clone();
    everything.extend(other.clone());
    assert_history_matches(&stores.store, sensors[1].0, &other, "the other sensor").await;
    stores.assert_rollups_match_raw().await;

    // Replaced segments expire after their grace period; then the document store holds
    // exactly the registered ones.
    sqlx::query("UPDATE raw_doc_expiry SET due_at = now() WHERE NOT pending_write")
        .execute(&stores.db.pool)
        .await
        .unwrap();
    stores.store.expire_due().await.unwrap();
    let in_store = stores
        .mongo
        .database()
        .await
        .collection::<RawDocumentBuf>(SEGMENTS)
        .count_documents(doc! {})
        .await
        .unwrap();
    let registered: i64 = sqlx::query_scalar("SELECT count(*) FROM raw_docs")
        .fetch_one(&stores.db.pool)
        .await
        .unwrap();
    assert_eq!(
        in_store as i64, registered,
        "closed buckets have no fragments left"
    );
    let mut stored = stores.readings().await;
    stored.sort_by_key(|r| r.id);
    everything.sort_by_key(|r| r.id);
    assert_eq!(stored, everything);
}

/// A closed bucket with more readings than a merge round holds (a sensor sending a
/// thousand readings a second has 900,000 in one; merged at once, a soak's node grew
/// from 200 MiB to 2.5 GiB when its buckets closed): the final merge reads, merges and
/// writes them a round at a time, and still ends with as few segments as they need.
#[tokio::test]
async fn a_closed_bucket_larger_than_a_merge_round_is_merged_in_rounds() {
    let stores = Stores::with_tuning(Tuning {
        merge_round: 300,
        ..quick()
    })
    .await;
    let (client, sensors) = stores.client_with_sensors(1).await;
    let mut rng = StdRng::seed_from_u64(17);
    let all = readings(&mut rng, client, sensors[0].0, 2_000, 15);
    // Calls of 40, out of time order: fragments that overlap one another.
    let mut shuffled = all.clone();
    shuffled.shuffle(&mut rng);
    for chunk in shuffled.chunks(40) {
        stores.store.store(chunk).await.unwrap();
    }
    let mut rounds = 0;
    for _ in 0..20 {
        let report = stores
            .store
            .compact(t0() + Duration::days(1))
            .await
            .unwrap();
        if report.buckets == 0 {
            break;
        }
        rounds += report.rounds;
    }
    assert!(
        rounds >= 6,
        "2,000 readings in rounds of 300: {rounds} rounds"
    );
    assert_eq!(segments_per_bucket(&stores).await, vec![(8, 2_000)]);
    assert_history_matches(&stores.store, sensors[0].0, &all, "merged in rounds").await;
    stores.assert_rollups_match_raw().await;
}

#[tokio::test]
async fn readings_by_id_corrections_and_deletions_work_across_merges() {
    let stores = Stores::new().await;
    let (client, sensors) = stores.client_with_sensors(1).await;
    let sensor = sensors[0].0;
    let mut rng = StdRng::seed_from_u64(5);
    let all = readings(&mut rng, client, sensor, 120, 30);
    for r in &all {
        stores.store.store(std::slice::from_ref(r)).await.unwrap();
    }
    compact_all(&stores.store, t0() + Duration::days(1)).await;
    for r in all.iter().step_by(17) {
        assert_eq!(stores.store.reading(r.id).await.unwrap().as_ref(), Some(r));
    }
    assert_eq!(stores.store.reading(Uuid::new_v4()).await.unwrap(), None);

    // The newest reading corrected, then deleted: the latest row follows.
    let newest = newest_first(&all)[0].clone();
    let corrected = stores
        .store
        .correct(newest.id, Celsius::try_from(99.5).unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(corrected.temperature.get(), 99.5);
    assert_eq!(
        corrected.extra["original_temperature"],
        serde_json::json!(newest.temperature.get())
    );
    let latest = stores.store.latest(sensor).await.unwrap().unwrap();
    assert_eq!(latest.temperature.get(), 99.5);
    stores.assert_rollups_match_raw().await;
    // Corrected twice, the first original value stays.
    let again = stores
        .store
        .correct(newest.id, Celsius::try_from(1.0).unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        again.extra["original_temperature"],
        serde_json::json!(newest.temperature.get())
    );
    let deleted = stores.store.delete(newest.id).await.unwrap().unwrap();
    assert_eq!(deleted.id, newest.id);
    assert_eq!(stores.store.reading(newest.id).await.unwrap(), None);
    assert_eq!(stores.store.delete(newest.id).await.unwrap(), None);
    let latest = stores.store.latest_of(&[sensor]).await.unwrap();
    assert_eq!(latest[0].id, newest_first(&all)[1].id);
    stores.assert_rollups_match_raw().await;

    // A bucket's last reading deleted: the bucket goes.
    let lonely = Reading {
        ts: t0() + Duration::hours(5),
        ..all[0].clone()
    };
    let lonely = Reading {
        id: Uuid::new_v4(),
        ..lonely
    };
    stores
        .store
        .store(std::slice::from_ref(&lonely))
        .await
        .unwrap();
    stores.store.delete(lonely.id).await.unwrap().unwrap();
    let buckets: i64 =
        sqlx::query_scalar("SELECT count(*) FROM reading_buckets WHERE bucket >= $1")
            .bind(t0() + Duration::hours(5))
            .fetch_one(&stores.db.pool)
            .await
            .unwrap();
    assert_eq!(buckets, 0);
    stores.assert_rollups_match_raw().await;
    let mut left = all.clone();
    left.retain(|r| r.id != newest.id);
    assert_history_matches(&stores.store, sensor, &left, "after corrections").await;
}

/// A reading as the previous version stored it.
fn legacy_document(r: &Reading, batch: Uuid) -> Document {
    doc! {
        "_id": r.id.to_string(),
        "sensor_id": r.sensor_id.to_string(),
        "client_id": r.client_id.to_string(),
        "ts": mongodb::bson::DateTime::from_millis(r.ts.timestamp_millis()),
        "temperature": r.temperature.get(),
        "received_at": mongodb::bson::DateTime::from_millis(r.received_at.timestamp_millis()),
        "batch": batch.to_string(),
        "extra": mongodb::bson::to_bson(&r.extra).unwrap(),
    }
}

#[tokio::test]
async fn readings_stored_by_the_previous_version_are_moved_once_and_nothing_is_lost() {
    let stores = Stores::new().await;
    let (client, sensors) = stores.client_with_sensors(3).await;
    let mut rng = StdRng::seed_from_u64(3);
    let mut counted = Vec::new();
    for (s, _) in &sensors[..2] {
        counted.extend(readings(&mut rng, client, *s, 400, 90));
    }
    // A batch the previous version left pending: written, never rolled up.
    let pending = readings(&mut rng, client, sensors[2].0, 30, 20);
    // A sensor deleted since: its readings have no sensor to belong to.
    let gone_sensor = SensorId(Uuid::new_v4());
    let orphans = readings(&mut rng, client, gone_sensor, 5, 10);

    let legacy = stores
        .mongo
        .database()
        .await
        .collection::<Document>("readings");
    let (done_batch, pending_batch) = (Uuid::new_v4(), Uuid::new_v4());
    let mut docs: Vec<Document> = counted
        .iter()
        .map(|r| legacy_document(r, done_batch))
        .collect();
    docs.extend(pending.iter().map(|r| legacy_document(r, pending_batch)));
    docs.extend(orphans.iter().map(|r| legacy_document(r, done_batch)));
    docs.push(doc! { "_id": "not-a-reading", "temperature": "hot" });
    legacy.insert_many(docs).await.unwrap();
    // The previous version's rollups: the counted readings only.
    let (s, b, t): (Vec<Uuid>, Vec<DateTime<Utc>>, Vec<f64>) =
        counted
            .iter()
            .fold((Vec::new(), Vec::new(), Vec::new()), |mut acc, r| {
                acc.0.push(r.sensor_id.0);
                acc.1.push(r.ts);
                acc.2.push(r.temperature.get());
                acc
            });
    sqlx::query(
        "INSERT INTO reading_buckets (sensor_id, bucket, count, sum, min, max)
         SELECT s, date_bin('15 minutes', ts, TIMESTAMPTZ '2000-01-01'), count(*), sum(t::numeric), min(t), max(t)
         FROM unnest($1::uuid[], $2::timestamptz[], $3::float8[]) AS r(s, ts, t) GROUP BY 1, 2",
    )
    .bind(&s)
    .bind(&b)
    .bind(&t)
    .execute(&stores.db.pool)
    .await
    .unwrap();
    sqlx::query("INSERT INTO ingest_batches (id, reading_ids) VALUES ($1, $2)")
        .bind(pending_batch)
        .bind(pending.iter().map(|r| r.id).collect::<Vec<_>>())
        .execute(&stores.db.pool)
        .await
        .unwrap();

    let report = stores.store.migrate_legacy().await.unwrap();
    assert_eq!(
        report.read,
        (counted.len() + pending.len() + orphans.len() + 1) as u64
    );
    assert_eq!(report.stored, (counted.len() + pending.len()) as u64);
    assert_eq!(report.skipped, (orphans.len() + 1) as u64);
    assert!(
        legacy.find_one(doc! {}).await.unwrap().is_none(),
        "legacy collection dropped"
    );
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM ingest_batches")
        .fetch_one(&stores.db.pool)
        .await
        .unwrap();
    assert_eq!(left, 0);
    stores.assert_rollups_match_raw().await;
    let count: i64 = sqlx::query_scalar("SELECT sum(count)::int8 FROM reading_buckets")
        .fetch_one(&stores.db.pool)
        .await
        .unwrap();
    assert_eq!(
        count as usize,
        counted.len() + pending.len(),
        "each counted once"
    );
    let of_sensor: Vec<Reading> = counted
        .iter()
        .filter(|r| r.sensor_id == sensors[0].0)
        .cloned()
        .collect();
    assert_history_matches(&stores.store, sensors[0].0, &of_sensor, "migrated").await;
    assert_eq!(
        stores.store.reading(pending[0].id).await.unwrap().as_ref(),
        Some(&pending[0])
    );
    // Running it again does nothing; a redelivery of a moved reading is a duplicate.
    assert_eq!(stores.store.migrate_legacy().await.unwrap().read, 0);
    assert_eq!(
        stores.store.store(&counted[..10]).await.unwrap().duplicates,
        10
    );

    // An interrupted move is resumed: documents left in the legacy collection that were
    // already moved are not counted again.
    legacy
        .insert_many(counted[..50].iter().map(|r| legacy_document(r, done_batch)))
        .await
        .unwrap();
    sqlx::query("UPDATE store_migrations SET finished_at = NULL")
        .execute(&stores.db.pool)
        .await
        .unwrap();
    let resumed = stores.store.migrate_legacy().await.unwrap();
    assert_eq!((resumed.stored, resumed.already), (0, 50));
    stores.assert_rollups_match_raw().await;
}

#[tokio::test]
async fn a_reading_of_another_sensor_with_a_taken_id_is_a_duplicate_not_a_second_reading() {
    let stores = Stores::new().await;
    let (client, sensors) = stores.client_with_sensors(2).await;
    let mut rng = StdRng::seed_from_u64(8);
    let first = readings(&mut rng, client, sensors[0].0, 1, 5).remove(0);
    let same_id = Reading {
        sensor_id: sensors[1].0,
        temperature: Celsius::try_from(7.0).unwrap(),
        ..first.clone()
    };
    assert_eq!(
        stores
            .store
            .store(std::slice::from_ref(&first))
            .await
            .unwrap()
            .inserted,
        1
    );
    let outcome = stores.store.store(&[same_id]).await.unwrap();
    assert_eq!((outcome.inserted, outcome.duplicates), (0, 1));
    assert_eq!(stores.store.reading(first.id).await.unwrap(), Some(first));
    stores.assert_rollups_match_raw().await;
}

#[tokio::test]
async fn the_document_store_finds_a_segment_by_id_through_its_index() {
    let stores = Stores::new().await;
    stores.store.prepare().await.unwrap();
    let explained = stores
        .mongo
        .database()
        .await
        .run_command(doc! {
            "explain": { "find": SEGMENTS, "filter": { "_id": mongodb::bson::oid::ObjectId::new() } },
        })
        .await
        .unwrap();
    let planner = explained.get_document("queryPlanner").unwrap();
    match planner.get_array("Plan") {
        // FerretDB: SQLite's plan must search the `_id_` index, not scan the table.
        Ok(plan) => assert!(
            plan.iter()
                .any(|p| p.as_str().is_some_and(|p| p.contains("USING INDEX"))),
            "FerretDB scans for an _id lookup: {plan:?} (run `make services` to rebuild it)"
        ),
        // MongoDB: an index stage.
        Err(_) => {
            let winning = planner.get_document("winningPlan").unwrap().to_string();
            assert!(!winning.contains("COLLSCAN"), "{winning}");
        }
    }
}

#[tokio::test]
async fn fragment_collections_are_dropped_once_nothing_registers_their_fragments() {
    use mongodb::bson::oid::ObjectId;
    use termopar_core::store::{fragments_collection, Segment};
    let stores = Stores::new().await;
    let (client, sensors) = stores.client_with_sensors(1).await;
    let db = stores.mongo.database().await;
    // Fragments made three and four hours ago: one of them still registered.
    let made = |hours_ago: i64| {
        let t = Utc::now() - Duration::hours(hours_ago);
        let mut bytes = ObjectId::new().bytes();
        bytes[..4].copy_from_slice(&(t.timestamp() as u32).to_be_bytes());
        ObjectId::from_bytes(bytes)
    };
    let mut rng = StdRng::seed_from_u64(1);
    let r = readings(&mut rng, client, sensors[0].0, 1, 5);
    let (unused, used) = (made(4), made(3));
    for id in [unused, used] {
        db.collection::<RawDocumentBuf>(&fragments_collection(id))
            .insert_one(Segment::new(id, r.clone()).encode())
            .await
            .unwrap();
    }
    stores.store.store(&r).await.unwrap();
    sqlx::query("UPDATE raw_docs SET doc = $1, fragment = true")
        .bind(used.bytes().to_vec())
        .execute(&stores.db.pool)
        .await
        .unwrap();
    let current = db.list_collection_names().await.unwrap();
    assert!(current.contains(&fragments_collection(unused)));

    assert_eq!(stores.store.drop_fragments().await.unwrap(), 1);
    let left = db.list_collection_names().await.unwrap();
    assert!(!left.contains(&fragments_collection(unused)), "{left:?}");
    assert!(left.contains(&fragments_collection(used)), "{left:?}");
    // The registered fragment still reads back through its collection.
    assert_eq!(
        stores.store.reading(r[0].id).await.unwrap().as_ref(),
        Some(&r[0])
    );
}

/// While a backup holds its fence, expiry deletes no raw document (the backup may be
/// copying it); once the fence is released, it deletes them.
#[tokio::test]
async fn expiry_deletes_nothing_while_a_backup_holds_its_fence() {
    use sqlx::Connection;
    let stores = Stores::new().await;
    let (client, sensors) = stores.client_with_sensors(1).await;
    let mut rng = StdRng::seed_from_u64(5);
    let all = readings(&mut rng, client, sensors[0].0, 300, 60);
    stores.store.store(&all).await.unwrap();
    compact_all(&stores.store, t0() + Duration::days(1)).await;
    let segments = stores
        .mongo
        .database()
        .await
        .collection::<RawDocumentBuf>(SEGMENTS);
    let before = segments.count_documents(doc! {}).await.unwrap();
    assert!(before > 0, "merged into the main collection");
    // The sensor goes: its segments expire.
    sqlx::query("DELETE FROM sensors WHERE id = $1")
        .bind(sensors[0].0 .0)
        .execute(&stores.db.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE raw_doc_expiry SET due_at = now()")
        .execute(&stores.db.pool)
        .await
        .unwrap();

    let mut backup = sqlx::PgConnection::connect(&stores.db.url).await.unwrap();
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(termopar_core::backup::FENCE)
        .execute(&mut backup)
        .await
        .unwrap();
    assert_eq!(stores.store.expire_due().await.unwrap(), 0);
    assert_eq!(stores.store.drop_fragments().await.unwrap(), 0);
    assert_eq!(segments.count_documents(doc! {}).await.unwrap(), before);

    // Unlocked by a round trip, not by closing: a close returns before the server has
    // ended the session and released its locks.
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(termopar_core::backup::FENCE)
        .execute(&mut backup)
        .await
        .unwrap();
    backup.close().await.unwrap();
    assert!(stores.store.expire_due().await.unwrap() > 0);
    assert_eq!(segments.count_documents(doc! {}).await.unwrap(), 0);
}

/// The pool the stores use: a transaction whose `BEGIN` was cancelled in flight (an
/// aborted task, a dropped request) must not leave its connection inside that transaction
/// for the next borrower. sqlx 0.9.0 did (its `begin` counted the transaction only after
/// the round trip): a shutdown that aborted a background task in `begin` handed the
/// consumer a connection whose writes were never committed, and acknowledged readings
/// were lost (`idle in transaction` for minutes, every other writer waiting on its locks).
#[tokio::test]
async fn a_begin_cancelled_in_flight_leaves_no_transaction_for_the_next_borrower() {
    use std::str::FromStr;
    let db = test_support::TestDb::new().await;
    let server = sqlx::postgres::PgConnectOptions::from_str(&db.url).unwrap();
    let proxy = test_support::Proxy::start(
        format!("{}:{}", server.get_host(), server.get_port())
            .parse()
            .unwrap(),
    )
    .await;
    let mut settings = db.settings();
    settings.max_connections = 1;
    settings.url = db
        .url
        .replacen(
            &format!("@{}:{}/", server.get_host(), server.get_port()),
            &format!("@{}/", proxy.addr),
            1,
        )
        .into();
    let pool = termopar_core::db::connect_and_migrate(&settings)
        .await
        .unwrap();
    sqlx::query("CREATE TABLE pool_probe (x int)")
        .execute(&pool)
        .await
        .unwrap();

    // BEGIN is sent and its answer held back: the caller gives up waiting, and its
    // connection goes back to the pool.
    let mut conn = pool.acquire().await.unwrap();
    proxy.hold();
    let cancelled = tokio::time::timeout(
        std::time::Duration::from_millis(300),
        sqlx::Acquire::begin(&mut conn),
    )
    .await
    .is_err();
    assert!(cancelled, "BEGIN answered through a held proxy");
    drop(conn);
    proxy.release();

    // The next borrower (the same, only connection) writes; another session sees it.
    sqlx::query("INSERT INTO pool_probe VALUES (1)")
        .execute(&pool)
        .await
        .unwrap();
    let seen: i64 = sqlx::query_scalar("SELECT count(*) FROM pool_probe")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        seen, 1,
        "a write after a cancelled BEGIN is not committed: it ran inside that transaction"
    );
}
