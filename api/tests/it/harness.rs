//! Starting the API for a test and talking to it.

use std::time::Duration;

use reqwest::{Method, RequestBuilder, StatusCode};
use secrecy::SecretString;
use serde_json::{json, Value};
use termopar_api::{
    settings::{AuthSettings, BootstrapAdmin},
    Application, Settings,
};
use test_support::{TestDb, TestMongo};
use uuid::Uuid;

pub const JWT_SECRET: &str = "test-secret-that-is-at-least-32-bytes-long";
pub const ADMIN_EMAIL: &str = "admin@termopar.test";
pub const ADMIN_PASSWORD: &str = "admin-password-1";
pub const MAX_BODY: usize = 256 * 1024;

/// Settings for a test app on port 0 over the given stores.
pub fn settings(db: &TestDb, mongo: &TestMongo) -> Settings {
    Settings {
        addr: "127.0.0.1:0".parse().unwrap(),
        database: db.settings(),
        mongo: mongo.settings.clone(),
        auth: AuthSettings {
            jwt_secret: SecretString::from(JWT_SECRET),
            access_ttl: Duration::from_secs(900),
            refresh_ttl: Duration::from_secs(3600),
            user_cache_ttl: Duration::from_secs(30),
        },
        bootstrap_admin: Some(BootstrapAdmin {
            email: ADMIN_EMAIL.into(),
            password: SecretString::from(ADMIN_PASSWORD),
        }),
        max_body_bytes: MAX_BODY,
        ready_broker: None,
        latest_cache_ttl: std::time::Duration::from_secs(1),
        store: termopar_core::store::Tuning::default(),
        webhook: Default::default(),
        tracking: Default::default(),
        leads: Default::default(),
        console: Default::default(),
    }
}

/// The raw records in `db`, oldest first, once there are `n` of them.
pub async fn raw_records(db: &mongodb::Database, n: usize) -> Vec<mongodb::bson::Document> {
    let events = db.collection::<mongodb::bson::Document>(termopar_chat::EVENTS);
    test_support::eventually(
        &format!("{n} raw records in MongoDB"),
        test_support::DEFAULT_DEADLINE,
        || async {
            let docs: Vec<mongodb::bson::Document> = futures::TryStreamExt::try_collect(
                events
                    .find(mongodb::bson::doc! {})
                    .sort(mongodb::bson::doc! {"_id": 1})
                    .await
                    .ok()?,
            )
            .await
            .ok()?;
            assert!(
                docs.len() <= n,
                "more raw records than deliveries: {docs:?}"
            );
            (docs.len() == n).then_some(docs)
        },
    )
    .await
}

/// How many raw webhook records `db` holds now.
pub async fn raw_count(db: &mongodb::Database) -> u64 {
    db.collection::<mongodb::bson::Document>(termopar_chat::EVENTS)
        .count_documents(mongodb::bson::doc! {})
        .await
        .unwrap()
}

/// Settings of a PostgreSQL nobody listens on, whose pool gives up after 500 ms.
pub fn dead_postgres() -> termopar_core::settings::DatabaseSettings {
    let mut dead = termopar_core::settings::DatabaseSettings::with_url(format!(
        "postgres://postgres@127.0.0.1:{}/termopar",
        test_support::free_port()
    ));
    dead.acquire_timeout = std::time::Duration::from_millis(500);
    dead
}

/// A running API and the stores behind it.
pub struct TestApp {
    pub state: termopar_api::AppState,
    pub handles: termopar_api::Handles,
    pub base: String,
    pub http: reqwest::Client,
    pub db: TestDb,
    pub _mongo: TestMongo,
    pub admin: String,
}

/// Serves `app` on the test's runtime; it stops when the test ends.
pub fn serve(app: Application) -> String {
    let base = format!("http://{}", app.addr());
    tokio::spawn(app.run_until(std::future::pending()));
    base
}

impl TestApp {
    /// Starts the API with a bootstrap admin and logs that admin in.
    pub async fn spawn() -> Self {
        Self::spawn_with(|_| {}).await
    }

    /// [`TestApp::spawn`] with settings changed by `change`.
    pub async fn spawn_with(change: impl FnOnce(&mut Settings)) -> Self {
        let db = TestDb::new().await;
        let mongo = TestMongo::new();
        let mut settings = settings(&db, &mongo);
        change(&mut settings);
        let app = Application::build(settings).await.expect("the API starts");
        let state = app.state().clone();
        let handles = app.handles().clone();
        let base = serve(app);
        let mut test = Self {
            state,
            handles,
            base,
            http: reqwest::Client::new(),
            db,
            _mongo: mongo,
            admin: String::new(),
        };
        test.admin = test.login(ADMIN_EMAIL, ADMIN_PASSWORD).await["access_token"]
            .as_str()
            .unwrap()
            .to_owned();
        test
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// A request under `/api/v1`, with a bearer token when one is given.
    pub fn request(&self, method: Method, path: &str, token: Option<&str>) -> RequestBuilder {
        let req = self
            .http
            .request(method, self.url(&format!("/api/v1{path}")));
        match token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    /// Sends a JSON request and returns status and body (JSON, or `Null` when empty).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self.request(method, path, token);
        if let Some(body) = body {
            req = req.json(&body);
        }
        read(req.send().await.expect("the API answers")).await
    }

    pub async fn get(&self, path: &str, token: &str) -> (StatusCode, Value) {
        self.call(Method::GET, path, Some(token), None).await
    }

    pub async fn post(&self, path: &str, token: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::POST, path, Some(token), Some(body)).await
    }

    pub async fn patch(&self, path: &str, token: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::PATCH, path, Some(token), Some(body))
            .await
    }

    pub async fn delete(&self, path: &str, token: &str) -> (StatusCode, Value) {
        self.call(Method::DELETE, path, Some(token), None).await
    }

    /// Logs in, asserting success; returns the token pair.
    pub async fn login(&self, email: &str, password: &str) -> Value {
        let (status, body) = self
            .call(
                Method::POST,
                "/auth/login",
                None,
                Some(json!({ "email": email, "password": password })),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "login of {email}: {body}");
        body
    }

    /// Creates a client as admin.
    pub async fn create_client(&self, name: &str) -> Value {
        let (status, body) = self
            .post(
                "/clients",
                &self.admin,
                json!({ "name": name, "timezone": "America/Sao_Paulo" }),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body
    }

    /// Creates a sensor of `client_id` as admin.
    pub async fn create_sensor(&self, client_id: &str, name: &str) -> Value {
        let (status, body) = self
            .post(
                "/sensors",
                &self.admin,
                json!({ "client_id": client_id, "name": name }),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body
    }

    /// Creates a user as admin and logs it in; returns (user, access token).
    pub async fn user_with_token(&self, role: &str, client_id: Option<&str>) -> (Value, String) {
        let email = format!("{role}-{}@termopar.test", Uuid::new_v4().simple());
        let password = "user-password-1";
        let (status, user) = self
            .post(
                "/users",
                &self.admin,
                json!({ "email": email, "password": password, "role": role, "client_id": client_id }),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{user}");
        let token = self.login(&email, password).await["access_token"]
            .as_str()
            .unwrap()
            .to_owned();
        (user, token)
    }
}

/// Status and JSON body of a response. Every response of the API that has a body must
/// be JSON: a body that is not fails the test.
/// A 200, 201 or 202 body must also be what `/openapi.json` says the operation answers.
pub async fn read(resp: reqwest::Response) -> (StatusCode, Value) {
    let status = resp.status();
    let path = resp.url().path().to_owned();
    let text = resp.text().await.expect("a readable body");
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("status {status}: body is not JSON: {text:?}"))
    };
    if [StatusCode::OK, StatusCode::CREATED, StatusCode::ACCEPTED].contains(&status) {
        crate::contract::check(&path, status.as_u16(), &body);
    }
    (status, body)
}

/// Asserts an error response: status, stable code, and a message.
#[track_caller]
pub fn assert_error(got: &(StatusCode, Value), status: StatusCode, code: &str) {
    assert_eq!(got.0, status, "body: {}", got.1);
    assert_eq!(got.1["code"], code, "body: {}", got.1);
    assert!(
        got.1["message"].as_str().is_some_and(|m| !m.is_empty()),
        "error without a message: {}",
        got.1
    );
}

pub fn id(v: &Value) -> &str {
    v["id"].as_str().expect("an id")
}

impl TestApp {
    /// Posts readings for a sensor with its device secret.
    pub async fn ingest(&self, sensor: &Value, body: Value) -> (StatusCode, Value) {
        let req = self
            .request(
                Method::POST,
                &format!("/sensors/{}/readings", id(sensor)),
                None,
            )
            .header("x-device-secret", sensor["device_secret"].as_str().unwrap())
            .json(&body);
        read(req.send().await.unwrap()).await
    }

    /// The text of `/metrics` (Prometheus).
    pub async fn metrics(&self) -> String {
        self.http
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Waits until the daily-average cache listens for changes (it is bypassed before).
    pub async fn daily_cache_live(&self) {
        test_support::eventually(
            "the daily cache listening",
            test_support::DEFAULT_DEADLINE,
            || async { self.handles.daily.is_live().then_some(()) },
        )
        .await;
    }
}

/// A reading payload.
pub fn reading_at(ts: chrono::DateTime<chrono::Utc>, temperature: f64) -> Value {
    json!({ "id": Uuid::new_v4(), "ts": ts.to_rfc3339(), "temperature": temperature })
}

impl TestApp {
    /// Posts a raw webhook body to `path` (outside /api/v1).
    pub async fn webhook_raw(
        &self,
        path: &str,
        body: Vec<u8>,
        headers: &[(&str, &str)],
    ) -> (StatusCode, Value) {
        let mut req = self
            .http
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        read(req.send().await.unwrap()).await
    }

    /// Posts an event to `/webhook/`.
    pub async fn webhook(&self, event: &Value) -> (StatusCode, Value) {
        self.webhook_raw("/webhook/", serde_json::to_vec(event).unwrap(), &[])
            .await
    }

    /// A conversation as `GET /conversations/{id}` shows it (all messages).
    pub async fn conversation(&self, id: &str) -> (StatusCode, Value) {
        read(
            self.http
                .get(self.url(&format!("/conversations/{id}?page_size=1000")))
                .bearer_auth(&self.admin)
                .send()
                .await
                .unwrap(),
        )
        .await
    }
}
