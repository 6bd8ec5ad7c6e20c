use reqwest::{Method, StatusCode};
use serde_json::json;
use termopar_api::Application;

use crate::harness::*;

#[tokio::test]
async fn login_returns_the_token_pair_of_the_contract() {
    let app = TestApp::spawn().await;

    let body = app.login(ADMIN_EMAIL, ADMIN_PASSWORD).await;

    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 900);
    assert!(body["access_token"].as_str().unwrap().split('.').count() == 3);
    assert!(body["refresh_token"].as_str().unwrap().split('.').count() == 3);
    let (status, me) = app
        .get("/auth/me", body["access_token"].as_str().unwrap())
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(me["email"], ADMIN_EMAIL);
    assert_eq!(me["role"], "admin");
    assert!(me.get("password_hash").is_none() && me.get("password").is_none());
}

#[tokio::test]
async fn login_ignores_the_case_of_the_email() {
    let app = TestApp::spawn().await;
    app.login(&ADMIN_EMAIL.to_uppercase(), ADMIN_PASSWORD).await;
}

#[tokio::test]
async fn wrong_password_and_unknown_email_get_the_same_401() {
    let app = TestApp::spawn().await;
    let cases = [
        ("wrong password", ADMIN_EMAIL, "not-the-password"),
        ("unknown email", "nobody@termopar.test", ADMIN_PASSWORD),
        ("empty password", ADMIN_EMAIL, ""),
    ];
    for (what, email, password) in cases {
        let got = app
            .call(
                Method::POST,
                "/auth/login",
                None,
                Some(json!({ "email": email, "password": password })),
            )
            .await;
        assert_error(&got, StatusCode::UNAUTHORIZED, "unauthorized");
        assert_eq!(got.1["message"], "invalid email or password", "{what}");
    }
}

async fn refresh(app: &TestApp, token: &str) -> (StatusCode, serde_json::Value) {
    app.call(
        Method::POST,
        "/auth/refresh",
        None,
        Some(json!({ "refresh_token": token })),
    )
    .await
}

#[tokio::test]
async fn refresh_rotates_the_pair_and_the_used_token_stops_working() {
    let app = TestApp::spawn().await;
    let first = app.login(ADMIN_EMAIL, ADMIN_PASSWORD).await;
    let first_refresh = first["refresh_token"].as_str().unwrap();

    let (status, second) = refresh(&app, first_refresh).await;
    assert_eq!(status, StatusCode::OK, "{second}");
    let second_refresh = second["refresh_token"].as_str().unwrap();
    assert_ne!(second_refresh, first_refresh);
    assert_eq!(
        app.get("/auth/me", second["access_token"].as_str().unwrap())
            .await
            .0,
        StatusCode::OK
    );

    // Reusing the first token is treated as theft: it fails and so does the second.
    assert_error(
        &refresh(&app, first_refresh).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    assert_error(
        &refresh(&app, second_refresh).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
}

#[tokio::test]
async fn logout_revokes_the_refresh_token_and_all_revokes_every_session() {
    let app = TestApp::spawn().await;
    let a = app.login(ADMIN_EMAIL, ADMIN_PASSWORD).await;
    let b = app.login(ADMIN_EMAIL, ADMIN_PASSWORD).await;
    let c = app.login(ADMIN_EMAIL, ADMIN_PASSWORD).await;

    let logout = |token: &str, all: bool| {
        app.call(
            Method::POST,
            "/auth/logout",
            None,
            Some(json!({ "refresh_token": token, "all": all })),
        )
    };
    assert_eq!(
        logout(a["refresh_token"].as_str().unwrap(), false).await.0,
        StatusCode::NO_CONTENT
    );
    // Idempotent.
    assert_eq!(
        logout(a["refresh_token"].as_str().unwrap(), false).await.0,
        StatusCode::NO_CONTENT
    );
    assert_error(
        &refresh(&app, a["refresh_token"].as_str().unwrap()).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    assert_eq!(
        refresh(&app, b["refresh_token"].as_str().unwrap()).await.0,
        StatusCode::OK
    );

    assert_eq!(
        logout(c["refresh_token"].as_str().unwrap(), true).await.0,
        StatusCode::NO_CONTENT
    );
    let live: i64 =
        sqlx::query_scalar("SELECT count(*) FROM refresh_tokens WHERE revoked_at IS NULL")
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(live, 0);
}

#[tokio::test]
async fn a_password_change_revokes_every_token_of_the_user() {
    let app = TestApp::spawn().await;
    let client = app.create_client("Acme").await;
    let (user, token) = app.user_with_token("operator", Some(id(&client))).await;
    let email = user["email"].as_str().unwrap();
    let pair = app.login(email, "user-password-1").await;

    let wrong = app
        .post(
            "/auth/password",
            &token,
            json!({ "current_password": "not-it-at-all", "new_password": "new-password-2" }),
        )
        .await;
    assert_error(
        &wrong,
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
    );
    assert_eq!(wrong.1["field"], "current_password");
    let short = app
        .post(
            "/auth/password",
            &token,
            json!({ "current_password": "user-password-1", "new_password": "short" }),
        )
        .await;
    assert_eq!(short.1["field"], "new_password");

    let (status, _) = app
        .post(
            "/auth/password",
            &token,
            json!({ "current_password": "user-password-1", "new_password": "new-password-2" }),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);

    assert_error(
        &app.get("/auth/me", &token).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    assert_error(
        &app.get("/auth/me", pair["access_token"].as_str().unwrap())
            .await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    assert_error(
        &refresh(&app, pair["refresh_token"].as_str().unwrap()).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    let fresh = app.login(email, "new-password-2").await;
    assert_eq!(
        app.get("/auth/me", fresh["access_token"].as_str().unwrap())
            .await
            .0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn refresh_and_access_tokens_are_not_interchangeable() {
    let app = TestApp::spawn().await;
    let pair = app.login(ADMIN_EMAIL, ADMIN_PASSWORD).await;

    assert_error(
        &app.get("/auth/me", pair["refresh_token"].as_str().unwrap())
            .await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    assert_error(
        &refresh(&app, pair["access_token"].as_str().unwrap()).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
}

#[tokio::test]
async fn a_deleted_or_demoted_user_loses_access_at_once() {
    let app = TestApp::spawn().await;
    let client = app.create_client("Acme").await;
    let (operator, operator_token) = app.user_with_token("operator", Some(id(&client))).await;
    let (viewer, viewer_token) = app.user_with_token("viewer", Some(id(&client))).await;
    assert_eq!(app.get("/sensors", &operator_token).await.0, StatusCode::OK);

    let (status, _) = app
        .patch(
            &format!("/users/{}", id(&operator)),
            &app.admin,
            json!({ "role": "viewer" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_error(
        &app.get("/sensors", &operator_token).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );

    assert_eq!(
        app.delete(&format!("/users/{}", id(&viewer)), &app.admin)
            .await
            .0,
        StatusCode::NO_CONTENT
    );
    assert_error(
        &app.get("/sensors", &viewer_token).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
}

#[tokio::test]
async fn the_bootstrap_admin_is_created_once() {
    let app = TestApp::spawn().await;

    // A second start over the same database (a restart, or a second replica).
    let again = Application::build(settings(&app.db, &app._mongo))
        .await
        .unwrap();
    drop(again);

    let admins: i64 = sqlx::query_scalar("SELECT count(*) FROM users WHERE role = 'admin'")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(admins, 1);
}
