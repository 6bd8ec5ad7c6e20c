use reqwest::StatusCode;
use serde_json::json;

use crate::harness::*;

#[tokio::test]
async fn a_client_is_created_read_updated_and_deleted() {
    let app = TestApp::spawn().await;

    let (status, created) = app
        .post(
            "/clients",
            &app.admin,
            json!({"name": "  Frigorífico Sul ", "timezone": "America/Sao_Paulo"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(created["name"], "Frigorífico Sul");
    assert_eq!(created["timezone"], "America/Sao_Paulo");
    assert!(created["created_at"].is_string());
    let path = format!("/clients/{}", id(&created));

    let (status, read) = app.get(&path, &app.admin).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(read, created);

    let (status, updated) = app
        .patch(&path, &app.admin, json!({"timezone": "Asia/Kathmandu"}))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(updated["timezone"], "Asia/Kathmandu");
    assert_eq!(updated["name"], "Frigorífico Sul");

    assert_eq!(
        app.delete(&path, &app.admin).await.0,
        StatusCode::NO_CONTENT
    );
    assert_error(
        &app.get(&path, &app.admin).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_error(
        &app.delete(&path, &app.admin).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_error(
        &app.patch(&path, &app.admin, json!({"name": "x"})).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
}

#[tokio::test]
async fn invalid_clients_are_422_naming_the_field() {
    let app = TestApp::spawn().await;
    let cases = [
        (
            "unknown zone",
            json!({"name": "A", "timezone": "Mars/Olympus"}),
            "timezone",
        ),
        (
            "offset instead of zone",
            json!({"name": "A", "timezone": "+05:45"}),
            "timezone",
        ),
        (
            "blank name",
            json!({"name": "   ", "timezone": "UTC"}),
            "name",
        ),
        (
            "long name",
            json!({"name": "x".repeat(201), "timezone": "UTC"}),
            "name",
        ),
    ];
    for (what, body, field) in cases {
        let got = app.post("/clients", &app.admin, body).await;
        assert_error(&got, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
        assert_eq!(got.1["field"], field, "{what}");
    }
    let (_, page) = app.get("/clients", &app.admin).await;
    assert_eq!(page["total"], 0);
}

#[tokio::test]
async fn client_names_are_unique_regardless_of_case() {
    let app = TestApp::spawn().await;
    app.create_client("Pharma Norte").await;

    let got = app
        .post(
            "/clients",
            &app.admin,
            json!({"name": "PHARMA NORTE", "timezone": "UTC"}),
        )
        .await;
    assert_error(&got, StatusCode::CONFLICT, "conflict");

    let other = app.create_client("Other").await;
    let got = app
        .patch(
            &format!("/clients/{}", id(&other)),
            &app.admin,
            json!({"name": "pharma norte"}),
        )
        .await;
    assert_error(&got, StatusCode::CONFLICT, "conflict");
}

#[tokio::test]
async fn a_client_with_sensors_or_users_cannot_be_deleted() {
    let app = TestApp::spawn().await;
    let with_sensor = app.create_client("With sensor").await;
    app.create_sensor(id(&with_sensor), "s1").await;
    let with_user = app.create_client("With user").await;
    app.user_with_token("viewer", Some(id(&with_user))).await;

    for client in [&with_sensor, &with_user] {
        let path = format!("/clients/{}", id(client));
        assert_error(
            &app.delete(&path, &app.admin).await,
            StatusCode::CONFLICT,
            "conflict",
        );
        assert_eq!(app.get(&path, &app.admin).await.0, StatusCode::OK);
    }
}

#[tokio::test]
async fn client_lists_are_paginated_newest_first() {
    let app = TestApp::spawn().await;
    let mut names = Vec::new();
    for i in 0..7 {
        names.push(
            app.create_client(&format!("client {i}")).await["name"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    names.reverse();

    let (status, default) = app.get("/clients", &app.admin).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(default["page"], 1);
    assert_eq!(default["page_size"], 50);
    assert_eq!(default["total"], 7);

    let mut seen = Vec::new();
    for page in 1..=3 {
        let (_, body) = app
            .get(&format!("/clients?page={page}&page_size=3"), &app.admin)
            .await;
        assert_eq!(body["total"], 7);
        assert_eq!(body["page"], page);
        let items = body["items"].as_array().unwrap();
        assert_eq!(items.len(), [3, 3, 1][page as usize - 1]);
        seen.extend(items.iter().map(|c| c["name"].as_str().unwrap().to_owned()));
    }
    assert_eq!(seen, names);

    let (status, beyond) = app.get("/clients?page=99&page_size=3", &app.admin).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(beyond["items"].as_array().unwrap().len(), 0);
    assert_eq!(beyond["total"], 7);

    let (_, max) = app.get("/clients?page_size=1000", &app.admin).await;
    assert_eq!(max["items"].as_array().unwrap().len(), 7);
}

#[tokio::test]
async fn out_of_range_pagination_is_400_naming_the_parameter() {
    let app = TestApp::spawn().await;
    let cases = [
        ("page=0", "page"),
        ("page=-1", "page"),
        ("page=abc", "page"),
        ("page_size=0", "page_size"),
        ("page_size=1001", "page_size"),
        ("page_size=1.5", "page_size"),
    ];
    for (query, field) in cases {
        let got = app.get(&format!("/clients?{query}"), &app.admin).await;
        assert_error(&got, StatusCode::BAD_REQUEST, "bad_request");
        assert_eq!(got.1["field"], field, "{query}");
    }
}
