//! Evaluating rules as readings are stored: in order from memory, and from the stored
//! readings when a reading arrives late (or the process has no state for the sensor yet).
//!
//! Each rule and sensor has a [`Cursor`]: the [`Tracker`] after the last reading fed and
//! the stored alarm that is open, if any. A reading later than the cursor's last is fed
//! to the tracker; one earlier (late), or any reading of a sensor without a cursor, makes
//! the engine recompute from the stored readings: back to the last reading before it
//! that settles the rule (after which nothing is open, whatever came before), then
//! forward through every reading stored since, reconciling the stored alarms that this
//! span touches with what it finds. Either way the stored alarms end up what
//! [`crate::eval::excursions`] says of all the sensor's readings, and a reading stored
//! twice changes nothing.

use std::{collections::HashMap, future::Future};

use chrono::{DateTime, Duration, Utc};
use uuid::Uuid;

use crate::eval::{reconcile, Change, Condition, Excursion, Point, Rule, Tracker};

/// How far back the first look for a settling reading goes; each further look goes
/// four times as far, down to the rule's start.
const FIRST_LOOK_BACK: Duration = Duration::hours(1);

/// The stored readings of sensors (with [`Book`], what an evaluation reads and writes).
pub trait History {
    /// The error of a read.
    type Error;
    /// Every reading of `sensor` measured at or after `from`, in measurement order.
    fn points(
        &self,
        sensor: Uuid,
        from: DateTime<Utc>,
    ) -> impl Future<Output = Result<Vec<Point>, Self::Error>> + Send;
}

/// The stored alarms.
pub trait Book {
    /// The error of a read or a write.
    type Error;
    /// The alarms of `rule` and `sensor` (not retracted) that began at or after `since`
    /// (the rule's definition took effect then) and last after `after` (all of them for
    /// `None`), by start.
    fn touched(
        &self,
        rule: Uuid,
        sensor: Uuid,
        since: DateTime<Utc>,
        after: Option<DateTime<Utc>>,
    ) -> impl Future<Output = Result<Vec<(Uuid, Excursion)>, Self::Error>> + Send;
    /// Applies `changes` (of several rule and sensor pairs), all or none (new alarms
    /// take the ids given).
    fn apply(&self, changes: &[Pending]) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

/// Changes to the alarms of one rule and sensor, found but not yet written.
#[derive(Debug, Clone, PartialEq)]
pub struct Pending {
    /// The rule.
    pub rule: Uuid,
    /// The sensor.
    pub sensor: Uuid,
    /// What to do.
    pub changes: Vec<Change<Uuid>>,
}

/// A rule and sensor's state in this process.
#[derive(Debug, Clone, Default)]
struct Cursor {
    tracker: Tracker,
    /// The stored alarm of the run in progress.
    open: Option<(Uuid, Excursion)>,
    /// How many readings the sensor had stored when the tracker was last fed, if known.
    count: Option<i64>,
}

/// Why an evaluation failed.
#[derive(Debug, thiserror::Error)]
pub enum EvalError<H, B> {
    /// Reading the stored readings failed.
    #[error("reading the stored readings: {0}")]
    History(H),
    /// Reading or writing the alarms failed.
    #[error("storing alarms: {0}")]
    Book(B),
}

/// What an evaluation through `S` (its history and its book of alarms) returns.
pub type Outcome<S> = Result<Evaluated, EvalError<<S as History>::Error, <S as Book>::Error>>;

/// What an evaluation did, for metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Evaluated {
    /// Rule and sensor pairs fed from memory.
    pub in_order: usize,
    /// Pairs recomputed from the stored readings.
    pub recomputed: usize,
    /// Alarm changes written.
    pub changes: usize,
}

/// The cursors of every rule and sensor this process evaluated, and the changes found
/// since the last [`Engine::flush`] (the cursors already assume them).
#[derive(Debug, Default)]
pub struct Engine {
    cursors: HashMap<(Uuid, Uuid), Cursor>,
    pending: Vec<Pending>,
}

impl Engine {
    /// No state yet: every pair starts from the stored readings.
    pub fn new() -> Self {
        Self::default()
    }

    /// Writes the changes found since the last flush, in one go (one transaction for the
    /// stores); returns how many. On an error, the pairs they concern lose their state
    /// (their next evaluation recomputes it from what is stored).
    pub async fn flush<B: Book>(&mut self, book: &B) -> Result<usize, B::Error> {
        if self.pending.is_empty() {
            return Ok(0);
        }
        let changes = self.pending.iter().map(|p| p.changes.len()).sum();
        match book.apply(&self.pending).await {
            Ok(()) => {
                self.pending.clear();
                Ok(changes)
            }
            Err(e) => {
                self.abandon();
                Err(e)
            }
        }
    }

    /// Drops the changes found since the last flush, and the state of their pairs (an
    /// evaluation failed before they could be written).
    pub fn abandon(&mut self) {
        for p in std::mem::take(&mut self.pending) {
            self.cursors.remove(&(p.rule, p.sensor));
        }
    }

    /// Forgets a rule's cursors (it changed or was deleted).
    pub fn forget_rule(&mut self, rule: Uuid) {
        self.cursors.retain(|(r, _), _| *r != rule);
    }

    /// How many rule and sensor pairs have state here.
    pub fn len(&self) -> usize {
        self.cursors.len()
    }

    /// Whether no pair has state here.
    pub fn is_empty(&self) -> bool {
        self.cursors.is_empty()
    }

    /// Evaluates `pair` on readings of its sensor just stored: `fresh` were stored now,
    /// `again` were stored before (redeliveries); both in any order. `count` is how many
    /// readings the sensor has stored in all since (when the store says): if it is not
    /// the cursor's count plus `fresh`, someone else stored readings of the sensor
    /// meanwhile and the pair is recomputed. `now` is the clock's time (no-data rules:
    /// the silence since the last reading). The changes it finds are written by
    /// [`Engine::flush`]. On an error the pair's state is dropped, so the next call
    /// recomputes it.
    #[allow(clippy::too_many_arguments)]
    pub async fn evaluate<S: History + Book>(
        &mut self,
        pair: Pair<'_>,
        fresh: &[Point],
        again: &[Point],
        count: Option<i64>,
        now: DateTime<Utc>,
        stores: &S,
    ) -> Outcome<S> {
        let Some(cursor) = self.cursors.remove(&pair.key()) else {
            // No state here: what was stored before may never have been evaluated.
            let all = fresh.iter().chain(again).copied();
            let Some(earliest) = all.min_by_key(Point::key) else {
                return Ok(Evaluated::default());
            };
            return self
                .recompute(pair, earliest.key(), count, now, stores)
                .await;
        };
        // Readings stored before may never have been evaluated: a process that stored
        // them may have died before evaluating (the broker then sends them again, maybe
        // to another process). From the stored readings, as for a late one.
        if let Some(earliest) = again.iter().chain(fresh).map(Point::key).min() {
            if !again.is_empty() {
                // With nothing new stored, the count is the cursor's still.
                let count = count.or(cursor.count);
                return self.recompute(pair, earliest, count, now, stores).await;
            }
        }
        let mut points: Vec<Point> = fresh.to_vec();
        points.sort_by_key(Point::key);
        points.dedup_by_key(|p| p.id);
        // Another process stored readings of the sensor since this one last looked: from
        // the stored readings (what came before the new ones was that process's to
        // evaluate, and it is in the stored alarms).
        let others =
            count.is_some_and(|n| cursor.count.map(|c| c + points.len() as i64) != Some(n));
        if others {
            let beyond = (DateTime::<Utc>::MAX_UTC, Uuid::max());
            let from = points.first().map_or(beyond, Point::key);
            return self.recompute(pair, from, count, now, stores).await;
        }
        let Some(first) = points.first().copied() else {
            // Nothing new, but the clock moved on.
            let latest = cursor.tracker.last().map(|p| p.ts);
            self.cursors.insert(pair.key(), cursor);
            return match latest {
                Some(latest) => self.tick(pair, latest, now, stores).await,
                None => Ok(Evaluated::default()),
            };
        };
        if cursor
            .tracker
            .last()
            .is_some_and(|last| first.key() <= last.key())
        {
            return self.recompute(pair, first.key(), count, now, stores).await;
        }
        let Cursor {
            mut tracker, open, ..
        } = cursor;
        let after = tracker.last().map(|p| p.ts);
        let mut computed = tracker.feed_all(pair.rule, points);
        computed.extend(tracker.silence(pair.rule, now));
        let stored = match pair.rule.condition {
            // A silence may have been opened by the clock, in any process.
            Condition::NoData => stores
                .touched(pair.rule_id, pair.sensor, pair.rule.from, after)
                .await
                .map_err(EvalError::Book)?,
            _ => open.into_iter().collect(),
        };
        let changes = self.settle(pair, tracker, count, &stored, &computed);
        Ok(Evaluated {
            in_order: 1,
            recomputed: 0,
            changes,
        })
    }

    /// Recomputes `pair` from the stored readings around `ts`, where a stored reading was
    /// corrected or deleted (whatever state this process had for it is dropped).
    pub async fn reconsider<S: History + Book>(
        &mut self,
        pair: Pair<'_>,
        ts: DateTime<Utc>,
        now: DateTime<Utc>,
        stores: &S,
    ) -> Outcome<S> {
        self.cursors.remove(&pair.key());
        self.recompute(pair, (ts, Uuid::nil()), None, now, stores)
            .await
    }

    /// For a no-data rule (nothing for others): opens the silence of `pair`'s sensor if
    /// it lasted longer than the rule's duration at `now`. `latest` is the sensor's
    /// newest stored reading (a newer one than this process saw means another process
    /// evaluated it: the state here is recomputed).
    pub async fn tick<S: History + Book>(
        &mut self,
        pair: Pair<'_>,
        latest: DateTime<Utc>,
        now: DateTime<Utc>,
        stores: &S,
    ) -> Outcome<S> {
        if pair.rule.condition != Condition::NoData {
            return Ok(Evaluated::default());
        }
        let cursor = self
            .cursors
            .remove(&pair.key())
            .filter(|c| c.tracker.last().is_some_and(|last| last.ts >= latest));
        let Some(Cursor { tracker, count, .. }) = cursor else {
            // From the last reading on, whatever its time.
            let beyond = (DateTime::<Utc>::MAX_UTC, Uuid::max());
            return self.recompute(pair, beyond, None, now, stores).await;
        };
        let after = tracker.last().map(|p| p.ts);
        let computed: Vec<Excursion> = tracker.silence(pair.rule, now).into_iter().collect();
        let changes = self
            .settle_stored(pair, tracker, count, after, &computed, stores)
            .await?;
        Ok(Evaluated {
            in_order: 1,
            recomputed: 0,
            changes,
        })
    }

    /// Recomputes the pair from the last settling reading before `earliest`; `count` is
    /// the sensor's readings in all as the store reported them before this read (the
    /// read may see more: then the next evaluation recomputes again).
    async fn recompute<S: History + Book>(
        &mut self,
        pair: Pair<'_>,
        earliest: (DateTime<Utc>, Uuid),
        count: Option<i64>,
        now: DateTime<Utc>,
        stores: &S,
    ) -> Outcome<S> {
        let rule = pair.rule;
        // The readings' times are bounded by the clock (and a few minutes of skew).
        let until = earliest.0.min(now + Duration::days(1));
        let mut back = FIRST_LOOK_BACK;
        let (mut tracker, points) = loop {
            let from = (until - back).max(rule.from);
            let points = stores
                .points(pair.sensor, from)
                .await
                .map_err(EvalError::History)?;
            let before = points.partition_point(|p| p.key() < earliest);
            let settling = (0..before)
                .rev()
                .find(|&i| rule.settles(i.checked_sub(1).map(|j| &points[j]), &points[i]));
            match settling {
                Some(i) => break (Tracker::settled_at(points[i]), points[i + 1..].to_vec()),
                None if from <= rule.from => break (Tracker::default(), points),
                None => back = back * 4,
            }
        };
        let after = tracker.last().map(|p| p.ts);
        let mut computed = tracker.feed_all(rule, points);
        computed.extend(tracker.silence(rule, now));
        let changes = self
            .settle_stored(pair, tracker, count, after, &computed, stores)
            .await?;
        Ok(Evaluated {
            in_order: 0,
            recomputed: 1,
            changes,
        })
    }

    /// [`Engine::settle`] against the stored alarms that last after `after`.
    async fn settle_stored<S: History + Book>(
        &mut self,
        pair: Pair<'_>,
        tracker: Tracker,
        count: Option<i64>,
        after: Option<DateTime<Utc>>,
        computed: &[Excursion],
        stores: &S,
    ) -> Result<usize, EvalError<<S as History>::Error, <S as Book>::Error>> {
        let stored = stores
            .touched(pair.rule_id, pair.sensor, pair.rule.from, after)
            .await
            .map_err(EvalError::Book)?;
        Ok(self.settle(pair, tracker, count, &stored, computed))
    }

    /// Notes what `computed` changes of `stored` (written at the next flush), and keeps
    /// the pair's new state.
    fn settle(
        &mut self,
        pair: Pair<'_>,
        tracker: Tracker,
        count: Option<i64>,
        stored: &[(Uuid, Excursion)],
        computed: &[Excursion],
    ) -> usize {
        let (changes, keys) = reconcile(stored, computed, Uuid::now_v7);
        let open = match (tracker.open(), computed.last(), keys.last()) {
            (Some(open), Some(last), Some(id)) if last.end.is_none() => Some((*id, open)),
            _ => None,
        };
        self.cursors.insert(
            pair.key(),
            Cursor {
                tracker,
                open,
                count,
            },
        );
        let n = changes.len();
        if n > 0 {
            self.pending.push(Pending {
                rule: pair.rule_id,
                sensor: pair.sensor,
                changes,
            });
        }
        n
    }
}

/// A rule and one sensor it watches.
#[derive(Debug, Clone, Copy)]
pub struct Pair<'a> {
    /// The rule's id.
    pub rule_id: Uuid,
    /// What it says.
    pub rule: &'a Rule,
    /// The sensor.
    pub sensor: Uuid,
}

impl Pair<'_> {
    fn key(&self) -> (Uuid, Uuid) {
        (self.rule_id, self.sensor)
    }
}

/// What time it is, for the no-data clock.
#[derive(Debug, Clone, Copy)]
pub enum Clock {
    /// The system's clock.
    System,
    /// `base` when tokio's clock said `at`, and moving with tokio's clock from there (a
    /// paused clock in tests).
    Tokio {
        /// The time at `at`.
        base: DateTime<Utc>,
        /// The tokio instant of `base`.
        at: tokio::time::Instant,
    },
}

impl Clock {
    /// A clock that says `base` now and moves with tokio's.
    pub fn tokio(base: DateTime<Utc>) -> Self {
        Self::Tokio {
            base,
            at: tokio::time::Instant::now(),
        }
    }

    /// The time now.
    pub fn now(&self) -> DateTime<Utc> {
        match self {
            Self::System => Utc::now(),
            Self::Tokio { base, at } => {
                *base + Duration::from_std(at.elapsed()).expect("a test's elapsed time")
            }
        }
    }
}

/// Calls `tick` with the time every `every` (on tokio's timer) until `stop`: the clock of
/// no-data rules.
pub async fn run_clock<F, Fut>(
    every: std::time::Duration,
    clock: Clock,
    mut stop: termopar_core::tasks::Stop,
    mut tick: F,
) where
    F: FnMut(DateTime<Utc>) -> Fut,
    Fut: Future<Output = ()>,
{
    loop {
        tokio::select! {
            () = stop.requested() => return,
            () = tokio::time::sleep(every) => {}
        }
        tick(clock.now()).await;
    }
}
