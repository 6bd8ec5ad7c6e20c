//! Readings: history pages and cursors, latest, HTTP ingest, corrections.

use chrono::{Duration, TimeZone, Utc};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::harness::*;

async fn sensor_with(app: &TestApp, n: usize) -> (Value, Value, Vec<Value>) {
    let client = app
        .create_client(&format!("c-{}", Uuid::new_v4().simple()))
        .await;
    let sensor = app.create_sensor(id(&client), "probe").await;
    let start = Utc.with_ymd_and_hms(2026, 2, 1, 0, 0, 0).unwrap();
    // Scrambled times, some equal, so ordering ties are broken by id.
    let readings: Vec<Value> = (0..n)
        .map(|i| {
            reading_at(
                start + Duration::seconds(((i * 7919) % n) as i64 / 2 * 60),
                i as f64 / 10.0,
            )
        })
        .collect();
    for chunk in readings.chunks(50) {
        let (status, body) = app.ingest(&sensor, Value::Array(chunk.to_vec())).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    }
    (client, sensor, readings)
}

fn ids(page: &Value) -> Vec<String> {
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect()
}

fn assert_newest_first(items: &[Value]) {
    for pair in items.windows(2) {
        let key = |r: &Value| {
            (
                r["ts"].as_str().unwrap().to_owned(),
                r["id"].as_str().unwrap().to_owned(),
            )
        };
        assert!(
            key(&pair[0]) > key(&pair[1]),
            "not newest first: {} then {}",
            pair[0],
            pair[1]
        );
    }
}

#[tokio::test]
async fn history_pages_are_newest_first_and_cover_every_reading_once() {
    let app = TestApp::spawn().await;
    let (_, sensor, readings) = sensor_with(&app, 120).await;
    let path = format!("/sensors/{}/readings", id(&sensor));

    let mut seen = Vec::new();
    let mut all = Vec::new();
    for page in 1..=5 {
        let (status, body) = app
            .get(&format!("{path}?page={page}&page_size=25"), &app.admin)
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["total"], 120);
        assert_eq!(body["page"], page);
        seen.extend(ids(&body));
        all.extend(body["items"].as_array().unwrap().clone());
    }
    assert_newest_first(&all);
    let mut expected: Vec<String> = readings
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect();
    expected.sort();
    let mut got = seen.clone();
    got.sort();
    assert_eq!(got, expected);
    let (_, beyond) = app
        .get(&format!("{path}?page=6&page_size=25"), &app.admin)
        .await;
    assert!(beyond["items"].as_array().unwrap().is_empty());
    assert!(beyond.get("next_cursor").is_none());

    // The reading shape of the contract.
    let r = &all[0];
    for field in [
        "id",
        "sensor_id",
        "client_id",
        "ts",
        "temperature",
        "received_at",
    ] {
        assert!(r.get(field).is_some(), "{field} missing in {r}");
    }
}

#[tokio::test]
async fn cursor_pages_stay_stable_while_new_readings_arrive() {
    let app = TestApp::spawn().await;
    let (_, sensor, readings) = sensor_with(&app, 100).await;
    let path = format!("/sensors/{}/readings", id(&sensor));

    let mut seen: Vec<Value> = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let url = match &cursor {
            Some(c) => format!("{path}?page_size=30&cursor={c}"),
            None => format!("{path}?page_size=30"),
        };
        let (status, body) = app.get(&url, &app.admin).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        seen.extend(body["items"].as_array().unwrap().clone());
        // Newer readings arrive between pages; they must not shift the walk.
        let (s, _) = app.ingest(&sensor, reading_at(Utc::now(), 5.0)).await;
        assert_eq!(s, StatusCode::ACCEPTED);
        match body.get("next_cursor").and_then(Value::as_str) {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen.len(), readings.len(), "no reading skipped or repeated");
    assert_newest_first(&seen);

    let bad = app
        .get(&format!("{path}?cursor=nonsense"), &app.admin)
        .await;
    assert_error(&bad, StatusCode::BAD_REQUEST, "bad_request");
    assert_eq!(bad.1["field"], "cursor");
}

#[tokio::test]
async fn from_is_inclusive_and_to_is_exclusive() {
    let app = TestApp::spawn().await;
    let client = app.create_client("c").await;
    let sensor = app.create_sensor(id(&client), "s").await;
    let t0 = Utc.with_ymd_and_hms(2026, 5, 1, 12, 0, 0).unwrap();
    let body: Vec<Value> = (0..10)
        .map(|i| reading_at(t0 + Duration::minutes(i), i as f64))
        .collect();
    app.ingest(&sensor, Value::Array(body)).await;
    let from = (t0 + Duration::minutes(2)).to_rfc3339().replace('+', "%2B");
    let to = (t0 + Duration::minutes(5)).to_rfc3339().replace('+', "%2B");

    let (status, page) = app
        .get(
            &format!("/sensors/{}/readings?from={from}&to={to}", id(&sensor)),
            &app.admin,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let temps: Vec<f64> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["temperature"].as_f64().unwrap())
        .collect();
    assert_eq!(temps, vec![4.0, 3.0, 2.0]);
    assert!(page.get("total").is_none(), "no count of a window");
}

#[tokio::test]
async fn the_latest_reading_is_the_newest_measurement_and_follows_late_ones() {
    let app = TestApp::spawn().await;
    let client = app.create_client("c").await;
    let a = app.create_sensor(id(&client), "a").await;
    let b = app.create_sensor(id(&client), "b").await;
    let latest = format!("/sensors/{}/readings/latest", id(&a));
    assert_error(
        &app.get(&latest, &app.admin).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );

    let t = Utc::now() - Duration::hours(2);
    app.ingest(
        &a,
        json!([
            reading_at(t, 1.0),
            reading_at(t + Duration::minutes(5), 2.0)
        ]),
    )
    .await;
    let (_, got) = app.get(&latest, &app.admin).await;
    assert_eq!(got["temperature"], 2.0);
    // A late (older) reading does not replace it; a newer one does, at once.
    app.ingest(&a, reading_at(t - Duration::hours(1), 3.0))
        .await;
    assert_eq!(app.get(&latest, &app.admin).await.1["temperature"], 2.0);
    app.ingest(&a, json!({"id": Uuid::new_v4(), "ts": (t + Duration::minutes(10)).to_rfc3339(), "temperature": 4.0, "humidity": 55})).await;
    let (_, got) = app.get(&latest, &app.admin).await;
    assert_eq!(got["temperature"], 4.0);
    assert_eq!(
        got["humidity"], 55,
        "extra fields come back at the top level"
    );
    let (_, as_list) = app
        .get(
            &format!("/sensors/{}/readings?latest=true", id(&a)),
            &app.admin,
        )
        .await;
    assert_eq!(as_list["items"].as_array().unwrap().len(), 1);
    assert_eq!(as_list["items"][0]["temperature"], 4.0);

    app.ingest(&b, reading_at(t, 9.0)).await;
    let (status, all) = app
        .get(
            &format!("/clients/{}/readings/latest", id(&client)),
            &app.admin,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let mut temps: Vec<f64> = all["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["temperature"].as_f64().unwrap())
        .collect();
    temps.sort_by(f64::total_cmp);
    assert_eq!(temps, vec![4.0, 9.0]);
}

#[tokio::test]
async fn http_ingest_authenticates_validates_and_is_idempotent() {
    let app = TestApp::spawn().await;
    let client = app.create_client("mine").await;
    let other = app.create_client("theirs").await;
    let sensor = app.create_sensor(id(&client), "s").await;
    let (_, operator) = app.user_with_token("operator", Some(id(&client))).await;
    let (_, viewer) = app.user_with_token("viewer", Some(id(&client))).await;
    let (_, stranger) = app.user_with_token("operator", Some(id(&other))).await;
    let path = format!("/sensors/{}/readings", id(&sensor));
    let one = reading_at(Utc::now() - Duration::minutes(1), 21.5);

    let (status, report) = app.ingest(&sensor, one.clone()).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{report}");
    assert_eq!(report["accepted"], 1);
    assert_eq!(report["ids"][0], one["id"]);
    let (status, replay) = app.ingest(&sensor, one.clone()).await;
    assert_eq!(status, StatusCode::OK, "a replay is 200: {replay}");
    assert_eq!(replay["duplicates"], 1);

    // An operator's token works; a viewer's is forbidden; another tenant sees nothing.
    let by_jwt = |token: String| {
        let (app, path) = (&app, path.clone());
        async move {
            app.call(
                Method::POST,
                &path,
                Some(&token),
                Some(reading_at(Utc::now(), 1.0)),
            )
            .await
        }
    };
    assert_eq!(by_jwt(operator.clone()).await.0, StatusCode::ACCEPTED);
    assert_eq!(by_jwt(app.admin.clone()).await.0, StatusCode::ACCEPTED);
    assert_error(
        &by_jwt(viewer.clone()).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    assert_error(
        &by_jwt(stranger.clone()).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    let wrong_secret = read(
        app.request(Method::POST, &path, None)
            .header("x-device-secret", "not-it")
            .json(&one)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_error(&wrong_secret, StatusCode::UNAUTHORIZED, "unauthorized");
    let no_auth = app.call(Method::POST, &path, None, Some(one.clone())).await;
    assert_error(&no_auth, StatusCode::UNAUTHORIZED, "unauthorized");

    // Some good, some bad: the good ones are stored, the bad ones reported.
    let (status, mixed) = app
        .ingest(
            &sensor,
            json!([reading_at(Utc::now(), 1.0), {"temperature": "x"}, {"temperature": 5000}]),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{mixed}");
    assert_eq!(mixed["accepted"], 1);
    let reasons: Vec<&str> = mixed["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["reason"].as_str().unwrap())
        .collect();
    assert_eq!(
        reasons,
        vec!["invalid_temperature", "temperature_out_of_range"]
    );

    // Every reject reason, each refusing everything: 422 with the reason in `details`.
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "truncated",
            br#"{"temperature": 1"#.to_vec(),
            "malformed_json",
        ),
        ("NaN", br#"{"temperature": NaN}"#.to_vec(), "malformed_json"),
        ("garbage", vec![0xff, 0x00, 0x12], "malformed_json"),
        ("string", br#""hot""#.to_vec(), "invalid_shape"),
        ("empty array", b"[]".to_vec(), "empty_batch"),
        (
            "no temperature",
            br#"{"t": 1}"#.to_vec(),
            "missing_temperature",
        ),
        (
            "wrong type",
            br#"{"temperature": true}"#.to_vec(),
            "invalid_temperature",
        ),
        (
            "absurd",
            br#"{"temperature": -274}"#.to_vec(),
            "temperature_out_of_range",
        ),
        (
            "bad id",
            br#"{"temperature": 1, "id": "x"}"#.to_vec(),
            "invalid_id",
        ),
        (
            "bad ts",
            br#"{"temperature": 1, "ts": "noon"}"#.to_vec(),
            "invalid_timestamp",
        ),
        (
            "future ts",
            br#"{"temperature": 1, "ts": "2999-01-01T00:00:00Z"}"#.to_vec(),
            "timestamp_out_of_range",
        ),
        (
            "bad field name",
            br#"{"temperature": 1, "a.b": 1}"#.to_vec(),
            "invalid_extra",
        ),
    ];
    for (what, body, reason) in &cases {
        let got = read(
            app.request(Method::POST, &path, None)
                .header("x-device-secret", sensor["device_secret"].as_str().unwrap())
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_error(&got, StatusCode::UNPROCESSABLE_ENTITY, "rejected");
        assert_eq!(got.1["details"][0]["reason"], *reason, "{what}");
    }
    let letters = app
        ._mongo
        .database()
        .await
        .collection::<mongodb::bson::Document>("dead_letters")
        .count_documents(mongodb::bson::doc! {"source": "http"})
        .await
        .unwrap();
    assert_eq!(
        letters as usize,
        cases.len() + 2,
        "every refusal is dead-lettered"
    );
    let (_, page) = app.get(&format!("{path}?page_size=1000"), &app.admin).await;
    assert_eq!(page["total"], 4);
}

#[tokio::test]
async fn corrections_and_deletions_show_on_the_next_request() {
    let app = TestApp::spawn().await;
    app.daily_cache_live().await;
    let client = app.create_client("c").await;
    let sensor = app.create_sensor(id(&client), "s").await;
    let day = Utc.with_ymd_and_hms(2026, 1, 10, 12, 0, 0).unwrap();
    // The second at 18:40 UTC: 00:10 of the next day in Kolkata (+5:30), whose day starts
    // inside the hour (its statistics come from the day's quarters).
    let (first, second) = (
        reading_at(day, 10.0),
        reading_at(day + Duration::minutes(400), 20.0),
    );
    app.ingest(&sensor, json!([first, second])).await;
    let daily = format!(
        "/sensors/{}/daily-averages?from=2026-01-10&to=2026-01-10&tz=UTC",
        id(&sensor)
    );
    let kolkata = format!(
        "/sensors/{}/daily-averages?from=2026-01-10&to=2026-01-11&tz=Asia/Kolkata",
        id(&sensor)
    );
    let (_, before) = app.get(&daily, &app.admin).await;
    assert_eq!(before["items"][0]["avg"], 15.0);
    let (_, before) = app.get(&kolkata, &app.admin).await;
    assert_eq!(before["items"][1]["date"], "2026-01-11");
    assert_eq!(before["items"][1]["avg"], 20.0);

    let reading = format!("/readings/{}", second["id"].as_str().unwrap());
    let (status, corrected) = app
        .patch(&reading, &app.admin, json!({"temperature": 30.0}))
        .await;
    assert_eq!(status, StatusCode::OK, "{corrected}");
    assert_eq!(corrected["temperature"], 30.0);
    assert_eq!(corrected["original_temperature"], 20.0);
    assert_eq!(app.get(&daily, &app.admin).await.1["items"][0]["avg"], 20.0);
    assert_eq!(app.get(&daily, &app.admin).await.1["items"][0]["max"], 30.0);
    assert_eq!(
        app.get(&kolkata, &app.admin).await.1["items"][1]["max"],
        30.0
    );
    let latest = format!("/sensors/{}/readings/latest", id(&sensor));
    assert_eq!(app.get(&latest, &app.admin).await.1["temperature"], 30.0);
    let bad = app
        .patch(&reading, &app.admin, json!({"temperature": 2000}))
        .await;
    assert_error(&bad, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");

    let (_, viewer) = app.user_with_token("viewer", Some(id(&client))).await;
    assert_eq!(app.get(&reading, &viewer).await.0, StatusCode::OK);
    assert_error(
        &app.patch(&reading, &viewer, json!({"temperature": 1.0}))
            .await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    assert_error(
        &app.delete(&reading, &viewer).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );

    assert_eq!(
        app.delete(&reading, &app.admin).await.0,
        StatusCode::NO_CONTENT
    );
    assert_error(
        &app.get(&reading, &app.admin).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_eq!(app.get(&latest, &app.admin).await.1["temperature"], 10.0);
    let (_, after) = app.get(&daily, &app.admin).await;
    assert_eq!(after["items"][0]["count"], 1);
    assert_eq!(after["items"][0]["avg"], 10.0);
    let (_, after) = app.get(&kolkata, &app.admin).await;
    assert_eq!(after["items"].as_array().map(Vec::len), Some(1), "{after}");
    assert_eq!(after["items"][0]["date"], "2026-01-10");
}

#[tokio::test]
async fn readings_of_another_tenant_are_not_found() {
    let app = TestApp::spawn().await;
    let mine = app.create_client("mine").await;
    let theirs = app.create_client("theirs").await;
    let their_sensor = app.create_sensor(id(&theirs), "s").await;
    let r = reading_at(Utc::now(), 1.0);
    app.ingest(&their_sensor, r.clone()).await;
    let (_, me) = app.user_with_token("operator", Some(id(&mine))).await;
    let s = id(&their_sensor);
    for path in [
        format!("/sensors/{s}/readings"),
        format!("/sensors/{s}/readings/latest"),
        format!("/sensors/{s}/daily-averages"),
        format!("/clients/{}/readings/latest", id(&theirs)),
        format!("/clients/{}/daily-averages", id(&theirs)),
        format!("/readings/{}", r["id"].as_str().unwrap()),
    ] {
        let got = app.get(&path, &me).await;
        assert_error(&got, StatusCode::NOT_FOUND, "not_found");
        assert!(!got.1.to_string().contains(s));
    }
}

#[tokio::test]
async fn dead_letters_are_listed_newest_first_per_tenant_with_their_payload() {
    let app = TestApp::spawn().await;
    let mine = app.create_client("mine").await;
    let theirs = app.create_client("theirs").await;
    let sensor = app.create_sensor(id(&mine), "s").await;
    let their_sensor = app.create_sensor(id(&theirs), "t").await;
    let send = |sensor: &Value, body: &'static [u8]| {
        let request = app
            .request(
                Method::POST,
                &format!("/sensors/{}/readings", id(sensor)),
                None,
            )
            .header("x-device-secret", sensor["device_secret"].as_str().unwrap())
            .header("content-type", "application/json")
            .body(body);
        async move { read(request.send().await.unwrap()).await }
    };
    assert_eq!(
        send(&sensor, br#"{"temperature": "hot"}"#).await.0,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    assert_eq!(
        send(&sensor, b"\xff\x00not json").await.0,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    assert_eq!(
        send(&their_sensor, br#"{"temperature": 5000}"#).await.0,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    // A message for no known sensor (as MQTT would dead-letter it): admins only.
    app.state
        .store
        .dead_letter(&[termopar_core::store::DeadLetter {
            source: "mqtt",
            topic: Some("clients/x/sensors/y/readings".into()),
            sensor_id: None,
            client_id: None,
            payload: bytes::Bytes::from_static(b"{}"),
            reason: termopar_core::reading::RejectReason::InvalidTopic,
            detail: "not a readings topic".into(),
            index: None,
            received_at: Utc::now(),
        }])
        .await
        .unwrap();

    let (status, all) = app.get("/dead-letters", &app.admin).await;
    assert_eq!(status, StatusCode::OK, "{all}");
    let reasons: Vec<&str> = all["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["reason"].as_str().unwrap())
        .collect();
    assert_eq!(
        reasons,
        vec![
            "invalid_topic",
            "temperature_out_of_range",
            "malformed_json",
            "invalid_temperature"
        ]
    );
    let (_, viewer) = app.user_with_token("viewer", Some(id(&mine))).await;
    let (_, own) = app.get("/dead-letters?page_size=10", &viewer).await;
    let own_reasons: Vec<&str> = own["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["reason"].as_str().unwrap())
        .collect();
    assert_eq!(own_reasons, vec!["malformed_json", "invalid_temperature"]);
    let (_, filtered) = app
        .get("/dead-letters?reason=invalid_temperature", &viewer)
        .await;
    assert_eq!(filtered["items"].as_array().unwrap().len(), 1);

    // One with its payload: text when UTF-8, hex otherwise; other tenants' are not found.
    let text_id = own["items"][1]["id"].as_str().unwrap();
    let (status, one) = app.get(&format!("/dead-letters/{text_id}"), &viewer).await;
    assert_eq!(status, StatusCode::OK, "{one}");
    assert_eq!(one["payload"], r#"{"temperature": "hot"}"#);
    let binary_id = own["items"][0]["id"].as_str().unwrap();
    let (_, binary) = app
        .get(&format!("/dead-letters/{binary_id}"), &viewer)
        .await;
    assert_eq!(binary["payload_hex"], hex::encode(b"\xff\x00not json"));
    for other in [&all["items"][0]["id"], &all["items"][1]["id"]] {
        let got = app
            .get(
                &format!("/dead-letters/{}", other.as_str().unwrap()),
                &viewer,
            )
            .await;
        assert_error(&got, StatusCode::NOT_FOUND, "not_found");
    }
}
