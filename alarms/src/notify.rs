//! Notifications of alarms: durable jobs on the lead pipeline's job system, one per
//! channel per event (enqueued in the transaction that records the event), run by
//! workers that e-mail over SMTP and post signed webhooks, retried with backoff. What
//! an attempt delivered is recorded per target, so a retry sends only the rest.

use apalis::prelude::{AbortError, Attempt, BoxDynError, Data};
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use lettre::{
    message::{header::ContentType, Mailbox},
    AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor,
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::Sha256;
use sqlx::{FromRow, PgPool};
use termopar_core::tasks::Tasks;
use termopar_leads::{
    jobs::{observe, spawn_worker, Wakeups, ALARM_QUEUES},
    LeadsSettings,
};
use uuid::Uuid;

/// The e-mail queue.
pub(crate) const EMAIL: &str = ALARM_QUEUES[0];
/// The webhook queue.
pub(crate) const WEBHOOK: &str = ALARM_QUEUES[1];
/// Tries of a notification before it is dead (about ten minutes with the default
/// backoff).
pub(crate) const MAX_ATTEMPTS: u32 = 12;

/// A notification job: the event it tells of.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Notice {
    pub event_id: i64,
    pub enqueued_at: DateTime<Utc>,
}

/// An event with what its notifications say.
#[derive(Debug, Clone, FromRow)]
struct Told {
    event_id: i64,
    kind: String,
    at: DateTime<Utc>,
    alarm_id: Uuid,
    state: String,
    severity: String,
    started_at: DateTime<Utc>,
    confirmed_at: DateTime<Utc>,
    ended_at: Option<DateTime<Utc>>,
    peak: f64,
    peak_at: DateTime<Utc>,
    client_id: Uuid,
    sensor_id: Uuid,
    sensor_name: String,
    rule_id: Uuid,
    rule_name: String,
    rule_kind: String,
    threshold: Option<f64>,
    low: Option<f64>,
    high: Option<f64>,
    duration_secs: i32,
    emails: Vec<String>,
    webhook_url: Option<String>,
    webhook_secret: Option<String>,
}

impl Told {
    async fn load(pg: &PgPool, event_id: i64) -> Result<Option<Self>, sqlx::Error> {
        sqlx::query_as(
            "SELECT e.id AS event_id, e.kind, e.at, a.id AS alarm_id, a.state, a.severity,
                    a.started_at, a.confirmed_at, a.ended_at, a.peak, a.peak_at, a.client_id,
                    a.sensor_id, s.name AS sensor_name, r.id AS rule_id, r.name AS rule_name,
                    r.kind AS rule_kind, r.threshold, r.low, r.high, r.duration_secs, r.emails,
                    r.webhook_url, r.webhook_secret
             FROM alarm_events e
             JOIN alarms a ON a.id = e.alarm_id
             JOIN alarm_rules r ON r.id = a.rule_id
             JOIN sensors s ON s.id = a.sensor_id
             WHERE e.id = $1",
        )
        .bind(event_id)
        .fetch_optional(pg)
        .await
    }

    /// The webhook's body.
    fn body(&self) -> serde_json::Value {
        json!({
            "event": {"id": self.event_id, "kind": self.kind, "at": self.at},
            "alarm": {
                "id": self.alarm_id, "state": self.state, "severity": self.severity,
                "started_at": self.started_at, "confirmed_at": self.confirmed_at,
                "ended_at": self.ended_at, "peak": self.peak, "peak_at": self.peak_at,
            },
            "rule": {
                "id": self.rule_id, "name": self.rule_name, "kind": self.rule_kind,
                "threshold": self.threshold, "low": self.low, "high": self.high,
                "duration_secs": self.duration_secs,
            },
            "sensor": {"id": self.sensor_id, "name": self.sensor_name},
            "client_id": self.client_id,
        })
    }

    /// The e-mail's subject and text.
    fn mail(&self) -> (String, String) {
        let what = match self.kind.as_str() {
            "opened" => "ALARM",
            "cleared" => "Cleared",
            "reopened" => "ALARM again",
            _ => "Withdrawn",
        };
        let subject = format!(
            "[{}] {what}: {} on {}",
            self.severity, self.rule_name, self.sensor_name
        );
        let unit = if self.rule_kind == "rate" {
            " °C/min"
        } else if self.rule_kind == "no_data" {
            " s without readings"
        } else {
            " °C"
        };
        let mut text = format!(
            "{what}: rule \"{}\" on sensor \"{}\".\n\nBegan: {}\nAlarm since: {}\n",
            self.rule_name, self.sensor_name, self.started_at, self.confirmed_at
        );
        if let Some(end) = self.ended_at {
            text.push_str(&format!("Ended: {end}\n"));
        }
        text.push_str(&format!("Peak: {}{unit} at {}\n", self.peak, self.peak_at));
        if self.kind == "retracted" {
            text.push_str("\nReadings that arrived late show this was no excursion after all.\n");
        }
        text.push_str(&format!("\nAlarm {}\n-- termopar\n", self.alarm_id));
        (subject, text)
    }
}

/// What the workers need.
#[derive(Clone)]
pub(crate) struct Notifier {
    pg: PgPool,
    http: reqwest::Client,
    mailer: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
}

/// Starts the notification workers on `tasks`, woken by the job system's `wakeups` (its
/// settings and SMTP server are the lead pipeline's).
pub fn start_workers(
    settings: &LeadsSettings,
    pg: &PgPool,
    tasks: &Tasks,
    wakeups: &Wakeups,
) -> anyhow::Result<()> {
    let (mailer, from) = termopar_leads::mailer(&settings.smtp)?;
    let notifier = Notifier {
        pg: pg.clone(),
        http: reqwest::Client::builder()
            .timeout(settings.http_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()?,
        mailer,
        from,
    };
    spawn_worker(tasks, pg, settings, wakeups, EMAIL, notifier.clone(), email);
    spawn_worker(tasks, pg, settings, wakeups, WEBHOOK, notifier, webhook);
    Ok(())
}

async fn email(notice: Notice, n: Data<Notifier>, attempt: Attempt) -> Result<(), BoxDynError> {
    let n = (*n).clone();
    observe(
        EMAIL,
        notice.enqueued_at,
        &attempt,
        MAX_ATTEMPTS,
        async move {
            let Some(told) = Told::load(&n.pg, notice.event_id).await? else {
                return Ok(());
            };
            let (subject, text) = told.mail();
            for to in &told.emails {
                if n.delivered(told.event_id, "email", to).await? {
                    continue;
                }
                let Ok(address) = to.parse::<Mailbox>() else {
                    tracing::warn!(to, rule_id = %told.rule_id, "not an e-mail address; skipped");
                    continue;
                };
                let message = Message::builder()
                    .from(n.from.clone())
                    .to(address)
                    .message_id(Some(format!(
                        "<alarm-event-{}-{}@termopar>",
                        told.event_id,
                        hex::encode(&<Sha256 as sha2::Digest>::digest(to.as_bytes())[..8])
                    )))
                    .subject(subject.clone())
                    .header(ContentType::TEXT_PLAIN)
                    .body(text.clone())?;
                n.mailer.send(message).await?;
                n.record(told.event_id, "email", to).await?;
            }
            Ok(())
        },
    )
    .await
}

async fn webhook(notice: Notice, n: Data<Notifier>, attempt: Attempt) -> Result<(), BoxDynError> {
    let n = (*n).clone();
    observe(
        WEBHOOK,
        notice.enqueued_at,
        &attempt,
        MAX_ATTEMPTS,
        async move {
            let Some(told) = Told::load(&n.pg, notice.event_id).await? else {
                return Ok(());
            };
            let Some(url) = told.webhook_url.clone() else {
                return Ok(());
            };
            if n.delivered(told.event_id, "webhook", &url).await? {
                return Ok(());
            }
            let body = serde_json::to_vec(&told.body())?;
            let timestamp = Utc::now().timestamp().to_string();
            let mut request = n
                .http
                .post(&url)
                .header("content-type", "application/json")
                .header("x-termopar-event", &told.kind)
                .header("x-termopar-delivery", told.event_id.to_string())
                .header("x-termopar-timestamp", &timestamp);
            if let Some(secret) = &told.webhook_secret {
                request = request.header("x-termopar-signature", sign(secret, &timestamp, &body));
            }
            let status = request.body(body).send().await?.status();
            if status.is_success() {
                n.record(told.event_id, "webhook", &url).await?;
                return Ok(());
            }
            let retry = status.is_server_error()
                || status == reqwest::StatusCode::REQUEST_TIMEOUT
                || status == reqwest::StatusCode::TOO_MANY_REQUESTS;
            let error = format!("the webhook answered {status}");
            if retry {
                Err(error.into())
            } else {
                Err(AbortError::new(error).into())
            }
        },
    )
    .await
}

/// `sha256=` and the hex HMAC-SHA256, keyed by `secret`, of `{timestamp}.{body}`: what
/// a receiver recomputes to trust a notification (and the timestamp, to refuse replays).
pub fn sign(secret: &str, timestamp: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

impl Notifier {
    async fn delivered(
        &self,
        event: i64,
        channel: &str,
        target: &str,
    ) -> Result<bool, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM alarm_deliveries
                            WHERE event_id = $1 AND channel = $2 AND target = $3)",
        )
        .bind(event)
        .bind(channel)
        .bind(target)
        .fetch_one(&self.pg)
        .await
    }

    async fn record(&self, event: i64, channel: &str, target: &str) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO alarm_deliveries (event_id, channel, target) VALUES ($1, $2, $3)
             ON CONFLICT DO NOTHING",
        )
        .bind(event)
        .bind(channel)
        .bind(target)
        .execute(&self.pg)
        .await?;
        metrics::counter!("alarm_notifications_total", "channel" => channel.to_owned())
            .increment(1);
        Ok(())
    }
}
