//! Settings of the lead pipeline, read once from the environment.

use std::time::Duration;

use anyhow::{bail, Context};
use secrecy::SecretString;
use termopar_core::settings::{env_pair, env_parse, env_var};

/// How the SMTP connection is secured (`SMTP_TLS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpTls {
    /// Plain text (`none`): a local relay or a test sink only.
    None,
    /// STARTTLS after connecting (`starttls`, port 587).
    StartTls,
    /// TLS from the first byte (`tls`, port 465).
    Tls,
}

/// Where and how the qualification e-mails are sent.
#[derive(Debug, Clone)]
pub struct SmtpSettings {
    /// `SMTP_HOST` (default `127.0.0.1`).
    pub host: String,
    /// `SMTP_PORT` (default 25).
    pub port: u16,
    /// `SMTP_TLS`: `none` (default), `starttls` or `tls`.
    pub tls: SmtpTls,
    /// `SMTP_USERNAME` and `SMTP_PASSWORD`, when the server wants a login.
    pub credentials: Option<(String, SecretString)>,
    /// `SMTP_FROM` (default `termopar <no-reply@termopar.localhost>`).
    pub from: String,
    /// Longest an SMTP conversation may take (`SMTP_TIMEOUT_SECS`, default 10).
    pub timeout: Duration,
}

/// The lead pipeline.
#[derive(Debug, Clone)]
pub struct LeadsSettings {
    /// Whether this process runs the job workers (`JOBS_WORKERS`, default true: edge
    /// mode runs them inside; cloud mode gives them a process of their own).
    pub workers: bool,
    /// Jobs of one queue a worker claims and runs at once (`JOBS_CONCURRENCY`, default
    /// 64: `make bench-jobs` finished ~1,300 no-op jobs/s with 8, ~4,300/s with 32,
    /// ~8,000/s with 64 and ~4,100/s with 256).
    pub concurrency: usize,
    /// Tries of a job before it is dead (`JOBS_MAX_ATTEMPTS`, default 8).
    pub max_attempts: u32,
    /// First pause before a retry (`JOBS_BACKOFF_MS`, default 500); doubled each time,
    /// up to `JOBS_BACKOFF_MAX_MS` (default 60000), with jitter.
    pub backoff: Duration,
    /// Longest pause before a retry.
    pub backoff_max: Duration,
    /// A job whose worker has not been seen for this long is run again elsewhere
    /// (`JOBS_ORPHAN_SECS`, default 30).
    pub orphan_after: Duration,
    /// Where the marketing system's API is (`MARKETING_URL`; default: this API).
    pub marketing_url: Option<String>,
    /// Where the CRM's API is (`CRM_URL`; default: this API).
    pub crm_url: Option<String>,
    /// Longest a call to marketing or the CRM may take (`PIPELINE_HTTP_TIMEOUT_SECS`,
    /// default 10).
    pub http_timeout: Duration,
    /// Form posts per second per site (`LEADS_RATE_PER_SITE`, default 20, burst twice
    /// that; 0 turns the limit off).
    pub rate_per_site: u32,
    /// The SMTP server.
    pub smtp: SmtpSettings,
}

impl Default for SmtpSettings {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 25,
            tls: SmtpTls::None,
            credentials: None,
            from: "termopar <no-reply@termopar.localhost>".into(),
            timeout: Duration::from_secs(10),
        }
    }
}

impl Default for LeadsSettings {
    fn default() -> Self {
        Self {
            workers: true,
            concurrency: 64,
            max_attempts: 8,
            backoff: Duration::from_millis(500),
            backoff_max: Duration::from_secs(60),
            orphan_after: Duration::from_secs(30),
            marketing_url: None,
            crm_url: None,
            http_timeout: Duration::from_secs(10),
            rate_per_site: 20,
            smtp: SmtpSettings::default(),
        }
    }
}

impl LeadsSettings {
    /// Reads the `JOBS_*`, `MARKETING_URL`, `CRM_URL`, `PIPELINE_HTTP_TIMEOUT_SECS`,
    /// `LEADS_RATE_PER_SITE` and `SMTP_*` variables over the defaults, and validates them.
    pub fn from_env() -> anyhow::Result<Self> {
        let d = Self::default();
        let tls = match env_var("SMTP_TLS").as_deref() {
            None | Some("none") => SmtpTls::None,
            Some("starttls") => SmtpTls::StartTls,
            Some("tls") => SmtpTls::Tls,
            Some(other) => bail!("SMTP_TLS must be none, starttls or tls, not {other:?}"),
        };
        let credentials = env_pair("SMTP_USERNAME", "SMTP_PASSWORD")?
            .map(|(user, password)| (user, SecretString::from(password)));
        let settings = Self {
            workers: env_parse("JOBS_WORKERS", d.workers)?,
            concurrency: env_parse("JOBS_CONCURRENCY", d.concurrency)?,
            max_attempts: env_parse("JOBS_MAX_ATTEMPTS", d.max_attempts)?,
            backoff: Duration::from_millis(env_parse(
                "JOBS_BACKOFF_MS",
                d.backoff.as_millis() as u64,
            )?),
            backoff_max: Duration::from_millis(env_parse(
                "JOBS_BACKOFF_MAX_MS",
                d.backoff_max.as_millis() as u64,
            )?),
            orphan_after: Duration::from_secs(env_parse(
                "JOBS_ORPHAN_SECS",
                d.orphan_after.as_secs(),
            )?),
            marketing_url: env_var("MARKETING_URL"),
            crm_url: env_var("CRM_URL"),
            http_timeout: Duration::from_secs(env_parse(
                "PIPELINE_HTTP_TIMEOUT_SECS",
                d.http_timeout.as_secs(),
            )?),
            rate_per_site: env_parse("LEADS_RATE_PER_SITE", d.rate_per_site)?,
            smtp: SmtpSettings {
                host: env_var("SMTP_HOST").unwrap_or(d.smtp.host),
                port: env_parse("SMTP_PORT", d.smtp.port)?,
                tls,
                credentials,
                from: env_var("SMTP_FROM").unwrap_or(d.smtp.from),
                timeout: Duration::from_secs(env_parse(
                    "SMTP_TIMEOUT_SECS",
                    d.smtp.timeout.as_secs(),
                )?),
            },
        };
        settings.validate()?;
        Ok(settings)
    }

    /// Checks the values that can be wrong even when they parse.
    pub fn validate(&self) -> anyhow::Result<()> {
        if !(1..=256).contains(&self.concurrency) {
            bail!("JOBS_CONCURRENCY must be between 1 and 256");
        }

        if !(1..=100).contains(&self.max_attempts) {
            bail!("JOBS_MAX_ATTEMPTS must be between 1 and 100");
        }
        if self.backoff.is_zero() || self.backoff > self.backoff_max {
            bail!("JOBS_BACKOFF_MS must be above 0 and at most JOBS_BACKOFF_MAX_MS");
        }
        if self.orphan_after < Duration::from_secs(2) {
            bail!("JOBS_ORPHAN_SECS must be at least 2");
        }
        for (name, url) in [
            ("MARKETING_URL", &self.marketing_url),
            ("CRM_URL", &self.crm_url),
        ] {
            if let Some(url) = url {
                let parsed =
                    url::Url::parse(url).with_context(|| format!("{name} is not a URL"))?;
                if !matches!(parsed.scheme(), "http" | "https") {
                    bail!("{name} must be an http(s) URL");
                }
            }
        }
        self.smtp
            .from
            .parse::<lettre::message::Mailbox>()
            .context("SMTP_FROM is not a mailbox such as `termopar <no-reply@example.com>`")?;
        Ok(())
    }
}
