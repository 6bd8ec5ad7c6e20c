//! The engine against the semantics, on random streams: readings arrive shuffled, in
//! batches, some again (redeliveries), some hours late, sometimes through two processes
//! (the consumer and HTTP ingest, each with its own state), and a process sometimes
//! restarts (losing its state), even between storing a batch and evaluating it (the
//! batch then comes again). After every batch the stored alarms must be exactly the
//! excursions of everything stored so far.

use std::{collections::BTreeMap, sync::Mutex};

use chrono::{DateTime, Duration, TimeZone, Utc};
use rand::{rngs::StdRng, seq::SliceRandom, Rng, SeedableRng};
use termopar_alarms::{
    engine::{run_clock, Book, Clock, Engine, History, Pair, Pending},
    eval::{excursions, Change, Condition, Excursion, Point, Rule},
};
use uuid::Uuid;

/// A reading's place: its sensor, then measurement order.
type Place = (Uuid, (DateTime<Utc>, Uuid));

/// The readings stored so far.
#[derive(Default)]
struct Stored(Mutex<BTreeMap<Place, Point>>);

impl Stored {
    /// Stores `points`; returns those stored now and those stored before.
    fn store(&self, sensor: Uuid, points: &[Point]) -> (Vec<Point>, Vec<Point>) {
        let mut map = self.0.lock().unwrap();
        let (mut fresh, mut again) = (Vec::new(), Vec::new());
        for p in points {
            if map.insert((sensor, p.key()), *p).is_none() {
                fresh.push(*p);
            } else {
                again.push(*p);
            }
        }
        (fresh, again)
    }

    fn all(&self, sensor: Uuid) -> Vec<Point> {
        let map = self.0.lock().unwrap();
        map.iter()
            .filter(|((s, _), _)| *s == sensor)
            .map(|(_, p)| *p)
            .collect()
    }
}

/// The readings and the alarms: what the engine reads and writes. A write can be made
/// to fail (the database went away).
#[derive(Default)]
struct Stores {
    readings: Stored,
    alarms: Alarms,
    fail_next_write: std::sync::atomic::AtomicBool,
}

impl History for Stores {
    type Error = &'static str;
    async fn points(&self, sensor: Uuid, from: DateTime<Utc>) -> Result<Vec<Point>, &'static str> {
        Ok(self
            .readings
            .all(sensor)
            .into_iter()
            .filter(|p| p.ts >= from)
            .collect())
    }
}

/// The alarms, as the database keeps them: retracted ones stay, marked.
#[derive(Default)]
struct Alarms(Mutex<BTreeMap<Uuid, (Uuid, Uuid, Excursion, bool)>>);

impl Alarms {
    fn live(&self, rule: Uuid, sensor: Uuid) -> Vec<Excursion> {
        let map = self.0.lock().unwrap();
        let out: Vec<Excursion> = map
            .values()
            .filter(|(r, s, _, retracted)| *r == rule && *s == sensor && !retracted)
            .map(|(_, _, e, _)| *e)
            .collect();
        sorted(out)
    }
}

/// Excursions in a fixed order (two may start at the same time when readings share
/// it).
fn sorted(mut excursions: Vec<Excursion>) -> Vec<Excursion> {
    excursions.sort_by_key(|e| (e.start, e.end.is_none(), e.end));
    excursions
}

impl Book for Stores {
    type Error = &'static str;
    async fn touched(
        &self,
        rule: Uuid,
        sensor: Uuid,
        since: DateTime<Utc>,
        after: Option<DateTime<Utc>>,
    ) -> Result<Vec<(Uuid, Excursion)>, &'static str> {
        let map = self.alarms.0.lock().unwrap();
        let mut out: Vec<(Uuid, Excursion)> = map
            .iter()
            .filter(|(_, (r, s, e, retracted))| {
                *r == rule
                    && *s == sensor
                    && !retracted
                    && e.start >= since
                    && after.is_none_or(|a| e.end.is_none_or(|end| end > a))
            })
            .map(|(id, (_, _, e, _))| (*id, *e))
            .collect();
        out.sort_by_key(|(_, e)| e.start);
        Ok(out)
    }

    async fn apply(&self, pending: &[Pending]) -> Result<(), &'static str> {
        if self
            .fail_next_write
            .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            return Err("the database went away");
        }
        let mut map = self.alarms.0.lock().unwrap();
        for (rule, sensor, change) in pending
            .iter()
            .flat_map(|p| p.changes.iter().map(|c| (p.rule, p.sensor, c)))
        {
            match change {
                Change::Open(id, e) => {
                    assert!(map.insert(*id, (rule, sensor, *e, false)).is_none());
                }
                Change::Update(id, e) => {
                    let slot = map.get_mut(id).expect("updates a stored alarm");
                    assert!(!slot.3, "a retracted alarm is never updated");
                    slot.2 = *e;
                }
                Change::Retract(id) => {
                    let slot = map.get_mut(id).expect("retracts a stored alarm");
                    assert!(!slot.3, "retracted once");
                    slot.3 = true;
                }
            }
            // As the database's unique index: one open excursion per rule and sensor.
            let open = map
                .values()
                .filter(|(r, s, e, retracted)| {
                    *r == rule && *s == sensor && !retracted && e.end.is_none()
                })
                .count();
            assert!(open <= 1, "two alarms of a pair open at once");
        }
        Ok(())
    }
}

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap()
}

fn random_rule(rng: &mut StdRng) -> Rule {
    let condition = match rng.gen_range(0..5) {
        4 => Condition::NoData,
        0 => Condition::Above { threshold: 8.0 },
        1 => Condition::Below { threshold: 2.0 },
        2 => Condition::Outside {
            low: 2.0,
            high: 8.0,
        },
        _ => Condition::Rate { per_minute: 0.5 },
    };
    Rule {
        condition,
        duration: match condition {
            // Longer than most gaps between readings, shorter than some.
            Condition::NoData => Duration::minutes([1, 5, 10][rng.gen_range(0..3)]),
            _ => Duration::minutes([0, 1, 5, 10, 30][rng.gen_range(0..5)]),
        },
        hysteresis: [0.0, 0.3, 1.0][rng.gen_range(0..3)],
        // Sometimes the rule starts after the first readings.
        from: t0() + Duration::minutes([0, 0, 45][rng.gen_range(0..3)]),
    }
}

/// A sensor's readings over a few hours: a random walk that crosses the limits, with
/// gaps, some at the same instant.
fn random_stream(rng: &mut StdRng, n: usize) -> Vec<Point> {
    let mut ts = t0();
    let mut value: f64 = 5.0;
    (0..n)
        .map(|_| {
            ts += Duration::seconds([0, 30, 60, 60, 60, 120, 900][rng.gen_range(0..7)]);
            value = (value + rng.gen_range(-1.5..1.5)).clamp(-2.0, 12.0);
            Point {
                ts,
                id: Uuid::from_u128(rng.gen()),
                value: (value * 10.0).round() / 10.0,
            }
        })
        .collect()
}

/// The order the readings arrive in: mostly in order, with some late by hours, some
/// again, in batches of random sizes.
fn arrivals(rng: &mut StdRng, points: &[Point]) -> Vec<Vec<Point>> {
    let mut order: Vec<Point> = points.to_vec();
    match rng.gen_range(0..4) {
        // In order.
        0 => {}
        // Shuffled through.
        1 => order.shuffle(rng),
        // In order but with some held back to the end (a device's buffer replayed).
        2 => {
            let (late, mut on_time): (Vec<Point>, Vec<Point>) =
                order.iter().partition(|_| rng.gen_bool(0.15));
            on_time.extend(late);
            order = on_time;
        }
        // Neighbours swapped.
        _ => {
            for i in 1..order.len() {
                if rng.gen_bool(0.3) {
                    order.swap(i - 1, i);
                }
            }
        }
    }
    // Redeliveries, some time after the first delivery.
    for i in (0..order.len()).rev() {
        if rng.gen_bool(0.1) {
            let at = rng.gen_range(i + 1..=order.len());
            order.insert(at, order[i]);
        }
    }
    let mut batches = Vec::new();
    let mut rest = &order[..];
    while !rest.is_empty() {
        let n = rng.gen_range(1..=rest.len().min(25));
        batches.push(rest[..n].to_vec());
        rest = &rest[n..];
    }
    batches
}

#[tokio::test]
async fn stored_alarms_are_the_excursions_of_the_stored_readings_whatever_the_arrival_order() {
    let mut recomputed = 0;
    let mut in_order = 0;
    let mut alarms_seen = 0;
    let mut failures = 0;
    let mut crashes = 0;
    for seed in 0..400u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let rule = random_rule(&mut rng);
        let (rule_id, sensor) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let n = rng.gen_range(1..300);
        let stream = random_stream(&mut rng, n);
        let stores = Stores::default();
        // Half the streams reach two processes.
        let processes = rng.gen_range(1..=2);
        let mut engines = [Engine::new(), Engine::new()];
        let pair = Pair {
            rule_id,
            rule: &rule,
            sensor,
        };
        // The clock: at or after the newest reading delivered, sometimes well after.
        let mut now = t0();
        // Batches to deliver, each marked when it is the redelivery of one a process died
        // with (stored, not evaluated, not acknowledged).
        let mut queue: std::collections::VecDeque<(Vec<Point>, bool)> = arrivals(&mut rng, &stream)
            .into_iter()
            .map(|b| (b, false))
            .collect();
        let mut unevaluated = 0;
        while let Some((batch, redelivered)) = queue.pop_front() {
            let engine = &mut engines[rng.gen_range(0..processes)];
            // The process restarts now and then, losing what it held in memory.
            if rng.gen_bool(0.05) {
                *engine = Engine::new();
            }
            let newest = batch.iter().map(|p| p.ts).max().unwrap();
            now = now.max(newest) + Duration::seconds(rng.gen_range(0..120));
            // Now and then the process dies between storing the batch and evaluating it:
            // the broker sends it again a few batches later, to either process.
            if rng.gen_bool(0.03) {
                stores.readings.store(sensor, &batch);
                *engine = Engine::new();
                let at = rng.gen_range(0..=queue.len().min(5));
                queue.insert(at, (batch, true));
                if !redelivered {
                    unevaluated += 1;
                }
                crashes += 1;
                continue;
            }
            if redelivered {
                unevaluated -= 1;
            }
            // Now and then writing the alarms fails: the batch is stored again (its
            // readings are redeliveries then) until it goes through, as the consumer does.
            if rng.gen_bool(0.05) {
                stores
                    .fail_next_write
                    .store(true, std::sync::atomic::Ordering::Relaxed);
            }
            let done = loop {
                let (fresh, again) = stores.readings.store(sensor, &batch);
                let count = stores.readings.all(sensor).len() as i64;
                let done = engine
                    .evaluate(pair, &fresh, &again, Some(count), now, &stores)
                    .await
                    .unwrap();
                match engine.flush(&stores).await {
                    Ok(_) => break done,
                    Err(_) => failures += 1,
                }
            };
            // A batch with nothing to write leaves the failure unspent.
            stores
                .fail_next_write
                .store(false, std::sync::atomic::Ordering::Relaxed);
            recomputed += done.recomputed;
            in_order += done.in_order;
            if unevaluated > 0 {
                continue;
            }
            let expected = sorted(excursions(&rule, &stores.readings.all(sensor), now));
            assert_eq!(
                stores.alarms.live(rule_id, sensor),
                expected,
                "seed {seed}, rule {rule:?}, after a batch of {}",
                batch.len()
            );
            // The clock moves on without readings; no-data rules hear of it.
            if rng.gen_bool(0.3) {
                now += Duration::minutes(rng.gen_range(0..20));
                let latest = stores.readings.all(sensor).last().unwrap().ts;
                let clock = &mut engines[0];
                clock.tick(pair, latest, now, &stores).await.unwrap();
                clock.flush(&stores).await.unwrap();
                assert_eq!(
                    stores.alarms.live(rule_id, sensor),
                    sorted(excursions(&rule, &stores.readings.all(sensor), now)),
                    "seed {seed}, rule {rule:?}, at a tick"
                );
            }
        }
        alarms_seen += stores.alarms.live(rule_id, sensor).len();
    }
    // The streams exercised both paths and produced alarms.
    assert!(
        recomputed > 1000 && in_order > 1000,
        "{recomputed} {in_order}"
    );
    assert!(alarms_seen > 200, "{alarms_seen}");
    assert!(failures > 20, "{failures}");
    assert!(crashes > 20, "{crashes}");
}

#[test]
fn a_run_shorter_than_the_duration_is_no_alarm_and_hysteresis_keeps_one_excursion() {
    let rule = Rule {
        condition: Condition::Above { threshold: 8.0 },
        duration: Duration::minutes(10),
        hysteresis: 0.5,
        from: t0(),
    };
    let at = |m: i64, v: f64| Point {
        ts: t0() + Duration::minutes(m),
        id: Uuid::from_u128(m as u128),
        value: v,
    };
    // 9 minutes above: nothing. Then above from minute 20; 7.8 (inside the hysteresis)
    // does not end it; confirmed at minute 30; ended by 7.5 at minute 40.
    let points = [
        at(0, 5.0),
        at(1, 8.5),
        at(10, 9.0),
        at(11, 7.0),
        at(20, 8.1),
        at(25, 7.8),
        at(28, 9.4),
        at(30, 8.2),
        at(40, 7.5),
        at(41, 8.4),
    ];
    assert_eq!(
        excursions(&rule, &points, at(41, 0.0).ts),
        vec![Excursion {
            start: at(20, 0.0).ts,
            confirmed_at: at(30, 0.0).ts,
            end: Some(at(40, 0.0).ts),
            peak: 9.4,
            peak_at: at(28, 0.0).ts,
        }]
    );
    // The last run (from minute 41) is not an alarm yet; 10 minutes on it is, and open.
    let mut more = points.to_vec();
    more.push(at(51, 8.9));
    let last = *excursions(&rule, &more, at(51, 0.0).ts).last().unwrap();
    assert_eq!(
        (last.start, last.end, last.peak),
        (at(41, 0.0).ts, None, 8.9)
    );
}

#[test]
fn rates_are_measured_between_consecutive_readings() {
    let rule = Rule {
        condition: Condition::Rate { per_minute: 0.5 },
        duration: Duration::zero(),
        hysteresis: 0.0,
        from: t0(),
    };
    let at = |s: i64, v: f64| Point {
        ts: t0() + Duration::seconds(s),
        id: Uuid::from_u128(s as u128),
        value: v,
    };
    // +1 °C in 30 s is 2 °C a minute; then 0.1 in a minute ends it.
    let found = excursions(
        &rule,
        &[at(0, 4.0), at(60, 4.2), at(90, 5.2), at(150, 5.3)],
        at(150, 0.0).ts,
    );
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].start, at(90, 0.0).ts);
    assert_eq!(found[0].end, Some(at(150, 0.0).ts));
    assert!((found[0].peak - 2.0).abs() < 1e-9);
}

#[test]
fn silences_longer_than_the_duration_are_excursions_the_last_one_open_by_the_clock() {
    let rule = Rule {
        condition: Condition::NoData,
        duration: Duration::minutes(10),
        hysteresis: 0.0,
        from: t0(),
    };
    let at = |m: i64| Point {
        ts: t0() + Duration::minutes(m),
        id: Uuid::from_u128(m as u128),
        value: 5.0,
    };
    let points = [at(0), at(10), at(25), at(30)];
    let minute = |m: i64| t0() + Duration::minutes(m);
    // Ten minutes of silence is not more than ten; fifteen is.
    assert_eq!(
        excursions(&rule, &points, minute(40)),
        vec![Excursion {
            start: minute(10),
            confirmed_at: minute(20),
            end: Some(minute(25)),
            peak: 900.0,
            peak_at: minute(10),
        }]
    );
    let now = excursions(&rule, &points, minute(41));
    assert_eq!(now.len(), 2);
    assert_eq!(
        (now[1].start, now[1].confirmed_at, now[1].end),
        (minute(30), minute(40), None)
    );
}

#[test]
fn a_late_reading_that_joins_two_excursions_retracts_the_open_one_before_reopening() {
    // A rate excursion ended at minute 12 and another is open since 15; a late reading
    // makes minute 12 no end: one excursion from 5 on. Applied in order, the changes
    // never have two open at once (the database's unique index would refuse it).
    let at = |m: i64| t0() + Duration::minutes(m);
    let excursion = |start: i64, end: Option<i64>| Excursion {
        start: at(start),
        confirmed_at: at(start),
        end: end.map(at),
        peak: 1.0,
        peak_at: at(start),
    };
    let stored = [(1, excursion(5, Some(12))), (2, excursion(15, None))];
    let (changes, keys) = termopar_alarms::eval::reconcile(&stored, &[excursion(5, None)], || 3);
    assert_eq!(
        changes,
        vec![Change::Retract(2), Change::Update(1, excursion(5, None))]
    );
    assert_eq!(keys, vec![1]);
}

#[tokio::test(start_paused = true)]
async fn a_silent_sensor_is_an_alarm_once_the_clock_passes_the_rules_duration() {
    let rule: &'static Rule = Box::leak(Box::new(Rule {
        condition: Condition::NoData,
        duration: Duration::minutes(10),
        hysteresis: 0.0,
        from: t0(),
    }));
    let pair = Pair {
        rule_id: Uuid::from_u128(1),
        rule,
        sensor: Uuid::from_u128(2),
    };
    let stores = std::sync::Arc::new(Stores::default());
    let engine = std::sync::Arc::new(tokio::sync::Mutex::new(Engine::new()));
    let first = Point {
        ts: t0(),
        id: Uuid::from_u128(10),
        value: 5.0,
    };
    let (fresh, _) = stores.readings.store(pair.sensor, &[first]);
    {
        let mut engine = engine.lock().await;
        engine
            .evaluate(pair, &fresh, &[], Some(1), t0(), &*stores)
            .await
            .unwrap();
        engine.flush(&*stores).await.unwrap();
    }

    // The clock ticks every second of tokio's paused time, from the reading on.
    let tasks = termopar_core::tasks::Tasks::new();
    let (ticked, mut ticks) = tokio::sync::mpsc::unbounded_channel();
    let clock = Clock::tokio(t0());
    let (e, s) = (engine.clone(), stores.clone());
    tasks.spawn("clock", move |stop| {
        run_clock(std::time::Duration::from_secs(1), clock, stop, move |now| {
            let (engine, stores, ticked) = (e.clone(), s.clone(), ticked.clone());
            async move {
                let mut engine = engine.lock().await;
                let latest = stores.readings.all(pair.sensor).last().unwrap().ts;
                engine.tick(pair, latest, now, &*stores).await.unwrap();
                engine.flush(&*stores).await.unwrap();
                ticked.send(now).unwrap();
            }
        })
    });
    // Silent for ten minutes is not more than ten: no alarm until the tick after.
    loop {
        let now = ticks.recv().await.unwrap();
        let live = stores.alarms.live(pair.rule_id, pair.sensor);
        if now - t0() <= Duration::minutes(10) {
            assert!(live.is_empty(), "an alarm at {now}");
            continue;
        }
        assert_eq!(now - t0(), Duration::seconds(601));
        assert_eq!(
            live,
            vec![Excursion {
                start: t0(),
                confirmed_at: t0() + Duration::minutes(10),
                end: None,
                peak: 600.0,
                peak_at: t0(),
            }]
        );
        break;
    }
    // The sensor speaks again (measured at minute 11): the silence ends there.
    let next = Point {
        ts: t0() + Duration::minutes(11),
        id: Uuid::from_u128(11),
        value: 5.0,
    };
    let (fresh, _) = stores.readings.store(pair.sensor, &[next]);
    {
        let mut engine = engine.lock().await;
        engine
            .evaluate(pair, &fresh, &[], Some(2), clock.now(), &*stores)
            .await
            .unwrap();
        engine.flush(&*stores).await.unwrap();
    }
    let ended = stores.alarms.live(pair.rule_id, pair.sensor);
    assert_eq!(ended.len(), 1);
    assert_eq!(ended[0].end, Some(next.ts));
    assert_eq!(ended[0].peak, 660.0);
    tasks.shutdown(std::time::Duration::from_secs(1)).await;
}
