//! The console's sessions over real HTTP: the cookie, CSRF, idle and absolute expiry,
//! logout, and the API's rules applied to a session exactly as to a token. (The pages
//! themselves are tested in a browser: `edge/tests/it/console.rs`.)

use reqwest::{header, redirect::Policy, StatusCode};
use serde_json::{json, Value};

use crate::harness::{assert_error, id, read, TestApp, ADMIN_EMAIL, ADMIN_PASSWORD};

/// A browser-like client of the console: no redirects followed, the cookie kept by hand.
struct Browser {
    http: reqwest::Client,
    base: String,
    cookie: String,
}

impl Browser {
    /// Logs in through the console's form; panics unless it succeeds.
    async fn login(app: &TestApp, email: &str, password: &str) -> Self {
        let http = reqwest::Client::builder()
            .redirect(Policy::none())
            .build()
            .unwrap();
        let resp = http
            .post(app.url("/ui/login"))
            .form(&[
                ("email", email),
                ("password", password),
                ("next", "/ui/sites"),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::SEE_OTHER);
        assert_eq!(resp.headers()[header::LOCATION], "/ui/sites");
        let set = resp.headers()[header::SET_COOKIE]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(
            set.contains("HttpOnly") && set.contains("SameSite=Strict") && !set.contains("Secure"),
            "{set}"
        );
        let cookie = set.split(';').next().unwrap().to_owned();
        Self {
            http,
            base: app.base.clone(),
            cookie,
        }
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .header(header::COOKIE, &self.cookie)
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        read(
            self.request(reqwest::Method::GET, path)
                .send()
                .await
                .unwrap(),
        )
        .await
    }

    /// The CSRF token of the session, as its pages carry it.
    async fn csrf(&self) -> String {
        let (status, body) = self.get("/ui/session").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["csrf"].as_str().unwrap().to_owned()
    }

    fn hash(&self) -> Vec<u8> {
        use sha2::Digest;
        let secret = self.cookie.split_once('=').unwrap().1;
        sha2::Sha256::digest(secret.as_bytes()).to_vec()
    }
}

#[tokio::test]
async fn a_session_is_the_users_token_for_the_api_and_changes_need_its_csrf_token() {
    let app = TestApp::spawn().await;
    let client = app.create_client("Console Co").await;
    let browser = Browser::login(&app, ADMIN_EMAIL, ADMIN_PASSWORD).await;
    let (status, me) = browser.get("/api/v1/auth/me").await;
    assert_eq!(
        (status, me["email"].as_str()),
        (StatusCode::OK, Some(ADMIN_EMAIL))
    );

    let site =
        json!({"client_id": id(&client), "name": "Shop", "origins": ["https://shop.example"]});
    let post = |headers: &[(&str, &str)]| {
        let mut req = browser
            .request(reqwest::Method::POST, "/api/v1/sites")
            .json(&site);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.send()
    };
    let csrf = browser.csrf().await;
    let refused = read(post(&[]).await.unwrap()).await;
    assert_error(&refused, StatusCode::FORBIDDEN, "forbidden");
    assert!(refused.1["message"].as_str().unwrap().contains("CSRF"));
    let wrong = read(post(&[("x-csrf-token", "0000")]).await.unwrap()).await;
    assert_error(&wrong, StatusCode::FORBIDDEN, "forbidden");
    let elsewhere = read(
        post(&[("x-csrf-token", &csrf), ("origin", "https://evil.example")])
            .await
            .unwrap(),
    )
    .await;
    assert_error(&elsewhere, StatusCode::FORBIDDEN, "forbidden");
    let (_, sites) = app.get("/sites", &app.admin).await;
    assert_eq!(
        sites["total"], 0,
        "nothing was created by the refused requests"
    );
    let created = read(post(&[("x-csrf-token", &csrf)]).await.unwrap()).await;
    assert_eq!(created.0, StatusCode::CREATED, "{}", created.1);

    // A bearer token wins over a cookie: a token-authenticated call needs no CSRF token.
    let (status, _) = read(
        browser
            .request(reqwest::Method::POST, "/api/v1/sites")
            .bearer_auth(&app.admin)
            .json(&json!({"client_id": id(&client), "name": "Blog", "origins": []}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
}

#[tokio::test]
async fn a_viewers_session_reads_what_the_viewer_may_and_nothing_else() {
    let app = TestApp::spawn().await;
    let own = app.create_client("Own").await;
    let other = app.create_client("Other").await;
    let own_sensor = app.create_sensor(id(&own), "Mine").await;
    let other_sensor = app.create_sensor(id(&other), "Theirs").await;
    let email = "viewer@console.test";
    let (status, _) = app
        .post(
            "/users",
            &app.admin,
            json!({"email": email, "password": "viewer-password-1", "role": "viewer", "client_id": id(&own)}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let browser = Browser::login(&app, email, "viewer-password-1").await;

    let (status, sensors) = browser.get("/api/v1/sensors").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(sensors["items"].as_array().unwrap().len(), 1);
    assert_eq!(sensors["items"][0]["id"], own_sensor["id"]);
    let theirs = browser
        .get(&format!("/api/v1/sensors/{}", id(&other_sensor)))
        .await;
    assert_error(&theirs, StatusCode::NOT_FOUND, "not_found");
    assert_error(
        &browser.get("/api/v1/users").await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    let csrf = browser.csrf().await;
    let create = read(
        browser
            .request(reqwest::Method::POST, "/api/v1/sensors")
            .header("x-csrf-token", &csrf)
            .json(&json!({"name": "sneaky"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_error(&create, StatusCode::FORBIDDEN, "forbidden");

    // The pages follow the same rules: admin pages are 403, another tenant's sensor 404.
    for (path, status) in [
        ("/ui/admin/users", StatusCode::FORBIDDEN),
        ("/ui/admin/sensors", StatusCode::FORBIDDEN),
        ("/ui/sites", StatusCode::OK),
        ("/ui/sensors", StatusCode::OK),
    ] {
        let resp = browser
            .request(reqwest::Method::GET, path)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), status, "{path}");
    }
    let page = |sensor: &Value| format!("/ui/sensors/{}", id(sensor));
    let resp = browser
        .request(reqwest::Method::GET, &page(&other_sensor))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let resp = browser
        .request(reqwest::Method::GET, &page(&own_sensor))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let html = resp.text().await.unwrap();
    assert!(html.contains("Mine") && html.contains("America/Sao_Paulo"));
}

#[tokio::test]
async fn sessions_end_when_idle_too_long_at_their_age_limit_and_at_logout() {
    let app = TestApp::spawn().await;
    let pg = &app.db.pool;
    let set = |column: &'static str, minutes: i64, hash: Vec<u8>| async move {
        let sql = match column {
            "last_seen_at" => "UPDATE console_sessions SET last_seen_at = now() - make_interval(mins => $2) WHERE id_hash = $1",
            _ => "UPDATE console_sessions SET created_at = now() - make_interval(mins => $2) WHERE id_hash = $1",
        };
        sqlx::query(sql)
            .bind(hash)
            .bind(minutes as i32)
            .execute(pg)
            .await
            .unwrap();
    };
    let last_seen = |hash: Vec<u8>| async move {
        sqlx::query_scalar::<_, f64>(
            "SELECT extract(epoch FROM now() - last_seen_at)::float8 FROM console_sessions WHERE id_hash = $1",
        )
        .bind(hash)
        .fetch_one(pg)
        .await
        .unwrap()
    };

    // Idle (default 30 minutes): the page's polling does not keep a session alive; a
    // request of the person does.
    let browser = Browser::login(&app, ADMIN_EMAIL, ADMIN_PASSWORD).await;
    set("last_seen_at", 20, browser.hash()).await;
    let polled = browser
        .request(reqwest::Method::GET, "/api/v1/clients")
        .header("x-console-poll", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(polled.status(), StatusCode::OK);
    assert!(
        last_seen(browser.hash()).await > 19.0 * 60.0,
        "a poll is not activity"
    );
    assert_eq!(browser.get("/api/v1/clients").await.0, StatusCode::OK);
    assert!(
        last_seen(browser.hash()).await < 60.0,
        "a request is activity"
    );
    set("last_seen_at", 31, browser.hash()).await;
    assert_error(
        &browser.get("/api/v1/clients").await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    let page = browser
        .request(reqwest::Method::GET, "/ui/sensors")
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        page.headers()[header::LOCATION],
        "/ui/login?next=%2Fui%2Fsensors"
    );

    // Age (default 12 hours), however active.
    let browser = Browser::login(&app, ADMIN_EMAIL, ADMIN_PASSWORD).await;
    set("created_at", 12 * 60 + 1, browser.hash()).await;
    assert_eq!(
        browser.get("/api/v1/clients").await.0,
        StatusCode::UNAUTHORIZED
    );

    // Logout needs the session's CSRF token, and ends the session on the server.
    let browser = Browser::login(&app, ADMIN_EMAIL, ADMIN_PASSWORD).await;
    let csrf = browser.csrf().await;
    let forged = browser
        .request(reqwest::Method::POST, "/ui/logout")
        .form(&[("csrf", "forged")])
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), StatusCode::FORBIDDEN);
    assert_eq!(browser.get("/api/v1/clients").await.0, StatusCode::OK);
    let out = browser
        .request(reqwest::Method::POST, "/ui/logout")
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(out.status(), StatusCode::SEE_OTHER);
    assert!(out.headers()[header::SET_COOKIE]
        .to_str()
        .unwrap()
        .contains("Max-Age=0"));
    assert_eq!(
        browser.get("/api/v1/clients").await.0,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn a_password_change_ends_the_users_sessions_and_tls_makes_the_cookie_secure() {
    let app = TestApp::spawn().await;
    let browser = Browser::login(&app, ADMIN_EMAIL, ADMIN_PASSWORD).await;
    let (status, _) = app
        .post(
            "/auth/password",
            &app.admin,
            json!({"current_password": ADMIN_PASSWORD, "new_password": "another-password-2"}),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(
        browser.get("/api/v1/auth/me").await.0,
        StatusCode::UNAUTHORIZED
    );
    let page = browser
        .request(reqwest::Method::GET, "/ui/sensors")
        .send()
        .await
        .unwrap();
    assert_eq!(
        page.status(),
        StatusCode::SEE_OTHER,
        "back to the login page"
    );

    // Behind a TLS proxy the cookie is Secure; a login form posted from another site is
    // refused.
    let http = reqwest::Client::builder()
        .redirect(Policy::none())
        .build()
        .unwrap();
    let form = [("email", ADMIN_EMAIL), ("password", "another-password-2")];
    let resp = http
        .post(app.url("/ui/login"))
        .header("x-forwarded-proto", "https")
        .form(&form)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert!(resp.headers()[header::SET_COOKIE]
        .to_str()
        .unwrap()
        .ends_with("; Secure"));
    let resp = http
        .post(app.url("/ui/login"))
        .header("origin", "https://evil.example")
        .form(&form)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert!(resp.headers().get(header::SET_COOKIE).is_none());
}

#[tokio::test]
async fn lists_search_by_part_of_a_name_literally() {
    let app = TestApp::spawn().await;
    let cold = app.create_client("Cold Room 50%").await;
    app.create_client("Cold_Storage").await;
    app.create_client("Bakery").await;
    let names = |body: Value| -> Vec<String> {
        let mut names: Vec<String> = body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| {
                i["name"]
                    .as_str()
                    .or(i["email"].as_str())
                    .unwrap()
                    .to_owned()
            })
            .collect();
        names.sort();
        names
    };
    let (_, found) = app.get("/clients?q=cold", &app.admin).await;
    assert_eq!(found["total"], 2);
    assert_eq!(names(found), ["Cold Room 50%", "Cold_Storage"]);
    let (_, found) = app.get("/clients?q=50%25", &app.admin).await;
    assert_eq!(names(found), ["Cold Room 50%"]);
    let (_, found) = app.get("/clients?q=m_5", &app.admin).await;
    assert_eq!(names(found), Vec::<String>::new(), "_ is not a wildcard");
    let (_, found) = app.get("/clients?q=d_s", &app.admin).await;
    assert_eq!(names(found), ["Cold_Storage"], "_ is itself");
    let (_, found) = app.get("/clients?q=%20%20", &app.admin).await;
    assert_eq!(found["total"], 3, "a blank search is no search");
    // Found by the fuzzer: PostgreSQL cannot hold a NUL, so it is a 422, not a 500.
    for list in ["/clients", "/users", "/sensors", "/sites"] {
        let refused = app.get(&format!("{list}?q=a%00b"), &app.admin).await;
        assert_error(
            &refused,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
        );
        assert_eq!(refused.1["field"], "q");
    }

    app.create_sensor(id(&cold), "Freezer north").await;
    app.create_sensor(id(&cold), "Chiller").await;
    let (_, found) = app.get("/sensors?q=NORTH", &app.admin).await;
    assert_eq!(names(found), ["Freezer north"]);
    let (_, found) = app.get("/users?q=admin@", &app.admin).await;
    assert_eq!(names(found), [ADMIN_EMAIL]);
    app.post(
        "/sites",
        &app.admin,
        json!({"client_id": id(&cold), "name": "Web shop", "origins": []}),
    )
    .await;
    let (_, found) = app.get("/sites?q=shop", &app.admin).await;
    assert_eq!(names(found), ["Web shop"]);
    let (_, found) = app.get("/sites?q=nothing", &app.admin).await;
    assert_eq!(found["total"], 0);
}
