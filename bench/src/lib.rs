//! Shared pieces of the benchmarks: result tables, percentiles, process memory.

pub mod fleet;
pub mod ingest;

use std::time::Duration;

/// One row of a result table.
pub struct Row {
    /// What was measured.
    pub name: String,
    /// The measured value, formatted.
    pub value: String,
    /// The baseline it is compared with, formatted.
    pub baseline: String,
    /// value / baseline (or the ratio the target is about).
    pub ratio: Option<f64>,
    /// The target, in words.
    pub target: String,
    /// Whether the target is met (`None` when there is no target).
    pub met: Option<bool>,
}

impl Row {
    /// A measurement shown for information, without a baseline or target.
    pub fn info(name: impl Into<String>, value: impl Into<String>) -> Self {
        Row {
            name: name.into(),
            value: value.into(),
            baseline: String::new(),
            ratio: None,
            target: String::new(),
            met: None,
        }
    }
}

/// Prints rows as a Markdown table.
pub fn print_table(title: &str, rows: &[Row]) {
    println!("\n## {title}\n");
    println!("| measurement | value | baseline | ratio | target | met |");
    println!("|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            r.name,
            r.value,
            r.baseline,
            r.ratio.map_or("".into(), |x| format!("{x:.2}")),
            r.target,
            match r.met {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "",
            }
        );
    }
}

/// The `p`-th percentile (0..=100) of `samples` (sorted here).
pub fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    samples.sort_unstable();
    let rank = ((p / 100.0) * (samples.len() - 1) as f64).round() as usize;
    samples[rank.min(samples.len() - 1)]
}

/// Peak resident memory of a process in MiB (`VmHWM` from /proc).
pub fn peak_rss_mib(pid: u32) -> Option<f64> {
    proc_status_mib(pid, "VmHWM:")
}

/// Resident memory of a process now, in MiB (`VmRSS` from /proc).
pub fn rss_mib(pid: u32) -> Option<f64> {
    proc_status_mib(pid, "VmRSS:")
}

fn proc_status_mib(pid: u32, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// Formats a rate.
pub fn per_sec(n: f64) -> String {
    format!("{n:.0}/s")
}

/// A binary next to the running one (the release build of another crate).
pub fn sibling_binary(name: &str) -> anyhow::Result<std::path::PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.with_file_name(name);
    anyhow::ensure!(
        path.exists(),
        "{} not found: build it first (make bench builds every binary)",
        path.display()
    );
    Ok(path)
}

/// What wrk measured.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    /// Requests per second.
    pub rps: f64,
    /// Median latency.
    pub p50: Duration,
    /// 99th percentile latency.
    pub p99: Duration,
}

fn parse_wrk_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic())?);
    let v: f64 = num.parse().ok()?;
    let secs = match unit {
        "us" => v / 1e6,
        "ms" => v / 1e3,
        "s" => v,
        "m" => v * 60.0,
        _ => return None,
    };
    Some(Duration::from_secs_f64(secs))
}

/// Runs wrk (installed by `scripts/services.sh bench-tools`) against `url`; every
/// answer must be a 2xx.
pub fn wrk(
    url: &str,
    headers: &[(&str, &str)],
    seconds: u32,
    connections: u32,
) -> anyhow::Result<Load> {
    let (load, errors) = wrk_with(url, headers, None, seconds, connections)?;
    anyhow::ensure!(errors == 0, "{errors} answers of {url} were not 2xx");
    Ok(load)
}

/// A wrk Lua script and the environment it reads.
pub type Script<'a> = (&'a std::path::Path, &'a [(&'a str, &'a str)]);

/// Runs wrk with an optional Lua script; returns the load and how many answers were
/// not 2xx.
pub fn wrk_with(
    url: &str,
    headers: &[(&str, &str)],
    script: Option<Script<'_>>,
    seconds: u32,
    connections: u32,
) -> anyhow::Result<(Load, u64)> {
    let mut cmd = std::process::Command::new("wrk");
    cmd.args([
        "-t",
        "1",
        "-c",
        &connections.to_string(),
        "-d",
        &format!("{seconds}s"),
        "--latency",
    ]);
    for (k, v) in headers {
        cmd.args(["-H", &format!("{k}: {v}")]);
    }
    if let Some((path, env)) = script {
        cmd.arg("-s").arg(path).envs(env.iter().copied());
    }
    let out = cmd
        .arg(url)
        .output()
        .map_err(|e| anyhow::anyhow!("wrk: {e} (run scripts/services.sh bench-tools)"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(out.status.success(), "wrk failed: {text}");
    let field = |prefix: &str| {
        text.lines()
            .find(|l| l.trim_start().starts_with(prefix))
            .and_then(|l| {
                l.trim_start()[prefix.len()..]
                    .split_whitespace()
                    .next()
                    .map(str::to_owned)
            })
    };
    let errors: u64 = field("Non-2xx or 3xx responses:")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let rps: f64 = field("Requests/sec:")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no Requests/sec in:\n{text}"))?;
    let p50 = field("50%")
        .and_then(|v| parse_wrk_duration(&v))
        .unwrap_or_default();
    let p99 = field("99%")
        .and_then(|v| parse_wrk_duration(&v))
        .unwrap_or_default();
    Ok((Load { rps, p50, p99 }, errors))
}

/// Starts the API on a free port over the given stores; returns its base URL and state.
pub async fn start_api(
    db: &test_support::TestDb,
    mongo: &test_support::TestMongo,
) -> anyhow::Result<(String, termopar_api::Handles)> {
    use secrecy::SecretString;
    let settings = termopar_api::Settings {
        addr: "127.0.0.1:0".parse()?,
        database: db.settings(),
        mongo: mongo.settings.clone(),
        auth: termopar_web::settings::AuthSettings {
            jwt_secret: SecretString::from("bench-secret-of-at-least-32-bytes-long"),
            access_ttl: Duration::from_secs(3600),
            refresh_ttl: Duration::from_secs(7200),
            user_cache_ttl: Duration::from_secs(30),
        },
        bootstrap_admin: Some(termopar_api::settings::BootstrapAdmin {
            email: "admin@bench".into(),
            password: SecretString::from("bench-admin-pw"),
        }),
        max_body_bytes: 1 << 20,
        ready_broker: None,
        latest_cache_ttl: Duration::from_secs(1),
        store: termopar_core::store::Tuning::default(),
        // The webhook's tuning knobs (WEBHOOK_WRITERS, WEBHOOK_GATHER_US) can be tried
        // from the environment; no signature secret.
        webhook: termopar_chat::ChatSettings {
            secret: None,
            ..termopar_chat::ChatSettings::from_env()?
        },
        // Tracking's knobs (TRACKING_*) from the environment too.
        tracking: termopar_tracking::TrackingSettings::from_env()?,
        leads: termopar_api::settings::LeadsSettings::from_env()?,
        console: termopar_api::settings::ConsoleSettings::from_env()?,
    };
    let app = termopar_api::Application::build(settings).await?;
    let handles = app.handles().clone();
    let base = format!("http://{}", app.addr());
    tokio::spawn(app.run_until(std::future::pending()));
    Ok((base, handles))
}

/// The API started by [`start_api`], with the bootstrap admin logged in.
pub struct AdminApi {
    /// `http://host:port/api/v1`.
    pub api: String,
    /// The admin's access token.
    pub token: String,
    /// An HTTP client.
    pub http: reqwest::Client,
    /// The API's state.
    pub state: termopar_api::AppState,
}

/// Starts the API (see [`start_api`]) and logs in as its admin.
pub async fn start_api_as_admin(
    db: &test_support::TestDb,
    mongo: &test_support::TestMongo,
) -> anyhow::Result<AdminApi> {
    let (base, handles) = start_api(db, mongo).await?;
    let state = handles.state;
    let api = format!("{base}/api/v1");
    let http = reqwest::Client::new();
    let login: serde_json::Value = http
        .post(format!("{api}/auth/login"))
        .json(&serde_json::json!({"email": "admin@bench", "password": "bench-admin-pw"}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let token = login["access_token"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("no access token: {login}"))?
        .to_owned();
    Ok(AdminApi {
        api,
        token,
        http,
        state,
    })
}

/// Formats a duration in milliseconds.
pub fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// The Django REST Framework baselines (`bench/drf`) served by gunicorn on a free port
/// over `db` (`run.sh` migrates it); the server is killed when this is dropped.
pub struct Drf {
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    /// gunicorn's sync workers, as run.sh started them.
    pub workers: u32,
    pid: i32,
}

impl Drf {
    /// Starts gunicorn and waits until it accepts connections.
    pub async fn start(db: &test_support::TestDb) -> anyhow::Result<Self> {
        let port = test_support::free_port();
        let out = std::process::Command::new(
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("drf/run.sh"),
        )
        .arg(port.to_string())
        .env("DRF_DATABASE_URL", &db.url)
        .output()?;
        anyhow::ensure!(
            out.status.success(),
            "DRF setup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let (pid, workers) = stdout
            .split_once(' ')
            .ok_or_else(|| anyhow::anyhow!("run.sh printed {stdout:?}, not a pid and workers"))?;
        let drf = Self {
            base: format!("http://127.0.0.1:{port}"),
            workers: workers.parse()?,
            pid: pid.parse()?,
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "gunicorn did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(drf)
    }
}

impl Drop for Drf {
    /// Kills gunicorn's process group (run.sh started it with setsid), then the master.
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .arg("--")
            .arg(format!("-{}", self.pid))
            .status();
        let _ = std::process::Command::new("kill")
            .arg(self.pid.to_string())
            .status();
    }
}

/// Waits until a product's relay has emptied its outbox `table`; returns how long it
/// took.
pub async fn drain_outbox(pg: &sqlx::PgPool, table: &str) -> anyhow::Result<Duration> {
    let started = std::time::Instant::now();
    let count = format!("SELECT count(*) FROM {table}");
    loop {
        let pending: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(count.clone()))
            .fetch_one(pg)
            .await?;
        if pending == 0 {
            return Ok(started.elapsed());
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "{pending} rows still in {table} after 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
