//! `make bench-tracking`: page views accepted (202, durable) and sustained (also in both
//! stores, backlog drained) per second with 64 concurrent senders (wrk), single hits and
//! 20-hit batches, against a Django REST Framework implementation of the same seed
//! (bench/drf, `tracking`) on the same machine and PostgreSQL; then a kill -9 of the API
//! mid-load, counting answered hits lost (must be 0).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use termopar_bench::{ms, per_sec, print_table, rss_mib, sibling_binary, wrk_with, Load, Row};
use termopar_core::settings::env_parse;
use test_support::{free_port, TestDb, TestMongo};

const CONNECTIONS: u32 = 64;
const ADMIN: (&str, &str) = ("admin@bench", "bench-admin-pw");

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tracking.lua")
}

/// wrk against `url` with `hits` hits per request of `site`.
fn run_load(
    url: &str,
    path: &str,
    site: &str,
    hits: u32,
    seconds: u32,
) -> anyhow::Result<(Load, u64)> {
    let hits = hits.to_string();
    let env = [
        ("SITE", site),
        ("HITS", hits.as_str()),
        ("TRACK_PATH", path),
    ];
    wrk_with(url, &[], Some((&script(), &env)), seconds, CONNECTIONS)
}

/// `termopar-api` (the release build) as its own process over `db` and `mongo`.
struct Api {
    child: Child,
    base: String,
}

impl Api {
    async fn start(db: &TestDb, mongo: &TestMongo, threads: usize) -> anyhow::Result<Self> {
        let addr = format!("127.0.0.1:{}", free_port());
        let child = Command::new(sibling_binary("termopar-api")?)
            .env("API_ADDR", &addr)
            .env("DATABASE_URL", &db.url)
            .env("MONGODB_URI", &mongo.settings.uri)
            .env("MONGODB_DB", &mongo.settings.database)
            .env("JWT_SECRET", "bench-secret-of-at-least-32-bytes-long")
            .env("ADMIN_EMAIL", ADMIN.0)
            .env("ADMIN_PASSWORD", ADMIN.1)
            .env("TRACKING_RATE_PER_SITE", "0")
            .env("TOKIO_WORKER_THREADS", threads.to_string())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()?;
        let base = format!("http://{addr}");
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !http
            .get(format!("{base}/health"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            anyhow::ensure!(Instant::now() < deadline, "termopar-api did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Self { child, base })
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Creates a client and a site open to every origin; returns the site's id.
async fn create_site(base: &str) -> anyhow::Result<String> {
    let http = reqwest::Client::new();
    let login: Value = http
        .post(format!("{base}/api/v1/auth/login"))
        .json(&json!({"email": ADMIN.0, "password": ADMIN.1}))
        .send()
        .await?
        .json()
        .await?;
    let token = login["access_token"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let post = |path: &str, body: Value| {
        http.post(format!("{base}/api/v1{path}"))
            .bearer_auth(&token)
            .json(&body)
            .send()
    };
    let client: Value = post("/clients", json!({"name": "Bench", "timezone": "UTC"}))
        .await?
        .json()
        .await?;
    let site: Value = post(
        "/sites",
        json!({"client_id": client["id"], "name": "bench", "origins": ["*"]}),
    )
    .await?
    .json()
    .await?;
    site["id"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("no site created: {site}"))
}

/// Waits until the relay has emptied the outbox; returns how long it took.
async fn drain(pg: &sqlx::PgPool) -> anyhow::Result<Duration> {
    termopar_bench::drain_outbox(pg, "tracking_outbox").await
}

/// Hits counted in the rollups.
async fn counted(pg: &sqlx::PgPool) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT coalesce(sum(hits), 0)::int8 FROM tracking_site_counts")
            .fetch_one(pg)
            .await?,
    )
}

/// The DRF baseline on a fresh database, with one site.
struct Drf {
    // Stopped before its database goes.
    server: termopar_bench::Drf,
    site: String,
    db: TestDb,
}

impl Drf {
    async fn start() -> anyhow::Result<Self> {
        let db = TestDb::new().await;
        let server = termopar_bench::Drf::start(&db).await?;
        let site = uuid::Uuid::new_v4().to_string();
        sqlx::query("INSERT INTO tracking_site (id) VALUES ($1::uuid)")
            .bind(&site)
            .execute(&db.pool)
            .await?;
        Ok(Self { server, site, db })
    }

    async fn stored(&self) -> anyhow::Result<i64> {
        Ok(sqlx::query_scalar("SELECT count(*) FROM tracking_access")
            .fetch_one(&self.db.pool)
            .await?)
    }
}

/// Senders posting single hits with unique URLs until the API dies; then a new API
/// process drains what the dead one committed. Returns (answered, lost, counted twice).
async fn kill_mid_load(
    db: &TestDb,
    mongo: &TestMongo,
    api: &mut Api,
    site: &str,
    seconds: u64,
) -> anyhow::Result<(usize, usize, usize)> {
    let answered = Arc::new(Mutex::new(Vec::<String>::new()));
    let http = reqwest::Client::new();
    let mut senders = Vec::new();
    for s in 0..CONNECTIONS {
        let (http, base, site, answered) = (
            http.clone(),
            api.base.clone(),
            site.to_owned(),
            answered.clone(),
        );
        senders.push(tokio::spawn(async move {
            for n in 0.. {
                let url = format!("https://kill.example/{s}/{n}");
                let hit = json!({"site_id": site, "url": url, "context": ["k"], "user": {"id": format!("k{s}")}});
                match http.post(format!("{base}/api/v1/track")).json(&hit).send().await {
                    Ok(r) if r.status() == reqwest::StatusCode::ACCEPTED => answered.lock().unwrap().push(url),
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    api.kill();
    for s in senders {
        s.await?;
    }
    let answered: BTreeSet<String> = answered.lock().unwrap().iter().cloned().collect();
    *api = Api::start(db, mongo, 2).await?;
    drain(&db.pool).await?;
    let stored: BTreeMap<String, i64> = sqlx::query_as::<_, (String, i64)>(
        "SELECT url, sum(hits)::int8 FROM tracking_url_counts WHERE url LIKE 'https://kill.example/%' GROUP BY url",
    )
    .fetch_all(&db.pool)
    .await?
    .into_iter()
    .collect();
    let lost = answered.iter().filter(|u| !stored.contains_key(*u)).count();
    let twice = stored.values().filter(|n| **n > 1).count();
    Ok((answered.len(), lost, twice))
}

fn main() -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(bench())
}

async fn bench() -> anyhow::Result<()> {
    let seconds: u32 = env_parse("BENCH_SECONDS", 5)?;
    let rounds: u32 = env_parse("BENCH_ROUNDS", 2)?;
    let threads: usize = env_parse("BENCH_API_THREADS", 2)?;

    let drf = match Drf::start().await {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("DRF baseline not measured: {e:#}");
            None
        }
    };
    let db = TestDb::new().await;
    let mongo = TestMongo::new();
    let mut api = Api::start(&db, &mongo, threads).await?;
    let site = create_site(&api.base).await?;

    let mut rows = Vec::new();
    let mut accepted_total = 0.0;
    for hits in [1u32, 20] {
        // Turns: DRF, then termopar until its backlog is drained, round after round.
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        let (mut p99, mut their_p99, mut errors, mut drained) =
            (Duration::ZERO, Duration::ZERO, 0, Duration::ZERO);
        for round in 1..=rounds {
            if let Some(drf) = &drf {
                let (load, _) = run_load(
                    &format!("{}/track/", drf.server.base),
                    "/track/",
                    &drf.site,
                    hits,
                    seconds,
                )?;
                theirs.push(load.rps * f64::from(hits));
                their_p99 = their_p99.max(load.p99);
            }
            let (load, errs) = run_load(
                &format!("{}/api/v1/track", api.base),
                "/api/v1/track",
                &site,
                hits,
                seconds,
            )?;
            ours.push(load.rps * f64::from(hits));
            p99 = p99.max(load.p99);
            errors += errs;
            drained += drain(&db.pool).await?;
            eprintln!(
                "{hits} hit(s)/request, round {round}: termopar {:.0} hits/s, DRF {}",
                ours.last().unwrap(),
                theirs
                    .last()
                    .map_or("-".into(), |r| format!("{r:.0} hits/s"))
            );
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let (rate, base_rate) = (mean(&ours), (!theirs.is_empty()).then(|| mean(&theirs)));
        accepted_total += rate * f64::from(seconds * rounds);
        let loaded = f64::from(seconds * rounds);
        let sustained = rate * loaded / (loaded + drained.as_secs_f64());
        let shape = if hits == 1 {
            "single-hit requests".to_owned()
        } else {
            format!("{hits}-hit batches")
        };
        let baseline = |r: Option<f64>| match (r, &drf) {
            (Some(r), Some(d)) => format!(
                "{} DRF + gunicorn ({} sync workers), same PostgreSQL",
                per_sec(r),
                d.server.workers
            ),
            _ => "DRF baseline could not be set up here".into(),
        };
        rows.push(Row {
            name: format!("hits/s accepted (202, durable), {shape}, {CONNECTIONS} senders, mean of {rounds} turns of {seconds} s"),
            value: per_sec(rate),
            baseline: baseline(base_rate),
            ratio: base_rate.map(|b| rate / b),
            target: "≥ 50,000/s at peak".into(),
            met: (hits == 20).then_some(rate >= 50_000.0),
        });
        rows.push(Row {
            name: format!("hits/s sustained (accepted and in both stores, backlog drained: {} after the turns), {shape}", ms(drained)),
            value: per_sec(sustained),
            baseline: base_rate.map_or(String::new(), |b| format!("{} DRF (stores as it answers)", per_sec(b))),
            ratio: base_rate.map(|b| sustained / b),
            target: "≥ 30,000/s".into(),
            met: (hits == 20).then_some(sustained >= 30_000.0),
        });
        rows.push(Row {
            name: format!("p99 of the 202, {shape} (worst turn)"),
            value: ms(p99),
            baseline: drf
                .as_ref()
                .map_or(String::new(), |_| format!("{} DRF", ms(their_p99))),
            ratio: None,
            target: "≤ 20 ms".into(),
            met: Some(p99 <= Duration::from_millis(20)),
        });
        rows.push(Row {
            name: format!("answers that were not 202, {shape}"),
            value: errors.to_string(),
            baseline: String::new(),
            ratio: None,
            target: "0".into(),
            met: Some(errors == 0),
        });
    }
    let counted = counted(&db.pool).await?;
    rows.push(Row {
        name: "hits in the rollups after the turns / hits answered 202 (wrk's count, approximate)"
            .into(),
        value: format!("{counted} / {accepted_total:.0}"),
        baseline: drf.as_ref().map_or(Ok(String::new()), |d| {
            futures::executor::block_on(d.stored()).map(|n| format!("{n} rows stored by DRF"))
        })?,
        ratio: None,
        target: String::new(),
        met: None,
    });
    if let Some(rss) = rss_mib(api.child.id()) {
        rows.push(Row {
            name: "API resident memory after the load".into(),
            value: format!("{rss:.0} MiB"),
            baseline: String::new(),
            ratio: None,
            target: String::new(),
            met: None,
        });
    }
    let (answered, lost, twice) = kill_mid_load(&db, &mongo, &mut api, &site, 3).await?;
    rows.push(Row {
        name: format!("kill -9 of the API after 3 s of {CONNECTIONS} senders: answered hits lost / stored twice (of {answered} answered)"),
        value: format!("{lost} / {twice}"),
        baseline: String::new(),
        ratio: None,
        target: "0 / 0".into(),
        met: Some(lost == 0 && twice == 0),
    });
    print_table(
        &format!("Web tracking (2 cores; API on {threads} runtime threads; wrk with 1 thread on the same machine)"),
        &rows,
    );
    Ok(())
}
