//! The provisioned Grafana dashboard (`ops/grafana/dashboards/termopar.json`) against a
//! real Prometheus (Debian's `prometheus`) scraping an edge node under traffic of every
//! kind: every query of every panel must return data, so a renamed or removed metric
//! fails here rather than on an operator's screen.

use std::time::Duration;

use serde_json::{json, Value};
use termopar::Edge;
use termopar_core::settings::MqttEndpoint;
use test_support::{eventually, ChildGuard, TestDb, TestMongo};

const DASHBOARD: &str = include_str!("../../../ops/grafana/dashboards/termopar.json");

/// Every PromQL expression of the dashboard, with its panel's title.
fn queries() -> Vec<(String, String)> {
    let dashboard: Value = serde_json::from_str(DASHBOARD).expect("the dashboard is JSON");
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            queries.push((
                panel["title"].as_str().unwrap().to_owned(),
                target["expr"].as_str().unwrap().to_owned(),
            ));
        }
    }
    queries
}

/// One round of everything the dashboard watches: readings over MQTT (one of them
/// refused), the latest reading and daily averages, a webhook event, a tracking hit and a
/// lead form (whose jobs the in-process workers run).
async fn traffic(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    mqtt: &MqttEndpoint,
    ids: &(String, String, String),
    round: u32,
) {
    let (client, sensor, site) = ids;
    let topic = format!("clients/{client}/sensors/{sensor}/readings");
    let three_days_ago = chrono::Utc::now() - chrono::Duration::days(3);
    let payloads = [
        json!([{"temperature": 20.0 + f64::from(round % 10)}, {"ts": three_days_ago.to_rfc3339(), "temperature": 5.0}]).to_string(),
        json!({"temperature": "hot"}).to_string(),
    ];
    let mqtt = mqtt.clone();
    tokio::task::spawn_blocking(move || {
        for payload in payloads {
            let status = test_support::mosquitto_pub_status(
                &mqtt,
                &topic,
                payload.as_bytes(),
                1,
                "mqttv311",
                Some(("sim", "sim-password-1")),
            );
            assert!(status.success(), "mosquitto_pub: {status}");
        }
    })
    .await
    .unwrap();
    let api = |path: &str| format!("{base}/api/v1{path}");
    for path in [
        format!("/sensors/{sensor}/readings/latest"),
        format!("/sensors/{sensor}/daily-averages"),
    ] {
        http.get(api(&path))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
    }
    let conversation = uuid::Uuid::new_v4();
    let webhook = http
        .post(api("/webhook"))
        .json(&json!({"type": "NEW_CONVERSATION", "timestamp": "2025-02-21T10:20:41.349308", "data": {"id": conversation}}))
        .send()
        .await
        .unwrap();
    assert!(
        webhook.status().is_success(),
        "webhook: {}",
        webhook.status()
    );
    let origin = "https://shop.example";
    let hit = http
        .post(api("/track"))
        .header("origin", origin)
        .json(&json!({"site_id": site, "url": "https://shop.example/a", "context": ["a"], "user": {"id": "u1", "device": "d1"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(hit.status(), reqwest::StatusCode::ACCEPTED);
    let lead = http
        .post(api("/leads"))
        .header("origin", origin)
        .json(&json!({"site_id": site, "name": "Ana", "email": format!("ana{round}@shop.example")}))
        .send()
        .await
        .unwrap();
    assert_eq!(lead.status(), reqwest::StatusCode::CREATED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_panel_of_the_dashboard_has_data_in_prometheus() {
    let db = TestDb::new().await;
    let mongo = TestMongo::new();
    let settings = crate::edge_settings(&db, &mongo);
    let admin = settings.api.bootstrap_admin.clone().unwrap();
    let edge = Edge::start(settings).await.unwrap();
    let addr = edge.app.addr();
    let base = format!("http://{addr}");
    let mqtt = MqttEndpoint::parse(&edge.broker.url()).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(edge.run_until(async move {
        let _ = stopped.await;
    }));

    let http = reqwest::Client::new();
    let password = secrecy::ExposeSecret::expose_secret(&admin.password);
    let token = termopar_device_sim::login(&http, &base, &admin.email, password)
        .await
        .unwrap();
    let create = |path: &'static str, body: Value| {
        let request = http
            .post(format!("{base}/api/v1{path}"))
            .bearer_auth(&token)
            .json(&body);
        async move {
            let created: Value = request.send().await.unwrap().json().await.unwrap();
            created["id"].as_str().unwrap().to_owned()
        }
    };
    let client = create("/clients", json!({"name": "Watched", "timezone": "UTC"})).await;
    let sensor = create("/sensors", json!({"client_id": client, "name": "s"})).await;
    let site = create(
        "/sites",
        json!({"client_id": client, "name": "Shop", "origins": ["https://shop.example"]}),
    )
    .await;
    let ids = (client, sensor, site);

    // Prometheus, scraping the edge node every second.
    let dir = std::env::temp_dir().join(format!("termopar-prometheus-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
             scrape_configs:\n  - job_name: edge\n    static_configs: [{{targets: [\"{addr}\"]}}]\n"
        ),
    )
    .unwrap();
    let port = test_support::free_port();
    let _prometheus = ChildGuard(
        std::process::Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("prometheus runs (scripts/services.sh installs Debian's)"),
    );
    let query = |expr: String| {
        let http = http.clone();
        async move {
            let answer: Value = http
                .get(format!("http://127.0.0.1:{port}/api/v1/query"))
                .query(&[("query", expr)])
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            let result = answer["data"]["result"].as_array()?.clone();
            // Data: at least one series with a number (not NaN, which is what a
            // quantile or ratio over nothing gives).
            result
                .iter()
                .any(|series| {
                    series["value"][1]
                        .as_str()
                        .and_then(|v| v.parse::<f64>().ok())
                        .is_some_and(f64::is_finite)
                })
                .then_some(result)
        }
    };
    eventually(
        "Prometheus scrapes the edge node",
        Duration::from_secs(60),
        || query("up{job=\"edge\"} == 1".into()),
    )
    .await;

    // Traffic keeps flowing while the panels are checked, so every rate has samples.
    let (done, mut finished) = tokio::sync::watch::channel(false);
    let load = {
        let (http, base, token, mqtt, ids) = (
            http.clone(),
            base.clone(),
            token.clone(),
            mqtt.clone(),
            ids.clone(),
        );
        tokio::spawn(async move {
            let mut round = 0;
            while !*finished.borrow() {
                traffic(&http, &base, &token, &mqtt, &ids, round).await;
                round += 1;
                let _ = tokio::time::timeout(Duration::from_millis(500), finished.changed()).await;
            }
            round
        })
    };
    for (title, expr) in queries() {
        eventually(
            &format!("panel {title:?}: {expr}"),
            Duration::from_secs(90),
            || query(expr.clone()),
        )
        .await;
    }
    done.send(true).unwrap();
    assert!(load.await.unwrap() > 0);
    let _ = stop.send(());
    running.await.unwrap().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
