//! `make bench-api`: the readings API under load.
//!
//! Latest reading (JWT + caches) against `/health` on the same server (the framework's
//! ceiling: same middleware, no work). History and daily averages at volume are
//! `make bench-store`'s.

use serde_json::{json, Value};
use termopar_bench::{ms, per_sec, print_table, wrk, Row};
use termopar_core::settings::env_parse;
use test_support::{TestDb, TestMongo};

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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let seconds: u32 = env_parse("BENCH_SECONDS", 5)?;
    let db = TestDb::new().await;
    let mongo = TestMongo::new();
    let (base, _state) = termopar_bench::start_api(&db, &mongo).await?;
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
        ],
    );
    Ok(())
}
