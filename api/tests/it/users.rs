use reqwest::StatusCode;
use serde_json::json;

use crate::harness::*;

#[tokio::test]
async fn a_user_is_created_read_updated_and_deleted() {
    let app = TestApp::spawn().await;
    let client = app.create_client("Acme").await;

    let (status, user) = app
        .post(
            "/users",
            &app.admin,
            json!({"email": "Op@Acme.test", "password": "password-123", "role": "operator", "client_id": id(&client)}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{user}");
    assert_eq!(user["role"], "operator");
    assert_eq!(user["client_id"], id(&client));
    assert!(user.get("password").is_none() && user.get("password_hash").is_none());
    let path = format!("/users/{}", id(&user));

    let (_, read) = app.get(&path, &app.admin).await;
    assert_eq!(read, user);

    let (status, promoted) = app
        .patch(
            &path,
            &app.admin,
            json!({"role": "admin", "client_id": null}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{promoted}");
    assert_eq!(promoted["role"], "admin");
    assert!(promoted["client_id"].is_null());

    assert_eq!(
        app.delete(&path, &app.admin).await.0,
        StatusCode::NO_CONTENT
    );
    assert_error(
        &app.get(&path, &app.admin).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
}

#[tokio::test]
async fn invalid_users_are_422_naming_the_field() {
    let app = TestApp::spawn().await;
    let client = app.create_client("Acme").await;
    let c = id(&client);
    let cases = [
        (
            "no at sign",
            json!({"email": "nobody", "password": "password-1", "role": "viewer", "client_id": c}),
            "email",
        ),
        (
            "space in email",
            json!({"email": "a b@c.d", "password": "password-1", "role": "viewer", "client_id": c}),
            "email",
        ),
        (
            "short password",
            json!({"email": "a@b.c", "password": "short", "role": "viewer", "client_id": c}),
            "password",
        ),
        (
            "admin with client",
            json!({"email": "a@b.c", "password": "password-1", "role": "admin", "client_id": c}),
            "client_id",
        ),
        (
            "viewer without client",
            json!({"email": "a@b.c", "password": "password-1", "role": "viewer"}),
            "client_id",
        ),
        (
            "unknown client",
            json!({"email": "a@b.c", "password": "password-1", "role": "viewer", "client_id": uuid::Uuid::new_v4()}),
            "client_id",
        ),
    ];
    for (what, body, field) in cases {
        let got = app.post("/users", &app.admin, body).await;
        assert_error(&got, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
        assert_eq!(got.1["field"], field, "{what}");
    }
    let unknown_role = app
        .post(
            "/users",
            &app.admin,
            json!({"email": "a@b.c", "password": "password-1", "role": "root"}),
        )
        .await;
    assert_error(&unknown_role, StatusCode::BAD_REQUEST, "bad_request");
    let (_, page) = app.get("/users", &app.admin).await;
    assert_eq!(page["total"], 1, "only the bootstrap admin");
}

#[tokio::test]
async fn emails_are_unique_regardless_of_case() {
    let app = TestApp::spawn().await;
    let got = app
        .post(
            "/users",
            &app.admin,
            json!({"email": ADMIN_EMAIL.to_uppercase(), "password": "password-1", "role": "admin"}),
        )
        .await;
    assert_error(&got, StatusCode::CONFLICT, "conflict");
}

#[tokio::test]
async fn the_last_admin_cannot_be_deleted_or_demoted() {
    let app = TestApp::spawn().await;
    let client = app.create_client("Acme").await;
    let (_, me) = app.get("/auth/me", &app.admin).await;
    let path = format!("/users/{}", id(&me));

    assert_error(
        &app.delete(&path, &app.admin).await,
        StatusCode::CONFLICT,
        "conflict",
    );
    assert_error(
        &app.patch(
            &path,
            &app.admin,
            json!({"role": "operator", "client_id": id(&client)}),
        )
        .await,
        StatusCode::CONFLICT,
        "conflict",
    );

    // With a second admin, the first may go.
    let (second, second_token) = app.user_with_token("admin", None).await;
    assert_eq!(
        app.delete(&path, &second_token).await.0,
        StatusCode::NO_CONTENT
    );
    assert_error(
        &app.delete(&format!("/users/{}", id(&second)), &second_token)
            .await,
        StatusCode::CONFLICT,
        "conflict",
    );
}

#[tokio::test]
async fn user_lists_filter_by_client_and_role() {
    let app = TestApp::spawn().await;
    let a = app.create_client("A").await;
    let b = app.create_client("B").await;
    app.user_with_token("operator", Some(id(&a))).await;
    app.user_with_token("viewer", Some(id(&a))).await;
    app.user_with_token("viewer", Some(id(&b))).await;

    let (_, all) = app.get("/users", &app.admin).await;
    assert_eq!(all["total"], 4);
    let (_, of_a) = app
        .get(&format!("/users?client_id={}", id(&a)), &app.admin)
        .await;
    assert_eq!(of_a["total"], 2);
    let (_, viewers) = app.get("/users?role=viewer", &app.admin).await;
    assert_eq!(viewers["total"], 2);
    let (_, viewers_of_b) = app
        .get(
            &format!("/users?role=viewer&client_id={}", id(&b)),
            &app.admin,
        )
        .await;
    assert_eq!(viewers_of_b["total"], 1);
}
