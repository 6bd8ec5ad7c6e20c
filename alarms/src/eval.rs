//! What a rule says of a sensor's readings, in event time.
//!
//! The semantics are one pure function, [`excursions`]: a rule's excursions over a set of
//! readings taken in measurement order (`ts`, then `id`), each reading once. Everything
//! else (the incremental [`Tracker`], the late-reading recomputation of [`crate::engine`])
//! must agree with it on every arrival order; the model tests check exactly that.
//!
//! A run starts at the first reading that *enters* the condition (for "above 8 °C":
//! above 8) and lasts until the first reading that *exits* it (at or below 8 minus the
//! hysteresis); readings between the two levels neither start nor end a run, so noise
//! around the threshold does not flap. A run becomes an excursion (an alarm) once a
//! reading still inside it is at least the rule's duration after its start; a run that
//! ended sooner was never an alarm. Between readings the temperature is taken to stay
//! what was last measured.
//!
//! No-data rules are about the gaps between readings instead: each gap longer than the
//! rule's duration is an excursion from the reading before it to the one after it.

use chrono::{DateTime, Duration, Utc};
use uuid::Uuid;

/// One reading as rules see it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    /// Measurement time.
    pub ts: DateTime<Utc>,
    /// The reading's id (orders readings measured at the same time).
    pub id: Uuid,
    /// Degrees Celsius.
    pub value: f64,
}

impl Point {
    /// The order readings are evaluated in.
    pub fn key(&self) -> (DateTime<Utc>, Uuid) {
        (self.ts, self.id)
    }
}

/// What a rule watches for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Condition {
    /// Above `threshold` °C.
    Above { threshold: f64 },
    /// Below `threshold` °C.
    Below { threshold: f64 },
    /// Outside the band `low`..=`high` °C.
    Outside { low: f64, high: f64 },
    /// Changing faster than `per_minute` °C a minute (either way) between one reading and
    /// the one before it.
    Rate { per_minute: f64 },
    /// No reading for longer than the rule's duration: a silence from one reading to the
    /// next (in event time), or from the last one to now (by the clock, see
    /// [`Tracker::silence`]). A sensor is silent only after its first reading the rule
    /// saw: one that never reported is not watched yet.
    NoData,
}

/// A rule's semantics: its condition, how long it must hold, and its hysteresis.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rule {
    /// What it watches for.
    pub condition: Condition,
    /// How long the condition must hold before it is an alarm (0: at once).
    pub duration: Duration,
    /// How far back inside the limit a reading must be to end a run (°C, or °C a minute
    /// for rates).
    pub hysteresis: f64,
    /// Readings measured before this are not the rule's business (it did not exist).
    pub from: DateTime<Utc>,
}

/// One excursion: an alarm's facts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Excursion {
    /// The first reading of the run.
    pub start: DateTime<Utc>,
    /// The reading that made the run an alarm (at least `duration` after `start`).
    pub confirmed_at: DateTime<Utc>,
    /// The reading that ended it; `None` while it lasts.
    pub end: Option<DateTime<Utc>>,
    /// The most extreme value of the run (°C, or °C a minute for rates).
    pub peak: f64,
    /// When it was measured.
    pub peak_at: DateTime<Utc>,
}

impl Excursion {
    /// Whether the two overlap in time (an open one lasts forever).
    pub fn overlaps(&self, other: &Excursion) -> bool {
        let before = |a: &Excursion, b: &Excursion| a.end.is_some_and(|end| end <= b.start);
        !before(self, other) && !before(other, self)
    }
}

impl Rule {
    /// What the rule measures at `p`, given the reading before it: the temperature, or
    /// the rate of change (`None` without an earlier reading at another time).
    fn measure(&self, prev: Option<&Point>, p: &Point) -> Option<f64> {
        match self.condition {
            Condition::Rate { .. } => {
                let prev = prev?;
                let minutes = (p.ts - prev.ts).num_milliseconds() as f64 / 60_000.0;
                (minutes > 0.0).then(|| (p.value - prev.value).abs() / minutes)
            }
            Condition::NoData => Some((p.ts - prev?.ts).num_milliseconds() as f64 / 1000.0),
            _ => Some(p.value),
        }
    }

    fn enters(&self, q: f64) -> bool {
        match self.condition {
            Condition::NoData => q > self.duration.num_milliseconds() as f64 / 1000.0,
            Condition::Above { threshold } => q > threshold,
            Condition::Below { threshold } => q < threshold,
            Condition::Outside { low, high } => q < low || q > high,
            Condition::Rate { per_minute } => q > per_minute,
        }
    }

    fn exits(&self, q: f64) -> bool {
        let h = self.hysteresis;
        match self.condition {
            Condition::NoData => true,
            Condition::Above { threshold } => q <= threshold - h,
            Condition::Below { threshold } => q >= threshold + h,
            Condition::Outside { low, high } => q >= low + h && q <= high - h,
            Condition::Rate { per_minute } => q <= per_minute - h,
        }
    }

    /// How extreme `q` is (greater: more), to pick a run's peak.
    fn score(&self, q: f64) -> f64 {
        match self.condition {
            Condition::Above { .. } | Condition::Rate { .. } | Condition::NoData => q,
            Condition::Below { .. } => -q,
            Condition::Outside { low, high } => (q - high).max(low - q),
        }
    }

    /// Whether the state after `p` is known without the readings before `prev`: `p`
    /// ends any run (so no run is open after it). Every reading ends a silence.
    pub fn settles(&self, prev: Option<&Point>, p: &Point) -> bool {
        self.condition == Condition::NoData || self.measure(prev, p).is_some_and(|q| self.exits(q))
    }
}

/// A run in progress.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Run {
    start: DateTime<Utc>,
    confirmed_at: Option<DateTime<Utc>>,
    peak: f64,
    peak_score: f64,
    peak_at: DateTime<Utc>,
}

impl Run {
    fn excursion(&self, end: Option<DateTime<Utc>>) -> Option<Excursion> {
        Some(Excursion {
            start: self.start,
            confirmed_at: self.confirmed_at?,
            end,
            peak: self.peak,
            peak_at: self.peak_at,
        })
    }
}

/// A rule's state over one sensor's readings, fed in measurement order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tracker {
    prev: Option<Point>,
    run: Option<Run>,
}

impl Tracker {
    /// The state after `p`, when `p` settles it (see [`Rule::settles`]): nothing open.
    pub fn settled_at(p: Point) -> Self {
        Self {
            prev: Some(p),
            run: None,
        }
    }

    /// The last reading fed.
    pub fn last(&self) -> Option<&Point> {
        self.prev.as_ref()
    }

    /// The excursion open now, if the run in progress is an alarm.
    pub fn open(&self) -> Option<Excursion> {
        self.run.and_then(|r| r.excursion(None))
    }

    /// Feeds `p`, later than every reading fed before (readings before the rule's
    /// `from` are skipped); returns the excursion `p` ended, if it was an alarm.
    pub fn feed(&mut self, rule: &Rule, p: Point) -> Option<Excursion> {
        if p.ts < rule.from {
            return None;
        }
        debug_assert!(self.prev.is_none_or(|prev| prev.key() < p.key()));
        if rule.condition == Condition::NoData {
            let gap = self.prev.and_then(|prev| {
                let secs = rule.measure(Some(&prev), &p)?;
                rule.enters(secs).then(|| Excursion {
                    start: prev.ts,
                    confirmed_at: prev.ts + rule.duration,
                    end: Some(p.ts),
                    peak: secs,
                    peak_at: prev.ts,
                })
            });
            self.prev = Some(p);
            return gap;
        }
        let q = rule.measure(self.prev.as_ref(), &p);
        self.prev = Some(p);
        let q = q?;
        match &mut self.run {
            Some(run) if rule.exits(q) => {
                let ended = run.excursion(Some(p.ts));
                self.run = None;
                ended
            }
            Some(run) => {
                let score = rule.score(q);
                if score > run.peak_score {
                    (run.peak, run.peak_score, run.peak_at) = (q, score, p.ts);
                }
                if run.confirmed_at.is_none() && p.ts - run.start >= rule.duration {
                    run.confirmed_at = Some(p.ts);
                }
                None
            }
            None if rule.enters(q) => {
                self.run = Some(Run {
                    start: p.ts,
                    confirmed_at: (rule.duration <= Duration::zero()).then_some(p.ts),
                    peak: q,
                    peak_score: rule.score(q),
                    peak_at: p.ts,
                });
                None
            }
            None => None,
        }
    }

    /// For a no-data rule, the silence open at `now` (by the clock): from the last
    /// reading, when longer than the rule's duration. Its peak is the duration (the
    /// silence's length is known when it ends).
    pub fn silence(&self, rule: &Rule, now: DateTime<Utc>) -> Option<Excursion> {
        let last = self.prev?;
        (rule.condition == Condition::NoData && now - last.ts > rule.duration).then(|| Excursion {
            start: last.ts,
            confirmed_at: last.ts + rule.duration,
            end: None,
            peak: rule.duration.num_milliseconds() as f64 / 1000.0,
            peak_at: last.ts,
        })
    }

    /// Feeds `points` (in order); returns the excursions they touched: every one that
    /// ended among them, then the one still open, if any (including one that started
    /// before them).
    pub fn feed_all(
        &mut self,
        rule: &Rule,
        points: impl IntoIterator<Item = Point>,
    ) -> Vec<Excursion> {
        let mut out: Vec<Excursion> = points
            .into_iter()
            .filter_map(|p| self.feed(rule, p))
            .collect();
        out.extend(self.open());
        out
    }
}

/// The rule's excursions over `points` (any order, repeats allowed) as the clock says
/// `now`: the semantics. `now` matters to no-data rules only (the silence since the last
/// reading).
pub fn excursions(rule: &Rule, points: &[Point], now: DateTime<Utc>) -> Vec<Excursion> {
    let mut sorted = points.to_vec();
    sorted.sort_by_key(Point::key);
    sorted.dedup_by_key(|p| p.id);
    let mut tracker = Tracker::default();
    let mut found = tracker.feed_all(rule, sorted);
    found.extend(tracker.silence(rule, now));
    found
}

/// What to do to the stored alarms of a rule and sensor so that they say what a
/// recomputation found.
#[derive(Debug, Clone, PartialEq)]
pub enum Change<K> {
    /// A new alarm `K` (already ended, when `end` is set).
    Open(K, Excursion),
    /// The stored alarm `K` now says this.
    Update(K, Excursion),
    /// The stored alarm `K` was not an excursion after all (late readings showed it).
    Retract(K),
}

/// Matches `computed` (sorted by start) with `stored` (the alarms the recomputation may
/// have touched, sorted by start): each computed excursion keeps the first stored alarm
/// it overlaps, which is updated if it differs; the others are opened (with a key from
/// `new_key`), and stored alarms left over are retracted. The changes come in an order
/// applying them one by one never leaves two excursions open; also returns each computed
/// excursion's key.
pub fn reconcile<K: Clone>(
    stored: &[(K, Excursion)],
    computed: &[Excursion],
    mut new_key: impl FnMut() -> K,
) -> (Vec<Change<K>>, Vec<K>) {
    let mut used = vec![false; stored.len()];
    let mut changes = Vec::new();
    let mut keys = Vec::with_capacity(computed.len());
    for c in computed {
        let found = stored
            .iter()
            .enumerate()
            .find(|(n, (_, s))| !used[*n] && s.overlaps(c));
        match found {
            Some((n, (key, s))) => {
                used[n] = true;
                if s != c {
                    changes.push(Change::Update(key.clone(), *c));
                }
                keys.push(key.clone());
            }
            None => {
                let key = new_key();
                changes.push(Change::Open(key.clone(), *c));
                keys.push(key);
            }
        }
    }
    for (n, (key, _)) in stored.iter().enumerate() {
        if !used[n] {
            changes.push(Change::Retract(key.clone()));
        }
    }
    // In an order that never has two excursions of the pair open at once (the database
    // allows one): first what ends or goes, then what opens.
    changes.sort_by_key(|c| match c {
        Change::Retract(_) => 0,
        Change::Update(_, e) if e.end.is_some() => 1,
        Change::Update(..) => 2,
        Change::Open(_, e) if e.end.is_some() => 3,
        Change::Open(..) => 4,
    });
    (changes, keys)
}
