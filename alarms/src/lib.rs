//! The alarms product (issue 18): rules on a sensor or on every sensor of a client,
//! evaluated in event time as readings are stored; each excursion is one alarm, kept
//! with its history for audits.
//!
//! [`eval`] is the semantics (a pure function of a sensor's readings) and the
//! incremental tracker; [`engine`] keeps one tracker per rule and sensor and recomputes
//! from the stored readings when a reading arrives late.

// Items are `pub(crate)` unless another crate uses them.
#![warn(unreachable_pub)]

pub mod engine;
pub mod eval;
pub mod notify;
mod routes;
mod store;

pub use routes::{AlarmRulesApi, AlarmsApi, CONSTRAINTS};

use std::{
    collections::{BTreeMap, HashSet},
    future::Future,
    sync::Arc,
};

use sqlx::PgPool;
use termopar_core::{
    intake::Sink,
    reading::Reading,
    store::{DeadLetter, ReadingStore, StoreError, StoreOutcome},
    tasks::Tasks,
};
use tokio::sync::Mutex;
use uuid::Uuid;

use crate::{
    engine::{Engine, EvalError, Pair},
    eval::Point,
    store::{PgStores, RuleSet},
};

/// The evaluator of a process: the rules and every rule and sensor's state. Cheap to
/// clone.
#[derive(Clone)]
pub struct Alarms(Arc<Inner>);

struct Inner {
    stores: PgStores,
    rules: Mutex<RuleSet>,
    engine: Mutex<Engine>,
    /// The application's stop signal, once its tasks run (live feeds end with it).
    stop: std::sync::OnceLock<termopar_core::tasks::Stop>,
}

impl Alarms {
    /// An evaluator over these stores, with no state yet.
    pub fn new(pg: PgPool, readings: ReadingStore) -> Self {
        Self(Arc::new(Inner {
            stores: PgStores { pg, readings },
            rules: Mutex::new(RuleSet::default()),
            engine: Mutex::new(Engine::new()),
            stop: std::sync::OnceLock::new(),
        }))
    }

    fn pg(&self) -> &PgPool {
        &self.0.stores.pg
    }

    /// The engine and the rules, locked, the rules reloaded if they changed. The engine
    /// is locked first: no evaluation runs between a rule's reload and the forgetting of
    /// the state it had under its old definition.
    async fn locked(
        &self,
    ) -> Result<
        (
            tokio::sync::MutexGuard<'_, Engine>,
            tokio::sync::MutexGuard<'_, RuleSet>,
        ),
        StoreError,
    > {
        let mut engine = self.0.engine.lock().await;
        let mut rules = self.0.rules.lock().await;
        for rule in rules.refresh(&self.0.stores.pg).await? {
            engine.forget_rule(rule);
        }
        Ok((engine, rules))
    }

    /// The application's stop signal, once its tasks run.
    fn stop(&self) -> Option<termopar_core::tasks::Stop> {
        self.0.stop.get().cloned()
    }

    /// Makes the next evaluation in this process reload the rules (one changed here);
    /// other processes notice within [`store::RULES_CHECK_EVERY`].
    async fn rules_changed(&self) {
        self.0.rules.lock().await.stale();
    }

    /// Evaluates the rules of the sensors of `readings`, just stored as `outcome` says
    /// (refused ones left out); returns how many alarm changes it wrote. An error leaves
    /// the state of the pairs it concerned dropped: call again with the same readings
    /// (stored again, they are redeliveries).
    pub async fn evaluate(
        &self,
        readings: &[Reading],
        outcome: &StoreOutcome,
    ) -> Result<usize, StoreError> {
        let (mut engine, rules) = self.locked().await?;
        if rules.is_empty() {
            return Ok(0);
        }
        let refused: HashSet<usize> = outcome.refused.iter().map(|(i, _)| *i).collect();
        let again: HashSet<Uuid> = outcome.already_stored.iter().copied().collect();
        // Per sensor: its client, the readings stored now and those stored before.
        let mut sensors: BTreeMap<Uuid, (Uuid, Vec<Point>, Vec<Point>)> = BTreeMap::new();
        for (i, r) in readings.iter().enumerate() {
            if refused.contains(&i) {
                continue;
            }
            let slot = sensors
                .entry(r.sensor_id.0)
                .or_insert_with(|| (r.client_id.0, Vec::new(), Vec::new()));
            let point = Point {
                ts: r.ts,
                id: r.id,
                value: r.temperature.get(),
            };
            if again.contains(&r.id) {
                slot.2.push(point);
            } else {
                slot.1.push(point);
            }
        }
        let counts: std::collections::HashMap<Uuid, i64> = outcome
            .sensor_counts
            .iter()
            .map(|(s, n)| (s.0, *n))
            .collect();
        let now = chrono::Utc::now();
        for (sensor, (client, fresh, again)) in sensors {
            for loaded in rules.of(client, sensor) {
                let pair = Pair {
                    rule_id: loaded.id,
                    rule: &loaded.rule,
                    sensor,
                };
                let done = match engine
                    .evaluate(
                        pair,
                        &fresh,
                        &again,
                        counts.get(&sensor).copied(),
                        now,
                        &self.0.stores,
                    )
                    .await
                {
                    Ok(done) => done,
                    Err(e) => {
                        engine.abandon();
                        return Err(store_error(e));
                    }
                };
                let path = if done.recomputed > 0 {
                    "recomputed"
                } else {
                    "in_order"
                };
                metrics::counter!("alarm_evaluations_total", "path" => path).increment(1);
            }
        }
        // Every change the batch made, in one transaction.
        let changes = engine.flush(&self.0.stores).await?;
        metrics::gauge!("alarm_pairs_tracked").set(engine.len() as f64);
        Ok(changes)
    }
}

impl Alarms {
    /// Recomputes the alarms of `reading`'s sensor around it: it was corrected (it
    /// carries its new value) or deleted from the store.
    pub async fn reconsider(&self, reading: &Reading) -> Result<usize, StoreError> {
        let (mut engine, rules) = self.locked().await?;
        let now = chrono::Utc::now();
        let (client, sensor) = (reading.client_id.0, reading.sensor_id.0);
        for loaded in rules.of(client, sensor) {
            let pair = Pair {
                rule_id: loaded.id,
                rule: &loaded.rule,
                sensor,
            };
            if let Err(e) = engine
                .reconsider(pair, reading.ts, now, &self.0.stores)
                .await
            {
                engine.abandon();
                return Err(store_error(e));
            }
        }
        Ok(engine.flush(&self.0.stores).await?)
    }
}

/// How often the clock of no-data rules looks for silent sensors.
pub const CLOCK_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

impl Alarms {
    /// Opens the alarms of no-data rules whose sensors went silent by `now`; returns
    /// how many pairs it looked at. Errors are logged (the next tick tries again).
    pub async fn tick(&self, now: chrono::DateTime<chrono::Utc>) -> Result<usize, StoreError> {
        let (mut engine, rules) = self.locked().await?;
        if !rules.watches_silence() {
            return Ok(0);
        }
        let silent = store::silent(&self.0.stores.pg, now).await?;
        for (rule_id, sensor, latest) in &silent {
            let Some(loaded) = rules.get(*rule_id) else {
                continue;
            };
            let pair = Pair {
                rule_id: *rule_id,
                rule: &loaded.rule,
                sensor: *sensor,
            };
            if let Err(e) = engine.tick(pair, *latest, now, &self.0.stores).await {
                metrics::counter!("alarm_tick_errors_total").increment(1);
                tracing::warn!(rule_id = %rule_id, sensor_id = %sensor, error = %e, "no-data check failed");
            }
        }
        engine.flush(&self.0.stores).await?;
        Ok(silent.len())
    }

    /// Runs [`Alarms::tick`] every `every` on `tasks` until they stop: the clock of
    /// no-data rules. One process of a deployment runs it (the API); its live feeds end
    /// when the tasks stop too.
    pub fn start_clock(&self, tasks: &Tasks, every: std::time::Duration) {
        let _ = self.0.stop.set(tasks.stop_signal());
        let alarms = self.clone();
        tasks.spawn("alarm clock", move |stop| {
            engine::run_clock(every, engine::Clock::System, stop, move |now| {
                let alarms = alarms.clone();
                async move {
                    if let Err(e) = alarms.tick(now).await {
                        metrics::counter!("alarm_tick_errors_total").increment(1);
                        tracing::warn!(error = %e, "no-data check failed; next tick tries again");
                    }
                }
            })
        });
    }
}

/// An evaluation's error as the store's (what the consumer retries, and what the API
/// answers 503 for).
fn store_error(e: EvalError<StoreError, sqlx::Error>) -> StoreError {
    match e {
        EvalError::History(e) => e,
        EvalError::Book(e) => StoreError::Postgres(e),
    }
}

/// A reading store whose stores are evaluated by the alarm rules before they count as
/// done: the consumer acknowledges a message (and HTTP ingest answers) only after its
/// readings were both stored and evaluated, so a crash in between evaluates them when
/// they come again.
#[derive(Clone)]
pub struct Alarming {
    store: ReadingStore,
    alarms: Alarms,
}

impl Alarming {
    /// `store`, with `alarms` evaluating what it stores.
    pub fn new(store: ReadingStore, alarms: Alarms) -> Self {
        Self { store, alarms }
    }
}

impl Sink for Alarming {
    async fn store(&self, readings: &[Reading]) -> Result<StoreOutcome, StoreError> {
        let outcome = self.store.store(readings).await?;
        self.alarms.evaluate(readings, &outcome).await?;
        Ok(outcome)
    }

    async fn dead_letter(&self, letters: &[DeadLetter]) -> Result<(), StoreError> {
        self.store.dead_letter(letters).await
    }

    fn maintain(
        &self,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> impl Future<Output = ()> + Send + 'static {
        Sink::maintain(&self.store, stop)
    }
}
