//! `make bench-api`: the readings API under load.
//!
//! - latest reading (JWT + caches) against `/health` on the same server (the framework's
//!   ceiling: same middleware, no work);
//! - daily averages of one sensor over a year of 1 Hz data (31.5 million readings,
//!   loaded as the 15-minute rollups ingestion would have produced: the endpoint never
//!   reads raw readings), with and without the finished-day cache;
//! - a history page deep in a large sensor by cursor, against page 1.

use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone, Utc};
use serde_json::{json, Value};
use termopar_bench::{ms, per_sec, percentile, print_table, wrk, Row};
use termopar_core::{
    ids::{ClientId, SensorId},
    reading::{parse_message, Limits},
    settings::env_parse,
};
use test_support::{TestDb, TestMongo};
use uuid::Uuid;

async fn call(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> anyhow::Result<Value> {
    let mut req = http.request(method, url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await?;
    anyhow::ensure!(resp.status().is_success(), "{url}: {}", resp.status());
    Ok(resp.json().await.unwrap_or(Value::Null))
}

/// Times `n` sequential GETs.
async fn sample(
    http: &reqwest::Client,
    urls: &[String],
    token: &str,
) -> anyhow::Result<Vec<Duration>> {
    let mut out = Vec::with_capacity(urls.len());
    for url in urls {
        let t = Instant::now();
        let resp = http.get(url).bearer_auth(token).send().await?;
        anyhow::ensure!(resp.status().is_success(), "{url}: {}", resp.status());
        resp.bytes().await?;
        out.push(t.elapsed());
    }
    Ok(out)
}

/// A year of 1 Hz readings as 15-minute buckets: exactly what ingestion computes, with
/// the sums exact (NUMERIC) in PostgreSQL.
async fn load_year(pg: &sqlx::PgPool, sensor: Uuid, start: DateTime<Utc>) -> anyhow::Result<u64> {
    let buckets = 365 * 96;
    let mut rows_bucket = Vec::with_capacity(buckets);
    let (mut counts, mut sums, mut mins, mut maxs) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut total = 0u64;
    for b in 0..buckets {
        let t0 = start + chrono::Duration::minutes(15 * b as i64);
        let (mut sum, mut min, mut max) = (0.0f64, f64::INFINITY, f64::NEG_INFINITY);
        for s in 0..900 {
            let secs = (b * 900 + s) as f64;
            let v = ((5.0 + 3.0 * (secs / 86_400.0 * std::f64::consts::TAU).sin()) * 100.0).round()
                / 100.0;
            sum += v;
            min = min.min(v);
            max = max.max(v);
        }
        total += 900;
        rows_bucket.push(t0);
        counts.push(900i64);
        sums.push(format!("{sum:.2}"));
        mins.push(min);
        maxs.push(max);
    }
    for chunk in (0..buckets).collect::<Vec<_>>().chunks(5000) {
        let (a, b) = (chunk[0], chunk[chunk.len() - 1] + 1);
        sqlx::query(
            "INSERT INTO reading_buckets (sensor_id, bucket, count, sum, min, max)
             SELECT $1, b, c, s::numeric, mi, ma FROM unnest($2::timestamptz[], $3::bigint[], $4::text[], $5::float8[], $6::float8[]) AS t(b, c, s, mi, ma)",
        )
        .bind(sensor)
        .bind(&rows_bucket[a..b])
        .bind(&counts[a..b])
        .bind(&sums[a..b])
        .bind(&mins[a..b])
        .bind(&maxs[a..b])
        .execute(pg)
        .await?;
    }
    Ok(total)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let seconds: u32 = env_parse("BENCH_SECONDS", 5)?;
    // FerretDB 1.24 answers every query but `_id` lookups with a scan (see the table), so
    // a larger sensor only makes this part of the run slower, not more informative.
    let history: usize = env_parse("BENCH_HISTORY_READINGS", 20_000)?;
    let db = TestDb::new().await;
    let mongo = TestMongo::new();
    let (base, state) = termopar_bench::start_api(&db, &mongo).await?;
    let http = reqwest::Client::new();
    let api = format!("{base}/api/v1");
    let login = call(
        &http,
        reqwest::Method::POST,
        &format!("{api}/auth/login"),
        None,
        Some(json!({"email": "admin@bench", "password": "bench-admin-pw"})),
    )
    .await?;
    let token = login["access_token"].as_str().unwrap().to_owned();
    let client = call(
        &http,
        reqwest::Method::POST,
        &format!("{api}/clients"),
        Some(&token),
        Some(json!({"name": "bench", "timezone": "America/Sao_Paulo"})),
    )
    .await?;
    let client_id = client["id"].as_str().unwrap().to_owned();
    let mk_sensor = |name: &str| {
        let (http, api, token, client_id) =
            (http.clone(), api.clone(), token.clone(), client_id.clone());
        let name = name.to_owned();
        async move {
            call(
                &http,
                reqwest::Method::POST,
                &format!("{api}/sensors"),
                Some(&token),
                Some(json!({"client_id": client_id, "name": name})),
            )
            .await
        }
    };

    // 1. Latest reading with JWT and caches, against /health.
    let live = mk_sensor("live").await?;
    let live_id = live["id"].as_str().unwrap();
    call(
        &http,
        reqwest::Method::POST,
        &format!("{api}/sensors/{live_id}/readings"),
        Some(&token),
        Some(json!({"temperature": 4.2})),
    )
    .await?;
    let auth = format!("Bearer {token}");
    let ceiling = wrk(&format!("{base}/health"), &[], seconds, 32)?;
    let latest = wrk(
        &format!("{api}/sensors/{live_id}/readings/latest"),
        &[("Authorization", &auth)],
        seconds,
        32,
    )?;
    eprintln!(
        "latest: {:.0} req/s vs /health {:.0} req/s",
        latest.rps, ceiling.rps
    );

    // 2. Daily averages over a year of 1 Hz data.
    let year = mk_sensor("year").await?;
    let year_id: Uuid = year["id"].as_str().unwrap().parse()?;
    let start = Utc.with_ymd_and_hms(2025, 1, 1, 3, 0, 0).unwrap();
    let loaded = load_year(&state.pg, year_id, start).await?;
    let daily = format!("{api}/sensors/{year_id}/daily-averages?from=2025-01-01&to=2025-12-31");
    let check = call(&http, reqwest::Method::GET, &daily, Some(&token), None).await?;
    anyhow::ensure!(
        check["items"].as_array().map(Vec::len) == Some(365),
        "a year of days: {check}"
    );
    // Uncached: every request in a zone not asked before (the cache is per zone).
    let zones: Vec<String> = chrono_tz::TZ_VARIANTS
        .iter()
        .map(|z| z.name().to_owned())
        .filter(|z| z.contains('/') && !z.starts_with("Etc/"))
        .take(200)
        .collect();
    let cold_urls: Vec<String> = zones.iter().map(|z| format!("{daily}&tz={z}")).collect();
    let mut cold = sample(&http, &cold_urls, &token).await?;
    let cold_p50 = percentile(&mut cold, 50.0);
    let cold_p99 = percentile(&mut cold, 99.0);
    // One connection: the latency of a request, not of a queue.
    let warm = wrk(&daily, &[("Authorization", &auth)], seconds, 1)?;
    eprintln!("daily: cold p99 {cold_p99:?}, warm p99 {:?}", warm.p99);

    // 3. History: page 1 against a page deep in a large sensor, by cursor.
    let big = mk_sensor("big").await?;
    let big_id = SensorId(big["id"].as_str().unwrap().parse()?);
    let t0 = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
    let mut deep_cursor = String::new();
    for chunk_start in (0..history).step_by(5000) {
        let batch: Vec<Value> = (chunk_start..(chunk_start + 5000).min(history))
            .map(|i| json!({"id": Uuid::new_v4(), "ts": (t0 + chrono::Duration::seconds(i as i64)).to_rfc3339(), "temperature": (i % 300) as f64 / 10.0}))
            .collect();
        let readings = parse_message(
            serde_json::to_vec(&batch)?.as_slice(),
            big_id,
            ClientId(client_id.parse()?),
            Utc::now(),
            &Limits {
                max_payload_bytes: 64 << 20,
                ..Limits::default()
            },
        )
        .map_err(|r| anyhow::anyhow!("{r:?}"))?
        .readings;
        if chunk_start == 0 {
            // The position after the 100th oldest reading: nearly the last page.
            let r = &readings[100];
            deep_cursor = format!("{}.{}", r.ts.timestamp_millis(), r.id.simple());
        }
        state.store.store(&readings).await?;
    }
    let page1 = format!("{api}/sensors/{}/readings?page_size=50", big_id);
    let deep = format!(
        "{api}/sensors/{}/readings?page_size=50&cursor={deep_cursor}",
        big_id
    );
    let mut first = sample(&http, &vec![page1; 20], &token).await?;
    let mut deeper = sample(&http, &vec![deep; 20], &token).await?;
    let (first_p50, deep_p50) = (percentile(&mut first, 50.0), percentile(&mut deeper, 50.0));
    let ratio = deep_p50.as_secs_f64() / first_p50.as_secs_f64();
    eprintln!("history: page 1 p50 {first_p50:?}, deep p50 {deep_p50:?}");

    print_table(
        "Readings API (2 cores; wrk with 1 thread on the same machine)",
        &[
            Row {
                name: "latest reading, JWT + caches (req/s)".into(),
                value: per_sec(latest.rps),
                baseline: format!("{} GET /health, same server", per_sec(ceiling.rps)),
                ratio: Some(latest.rps / ceiling.rps),
                target: "≥ 0.50".into(),
                met: Some(latest.rps / ceiling.rps >= 0.5),
            },
            Row {
                name: "latest reading p99".into(),
                value: ms(latest.p99),
                baseline: format!("{} /health", ms(ceiling.p99)),
                ratio: Some(latest.p99.as_secs_f64() / ceiling.p99.as_secs_f64()),
                target: "".into(),
                met: None,
            },
            Row {
                name: format!("daily averages, 365 days of 1 Hz ({loaded} readings), cached finished days: p99"),
                value: ms(warm.p99),
                baseline: format!("{} uncached p99 ({} p50), 200 zones", ms(cold_p99), ms(cold_p50)),
                ratio: Some(warm.p99.as_secs_f64() / cold_p99.as_secs_f64()),
                target: "p99 ≤ 5 ms".into(),
                met: Some(warm.p99 <= Duration::from_millis(5)),
            },
            Row {
                name: "daily averages, uncached (first request in a zone): p99".into(),
                value: ms(cold_p99),
                baseline: "".into(),
                ratio: None,
                target: "p99 ≤ 5 ms".into(),
                met: Some(cold_p99 <= Duration::from_millis(5)),
            },
            Row {
                name: format!("history page deep in {history} readings (cursor) vs page 1: p50 (FerretDB scans: no index use for filters other than _id)"),
                value: ms(deep_p50),
                baseline: format!("{} page 1", ms(first_p50)),
                ratio: Some(ratio),
                target: "≤ 2".into(),
                met: Some(ratio <= 2.0),
            },
        ],
    );
    Ok(())
}
