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

use crate::eval::{reconcile, Change, Excursion, Point, Rule, Tracker};

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
    /// The alarms of `rule` and `sensor` (not retracted) that last after `after` (all
    /// of them for `None`), by start.
    fn touched(
        &self,
        rule: Uuid,
        sensor: Uuid,
        after: Option<DateTime<Utc>>,
    ) -> impl Future<Output = Result<Vec<(Uuid, Excursion)>, Self::Error>> + Send;
    /// Applies `changes` to the alarms of `rule` and `sensor`, all or none (new alarms
    /// take the ids given).
    fn apply(
        &self,
        rule: Uuid,
        sensor: Uuid,
        changes: &[Change<Uuid>],
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

/// A rule and sensor's state in this process.
#[derive(Debug, Clone, Default)]
struct Cursor {
    tracker: Tracker,
    /// The stored alarm of the run in progress.
    open: Option<(Uuid, Excursion)>,
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

/// The cursors of every rule and sensor this process evaluated.
#[derive(Debug, Default)]
pub struct Engine {
    cursors: HashMap<(Uuid, Uuid), Cursor>,
}

impl Engine {
    /// No state yet: every pair starts from the stored readings.
    pub fn new() -> Self {
        Self::default()
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

    /// Evaluates `rule` (id `rule_id`) on readings of `sensor` just stored: `fresh` were
    /// stored now, `again` were stored before (redeliveries). Both may be in any order.
    /// On an error the pair's state is dropped, so the next call recomputes it.
    pub async fn evaluate<S: History + Book>(
        &mut self,
        rule_id: Uuid,
        rule: &Rule,
        sensor: Uuid,
        fresh: &[Point],
        again: &[Point],
        stores: &S,
    ) -> Result<Evaluated, EvalError<<S as History>::Error, <S as Book>::Error>> {
        let key = (rule_id, sensor);
        let Some(cursor) = self.cursors.remove(&key) else {
            // No state here: what was stored before may never have been evaluated.
            let all = fresh.iter().chain(again).copied();
            let Some(earliest) = all.min_by_key(Point::key) else {
                return Ok(Evaluated::default());
            };
            return self.recompute(key, rule, earliest, stores).await;
        };
        // A reading this process stored before was evaluated then.
        let mut points: Vec<Point> = fresh.to_vec();
        points.sort_by_key(Point::key);
        points.dedup_by_key(|p| p.id);
        let Some(first) = points.first().copied() else {
            self.cursors.insert(key, cursor);
            return Ok(Evaluated::default());
        };
        if cursor
            .tracker
            .last()
            .is_some_and(|last| first.key() <= last.key())
        {
            return self.recompute(key, rule, first, stores).await;
        }
        let Cursor { mut tracker, open } = cursor;
        let computed = tracker.feed_all(rule, points);
        let stored: Vec<(Uuid, Excursion)> = open.into_iter().collect();
        let changes = self
            .settle(key, tracker, &stored, &computed, stores)
            .await?;
        Ok(Evaluated {
            in_order: 1,
            recomputed: 0,
            changes,
        })
    }

    /// Recomputes the pair from the last settling reading before `earliest`.
    async fn recompute<S: History + Book>(
        &mut self,
        key: (Uuid, Uuid),
        rule: &Rule,
        earliest: Point,
        stores: &S,
    ) -> Result<Evaluated, EvalError<<S as History>::Error, <S as Book>::Error>> {
        let (rule_id, sensor) = key;
        let mut back = FIRST_LOOK_BACK;
        let (mut tracker, points) = loop {
            let from = (earliest.ts - back).max(rule.from);
            let points = stores
                .points(sensor, from)
                .await
                .map_err(EvalError::History)?;
            let before = points.partition_point(|p| p.key() < earliest.key());
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
        let computed = tracker.feed_all(rule, points);
        let stored = stores
            .touched(rule_id, sensor, after)
            .await
            .map_err(EvalError::Book)?;
        let changes = self
            .settle(key, tracker, &stored, &computed, stores)
            .await?;
        Ok(Evaluated {
            in_order: 0,
            recomputed: 1,
            changes,
        })
    }

    /// Writes what `computed` changes of `stored`, then keeps the pair's new state.
    async fn settle<H, B: Book>(
        &mut self,
        key: (Uuid, Uuid),
        tracker: Tracker,
        stored: &[(Uuid, Excursion)],
        computed: &[Excursion],
        book: &B,
    ) -> Result<usize, EvalError<H, B::Error>> {
        let (changes, keys) = reconcile(stored, computed, Uuid::now_v7);
        if !changes.is_empty() {
            book.apply(key.0, key.1, &changes)
                .await
                .map_err(EvalError::Book)?;
        }
        let open = match (tracker.open(), computed.last(), keys.last()) {
            (Some(open), Some(last), Some(id)) if last.end.is_none() => Some((*id, open)),
            _ => None,
        };
        self.cursors.insert(key, Cursor { tracker, open });
        Ok(changes.len())
    }
}
