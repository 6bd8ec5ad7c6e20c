//! Daily averages against a brute-force computation over the raw readings, across DST
//! changes and quarter-hour offsets, with late and duplicate readings; and the cache of
//! finished days.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, NaiveDate, TimeZone, Utc};
use chrono_tz::Tz;
use rand::{rngs::StdRng, seq::SliceRandom, Rng, SeedableRng};
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::harness::*;

fn random_readings(rng: &mut StdRng, from: DateTime<Utc>, hours: i64, n: usize) -> Vec<Value> {
    (0..n)
        .map(|_| {
            let ts = from + Duration::milliseconds(rng.gen_range(0..hours * 3_600_000));
            reading_at(ts, (rng.gen_range(-3000..3000) as f64) / 100.0)
        })
        .collect()
}

/// avg/min/max/count per local date, straight from the readings.
fn brute_force(readings: &[Value], tz: Tz) -> BTreeMap<NaiveDate, (f64, f64, f64, i64)> {
    let mut days: BTreeMap<NaiveDate, Vec<f64>> = BTreeMap::new();
    for r in readings {
        let ts: DateTime<Utc> = r["ts"].as_str().unwrap().parse().unwrap();
        days.entry(ts.with_timezone(&tz).date_naive())
            .or_default()
            .push(r["temperature"].as_f64().unwrap());
    }
    days.into_iter()
        .map(|(d, t)| {
            let sum: f64 = t.iter().sum();
            let min = t.iter().copied().fold(f64::INFINITY, f64::min);
            let max = t.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            (d, (sum / t.len() as f64, min, max, t.len() as i64))
        })
        .collect()
}

fn assert_matches(got: &Value, want: &BTreeMap<NaiveDate, (f64, f64, f64, i64)>, what: &str) {
    let items = got["items"]
        .as_array()
        .unwrap_or_else(|| panic!("{what}: {got}"));
    assert_eq!(items.len(), want.len(), "{what}: days");
    for (item, (date, (avg, min, max, count))) in items.iter().zip(want) {
        assert_eq!(item["date"], date.to_string(), "{what}");
        assert_eq!(item["count"], *count, "{what} {date}");
        assert_eq!(item["min"].as_f64().unwrap(), *min, "{what} {date}");
        assert_eq!(item["max"].as_f64().unwrap(), *max, "{what} {date}");
        let got_avg = item["avg"].as_f64().unwrap();
        assert!(
            (got_avg - avg).abs() <= 1e-9 * avg.abs().max(1.0),
            "{what} {date}: {got_avg} vs {avg}"
        );
    }
}

#[tokio::test]
async fn daily_averages_equal_a_brute_force_computation_in_every_zone() {
    let app = TestApp::spawn().await;
    let client = app.create_client("zones").await;
    let a = app.create_sensor(id(&client), "a").await;
    let b = app.create_sensor(id(&client), "b").await;
    let mut rng = StdRng::seed_from_u64(2026);
    // Around both of Berlin's 2026 DST switches.
    let spring = Utc.with_ymd_and_hms(2026, 3, 26, 0, 0, 0).unwrap();
    let autumn = Utc.with_ymd_and_hms(2026, 10, 22, 0, 0, 0).unwrap();
    let mut of_a = random_readings(&mut rng, spring, 7 * 24, 1500);
    of_a.extend(random_readings(&mut rng, autumn, 7 * 24, 1500));
    let of_b = random_readings(&mut rng, spring, 3 * 24, 600);

    // Out of order (late readings), in batches, with replays of some batches.
    let mut shuffled = of_a.clone();
    shuffled.shuffle(&mut rng);
    for (i, chunk) in shuffled.chunks(400).enumerate() {
        let (status, body) = app.ingest(&a, Value::Array(chunk.to_vec())).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        if i % 3 == 0 {
            assert_eq!(
                app.ingest(&a, Value::Array(chunk.to_vec())).await.0,
                StatusCode::OK
            );
        }
    }
    app.ingest(&b, Value::Array(of_b.clone())).await;

    let both: Vec<Value> = of_a.iter().chain(of_b.iter()).cloned().collect();
    for zone in [
        "America/Sao_Paulo",
        "Europe/Berlin",
        "Asia/Kolkata",
        "Asia/Kathmandu",
        "UTC",
    ] {
        let tz: Tz = zone.parse().unwrap();
        let q = format!("from=2026-03-20&to=2026-10-31&tz={zone}");
        let (status, sensor) = app
            .get(
                &format!("/sensors/{}/daily-averages?{q}", id(&a)),
                &app.admin,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{sensor}");
        assert_eq!(sensor["tz"], zone);
        assert_matches(
            &sensor,
            &brute_force(&of_a, tz),
            &format!("sensor a in {zone}"),
        );
        let (_, whole) = app
            .get(
                &format!("/clients/{}/daily-averages?{q}", id(&client)),
                &app.admin,
            )
            .await;
        assert_matches(
            &whole,
            &brute_force(&both, tz),
            &format!("client in {zone}"),
        );
        // Asked twice (the second time from the cache where days are finished).
        let (_, again) = app
            .get(
                &format!("/sensors/{}/daily-averages?{q}", id(&a)),
                &app.admin,
            )
            .await;
        assert_eq!(again, sensor);
    }

    // From the cache, whole months and cut ones: Adelaide (+10:30 until April 5, +9:30
    // after), every month of the range cached by a first request, then windows that
    // start and end inside months.
    app.daily_cache_live().await;
    let tz: Tz = "Australia/Adelaide".parse().unwrap();
    let sensor_id = termopar_core::ids::SensorId(id(&a).parse().unwrap());
    let path = |from: &str, to: &str| {
        format!(
            "/sensors/{}/daily-averages?from={from}&to={to}&tz=Australia/Adelaide",
            id(&a)
        )
    };
    let full = brute_force(&of_a, tz);
    let within = |from: NaiveDate, to: NaiveDate| {
        full.range(from..=to)
            .map(|(d, v)| (*d, *v))
            .collect::<BTreeMap<_, _>>()
    };
    let months: Vec<NaiveDate> = (3..=10)
        .map(|m| NaiveDate::from_ymd_opt(2026, m, 1).unwrap())
        .collect();
    test_support::eventually(
        "Adelaide's months cached",
        test_support::DEFAULT_DEADLINE,
        || async {
            let (_, got) = app.get(&path("2026-03-01", "2026-10-31"), &app.admin).await;
            assert_matches(&got, &full, "sensor a in Adelaide");
            let daily = &app.handles.daily;
            months
                .iter()
                .all(|m| daily.has_month(sensor_id, tz, *m))
                .then_some(())
        },
    )
    .await;
    for (from, to) in [
        ("2026-03-28", "2026-04-07"),
        ("2026-03-31", "2026-03-31"),
        ("2026-10-24", "2026-10-30"),
        ("2026-04-02", "2026-10-25"),
    ] {
        let (status, got) = app.get(&path(from, to), &app.admin).await;
        assert_eq!(status, StatusCode::OK, "{got}");
        let (from, to) = (from.parse().unwrap(), to.parse().unwrap());
        assert_matches(&got, &within(from, to), &format!("Adelaide {from}..{to}"));
    }
}

#[tokio::test]
async fn dst_days_have_23_and_25_hours_of_readings() {
    let app = TestApp::spawn().await;
    let client = app.create_client("berlin").await;
    let sensor = app.create_sensor(id(&client), "s").await;
    let berlin = chrono_tz::Europe::Berlin;
    for (date, hours) in [("2026-03-29", 23), ("2026-10-25", 25), ("2026-06-01", 24)] {
        let day: NaiveDate = date.parse().unwrap();
        let start = berlin
            .from_local_datetime(&day.and_hms_opt(0, 0, 0).unwrap())
            .unwrap()
            .with_timezone(&Utc);
        let readings: Vec<Value> = (0..hours * 12)
            .map(|i| reading_at(start + Duration::minutes(5 * i), 1.0))
            .collect();
        for chunk in readings.chunks(500) {
            app.ingest(&sensor, Value::Array(chunk.to_vec())).await;
        }
        let (_, got) = app
            .get(
                &format!(
                    "/sensors/{}/daily-averages?from={date}&to={date}&tz=Europe/Berlin",
                    id(&sensor)
                ),
                &app.admin,
            )
            .await;
        assert_eq!(got["items"][0]["count"], hours * 12, "{date}: {got}");
        // In UTC the same readings spread over two dates.
        let (_, utc) = app
            .get(
                &format!(
                    "/sensors/{}/daily-averages?from={date}&to={date}&tz=UTC",
                    id(&sensor)
                ),
                &app.admin,
            )
            .await;
        assert!(utc["items"][0]["count"].as_i64().unwrap() < hours * 12);
    }
}

#[tokio::test]
async fn the_zone_defaults_to_the_clients_and_bad_ranges_are_400() {
    let app = TestApp::spawn().await;
    let (_, client) = app
        .post(
            "/clients",
            &app.admin,
            json!({"name": "Kathmandu Cold", "timezone": "Asia/Kathmandu"}),
        )
        .await;
    let sensor = app.create_sensor(id(&client), "s").await;
    let path = format!("/sensors/{}/daily-averages", id(&sensor));

    let (status, got) = app.get(&path, &app.admin).await;
    assert_eq!(status, StatusCode::OK, "{got}");
    assert_eq!(got["tz"], "Asia/Kathmandu");
    assert_eq!(got["items"], json!([]));
    let cases = [
        ("from=2026-02-01&to=2026-01-01", "from"),
        ("from=2020-01-01&to=2026-01-01", "to"),
        ("tz=Mars/Olympus", "tz"),
        ("from=2026-13-01", "from"),
        ("to=yesterday", "to"),
    ];
    for (query, field) in cases {
        let got = app.get(&format!("{path}?{query}"), &app.admin).await;
        assert_error(&got, StatusCode::BAD_REQUEST, "bad_request");
        assert_eq!(got.1["field"], field, "{query}");
    }
}

#[tokio::test]
async fn a_late_reading_in_a_cached_finished_day_shows_on_the_next_request() {
    let app = TestApp::spawn().await;
    app.daily_cache_live().await;
    let client = app.create_client("late").await;
    let sensor = app.create_sensor(id(&client), "s").await;
    let day = Utc.with_ymd_and_hms(2026, 4, 2, 10, 0, 0).unwrap();
    app.ingest(&sensor, reading_at(day, 10.0)).await;
    let path = format!(
        "/sensors/{}/daily-averages?from=2026-04-01&to=2026-04-03&tz=UTC",
        id(&sensor)
    );
    assert_eq!(app.get(&path, &app.admin).await.1["items"][0]["count"], 1);
    // April is finished, so cached (after an answer; the ingest's own change notice may
    // arrive while one is computed, which then caches nothing: ask again).
    test_support::eventually(
        "the month cached",
        test_support::DEFAULT_DEADLINE,
        || async {
            if app.handles.daily.cached_months() == 1 {
                return Some(());
            }
            app.get(&path, &app.admin).await;
            None
        },
    )
    .await;

    // Through this API process: its own cache forgets the day at once.
    app.ingest(&sensor, reading_at(day + Duration::hours(3), 20.0))
        .await;
    let (_, got) = app.get(&path, &app.admin).await;
    assert_eq!(got["items"][0]["count"], 2);
    assert_eq!(got["items"][0]["avg"], 15.0);

    // Through another process (a consumer): announced over PostgreSQL NOTIFY.
    let elsewhere =
        termopar_core::store::ReadingStore::new(app.db.pool.clone(), &app._mongo.database().await);
    let sensor_id = termopar_core::ids::SensorId(id(&sensor).parse().unwrap());
    let client_id = termopar_core::ids::ClientId(id(&client).parse().unwrap());
    let payload = reading_at(day + Duration::hours(4), 30.0).to_string();
    let parsed = termopar_core::reading::parse_message(
        payload.as_bytes(),
        sensor_id,
        client_id,
        Utc::now(),
        &Default::default(),
    )
    .unwrap();
    elsewhere.store(&parsed.readings).await.unwrap();
    test_support::eventually(
        "the other process's reading in the cached day",
        test_support::DEFAULT_DEADLINE,
        || async {
            let (_, got) = app.get(&path, &app.admin).await;
            (got["items"][0]["count"] == 3).then_some(())
        },
    )
    .await;
}
