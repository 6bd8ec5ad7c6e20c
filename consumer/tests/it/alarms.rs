//! Alarm rules evaluated by the consumer binary while it is killed with SIGKILL again and
//! again in the middle of a QoS 1 stream (`crash::stream_through_kills`): at the end the
//! stored alarms are exactly what the rules' semantics say of the stored readings (none
//! lost between storing a batch and evaluating it, none opened twice).

use std::time::Duration;

use chrono::{DateTime, Utc};
use termopar_alarms::eval::{excursions, Condition, Excursion, Point, Rule};
use test_support::eventually;
use uuid::Uuid;

use crate::{crash::stream_through_kills, harness::*};

/// Stores a rule straight in PostgreSQL (the consumer has no API); returns its id.
async fn rule(
    stores: &Stores,
    client: Uuid,
    sensor: Option<Uuid>,
    (kind, threshold, duration_secs, hysteresis): (&str, f64, i32, f64),
    from: DateTime<Utc>,
) -> Uuid {
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO alarm_rules (id, client_id, sensor_id, name, kind, threshold, duration_secs,
             hysteresis, severity, effective_from)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'warning', $9)",
    )
    .bind(id)
    .bind(client)
    .bind(sensor)
    .bind(format!("{kind} {threshold}"))
    .bind(kind)
    .bind(threshold)
    .bind(duration_secs)
    .bind(hysteresis)
    .bind(from)
    .execute(&stores.db.pool)
    .await
    .unwrap();
    id
}

/// The alarms stored for `rule` and `sensor`, not retracted, in order.
async fn stored_alarms(stores: &Stores, rule: Uuid, sensor: Uuid) -> Vec<Excursion> {
    type Row = (
        DateTime<Utc>,
        DateTime<Utc>,
        Option<DateTime<Utc>>,
        f64,
        DateTime<Utc>,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT started_at, confirmed_at, ended_at, peak, peak_at FROM alarms
         WHERE rule_id = $1 AND sensor_id = $2 AND state <> 'retracted'",
    )
    .bind(rule)
    .bind(sensor)
    .fetch_all(&stores.db.pool)
    .await
    .unwrap();
    sorted(
        rows.into_iter()
            .map(|(start, confirmed_at, end, peak, peak_at)| Excursion {
                start,
                confirmed_at,
                end,
                peak,
                peak_at,
            })
            .collect(),
    )
}

fn sorted(mut e: Vec<Excursion>) -> Vec<Excursion> {
    e.sort_by_key(|e| (e.start, e.end.is_none(), e.end));
    e
}

#[tokio::test]
async fn killing_the_consumer_while_it_evaluates_leaves_exactly_the_alarms_the_readings_say() {
    let stores = Stores::new().await;
    let (client, sensors) = stores.client_with_sensors(4).await;
    let from = Utc::now() - chrono::Duration::minutes(1);
    // Vaccine fridges hover around 5 °C: both rules cross often.
    let above = (Condition::Above { threshold: 5.0 }, ("above", 5.0, 0, 0.1));
    let below = (
        Condition::Below { threshold: 4.95 },
        ("below", 4.95, 1, 0.05),
    );
    let everywhere = rule(&stores, client.0, None, above.1, from).await;
    let one = rule(&stores, client.0, Some(sensors[0].0 .0), below.1, from).await;

    let total = 3000u64;
    let killed = stream_through_kills(&stores, client, &sensors, total, 7).await;
    // Evaluation follows storing before the acknowledgement: once the last reading is
    // stored, its evaluation is either done or redone by a consumer that gets it again.
    let readings = stores.readings().await;
    let mut opened = 0;
    for (rule_id, condition, (_, _, duration, hysteresis), watched) in [
        (everywhere, above.0, above.1, sensors.clone()),
        (one, below.0, below.1, sensors[..1].to_vec()),
    ] {
        let rule = Rule {
            condition,
            duration: chrono::Duration::seconds(duration.into()),
            hysteresis,
            from,
        };
        for (sensor, _) in &watched {
            let points: Vec<Point> = readings
                .iter()
                .filter(|r| r.sensor_id == *sensor)
                .map(|r| Point {
                    ts: r.ts,
                    id: r.id,
                    value: r.temperature.get(),
                })
                .collect();
            let expected = sorted(excursions(&rule, &points, Utc::now()));
            let got = eventually(
                "the alarms of the last readings",
                Duration::from_secs(30),
                || async {
                    let got = stored_alarms(&stores, rule_id, sensor.0).await;
                    (got == expected).then_some(got)
                },
            )
            .await;
            opened += got.len();
        }
    }
    assert!(
        opened >= 10,
        "the stream should cross the thresholds: {opened}"
    );
    // Each alarm was opened once.
    let twice: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT alarm_id FROM alarm_events WHERE kind = 'opened'
                                GROUP BY alarm_id HAVING count(*) > 1) t",
    )
    .fetch_one(&stores.db.pool)
    .await
    .unwrap();
    assert_eq!(twice, 0);
    drop(killed.consumer);
}
