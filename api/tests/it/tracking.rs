//! Web tracking: sites, `POST /track` with every refusal, CORS, and the questions
//! (accesses, per day, top, a user's contexts) against a brute-force count of the hits.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Duration, NaiveDate, TimeZone, Utc};
use chrono_tz::Tz;
use rand::{rngs::StdRng, seq::SliceRandom, Rng, SeedableRng};
use reqwest::{header::HeaderMap, Method, StatusCode};
use serde_json::{json, Value};
use test_support::{eventually, DEFAULT_DEADLINE};

use crate::harness::{assert_error, id, read, TestApp};

const ORIGIN: &str = "https://client.site.com";

/// The seed's hit, for `site`.
fn seed_hit(site: &str) -> Value {
    json!({
        "site_id": site,
        "url": "https://client.site.com/blog/same-page-accessed",
        "context": ["noticia", "culinaria", "vegano"],
        "user": {"id": "73e11ba9-a12c-4ab8-9648-e65e8d7c4d9e", "device": "Mozilla Firefox"}
    })
}

impl TestApp {
    /// Creates a site of `client` as admin.
    pub(crate) async fn create_site(&self, client: &str, name: &str, origins: &[&str]) -> Value {
        let (status, site) = self
            .post(
                "/sites",
                &self.admin,
                json!({ "client_id": client, "name": name, "origins": origins }),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{site}");
        site
    }

    /// Posts `body` to `/track` as a browser on `origin` would.
    async fn track(
        &self,
        body: impl Into<reqwest::Body>,
        content_type: &str,
        origin: Option<&str>,
    ) -> (StatusCode, Value, HeaderMap) {
        let mut req = self
            .request(Method::POST, "/track", None)
            .header("content-type", content_type)
            .header(
                "user-agent",
                "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
            )
            .body(body);
        if let Some(origin) = origin {
            req = req.header("origin", origin);
        }
        let resp = req.send().await.expect("the API answers");
        let headers = resp.headers().clone();
        let (status, body) = read(resp).await;
        (status, body, headers)
    }

    /// The site's accesses once there are `n` of them.
    async fn accesses_once(&self, site: &str, n: i64) -> Value {
        eventually("the hits relayed", DEFAULT_DEADLINE, || async {
            let (status, page) = self
                .get(
                    &format!("/sites/{site}/accesses?page_size=1000"),
                    &self.admin,
                )
                .await;
            assert_eq!(status, StatusCode::OK, "{page}");
            (page["total"] == n).then_some(page)
        })
        .await
    }
}

#[tokio::test]
async fn the_seed_payload_is_answered_by_every_question() {
    let app = TestApp::spawn().await;
    let client = app.create_client("Tracked").await;
    let site = app.create_site(id(&client), "Blog", &[ORIGIN]).await;
    let hit = seed_hit(id(&site));

    let (status, ack, headers) = app
        .track(hit.to_string(), "application/json", Some(ORIGIN))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{ack}");
    assert_eq!(ack, json!({"accepted": 1, "ignored": 0, "rejected": []}));
    assert_eq!(headers["access-control-allow-origin"], ORIGIN);

    let page = app.accesses_once(id(&site), 1).await;
    let access = &page["items"][0];
    assert_eq!(access["url"], hit["url"]);
    assert_eq!(access["context"], hit["context"]);
    assert_eq!(access["user_id"], hit["user"]["id"]);
    assert_eq!(access["device"], "Mozilla Firefox");
    assert!(access["user_agent"]
        .as_str()
        .unwrap()
        .contains("Firefox/128.0"));
    let received: DateTime<Utc> = access["received_at"].as_str().unwrap().parse().unwrap();
    assert!((Utc::now() - received).num_seconds().abs() < 60);

    let today = Utc::now()
        .with_timezone(&chrono_tz::America::Sao_Paulo)
        .date_naive();
    let (_, daily) = app
        .get(
            &format!(
                "/sites/{}/accesses/daily?from={today}&to={today}",
                id(&site)
            ),
            &app.admin,
        )
        .await;
    assert_eq!(
        daily["tz"], "America/Sao_Paulo",
        "the client's zone by default"
    );
    assert_eq!(
        daily["items"],
        json!([{"date": today.to_string(), "count": 1}])
    );

    let (_, top) = app
        .get(&format!("/sites/{}/accesses/top", id(&site)), &app.admin)
        .await;
    assert_eq!(top["hits"], 1);
    assert_eq!(top["urls"], json!([{"key": hit["url"], "hits": 1}]));
    let contexts: BTreeSet<&str> = top["contexts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["key"].as_str().unwrap())
        .collect();
    assert_eq!(contexts, BTreeSet::from(["noticia", "culinaria", "vegano"]));

    let (status, user) = app
        .get(
            &format!(
                "/tracked-users/{}/contexts",
                hit["user"]["id"].as_str().unwrap()
            ),
            &app.admin,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{user}");
    let items = user["items"].as_array().unwrap();
    assert_eq!(items.len(), 3);
    for item in items {
        assert_eq!(item["site_id"], site["id"]);
        assert_eq!(item["count"], 1);
        assert_eq!(item["first_seen"], item["last_seen"]);
    }
}

#[tokio::test]
async fn every_refusal_has_its_status_and_code_and_nothing_else_is_dropped() {
    let app = TestApp::spawn().await;
    let client = app.create_client("Refusals").await;
    let site = app.create_site(id(&client), "Shop", &[ORIGIN]).await;
    let good = seed_hit(id(&site));
    let with = |field: &str, value: Value| {
        let mut hit = good.clone();
        hit[field] = value;
        hit.to_string()
    };
    let many: Vec<String> = (0..33).map(|k| format!("c{k}")).collect();
    let cases: Vec<(&str, String, Option<&str>, StatusCode, &str)> = vec![
        (
            "unknown site",
            with("site_id", json!(uuid::Uuid::new_v4())),
            Some(ORIGIN),
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown_site",
        ),
        (
            "origin not allowed",
            good.to_string(),
            Some("https://evil.example"),
            StatusCode::FORBIDDEN,
            "origin_not_allowed",
        ),
        (
            "malformed body",
            "{\"site_id\": ".into(),
            Some(ORIGIN),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "not a hit",
            "[1, 2]".into(),
            Some(ORIGIN),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "oversized body",
            format!("[{}]", vec![good.to_string(); 400].join(",")),
            Some(ORIGIN),
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        ),
        (
            "too many hits",
            format!("[{}]", vec![good.to_string(); 101].join(",")),
            Some(ORIGIN),
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        ),
        (
            "too many contexts",
            with("context", json!(many)),
            Some(ORIGIN),
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
        ),
        (
            "bad url",
            with("url", json!("not a url")),
            Some(ORIGIN),
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
        ),
        (
            "no user",
            with("user", Value::Null),
            None,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
        ),
    ];
    for (what, body, origin, status, code) in &cases {
        let (got, err, _) = app.track(body.clone(), "application/json", *origin).await;
        assert_error(&(got, err.clone()), *status, code);
        assert!(!what.is_empty());
    }

    // A batch keeps its good hits beside a bad one, and says which was refused.
    let batch = format!("[{good},{},{good}]", with("url", json!("ftp://x.example/")));
    let (status, ack, _) = app.track(batch, "application/json", Some(ORIGIN)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{ack}");
    assert_eq!(ack["accepted"], 2);
    assert_eq!(ack["rejected"][0]["index"], 1);
    assert_eq!(ack["rejected"][0]["field"], "url");

    // Exactly the accepted hits are stored, and every refusal was counted by reason.
    app.accesses_once(id(&site), 2).await;
    let metrics = app.metrics().await;
    for reason in [
        "unknown_site",
        "origin_not_allowed",
        "malformed",
        "too_large",
        "too_many_hits",
        "too_many_contexts",
        "invalid_url",
        "invalid_user",
    ] {
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("tracking_rejected_total")
                    && l.contains(&format!("reason=\"{reason}\""))),
            "{reason} not counted"
        );
    }
}

#[tokio::test]
async fn browsers_may_send_text_plain_and_preflights_answer_only_known_origins() {
    let app = TestApp::spawn().await;
    let client = app.create_client("Cors").await;
    let site = app.create_site(id(&client), "Site", &[ORIGIN]).await;

    let (status, ack, headers) = app
        .track(
            seed_hit(id(&site)).to_string(),
            "text/plain;charset=UTF-8",
            Some(ORIGIN),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{ack}");
    assert_eq!(headers["access-control-allow-origin"], ORIGIN);

    let preflight = |origin: &'static str| {
        app.http
            .request(Method::OPTIONS, app.url("/api/v1/track"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "content-type")
            .send()
    };
    let allowed = preflight(ORIGIN).await.unwrap();
    assert_eq!(allowed.status(), StatusCode::NO_CONTENT);
    assert_eq!(allowed.headers()["access-control-allow-origin"], ORIGIN);
    assert!(allowed.headers()["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .contains("POST"));
    let refused = preflight("https://elsewhere.example").await.unwrap();
    assert!(refused
        .headers()
        .get("access-control-allow-origin")
        .is_none());

    // Bots are answered, counted and dropped.
    let bot = app
        .request(Method::POST, "/track", None)
        .header(
            "user-agent",
            "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
        )
        .json(&seed_hit(id(&site)))
        .send()
        .await
        .unwrap();
    let (status, ack) = read(bot).await;
    assert_eq!(
        (status, ack["accepted"].clone(), ack["ignored"].clone()),
        (StatusCode::ACCEPTED, json!(0), json!(1))
    );
    app.accesses_once(id(&site), 1).await;

    // The tracker script.
    let script = app.http.get(app.url("/t.js")).send().await.unwrap();
    assert!(script.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/javascript"));
    let text = script.text().await.unwrap();
    assert!(text.contains("sendBeacon") && text.len() < 8 * 1024);
}

#[tokio::test]
async fn a_site_sending_faster_than_its_rate_is_refused_with_429() {
    let app = TestApp::spawn_with(|s| s.tracking.rate_per_site = 5).await;
    let client = app.create_client("Limited").await;
    let site = app.create_site(id(&client), "s", &["*"]).await;
    // A burst of twice the rate passes; the next batch does not.
    let batch = Value::Array(vec![seed_hit(id(&site)); 10]).to_string();
    let (status, ack, _) = app.track(batch.clone(), "application/json", None).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{ack}");
    let (status, err, _) = app.track(batch, "application/json", None).await;
    assert_error(
        &(status, err),
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
    );
}

/// The test site: two pages that include the tracker from the API at `api`.
fn test_site(api: &str, site: &str) -> poem::Route {
    use poem::{endpoint::make_sync, web::Html};
    let tracker = format!(r#"<script async src="{api}/t.js" data-site="{site}"></script>"#);
    let a = format!(
        r#"<!doctype html><html><head><title>A</title>{tracker}</head>
        <body data-context="noticia, culinaria"><a id="next" href="/b.html">next</a></body></html>"#
    );
    let b = format!(
        r#"<!doctype html><html><head><title>B</title>
        <script>window.termoparContext = ["vegano"];</script>{tracker}</head>
        <body><p>b</p></body></html>"#
    );
    poem::Route::new()
        .at("/a.html", make_sync(move |_| Html(a.clone())))
        .at("/b.html", make_sync(move |_| Html(b.clone())))
}

#[tokio::test]
async fn a_real_browser_on_a_client_site_sends_each_page_view_with_its_contexts() {
    // Headless Chromium's user agent is a bot's: the filter is off for this test.
    let app = TestApp::spawn_with(|s| s.tracking.bot_filter = false).await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let pages = format!("http://{}", listener.local_addr().unwrap());
    let client = app.create_client("Browsed").await;
    let site = app.create_site(id(&client), "Site", &[&pages]).await;
    let server =
        poem::Server::new_with_acceptor(poem::listener::TcpAcceptor::from_std(listener).unwrap());
    tokio::spawn(server.run(test_site(&app.base, id(&site))));

    let dev_dir = std::env::var("TERMOPAR_DEV_DIR").unwrap_or_else(|_| {
        format!(
            "{}/.local/share/termopar-dev",
            std::env::var("HOME").unwrap()
        )
    });
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser/track.cjs");
    let out = tokio::process::Command::new("node")
        .arg(script)
        .arg(&pages)
        .env("NODE_PATH", format!("{dev_dir}/node/node_modules"))
        .output()
        .await
        .expect("node runs (scripts/services.sh installs playwright-core and chromium)");
    assert!(
        out.status.success(),
        "the browser script failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let page = app.accesses_once(id(&site), 3).await;
    let mut seen: Vec<(String, Vec<String>)> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            let context = i["context"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c.as_str().unwrap().to_owned())
                .collect();
            (i["url"].as_str().unwrap().to_owned(), context)
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        vec![
            (
                format!("{pages}/a.html"),
                vec!["noticia".to_owned(), "culinaria".to_owned()]
            ),
            (format!("{pages}/b.html"), vec!["vegano".to_owned()]),
            (format!("{pages}/b.html#reviews"), vec!["spa".to_owned()]),
        ]
    );
    let users: BTreeSet<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["user_id"].as_str().unwrap())
        .collect();
    assert_eq!(users.len(), 1, "one browser is one tracked user: {users:?}");
    assert_eq!(page["items"][0]["device"], "Google Chrome");
}

#[tokio::test]
async fn sites_are_managed_per_tenant_and_other_tenants_get_404() {
    let app = TestApp::spawn().await;
    let (a, b) = (
        app.create_client("Tenant A").await,
        app.create_client("Tenant B").await,
    );
    let (_, operator_a) = app.user_with_token("operator", Some(id(&a))).await;
    let (_, viewer_a) = app.user_with_token("viewer", Some(id(&a))).await;
    let (_, operator_b) = app.user_with_token("operator", Some(id(&b))).await;

    // Operators create their client's sites; origins are normalized; names are unique.
    let (status, site) = app
        .post(
            "/sites",
            &operator_a,
            json!({"name": "Shop", "origins": ["HTTPS://Shop.Example.com/", "*"]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{site}");
    assert_eq!(site["client_id"], a["id"]);
    assert_eq!(site["origins"], json!(["https://shop.example.com", "*"]));
    let dup = app
        .post(
            "/sites",
            &operator_a,
            json!({"name": "shop", "origins": []}),
        )
        .await;
    assert_error(&dup, StatusCode::CONFLICT, "conflict");
    let bad = app
        .post(
            "/sites",
            &operator_a,
            json!({"name": "x", "origins": ["https://a.example/path"]}),
        )
        .await;
    assert_error(&bad, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
    let viewer = app
        .post("/sites", &viewer_a, json!({"name": "y", "origins": []}))
        .await;
    assert_error(&viewer, StatusCode::FORBIDDEN, "forbidden");

    let site_path = format!("/sites/{}", id(&site));
    let (status, list) = app.get("/sites", &viewer_a).await;
    assert_eq!((status, list["total"].clone()), (StatusCode::OK, json!(1)));
    let (_, list) = app.get("/sites", &operator_b).await;
    assert_eq!(list["total"], 0);
    for path in [
        site_path.clone(),
        format!("{site_path}/accesses"),
        format!("{site_path}/accesses/daily"),
        format!("{site_path}/accesses/top"),
    ] {
        assert_error(
            &app.get(&path, &operator_b).await,
            StatusCode::NOT_FOUND,
            "not_found",
        );
        assert_eq!(app.get(&path, &viewer_a).await.0, StatusCode::OK, "{path}");
    }
    assert_error(
        &app.patch(&site_path, &operator_b, json!({"name": "mine"}))
            .await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_error(
        &app.patch(&site_path, &viewer_a, json!({"name": "mine"}))
            .await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );

    // A user seen only on A's sites is unknown to B.
    let (status, _, _) = app
        .track(
            seed_hit(id(&site)).to_string(),
            "application/json",
            Some("https://shop.example.com"),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    app.accesses_once(id(&site), 1).await;
    let user_path = "/tracked-users/73e11ba9-a12c-4ab8-9648-e65e8d7c4d9e/contexts";
    assert_error(
        &app.get(user_path, &operator_b).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_eq!(app.get(user_path, &viewer_a).await.0, StatusCode::OK);

    // A changed origin list applies at once in this process.
    let (status, _) = app
        .patch(
            &site_path,
            &operator_a,
            json!({"origins": ["https://new.example"]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) = app
        .track(
            seed_hit(id(&site)).to_string(),
            "application/json",
            Some("https://shop.example.com"),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // Not while a backup runs: it may be copying the site's raw pages.
    let mut backup = {
        use sqlx::Connection;
        sqlx::PgConnection::connect(&app.db.url).await.unwrap()
    };
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(termopar_core::backup::FENCE)
        .execute(&mut backup)
        .await
        .unwrap();
    assert_error(
        &app.delete(&site_path, &operator_a).await,
        StatusCode::SERVICE_UNAVAILABLE,
        "storage_unavailable",
    );
    assert_eq!(app.get(&site_path, &operator_a).await.0, StatusCode::OK);
    // Unlocked by a round trip, not by closing: a close returns before the server has
    // ended the session and released its locks.
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(termopar_core::backup::FENCE)
        .execute(&mut backup)
        .await
        .unwrap();
    sqlx::Connection::close(backup).await.unwrap();

    // Deleting a site deletes its hits and counts.
    assert_eq!(
        app.delete(&site_path, &operator_a).await.0,
        StatusCode::NO_CONTENT
    );
    assert_error(
        &app.get(&site_path, &operator_a).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_error(
        &app.get(user_path, &app.admin).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    let pages: i64 = sqlx::query_scalar("SELECT count(*) FROM tracking_pages")
        .fetch_one(&app.state.pg)
        .await
        .unwrap();
    assert_eq!(pages, 0);
}

/// Hits of a user's context, first and last seen.
type Seen = (i64, DateTime<Utc>, DateTime<Utc>);

/// A generated hit: site (index), receive time, url, contexts, user.
#[derive(Debug, Clone)]
struct Gen {
    site: usize,
    at: DateTime<Utc>,
    url: String,
    context: Vec<String>,
    user: String,
}

/// Puts hits into the outbox as the writers would have accepted them at their times
/// (HTTP stamps the time of receipt: past days cannot be sent): in rows of mixed sizes,
/// each of hits close in time (as a group commit's are), out of order within the row.
async fn accept_at(app: &TestApp, sites: &[String], hits: &[Gen], rng: &mut StdRng) {
    let mut shuffled = hits.to_vec();
    shuffled.sort_by_key(|h| h.at);
    // Mostly small rows, so that a site has more pages than one index query returns,
    // and some large ones, so that pages of the listing end inside them.
    let mut rest = &shuffled[..];
    while !rest.is_empty() {
        let size = if rng.gen_bool(0.1) {
            40
        } else {
            rng.gen_range(1..=4)
        };
        let size = size.min(rest.len());
        let (row, tail) = rest.split_at(size);
        rest = tail;
        let mut row = row.to_vec();
        row.shuffle(rng);
        let json: Vec<Value> = row
            .iter()
            .map(|h| json!({"s": sites[h.site], "t": h.at.timestamp_millis(), "u": h.url, "c": h.context, "i": h.user, "d": "Firefox"}))
            .collect();
        sqlx::query("INSERT INTO tracking_outbox (hits, count) VALUES ($1, $2)")
            .bind(serde_json::to_vec(&json).unwrap())
            .bind(row.len() as i32)
            .execute(&app.state.pg)
            .await
            .unwrap();
    }
}

/// `n` hits over 3 days from `start`, in bursts of up to 30 within 10 seconds.
fn generate(rng: &mut StdRng, start: DateTime<Utc>, n: usize) -> Vec<Gen> {
    let contexts = ["noticia", "culinaria", "vegano", "esporte", "viagem"];
    let mut burst = (start, 0);
    (0..n)
        .map(|_| {
            if burst.1 == 0 {
                burst = (
                    start + Duration::milliseconds(rng.gen_range(0..3 * 86_400_000)),
                    rng.gen_range(1..=30),
                );
            }
            burst.1 -= 1;
            let k = rng.gen_range(0..4);
            let mut context: Vec<String> = contexts
                .choose_multiple(rng, k)
                .map(|c| c.to_string())
                .collect();
            context.sort();
            Gen {
                site: rng.gen_range(0..3),
                at: burst.0 + Duration::milliseconds(rng.gen_range(0..10_000)),
                url: format!("https://client.site.com/p/{}", rng.gen_range(0..6)),
                context,
                user: format!("user-{}", rng.gen_range(0..5)),
            }
        })
        .collect()
}

#[tokio::test]
async fn questions_across_days_zones_and_sites_equal_a_brute_force_count() {
    let app = TestApp::spawn().await;
    let (a, b) = (
        app.create_client("Zones A").await,
        app.create_client("Zones B").await,
    );
    let sites = vec![
        id(&app.create_site(id(&a), "a1", &["*"]).await).to_owned(),
        id(&app.create_site(id(&a), "a2", &["*"]).await).to_owned(),
        id(&app.create_site(id(&b), "b1", &["*"]).await).to_owned(),
    ];
    let mut rng = StdRng::seed_from_u64(14);
    let start = Utc.with_ymd_and_hms(2026, 3, 7, 20, 13, 0).unwrap();
    let hits = generate(&mut rng, start, 1500);
    accept_at(&app, &sites, &hits, &mut rng).await;
    let of_site = |s: usize| hits.iter().filter(move |h| h.site == s);
    app.accesses_once(&sites[0], of_site(0).count() as i64)
        .await;
    eventually("every site's hits relayed", DEFAULT_DEADLINE, || async {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM tracking_outbox")
            .fetch_one(&app.state.pg)
            .await
            .unwrap();
        (left == 0).then_some(())
    })
    .await;

    // Accesses in a window that cuts pages: exact, newest first, by cursor and by page.
    let (from, to) = (
        start + Duration::minutes(517),
        start + Duration::hours(49) + Duration::seconds(7),
    );
    let mut expected: Vec<(DateTime<Utc>, String, String)> = of_site(0)
        .filter(|h| from <= h.at && h.at < to)
        .map(|h| (h.at, h.url.clone(), h.user.clone()))
        .collect();
    expected.sort();
    expected.reverse();
    let window = format!("from={}&to={}", from.to_rfc3339(), to.to_rfc3339()).replace('+', "%2B");
    let mut listed = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = Vec::new();
    loop {
        let path = match &cursor {
            Some(c) => format!(
                "/sites/{}/accesses?{window}&page_size=37&cursor={c}",
                sites[0]
            ),
            None => format!("/sites/{}/accesses?{window}&page_size=37", sites[0]),
        };
        let (status, page) = app.get(&path, &app.admin).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        assert_eq!(page["total"], expected.len(), "total of the window");
        let items: Vec<(DateTime<Utc>, String, String)> = page["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| {
                (
                    i["received_at"].as_str().unwrap().parse().unwrap(),
                    i["url"].as_str().unwrap().into(),
                    i["user_id"].as_str().unwrap().into(),
                )
            })
            .collect();
        pages.push(page["items"].clone());
        listed.extend(items);
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert!(listed.windows(2).all(|w| w[0].0 >= w[1].0), "newest first");
    let mut sorted = listed.clone();
    sorted.sort();
    sorted.reverse();
    assert_eq!(
        sorted.len(),
        expected.len(),
        "as many accesses as the window holds"
    );
    assert!(sorted == expected, "every access of the window, once");
    let (_, third) = app
        .get(
            &format!("/sites/{}/accesses?{window}&page_size=37&page=3", sites[0]),
            &app.admin,
        )
        .await;
    assert_eq!(third["items"], pages[2], "page 3 is the third cursor page");

    // Per local day, in zones on either side of UTC and with a half-hour offset.
    for tz in ["America/Sao_Paulo", "Asia/Kolkata", "UTC"] {
        let zone: Tz = tz.parse().unwrap();
        let mut per_day: BTreeMap<NaiveDate, i64> = BTreeMap::new();
        for h in of_site(0) {
            *per_day
                .entry(h.at.with_timezone(&zone).date_naive())
                .or_default() += 1;
        }
        let (first, last) = (
            *per_day.keys().next().unwrap(),
            *per_day.keys().last().unwrap(),
        );
        let (status, daily) = app
            .get(
                &format!(
                    "/sites/{}/accesses/daily?from={first}&to={last}&tz={tz}",
                    sites[0]
                ),
                &app.admin,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{daily}");
        let got: BTreeMap<NaiveDate, i64> = daily["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                (
                    d["date"].as_str().unwrap().parse().unwrap(),
                    d["count"].as_i64().unwrap(),
                )
            })
            .filter(|(_, n)| *n > 0)
            .collect();
        assert_eq!(got, per_day, "days in {tz}");
    }

    // Top URLs and contexts of a window on 15-minute bounds.
    let (from, to) = (
        start + Duration::minutes(47),
        start + Duration::minutes(47 + 15 * 100),
    );
    let mut urls: BTreeMap<String, i64> = BTreeMap::new();
    let mut contexts: BTreeMap<String, i64> = BTreeMap::new();
    for h in of_site(1).filter(|h| from <= h.at && h.at < to) {
        *urls.entry(h.url.clone()).or_default() += 1;
        for c in &h.context {
            *contexts.entry(c.clone()).or_default() += 1;
        }
    }
    let window = format!("from={}&to={}", from.to_rfc3339(), to.to_rfc3339()).replace('+', "%2B");
    let (_, top) = app
        .get(
            &format!("/sites/{}/accesses/top?{window}&limit=100", sites[1]),
            &app.admin,
        )
        .await;
    let ranked = |v: &Value| -> BTreeMap<String, i64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["key"].as_str().unwrap().to_owned(),
                    r["hits"].as_i64().unwrap(),
                )
            })
            .collect()
    };
    assert_eq!(ranked(&top["urls"]), urls);
    assert_eq!(ranked(&top["contexts"]), contexts);
    assert_eq!(top["hits"], urls.values().sum::<i64>());

    // A user's contexts: on every site for the admin, on its own client's for an operator.
    let (_, operator_a) = app.user_with_token("operator", Some(id(&a))).await;
    for (token, visible) in [(&app.admin, vec![0, 1, 2]), (&operator_a, vec![0, 1])] {
        let mut expected: BTreeMap<(String, String), Seen> = BTreeMap::new();
        for h in hits.iter().filter(|h| {
            h.user == "user-3" && visible.contains(&h.site) && from <= h.at && h.at < to
        }) {
            for c in &h.context {
                let e = expected
                    .entry((sites[h.site].clone(), c.clone()))
                    .or_insert((0, h.at, h.at));
                e.0 += 1;
                e.1 = e.1.min(h.at);
                e.2 = e.2.max(h.at);
            }
        }
        let (status, got) = app
            .get(&format!("/tracked-users/user-3/contexts?{window}"), token)
            .await;
        assert_eq!(status, StatusCode::OK, "{got}");
        let got: BTreeMap<(String, String), Seen> = got["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| {
                let t = |k: &str| i[k].as_str().unwrap().parse::<DateTime<Utc>>().unwrap();
                (
                    (
                        i["site_id"].as_str().unwrap().to_owned(),
                        i["context"].as_str().unwrap().to_owned(),
                    ),
                    (
                        i["count"].as_i64().unwrap(),
                        t("first_seen"),
                        t("last_seen"),
                    ),
                )
            })
            .collect();
        assert_eq!(got, expected);
    }
}

/// The API as its own process (`termopar-api`) over the test's stores, killed by the
/// test when it is dropped.
struct ApiProcess(std::process::Child, String);

impl ApiProcess {
    async fn start(db: &test_support::TestDb, mongo: &test_support::TestMongo) -> Self {
        let addr = format!("127.0.0.1:{}", test_support::free_port());
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_termopar-api"))
            .env("API_ADDR", &addr)
            .env("DATABASE_URL", &db.url)
            .env("MONGODB_URI", &mongo.settings.uri)
            .env("MONGODB_DB", &mongo.settings.database)
            .env("JWT_SECRET", crate::harness::JWT_SECRET)
            .env("ADMIN_EMAIL", crate::harness::ADMIN_EMAIL)
            .env("ADMIN_PASSWORD", crate::harness::ADMIN_PASSWORD)
            .env("TRACKING_RATE_PER_SITE", "0")
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start termopar-api");
        let base = format!("http://{addr}");
        let http = reqwest::Client::new();
        eventually("the API process answering", DEFAULT_DEADLINE, || async {
            let up = http.get(format!("{base}/health")).send().await;
            up.is_ok_and(|r| r.status().is_success()).then_some(())
        })
        .await;
        Self(child, base)
    }
}

impl Drop for ApiProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn a_kill_9_loses_no_answered_hit_and_stores_none_twice() {
    let db = test_support::TestDb::new().await;
    let mongo = test_support::TestMongo::new();
    let mut api = ApiProcess::start(&db, &mongo).await;
    let http = reqwest::Client::new();
    let base = api.1.clone();
    let post = |path: &str, token: Option<&str>, body: Value| {
        let mut req = http.post(format!("{base}/api/v1{path}")).json(&body);
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        async move { req.send().await.unwrap().json::<Value>().await.unwrap() }
    };
    let login = post(
        "/auth/login",
        None,
        json!({"email": crate::harness::ADMIN_EMAIL, "password": crate::harness::ADMIN_PASSWORD}),
    )
    .await;
    let token = login["access_token"].as_str().unwrap().to_owned();
    let client = post(
        "/clients",
        Some(&token),
        json!({"name": "Crash", "timezone": "UTC"}),
    )
    .await;
    let site = post(
        "/sites",
        Some(&token),
        json!({"client_id": client["id"], "name": "s", "origins": ["*"]}),
    )
    .await;

    // Senders post hits with unique URLs until the process dies, noting each 202.
    let answered = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut senders = Vec::new();
    for s in 0..16 {
        let (http, base, site, answered) = (
            http.clone(),
            base.clone(),
            id(&site).to_owned(),
            answered.clone(),
        );
        senders.push(tokio::spawn(async move {
            for n in 0.. {
                let url = format!("https://crash.example/{s}/{n}");
                let hit = json!({"site_id": site, "url": url, "context": ["c"], "user": {"id": format!("u{s}")}});
                match http.post(format!("{base}/api/v1/track")).json(&hit).send().await {
                    Ok(r) if r.status() == StatusCode::ACCEPTED => answered.lock().unwrap().push(url),
                    Ok(r) => panic!("a hit was answered {}", r.status()),
                    Err(_) => return, // the process is gone
                }
            }
        }));
    }
    eventually("hits answered under load", DEFAULT_DEADLINE, || async {
        (answered.lock().unwrap().len() >= 1000).then_some(())
    })
    .await;
    api.0.kill().expect("SIGKILL the API");
    api.0.wait().unwrap();
    for s in senders {
        s.await.unwrap();
    }
    let answered: BTreeSet<String> = answered.lock().unwrap().iter().cloned().collect();

    // A new process moves what the dead one committed.
    let _api = ApiProcess::start(&db, &mongo).await;
    eventually("the outbox drained", DEFAULT_DEADLINE, || async {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM tracking_outbox")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        (left == 0).then_some(())
    })
    .await;
    let counts: Vec<(String, i64)> =
        sqlx::query_as("SELECT url, sum(hits)::int8 FROM tracking_url_counts GROUP BY url")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let stored: BTreeMap<String, i64> = counts.into_iter().collect();
    let twice: Vec<_> = stored.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "counted more than once: {twice:?}");
    let lost: Vec<_> = answered
        .iter()
        .filter(|u| !stored.contains_key(*u))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} answered hits lost: {:?}",
        lost.len(),
        answered.len(),
        &lost[..lost.len().min(5)]
    );
    // Hits stored but never answered were in flight at the kill; nothing else is.
    assert!(stored
        .keys()
        .all(|u| u.starts_with("https://crash.example/")));
    let paged: i64 = sqlx::query_scalar("SELECT coalesce(sum(hits), 0)::int8 FROM tracking_pages")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        paged,
        stored.len() as i64,
        "every stored hit is in one raw page"
    );
}
