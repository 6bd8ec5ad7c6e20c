//! `make bench-console`: Lighthouse (driving Debian's Chromium, its default mobile profile
//! with simulated throttling) on the console's login page, the live sensor list (20
//! sensors) and a sensor page with a year of daily averages: accessibility and
//! performance scores and the bytes a first load transfers. Baseline, in the same run:
//! the API's Swagger UI page (`/docs`), the page the API served people before the console.

use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context};
use chrono::{Duration as Days, Utc};
use serde_json::{json, Value};
use termopar_bench::{print_table, start_api_as_admin, Row};
use test_support::{TestDb, TestMongo};

/// What Lighthouse measured of one page.
struct Scores {
    performance: f64,
    accessibility: f64,
    bytes: f64,
}

fn lighthouse_cli() -> anyhow::Result<PathBuf> {
    let dev = std::env::var("TERMOPAR_DEV_DIR").unwrap_or_else(|_| {
        format!(
            "{}/.local/share/termopar-dev",
            std::env::var("HOME").unwrap_or_default()
        )
    });
    let cli = PathBuf::from(dev).join("lighthouse/node_modules/lighthouse/cli/index.js");
    if !cli.exists() {
        bail!(
            "{} is missing: run scripts/services.sh bench-tools",
            cli.display()
        );
    }
    Ok(cli)
}

/// Runs Lighthouse on `url`, with `cookie` on every request when given.
fn lighthouse(cli: &PathBuf, url: &str, cookie: Option<&str>) -> anyhow::Result<Scores> {
    let mut cmd = Command::new("node");
    cmd.arg(cli)
        .arg(url)
        .args([
            "--output=json",
            "--output-path=stdout",
            "--quiet",
            "--only-categories=performance,accessibility",
            "--chrome-flags=--headless=new --no-sandbox --disable-gpu",
        ])
        .env(
            "CHROME_PATH",
            std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into()),
        );
    if let Some(cookie) = cookie {
        cmd.arg(format!("--extra-headers={}", json!({ "Cookie": cookie })));
    }
    let out = cmd.output().context("running lighthouse (node)")?;
    if !out.status.success() {
        bail!(
            "lighthouse failed on {url}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let report: Value = serde_json::from_slice(&out.stdout).context("lighthouse's JSON report")?;
    if let Some(error) = report["runtimeError"]["message"].as_str() {
        bail!("lighthouse on {url}: {error}");
    }
    let final_url = report["finalDisplayedUrl"].as_str().unwrap_or_default();
    if final_url != url {
        bail!("lighthouse on {url} ended on {final_url} (not logged in?)");
    }
    let score = |category: &str| {
        report["categories"][category]["score"]
            .as_f64()
            .unwrap_or(0.0)
            * 100.0
    };
    Ok(Scores {
        performance: score("performance"),
        accessibility: score("accessibility"),
        bytes: report["audits"]["total-byte-weight"]["numericValue"]
            .as_f64()
            .unwrap_or(f64::NAN),
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = lighthouse_cli()?;
    let db = TestDb::new().await;
    let mongo = TestMongo::new();
    let admin = start_api_as_admin(&db, &mongo).await?;
    let base = admin.api.trim_end_matches("/api/v1").to_owned();
    let call = |method: reqwest::Method, path: &str, body: Value| {
        admin
            .http
            .request(method, format!("{}{path}", admin.api))
            .bearer_auth(&admin.token)
            .json(&body)
            .send()
    };
    let client: Value = call(
        reqwest::Method::POST,
        "/clients",
        json!({"name": "Bench Co", "timezone": "America/Sao_Paulo"}),
    )
    .await?
    .error_for_status()?
    .json()
    .await?;
    let client_id = client["id"].as_str().unwrap_or_default().to_owned();
    let mut sensors = Vec::new();
    for k in 0..20 {
        let sensor: Value = call(
            reqwest::Method::POST,
            "/sensors",
            json!({"client_id": client_id, "name": format!("Cold room {k:02}"), "location": format!("Hall {}", k / 5)}),
        )
        .await?
        .error_for_status()?
        .json()
        .await?;
        sensors.push(sensor["id"].as_str().unwrap_or_default().to_owned());
    }
    // A year of hourly readings for the first sensor, a fresh one for each of the others.
    let now = Utc::now();
    let hours: Vec<Value> = (0..365 * 24)
        .map(|h| {
            let ts = now - Days::hours(h);
            json!({"ts": ts.to_rfc3339(), "temperature": 4.0 + ((h % 24) as f64 / 6.0)})
        })
        .collect();
    for chunk in hours.chunks(1000) {
        call(
            reqwest::Method::POST,
            &format!("/sensors/{}/readings", sensors[0]),
            Value::Array(chunk.to_vec()),
        )
        .await?
        .error_for_status()?;
    }
    for sensor in &sensors[1..] {
        call(
            reqwest::Method::POST,
            &format!("/sensors/{sensor}/readings"),
            json!({"temperature": 5.5}),
        )
        .await?
        .error_for_status()?;
    }
    let daily: Value = admin
        .http
        .get(format!(
            "{}/sensors/{}/daily-averages?from={}&to={}",
            admin.api,
            sensors[0],
            (now - Days::days(364)).format("%Y-%m-%d"),
            now.format("%Y-%m-%d")
        ))
        .bearer_auth(&admin.token)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let days = daily["items"].as_array().map_or(0, Vec::len);

    // A console session for the pages behind the login.
    let login = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?
        .post(format!("{base}/ui/login"))
        .form(&[("email", "admin@bench"), ("password", "bench-admin-pw")])
        .send()
        .await?;
    let cookie = login
        .headers()
        .get(reqwest::header::SET_COOKIE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .context("the console login set no cookie")?
        .to_owned();

    let baseline = lighthouse(&cli, &format!("{base}/docs"), None)?;
    let pages = [
        ("login page", format!("{base}/ui/login"), None),
        (
            "sensor list (20 sensors, live)",
            format!("{base}/ui/sensors"),
            Some(cookie.as_str()),
        ),
        (
            "sensor page (history, a year of daily averages)",
            format!("{base}/ui/sensors/{}", sensors[0]),
            Some(cookie.as_str()),
        ),
    ];
    let mut rows = vec![
        Row::info("daily averages on the sensor page", format!("{days} days")),
        Row::info(
            "baseline: Swagger UI (/docs)",
            format!(
                "performance {:.0}, accessibility {:.0}, {:.0} KB",
                baseline.performance,
                baseline.accessibility,
                baseline.bytes / 1000.0
            ),
        ),
    ];
    for (name, url, cookie) in pages {
        let s = lighthouse(&cli, &url, cookie)?;
        rows.push(Row {
            name: format!("{name}: accessibility"),
            value: format!("{:.0}", s.accessibility),
            baseline: format!("{:.0}", baseline.accessibility),
            ratio: Some(s.accessibility / baseline.accessibility),
            target: "≥ 95".into(),
            met: Some(s.accessibility >= 95.0),
        });
        rows.push(Row {
            name: format!("{name}: performance"),
            value: format!("{:.0}", s.performance),
            baseline: format!("{:.0}", baseline.performance),
            ratio: Some(s.performance / baseline.performance),
            target: "≥ 90".into(),
            met: Some(s.performance >= 90.0),
        });
        rows.push(Row {
            name: format!("{name}: bytes transferred, first load"),
            value: format!("{:.1} KB", s.bytes / 1000.0),
            baseline: format!("{:.1} KB", baseline.bytes / 1000.0),
            ratio: Some(s.bytes / baseline.bytes),
            target: "≤ 150 KB".into(),
            met: Some(s.bytes <= 150_000.0),
        });
    }
    print_table(
        "Console: Lighthouse 12 (mobile profile, simulated throttling), Debian's Chromium",
        &rows,
    );
    Ok(())
}
