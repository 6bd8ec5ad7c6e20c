//! Alarms over real HTTP and the real stores: an excursion posted as readings opens an
//! alarm at once (ingest answers after evaluating), late readings change its verdict,
//! redeliveries change nothing, operators acknowledge, tenants see only their own.

use chrono::{DateTime, Duration, SubsecRound, Utc};
use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::{
    harness::{assert_error, id, TestApp},
    sinks::{Hook, SmtpSink, WebhookSink},
};

/// A reading with a fixed id, so that it can be sent again.
fn reading(id: Uuid, ts: DateTime<Utc>, temperature: f64) -> Value {
    json!({ "id": id, "ts": ts.to_rfc3339(), "temperature": temperature })
}

impl TestApp {
    /// Creates a rule with `token`; returns it.
    async fn create_rule(&self, token: &str, body: Value) -> Value {
        let (status, rule) = self.post("/alarm-rules", token, body).await;
        assert_eq!(status, StatusCode::CREATED, "{rule}");
        rule
    }

    /// Makes `rule` evaluate readings from `from` on (rules start at their creation;
    /// the tests post readings of the past).
    async fn backdate_rule(&self, rule: &Value, from: DateTime<Utc>) {
        sqlx::query("UPDATE alarm_rules SET effective_from = $2 WHERE id = $1")
            .bind(Uuid::parse_str(id(rule)).unwrap())
            .bind(from)
            .execute(&self.state.pg)
            .await
            .unwrap();
    }

    /// An "above 8.0" rule on `sensor`, in effect from an hour before `base` (an hour ago,
    /// whole seconds); returns the rule and `base`.
    async fn warm_rule(&self, sensor: &Value) -> (Value, DateTime<Utc>) {
        let rule = self
            .create_rule(
                &self.admin,
                json!({"sensor_id": id(sensor), "name": "Too warm", "kind": "above", "threshold": 8.0}),
            )
            .await;
        let base = (Utc::now() - Duration::hours(1)).trunc_subsecs(0);
        self.backdate_rule(&rule, base - Duration::hours(1)).await;
        (rule, base)
    }

    /// Posts readings of `sensor`; they are stored (and evaluated) when this returns.
    async fn ingested(&self, sensor: &Value, readings: Value) -> Value {
        let (status, report) = self.ingest(sensor, readings).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{report}");
        report
    }

    /// The alarms `token` sees at `query` (a query string).
    async fn alarms(&self, token: &str, query: &str) -> Vec<Value> {
        let (status, page) = self.get(&format!("/alarms{query}"), token).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        page["items"].as_array().unwrap().clone()
    }

    /// The alarms not retracted, as the admin sees them.
    async fn live_alarms(&self) -> Vec<Value> {
        self.alarms(&self.admin, "")
            .await
            .into_iter()
            .filter(|a| a["state"] != "retracted")
            .collect()
    }

    /// The kinds of an alarm's events, oldest first.
    async fn alarm_events(&self, alarm: &str, token: &str) -> Vec<String> {
        let (status, events) = self.get(&format!("/alarms/{alarm}/events"), token).await;
        assert_eq!(status, StatusCode::OK, "{events}");
        events
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["kind"].as_str().unwrap().to_owned())
            .collect()
    }
}

fn at(v: &Value, field: &str) -> DateTime<Utc> {
    v[field].as_str().unwrap().parse().unwrap()
}

#[tokio::test]
async fn an_excursion_is_one_alarm_whose_verdict_follows_late_readings() {
    let app = TestApp::spawn().await;
    let client = app.create_client("Cold rooms").await;
    let sensor = app.create_sensor(id(&client), "Room 1").await;
    let (_, operator) = app.user_with_token("operator", Some(id(&client))).await;
    let (_, viewer) = app.user_with_token("viewer", Some(id(&client))).await;
    let rule = app
        .create_rule(
            &operator,
            json!({
                "sensor_id": id(&sensor), "name": "Room 1 too warm", "kind": "above",
                "threshold": 8.0, "duration_secs": 600, "hysteresis": 0.5,
                "severity": "critical"
            }),
        )
        .await;
    assert_eq!(rule["client_id"], client["id"]);
    let base = (Utc::now() - Duration::hours(2)).trunc_subsecs(0);
    app.backdate_rule(&rule, base - Duration::hours(1)).await;
    let m = |minutes: i64| base + Duration::minutes(minutes);

    // Above 8 from minute 1; 7.8 is inside the hysteresis and ends nothing; 11 minutes
    // in, it is an alarm, active.
    app.ingested(
        &sensor,
        json!([
            reading(Uuid::new_v4(), m(0), 5.0),
            reading(Uuid::new_v4(), m(1), 8.5),
            reading(Uuid::new_v4(), m(5), 7.8),
            reading(Uuid::new_v4(), m(8), 9.0),
            reading(Uuid::new_v4(), m(12), 9.5),
        ]),
    )
    .await;
    let active = app.alarms(&viewer, "?state=active").await;
    assert_eq!(active.len(), 1, "{active:?}");
    let alarm = &active[0];
    let alarm_id = id(alarm).to_owned();
    assert_eq!(alarm["rule_id"], rule["id"]);
    assert_eq!(alarm["rule_name"], "Room 1 too warm");
    assert_eq!(alarm["severity"], "critical");
    assert_eq!(alarm["sensor_id"], sensor["id"]);
    assert_eq!(at(alarm, "started_at"), m(1));
    assert_eq!(at(alarm, "confirmed_at"), m(12));
    assert!(alarm["ended_at"].is_null());
    assert_eq!(alarm["peak"], 9.5);
    assert!(
        alarm["duration_secs"].as_f64().unwrap() >= 7_000.0,
        "{alarm}"
    );

    // A late reading inside it raises its peak; sent again, it changes nothing.
    let late = reading(Uuid::new_v4(), m(3), 10.5);
    app.ingested(&sensor, json!([late.clone()])).await;
    let (_, after_late) = app.get(&format!("/alarms/{alarm_id}"), &viewer).await;
    assert_eq!(after_late["peak"], 10.5);
    assert_eq!(at(&after_late, "peak_at"), m(3));
    let (status, again) = app.ingest(&sensor, json!([late])).await;
    assert_eq!((status, &again["duplicates"]), (StatusCode::OK, &json!(1)));
    let (_, mut after_again) = app.get(&format!("/alarms/{alarm_id}"), &viewer).await;
    // All the same (`updated_at` too: nothing was written) but the time it has lasted.
    let mut after_late = after_late;
    for alarm in [&mut after_late, &mut after_again] {
        alarm.as_object_mut().unwrap().remove("duration_secs");
    }
    assert_eq!(after_again, after_late);

    // Back below 7.5: cleared, at the reading's time.
    app.ingested(&sensor, json!([reading(Uuid::new_v4(), m(20), 7.0)]))
        .await;
    let (_, cleared) = app.get(&format!("/alarms/{alarm_id}"), &viewer).await;
    assert_eq!(cleared["state"], "cleared");
    assert_eq!(at(&cleared, "ended_at"), m(20));
    assert_eq!(cleared["duration_secs"], 19.0 * 60.0);
    assert_eq!(
        app.alarm_events(&alarm_id, &viewer).await,
        ["opened", "cleared"]
    );

    // A late reading at minute 6, back in range, splits the run into two shorter than
    // ten minutes: it was no excursion. The alarm stays, retracted, for the record.
    app.ingested(&sensor, json!([reading(Uuid::new_v4(), m(6), 7.0)]))
        .await;
    let (_, retracted) = app.get(&format!("/alarms/{alarm_id}"), &viewer).await;
    assert_eq!(retracted["state"], "retracted");
    assert_eq!(
        app.alarm_events(&alarm_id, &viewer).await,
        ["opened", "cleared", "retracted"]
    );
    assert!(app.alarms(&viewer, "?state=active").await.is_empty());
    assert_eq!(app.alarms(&viewer, "").await.len(), 1);
    // What happened is counted (the counters are the process's: at least this test's).
    let metrics = app.metrics().await;
    for name in [
        "alarm_evaluations_total{path=\"in_order\"}",
        "alarm_evaluations_total{path=\"recomputed\"}",
        "alarms_opened_total",
        "alarms_cleared_total",
        "alarms_retracted_total",
    ] {
        let line = metrics
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} in:\n{metrics}"));
        let count: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(count >= 1.0, "{line}");
    }

    // Viewers read; operators acknowledge, once, with a comment.
    let ack = format!("/alarms/{alarm_id}/acknowledge");
    assert_error(
        &app.post(&ack, &viewer, json!({"comment": "seen"})).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    let (status, acked) = app
        .post(&ack, &operator, json!({"comment": "door left open"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{acked}");
    assert_eq!(acked["ack_comment"], "door left open");
    assert!(acked["acknowledged_at"].is_string());
    assert_error(
        &app.post(&ack, &operator, json!({})).await,
        StatusCode::CONFLICT,
        "conflict",
    );
    assert_eq!(
        app.alarm_events(&alarm_id, &viewer).await,
        ["opened", "cleared", "retracted", "acknowledged"]
    );
    assert_eq!(app.alarms(&viewer, "?acknowledged=false").await.len(), 0);
    assert_eq!(app.alarms(&viewer, "?acknowledged=true").await.len(), 1);

    // Another tenant sees none of it.
    let other = app.create_client("Other").await;
    let (_, stranger) = app.user_with_token("operator", Some(id(&other))).await;
    assert!(app.alarms(&stranger, "").await.is_empty());
    assert_error(
        &app.get(&format!("/alarms/{alarm_id}"), &stranger).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_error(
        &app.post(&ack, &stranger, json!({})).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_error(
        &app.get(&format!("/alarm-rules/{}", id(&rule)), &stranger)
            .await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    let (_, rules) = app.get("/alarm-rules", &stranger).await;
    assert_eq!(rules["total"], 0);
}

#[tokio::test]
async fn a_client_wide_rule_watches_every_sensor_of_its_client_and_no_other() {
    let app = TestApp::spawn().await;
    let client = app.create_client("Pharmacy").await;
    let other = app.create_client("Bakery").await;
    let fridges = [
        app.create_sensor(id(&client), "Fridge A").await,
        app.create_sensor(id(&client), "Fridge B").await,
    ];
    let oven = app.create_sensor(id(&other), "Oven").await;
    let rule = app
        .create_rule(
            &app.admin,
            json!({
                "client_id": id(&client), "name": "Vaccines 2-8 °C", "kind": "outside",
                "low": 2.0, "high": 8.0, "hysteresis": 0.2
            }),
        )
        .await;
    assert!(rule["sensor_id"].is_null());
    assert_eq!(rule["severity"], "warning");
    let base = (Utc::now() - Duration::hours(1)).trunc_subsecs(0);
    app.backdate_rule(&rule, base - Duration::hours(1)).await;
    let m = |minutes: i64| base + Duration::minutes(minutes);
    for (sensor, value) in [(&fridges[0], 9.0), (&fridges[1], 1.0), (&oven, 200.0)] {
        app.ingested(
            sensor,
            json!([
                reading(Uuid::new_v4(), m(0), 5.0),
                reading(Uuid::new_v4(), m(1), value)
            ]),
        )
        .await;
    }
    let alarms = app.alarms(&app.admin, "?state=active").await;
    let mut sensors: Vec<&str> = alarms
        .iter()
        .map(|a| a["sensor_id"].as_str().unwrap())
        .collect();
    sensors.sort();
    let mut expected = vec![id(&fridges[0]), id(&fridges[1])];
    expected.sort();
    assert_eq!(sensors, expected);
    let peaks: Vec<f64> = alarms.iter().map(|a| a["peak"].as_f64().unwrap()).collect();
    assert!(peaks.contains(&9.0) && peaks.contains(&1.0), "{peaks:?}");

    // Disabled, it opens nothing more; the alarms it opened stay.
    let (status, _) = app
        .patch(
            &format!("/alarm-rules/{}", id(&rule)),
            &app.admin,
            json!({"enabled": false}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    app.ingested(
        &fridges[0],
        json!([
            reading(Uuid::new_v4(), m(2), 5.0),
            reading(Uuid::new_v4(), m(3), 12.0)
        ]),
    )
    .await;
    assert_eq!(app.alarms(&app.admin, "").await.len(), 2);
    // Filters.
    let of_a = app
        .alarms(&app.admin, &format!("?sensor_id={}", id(&fridges[0])))
        .await;
    assert_eq!(of_a.len(), 1);
    assert!(app
        .alarms(&app.admin, "?severity=critical")
        .await
        .is_empty());
    let since = (Utc::now() + Duration::minutes(1)).to_rfc3339();
    assert!(app
        .alarms(&app.admin, &format!("?from={}", urlencode(&since)))
        .await
        .is_empty());

    // Deleting the rule deletes its alarms.
    assert_eq!(
        app.delete(&format!("/alarm-rules/{}", id(&rule)), &app.admin)
            .await
            .0,
        StatusCode::NO_CONTENT
    );
    assert!(app.alarms(&app.admin, "").await.is_empty());
}

fn urlencode(s: &str) -> String {
    s.replace('+', "%2B").replace(':', "%3A")
}

#[tokio::test]
async fn rules_that_cannot_be_evaluated_are_refused_with_the_field_at_fault() {
    let app = TestApp::spawn().await;
    let client = app.create_client("Cold rooms").await;
    let other = app.create_client("Other").await;
    let foreign = app.create_sensor(id(&other), "Theirs").await;
    let (_, operator) = app.user_with_token("operator", Some(id(&client))).await;
    let (_, viewer) = app.user_with_token("viewer", Some(id(&client))).await;
    let cases = [
        (json!({"name": "x", "kind": "outside", "high": 8.0}), "low"),
        (
            json!({"name": "x", "kind": "outside", "low": 8.0, "high": 2.0}),
            "high",
        ),
        (
            json!({"name": "x", "kind": "outside", "low": 2.0, "high": 8.0, "threshold": 5.0}),
            "threshold",
        ),
        (
            json!({"name": "x", "kind": "outside", "low": 2.0, "high": 8.0, "hysteresis": 3.0}),
            "hysteresis",
        ),
        (json!({"name": "x", "kind": "above"}), "threshold"),
        (
            json!({"name": "x", "kind": "above", "threshold": 8.0, "low": 1.0}),
            "low",
        ),
        (
            json!({"name": "x", "kind": "above", "threshold": 1e300}),
            "threshold",
        ),
        (
            json!({"name": "x", "kind": "rate", "threshold": 0.0}),
            "threshold",
        ),
        (
            json!({"name": "x", "kind": "rate", "threshold": 1.0, "hysteresis": 1.0}),
            "hysteresis",
        ),
        (
            json!({"name": "x", "kind": "below", "threshold": 2.0, "hysteresis": -1.0}),
            "hysteresis",
        ),
        (
            json!({"name": "", "kind": "below", "threshold": 2.0}),
            "name",
        ),
        (
            json!({"name": "x", "kind": "below", "threshold": 2.0, "sensor_id": id(&foreign)}),
            "sensor_id",
        ),
    ];
    for (body, field) in cases {
        let got = app.post("/alarm-rules", &operator, body.clone()).await;
        assert_error(&got, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
        assert_eq!(got.1["field"], field, "{body}: {}", got.1);
    }
    let bad_kind = app
        .post(
            "/alarm-rules",
            &operator,
            json!({"name": "x", "kind": "sideways", "threshold": 1.0}),
        )
        .await;
    assert!(bad_kind.0.is_client_error(), "{bad_kind:?}");
    assert_error(
        &app.post(
            "/alarm-rules",
            &viewer,
            json!({"name": "x", "kind": "below", "threshold": 2.0}),
        )
        .await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    let (_, rules) = app.get("/alarm-rules", &app.admin).await;
    assert_eq!(rules["total"], 0);
}

#[tokio::test]
async fn a_sensor_silent_longer_than_a_no_data_rule_allows_opens_an_alarm_by_the_clock() {
    let app = TestApp::spawn().await;
    let client = app.create_client("Cold rooms").await;
    let sensor = app.create_sensor(id(&client), "Room 1").await;
    let quiet = app.create_sensor(id(&client), "Never reported").await;
    let rule = app
        .create_rule(
            &app.admin,
            json!({
                "client_id": id(&client), "name": "Silent", "kind": "no_data",
                "duration_secs": 1
            }),
        )
        .await;
    assert_error(
        &app.post(
            "/alarm-rules",
            &app.admin,
            json!({"client_id": id(&client), "name": "x", "kind": "no_data"}),
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
    );
    let first = Utc::now().trunc_subsecs(3);
    app.ingested(&sensor, json!([reading(Uuid::new_v4(), first, 5.0)]))
        .await;
    // No reading follows: the clock opens the alarm a second after the reading.
    let alarm = test_support::eventually(
        "the silence alarm",
        test_support::DEFAULT_DEADLINE,
        || async { app.alarms(&app.admin, "?state=active").await.pop() },
    )
    .await;
    assert_eq!(alarm["rule_id"], rule["id"]);
    assert_eq!(alarm["sensor_id"], sensor["id"]);
    assert_eq!(at(&alarm, "started_at"), first);
    assert_eq!(at(&alarm, "confirmed_at"), first + Duration::seconds(1));
    // The sensor that never reported is not watched yet.
    assert!(app
        .alarms(&app.admin, &format!("?sensor_id={}", id(&quiet)))
        .await
        .is_empty());

    // The next reading ends the silence, at its own time.
    let next = Utc::now().trunc_subsecs(3);
    app.ingested(&sensor, json!([reading(Uuid::new_v4(), next, 5.1)]))
        .await;
    let (_, cleared) = app
        .get(&format!("/alarms/{}", id(&alarm)), &app.admin)
        .await;
    assert_eq!(cleared["state"], "cleared", "{cleared}");
    assert_eq!(at(&cleared, "ended_at"), next);
    let silence = (next - first).num_milliseconds() as f64 / 1000.0;
    assert_eq!(cleared["peak"].as_f64().unwrap(), silence);
    assert_eq!(
        app.alarm_events(id(&alarm), &app.admin).await,
        ["opened", "cleared"]
    );
}

#[tokio::test]
async fn each_state_change_is_notified_once_by_email_and_signed_webhook_through_retries() {
    let smtp = SmtpSink::start().await;
    // Down for its first two posts: the opening's notification is retried.
    let receiver = WebhookSink::start(2).await;
    let app = TestApp::spawn_with(|s| {
        s.leads.smtp.port = smtp.port;
        s.leads.backoff = std::time::Duration::from_millis(20);
        s.leads.backoff_max = std::time::Duration::from_millis(100);
    })
    .await;
    let client = app.create_client("Cold rooms").await;
    let sensor = app.create_sensor(id(&client), "Room 1").await;
    let secret = "a-webhook-secret-of-some-length";
    let rule = app
        .create_rule(
            &app.admin,
            json!({
                "sensor_id": id(&sensor), "name": "Too warm", "kind": "above",
                "threshold": 8.0, "emails": ["ops@example.com", "boss@example.com"],
                "webhook_url": receiver.url, "webhook_secret": secret,
                "quiet_secs": 3600
            }),
        )
        .await;
    assert_eq!(rule["has_webhook_secret"], true);
    assert!(rule.get("webhook_secret").is_none(), "{rule}");
    let base = (Utc::now() - Duration::hours(1)).trunc_subsecs(0);
    app.backdate_rule(&rule, base - Duration::hours(1)).await;
    let m = |minutes: i64| base + Duration::minutes(minutes);

    app.ingested(
        &sensor,
        json!([
            reading(Uuid::new_v4(), m(0), 5.0),
            reading(Uuid::new_v4(), m(1), 9.0)
        ]),
    )
    .await;
    app.ingested(&sensor, json!([reading(Uuid::new_v4(), m(2), 7.0)]))
        .await;
    // Opened and cleared: two e-mails each (one per recipient), two posts delivered.
    app.jobs_once("alarm_email", "done", 2).await;
    app.jobs_once("alarm_webhook", "done", 2).await;
    let mails = smtp.mails();
    assert_eq!(mails.len(), 4, "{mails:?}");
    for to in ["ops@example.com", "boss@example.com"] {
        let theirs: Vec<_> = mails.iter().filter(|m| m.recipients == [to]).collect();
        assert_eq!(theirs.len(), 2, "{to}: {mails:?}");
        assert!(theirs
            .iter()
            .any(|m| m.data.contains("ALARM: Too warm on Room 1")));
        assert!(theirs
            .iter()
            .any(|m| m.data.contains("Cleared: Too warm on Room 1")));
    }
    let hooks = receiver.hooks();
    let delivered: Vec<&Hook> = hooks.iter().filter(|h| h.status == 204).collect();
    let mut kinds: Vec<&str> = delivered.iter().map(|h| h.event.as_str()).collect();
    kinds.sort();
    assert_eq!(kinds, ["cleared", "opened"], "{hooks:?}");
    // The two failed posts were sent again, with the same delivery id, until one went
    // through; none was delivered twice.
    assert_eq!(hooks.len(), 4, "{hooks:?}");
    for hook in &hooks {
        let same: Vec<u16> = hooks
            .iter()
            .filter(|h| h.delivery == hook.delivery)
            .map(|h| h.status)
            .collect();
        assert_eq!(same.iter().filter(|&&s| s == 204).count(), 1, "{hooks:?}");
        assert_eq!(same.last(), Some(&204), "{hooks:?}");
    }
    for hook in &delivered {
        let signature = termopar_alarms::notify::sign(secret, &hook.timestamp, &hook.body);
        assert_eq!(hook.signature.as_deref(), Some(signature.as_str()));
        let body: Value = serde_json::from_slice(&hook.body).unwrap();
        assert_eq!(body["rule"]["id"], rule["id"]);
        assert_eq!(body["sensor"]["name"], "Room 1");
        assert_eq!(body["alarm"]["peak"], 9.0);
        assert_eq!(body["event"]["kind"], hook.event);
        assert_eq!(body["event"]["id"].to_string(), hook.delivery);
    }

    // Within the quiet period, the sensor's next excursion is recorded but not notified:
    // no job is enqueued for it (jobs are enqueued with the event, in its transaction).
    app.ingested(
        &sensor,
        json!([
            reading(Uuid::new_v4(), m(3), 9.5),
            reading(Uuid::new_v4(), m(4), 6.0)
        ]),
    )
    .await;
    assert_eq!(app.alarms(&app.admin, "").await.len(), 2);
    let (_, jobs) = app.get("/jobs?queue=alarm_email", &app.admin).await;
    assert_eq!(jobs["total"], 2, "{jobs}");
    let (_, jobs) = app.get("/jobs?queue=alarm_webhook", &app.admin).await;
    assert_eq!(jobs["total"], 2, "{jobs}");
}

/// The `data:` of the SSE messages in `text` that are complete.
fn sse_messages(text: &str) -> Vec<Value> {
    text.split("\n\n")
        .filter_map(|block| {
            block
                .lines()
                .find_map(|l| l.strip_prefix("data:"))
                .and_then(|data| serde_json::from_str(data.trim()).ok())
        })
        .collect()
}

#[tokio::test]
async fn the_live_feed_streams_a_tenants_alarm_events_as_they_happen_and_resumes() {
    let app = TestApp::spawn().await;
    let client = app.create_client("Cold rooms").await;
    let other = app.create_client("Other").await;
    let sensor = app.create_sensor(id(&client), "Room 1").await;
    let (_, viewer) = app.user_with_token("viewer", Some(id(&client))).await;
    let (_, stranger) = app.user_with_token("viewer", Some(id(&other))).await;
    let (_, base) = app.warm_rule(&sensor).await;
    let open = |token: &str, last: Option<&str>| {
        let mut req = app.request(reqwest::Method::GET, "/alarms/feed", Some(token));
        if let Some(last) = last {
            req = req.header("last-event-id", last);
        }
        req.send()
    };
    let mut mine = open(&viewer, None).await.unwrap();
    assert_eq!(mine.status(), StatusCode::OK);
    assert!(mine.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut theirs = open(&stranger, None).await.unwrap();

    app.ingested(
        &sensor,
        json!([
            reading(Uuid::new_v4(), base, 9.0),
            reading(Uuid::new_v4(), base + Duration::minutes(1), 5.0)
        ]),
    )
    .await;
    // Opened, then cleared, in order, as they were recorded.
    let mut text = String::new();
    let events = tokio::time::timeout(test_support::DEFAULT_DEADLINE, async {
        loop {
            let chunk = mine.chunk().await.unwrap().expect("the feed stays open");
            text.push_str(std::str::from_utf8(&chunk).unwrap());
            let events = sse_messages(&text);
            if events.len() >= 2 {
                return events;
            }
        }
    })
    .await
    .expect("two events on the feed");
    let kinds: Vec<&str> = events.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["opened", "cleared"]);
    assert_eq!(events[0]["rule_name"], "Too warm");
    assert_eq!(events[0]["sensor_id"], sensor["id"]);
    assert!(text.contains(&format!("id: {}", events[0]["id"])), "{text}");

    // A browser reconnecting with the last id it got gets what followed it.
    let first = events[0]["id"].to_string();
    let mut again = open(&viewer, Some(&first)).await.unwrap();
    let resumed = tokio::time::timeout(test_support::DEFAULT_DEADLINE, async {
        let mut text = String::new();
        loop {
            let chunk = again.chunk().await.unwrap().expect("the feed stays open");
            text.push_str(std::str::from_utf8(&chunk).unwrap());
            if let Some(event) = sse_messages(&text).pop() {
                return event;
            }
        }
    })
    .await
    .expect("the event after the last one seen");
    assert_eq!(resumed["kind"], "cleared");

    // Another tenant's feed got nothing (its next message would be a keep-alive).
    let nothing = tokio::time::timeout(std::time::Duration::from_millis(600), theirs.chunk()).await;
    assert!(
        nothing.is_err()
            || nothing
                .unwrap()
                .unwrap()
                .is_none_or(|c| !c.windows(5).any(|w| w == b"data:")),
        "another tenant saw an event"
    );
}

#[tokio::test]
async fn changing_what_a_rule_watches_for_closes_its_open_alarms_and_applies_from_now_on() {
    let app = TestApp::spawn().await;
    let client = app.create_client("Cold rooms").await;
    let sensor = app.create_sensor(id(&client), "Room 1").await;
    let (rule, base) = app.warm_rule(&sensor).await;
    app.ingested(&sensor, json!([reading(Uuid::new_v4(), base, 9.0)]))
        .await;
    let first = app.alarms(&app.admin, "?state=active").await.pop().unwrap();
    let path = format!("/alarm-rules/{}", id(&rule));

    // Limits that make no rule are refused, and change nothing.
    let refused = app
        .patch(&path, &app.admin, json!({"kind": "outside", "low": 2.0}))
        .await;
    assert_error(
        &refused,
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
    );
    assert_eq!(refused.1["field"], "high");
    assert_eq!(app.alarms(&app.admin, "?state=active").await.len(), 1);

    // A new threshold: the open alarm ends now, for the record; the rule starts over.
    let before = Utc::now();
    let (status, changed) = app
        .patch(&path, &app.admin, json!({"threshold": 10.0}))
        .await;
    assert_eq!(status, StatusCode::OK, "{changed}");
    assert_eq!(changed["threshold"], 10.0);
    assert_eq!(changed["kind"], "above");
    assert!(at(&changed, "effective_from") >= before.trunc_subsecs(3));
    let (_, closed) = app
        .get(&format!("/alarms/{}", id(&first)), &app.admin)
        .await;
    assert_eq!(closed["state"], "cleared");
    let (_, events) = app
        .get(&format!("/alarms/{}/events", id(&first)), &app.admin)
        .await;
    assert_eq!(events[1]["kind"], "cleared");
    assert_eq!(events[1]["comment"], "the rule changed");

    // Readings measured from now on meet the new threshold.
    let now = Utc::now().trunc_subsecs(3) + Duration::milliseconds(5);
    app.ingested(
        &sensor,
        json!([
            reading(Uuid::new_v4(), now, 9.5),
            reading(Uuid::new_v4(), now + Duration::seconds(1), 10.5)
        ]),
    )
    .await;
    let active = app.alarms(&app.admin, "?state=active").await;
    assert_eq!(active.len(), 1, "{active:?}");
    assert_eq!(at(&active[0], "started_at"), now + Duration::seconds(1));
    assert_eq!(active[0]["peak"], 10.5);

    // Another kind takes its limits from the change alone.
    let (status, outside) = app
        .patch(
            &path,
            &app.admin,
            json!({"kind": "outside", "low": 2.0, "high": 8.0}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{outside}");
    assert!(outside["threshold"].is_null());
    assert!(app.alarms(&app.admin, "?state=active").await.is_empty());
    assert_eq!(app.alarms(&app.admin, "").await.len(), 2);
}

#[tokio::test]
async fn corrected_and_deleted_readings_change_the_alarms_they_made() {
    let app = TestApp::spawn().await;
    let client = app.create_client("Cold rooms").await;
    let sensor = app.create_sensor(id(&client), "Room 1").await;
    let (_, base) = app.warm_rule(&sensor).await;
    let m = |minutes: i64| base + Duration::minutes(minutes);
    let spike = Uuid::new_v4();
    app.ingested(
        &sensor,
        json!([
            reading(Uuid::new_v4(), m(0), 5.0),
            reading(spike, m(1), 9.5),
            reading(Uuid::new_v4(), m(2), 5.0)
        ]),
    )
    .await;
    assert_eq!(app.live_alarms().await.len(), 1);

    // Corrected into range: the spike was no excursion.
    let path = format!("/readings/{spike}");
    let (status, _) = app
        .patch(&path, &app.admin, json!({"temperature": 6.0}))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(app.live_alarms().await.is_empty());
    // Corrected back above: an excursion again, with the corrected peak.
    app.patch(&path, &app.admin, json!({"temperature": 9.6}))
        .await;
    let again = app.live_alarms().await;
    assert_eq!(again.len(), 1);
    assert_eq!(again[0]["peak"], 9.6);
    assert_eq!(at(&again[0], "started_at"), m(1));
    // Deleted: nothing left of it.
    assert_eq!(
        app.delete(&path, &app.admin).await.0,
        StatusCode::NO_CONTENT
    );
    assert!(app.live_alarms().await.is_empty());
    assert_eq!(app.alarms(&app.admin, "?state=retracted").await.len(), 2);
}
