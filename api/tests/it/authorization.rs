//! Who may do what: bad tokens of every kind, and every route of one tenant tried with
//! the other tenant's credentials.

use chrono::Utc;
use jsonwebtoken::{encode, EncodingKey, Header};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::harness::*;

fn token_signed_with(secret: &str, sub: Uuid, exp_offset_secs: i64) -> String {
    let now = Utc::now().timestamp();
    encode(
        &Header::default(),
        &json!({
            "sub": sub, "typ": "access", "ver": 0, "jti": Uuid::new_v4(),
            "iat": now, "exp": now + exp_offset_secs,
        }),
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

#[tokio::test]
async fn bad_credentials_of_every_kind_get_401_json() {
    let app = TestApp::spawn().await;
    let (me_status, me) = app.get("/auth/me", &app.admin).await;
    assert_eq!(me_status, StatusCode::OK);
    let admin_id: Uuid = me["id"].as_str().unwrap().parse().unwrap();

    let expired = token_signed_with(JWT_SECRET, admin_id, -3600);
    let foreign = token_signed_with("another-secret-that-is-32-bytes-long!!", admin_id, 600);
    let unknown_user = token_signed_with(JWT_SECRET, Uuid::new_v4(), 600);
    let cases: Vec<(&str, Option<String>)> = vec![
        ("no header", None),
        ("expired token", Some(format!("Bearer {expired}"))),
        (
            "signed with another secret",
            Some(format!("Bearer {foreign}")),
        ),
        (
            "user that does not exist",
            Some(format!("Bearer {unknown_user}")),
        ),
        ("not a JWT", Some("Bearer not-a-jwt".into())),
        ("empty bearer", Some("Bearer ".into())),
        ("basic scheme", Some("Basic YWRtaW46YWRtaW4=".into())),
        ("token without scheme", Some(app.admin.clone())),
        ("tampered payload", Some(format!("Bearer {}x", app.admin))),
    ];
    for path in ["/auth/me", "/clients", "/sensors", "/users"] {
        for (what, header) in &cases {
            let mut req = app.http.get(app.url(&format!("/api/v1{path}")));
            if let Some(h) = header {
                req = req.header("authorization", h);
            }
            let got = read(req.send().await.unwrap()).await;
            assert_eq!(
                got.0,
                StatusCode::UNAUTHORIZED,
                "{what} on {path}: {}",
                got.1
            );
            assert_eq!(got.1["code"], "unauthorized", "{what} on {path}");
        }
    }
}

/// Two tenants, each with a sensor, an operator and a viewer.
struct Tenants {
    b_client: Value,
    b_sensor: Value,
    b_user: Value,
    a_operator: String,
    a_viewer: String,
}

async fn two_tenants(app: &TestApp) -> Tenants {
    let a = app.create_client("Tenant A").await;
    let b = app.create_client("Tenant B").await;
    app.create_sensor(id(&a), "a-freezer").await;
    let b_sensor = app.create_sensor(id(&b), "b-freezer").await;
    let (_, a_operator) = app.user_with_token("operator", Some(id(&a))).await;
    let (_, a_viewer) = app.user_with_token("viewer", Some(id(&a))).await;
    let (b_user, _) = app.user_with_token("operator", Some(id(&b))).await;
    Tenants {
        b_client: b,
        b_sensor,
        b_user,
        a_operator,
        a_viewer,
    }
}

type RouteCase = (Method, String, Option<Value>, StatusCode, StatusCode);

#[tokio::test]
async fn a_tenant_never_sees_or_touches_another_tenants_data() {
    let app = TestApp::spawn().await;
    let t = two_tenants(&app).await;
    let b = id(&t.b_client);
    let bs = id(&t.b_sensor);
    let bu = id(&t.b_user);
    // (method, path, body, expected status for A's operator, for A's viewer)
    let routes: Vec<RouteCase> = vec![
        (
            Method::GET,
            format!("/clients/{b}"),
            None,
            StatusCode::NOT_FOUND,
            StatusCode::NOT_FOUND,
        ),
        (
            Method::PATCH,
            format!("/clients/{b}"),
            Some(json!({"name": "x"})),
            StatusCode::FORBIDDEN,
            StatusCode::FORBIDDEN,
        ),
        (
            Method::DELETE,
            format!("/clients/{b}"),
            None,
            StatusCode::FORBIDDEN,
            StatusCode::FORBIDDEN,
        ),
        (
            Method::GET,
            format!("/sensors/{bs}"),
            None,
            StatusCode::NOT_FOUND,
            StatusCode::NOT_FOUND,
        ),
        (
            Method::PATCH,
            format!("/sensors/{bs}"),
            Some(json!({"name": "x"})),
            StatusCode::NOT_FOUND,
            StatusCode::NOT_FOUND,
        ),
        (
            Method::DELETE,
            format!("/sensors/{bs}"),
            None,
            StatusCode::NOT_FOUND,
            StatusCode::NOT_FOUND,
        ),
        (
            Method::POST,
            format!("/sensors/{bs}/secret"),
            None,
            StatusCode::NOT_FOUND,
            StatusCode::NOT_FOUND,
        ),
        (
            Method::POST,
            "/sensors".into(),
            Some(json!({"client_id": b, "name": "intruder"})),
            StatusCode::UNPROCESSABLE_ENTITY,
            StatusCode::FORBIDDEN,
        ),
        (
            Method::GET,
            format!("/users/{bu}"),
            None,
            StatusCode::FORBIDDEN,
            StatusCode::FORBIDDEN,
        ),
        (
            Method::PATCH,
            format!("/users/{bu}"),
            Some(json!({"role": "viewer"})),
            StatusCode::FORBIDDEN,
            StatusCode::FORBIDDEN,
        ),
        (
            Method::DELETE,
            format!("/users/{bu}"),
            None,
            StatusCode::FORBIDDEN,
            StatusCode::FORBIDDEN,
        ),
        (
            Method::GET,
            "/users".into(),
            None,
            StatusCode::FORBIDDEN,
            StatusCode::FORBIDDEN,
        ),
        (
            Method::POST,
            "/users".into(),
            Some(
                json!({"email": "x@y.z", "password": "password-1", "role": "operator", "client_id": b}),
            ),
            StatusCode::FORBIDDEN,
            StatusCode::FORBIDDEN,
        ),
        (
            Method::POST,
            "/clients".into(),
            Some(json!({"name": "Mine", "timezone": "UTC"})),
            StatusCode::FORBIDDEN,
            StatusCode::FORBIDDEN,
        ),
    ];
    let secrets = [b, bs, bu, "b-freezer", "Tenant B"];
    for (who, token, pick) in [("operator", &t.a_operator, 0), ("viewer", &t.a_viewer, 1)] {
        for (method, path, body, for_operator, for_viewer) in &routes {
            let expected = if pick == 0 {
                *for_operator
            } else {
                *for_viewer
            };
            let got = app
                .call(method.clone(), path, Some(token), body.clone())
                .await;
            assert_eq!(got.0, expected, "A's {who}: {method} {path}: {}", got.1);
            assert!(
                got.1["code"].is_string(),
                "A's {who}: {method} {path}: {}",
                got.1
            );
            let text = got.1.to_string();
            for secret in secrets {
                assert!(
                    !text.contains(secret),
                    "A's {who}: {method} {path} leaked {secret}: {text}"
                );
            }
        }
        // Lists show only A's data.
        for path in ["/clients", "/sensors", &format!("/sensors?client_id={b}")] {
            let (status, page) = app.get(path, token).await;
            assert_eq!(status, StatusCode::OK);
            let text = page.to_string();
            for secret in secrets {
                assert!(
                    !text.contains(secret),
                    "A's {who}: GET {path} leaked {secret}"
                );
            }
        }
    }
    // B's data is untouched.
    let (status, sensor) = app.get(&format!("/sensors/{bs}"), &app.admin).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(sensor["name"], "b-freezer");
    let (status, client) = app.get(&format!("/clients/{b}"), &app.admin).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(client["name"], "Tenant B");
    let (status, user) = app.get(&format!("/users/{bu}"), &app.admin).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(user["role"], "operator");
}

#[tokio::test]
async fn viewers_read_their_client_but_change_nothing() {
    let app = TestApp::spawn().await;
    let a = app.create_client("Tenant A").await;
    let sensor = app.create_sensor(id(&a), "freezer").await;
    let (_, viewer) = app.user_with_token("viewer", Some(id(&a))).await;
    let s = id(&sensor);

    assert_eq!(
        app.get(&format!("/clients/{}", id(&a)), &viewer).await.0,
        StatusCode::OK
    );
    assert_eq!(
        app.get(&format!("/sensors/{s}"), &viewer).await.0,
        StatusCode::OK
    );
    let (status, page) = app.get("/sensors", &viewer).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page["total"], 1);

    let writes = [
        (
            Method::POST,
            "/sensors".to_owned(),
            Some(json!({"name": "new"})),
        ),
        (
            Method::PATCH,
            format!("/sensors/{s}"),
            Some(json!({"name": "renamed"})),
        ),
        (Method::DELETE, format!("/sensors/{s}"), None),
        (Method::POST, format!("/sensors/{s}/secret"), None),
    ];
    for (method, path, body) in writes {
        let got = app.call(method.clone(), &path, Some(&viewer), body).await;
        assert_error(&got, StatusCode::FORBIDDEN, "forbidden");
    }
    let (_, after) = app.get(&format!("/sensors/{s}"), &app.admin).await;
    assert_eq!(after["name"], "freezer");
}

#[tokio::test]
async fn operators_manage_their_own_clients_sensors() {
    let app = TestApp::spawn().await;
    let a = app.create_client("Tenant A").await;
    let (_, operator) = app.user_with_token("operator", Some(id(&a))).await;

    let (status, created) = app
        .post("/sensors", &operator, json!({"name": "probe"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["client_id"], id(&a));
    let s = id(&created);
    let (status, patched) = app
        .patch(
            &format!("/sensors/{s}"),
            &operator,
            json!({"location": "dock 3"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(patched["location"], "dock 3");
    assert_eq!(
        app.post(&format!("/sensors/{s}/secret"), &operator, json!({}))
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        app.delete(&format!("/sensors/{s}"), &operator).await.0,
        StatusCode::NO_CONTENT
    );
}
