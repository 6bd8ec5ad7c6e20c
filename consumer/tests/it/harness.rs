//! Stores, sensors, a consumer, and publishers for one test.

use std::{collections::HashMap, time::Duration};

use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use mongodb::bson::{doc, Document};
use termopar_consumer::{Consumer, ConsumerSettings, Drainer};
use termopar_core::{
    directory::SensorDirectory,
    ids::{ClientId, SensorId},
    reading::Reading,
    settings::MqttEndpoint,
    store::{bucket_of, ReadingStore, Tuning},
};
pub use test_support::mosquitto_pub;
use test_support::{eventually, TestDb, TestMongo};
use uuid::Uuid;

/// The stores of one test.
pub struct Stores {
    pub db: TestDb,
    pub mongo: TestMongo,
    pub store: ReadingStore,
}

/// Tuning for tests: unfinished writes expire after 2 s.
pub fn quick() -> Tuning {
    Tuning {
        intent_ttl: Duration::from_secs(2),
        ..Tuning::default()
    }
}

impl Stores {
    pub async fn new() -> Self {
        Self::with_tuning(quick()).await
    }

    /// The same with the store tuned by `tuning`.
    pub async fn with_tuning(tuning: Tuning) -> Self {
        let db = TestDb::new().await;
        let mongo = TestMongo::new();
        let store = ReadingStore::with_tuning(db.pool.clone(), &mongo.database().await, tuning);
        Self { db, mongo, store }
    }

    /// A client with `n` sensors, written straight to PostgreSQL. Returns the client,
    /// the sensors and their secrets.
    pub async fn client_with_sensors(&self, n: usize) -> (ClientId, Vec<(SensorId, String)>) {
        let client = Uuid::new_v4();
        sqlx::query("INSERT INTO clients (id, name, timezone) VALUES ($1, $2, 'UTC')")
            .bind(client)
            .bind(format!("client {client}"))
            .execute(&self.db.pool)
            .await
            .unwrap();
        let mut sensors = Vec::new();
        for i in 0..n {
            let id = Uuid::new_v4();
            let secret = termopar_core::secrets::generate();
            sqlx::query(
                "INSERT INTO sensors (id, client_id, name, secret_hash) VALUES ($1, $2, $3, $4)",
            )
            .bind(id)
            .bind(client)
            .bind(format!("sensor {i}"))
            .bind(termopar_core::secrets::hash(&secret))
            .execute(&self.db.pool)
            .await
            .unwrap();
            sensors.push((SensorId(id), secret));
        }
        (ClientId(client), sensors)
    }

    pub async fn reading_count(&self) -> u64 {
        test_support::stored_count(&self.db.pool).await
    }

    pub async fn readings(&self) -> Vec<Reading> {
        test_support::stored_readings(&self.db.pool, &self.mongo.database().await).await
    }

    pub async fn dead_letters(&self) -> Vec<Document> {
        self.mongo
            .database()
            .await
            .collection::<Document>("dead_letters")
            .find(doc! {})
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap()
    }

    /// Waits until `n` readings are stored (and not more after a moment of quiet is not
    /// checked here: callers compare exact id sets).
    pub async fn wait_for_readings(&self, n: u64, deadline: Duration) {
        eventually(&format!("{n} readings stored"), deadline, || async {
            (self.reading_count().await >= n).then_some(())
        })
        .await;
    }

    /// Waits until no write is pending (what crashes and failures left was deleted).
    pub async fn wait_no_pending_writes(&self) {
        eventually("no pending write", Duration::from_secs(30), || async {
            (self.pending_writes().await == 0).then_some(())
        })
        .await;
    }

    pub async fn pending_writes(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM raw_doc_expiry WHERE pending_write")
            .fetch_one(&self.db.pool)
            .await
            .unwrap()
    }

    /// Asserts that every PostgreSQL bucket equals an aggregate of the raw readings, and
    /// that there is no bucket without readings or readings without bucket; and that
    /// each sensor's latest row is its newest raw reading.
    pub async fn assert_rollups_match_raw(&self) {
        let readings = self.readings().await;
        let mut groups: HashMap<(Uuid, DateTime<Utc>), Vec<f64>> = HashMap::new();
        for r in &readings {
            groups
                .entry((r.sensor_id.0, bucket_of(r.ts)))
                .or_default()
                .push(r.temperature.get());
        }
        let ids: std::collections::HashSet<Uuid> = readings.iter().map(|r| r.id).collect();
        assert_eq!(ids.len(), readings.len(), "a reading stored twice");
        let buckets: Vec<(Uuid, DateTime<Utc>, i64, String, f64, f64)> = sqlx::query_as(
            "SELECT sensor_id, bucket, count, sum::text, min, max FROM reading_buckets",
        )
        .fetch_all(&self.db.pool)
        .await
        .unwrap();
        assert_eq!(buckets.len(), groups.len(), "number of buckets");
        for (sensor, bucket, count, sum, min, max) in buckets {
            let temps = groups
                .get(&(sensor, bucket))
                .unwrap_or_else(|| panic!("bucket {bucket} of {sensor} has no readings"));
            // The recomputation is SQL over the raw values, independent of ingestion.
            let expected: (i64, String, f64, f64) = sqlx::query_as(
                "SELECT count(*), sum(t::numeric)::text, min(t), max(t) FROM unnest($1::float8[]) t",
            )
            .bind(temps)
            .fetch_one(&self.db.pool)
            .await
            .unwrap();
            assert_eq!(
                (count, sum, min, max),
                expected,
                "bucket {bucket} of {sensor}"
            );
        }
        let latest: Vec<(Uuid, Uuid, i64)> =
            sqlx::query_as("SELECT sensor_id, reading_id, count FROM sensor_latest")
                .fetch_all(&self.db.pool)
                .await
                .unwrap();
        let mut newest: HashMap<Uuid, &Reading> = HashMap::new();
        for r in &readings {
            let slot = newest.entry(r.sensor_id.0).or_insert(r);
            if (r.ts, r.id) > (slot.ts, slot.id) {
                *slot = r;
            }
        }
        assert_eq!(latest.len(), newest.len(), "latest rows");
        for (sensor, reading, count) in latest {
            assert_eq!(reading, newest[&sensor].id, "latest of {sensor}");
            let of_sensor = readings.iter().filter(|r| r.sensor_id.0 == sensor).count();
            assert_eq!(count as usize, of_sensor, "reading count of {sensor}");
        }
        // Every reading id is indexed once, in the bucket its segment is registered in.
        let indexed: i64 = sqlx::query_scalar("SELECT count(*) FROM reading_ids")
            .fetch_one(&self.db.pool)
            .await
            .unwrap();
        assert_eq!(indexed as usize, readings.len(), "indexed reading ids");
        // Each day's hourly cells and quarters are its buckets' aggregates (sums as
        // floats).
        for (table, cells, cell) in [
            (
                "reading_days",
                24,
                "extract(hour FROM bucket AT TIME ZONE 'UTC')::int",
            ),
            (
                "reading_day_quarters",
                96,
                "extract(hour FROM bucket AT TIME ZONE 'UTC')::int * 4
                 + extract(minute FROM bucket AT TIME ZONE 'UTC')::int / 15",
            ),
        ] {
            let off: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "WITH b AS (
                    SELECT sensor_id, (bucket AT TIME ZONE 'UTC')::date AS day, {cell} + 1 AS h,
                           sum(count)::bigint AS n, sum(sum)::float8 AS s, min(min) AS lo,
                           max(max) AS hi
                    FROM reading_buckets GROUP BY 1, 2, 3
                 ), c AS (
                    SELECT d.sensor_id, d.day, i AS h, d.counts[i] AS n, d.sums[i] AS s,
                           d.mins[i] AS lo, d.maxs[i] AS hi
                    FROM {table} d, generate_series(1, {cells}) i WHERE d.counts[i] > 0
                 )
                 SELECT count(*) FROM b FULL JOIN c USING (sensor_id, day, h)
                 WHERE b.n IS DISTINCT FROM c.n OR b.lo IS DISTINCT FROM c.lo
                    OR b.hi IS DISTINCT FROM c.hi OR abs(b.s - c.s) > 1e-9 * greatest(1, abs(b.s))
                    OR b.s IS NULL OR c.s IS NULL"
            )))
            .fetch_one(&self.db.pool)
            .await
            .unwrap();
            assert_eq!(
                off, 0,
                "{table}: cells that are not the aggregate of their buckets"
            );
        }
        assert_eq!(self.pending_writes().await, 0, "writes left pending");
    }

    /// Environment for a consumer process on these stores.
    pub fn consumer_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("DATABASE_URL", self.db.url.clone()),
            ("MONGODB_URI", self.mongo.settings.uri.clone()),
            ("MONGODB_DB", self.mongo.settings.database.clone()),
            ("RUST_LOG", "warn".into()),
        ]
    }
}

/// The simulator's view of a client's sensors (all with one profile).
pub fn sim_sensors(
    client: ClientId,
    sensors: &[(SensorId, String)],
) -> Vec<termopar_device_sim::SimSensor> {
    sensors
        .iter()
        .map(|(s, secret)| termopar_device_sim::SimSensor {
            client_id: client,
            sensor_id: *s,
            profile: termopar_device_sim::Profile::pharma(chrono_tz::UTC)[0].clone(),
            secret: Some(secret.clone()),
        })
        .collect()
}

/// Consumer settings for a test: a unique client id.
pub fn consumer_settings(broker: MqttEndpoint) -> ConsumerSettings {
    ConsumerSettings::new(broker, format!("consumer-{}", Uuid::new_v4().simple()))
}

/// A consumer running in this process; stops when dropped.
pub struct RunningConsumer {
    /// Waits until it stored what its broker holds for it.
    pub drainer: Drainer,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl RunningConsumer {
    /// Starts it and waits until its subscription is confirmed.
    pub async fn start(settings: ConsumerSettings, stores: &Stores) -> Self {
        let consumer = Consumer::new(
            settings,
            SensorDirectory::new(stores.db.pool.clone()),
            stores.store.clone(),
        );
        let mut subscribed = consumer.subscribed();
        let drainer = consumer.drainer();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(consumer.run(async move {
            let _ = stopped.await;
        }));
        tokio::time::timeout(Duration::from_secs(20), subscribed.wait_for(|s| *s))
            .await
            .expect("the consumer subscribes within 20 s")
            .unwrap();
        Self {
            drainer,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Stops it, finishing its batch.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }
}

impl Drop for RunningConsumer {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// A reading payload with an id and a timestamp `secs` after 2026-03-01T00:00Z.
pub fn reading(id: Uuid, secs: i64, temperature: f64) -> serde_json::Value {
    let ts = DateTime::parse_from_rfc3339("2026-03-01T00:00:00Z").unwrap()
        + chrono::Duration::seconds(secs);
    serde_json::json!({ "id": id, "ts": ts.to_rfc3339(), "temperature": temperature })
}
