use reqwest::StatusCode;
use serde_json::json;

use crate::harness::*;

#[tokio::test]
async fn creating_a_sensor_returns_its_secret_once() {
    let app = TestApp::spawn().await;
    let client = app.create_client("Acme").await;

    let (status, created) = app
        .post(
            "/sensors",
            &app.admin,
            json!({
                "client_id": id(&client), "name": "freezer-1", "location": "dock 2",
                "metadata": {"model": "DS18B20", "floor": 1}
            }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["client_id"], id(&client));
    assert_eq!(created["unit"], "celsius");
    assert_eq!(created["metadata"]["model"], "DS18B20");
    let secret = created["device_secret"].as_str().unwrap();
    assert_eq!(secret.len(), 48);

    let stored: Vec<u8> = sqlx::query_scalar("SELECT secret_hash FROM sensors WHERE id = $1::uuid")
        .bind(id(&created))
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert!(termopar_core::secrets::verify(secret, &stored));
    assert!(!String::from_utf8_lossy(&stored).contains(secret));

    let (_, read) = app
        .get(&format!("/sensors/{}", id(&created)), &app.admin)
        .await;
    assert!(read.get("device_secret").is_none());
    assert!(!read.to_string().contains(secret));
    let (_, list) = app.get("/sensors", &app.admin).await;
    assert!(!list.to_string().contains(secret));
}

#[tokio::test]
async fn rotating_the_secret_replaces_the_old_one() {
    let app = TestApp::spawn().await;
    let client = app.create_client("Acme").await;
    let sensor = app.create_sensor(id(&client), "s").await;
    let old = sensor["device_secret"].as_str().unwrap();

    let (status, rotated) = app
        .post(
            &format!("/sensors/{}/secret", id(&sensor)),
            &app.admin,
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let new = rotated["device_secret"].as_str().unwrap();
    assert_ne!(new, old);
    let stored: Vec<u8> = sqlx::query_scalar("SELECT secret_hash FROM sensors WHERE id = $1::uuid")
        .bind(id(&sensor))
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert!(termopar_core::secrets::verify(new, &stored));
    assert!(!termopar_core::secrets::verify(old, &stored));
}

#[tokio::test]
async fn sensor_patch_changes_only_what_it_names() {
    let app = TestApp::spawn().await;
    let client = app.create_client("Acme").await;
    let (_, sensor) = app
        .post(
            "/sensors",
            &app.admin,
            json!({"client_id": id(&client), "name": "s", "location": "dock", "unit": "celsius"}),
        )
        .await;
    let path = format!("/sensors/{}", id(&sensor));

    let (_, renamed) = app.patch(&path, &app.admin, json!({"name": "s2"})).await;
    assert_eq!(renamed["name"], "s2");
    assert_eq!(renamed["location"], "dock");

    let (_, cleared) = app
        .patch(&path, &app.admin, json!({"location": null}))
        .await;
    assert!(cleared["location"].is_null());
    assert_eq!(cleared["name"], "s2");

    let (_, meta) = app
        .patch(
            &path,
            &app.admin,
            json!({"metadata": {"calibrated": "2026-01-01"}}),
        )
        .await;
    assert_eq!(meta["metadata"], json!({"calibrated": "2026-01-01"}));
    assert_ne!(meta["updated_at"], sensor["updated_at"]);
    assert_eq!(meta["created_at"], sensor["created_at"]);
}

#[tokio::test]
async fn invalid_sensors_are_422_naming_the_field() {
    let app = TestApp::spawn().await;
    let client = app.create_client("Acme").await;
    let c = id(&client);
    let cases = [
        ("admin without client", json!({"name": "s"}), "client_id"),
        (
            "unknown client",
            json!({"client_id": uuid::Uuid::new_v4(), "name": "s"}),
            "client_id",
        ),
        ("blank name", json!({"client_id": c, "name": " "}), "name"),
        (
            "metadata not an object",
            json!({"client_id": c, "name": "s", "metadata": [1, 2]}),
            "metadata",
        ),
        (
            "metadata too big",
            json!({"client_id": c, "name": "s", "metadata": {"x": "y".repeat(20_000)}}),
            "metadata",
        ),
        (
            "long location",
            json!({"client_id": c, "name": "s", "location": "l".repeat(501)}),
            "location",
        ),
        (
            "blank unit",
            json!({"client_id": c, "name": "s", "unit": ""}),
            "unit",
        ),
    ];
    for (what, body, field) in cases {
        let got = app.post("/sensors", &app.admin, body).await;
        assert_error(&got, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
        assert_eq!(got.1["field"], field, "{what}");
    }
    let (_, page) = app.get("/sensors", &app.admin).await;
    assert_eq!(page["total"], 0);
}

#[tokio::test]
async fn sensor_names_are_unique_within_a_client_only() {
    let app = TestApp::spawn().await;
    let a = app.create_client("A").await;
    let b = app.create_client("B").await;
    app.create_sensor(id(&a), "Freezer").await;

    let dup = app
        .post(
            "/sensors",
            &app.admin,
            json!({"client_id": id(&a), "name": "freezer"}),
        )
        .await;
    assert_error(&dup, StatusCode::CONFLICT, "conflict");
    app.create_sensor(id(&b), "Freezer").await;
}

#[tokio::test]
async fn sensor_lists_filter_by_client_and_paginate() {
    let app = TestApp::spawn().await;
    let a = app.create_client("A").await;
    let b = app.create_client("B").await;
    for i in 0..5 {
        app.create_sensor(id(&a), &format!("a{i}")).await;
    }
    app.create_sensor(id(&b), "b0").await;

    let (_, all) = app.get("/sensors", &app.admin).await;
    assert_eq!(all["total"], 6);
    let (_, only_a) = app
        .get(
            &format!("/sensors?client_id={}&page=2&page_size=2", id(&a)),
            &app.admin,
        )
        .await;
    assert_eq!(only_a["total"], 5);
    let names: Vec<_> = only_a["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].clone())
        .collect();
    assert_eq!(names, vec![json!("a2"), json!("a1")]);
}

#[tokio::test]
async fn a_deleted_sensor_is_gone() {
    let app = TestApp::spawn().await;
    let client = app.create_client("Acme").await;
    let sensor = app.create_sensor(id(&client), "s").await;
    let path = format!("/sensors/{}", id(&sensor));

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
}
