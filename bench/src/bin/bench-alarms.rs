//! `make bench-alarms`: readings/s stored with 1,000 alarm rules over 1,000 sensors
//! (evaluated before each store call returns, as the consumer and HTTP ingest do)
//! against the same readings stored with no rule, in alternating rounds of the same
//! run; and the time from a batch stored to its alarms committed.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use termopar_alarms::Alarms;
use termopar_bench::{per_sec, percentile, print_table, Row};
use termopar_core::{
    ids::{ClientId, SensorId},
    reading::Reading,
    settings::env_parse,
    store::ReadingStore,
};
use test_support::{TestDb, TestMongo};
use uuid::Uuid;

/// Sensors, each watched by one rule.
const SENSORS: usize = 1000;
/// How many seconds apart a sensor's excursions begin (sensors staggered over it).
const CYCLE: usize = 100;

/// Fresh stores with one client and its sensors.
struct Fixture {
    db: TestDb,
    _mongo: TestMongo,
    store: ReadingStore,
    client: ClientId,
    sensors: Vec<SensorId>,
}

impl Fixture {
    async fn new() -> anyhow::Result<Self> {
        let db = TestDb::new().await;
        let mongo = TestMongo::new();
        let store = ReadingStore::new(db.pool.clone(), &mongo.database().await);
        let (client, sensors) = db.client_with_sensors(SENSORS).await;
        Ok(Self {
            db,
            _mongo: mongo,
            store,
            client,
            sensors,
        })
    }

    /// One rule per sensor, a quarter of each kind, in effect since `from`.
    async fn rules(&self, from: DateTime<Utc>) -> anyhow::Result<()> {
        for (k, sensor) in self.sensors.iter().enumerate() {
            let (kind, threshold, low, high, hysteresis) = match k % 4 {
                0 => ("above", Some(8.0), None, None, 0.5),
                1 => ("below", Some(2.0), None, None, 0.5),
                2 => ("outside", None, Some(2.0), Some(8.0), 0.5),
                _ => ("rate", Some(60.0), None, None, 10.0),
            };
            sqlx::query(
                "INSERT INTO alarm_rules (id, client_id, sensor_id, name, kind, threshold, low,
                     high, hysteresis, severity, effective_from)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'warning', $10)",
            )
            .bind(Uuid::now_v7())
            .bind(self.client.0)
            .bind(sensor.0)
            .bind(format!("rule {k}"))
            .bind(kind)
            .bind(threshold)
            .bind(low)
            .bind(high)
            .bind(hysteresis)
            .bind(from)
            .execute(&self.db.pool)
            .await?;
        }
        Ok(())
    }

    /// `batches` store calls of one reading per sensor, a second apart from `start`:
    /// around 5 °C, each sensor above 8 °C for 3 s and below 2 °C for 3 s every
    /// [`CYCLE`] seconds, staggered.
    fn batches(&self, batches: usize, start: DateTime<Utc>) -> Vec<Vec<Reading>> {
        (0..batches)
            .map(|b| {
                self.sensors
                    .iter()
                    .enumerate()
                    .map(|(k, sensor)| {
                        let phase = (b + k) % CYCLE;
                        let value = match phase {
                            10..=12 => 9.5,
                            50..=52 => 1.0,
                            _ => 5.0 + ((b * 7 + k * 13) % 5) as f64 / 10.0 - 0.2,
                        };
                        Reading {
                            id: Uuid::new_v4(),
                            sensor_id: *sensor,
                            client_id: self.client,
                            ts: start + chrono::Duration::seconds(b as i64),
                            temperature: value.try_into().expect("a temperature"),
                            received_at: Utc::now(),
                            extra: Default::default(),
                        }
                    })
                    .collect()
            })
            .collect()
    }
}

/// One round: readings/s over `timed` batches after `warm` ones (not timed: they give
/// the evaluator its state, read from the stored readings), and per timed batch with
/// alarm changes, how long its evaluation took.
struct Round {
    rate: f64,
    evaluations: Vec<Duration>,
    opened: i64,
    /// The second warm-up call's evaluation: every pair without state, read back from
    /// the stored readings.
    cold: Duration,
}

async fn round(with_rules: bool, warm: usize, timed: usize) -> anyhow::Result<Round> {
    let fixture = Fixture::new().await?;
    let start = Utc::now() - chrono::Duration::hours(2);
    if with_rules {
        fixture.rules(start).await?;
    }
    let mut alarms = Alarms::new(fixture.db.pool.clone(), fixture.store.clone());
    let batches = fixture.batches(warm + timed, start);
    let opened = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM alarm_events WHERE kind = 'opened'")
            .fetch_one(&fixture.db.pool)
            .await
    };
    let mut cold = Duration::ZERO;
    for (n, batch) in batches[..warm].iter().enumerate() {
        let outcome = fixture.store.store(batch).await?;
        // The first call has nothing stored before it to read back; the second does.
        let fresh = Alarms::new(fixture.db.pool.clone(), fixture.store.clone());
        let evaluator = if n == 1 { &fresh } else { &alarms };
        let started = Instant::now();
        evaluator.evaluate(batch, &outcome).await?;
        cold = started.elapsed();
        if n == 1 {
            // The timed calls go on with the state this one built.
            alarms = fresh;
        }
    }
    let before = opened().await?;
    let mut evaluations = Vec::new();
    let started = Instant::now();
    for batch in &batches[warm..] {
        let outcome = fixture.store.store(batch).await?;
        let stored = Instant::now();
        let events = alarms.evaluate(batch, &outcome).await?;
        if events > 0 {
            evaluations.push(stored.elapsed());
        }
    }
    let rate = (timed * SENSORS) as f64 / started.elapsed().as_secs_f64();
    Ok(Round {
        rate,
        evaluations,
        opened: opened().await? - before,
        cold,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let timed: usize = env_parse("BENCH_ALARM_BATCHES", 100)?;
    let rounds: usize = env_parse("BENCH_ROUNDS", 3)?;
    let warm = 2;
    println!(
        "# bench-alarms: {SENSORS} sensors, one rule each (above, below, outside, rate), \
         {timed} store calls of {SENSORS} readings a round, {rounds} rounds each way"
    );
    let (mut with, mut without) = (Vec::new(), Vec::new());
    let mut evaluations = Vec::new();
    let mut opened = 0;
    let mut cold = Vec::new();
    for _ in 0..rounds {
        let bare = round(false, warm, timed).await?;
        eprintln!("no rules: {:.0} readings/s", bare.rate);
        without.push(bare.rate);
        let ruled = round(true, warm, timed).await?;
        eprintln!(
            "1,000 rules: {:.0} readings/s, {} alarms opened",
            ruled.rate, ruled.opened
        );
        with.push(ruled.rate);
        evaluations.extend(ruled.evaluations);
        opened += ruled.opened;
        cold.push(ruled.cold);
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (with, without) = (mean(&with), mean(&without));
    let changed = evaluations.len();
    let (p50, p99) = (
        percentile(&mut evaluations, 50.0),
        percentile(&mut evaluations, 99.0),
    );
    print_table(
        "Alarms (2 cores, PostgreSQL + FerretDB/SQLite on the same machine)",
        &[
            Row {
                name: "readings/s stored, 1,000 rules over 1,000 sensors".into(),
                value: per_sec(with),
                baseline: format!("{} with no rule", per_sec(without)),
                ratio: Some(with / without),
                target: "≥ 0.90".into(),
                met: Some(with / without >= 0.9),
            },
            Row {
                name: format!("stored → alarms committed p50 ({changed} batches with changes)"),
                value: format!("{:.1} ms", p50.as_secs_f64() * 1e3),
                baseline: "".into(),
                ratio: None,
                target: "".into(),
                met: None,
            },
            Row {
                name: "stored → alarms committed p99".into(),
                value: format!("{:.1} ms", p99.as_secs_f64() * 1e3),
                baseline: "".into(),
                ratio: None,
                target: "≤ 100 ms".into(),
                met: Some(p99 <= Duration::from_millis(100)),
            },
            Row::info("alarms opened while timed", opened.to_string()),
            Row::info(
                "a store call of 1,000 sensors evaluated with no state (each pair read back)",
                format!(
                    "{:.0} ms (slowest of {rounds})",
                    cold.iter().max().unwrap_or(&Duration::ZERO).as_secs_f64() * 1e3
                ),
            ),
        ],
    );
    Ok(())
}
