//! The pipeline on the embedded broker, and the store's exactly-once guarantees.

use serde_json::json;
use termopar_broker::BrokerSettings;
use termopar_core::{
    reading::{parse_message, Limits},
    settings::MqttEndpoint,
    store::{ReadingStore, Segment, StoreOutcome},
    topic::Topics,
};
use test_support::{eventually, Proxy, DEFAULT_DEADLINE};
use uuid::Uuid;

use crate::harness::*;

#[tokio::test]
async fn readings_from_mosquitto_pub_reach_both_stores_exactly_once() {
    let stores = Stores::new().await;
    let (client, sensors) = stores.client_with_sensors(2).await;
    let (s1, s2) = (sensors[0].0, sensors[1].0);
    let broker = termopar_broker::start(&BrokerSettings::ephemeral(), None)
        .await
        .unwrap();
    let v4 = MqttEndpoint::parse(&broker.url()).unwrap();
    // One port for both versions.
    let v5 = v4.clone();
    let consumer = RunningConsumer::start(consumer_settings(v4.clone()), &stores).await;
    let topics = Topics::new("");
    let (t1, t2) = (topics.readings(client, s1), topics.readings(client, s2));
    let ids: Vec<Uuid> = (0..8).map(|_| Uuid::new_v4()).collect();

    // QoS 1 and 0, MQTT 3.1.1 and 5, single objects and arrays, extra fields, a replay.
    let first =
        json!({"id": ids[0], "ts": "2026-03-01T10:00:00Z", "temperature": -18.5, "door": "closed"});
    mosquitto_pub(&v4, &t1, first.to_string().as_bytes(), 1, "mqttv311");
    let array = json!([
        reading(ids[1], 60, -18.0),
        reading(ids[2], 120, -17.5),
        reading(ids[3], 1800, -17.0)
    ]);
    mosquitto_pub(&v4, &t1, array.to_string().as_bytes(), 0, "mqttv311");
    mosquitto_pub(
        &v5,
        &t2,
        reading(ids[4], 10, 4.25).to_string().as_bytes(),
        1,
        "mqttv5",
    );
    let array = json!([reading(ids[5], 20, 4.5), reading(ids[6], 30, 4.75)]);
    mosquitto_pub(&v5, &t2, array.to_string().as_bytes(), 1, "mqttv5");
    mosquitto_pub(&v4, &t1, first.to_string().as_bytes(), 1, "mqttv311");
    mosquitto_pub(
        &v4,
        &t2,
        reading(ids[7], 40, 5.0).to_string().as_bytes(),
        1,
        "mqttv311",
    );

    stores.wait_for_readings(8, DEFAULT_DEADLINE).await;
    consumer.stop().await;
    let stored = stores.readings().await;
    assert_eq!(stored.len(), 8, "the replayed reading is stored once");
    let mut got: Vec<Uuid> = stored.iter().map(|r| r.id).collect();
    let mut want = ids.clone();
    got.sort();
    want.sort();
    assert_eq!(got, want);
    let first = stored.iter().find(|r| r.id == ids[0]).unwrap();
    assert_eq!(first.temperature.get(), -18.5);
    assert_eq!(first.client_id, client);
    assert_eq!(first.extra["door"], "closed");
    stores.assert_rollups_match_raw().await;
    let counts: Vec<(i64,)> =
        sqlx::query_as("SELECT count FROM reading_buckets ORDER BY sensor_id = $1 DESC, bucket")
            .bind(s1.0)
            .fetch_all(&stores.db.pool)
            .await
            .unwrap();
    assert_eq!(counts.iter().map(|c| c.0).sum::<i64>(), 8);
}

fn parsed(
    stores_client: termopar_core::ids::ClientId,
    sensor: termopar_core::ids::SensorId,
    payload: serde_json::Value,
) -> Vec<termopar_core::reading::Reading> {
    parse_message(
        payload.to_string().as_bytes(),
        sensor,
        stores_client,
        chrono::Utc::now(),
        &Limits::default(),
    )
    .unwrap()
    .readings
}

#[tokio::test]
async fn storing_the_same_readings_again_counts_them_once() {
    let stores = Stores::new().await;
    let (client, sensors) = stores.client_with_sensors(1).await;
    let readings = parsed(
        client,
        sensors[0].0,
        json!([
            reading(Uuid::new_v4(), 0, 1.0),
            reading(Uuid::new_v4(), 5, 2.0),
            reading(Uuid::new_v4(), 5000, 3.0)
        ]),
    );

    let first = stores.store.store(&readings).await.unwrap();
    let mut again = stores.store.store(&readings).await.unwrap();
    let doubled: Vec<_> = readings.iter().chain(readings.iter()).cloned().collect();
    let mut within = stores.store.store(&doubled).await.unwrap();
    // Which were stored before, by id (in no particular order).
    let mut ids: Vec<Uuid> = readings.iter().map(|r| r.id).collect();
    ids.sort();
    for outcome in [&mut again, &mut within] {
        outcome.already_stored.sort();
        assert_eq!(std::mem::take(&mut outcome.already_stored), ids);
    }

    assert_eq!(
        first,
        StoreOutcome {
            inserted: 3,
            duplicates: 0,
            refused: vec![],
            already_stored: vec![],
            sensor_counts: vec![(sensors[0].0, 3)]
        }
    );
    assert_eq!(
        again,
        StoreOutcome {
            inserted: 0,
            duplicates: 3,
            refused: vec![],
            already_stored: vec![],
            sensor_counts: vec![]
        }
    );
    assert_eq!(
        within,
        StoreOutcome {
            inserted: 0,
            duplicates: 6,
            refused: vec![],
            already_stored: vec![],
            sensor_counts: vec![]
        }
    );
    stores.assert_rollups_match_raw().await;
}

#[tokio::test]
async fn a_crash_between_the_two_stores_leaves_nothing_counted_and_its_segment_is_deleted() {
    let stores = Stores::new().await;
    let (client, sensors) = stores.client_with_sensors(1).await;
    let readings = parsed(
        client,
        sensors[0].0,
        json!([
            reading(Uuid::new_v4(), 0, 1.5),
            reading(Uuid::new_v4(), 1, 2.5)
        ]),
    );

    // What a consumer killed right after its MongoDB insert leaves behind: the write's
    // intent, due, and its segment in the document store, registered nowhere.
    let orphan = Segment::new(mongodb::bson::oid::ObjectId::new(), readings.clone());
    sqlx::query(
        "INSERT INTO raw_doc_expiry (docs, due_at, pending_write)
         VALUES ($1, now() - interval '1 minute', true)",
    )
    .bind(vec![orphan.id.bytes().to_vec()])
    .execute(&stores.db.pool)
    .await
    .unwrap();
    let segments = stores
        .mongo
        .database()
        .await
        .collection::<mongodb::bson::RawDocumentBuf>(termopar_core::store::SEGMENTS);
    segments.insert_one(orphan.encode()).await.unwrap();
    assert_eq!(
        stores.reading_count().await,
        0,
        "nothing registered, nothing counted"
    );

    // The redelivery stores the readings anew; the orphan is deleted, once.
    let redelivered = stores.store.store(&readings).await.unwrap();
    assert_eq!(redelivered.inserted, 2);
    assert_eq!(stores.store.expire_due().await.unwrap(), 1);
    assert_eq!(stores.store.expire_due().await.unwrap(), 0);
    let orphan_left = segments
        .find_one(mongodb::bson::doc! { "_id": orphan.id })
        .await
        .unwrap();
    assert!(orphan_left.is_none(), "the orphan segment is deleted");
    stores.assert_rollups_match_raw().await;
    let count: i64 = sqlx::query_scalar("SELECT sum(count)::bigint FROM reading_buckets")
        .fetch_one(&stores.db.pool)
        .await
        .unwrap();
    assert_eq!(count, 2);
    // A redelivery after the commit finds every reading stored.
    let again = stores.store.store(&readings).await.unwrap();
    assert_eq!(again.duplicates, 2);
}

#[tokio::test]
async fn writers_racing_with_the_same_readings_store_each_once() {
    let stores = Stores::new().await;
    let (client, sensors) = stores.client_with_sensors(3).await;
    let readings: Vec<_> = sensors
        .iter()
        .flat_map(|(s, _)| {
            parsed(
                client,
                *s,
                serde_json::Value::Array(
                    (0..40)
                        .map(|i| reading(Uuid::new_v4(), i * 37, i as f64 / 4.0))
                        .collect(),
                ),
            )
        })
        .collect();
    let writers: Vec<_> = (0..8)
        .map(|_| {
            let (store, readings) = (stores.store.clone(), readings.clone());
            tokio::spawn(async move { store.store(&readings).await.unwrap() })
        })
        .collect();
    let mut inserted = 0;
    let mut duplicates = 0;
    for w in writers {
        let outcome = w.await.unwrap();
        inserted += outcome.inserted;
        duplicates += outcome.duplicates;
        assert!(outcome.refused.is_empty());
    }
    assert_eq!(
        inserted,
        readings.len(),
        "each reading stored by exactly one writer"
    );
    assert_eq!(duplicates, 7 * readings.len());
    // The losers' writes expire (2 s in tests) and their segments are deleted.
    eventually("the losers' writes expired", DEFAULT_DEADLINE, || async {
        stores.store.expire_due().await.unwrap();
        (stores.pending_writes().await == 0).then_some(())
    })
    .await;
    stores.assert_rollups_match_raw().await;
}

#[tokio::test]
async fn a_recomputed_bucket_equals_the_incremental_one() {
    let stores = Stores::new().await;
    let (client, sensors) = stores.client_with_sensors(1).await;
    let sensor = sensors[0].0;
    // Out of order and late: the bucket is filled in several batches.
    for secs in [600, 0, 300, 899, 1] {
        let r = parsed(
            client,
            sensor,
            reading(Uuid::new_v4(), secs, secs as f64 / 7.0),
        );
        stores.store.store(&r).await.unwrap();
    }
    let before: (i64, String, f64, f64) =
        sqlx::query_as("SELECT count, sum::text, min, max FROM reading_buckets")
            .fetch_one(&stores.db.pool)
            .await
            .unwrap();
    let bucket = chrono::DateTime::parse_from_rfc3339("2026-03-01T00:00:00Z")
        .unwrap()
        .to_utc();
    stores.store.recompute_bucket(sensor, bucket).await.unwrap();
    let after: (i64, String, f64, f64) =
        sqlx::query_as("SELECT count, sum::text, min, max FROM reading_buckets")
            .fetch_one(&stores.db.pool)
            .await
            .unwrap();
    assert_eq!(before, after);
    assert_eq!(after.0, 5);
}

#[tokio::test]
async fn a_document_store_outage_is_retried_and_nothing_is_lost_or_doubled() {
    let stores = Stores::new().await;
    let (client, sensors) = stores.client_with_sensors(1).await;
    let mongo_addr = {
        let e = MqttEndpoint::parse(&stores.mongo.settings.uri.replace("mongodb://", "")).unwrap();
        format!("{}:{}", e.host, e.port).parse().unwrap()
    };
    let proxy = Proxy::start(mongo_addr).await;
    // The consumer reaches MongoDB only through the proxy.
    let via_proxy = termopar_core::settings::MongoSettings {
        uri: format!(
            "mongodb://{}/?serverSelectionTimeoutMS=500&connectTimeoutMS=500",
            proxy.addr
        ),
        database: stores.mongo.settings.database.clone(),
    };
    let proxied = ReadingStore::with_tuning(
        stores.db.pool.clone(),
        &termopar_core::mongo::connect(&via_proxy).await.unwrap(),
        quick(),
    );
    let broker = termopar_broker::start(&BrokerSettings::ephemeral(), None)
        .await
        .unwrap();
    let endpoint = MqttEndpoint::parse(&broker.url()).unwrap();
    let consumer = termopar_consumer::Consumer::new(
        consumer_settings(endpoint.clone()),
        termopar_core::directory::SensorDirectory::new(stores.db.pool.clone()),
        proxied,
    );
    let mut subscribed = consumer.subscribed();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(consumer.run(async move {
        let _ = stopped.await;
    }));
    subscribed.wait_for(|s| *s).await.unwrap();

    proxy.cut();
    let topic = Topics::new("").readings(client, sensors[0].0);
    let ids: Vec<Uuid> = (0..20).map(|_| Uuid::new_v4()).collect();
    for (i, id) in ids.iter().enumerate() {
        mosquitto_pub(
            &endpoint,
            &topic,
            reading(*id, i as i64, 1.0 + i as f64)
                .to_string()
                .as_bytes(),
            1,
            "mqttv311",
        );
    }
    // The consumer keeps trying: each attempt leaves a pending write behind.
    eventually("a failed store attempt", DEFAULT_DEADLINE, || async {
        (stores.pending_writes().await > 0).then_some(())
    })
    .await;
    assert_eq!(stores.reading_count().await, 0);

    proxy.restore();
    stores
        .wait_for_readings(20, std::time::Duration::from_secs(30))
        .await;
    // The failed attempts' writes expire (they wrote nothing).
    stores.wait_no_pending_writes().await;
    let _ = stop.send(());
    task.await.unwrap().unwrap();
    assert_eq!(stores.reading_count().await, 20);
    stores.assert_rollups_match_raw().await;
}
