//! What the jobs do: post a website record to marketing or the CRM over HTTP (with an
//! `Idempotency-Key` they honour, so a retried job finds what its first try created),
//! and e-mail a qualified lead over SMTP.

use apalis::prelude::{AbortError, BoxDynError};
use chrono::{DateTime, Utc};
use lettre::{
    message::{header::ContentType, Mailbox},
    transport::smtp::authentication::Credentials,
    AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor,
};
use secrecy::ExposeSecret;
use serde_json::json;
use sqlx::PgPool;
use tokio::sync::Mutex;
use uuid::Uuid;

use termopar_web::tokens::{Jwt, TokenType};

use crate::{
    jobs::{Job, Queue},
    records::{self, Record},
    settings::{LeadsSettings, SmtpSettings, SmtpTls},
};

/// The account the workers call marketing and the CRM as: an admin without a password
/// (it cannot log in), created the first time a job needs it.
const SERVICE_EMAIL: &str = "jobs@termopar.internal";

/// Marketing, the CRM and the SMTP server, as the jobs reach them.
pub(crate) struct Downstream {
    pg: PgPool,
    http: reqwest::Client,
    jwt: Jwt,
    marketing_url: String,
    crm_url: String,
    mailer: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    /// The service account's id and token version, until a 401 says they changed.
    service: Mutex<Option<(Uuid, i32)>>,
}

/// A transport to the SMTP server of `smtp`, and the sender it names.
pub fn mailer(
    smtp: &SmtpSettings,
) -> anyhow::Result<(AsyncSmtpTransport<Tokio1Executor>, Mailbox)> {
    let mut mailer = match smtp.tls {
        SmtpTls::None => {
            AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(smtp.host.as_str())
        }
        SmtpTls::StartTls => AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&smtp.host)?,
        SmtpTls::Tls => AsyncSmtpTransport::<Tokio1Executor>::relay(&smtp.host)?,
    }
    .port(smtp.port)
    .timeout(Some(smtp.timeout));
    if let Some((user, password)) = &smtp.credentials {
        mailer = mailer.credentials(Credentials::new(
            user.clone(),
            password.expose_secret().to_owned(),
        ));
    }
    Ok((mailer.build(), smtp.from.parse()?))
}

impl Downstream {
    /// `api_url` is where this API answers: the default of both systems' base URLs.
    pub(crate) fn new(
        pg: PgPool,
        settings: &LeadsSettings,
        jwt: Jwt,
        api_url: &str,
    ) -> anyhow::Result<Self> {
        let (mailer, from) = mailer(&settings.smtp)?;
        let base = |url: &Option<String>| {
            url.as_deref()
                .unwrap_or(api_url)
                .trim_end_matches('/')
                .to_owned()
        };
        Ok(Self {
            pg,
            http: reqwest::Client::builder()
                .timeout(settings.http_timeout)
                .build()?,
            jwt,
            marketing_url: base(&settings.marketing_url),
            crm_url: base(&settings.crm_url),
            mailer,
            from,
            service: Mutex::new(None),
        })
    }

    /// Does what a job of `queue` is for.
    pub(crate) async fn carry(&self, queue: Queue, job: &Job) -> Result<(), BoxDynError> {
        let Some(record) = records::find(&self.pg, job.record_id).await? else {
            // Deleted since: nothing left to carry.
            tracing::info!(record = %job.record_id, queue = queue.name(), "record gone; job done");
            return Ok(());
        };
        match queue {
            Queue::LeadToMarketing => {
                self.post(
                    &self.marketing_url,
                    "/api/v1/marketing/leads",
                    "website-lead",
                    &record,
                )
                .await
            }
            Queue::LeadToCrm => {
                self.post(&self.crm_url, "/api/v1/crm/leads", "website-lead", &record)
                    .await
            }
            Queue::CustomerToCrm => {
                self.post(
                    &self.crm_url,
                    "/api/v1/crm/customers",
                    "website-customer",
                    &record,
                )
                .await
            }
            Queue::QualifiedEmail => self.email(&record, job.qualified_at).await,
            Queue::Noop => Ok(()),
        }
    }

    /// A fresh access token of the service account (created, or made an admin again,
    /// when first needed and after a 401).
    async fn token(&self) -> Result<String, sqlx::Error> {
        let mut service = self.service.lock().await;
        let (id, version) = match *service {
            Some(known) => known,
            None => {
                let id = Uuid::new_v5(&Uuid::NAMESPACE_DNS, SERVICE_EMAIL.as_bytes());
                let known = sqlx::query_as::<_, (Uuid, i32)>(
                    "INSERT INTO users (id, email, password_hash, role)
                     VALUES ($1, $2, '!', 'admin')
                     ON CONFLICT (id) DO UPDATE SET role = 'admin', client_id = NULL,
                         -- Tokens cached with the changed role stop working.
                         token_version = users.token_version
                             + CASE WHEN users.role = 'admin' AND users.client_id IS NULL
                                    THEN 0 ELSE 1 END
                     RETURNING id, token_version",
                )
                .bind(id)
                .bind(SERVICE_EMAIL)
                .fetch_one(&self.pg)
                .await?;
                *service = Some(known);
                known
            }
        };
        Ok(self
            .jwt
            .issue(TokenType::Access, id, version, Uuid::new_v4()))
    }

    async fn post(
        &self,
        base: &str,
        path: &str,
        key_prefix: &str,
        record: &Record,
    ) -> Result<(), BoxDynError> {
        let token = self.token().await?;
        let body = json!({
            "client_id": record.client_id,
            "name": record.name,
            "email": record.email,
            "phone": record.phone,
            "company": record.company,
            "message": record.message,
        });
        let response = self
            .http
            .post(format!("{base}{path}"))
            .bearer_auth(token)
            .header("Idempotency-Key", format!("{key_prefix}:{}", record.id))
            .json(&body)
            .send()
            .await?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        if matches!(status.as_u16(), 401 | 403) {
            // The service account was changed or deleted: look it up again next time.
            *self.service.lock().await = None;
        }
        let text = response.text().await.unwrap_or_default();
        let error = format!(
            "{path} answered {status}: {}",
            text.chars().take(500).collect::<String>()
        );
        // A refusal that a retry cannot change ends the job now (401 and 403 can: the
        // service account is looked up again).
        if status.is_client_error() && !matches!(status.as_u16(), 401 | 403 | 408 | 409 | 425 | 429)
        {
            return Err(AbortError::new(error).into());
        }
        Err(error.into())
    }

    /// E-mails a qualified lead once per qualification: a job whose qualification was
    /// already e-mailed (a retry after a lost acknowledgement) sends nothing.
    async fn email(
        &self,
        lead: &Record,
        qualified_at: Option<DateTime<Utc>>,
    ) -> Result<(), BoxDynError> {
        let Some(qualified_at) = qualified_at else {
            return Err(AbortError::new("an e-mail job without its qualification").into());
        };
        if lead.qualified != Some(true) || lead.qualified_at != Some(qualified_at) {
            tracing::info!(lead = %lead.id, "qualification withdrawn or replaced; no e-mail");
            return Ok(());
        }
        if lead.emailed_at.is_some_and(|at| at >= qualified_at) {
            return Ok(());
        }
        let to: Mailbox = format!(
            "{} <{}>",
            lead.name.replace(['<', '>', '"'], ""),
            lead.email
        )
        .parse()
        .or_else(|_| lead.email.parse().map(|a| Mailbox::new(None, a)))
        .map_err(|e| AbortError::new(format!("not an address: {e}")))?;
        let message = Message::builder()
            .from(self.from.clone())
            .to(to)
            .message_id(Some(format!(
                "<lead-{}-{}@termopar>",
                lead.id.simple(),
                qualified_at.timestamp_micros()
            )))
            .subject("Welcome aboard: our team will be in touch")
            .header(ContentType::TEXT_PLAIN)
            .body(format!(
                "Hello {},\n\nThank you for your interest. Our team has reviewed your \
                 request and will contact you shortly.\n\n-- termopar\n",
                lead.name
            ))?;
        self.mailer.send(message).await?;
        sqlx::query(
            "UPDATE pipeline_records SET emailed_at = now()
             WHERE id = $1 AND qualified_at = $2",
        )
        .bind(lead.id)
        .bind(qualified_at)
        .execute(&self.pg)
        .await?;
        Ok(())
    }
}
