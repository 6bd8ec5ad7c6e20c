//! Health, readiness, metrics, documentation, and behaviour with storage down.

use reqwest::StatusCode;
use termopar_api::Application;
use termopar_core::settings::MongoSettings;
use test_support::{free_port, TestDb, TestMongo};

use crate::harness::*;

#[tokio::test]
async fn health_and_ready_answer_when_the_stores_are_up() {
    let app = TestApp::spawn().await;

    let health = read(app.http.get(app.url("/health")).send().await.unwrap()).await;
    assert_eq!(health.0, StatusCode::OK);
    let ready = read(app.http.get(app.url("/ready")).send().await.unwrap()).await;
    assert_eq!(ready.0, StatusCode::OK, "{}", ready.1);
    assert_eq!(ready.1["checks"]["postgres"], "ok");
    assert_eq!(ready.1["checks"]["mongodb"], "ok");
}

#[tokio::test]
async fn the_ferretdb_service_answers_a_ping_through_the_mongodb_driver() {
    let mongo = TestMongo::new();
    let db = mongo.database().await;
    termopar_core::mongo::ping(&db)
        .await
        .expect("FerretDB answers ping");
}

#[tokio::test]
async fn storage_down_is_503_for_the_api_and_the_readiness_probe() {
    let db = TestDb::new().await;
    let mongo = TestMongo::new();
    let mut settings = settings(&db, &mongo);
    // Nothing listens on these ports.
    let dead_pg = dead_postgres();
    settings.database = dead_pg.clone();
    settings.mongo = MongoSettings {
        uri: format!(
            "mongodb://127.0.0.1:{}/?serverSelectionTimeoutMS=500",
            free_port()
        ),
        database: "termopar".into(),
    };
    let pg = termopar_core::db::connect_lazy(&dead_pg).unwrap();
    let mongo_db = termopar_core::mongo::connect(&settings.mongo)
        .await
        .unwrap();
    let app = Application::with_stores(&settings, pg, mongo_db).unwrap();
    let base = serve(app);
    let http = reqwest::Client::new();

    let ready = read(http.get(format!("{base}/ready")).send().await.unwrap()).await;
    assert_eq!(ready.0, StatusCode::SERVICE_UNAVAILABLE);
    assert_ne!(ready.1["checks"]["postgres"], "ok");
    assert_ne!(ready.1["checks"]["mongodb"], "ok");
    assert_eq!(
        read(http.get(format!("{base}/health")).send().await.unwrap())
            .await
            .0,
        StatusCode::OK
    );

    let login = read(
        http.post(format!("{base}/api/v1/auth/login"))
            .json(&serde_json::json!({"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_error(
        &login,
        StatusCode::SERVICE_UNAVAILABLE,
        "storage_unavailable",
    );

    // A well-signed token still needs the user's current state: 503, not 401 or 500.
    let token = termopar_web::tokens::Jwt::new(&settings.auth).issue(
        termopar_web::tokens::TokenType::Access,
        uuid::Uuid::new_v4(),
        0,
        uuid::Uuid::new_v4(),
    );
    let clients = read(
        http.get(format!("{base}/api/v1/clients"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_error(
        &clients,
        StatusCode::SERVICE_UNAVAILABLE,
        "storage_unavailable",
    );
}

#[tokio::test]
async fn the_openapi_document_is_served_and_documents_every_status() {
    let app = TestApp::spawn().await;

    let (status, spec) = read(app.http.get(app.url("/openapi.json")).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(spec["servers"][0]["url"], "/api/v1");
    let paths = spec["paths"].as_object().unwrap();
    for path in [
        "/auth/login",
        "/auth/refresh",
        "/users",
        "/users/{id}",
        "/clients",
        "/clients/{id}",
        "/sensors",
        "/sensors/{id}",
        "/sensors/{id}/secret",
    ] {
        assert!(paths.contains_key(path), "{path} missing from the spec");
    }
    for (path, ops) in paths {
        for (method, op) in ops.as_object().unwrap() {
            let responses = op["responses"].as_object().unwrap();
            for status in ["400", "401", "404", "422", "503"] {
                assert!(
                    responses.contains_key(status),
                    "{method} {path} does not document {status}"
                );
            }
            assert!(
                responses.keys().any(|s| s.starts_with('2')),
                "{method} {path} has no success"
            );
        }
    }
    let error_schema = &spec["components"]["schemas"]["ErrorBody"];
    assert_eq!(
        error_schema["required"],
        serde_json::json!(["code", "message"])
    );

    for ui in ["/docs", "/redoc"] {
        let resp = app.http.get(app.url(ui)).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{ui}");
        let html = resp.text().await.unwrap();
        assert!(html.contains("<html") || html.contains("<!DOCTYPE"), "{ui}");
    }
}

#[tokio::test]
async fn metrics_count_requests_per_operation() {
    let app = TestApp::spawn().await;
    app.get("/clients", &app.admin).await;

    let text = app.metrics().await;
    let line = text
        .lines()
        .find(|l| {
            l.starts_with("http_requests_total")
                && l.contains("operation=\"listClients\"")
                && l.contains("status=\"200\"")
        })
        .unwrap_or_else(|| panic!("no counter for the list operation in:\n{text}"));
    let count: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(count >= 1.0);
}

#[tokio::test]
async fn the_openapi_document_says_what_may_be_null_and_what_the_handlers_check() {
    let app = TestApp::spawn().await;
    let (status, spec) = read(app.http.get(app.url("/openapi.json")).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    let schemas = &spec["components"]["schemas"];
    for (schema, property) in [
        ("Sensor", "location"),
        ("User", "client_id"),
        ("Conversation", "closed_at"),
    ] {
        assert_eq!(
            schemas[schema]["properties"][property]["nullable"], true,
            "{schema}.{property}: {}",
            schemas[schema]["properties"][property]
        );
    }
    // Required properties never are.
    assert!(schemas["Sensor"]["properties"]["name"]["nullable"].is_null());
    let name = &schemas["NewClient"]["properties"]["name"];
    assert_eq!(
        (name["minLength"].as_u64(), name["maxLength"].as_u64()),
        (Some(1), Some(200))
    );
    let password = &schemas["NewUser"]["properties"]["password"];
    assert_eq!(
        (
            password["minLength"].as_u64(),
            password["maxLength"].as_u64()
        ),
        (Some(8), Some(256))
    );
    // And the handlers keep answering 422 naming the field, not poem's 400.
    let (status, body) = app
        .post(
            "/clients",
            &app.admin,
            serde_json::json!({"name": "x".repeat(201), "timezone": "UTC"}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["field"], "name");
}
