//! The web console end to end, in headless Chromium against an edge node: the browser
//! side is `tests/browser/console.cjs`; readings go through the embedded broker with the
//! `mosquitto_pub` line the console shows.

use std::time::Duration;

use termopar::Edge;
use test_support::{TestDb, TestMongo};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_works_in_a_real_browser_for_an_admin_and_a_viewer() {
    let db = TestDb::new().await;
    let mongo = TestMongo::new();
    let mut settings = crate::edge_settings(&db, &mongo);
    settings.api.console.poll_every = Duration::from_millis(500);
    let admin = settings.api.bootstrap_admin.clone().unwrap();
    let edge = Edge::start(settings).await.unwrap();
    let base = format!("http://{}", edge.app.addr());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(edge.run_until(async move {
        let _ = stopped.await;
    }));

    let dev_dir = std::env::var("TERMOPAR_DEV_DIR").unwrap_or_else(|_| {
        format!(
            "{}/.local/share/termopar-dev",
            std::env::var("HOME").unwrap()
        )
    });
    let shots = format!("{}/console-screenshots", env!("CARGO_TARGET_TMPDIR"));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser/console.cjs");
    let out = tokio::process::Command::new("node")
        .arg(script)
        .env("NODE_PATH", format!("{dev_dir}/node/node_modules"))
        .env("BASE", &base)
        .env("ADMIN_EMAIL", &admin.email)
        .env(
            "ADMIN_PASSWORD",
            secrecy::ExposeSecret::expose_secret(&admin.password),
        )
        .env("SHOTS", &shots)
        .output()
        .await
        .expect("node runs (scripts/services.sh installs playwright-core and chromium)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "the browser script failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // What the browser did is in the stores: the viewer it created, the readings it
    // published with the console's line (one measured now, thirteen older, one live, of
    // the freezer).
    let result: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let pg = sqlx::PgPool::connect(&db.url).await.unwrap();
    let viewer: (String, Option<uuid::Uuid>) =
        sqlx::query_as("SELECT role, client_id FROM users WHERE email = 'viewer@cold.example'")
            .fetch_one(&pg)
            .await
            .unwrap();
    let freezer: uuid::Uuid = result["freezer"].as_str().unwrap().parse().unwrap();
    let client: uuid::Uuid = sqlx::query_scalar("SELECT client_id FROM sensors WHERE id = $1")
        .bind(freezer)
        .fetch_one(&pg)
        .await
        .unwrap();
    assert_eq!(viewer, ("viewer".to_owned(), Some(client)));
    assert_eq!(result["readings"], 15);
    // ...and one of the quiet sensor, two of the other client's (its alarm).
    assert_eq!(test_support::stored_count(&pg).await, 18);
    let alarm: (String, Option<String>) =
        sqlx::query_as("SELECT state, ack_comment FROM alarms WHERE sensor_id = $1")
            .bind(uuid::Uuid::parse_str(result["other"].as_str().unwrap()).unwrap())
            .fetch_one(&pg)
            .await
            .unwrap();
    assert_eq!(
        alarm,
        ("cleared".to_owned(), Some("door closed again".to_owned()))
    );
    let sessions: i64 = sqlx::query_scalar("SELECT count(*) FROM console_sessions")
        .fetch_one(&pg)
        .await
        .unwrap();
    assert_eq!(sessions, 0, "both users logged out");

    let _ = stop.send(());
    running.await.unwrap().unwrap();
}
