//! The engine over the real stores: readings from the [`ReadingStore`], alarms and their
//! events in PostgreSQL, and the rules, reloaded when they change.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration as StdDuration, Instant},
};

use chrono::{DateTime, Duration, Utc};
use sqlx::{FromRow, PgPool};
use termopar_core::{
    ids::SensorId,
    store::{HistoryQuery, Position, ReadingStore, StoreError},
};
use uuid::Uuid;

use crate::{
    engine::{Book, History, Pending},
    eval::{Change, Condition, Excursion, Point, Rule},
};

/// Readings per page when reading a sensor's history back.
const HISTORY_PAGE: usize = 5000;
/// How often the evaluator looks whether the rules changed. A rule it learns of late
/// loses nothing: it starts without state, so its first evaluation reads every reading
/// since the rule's creation.
pub(crate) const RULES_CHECK_EVERY: StdDuration = StdDuration::from_millis(250);

/// A rule as stored.
#[derive(Debug, Clone, FromRow)]
pub(crate) struct RuleRow {
    pub id: Uuid,
    pub client_id: Uuid,
    pub sensor_id: Option<Uuid>,
    pub kind: String,
    pub threshold: Option<f64>,
    pub low: Option<f64>,
    pub high: Option<f64>,
    pub duration_secs: i32,
    pub hysteresis: f64,
    pub effective_from: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl RuleRow {
    /// Its semantics (`None` for a row the table's checks should have refused).
    pub(crate) fn rule(&self) -> Option<Rule> {
        let condition = match self.kind.as_str() {
            "above" => Condition::Above {
                threshold: self.threshold?,
            },
            "below" => Condition::Below {
                threshold: self.threshold?,
            },
            "outside" => Condition::Outside {
                low: self.low?,
                high: self.high?,
            },
            "rate" => Condition::Rate {
                per_minute: self.threshold?,
            },
            "no_data" => Condition::NoData,
            _ => return None,
        };
        Some(Rule {
            condition,
            duration: Duration::seconds(i64::from(self.duration_secs)),
            hysteresis: self.hysteresis,
            from: self.effective_from,
        })
    }
}

/// A rule the evaluator holds.
#[derive(Debug, Clone)]
pub(crate) struct Loaded {
    pub id: Uuid,
    pub rule: Rule,
    pub updated_at: DateTime<Utc>,
}

/// The enabled rules, by what they watch.
#[derive(Debug, Default)]
pub(crate) struct RuleSet {
    version: Option<i64>,
    checked: Option<Instant>,
    by_sensor: HashMap<Uuid, Vec<Arc<Loaded>>>,
    by_client: HashMap<Uuid, Vec<Arc<Loaded>>>,
    by_id: HashMap<Uuid, Arc<Loaded>>,
}

impl RuleSet {
    /// The rules watching `sensor` of `client`.
    pub(crate) fn of(&self, client: Uuid, sensor: Uuid) -> impl Iterator<Item = &Arc<Loaded>> {
        let one = self.by_sensor.get(&sensor).into_iter().flatten();
        let all = self.by_client.get(&client).into_iter().flatten();
        one.chain(all)
    }

    /// The rule `id`, if enabled.
    pub(crate) fn get(&self, id: Uuid) -> Option<&Arc<Loaded>> {
        self.by_id.get(&id)
    }

    /// Whether some enabled rule is a no-data rule.
    pub(crate) fn watches_silence(&self) -> bool {
        self.by_id
            .values()
            .any(|r| r.rule.condition == Condition::NoData)
    }

    /// Looks at the rules again at the next [`RuleSet::refresh`].
    pub(crate) fn stale(&mut self) {
        self.checked = None;
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.by_sensor.is_empty() && self.by_client.is_empty()
    }

    fn all(&self) -> impl Iterator<Item = &Arc<Loaded>> {
        self.by_sensor
            .values()
            .chain(self.by_client.values())
            .flatten()
    }

    /// Reloads the rules if they changed since the last look (at most every
    /// [`RULES_CHECK_EVERY`]); returns the ids of rules that changed or went away, whose
    /// state must be forgotten.
    pub(crate) async fn refresh(&mut self, pg: &PgPool) -> Result<Vec<Uuid>, sqlx::Error> {
        if self
            .checked
            .is_some_and(|at| at.elapsed() < RULES_CHECK_EVERY)
        {
            return Ok(Vec::new());
        }
        let version: i64 = sqlx::query_scalar("SELECT version FROM alarm_rules_version")
            .fetch_one(pg)
            .await?;
        self.checked = Some(Instant::now());
        if self.version == Some(version) {
            return Ok(Vec::new());
        }
        // Read in one snapshot with the version, so a change after it bumps it again.
        let mut tx = pg.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            .execute(&mut *tx)
            .await?;
        let version: i64 = sqlx::query_scalar("SELECT version FROM alarm_rules_version")
            .fetch_one(&mut *tx)
            .await?;
        let rows: Vec<RuleRow> = sqlx::query_as(
            "SELECT id, client_id, sensor_id, kind, threshold, low, high, duration_secs,
                    hysteresis, effective_from, updated_at
             FROM alarm_rules WHERE enabled",
        )
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let before: HashMap<Uuid, DateTime<Utc>> =
            self.all().map(|r| (r.id, r.updated_at)).collect();
        let mut next = RuleSet {
            version: Some(version),
            checked: self.checked,
            ..Default::default()
        };
        for row in rows {
            let Some(rule) = row.rule() else {
                tracing::error!(rule_id = %row.id, kind = row.kind, "alarm rule not understood; skipped");
                continue;
            };
            let loaded = Arc::new(Loaded {
                id: row.id,
                rule,
                updated_at: row.updated_at,
            });
            next.by_id.insert(row.id, Arc::clone(&loaded));
            match row.sensor_id {
                Some(sensor) => next.by_sensor.entry(sensor).or_default().push(loaded),
                None => next
                    .by_client
                    .entry(row.client_id)
                    .or_default()
                    .push(loaded),
            }
        }
        let after: HashMap<Uuid, DateTime<Utc>> =
            next.all().map(|r| (r.id, r.updated_at)).collect();
        let changed = before
            .into_iter()
            .filter(|(id, at)| after.get(id) != Some(at))
            .map(|(id, _)| id)
            .collect();
        metrics::gauge!("alarm_rules_loaded").set(after.len() as f64);
        *self = next;
        Ok(changed)
    }
}

/// The readings and alarms an evaluation reads and writes.
#[derive(Clone)]
pub(crate) struct PgStores {
    pub pg: PgPool,
    pub readings: ReadingStore,
}

impl History for PgStores {
    type Error = StoreError;

    async fn points(&self, sensor: Uuid, from: DateTime<Utc>) -> Result<Vec<Point>, StoreError> {
        let mut out = Vec::new();
        let mut position = Position::Offset(0);
        loop {
            let page = self
                .readings
                .history(&HistoryQuery {
                    sensor: SensorId(sensor),
                    from: Some(from),
                    to: None,
                    position,
                    limit: HISTORY_PAGE,
                })
                .await?;
            out.extend(page.readings.iter().map(|r| Point {
                ts: r.ts,
                id: r.id,
                value: r.temperature.get(),
            }));
            match (page.more, page.readings.last()) {
                (true, Some(last)) => position = Position::After(last.ts, last.id),
                _ => break,
            }
        }
        out.reverse();
        metrics::counter!("alarm_history_readings_total").increment(out.len() as u64);
        Ok(out)
    }
}

/// An alarm's facts as stored.
type StoredRow = (
    Uuid,
    DateTime<Utc>,
    DateTime<Utc>,
    Option<DateTime<Utc>>,
    f64,
    DateTime<Utc>,
);

impl Book for PgStores {
    type Error = sqlx::Error;

    async fn touched(
        &self,
        rule: Uuid,
        sensor: Uuid,
        since: DateTime<Utc>,
        after: Option<DateTime<Utc>>,
    ) -> Result<Vec<(Uuid, Excursion)>, sqlx::Error> {
        let rows: Vec<StoredRow> = sqlx::query_as(
            "SELECT id, started_at, confirmed_at, ended_at, peak, peak_at FROM alarms
             WHERE rule_id = $1 AND sensor_id = $2 AND state <> 'retracted'
               AND started_at >= $4
               AND ($3::timestamptz IS NULL OR ended_at IS NULL OR ended_at > $3)
             ORDER BY started_at, id",
        )
        .bind(rule)
        .bind(sensor)
        .bind(after)
        .bind(since)
        .fetch_all(&self.pg)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(id, start, confirmed_at, end, peak, peak_at)| {
                (
                    id,
                    Excursion {
                        start,
                        confirmed_at,
                        end,
                        peak,
                        peak_at,
                    },
                )
            })
            .collect())
    }

    /// In four statements whatever the number of changes (what ends or goes, then what
    /// opens: one alarm of a pair open at a time), then the events: in one statement for
    /// rules without recipients, one by one (with their notifications) for the others.
    async fn apply(&self, pending: &[Pending]) -> Result<(), sqlx::Error> {
        let mut retracts: Vec<Uuid> = Vec::new();
        let mut closing: Vec<(Uuid, Excursion)> = Vec::new();
        let mut opening: Vec<(Uuid, Excursion)> = Vec::new();
        let mut opens: Vec<(Uuid, Uuid, Uuid, Excursion)> = Vec::new();
        for p in pending {
            for change in &p.changes {
                match change {
                    Change::Retract(id) => retracts.push(*id),
                    Change::Update(id, e) if e.end.is_some() => closing.push((*id, *e)),
                    Change::Update(id, e) => opening.push((*id, *e)),
                    Change::Open(id, e) => opens.push((*id, p.rule, p.sensor, *e)),
                }
            }
        }
        let mut tx = self.pg.begin().await?;
        // Each alarm's events, in order.
        let mut events: Vec<(Uuid, &'static str, Option<DateTime<Utc>>)> = Vec::new();
        if !retracts.is_empty() {
            let done: Vec<Uuid> = sqlx::query_scalar(
                "UPDATE alarms SET state = 'retracted', updated_at = now()
                 WHERE id = ANY($1) AND state <> 'retracted' RETURNING id",
            )
            .bind(&retracts)
            .fetch_all(&mut *tx)
            .await?;
            metrics::counter!("alarms_retracted_total").increment(done.len() as u64);
            events.extend(done.into_iter().map(|id| (id, "retracted", None)));
        }
        for updates in [closing, opening] {
            for (id, was, now) in update(&mut tx, &updates).await? {
                match (was, now) {
                    (None, Some(end)) => {
                        metrics::counter!("alarms_cleared_total").increment(1);
                        events.push((id, "cleared", Some(end)));
                    }
                    (Some(_), None) => events.push((id, "reopened", None)),
                    _ => {}
                }
            }
        }
        if !opens.is_empty() {
            // The rule's client and severity; nothing when the rule or the sensor was
            // deleted meanwhile.
            let inserted: HashSet<Uuid> = sqlx::query_scalar(
                "INSERT INTO alarms (id, rule_id, client_id, sensor_id, severity, state,
                     started_at, confirmed_at, ended_at, peak, peak_at)
                 SELECT c.id, r.id, r.client_id, s.id, r.severity,
                        CASE WHEN c.ended IS NULL THEN 'active' ELSE 'cleared' END,
                        c.start, c.confirmed, c.ended, c.peak, c.peak_at
                 FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::timestamptz[],
                             $5::timestamptz[], $6::timestamptz[], $7::float8[], $8::timestamptz[])
                      WITH ORDINALITY AS c(id, rule, sensor, start, confirmed, ended, peak, peak_at, n)
                 JOIN alarm_rules r ON r.id = c.rule
                 JOIN sensors s ON s.id = c.sensor
                 ORDER BY c.n
                 RETURNING id",
            )
            .bind(opens.iter().map(|o| o.0).collect::<Vec<_>>())
            .bind(opens.iter().map(|o| o.1).collect::<Vec<_>>())
            .bind(opens.iter().map(|o| o.2).collect::<Vec<_>>())
            .bind(opens.iter().map(|o| o.3.start).collect::<Vec<_>>())
            .bind(opens.iter().map(|o| o.3.confirmed_at).collect::<Vec<_>>())
            .bind(opens.iter().map(|o| o.3.end).collect::<Vec<_>>())
            .bind(opens.iter().map(|o| o.3.peak).collect::<Vec<_>>())
            .bind(opens.iter().map(|o| o.3.peak_at).collect::<Vec<_>>())
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .collect();
            metrics::counter!("alarms_opened_total").increment(inserted.len() as u64);
            for (id, _, _, e) in opens.iter().filter(|o| inserted.contains(&o.0)) {
                events.push((*id, "opened", Some(e.confirmed_at)));
                if let Some(end) = e.end {
                    events.push((*id, "cleared", Some(end)));
                }
            }
        }
        record(&mut tx, &events, None).await?;
        tx.commit().await
    }
}

/// Closes the open alarms of `rule` now (its condition changed), with their events and
/// notifications; returns how many.
pub(crate) async fn close_open(
    tx: &mut sqlx::PgConnection,
    rule: Uuid,
) -> Result<usize, sqlx::Error> {
    let closed: Vec<(Uuid, DateTime<Utc>)> = sqlx::query_as(
        "UPDATE alarms SET state = 'cleared', ended_at = greatest(now(), started_at),
             updated_at = now()
         WHERE rule_id = $1 AND state = 'active' RETURNING id, ended_at",
    )
    .bind(rule)
    .fetch_all(&mut *tx)
    .await?;
    let events: Vec<(Uuid, &'static str, Option<DateTime<Utc>>)> = closed
        .iter()
        .map(|(id, at)| (*id, "cleared", Some(*at)))
        .collect();
    record(tx, &events, Some("the rule changed")).await?;
    Ok(closed.len())
}

/// Updates alarms to say what `updates` do; returns each one's end before and after.
async fn update(
    tx: &mut sqlx::PgConnection,
    updates: &[(Uuid, Excursion)],
) -> Result<Vec<(Uuid, Option<DateTime<Utc>>, Option<DateTime<Utc>>)>, sqlx::Error> {
    if updates.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<Uuid> = updates.iter().map(|u| u.0).collect();
    sqlx::query_as(
        "UPDATE alarms a SET started_at = c.start, confirmed_at = c.confirmed, ended_at = c.ended,
             peak = c.peak, peak_at = c.peak_at, updated_at = now(),
             state = CASE WHEN c.ended IS NULL THEN 'active' ELSE 'cleared' END
         FROM unnest($1::uuid[], $2::timestamptz[], $3::timestamptz[], $4::timestamptz[],
                     $5::float8[], $6::timestamptz[]) AS c(id, start, confirmed, ended, peak, peak_at),
              (SELECT id, ended_at FROM alarms WHERE id = ANY($1) FOR UPDATE) old
         WHERE a.id = c.id AND old.id = c.id
         RETURNING a.id, old.ended_at, a.ended_at",
    )
    .bind(&ids)
    .bind(updates.iter().map(|u| u.1.start).collect::<Vec<_>>())
    .bind(updates.iter().map(|u| u.1.confirmed_at).collect::<Vec<_>>())
    .bind(updates.iter().map(|u| u.1.end).collect::<Vec<_>>())
    .bind(updates.iter().map(|u| u.1.peak).collect::<Vec<_>>())
    .bind(updates.iter().map(|u| u.1.peak_at).collect::<Vec<_>>())
    .fetch_all(&mut *tx)
    .await
}

/// Records `events` (alarm, kind, event time or now), with `comment`: those of alarms
/// whose rule has recipients one by one with their notifications (see [`event`]), the
/// rest at once.
async fn record(
    tx: &mut sqlx::PgConnection,
    events: &[(Uuid, &'static str, Option<DateTime<Utc>>)],
    comment: Option<&str>,
) -> Result<(), sqlx::Error> {
    if events.is_empty() {
        return Ok(());
    }
    let alarms: Vec<Uuid> = events.iter().map(|e| e.0).collect();
    let notifying: HashSet<Uuid> = sqlx::query_scalar(
        "SELECT a.id FROM alarms a JOIN alarm_rules r ON r.id = a.rule_id
         WHERE a.id = ANY($1) AND (cardinality(r.emails) > 0 OR r.webhook_url IS NOT NULL)",
    )
    .bind(&alarms)
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .collect();
    type Event = (Uuid, &'static str, Option<DateTime<Utc>>);
    let (told, quiet): (Vec<&Event>, Vec<&Event>) =
        events.iter().partition(|e| notifying.contains(&e.0));
    if !quiet.is_empty() {
        sqlx::query(
            "INSERT INTO alarm_events (alarm_id, client_id, kind, at, comment)
             SELECT e.alarm, a.client_id, e.kind, coalesce(e.at, now()), $4
             FROM unnest($1::uuid[], $2::text[], $3::timestamptz[]) WITH ORDINALITY
                  AS e(alarm, kind, at, n)
             JOIN alarms a ON a.id = e.alarm
             ORDER BY e.n",
        )
        .bind(quiet.iter().map(|e| e.0).collect::<Vec<_>>())
        .bind(quiet.iter().map(|e| e.1).collect::<Vec<_>>())
        .bind(quiet.iter().map(|e| e.2).collect::<Vec<_>>())
        .bind(comment)
        .execute(&mut *tx)
        .await?;
    }
    for (id, kind, at) in told {
        event(tx, *id, kind, *at, comment).await?;
    }
    Ok(())
}

/// Records an event of alarm `id`, at `at` (event time) or now, and enqueues its
/// notifications in the same transaction when the rule has recipients: an opening
/// unless another opening of the same rule and sensor was notified within the rule's
/// quiet period, and what follows an opening only if the opening was notified.
async fn event(
    tx: &mut sqlx::PgConnection,
    id: Uuid,
    kind: &str,
    at: Option<DateTime<Utc>>,
    comment: Option<&str>,
) -> Result<(), sqlx::Error> {
    let recorded: Option<(i64, bool, bool, bool)> = sqlx::query_as(
        "WITH a AS (
             SELECT a.id, a.client_id, a.rule_id, a.sensor_id, r.quiet_secs,
                    cardinality(r.emails) > 0 AS by_email, r.webhook_url IS NOT NULL AS by_webhook
             FROM alarms a JOIN alarm_rules r ON r.id = a.rule_id WHERE a.id = $1
         ), decided AS (
             SELECT a.*, (a.by_email OR a.by_webhook) AND CASE
                 WHEN $2 = 'opened' THEN NOT EXISTS (
                     SELECT 1 FROM alarms o JOIN alarm_events e ON e.alarm_id = o.id
                     WHERE o.rule_id = a.rule_id AND o.sensor_id = a.sensor_id
                       AND e.kind = 'opened' AND e.notified
                       AND e.recorded_at > now() - make_interval(secs => a.quiet_secs))
                 ELSE EXISTS (
                     SELECT 1 FROM alarm_events e
                     WHERE e.alarm_id = a.id AND e.kind = 'opened' AND e.notified)
             END AS notify
             FROM a
         )
         INSERT INTO alarm_events (alarm_id, client_id, kind, at, notified, comment)
         SELECT id, client_id, $2, coalesce($3, now()), notify, $4 FROM decided
         RETURNING id, notified, (SELECT by_email FROM decided), (SELECT by_webhook FROM decided)",
    )
    .bind(id)
    .bind(kind)
    .bind(at)
    .bind(comment)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((event_id, true, by_email, by_webhook)) = recorded else {
        return Ok(());
    };
    let notice = [crate::notify::Notice {
        event_id,
        enqueued_at: Utc::now(),
    }];
    for (wanted, queue) in [
        (by_email, crate::notify::EMAIL),
        (by_webhook, crate::notify::WEBHOOK),
    ] {
        if wanted {
            termopar_leads::jobs::push(tx, queue, &notice, crate::notify::MAX_ATTEMPTS).await?;
        }
    }
    Ok(())
}

/// The sensors gone silent under a no-data rule at `now` with no alarm open for it yet:
/// (rule, sensor, the sensor's newest reading).
pub(crate) async fn silent(
    pg: &PgPool,
    now: DateTime<Utc>,
) -> Result<Vec<(Uuid, Uuid, DateTime<Utc>)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT r.id, s.id, l.ts
         FROM alarm_rules r
         JOIN sensors s ON s.id = r.sensor_id OR (r.sensor_id IS NULL AND s.client_id = r.client_id)
         JOIN sensor_latest l ON l.sensor_id = s.id
         WHERE r.kind = 'no_data' AND r.enabled
           AND l.ts >= r.effective_from
           AND l.ts + make_interval(secs => r.duration_secs) < $1
           AND NOT EXISTS (SELECT 1 FROM alarms a
                           WHERE a.rule_id = r.id AND a.sensor_id = s.id AND a.state = 'active')",
    )
    .bind(now)
    .fetch_all(pg)
    .await
}
