//! Soak (`make test-soak`; not in `make ci`, see docs/ARCHITECTURE.md): an edge node (the `termopar` binary) on a
//! FerretDB of its own, fed at half the ingest it was just measured to sustain, with API
//! reads alongside, for `SOAK_SECS` (default 600). The readings span half an hour of
//! simulated time (three simulated seconds a second, ending a minute short of the clock),
//! so buckets close during the soak and their final merges run in it. After the first
//! fifth (warm-up), the resident memory of the node and of FerretDB, and the private
//! memory of the PostgreSQL backends serving its database, must stay flat (the
//! mean of the last fifth within 5% of the mean of the second fifth: a leak moves the
//! mean, a garbage collection that happens to fall in one fifth barely does) and never
//! peak above 1.5× that, the backlog must not grow, and the reads' p99 must not drift
//! (over the last bucket's span in real time within twice that of the first, plus 5 ms:
//! it follows the buckets as they fill, close and are merged). Prints a table of what it
//! saw.
//!
//! The broker's buffer (`MQTT_BUFFER_BYTES`) is 8 MiB here instead of 32: it fills by
//! design (rumqttd keeps what was read until it is full, then drops the oldest eighth),
//! and 8 MiB are full within the warm-up, so what grows after it is a leak.

use std::{
    process::Child,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use termopar_core::{settings::MqttEndpoint, topic::Topics};
use termopar_device_sim::SimConfig;
use test_support::{eventually, free_port, PrivateFerret, TestDb, TestMongo};

/// Resident memory of `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Memory of `pid` no other process shares (`Private_Clean` + `Private_Dirty`), in KiB:
/// for a PostgreSQL backend, its own memory without the shared buffers it touched.
fn private_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .map(|s| {
            s.lines()
                .filter(|l| l.starts_with("Private_Clean:") || l.starts_with("Private_Dirty:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0)
}

/// The mean private memory of the PostgreSQL backends serving database `name` (as many
/// as the node's pool keeps open: a mean, so that one more connection is not growth).
async fn pg_backend_kib(pool: &sqlx::PgPool, name: &str) -> u64 {
    let pids: Vec<i32> = sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE datname = $1")
        .bind(name)
        .fetch_all(pool)
        .await
        .unwrap();
    let sizes: Vec<u64> = pids
        .into_iter()
        .map(private_kib)
        .filter(|&k| k > 0)
        .collect();
    sizes.iter().sum::<u64>() / sizes.len().max(1) as u64
}

/// Publishes rumqttd took in (the node's `mqtt_broker_messages_in_total`).
async fn messages_in(http: &reqwest::Client, base: &str) -> f64 {
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("mqtt_broker_messages_in_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

struct Node(Child);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One sample of the node.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Duration,
    node_kib: u64,
    ferret_kib: u64,
    pg_kib: u64,
    backlog: i64,
}

fn percentile(mut values: Vec<Duration>, p: f64) -> Duration {
    if values.is_empty() {
        return Duration::ZERO;
    }
    values.sort();
    values[((values.len() - 1) as f64 * p).round() as usize]
}

/// Simulated seconds of readings per second of the soak.
const SPEED: f64 = 3.0;

/// How far behind the clock the soak's readings start: they end a minute short of it.
fn soak_span(soak: Duration) -> chrono::Duration {
    chrono::Duration::from_std(soak.mul_f64(SPEED - 1.0) + Duration::from_secs(60))
        .expect("a short span")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "minutes long: make test-soak"]
async fn an_edge_node_at_half_its_measured_maximum_stays_flat() {
    let soak = Duration::from_secs(
        std::env::var("SOAK_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(600),
    );
    // A FerretDB of the soak's own: its memory is the soak's alone, not what earlier
    // tests left in the shared one.
    let ferret = PrivateFerret::start(std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))).await;
    let (db, mongo) = (
        TestDb::new().await,
        TestMongo {
            settings: ferret.settings("soak"),
        },
    );
    let (api_port, mqtt_port) = (free_port(), free_port());
    let node = Node(
        test_support::edge_node(
            env!("CARGO_BIN_EXE_termopar"),
            &db,
            &mongo,
            (api_port, mqtt_port),
            ("admin@soak.test", "soak-admin-password"),
        )
        .env("MQTT_BUFFER_BYTES", (8 << 20).to_string())
        .spawn()
        .expect("run termopar"),
    );
    let base = format!("http://127.0.0.1:{api_port}");
    let http = reqwest::Client::new();
    test_support::wait_until_healthy(api_port).await;
    let sensors =
        termopar_device_sim::provision(&base, "admin@soak.test", "soak-admin-password", 5, false)
            .await
            .unwrap();
    let broker = MqttEndpoint::parse(&format!("mqtt://127.0.0.1:{mqtt_port}")).unwrap();
    let sim = |rate: f64, duration: Duration| SimConfig {
        rate,
        duration: Some(duration),
        ..SimConfig::new(broker.clone(), Topics::new(""), sensors.clone())
    };

    // The maximum: 20,000 readings as fast as the node takes them, until all are stored.
    let before = test_support::stored_count(&db.pool).await;
    let started = Instant::now();
    // Timestamped before the soak's readings: at the clock's time they were the newest
    // readings for the soak's first seven minutes, and history's first page read their
    // settled bucket (p99 ~25 ms) until the soak's readings overtook them and it read the
    // bucket being written (~110 ms), which the p99 check took for a drift.
    let flood = termopar_device_sim::run(SimConfig {
        count: Some(20_000),
        duration: None,
        start: Some(chrono::Utc::now() - soak_span(soak) - chrono::Duration::minutes(2)),
        ..sim(1e6, Duration::ZERO)
    })
    .await
    .unwrap();
    eventually("the flood stored", Duration::from_secs(300), || async {
        (test_support::stored_count(&db.pool).await >= before + flood.readings).then_some(())
    })
    .await;
    let maximum = flood.readings as f64 / started.elapsed().as_secs_f64();
    let rate = (maximum / 2.0).max(1.0);

    // Half of it, with reads alongside.
    let token = termopar_device_sim::login(&http, &base, "admin@soak.test", "soak-admin-password")
        .await
        .unwrap();
    let start_count = test_support::stored_count(&db.pool).await as f64;
    let start_in = messages_in(&http, &base).await;
    let t0 = Instant::now();
    // Readings of half an hour, three simulated seconds a second, ending a minute short of
    // the clock: buckets close during the soak (two of them, whenever it runs), and
    // their final merges, of ~3 million readings each, are part of what must stay flat.
    let load = tokio::spawn(termopar_device_sim::run(SimConfig {
        start: Some(chrono::Utc::now() - soak_span(soak)),
        speed: SPEED,
        ..sim(rate, soak)
    }));
    let reads: Arc<Mutex<Vec<(Duration, Duration)>>> = Arc::default();
    let reader = {
        let (http, base, reads) = (http.clone(), base.clone(), reads.clone());
        let mut token = token.clone();
        let sensor = sensors[0].sensor_id;
        tokio::spawn(async move {
            let paths = [
                format!("{base}/api/v1/sensors/{sensor}/readings/latest"),
                format!("{base}/api/v1/sensors/{sensor}/readings?page_size=50"),
            ];
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            for n in 0.. {
                tick.tick().await;
                if t0.elapsed() >= soak {
                    break;
                }
                let asked = Instant::now();
                let response = http
                    .get(&paths[n % 2])
                    .bearer_auth(&token)
                    .send()
                    .await
                    .unwrap();
                // A soak longer than the access token's life (15 minutes) logs in again,
                // as a client would; the expired call is not a read.
                if response.status() == reqwest::StatusCode::UNAUTHORIZED {
                    token = termopar_device_sim::login(
                        &http,
                        &base,
                        "admin@soak.test",
                        "soak-admin-password",
                    )
                    .await
                    .unwrap();
                    continue;
                }
                assert!(response.status().is_success(), "{}", response.status());
                reads.lock().unwrap().push((t0.elapsed(), asked.elapsed()));
            }
        })
    };
    let (node_pid, ferret_pid) = (node.0.id(), ferret.pid().expect("FerretDB runs"));
    let mut samples = Vec::new();
    let mut tick = tokio::time::interval(soak / 60);
    while t0.elapsed() < soak {
        tick.tick().await;
        let at = t0.elapsed();
        let taken = messages_in(&http, &base).await - start_in;
        let stored = test_support::stored_count(&db.pool).await as f64 - start_count;
        samples.push(Sample {
            at,
            node_kib: rss_kib(node_pid),
            ferret_kib: rss_kib(ferret_pid),
            pg_kib: pg_backend_kib(&db.pool, db.name()).await,
            backlog: (taken - stored) as i64,
        });
    }
    let summary = load.await.unwrap().unwrap();
    reader.await.unwrap();

    let fifth = |k: u32| {
        let (lo, hi) = (soak * k / 5, soak * (k + 1) / 5);
        samples
            .iter()
            .filter(move |s| s.at >= lo && s.at < hi)
            .copied()
            .collect::<Vec<_>>()
    };
    let mean = |v: &[Sample], f: fn(&Sample) -> u64| {
        v.iter().map(f).sum::<u64>() as f64 / v.len().max(1) as f64
    };
    let (second, last) = (fifth(1), fifth(4));
    let after_warm_up: Vec<Sample> = samples
        .iter()
        .filter(|s| s.at >= soak / 5)
        .copied()
        .collect();
    let peak = |f: fn(&Sample) -> u64| after_warm_up.iter().map(f).max().unwrap_or(0) as f64;
    let node_peak = peak(|s| s.node_kib) / mean(&second, |s| s.node_kib);
    let ferret_peak = peak(|s| s.ferret_kib) / mean(&second, |s| s.ferret_kib);
    let pg_peak = peak(|s| s.pg_kib) / mean(&second, |s| s.pg_kib);
    let node_growth = mean(&last, |s| s.node_kib) / mean(&second, |s| s.node_kib);
    let ferret_growth = mean(&last, |s| s.ferret_kib) / mean(&second, |s| s.ferret_kib);
    let pg_growth = mean(&last, |s| s.pg_kib) / mean(&second, |s| s.pg_kib);
    let backlog_second = second.iter().map(|s| s.backlog).max().unwrap_or(0);
    let backlog_last = last.iter().map(|s| s.backlog).max().unwrap_or(0);
    let reads = reads.lock().unwrap().clone();
    let p99 = |lo: Duration, hi: Duration| {
        percentile(
            reads
                .iter()
                .filter(|(at, _)| *at >= lo && *at < hi)
                .map(|(_, took)| *took)
                .collect(),
            0.99,
        )
    };
    // The reads' p99 follows the buckets (23 ms over one fifth of a run, 108 ms over
    // another, as buckets filled, closed and were merged): it is compared over the first
    // and the last bucket's span in real time, which hold the same mix of a bucket's
    // phases whenever the soak starts.
    let cycle = Duration::from_secs_f64(15.0 * 60.0 / SPEED).min(soak / 2);
    let (p99_second, p99_last) = (p99(Duration::ZERO, cycle), p99(soak - cycle, soak));
    eprintln!(
        "reads p99 per 30 s: {}",
        (0..soak.as_secs() / 30)
            .map(|k| {
                let at = Duration::from_secs(30 * k);
                format!(
                    "{:.0}",
                    p99(at, at + Duration::from_secs(30)).as_secs_f64() * 1e3
                )
            })
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "\n## Soak: {:?} at {rate:.0} readings/s (half of the {maximum:.0}/s measured), reads every 50 ms\n\n\
         | measurement | after warm-up (2nd fifth) | end (last fifth) | ratio | target |\n|---|---|---|---|---|\n\
         | node RSS, mean | {:.0} KiB | {:.0} KiB | {node_growth:.3} | ≤ 1.05 |\n\
         | FerretDB RSS, mean | {:.0} KiB | {:.0} KiB | {ferret_growth:.3} | ≤ 1.05 |\n\
         | PostgreSQL backends of its database, private memory each, mean | {:.0} KiB | {:.0} KiB | {pg_growth:.3} | ≤ 1.05 |\n\
         | node RSS, most after warm-up | | {:.0} KiB | {node_peak:.3} | ≤ 1.5 |\n\
         | FerretDB RSS, most after warm-up | | {:.0} KiB | {ferret_peak:.3} | ≤ 1.5 |\n\
         | PostgreSQL backends, most after warm-up | | {:.0} KiB | {pg_peak:.3} | ≤ 1.5 |\n\
         | backlog (taken by the broker, not stored), most | {backlog_second} | {backlog_last} | | not growing |\n\
         | reads p99 (latest, history page), first and last bucket's span | {:.1} ms | {:.1} ms | {:.2} | ≤ 2× + 5 ms |\n\
         | readings acknowledged / reads | {} | {} | | |\n",
        soak,
        mean(&second, |s| s.node_kib),
        mean(&last, |s| s.node_kib),
        mean(&second, |s| s.ferret_kib),
        mean(&last, |s| s.ferret_kib),
        mean(&second, |s| s.pg_kib),
        mean(&last, |s| s.pg_kib),
        peak(|s| s.node_kib),
        peak(|s| s.ferret_kib),
        peak(|s| s.pg_kib),
        p99_second.as_secs_f64() * 1e3,
        p99_last.as_secs_f64() * 1e3,
        p99_last.as_secs_f64() / p99_second.as_secs_f64().max(1e-9),
        summary.acked,
        reads.len(),
    );
    assert!(
        node_growth <= 1.05,
        "the node's memory grew {node_growth:.3}×"
    );
    assert!(
        ferret_growth <= 1.05,
        "FerretDB's memory grew {ferret_growth:.3}×"
    );
    assert!(
        pg_growth <= 1.05,
        "PostgreSQL's backends' memory grew {pg_growth:.3}×"
    );
    assert!(
        node_peak <= 1.5 && ferret_peak <= 1.5 && pg_peak <= 1.5,
        "memory peaked after warm-up: the node {node_peak:.3}×, FerretDB {ferret_peak:.3}×, \
         PostgreSQL's backends {pg_peak:.3}×"
    );
    assert!(
        backlog_last <= backlog_second.max(0) + (rate * 2.0) as i64,
        "the backlog grew from {backlog_second} to {backlog_last}"
    );
    assert!(
        p99_last <= p99_second * 2 + Duration::from_millis(5),
        "read p99 drifted from {p99_second:?} to {p99_last:?}"
    );
    drop(node);
}
