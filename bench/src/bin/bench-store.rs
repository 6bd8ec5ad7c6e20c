//! `make bench-store`: the reading store at volume, on FerretDB. Every number and every
//! baseline is measured in this run.
//!
//! 1. History through the API (sequential requests, the five queries in turn,
//!    `BENCH_STORE_SAMPLES` rounds, p99) when 10,000 readings are
//!    stored, and again at `BENCH_STORE_READINGS` (default 5,000,000), against `GET
//!    .../readings/latest` in the same run: page 1, a cursor deep in the sensor, a 1-hour
//!    window a month back, `latest=true`. The data goes through `ReadingStore::store` of
//!    another store instance (as a consumer's), so the API reads cold from the document
//!    store; the sensor's newest 15 minutes arrive one reading a call, as from a device
//!    that sends one reading a message.
//! 2. Ingest end to end (QoS 1, acknowledged after both stores have it, through the
//!    consumer binary) against the store's own write rate in the same batches.
//! 3. Many slow sensors (10,000, one reading every 10 s, 20 simulated minutes, with
//!    merges as the background work does them): bytes of documents written per reading,
//!    against the reading's own size as one BSON document.
//! 4. The raw store's size per reading against one document a reading.
//! 5. Daily averages of a year of 1 Hz readings, uncached (a zone not asked before).

use std::time::{Duration, Instant};

use chrono::{DateTime, DurationRound, TimeZone, Utc};
use mongodb::bson::{doc, Document, RawDocumentBuf};
use serde_json::Value;
use termopar_bench::{
    ingest::{end_to_end, ingest_store_rate, Fixture},
    ms, per_sec, percentile, print_table, start_api_as_admin, AdminApi, Row,
};
use termopar_core::{
    ids::{ClientId, SensorId},
    reading::{Celsius, Reading},
    settings::env_parse,
    store::{codec, ReadingStore, SEGMENTS},
};
use test_support::{TestDb, TestMongo};
use uuid::Uuid;

/// Sequential GETs of `url`, each timed; every answer must be 200.
async fn sample(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    n: usize,
) -> anyhow::Result<Vec<Duration>> {
    Ok(sample_interleaved(http, &[url], token, n).await?.remove(0))
}

/// `n` rounds of one GET of each of `urls` in turn, each timed (after 10 untimed rounds):
/// a pause of the machine (a checkpoint, autovacuum) lands on every query alike, so the
/// ratios between them are the queries'. Every answer must be 200.
async fn sample_interleaved(
    http: &reqwest::Client,
    urls: &[&str],
    token: &str,
    n: usize,
) -> anyhow::Result<Vec<Vec<Duration>>> {
    let mut out = vec![Vec::with_capacity(n); urls.len()];
    for round in 0..n + 10 {
        for (url, times) in urls.iter().zip(&mut out) {
            let t = Instant::now();
            let resp = http.get(*url).bearer_auth(token).send().await?;
            anyhow::ensure!(resp.status().is_success(), "{url}: {}", resp.status());
            resp.bytes().await?;
            if round >= 10 {
                times.push(t.elapsed());
            }
        }
    }
    Ok(out)
}

async fn get_json(http: &reqwest::Client, url: &str, token: &str) -> anyhow::Result<Value> {
    let resp = http.get(url).bearer_auth(token).send().await?;
    anyhow::ensure!(resp.status().is_success(), "{url}: {}", resp.status());
    Ok(resp.json().await?)
}

fn reading(client: ClientId, sensor: SensorId, ts: DateTime<Utc>, i: u64) -> Reading {
    Reading {
        id: Uuid::new_v4(),
        sensor_id: sensor,
        client_id: client,
        ts,
        temperature: Celsius::try_from(4.0 + (i % 300) as f64 / 100.0).expect("in range"),
        received_at: ts,
        extra: Default::default(),
    }
}

/// Runs compaction passes at `now` until nothing is due, as the background work would
/// over time.
async fn settle(store: &ReadingStore, now: DateTime<Utc>) -> anyhow::Result<()> {
    while store.compact(now).await?.buckets > 0 {}
    Ok(())
}

/// p99 of each history query at one volume.
struct Latencies {
    /// Page 1 asked for the first time: its segments come from the document store.
    first_page1: Duration,
    latest: Duration,
    page1: Duration,
    deep: Duration,
    window: Duration,
    latest_flag: Duration,
}

async fn measure(
    http: &reqwest::Client,
    api: &str,
    token: &str,
    sensor: SensorId,
    depth: usize,
    window_from: DateTime<Utc>,
    n: usize,
) -> anyhow::Result<Latencies> {
    let readings = format!("{api}/sensors/{sensor}/readings");
    let t = Instant::now();
    get_json(http, &format!("{readings}?page_size=50"), token).await?;
    let first_page1 = t.elapsed();
    // The cursor after the `depth`-th newest reading, walked to once, untimed.
    let mut cursor = String::new();
    let mut walked = 0;
    while walked < depth {
        let take = (depth - walked).min(1000);
        let url = if cursor.is_empty() {
            format!("{readings}?page_size={take}")
        } else {
            format!("{readings}?page_size={take}&cursor={cursor}")
        };
        let page = get_json(http, &url, token).await?;
        walked += page["items"].as_array().map_or(0, Vec::len);
        cursor = page["next_cursor"]
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("the sensor has fewer than {depth} readings"))?
            .to_owned();
    }
    let from = window_from.to_rfc3339().replace('+', "%2B");
    let to = (window_from + chrono::Duration::hours(1))
        .to_rfc3339()
        .replace('+', "%2B");
    let urls = [
        format!("{readings}/latest"),
        format!("{readings}?page_size=50"),
        format!("{readings}?page_size=50&cursor={cursor}"),
        format!("{readings}?page_size=50&from={from}&to={to}"),
        format!("{readings}?latest=true"),
    ];
    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
    let mut times = sample_interleaved(http, &urls, token, n).await?;
    let names = ["latest", "page 1", "cursor", "window", "latest=true"];
    let summary: Vec<String> = names
        .iter()
        .zip(&mut times)
        .map(|(name, t)| {
            format!(
                "{name} p50 {} p99 {}",
                ms(percentile(t, 50.0)),
                ms(percentile(t, 99.0))
            )
        })
        .collect();
    eprintln!("history at {depth}: {}", summary.join(", "));
    let mut p99 = times.into_iter().map(|mut v| percentile(&mut v, 99.0));
    let mut next = || p99.next().expect("one per url");
    Ok(Latencies {
        first_page1,
        latest: next(),
        page1: next(),
        deep: next(),
        window: next(),
        latest_flag: next(),
    })
}

/// Section 1: history at two volumes.
async fn history(rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let total: u64 = env_parse("BENCH_STORE_READINGS", 5_000_000)?;
    let samples: usize = env_parse("BENCH_STORE_SAMPLES", 1000)?;
    let db = TestDb::new().await;
    let mongo = TestMongo::new();
    let AdminApi {
        api, token, http, ..
    } = start_api_as_admin(&db, &mongo).await?;
    // Another process's store: what the API reads, it reads from the document store.
    let loader = ReadingStore::new(db.pool.clone(), &mongo.database().await);
    let (client, sensors) = db.client_with_sensors(20).await;
    let probe = sensors[0];
    let end =
        Utc::now().duration_trunc(chrono::Duration::seconds(1))? - chrono::Duration::minutes(1);
    let days = 35;
    let start = end - chrono::Duration::days(days);
    let month_back = end - chrono::Duration::days(30);

    // 10,000 readings: the probe's, one every ~5 minutes over 35 days.
    let small = 10_000u64;
    let step = chrono::Duration::milliseconds(days * 86_400_000 / small as i64);
    let first: Vec<Reading> = (0..small)
        .map(|i| reading(client, probe, start + step * i as i32, i))
        .collect();
    for chunk in first.chunks(1000) {
        loader.store(chunk).await?;
    }
    settle(&loader, Utc::now()).await?;
    eprintln!("history: {small} readings stored; measuring");
    let at_small = measure(&http, &api, &token, probe, 9_000, month_back, samples).await?;

    // Up to `total`: the probe at 1 Hz over the same 35 days, the other 19 sensors
    // evenly, in time order, 5,000 readings a call (a consumer's batch).
    let live = 900u64;
    let probe_more = (days * 86_400) as u64 - live;
    let others = total.saturating_sub(small + probe_more + live);
    let per_other = (others / 19).max(1);
    let other_every = (days * 86_400) as u64 / per_other;
    let started = Instant::now();
    let mut batch: Vec<Reading> = Vec::with_capacity(5000);
    let mut stored = small;
    for s in 0..probe_more {
        let ts = start + chrono::Duration::seconds(s as i64) + chrono::Duration::milliseconds(500);
        batch.push(reading(client, probe, ts, s));
        for (k, sensor) in sensors[1..].iter().enumerate() {
            if (s + k as u64 * 7).is_multiple_of(other_every) {
                batch.push(reading(client, *sensor, ts, s));
            }
        }
        if batch.len() >= 5000 {
            stored += loader.store(&batch).await?.inserted as u64;
            batch.clear();
            if stored % 500_000 < 5000 {
                eprintln!(
                    "history: {stored} stored ({:.0}/s)",
                    (stored - small) as f64 / started.elapsed().as_secs_f64()
                );
            }
        }
    }
    stored += loader.store(&batch).await?.inserted as u64;
    // The newest 15 minutes: one reading a call, merged as they come.
    for s in 0..live {
        let ts = end - chrono::Duration::seconds((live - s) as i64);
        stored += loader
            .store(&[reading(client, probe, ts, s)])
            .await?
            .inserted as u64;
        if s % 10 == 0 {
            loader.compact(Utc::now()).await?;
        }
    }
    let load_rate = (stored - small) as f64 / started.elapsed().as_secs_f64();
    settle(&loader, Utc::now()).await?;
    // What autovacuum would do in the minutes after a load, done before measuring
    // rather than during it.
    sqlx::query("VACUUM ANALYZE").execute(&db.pool).await?;
    eprintln!("history: {stored} readings stored ({load_rate:.0}/s); measuring");
    let at_large = measure(&http, &api, &token, probe, 10_000, month_back, samples).await?;

    let latest = at_large.latest;
    for (name, small_p99, large_p99) in [
        ("page 1", at_small.page1, at_large.page1),
        (
            "cursor deep in the sensor (9,000 / 10,000 readings down)",
            at_small.deep,
            at_large.deep,
        ),
        (
            "1-hour window a month back",
            at_small.window,
            at_large.window,
        ),
        ("latest=true", at_small.latest_flag, at_large.latest_flag),
    ] {
        let ratio = large_p99.as_secs_f64() / small_p99.as_secs_f64();
        rows.push(Row {
            name: format!("history {name}: p99 at {stored} readings vs at {small}"),
            value: ms(large_p99),
            baseline: ms(small_p99),
            ratio: Some(ratio),
            target: "≤ 1.5".into(),
            met: Some(ratio <= 1.5),
        });
        let vs_latest = large_p99.as_secs_f64() / latest.as_secs_f64();
        rows.push(Row {
            name: format!("history {name}: p99 vs GET .../readings/latest p99, at {stored}"),
            value: ms(large_p99),
            baseline: format!("{} latest", ms(latest)),
            ratio: Some(vs_latest),
            target: "≤ 3".into(),
            met: Some(vs_latest <= 3.0),
        });
    }
    rows.push(Row {
        name: format!("GET .../readings/latest p99 at {stored} vs at {small}"),
        value: ms(at_large.latest),
        baseline: ms(at_small.latest),
        ratio: Some(at_large.latest.as_secs_f64() / at_small.latest.as_secs_f64()),
        target: "".into(),
        met: None,
    });
    rows.push(Row::info(
        format!(
            "history page 1 asked first (segments from the document store, not the cache) at {small} / at {stored}"
        ),
        format!("{} / {}", ms(at_small.first_page1), ms(at_large.first_page1)),
    ));
    rows.push(Row::info(
        "loading: ReadingStore::store, 5,000 readings a call (readings/s)",
        per_sec(load_rate),
    ));
    Ok(())
}

/// Section 2: ingest end to end against the store's own rate.
async fn ingest(rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let total: usize = env_parse("BENCH_READINGS", 1_000_000)?;
    let batch: usize = env_parse("BENCH_BATCH", 10)?;
    let messages = total / batch;
    let total = (messages * batch) as u64;
    let ceiling_fixture = Fixture::new().await?;
    let readings = ceiling_fixture.readings(&ceiling_fixture.messages(messages, batch));
    // The consumer stores a batch when its share of the broker's window of QoS 1 messages
    // waits, `pipeline` batches at once: the same calls, without MQTT.
    let consumer = termopar_consumer::ConsumerSettings::from_env()?;
    let per_call = consumer.max_unacked.div_ceil(consumer.pipeline) * batch;
    let ceiling =
        ingest_store_rate(&ceiling_fixture, &readings, per_call, consumer.pipeline).await?;
    eprintln!("ingest: store alone {ceiling:.0}/s");
    let fixture = Fixture::new().await?;
    let (rate, rss) = end_to_end(&fixture, fixture.messages(messages, batch), total).await?;
    eprintln!("ingest: end to end {rate:.0}/s, consumer peak RSS {rss:.1} MiB");
    rows.push(Row {
        name: format!("ingest end to end, QoS 1, ack after persist, {total} readings in messages of {batch} (readings/s)"),
        value: per_sec(rate),
        baseline: "30000/s".into(),
        ratio: Some(rate / 30_000.0),
        target: "≥ 30000/s".into(),
        met: Some(rate >= 30_000.0),
    });
    rows.push(Row {
        name: "ingest end to end vs the store's own write rate (same readings, same batches)"
            .into(),
        value: per_sec(rate),
        baseline: format!(
            "{} ReadingStore::store ({per_call} a call, {} at once)",
            per_sec(ceiling),
            consumer.pipeline
        ),
        ratio: Some(rate / ceiling),
        target: "≥ 0.70".into(),
        met: Some(rate / ceiling >= 0.7),
    });
    rows.push(Row::info(
        "consumer peak RSS during end to end",
        format!("{rss:.1} MiB"),
    ));
    Ok(())
}

/// Bytes of segments written so far, by what wrote them (from the store's metrics).
fn bytes_written() -> f64 {
    let text = termopar_core::metrics::prometheus().render();
    text.lines()
        .filter(|l| l.starts_with("raw_store_bytes_written_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The size of a collection as the server reports it (`storageSize`, `size`).
async fn collection_size(db: &mongodb::Database, name: &str) -> anyhow::Result<(f64, f64)> {
    let stats = db.run_command(doc! { "collStats": name }).await?;
    let num = |k: &str| {
        stats
            .get(k)
            .and_then(|v| {
                v.as_f64()
                    .or(v.as_i64().map(|x| x as f64))
                    .or(v.as_i32().map(f64::from))
            })
            .unwrap_or(f64::NAN)
    };
    Ok((num("storageSize"), num("size")))
}

/// Sections 3 and 4: many slow sensors, and the store's size.
async fn slow_sensors(rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let n: usize = env_parse("BENCH_SLOW_SENSORS", 10_000)?;
    let minutes: i64 = env_parse("BENCH_SLOW_MINUTES", 20)?;
    let db = TestDb::new().await;
    let mongo = TestMongo::new();
    let store = ReadingStore::new(db.pool.clone(), &mongo.database().await);
    let (client, sensors) = db.client_with_sensors(n).await;
    // Simulated time, from a bucket's start a day ago; each sensor every 10 s, spread
    // evenly; a store call per 20 ms of readings (a consumer's batch), and the
    // background work's compaction every simulated second.
    let t0 = Utc::now().duration_trunc(chrono::Duration::minutes(15))? - chrono::Duration::days(1);
    let before = bytes_written();
    let mut own = 0usize;
    let mut stored = 0usize;
    let mut batch = Vec::new();
    let ticks = minutes * 60 * 50; // 20 ms each
    let started = Instant::now();
    for tick in 0..ticks {
        let now = t0 + chrono::Duration::milliseconds(tick * 20);
        // Sensors whose 10-s phase falls in this 20-ms tick.
        let per_tick = n as i64 * 20 / 10_000;
        let first = (tick % 500) * per_tick;
        for k in first..(first + per_tick).min(n as i64) {
            let r = reading(client, sensors[k as usize], now, tick as u64);
            own += codec::single_document_len(&r);
            batch.push(r);
        }
        if !batch.is_empty() {
            stored += store.store(&batch).await?.inserted;
            batch.clear();
        }
        if tick % 50 == 49 {
            for _ in 0..16 {
                if store.compact(now).await?.buckets == 0 {
                    break;
                }
            }
        }
    }
    let during = bytes_written() - before;
    // After the last buckets closed too.
    settle(&store, t0 + chrono::Duration::minutes(minutes + 20)).await?;
    let after = bytes_written() - before;
    eprintln!(
        "slow sensors: {stored} readings in {:.0} s, {during:.0} bytes written, {after:.0} after closing",
        started.elapsed().as_secs_f64()
    );
    let per_reading_own = own as f64 / stored as f64;
    for (what, bytes) in [
        ("by the end of the 20 minutes", during),
        ("once every bucket closed", after),
    ] {
        let ratio = bytes / stored as f64 / per_reading_own;
        rows.push(Row {
            name: format!(
                "{n} slow sensors (1 reading / 10 s, {minutes} simulated minutes): bytes of documents written per reading, {what}"
            ),
            value: format!("{:.0} B", bytes / stored as f64),
            baseline: format!("{per_reading_own:.0} B the reading as one BSON document"),
            ratio: Some(ratio),
            target: "≤ 3".into(),
            met: Some(ratio <= 3.0),
        });
    }

    // The same readings one document each, as the previous version stored them.
    let mongo_db = mongo.database().await;
    let legacy = mongo_db.collection::<Document>("readings_one_per_document");
    let all = test_support::stored_readings(&db.pool, &mongo_db).await;
    for chunk in all.chunks(1000) {
        let docs: Vec<Document> = chunk
            .iter()
            .map(|r| {
                doc! {
                    "_id": r.id.to_string(), "sensor_id": r.sensor_id.to_string(),
                    "client_id": r.client_id.to_string(), "ts": codec::bson_time(r.ts),
                    "temperature": r.temperature.get(), "received_at": codec::bson_time(r.received_at),
                    "batch": Uuid::new_v4().to_string(), "extra": {},
                }
            })
            .collect();
        legacy.insert_many(docs).await?;
    }
    // Replaced segments are deleted after their grace period; count what stays.
    sqlx::query("UPDATE raw_doc_expiry SET due_at = now() WHERE NOT pending_write")
        .execute(&db.pool)
        .await?;
    store.expire_due().await?;
    let (segments_storage, segments_size) = collection_size(&mongo_db, SEGMENTS).await?;
    let (legacy_storage, legacy_size) =
        collection_size(&mongo_db, "readings_one_per_document").await?;
    let count = all.len() as f64;
    rows.push(Row {
        name: format!(
            "raw store size per reading, {} readings (collStats storageSize)",
            all.len()
        ),
        value: format!("{:.1} B", segments_storage / count),
        baseline: format!("{:.1} B one document a reading", legacy_storage / count),
        ratio: Some(segments_storage / legacy_storage),
        target: "≤ 1.0".into(),
        met: Some(segments_storage <= legacy_storage),
    });
    rows.push(Row {
        name: "raw store size per reading (collStats size)".into(),
        value: format!("{:.1} B", segments_size / count),
        baseline: format!("{:.1} B one document a reading", legacy_size / count),
        ratio: Some(segments_size / legacy_size),
        target: "≤ 1.0".into(),
        met: Some(segments_size <= legacy_size),
    });
    let index: i64 = sqlx::query_scalar(
        "SELECT pg_total_relation_size('reading_ids') + pg_total_relation_size('raw_docs')",
    )
    .fetch_one(&db.pool)
    .await?;
    rows.push(Row::info(
        "its index in PostgreSQL per reading (reading_ids + raw_docs, with indexes)",
        format!("{:.1} B", index as f64 / count),
    ));
    let _ = legacy.drop().await;
    let _ = mongo_db.collection::<RawDocumentBuf>(SEGMENTS).drop().await;
    Ok(())
}

/// Section 5: daily averages of a year of 1 Hz readings, as the rollups ingestion makes
/// (31.5 million readings through the store would take the run most of an hour; the
/// endpoint never reads raw readings).
async fn daily(rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let db = TestDb::new().await;
    let mongo = TestMongo::new();
    let AdminApi {
        api, token, http, ..
    } = start_api_as_admin(&db, &mongo).await?;
    let (_, sensors) = db.client_with_sensors(1).await;
    let sensor = sensors[0];
    let start = Utc.with_ymd_and_hms(2025, 1, 1, 0, 0, 0).unwrap();
    // 900 readings a bucket, a daily cycle; the sums exact (NUMERIC), as ingestion adds.
    sqlx::query(
        "INSERT INTO reading_buckets (sensor_id, bucket, count, sum, min, max)
         SELECT $1, b, 900, s, lo, hi FROM (
            SELECT $2::timestamptz + make_interval(mins => 15 * i) AS b,
                   round((900 * (5 + 3 * sin(i / 96.0 * 2 * pi())))::numeric, 2) AS s,
                   4.5 + 3 * sin(i / 96.0 * 2 * pi()) AS lo,
                   5.5 + 3 * sin(i / 96.0 * 2 * pi()) AS hi
            FROM generate_series(0, 365 * 96 - 1) i) t",
    )
    .bind(sensor.0)
    .bind(start)
    .execute(&db.pool)
    .await?;
    // The days' hourly cells, as ingestion keeps them, and fresh statistics (as
    // autovacuum would have taken by the time anyone asks).
    sqlx::query("SELECT rebuild_reading_days($1, '2024-12-31', '2026-01-01')")
        .bind(sensor.0)
        .execute(&db.pool)
        .await?;
    sqlx::query("VACUUM ANALYZE reading_buckets, reading_days, reading_day_quarters")
        .execute(&db.pool)
        .await?;
    let daily = format!("{api}/sensors/{sensor}/daily-averages?from=2025-01-01&to=2025-12-31");
    let check = get_json(&http, &daily, &token).await?;
    anyhow::ensure!(
        check["items"].as_array().map(Vec::len) == Some(365),
        "a year of days: {check}"
    );
    // Uncached: every request in a zone not asked before (the cache is per zone);
    // zones at :30 and :45 included.
    let zones: Vec<String> = chrono_tz::TZ_VARIANTS
        .iter()
        .map(|z| z.name().to_owned())
        .filter(|z| z.contains('/') && !z.starts_with("Etc/"))
        .take(300)
        .collect();
    let mut cold = Vec::new();
    for z in &zones {
        let t = Instant::now();
        let resp = http
            .get(format!("{daily}&tz={z}"))
            .bearer_auth(&token)
            .send()
            .await?;
        anyhow::ensure!(resp.status().is_success(), "{z}: {}", resp.status());
        resp.bytes().await?;
        cold.push(t.elapsed());
    }
    let mut slowest: Vec<(Duration, &String)> = cold.iter().copied().zip(&zones).collect();
    slowest.sort_by_key(|s| std::cmp::Reverse(s.0));
    eprintln!(
        "daily averages, slowest uncached zones: {}",
        slowest
            .iter()
            .take(8)
            .map(|(t, z)| format!("{z} {}", ms(*t)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let (p50, p99) = (percentile(&mut cold, 50.0), percentile(&mut cold, 99.0));
    let warm = percentile(&mut sample(&http, &daily, &token, 200).await?, 99.0);
    rows.push(Row {
        name: format!(
            "daily averages, 365 days of 1 Hz (31.5M readings), uncached: p99 over {} zones",
            zones.len()
        ),
        value: ms(p99),
        baseline: format!("{} p50; {} cached p99", ms(p50), ms(warm)),
        ratio: None,
        target: "≤ 5 ms".into(),
        met: Some(p99 <= Duration::from_millis(5)),
    });
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // The store's byte counters are read from the process's own metrics.
    termopar_core::metrics::prometheus();
    let only = std::env::var("BENCH_STORE_ONLY").unwrap_or_default();
    let wants = |s: &str| only.is_empty() || only.split(',').any(|o| o == s);
    let mut rows = Vec::new();
    if wants("slow") {
        slow_sensors(&mut rows).await?;
    }
    if wants("daily") {
        daily(&mut rows).await?;
    }
    if wants("ingest") {
        ingest(&mut rows).await?;
    }
    if wants("history") {
        history(&mut rows).await?;
    }
    print_table(
        "Reading store (2 cores; PostgreSQL and FerretDB/SQLite on the same machine)",
        &rows,
    );
    Ok(())
}
