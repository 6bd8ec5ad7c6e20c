//! `/alarm-rules` (operators edit, viewers read) and `/alarms` (the excursions found,
//! newest first, acknowledged by operators with a comment), tenant-scoped.

use chrono::{DateTime, Utc};
use futures::{stream::BoxStream, StreamExt};
use poem::web::Data;
use poem_openapi::{
    param::{Path, Query},
    payload::{EventStream, Json},
    Enum, Object, OpenApi,
};
use sqlx::FromRow;
use uuid::Uuid;

use termopar_web::{
    openapi::Constraint,
    pagination::{Listing, Page, PageParams},
    responses::{Created, Deleted, Found},
    validate, ApiError, ApiResult, BearerAuth,
};

use crate::Alarms;

/// The alarms product's group in the OpenAPI document.
#[derive(poem_openapi::Tags)]
enum AlarmTags {
    /// Alarms: rules on temperatures, and the excursions they found.
    Alarms,
}

/// What a rule watches for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "snake_case")]
pub(crate) enum RuleKind {
    /// Above `threshold` °C.
    Above,
    /// Below `threshold` °C.
    Below,
    /// Outside `low`..`high` °C.
    Outside,
    /// Changing faster than `threshold` °C a minute, either way.
    Rate,
    /// No reading for longer than `duration_secs` (after the sensor's first reading).
    NoData,
}

impl RuleKind {
    fn parse(kind: &str) -> Option<Self> {
        [
            Self::Above,
            Self::Below,
            Self::Outside,
            Self::Rate,
            Self::NoData,
        ]
        .into_iter()
        .find(|k| k.as_str() == kind)
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Above => "above",
            Self::Below => "below",
            Self::Outside => "outside",
            Self::Rate => "rate",
            Self::NoData => "no_data",
        }
    }
}

/// How much an alarm matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "snake_case")]
pub(crate) enum Severity {
    /// For the record.
    Info,
    /// Someone should look.
    Warning,
    /// Act now.
    Critical,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Self::Info => "info",
            Self::Warning => "warning",
            Self::Critical => "critical",
        }
    }
}

/// An alarm rule.
#[derive(Debug, Clone, Object, FromRow)]
pub(crate) struct AlarmRule {
    pub id: Uuid,
    /// The client whose sensors it watches.
    pub client_id: Uuid,
    /// The one sensor it watches; absent: every sensor of the client.
    pub sensor_id: Option<Uuid>,
    pub name: String,
    /// `above`, `below`, `outside`, `rate` or `no_data`.
    pub kind: String,
    /// °C for `above` and `below`; °C a minute for `rate`.
    pub threshold: Option<f64>,
    /// The band's low end, for `outside`.
    pub low: Option<f64>,
    /// The band's high end, for `outside`.
    pub high: Option<f64>,
    /// How long the condition must hold before it is an alarm (for `no_data`: the
    /// silence), in seconds.
    pub duration_secs: i32,
    /// How far back inside the limit a reading must be to end an excursion.
    pub hysteresis: f64,
    /// `info`, `warning` or `critical`.
    pub severity: String,
    /// Disabled rules are not evaluated.
    pub enabled: bool,
    /// Who is e-mailed when its alarms open, clear, reopen or are retracted.
    pub emails: Vec<String>,
    /// Where those notifications are posted as JSON.
    pub webhook_url: Option<String>,
    /// Whether the posts are signed (`X-Termopar-Signature`); the secret is never shown.
    pub has_webhook_secret: bool,
    /// After a notified opening, further openings of the same sensor under this rule are
    /// not notified for this long, in seconds.
    pub quiet_secs: i32,
    /// Readings measured before this are not evaluated by it (its creation).
    pub effective_from: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

macro_rules! rule_columns {
    () => {
        "id, client_id, sensor_id, name, kind, threshold, low, high, duration_secs, \
         hysteresis, severity, enabled, emails, webhook_url, \
         webhook_secret IS NOT NULL AS has_webhook_secret, quiet_secs, effective_from, \
         created_at, updated_at"
    };
}

/// A new alarm rule.
#[derive(Debug, Object)]
pub(crate) struct NewAlarmRule {
    /// Owning client: admins give it or a `sensor_id`; operators may omit it.
    pub client_id: Option<Uuid>,
    /// One sensor of the client; absent: every sensor of the client.
    pub sensor_id: Option<Uuid>,
    /// Name (1 to 200 characters).
    pub name: String,
    pub kind: RuleKind,
    /// °C for `above` and `below`; °C a minute (above 0) for `rate`.
    pub threshold: Option<f64>,
    /// For `outside`: the band's low end.
    pub low: Option<f64>,
    /// For `outside`: the band's high end.
    pub high: Option<f64>,
    /// Seconds the condition must hold (0, the default, to a year).
    #[oai(validator(maximum(value = "31622400")))]
    pub duration_secs: Option<u32>,
    /// 0 (the default) or more; less than the band's half width for `outside` and less
    /// than the threshold for `rate`.
    pub hysteresis: Option<f64>,
    /// Default `warning`.
    pub severity: Option<Severity>,
    /// Default true.
    pub enabled: Option<bool>,
    #[oai(flatten)]
    pub recipients: Recipients,
}

/// Who hears of a rule's alarms.
#[derive(Debug, Object)]
pub(crate) struct Recipients {
    /// E-mail addresses (at most 20).
    pub emails: Option<Vec<String>>,
    /// An http(s) URL the notifications are posted to as JSON (empty to remove it).
    pub webhook_url: Option<String>,
    /// 16 to 200 characters keying the posts' HMAC-SHA256 signature (empty to remove
    /// it).
    pub webhook_secret: Option<String>,
    /// Seconds after a notified opening during which openings of the same sensor are
    /// not notified (0, the default, to a week).
    #[oai(validator(maximum(value = "604800")))]
    pub quiet_secs: Option<u32>,
}

/// A rule's recipients, checked: `None` for what the request left as it is, and
/// `Some(None)` for what it removed.
struct CheckedRecipients {
    emails: Option<Vec<String>>,
    webhook_url: Option<Option<String>>,
    webhook_secret: Option<Option<String>>,
}

fn recipients(r: &Recipients) -> ApiResult<CheckedRecipients> {
    let emails = match &r.emails {
        Some(list) if list.len() > 20 => {
            return Err(ApiError::validation("emails", "at most 20 addresses"))
        }
        Some(list) => {
            let mut out: Vec<String> = Vec::with_capacity(list.len());
            for e in list {
                let e = e.trim().to_owned();
                validate::email(&e).map_err(|_| {
                    ApiError::validation("emails", format!("{e:?} is not an e-mail address"))
                })?;
                if !out.contains(&e) {
                    out.push(e);
                }
            }
            Some(out)
        }
        None => None,
    };
    let webhook_url = match r.webhook_url.as_deref().map(str::trim) {
        Some("") => Some(None),
        Some(u) => {
            let parsed = url::Url::parse(u).ok().filter(|p| {
                matches!(p.scheme(), "http" | "https") && p.host_str().is_some() && u.len() <= 2000
            });
            if parsed.is_none() {
                return Err(ApiError::validation(
                    "webhook_url",
                    "webhook_url must be an http(s) URL of at most 2000 characters",
                ));
            }
            Some(Some(u.to_owned()))
        }
        None => None,
    };
    let webhook_secret = match r.webhook_secret.as_deref() {
        Some("") => Some(None),
        Some(secret) if !(16..=200).contains(&secret.chars().count()) => {
            return Err(ApiError::validation(
                "webhook_secret",
                "webhook_secret must be 16 to 200 characters",
            ))
        }
        Some(secret) => Some(Some(secret.to_owned())),
        None => None,
    };
    Ok(CheckedRecipients {
        emails,
        webhook_url,
        webhook_secret,
    })
}

/// Changes to a rule; absent fields stay as they are. A change to what it watches for
/// (`kind`, the limits, `duration_secs`, `hysteresis`) takes effect from now on: the
/// rule's alarms found so far stay as they were, those still open are closed now, and
/// readings measured from now on are evaluated by the new definition.
#[derive(Debug, Object)]
pub(crate) struct AlarmRulePatch {
    pub name: Option<String>,
    pub severity: Option<Severity>,
    pub enabled: Option<bool>,
    /// A new kind: its limits come from this patch alone.
    pub kind: Option<RuleKind>,
    pub threshold: Option<f64>,
    pub low: Option<f64>,
    pub high: Option<f64>,
    #[oai(validator(maximum(value = "31622400")))]
    pub duration_secs: Option<u32>,
    pub hysteresis: Option<f64>,
    #[oai(flatten)]
    pub recipients: Recipients,
}

/// What the handlers check of the request bodies, for the OpenAPI document.
pub const CONSTRAINTS: &[Constraint] = &[
    Constraint::length("NewAlarmRule", "name", 1, 200),
    Constraint::length("AlarmRulePatch", "name", 1, 200),
    Constraint::length("Acknowledgement", "comment", 0, 2000),
];

fn finite(field: &str, v: f64) -> ApiResult<f64> {
    if v.is_finite() && v.abs() <= 1e6 {
        Ok(v)
    } else {
        Err(ApiError::validation(
            field,
            format!("{field} must be a number of at most 1e6"),
        ))
    }
}

/// A condition's numbers, checked.
struct Numbers {
    threshold: Option<f64>,
    low: Option<f64>,
    high: Option<f64>,
    hysteresis: f64,
}

/// What a rule is asked to watch for (a new rule's, or a changed one's).
struct Wanted {
    kind: RuleKind,
    threshold: Option<f64>,
    low: Option<f64>,
    high: Option<f64>,
    duration_secs: Option<u32>,
    hysteresis: Option<f64>,
}

impl From<&NewAlarmRule> for Wanted {
    fn from(r: &NewAlarmRule) -> Self {
        Self {
            kind: r.kind,
            threshold: r.threshold,
            low: r.low,
            high: r.high,
            duration_secs: r.duration_secs,
            hysteresis: r.hysteresis,
        }
    }
}

impl Wanted {
    /// `current` changed by `patch`, when the patch changes what it watches for: a new
    /// kind takes its limits from the patch alone, the same kind keeps those not given.
    fn changed(current: &AlarmRule, patch: &AlarmRulePatch) -> Option<Self> {
        let touched = patch.kind.is_some()
            || patch.threshold.is_some()
            || patch.low.is_some()
            || patch.high.is_some()
            || patch.duration_secs.is_some()
            || patch.hysteresis.is_some();
        if !touched {
            return None;
        }
        let was = RuleKind::parse(&current.kind);
        let kind = patch.kind.or(was).unwrap_or(RuleKind::Above);
        let keep = was == Some(kind);
        let limit = |new: Option<f64>, old: Option<f64>| new.or(if keep { old } else { None });
        Some(Self {
            kind,
            threshold: limit(patch.threshold, current.threshold),
            low: limit(patch.low, current.low),
            high: limit(patch.high, current.high),
            duration_secs: patch
                .duration_secs
                .or(u32::try_from(current.duration_secs).ok()),
            hysteresis: patch.hysteresis.or(Some(current.hysteresis)),
        })
    }
}

/// The condition's numbers, checked.
fn condition(body: &Wanted) -> ApiResult<Numbers> {
    let hysteresis = finite("hysteresis", body.hysteresis.unwrap_or(0.0))?;
    if hysteresis < 0.0 {
        return Err(ApiError::validation(
            "hysteresis",
            "hysteresis must be 0 or more",
        ));
    }
    let absent = |field: &str, v: Option<f64>| match v {
        Some(_) => Err(ApiError::validation(
            field,
            format!(
                "{field} is not used by a rule of kind {}",
                body.kind.as_str()
            ),
        )),
        None => Ok(()),
    };
    let required = |field: &str, v: Option<f64>| {
        v.ok_or_else(|| {
            ApiError::validation(
                field,
                format!("a rule of kind {} needs {field}", body.kind.as_str()),
            )
        })
        .and_then(|v| finite(field, v))
    };
    match body.kind {
        RuleKind::NoData => {
            absent("threshold", body.threshold)?;
            absent("low", body.low)?;
            absent("high", body.high)?;
            if body.duration_secs.unwrap_or(0) == 0 {
                return Err(ApiError::validation(
                    "duration_secs",
                    "a no_data rule needs the silence's length, duration_secs, above 0",
                ));
            }
            if hysteresis != 0.0 {
                return Err(ApiError::validation(
                    "hysteresis",
                    "a no_data rule has no hysteresis",
                ));
            }
            Ok(Numbers {
                threshold: None,
                low: None,
                high: None,
                hysteresis,
            })
        }
        RuleKind::Outside => {
            absent("threshold", body.threshold)?;
            let (low, high) = (required("low", body.low)?, required("high", body.high)?);
            if low >= high {
                return Err(ApiError::validation("high", "high must be above low"));
            }
            if 2.0 * hysteresis >= high - low {
                return Err(ApiError::validation(
                    "hysteresis",
                    "hysteresis must be less than half the band's width",
                ));
            }
            Ok(Numbers {
                threshold: None,
                low: Some(low),
                high: Some(high),
                hysteresis,
            })
        }
        kind => {
            absent("low", body.low)?;
            absent("high", body.high)?;
            let threshold = required("threshold", body.threshold)?;
            if kind == RuleKind::Rate && threshold <= 0.0 {
                return Err(ApiError::validation("threshold", "a rate must be above 0"));
            }
            if kind == RuleKind::Rate && hysteresis >= threshold {
                return Err(ApiError::validation(
                    "hysteresis",
                    "hysteresis must be less than the rate",
                ));
            }
            Ok(Numbers {
                threshold: Some(threshold),
                low: None,
                high: None,
                hysteresis,
            })
        }
    }
}

/// A row of one client.
trait Owned {
    fn client(&self) -> Uuid;
}

impl Owned for AlarmRule {
    fn client(&self) -> Uuid {
        self.client_id
    }
}

impl Owned for Alarm {
    fn client(&self) -> Uuid {
        self.client_id
    }
}

/// Loads the `what` that `sql` selects by `$1 = id`, if the caller can see it (404
/// otherwise, also for other tenants').
async fn visible<T>(
    alarms: &Alarms,
    auth: &BearerAuth,
    sql: &'static str,
    id: Uuid,
    what: &str,
) -> ApiResult<T>
where
    T: for<'r> FromRow<'r, sqlx::postgres::PgRow> + Owned + Send + Unpin,
{
    sqlx::query_as::<_, T>(sql)
        .bind(id)
        .fetch_optional(alarms.pg())
        .await?
        .filter(|row| auth.0.sees_client(row.client()))
        .ok_or_else(|| ApiError::not_found(what))
}

/// Loads a rule the caller can see.
async fn visible_rule(alarms: &Alarms, auth: &BearerAuth, id: Uuid) -> ApiResult<AlarmRule> {
    let sql = concat!(
        "SELECT ",
        rule_columns!(),
        " FROM alarm_rules WHERE id = $1"
    );
    visible(alarms, auth, sql, id, "alarm rule").await
}

/// Alarm rules.
pub struct AlarmRulesApi;

#[OpenApi(prefix_path = "/alarm-rules", tag = "AlarmTags::Alarms")]
impl AlarmRulesApi {
    /// Create a rule (admins, and operators for their client). It evaluates readings
    /// measured from now on.
    #[oai(path = "/", method = "post", operation_id = "createAlarmRule")]
    #[tracing::instrument(skip_all)]
    async fn create(
        &self,
        alarms: Data<&Alarms>,
        auth: BearerAuth,
        body: Json<NewAlarmRule>,
    ) -> ApiResult<Created<AlarmRule>> {
        let name = validate::name("name", &body.name, 200)?;
        let Numbers {
            threshold,
            low,
            high,
            hysteresis,
        } = condition(&Wanted::from(&*body))?;
        // An admin naming only the sensor gets the sensor's client.
        let sensor_client = match body.sensor_id {
            Some(sensor) => Some(
                sqlx::query_scalar::<_, Uuid>("SELECT client_id FROM sensors WHERE id = $1")
                    .bind(sensor)
                    .fetch_optional(alarms.pg())
                    .await?
                    .filter(|c| auth.0.sees_client(*c))
                    .ok_or_else(|| ApiError::validation("sensor_id", "no such sensor"))?,
            ),
            None => None,
        };
        let asked = body.client_id.or(if auth.0.is_admin() {
            sensor_client
        } else {
            None
        });
        let client_id = auth.0.client_for_new(asked, "alarm rules")?;
        if sensor_client.is_some_and(|c| c != client_id) {
            return Err(ApiError::validation(
                "sensor_id",
                "the sensor belongs to another client",
            ));
        }
        let to = recipients(&body.recipients)?;
        let rule = sqlx::query_as::<_, AlarmRule>(concat!(
            "INSERT INTO alarm_rules (id, client_id, sensor_id, name, kind, threshold, low, high,
                 duration_secs, hysteresis, severity, enabled, emails, webhook_url,
                 webhook_secret, quiet_secs)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)
             RETURNING ",
            rule_columns!()
        ))
        .bind(Uuid::now_v7())
        .bind(client_id)
        .bind(body.sensor_id)
        .bind(name)
        .bind(body.kind.as_str())
        .bind(threshold)
        .bind(low)
        .bind(high)
        .bind(body.duration_secs.unwrap_or(0) as i32)
        .bind(hysteresis)
        .bind(body.severity.unwrap_or(Severity::Warning).as_str())
        .bind(body.enabled.unwrap_or(true))
        .bind(to.emails.unwrap_or_default())
        .bind(to.webhook_url.flatten())
        .bind(to.webhook_secret.flatten())
        .bind(body.recipients.quiet_secs.unwrap_or(0) as i32)
        .fetch_one(alarms.pg())
        .await
        .map_err(|e| match termopar_core::db::sqlstate(&e).as_deref() {
            Some("23503") => ApiError::validation("client_id", "no such client"),
            _ => e.into(),
        })?;
        alarms.rules_changed().await;
        tracing::info!(rule_id = %rule.id, client_id = %rule.client_id, "alarm rule created");
        Ok(Created::Created(Json(rule)))
    }

    /// List rules, newest first. Operators and viewers see their client's only.
    #[oai(path = "/", method = "get", operation_id = "listAlarmRules")]
    #[tracing::instrument(skip_all)]
    #[allow(clippy::too_many_arguments)]
    async fn list(
        &self,
        alarms: Data<&Alarms>,
        auth: BearerAuth,
        /// Only rules of this client.
        client_id: Query<Option<Uuid>>,
        /// Only rules of this sensor (not those on all of its client's sensors).
        sensor_id: Query<Option<Uuid>>,
        /// Only those whose name contains this text (case-insensitive).
        q: Query<Option<String>>,
        /// Page number, from 1.
        #[oai(validator(minimum(value = "1")))]
        page: Query<Option<u32>>,
        /// Items per page (1 to 1000, default 50).
        #[oai(validator(minimum(value = "1"), maximum(value = "1000")))]
        page_size: Query<Option<u32>>,
    ) -> ApiResult<Found<Page<AlarmRule>>> {
        let params = PageParams::new(page.0, page_size.0);
        let Ok(scope) = auth.0.list_scope(client_id.0) else {
            return Ok(Found::Ok(Json(params.page(Vec::new(), 0))));
        };
        let page = Listing::new("alarm_rules", rule_columns!(), "created_at DESC, id DESC")
            .uuid("client_id", scope)
            .uuid("sensor_id", sensor_id.0)
            .search(&["name"], q.0.as_deref())?
            .page::<AlarmRule, _>(alarms.pg(), params)
            .await?;
        Ok(Found::Ok(Json(page)))
    }

    /// Get a rule.
    #[oai(path = "/:id", method = "get", operation_id = "getAlarmRule")]
    #[tracing::instrument(skip_all, fields(id = %id.0))]
    async fn get(
        &self,
        alarms: Data<&Alarms>,
        auth: BearerAuth,
        id: Path<Uuid>,
    ) -> ApiResult<Found<AlarmRule>> {
        Ok(Found::Ok(Json(visible_rule(&alarms, &auth, id.0).await?)))
    }

    /// Change a rule (admins, and operators of its client): its name, severity,
    /// recipients, `enabled`, or what it watches for (from now on: its open alarms are
    /// closed now, and readings measured from now on are evaluated by the new
    /// definition).
    #[oai(path = "/:id", method = "patch", operation_id = "updateAlarmRule")]
    #[tracing::instrument(skip_all, fields(id = %id.0))]
    async fn update(
        &self,
        alarms: Data<&Alarms>,
        auth: BearerAuth,
        id: Path<Uuid>,
        body: Json<AlarmRulePatch>,
    ) -> ApiResult<Found<AlarmRule>> {
        let current = visible_rule(&alarms, &auth, id.0).await?;
        auth.0.require_manager_of(current.client_id)?;
        let name = body
            .name
            .as_deref()
            .map(|n| validate::name("name", n, 200))
            .transpose()?;
        let to = recipients(&body.recipients)?;
        let wanted = Wanted::changed(&current, &body);
        let numbers = wanted.as_ref().map(condition).transpose()?;
        let mut tx = alarms.pg().begin().await?;
        let rule = sqlx::query_as::<_, AlarmRule>(concat!(
            "UPDATE alarm_rules SET name = coalesce($2, name), severity = coalesce($3, severity),
                 enabled = coalesce($4, enabled), emails = coalesce($5, emails),
                 webhook_url = CASE WHEN $6 THEN $7 ELSE webhook_url END,
                 webhook_secret = CASE WHEN $8 THEN $9 ELSE webhook_secret END,
                 quiet_secs = coalesce($10, quiet_secs),
                 kind = CASE WHEN $11 THEN $12 ELSE kind END,
                 threshold = CASE WHEN $11 THEN $13 ELSE threshold END,
                 low = CASE WHEN $11 THEN $14 ELSE low END,
                 high = CASE WHEN $11 THEN $15 ELSE high END,
                 duration_secs = CASE WHEN $11 THEN $16 ELSE duration_secs END,
                 hysteresis = CASE WHEN $11 THEN $17 ELSE hysteresis END,
                 effective_from = CASE WHEN $11 THEN now() ELSE effective_from END,
                 updated_at = now()
             WHERE id = $1 RETURNING ",
            rule_columns!()
        ))
        .bind(id.0)
        .bind(name)
        .bind(body.severity.map(Severity::as_str))
        .bind(body.enabled)
        .bind(to.emails)
        .bind(to.webhook_url.is_some())
        .bind(to.webhook_url.flatten())
        .bind(to.webhook_secret.is_some())
        .bind(to.webhook_secret.flatten())
        .bind(body.recipients.quiet_secs.map(|q| q as i32))
        .bind(wanted.is_some())
        .bind(wanted.as_ref().map(|w| w.kind.as_str()))
        .bind(numbers.as_ref().and_then(|n| n.threshold))
        .bind(numbers.as_ref().and_then(|n| n.low))
        .bind(numbers.as_ref().and_then(|n| n.high))
        .bind(wanted.as_ref().map(|w| w.duration_secs.unwrap_or(0) as i32))
        .bind(numbers.as_ref().map(|n| n.hysteresis))
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| ApiError::not_found("alarm rule"))?;
        if wanted.is_some() {
            // What it found so far stays; what is still open ends now.
            let closed = crate::store::close_open(&mut tx, rule.id).await?;
            tracing::info!(rule_id = %rule.id, closed, "alarm rule's condition changed");
        }
        tx.commit().await?;
        alarms.rules_changed().await;
        Ok(Found::Ok(Json(rule)))
    }

    /// Delete a rule with its alarms (admins, and operators of its client).
    #[oai(path = "/:id", method = "delete", operation_id = "deleteAlarmRule")]
    #[tracing::instrument(skip_all, fields(id = %id.0))]
    async fn delete(
        &self,
        alarms: Data<&Alarms>,
        auth: BearerAuth,
        id: Path<Uuid>,
    ) -> ApiResult<Deleted> {
        let current = visible_rule(&alarms, &auth, id.0).await?;
        auth.0.require_manager_of(current.client_id)?;
        let deleted = sqlx::query("DELETE FROM alarm_rules WHERE id = $1")
            .bind(id.0)
            .execute(alarms.pg())
            .await?
            .rows_affected();
        if deleted == 0 {
            return Err(ApiError::not_found("alarm rule"));
        }
        alarms.rules_changed().await;
        tracing::info!(rule_id = %id.0, "alarm rule deleted");
        Ok(Deleted::Deleted)
    }
}

/// State of an alarm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "snake_case")]
pub(crate) enum AlarmState {
    /// The excursion lasts.
    Active,
    /// It ended.
    Cleared,
    /// Late readings showed it was no excursion.
    Retracted,
}

impl AlarmState {
    fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Cleared => "cleared",
            Self::Retracted => "retracted",
        }
    }
}

/// An alarm: one excursion of one sensor under one rule.
#[derive(Debug, Clone, Object, FromRow)]
pub(crate) struct Alarm {
    pub id: Uuid,
    pub rule_id: Uuid,
    /// The rule's name.
    pub rule_name: String,
    pub client_id: Uuid,
    pub sensor_id: Uuid,
    /// `info`, `warning` or `critical` (the rule's, when it opened).
    pub severity: String,
    /// `active`, `cleared` or `retracted`.
    pub state: String,
    /// When the excursion began (the first reading of it).
    pub started_at: DateTime<Utc>,
    /// When it became an alarm (the reading that was `duration_secs` into it).
    pub confirmed_at: DateTime<Utc>,
    /// When it ended (the reading back inside the limits).
    pub ended_at: Option<DateTime<Utc>>,
    /// How long it lasted, or has lasted until now, in seconds.
    pub duration_secs: f64,
    /// The most extreme value (°C, or °C a minute for rate rules).
    pub peak: f64,
    pub peak_at: DateTime<Utc>,
    pub acknowledged_at: Option<DateTime<Utc>>,
    pub acknowledged_by: Option<Uuid>,
    pub ack_comment: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

macro_rules! alarm_columns {
    () => {
        "a.id, a.rule_id, r.name AS rule_name, a.client_id, a.sensor_id, a.severity, a.state, \
         a.started_at, a.confirmed_at, a.ended_at, \
         extract(epoch FROM coalesce(a.ended_at, greatest(now(), a.started_at)) - a.started_at)::float8 \
         AS duration_secs, a.peak, a.peak_at, a.acknowledged_at, a.acknowledged_by, \
         a.ack_comment, a.created_at, a.updated_at"
    };
}

/// An event in an alarm's history.
#[derive(Debug, Clone, Object, FromRow)]
pub(crate) struct AlarmEvent {
    pub id: i64,
    /// `opened`, `cleared`, `reopened`, `retracted` or `acknowledged`.
    pub kind: String,
    /// When it happened (event time for what readings decided).
    pub at: DateTime<Utc>,
    /// When termopar recorded it.
    pub recorded_at: DateTime<Utc>,
    /// Who did it (acknowledgements).
    pub user_id: Option<Uuid>,
    pub comment: Option<String>,
}

/// An event of the live feed.
#[derive(Debug, Clone, Object, FromRow)]
pub(crate) struct FeedEvent {
    /// The event's id (the `id:` of its SSE message, for `Last-Event-ID`).
    pub id: i64,
    /// `opened`, `cleared`, `reopened`, `retracted` or `acknowledged`.
    pub kind: String,
    pub at: DateTime<Utc>,
    pub alarm_id: Uuid,
    pub client_id: Uuid,
    pub sensor_id: Uuid,
    pub rule_id: Uuid,
    pub rule_name: String,
    pub severity: String,
    /// The alarm's state now.
    pub state: String,
}

/// How often a live feed looks for new events.
const FEED_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// The events after `after` that `scope` sees (all for `None`), oldest first.
async fn events_after(
    pg: &sqlx::PgPool,
    scope: Option<Uuid>,
    after: i64,
) -> Result<Vec<FeedEvent>, sqlx::Error> {
    sqlx::query_as(
        "SELECT e.id, e.kind, e.at, a.id AS alarm_id, a.client_id, a.sensor_id, a.rule_id,
                r.name AS rule_name, a.severity, a.state
         FROM alarm_events e
         JOIN alarms a ON a.id = e.alarm_id
         JOIN alarm_rules r ON r.id = a.rule_id
         WHERE e.id > $1 AND ($2::uuid IS NULL OR e.client_id = $2)
         ORDER BY e.id LIMIT 500",
    )
    .bind(after)
    .bind(scope)
    .fetch_all(pg)
    .await
}

/// An acknowledgement.
#[derive(Debug, Object)]
pub(crate) struct Acknowledgement {
    /// Why, or what was done (at most 2000 characters).
    pub comment: Option<String>,
}

/// Loads an alarm the caller can see.
async fn visible_alarm(alarms: &Alarms, auth: &BearerAuth, id: Uuid) -> ApiResult<Alarm> {
    let sql = concat!(
        "SELECT ",
        alarm_columns!(),
        " FROM alarms a JOIN alarm_rules r ON r.id = a.rule_id WHERE a.id = $1"
    );
    visible(alarms, auth, sql, id, "alarm").await
}

/// Alarms.
pub struct AlarmsApi;

#[OpenApi(prefix_path = "/alarms", tag = "AlarmTags::Alarms")]
impl AlarmsApi {
    /// List alarms, newest first (by when they began). Operators and viewers see their
    /// client's only.
    #[oai(path = "/", method = "get", operation_id = "listAlarms")]
    #[tracing::instrument(skip_all)]
    #[allow(clippy::too_many_arguments)]
    async fn list(
        &self,
        alarms: Data<&Alarms>,
        auth: BearerAuth,
        /// Only alarms of this client.
        client_id: Query<Option<Uuid>>,
        /// Only alarms of this sensor.
        sensor_id: Query<Option<Uuid>>,
        /// Only alarms of this rule.
        rule_id: Query<Option<Uuid>>,
        /// Only alarms in this state.
        state: Query<Option<AlarmState>>,
        /// Only alarms of this severity.
        severity: Query<Option<Severity>>,
        /// Only acknowledged alarms (true) or only unacknowledged ones (false).
        acknowledged: Query<Option<bool>>,
        /// Only alarms that began at or after this.
        from: Query<Option<DateTime<Utc>>>,
        /// Only alarms that began before this.
        to: Query<Option<DateTime<Utc>>>,
        /// Page number, from 1.
        #[oai(validator(minimum(value = "1")))]
        page: Query<Option<u32>>,
        /// Items per page (1 to 1000, default 50).
        #[oai(validator(minimum(value = "1"), maximum(value = "1000")))]
        page_size: Query<Option<u32>>,
    ) -> ApiResult<Found<Page<Alarm>>> {
        let params = PageParams::new(page.0, page_size.0);
        let Ok(scope) = auth.0.list_scope(client_id.0) else {
            return Ok(Found::Ok(Json(params.page(Vec::new(), 0))));
        };
        let page = Listing::new(
            "alarms a JOIN alarm_rules r ON r.id = a.rule_id",
            alarm_columns!(),
            "a.started_at DESC, a.id DESC",
        )
        .uuid("a.client_id", scope)
        .uuid("a.sensor_id", sensor_id.0)
        .uuid("a.rule_id", rule_id.0)
        .text("a.state", state.0.map(AlarmState::as_str))
        .text("a.severity", severity.0.map(Severity::as_str))
        .null("a.acknowledged_at", acknowledged.0.map(|ack| !ack))
        .between("a.started_at", from.0, to.0)
        .page::<Alarm, _>(alarms.pg(), params)
        .await?;
        Ok(Found::Ok(Json(page)))
    }

    /// The live feed: every alarm event the caller may see, as server-sent events, from
    /// the one after `after` (or the `Last-Event-ID` a reconnecting browser sends), or
    /// from now on.
    #[oai(path = "/feed", method = "get", operation_id = "alarmFeed")]
    #[tracing::instrument(skip_all)]
    async fn feed(
        &self,
        alarms: Data<&Alarms>,
        auth: BearerAuth,
        /// Start after this event id.
        after: Query<Option<i64>>,
        /// What a reconnecting `EventSource` sends: the last event it got.
        #[oai(name = "Last-Event-ID")]
        last_event_id: poem_openapi::param::Header<Option<i64>>,
    ) -> ApiResult<EventStream<BoxStream<'static, FeedEvent>>> {
        let pg = alarms.pg().clone();
        let scope = auth.0.tenant_scope();
        let start = match last_event_id.0.or(after.0) {
            Some(id) => id,
            None => {
                sqlx::query_scalar("SELECT coalesce(max(id), 0) FROM alarm_events")
                    .fetch_one(&pg)
                    .await?
            }
        };
        let stop = alarms.stop();
        let stream = futures::stream::unfold(
            (start, std::collections::VecDeque::new(), stop),
            move |(mut cursor, mut pending, mut stop)| {
                let pg = pg.clone();
                async move {
                    loop {
                        if let Some(event) = pending.pop_front() {
                            return Some((event, (cursor, pending, stop)));
                        }
                        let found = events_after(&pg, scope, cursor).await.ok()?;
                        if let Some(last) = found.last() {
                            cursor = last.id;
                            pending.extend(found);
                            continue;
                        }
                        let stopping = async {
                            match stop.as_mut() {
                                Some(stop) => stop.requested().await,
                                None => std::future::pending().await,
                            }
                        };
                        tokio::select! {
                            () = stopping => return None,
                            () = tokio::time::sleep(FEED_EVERY) => {}
                        }
                    }
                }
            },
        );
        metrics::counter!("alarm_feeds_opened_total").increment(1);
        Ok(EventStream::new(stream.boxed())
            .keep_alive(std::time::Duration::from_secs(15))
            .to_event(|event| {
                use poem_openapi::types::ToJSON;
                poem::web::sse::Event::message(event.to_json_string()).id(event.id.to_string())
            }))
    }

    /// Get an alarm.
    #[oai(path = "/:id", method = "get", operation_id = "getAlarm")]
    #[tracing::instrument(skip_all, fields(id = %id.0))]
    async fn get(
        &self,
        alarms: Data<&Alarms>,
        auth: BearerAuth,
        id: Path<Uuid>,
    ) -> ApiResult<Found<Alarm>> {
        Ok(Found::Ok(Json(visible_alarm(&alarms, &auth, id.0).await?)))
    }

    /// An alarm's history, oldest first.
    #[oai(path = "/:id/events", method = "get", operation_id = "listAlarmEvents")]
    #[tracing::instrument(skip_all, fields(id = %id.0))]
    async fn events(
        &self,
        alarms: Data<&Alarms>,
        auth: BearerAuth,
        id: Path<Uuid>,
    ) -> ApiResult<Found<Vec<AlarmEvent>>> {
        visible_alarm(&alarms, &auth, id.0).await?;
        let events = sqlx::query_as::<_, AlarmEvent>(
            "SELECT id, kind, at, recorded_at, user_id, comment FROM alarm_events
             WHERE alarm_id = $1 ORDER BY id",
        )
        .bind(id.0)
        .fetch_all(alarms.pg())
        .await?;
        Ok(Found::Ok(Json(events)))
    }

    /// Acknowledge an alarm, with a comment (admins, and operators of its client). An
    /// alarm is acknowledged once.
    #[oai(
        path = "/:id/acknowledge",
        method = "post",
        operation_id = "acknowledgeAlarm"
    )]
    #[tracing::instrument(skip_all, fields(id = %id.0))]
    async fn acknowledge(
        &self,
        alarms: Data<&Alarms>,
        auth: BearerAuth,
        id: Path<Uuid>,
        body: Json<Acknowledgement>,
    ) -> ApiResult<Found<Alarm>> {
        let current = visible_alarm(&alarms, &auth, id.0).await?;
        auth.0.require_manager_of(current.client_id)?;
        let comment = body
            .comment
            .as_deref()
            .map(|c| validate::text("comment", c, 2000))
            .transpose()?;
        let mut tx = alarms.pg().begin().await?;
        let done = sqlx::query(
            "UPDATE alarms SET acknowledged_at = now(), acknowledged_by = $2, ack_comment = $3,
                 updated_at = now()
             WHERE id = $1 AND acknowledged_at IS NULL",
        )
        .bind(id.0)
        .bind(auth.0.user_id)
        .bind(&comment)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if done == 0 {
            return Err(ApiError::conflict("the alarm was acknowledged already"));
        }
        sqlx::query(
            "INSERT INTO alarm_events (alarm_id, client_id, kind, at, user_id, comment)
             VALUES ($1, $2, 'acknowledged', now(), $3, $4)",
        )
        .bind(id.0)
        .bind(current.client_id)
        .bind(auth.0.user_id)
        .bind(&comment)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Found::Ok(Json(visible_alarm(&alarms, &auth, id.0).await?)))
    }
}
