//! Bad input of every kind is a 4xx JSON error, and never changes what is stored.

use reqwest::{Method, StatusCode};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::*;

async fn raw_post(
    app: &TestApp,
    path: &str,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> (StatusCode, serde_json::Value) {
    let mut req = app.request(Method::POST, path, Some(&app.admin)).body(body);
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    read(req.send().await.unwrap()).await
}

type BodyCase = (
    &'static str,
    Option<&'static str>,
    Vec<u8>,
    StatusCode,
    &'static str,
);

#[tokio::test]
async fn malformed_bodies_are_400_or_415_and_store_nothing() {
    let app = TestApp::spawn().await;
    let json_ct = Some("application/json");
    // (what, content type, body, expected status, expected code)
    let cases: Vec<BodyCase> = vec![
        (
            "truncated JSON",
            json_ct,
            b"{\"name\": \"x\", ".to_vec(),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "not JSON",
            json_ct,
            b"name=x".to_vec(),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "binary garbage",
            json_ct,
            vec![0xff, 0xfe, 0x00, 0x13, 0x37],
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "empty body",
            json_ct,
            vec![],
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "array instead of object",
            json_ct,
            b"[1,2]".to_vec(),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "missing field",
            json_ct,
            br#"{"name": "x"}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "wrong type",
            json_ct,
            br#"{"name": ["x"], "timezone": "UTC"}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "null name",
            json_ct,
            br#"{"name": null, "timezone": "UTC"}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "text/plain",
            Some("text/plain"),
            br#"{"name": "x", "timezone": "UTC"}"#.to_vec(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            "form",
            Some("application/x-www-form-urlencoded"),
            b"name=x&timezone=UTC".to_vec(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            "no content type",
            None,
            br#"{"name": "x", "timezone": "UTC"}"#.to_vec(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
    ];
    for (what, ct, body, status, code) in cases {
        let got = raw_post(&app, "/clients", ct, body).await;
        assert_eq!(got.0, status, "{what}: {}", got.1);
        assert_eq!(got.1["code"], code, "{what}");
    }
    let (_, page) = app.get("/clients", &app.admin).await;
    assert_eq!(page["total"], 0);
}

#[tokio::test]
async fn bodies_over_the_limit_are_413_with_or_without_content_length() {
    let app = TestApp::spawn().await;
    let big = json!({"name": "x".repeat(MAX_BODY), "timezone": "UTC"}).to_string();

    let got = raw_post(
        &app,
        "/clients",
        Some("application/json"),
        big.clone().into_bytes(),
    )
    .await;
    assert_error(&got, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");

    // Chunked, so the server cannot know the size up front.
    let addr = app.base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut request = format!(
        "POST /api/v1/clients HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {}\r\n\
         content-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n",
        app.admin
    )
    .into_bytes();
    for chunk in big.as_bytes().chunks(8192) {
        request.extend(format!("{:x}\r\n", chunk.len()).as_bytes());
        request.extend(chunk);
        request.extend(b"\r\n");
    }
    request.extend(b"0\r\n\r\n");
    // The server may answer and close before it has read everything we send.
    let _ = stream.write_all(&request).await;
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response).await;
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    assert!(response.contains("\"payload_too_large\""), "{response}");

    let (_, page) = app.get("/clients", &app.admin).await;
    assert_eq!(page["total"], 0);
}

#[tokio::test]
async fn bad_ids_in_paths_are_400_naming_the_parameter() {
    let app = TestApp::spawn().await;
    for path in [
        "/clients/not-a-uuid",
        "/sensors/123",
        "/users/%00",
        "/sensors/zzzzzzzz-zzzz-zzzz-zzzz-zzzzzzzzzzzz/secret",
    ] {
        let method = if path.ends_with("secret") {
            Method::POST
        } else {
            Method::GET
        };
        let got = app.call(method, path, Some(&app.admin), None).await;
        assert_error(&got, StatusCode::BAD_REQUEST, "bad_request");
        assert_eq!(got.1["field"], "path", "{path}");
    }
}

#[tokio::test]
async fn unknown_routes_and_methods_are_json_errors() {
    let app = TestApp::spawn().await;
    let got = read(app.http.get(app.url("/nope")).send().await.unwrap()).await;
    assert_error(&got, StatusCode::NOT_FOUND, "not_found");
    let got = app
        .call(Method::GET, "/nothing-here", Some(&app.admin), None)
        .await;
    assert_error(&got, StatusCode::NOT_FOUND, "not_found");
    let got = app
        .call(Method::PUT, "/clients", Some(&app.admin), Some(json!({})))
        .await;
    assert_error(&got, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
}

#[tokio::test]
async fn no_body_on_any_write_route_gets_a_server_error() {
    let app = TestApp::spawn().await;
    let client = app.create_client("Acme").await;
    let sensor = app.create_sensor(id(&client), "s").await;
    let (user, _) = app.user_with_token("viewer", Some(id(&client))).await;
    let routes = [
        (Method::POST, "/auth/login".to_owned()),
        (Method::POST, "/auth/refresh".to_owned()),
        (Method::POST, "/auth/logout".to_owned()),
        (Method::POST, "/auth/password".to_owned()),
        (Method::POST, "/clients".to_owned()),
        (Method::PATCH, format!("/clients/{}", id(&client))),
        (Method::POST, "/sensors".to_owned()),
        (Method::PATCH, format!("/sensors/{}", id(&sensor))),
        (Method::POST, "/users".to_owned()),
        (Method::PATCH, format!("/users/{}", id(&user))),
    ];
    let bodies = [
        json!(null),
        json!(1e308),
        json!("string"),
        json!({}),
        json!({"name": {"nested": true}}),
        json!({"email": 1, "password": []}),
        json!({"name": "\u{0000}", "timezone": "\u{0000}"}),
        json!({"client_id": "not-a-uuid", "name": "x"}),
        json!({"role": "superuser"}),
        json!({"refresh_token": "a.b.c"}),
        json!({"metadata": {"deep": [[[[[[[[[[[[1]]]]]]]]]]]]}, "name": "x"}),
        json!({"name": "x".repeat(60_000)}),
    ];
    for (method, path) in &routes {
        for body in &bodies {
            let got = app
                .call(method.clone(), path, Some(&app.admin), Some(body.clone()))
                .await;
            assert!(
                got.0.is_client_error() || got.0.is_success(),
                "{method} {path} {body}: {} {}",
                got.0,
                got.1
            );
            if got.0.is_client_error() {
                assert!(got.1["code"].is_string(), "{method} {path}: {}", got.1);
            }
        }
    }
    // The fixtures survived.
    assert_eq!(
        app.get(&format!("/sensors/{}", id(&sensor)), &app.admin)
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        app.get(&format!("/users/{}", id(&user)), &app.admin)
            .await
            .0,
        StatusCode::OK
    );
}
