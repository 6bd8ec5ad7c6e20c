//! The people each system keeps (one table, `pipeline_records`, told apart by system
//! and kind): their shape, checks, and the store operations every route shares.

use chrono::{DateTime, Utc};
use poem_openapi::Object;
use sqlx::PgConnection;
use uuid::Uuid;

use termopar_web::{
    pagination::{Listing, Page, PageParams},
    validate, ApiError, ApiResult,
};

/// Which system's which people.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Book {
    WebsiteLeads,
    WebsiteCustomers,
    MarketingLeads,
    CrmLeads,
    CrmCustomers,
}

impl Book {
    pub(crate) fn system(self) -> &'static str {
        match self {
            Self::WebsiteLeads | Self::WebsiteCustomers => "website",
            Self::MarketingLeads => "marketing",
            Self::CrmLeads | Self::CrmCustomers => "crm",
        }
    }

    pub(crate) fn kind(self) -> &'static str {
        match self {
            Self::WebsiteLeads | Self::MarketingLeads | Self::CrmLeads => "lead",
            Self::WebsiteCustomers | Self::CrmCustomers => "customer",
        }
    }

    /// What a 404 names.
    fn noun(self) -> &'static str {
        self.kind()
    }
}

macro_rules! columns {
    () => {
        "id, client_id, site_id, name, email, phone, company, message, qualified, \
         qualified_at, emailed_at, created_at, updated_at"
    };
}

/// A lead or customer as one of the systems keeps it.
#[derive(Debug, Clone, Object, sqlx::FromRow)]
pub(crate) struct Record {
    /// Id.
    pub id: Uuid,
    /// The client it belongs to.
    pub client_id: Uuid,
    /// The site whose form it came from (website records).
    #[oai(skip_serializing_if_is_none)]
    pub site_id: Option<Uuid>,
    /// Name.
    pub name: String,
    /// E-mail address.
    pub email: String,
    /// Phone number.
    pub phone: Option<String>,
    /// Company.
    pub company: Option<String>,
    /// What the person wrote in the form.
    pub message: Option<String>,
    /// CRM leads: qualified by sales (an e-mail to the lead follows).
    #[oai(skip_serializing_if_is_none)]
    pub qualified: Option<bool>,
    /// CRM leads: when it was last qualified.
    #[oai(skip_serializing_if_is_none)]
    pub qualified_at: Option<DateTime<Utc>>,
    /// CRM leads: when the e-mail of its latest qualification was handed to the SMTP
    /// server.
    #[oai(skip_serializing_if_is_none)]
    pub emailed_at: Option<DateTime<Utc>>,
    /// Created.
    pub created_at: DateTime<Utc>,
    /// Last changed.
    pub updated_at: DateTime<Utc>,
}

/// A person as a form or another system sends it.
#[derive(Debug, Clone, Object)]
pub(crate) struct Person {
    /// The client (admins only; others create for their own).
    pub client_id: Option<Uuid>,
    /// Name (1 to 200 characters).
    pub name: String,
    /// E-mail address.
    pub email: String,
    /// Phone number (at most 40 characters).
    pub phone: Option<String>,
    /// Company (at most 200 characters).
    pub company: Option<String>,
    /// Message (at most 5000 characters).
    pub message: Option<String>,
    /// CRM leads only: qualified by sales; turning it on sends the lead an e-mail.
    pub qualified: Option<bool>,
}

/// A form posted from a page of a client's site (public: no token).
#[derive(Debug, Clone, Object)]
pub(crate) struct Form {
    /// The site the form is on (its id in `/sites`); the record belongs to its client.
    pub site_id: Uuid,
    /// Name (1 to 200 characters).
    pub name: String,
    /// E-mail address.
    pub email: String,
    /// Phone number (at most 40 characters).
    pub phone: Option<String>,
    /// Company (at most 200 characters).
    pub company: Option<String>,
    /// Message (at most 5000 characters).
    pub message: Option<String>,
}

/// The checked fields of a person.
#[derive(Debug, Clone)]
pub(crate) struct Fields {
    pub name: String,
    pub email: String,
    pub phone: Option<String>,
    pub company: Option<String>,
    pub message: Option<String>,
    pub qualified: Option<bool>,
}

/// An e-mail address both our checks and the SMTP library accept, so that no job dies
/// later on an address that was stored.
fn email(value: &str) -> ApiResult<String> {
    let value = value.trim();
    validate::email(value)?;
    value
        .parse::<lettre::Address>()
        .map_err(|_| ApiError::validation("email", "not a valid e-mail address"))?;
    Ok(value.to_owned())
}

fn optional(field: &str, value: Option<&str>, max: usize) -> ApiResult<Option<String>> {
    value
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(|v| validate::text(field, v, max))
        .transpose()
}

impl Fields {
    pub(crate) fn check(
        book: Book,
        name: &str,
        address: &str,
        phone: Option<&str>,
        company: Option<&str>,
        message: Option<&str>,
        qualified: Option<bool>,
    ) -> ApiResult<Self> {
        if qualified.is_some() && book != Book::CrmLeads {
            return Err(ApiError::validation(
                "qualified",
                "only CRM leads are qualified",
            ));
        }
        Ok(Self {
            name: validate::name("name", name, 200)?,
            email: email(address)?,
            phone: optional("phone", phone, 40)?,
            company: optional("company", company, 200)?,
            message: optional("message", message, 5000)?,
            qualified: match book {
                Book::CrmLeads => Some(qualified.unwrap_or(false)),
                _ => None,
            },
        })
    }

    pub(crate) fn of_person(book: Book, p: &Person) -> ApiResult<Self> {
        Self::check(
            book,
            &p.name,
            &p.email,
            p.phone.as_deref(),
            p.company.as_deref(),
            p.message.as_deref(),
            p.qualified,
        )
    }

    pub(crate) fn of_form(book: Book, f: &Form) -> ApiResult<Self> {
        Self::check(
            book,
            &f.name,
            &f.email,
            f.phone.as_deref(),
            f.company.as_deref(),
            f.message.as_deref(),
            None,
        )
    }
}

/// Inserts a record; with an idempotency key already used in this book and client,
/// returns the record it created instead (`false`: not new).
pub(crate) async fn insert(
    db: &mut PgConnection,
    book: Book,
    client_id: Uuid,
    site_id: Option<Uuid>,
    fields: &Fields,
    idempotency_key: Option<&str>,
) -> ApiResult<(Record, bool)> {
    let qualified_at = fields.qualified.filter(|q| *q).map(|_| Utc::now());
    let inserted = sqlx::query_as::<_, Record>(concat!(
        "INSERT INTO pipeline_records (id, system, kind, client_id, site_id, name, email,
             phone, company, message, qualified, qualified_at, idempotency_key)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
         ON CONFLICT (system, kind, client_id, idempotency_key) DO NOTHING
         RETURNING ",
        columns!()
    ))
    .bind(Uuid::now_v7())
    .bind(book.system())
    .bind(book.kind())
    .bind(client_id)
    .bind(site_id)
    .bind(&fields.name)
    .bind(&fields.email)
    .bind(&fields.phone)
    .bind(&fields.company)
    .bind(&fields.message)
    .bind(fields.qualified)
    .bind(qualified_at)
    .bind(idempotency_key)
    .fetch_optional(&mut *db)
    .await
    .map_err(|e| match termopar_core::db::sqlstate(&e).as_deref() {
        Some("23503") => ApiError::validation("client_id", "no such client"),
        _ => e.into(),
    })?;
    if let Some(record) = inserted {
        return Ok((record, true));
    }
    let existing = sqlx::query_as::<_, Record>(concat!(
        "SELECT ",
        columns!(),
        " FROM pipeline_records
         WHERE system = $1 AND kind = $2 AND client_id = $3 AND idempotency_key = $4"
    ))
    .bind(book.system())
    .bind(book.kind())
    .bind(client_id)
    .bind(idempotency_key)
    .fetch_one(&mut *db)
    .await?;
    Ok((existing, false))
}

/// A record of any book, by id.
pub(crate) async fn find(pg: &sqlx::PgPool, id: Uuid) -> Result<Option<Record>, sqlx::Error> {
    sqlx::query_as::<_, Record>(concat!(
        "SELECT ",
        columns!(),
        " FROM pipeline_records WHERE id = $1"
    ))
    .bind(id)
    .fetch_optional(pg)
    .await
}

/// A record of `book` that `sees` allows (404 otherwise, also for other tenants').
pub(crate) async fn visible(
    db: &mut PgConnection,
    book: Book,
    id: Uuid,
    sees: impl Fn(Uuid) -> bool,
) -> ApiResult<Record> {
    sqlx::query_as::<_, Record>(concat!(
        "SELECT ",
        columns!(),
        " FROM pipeline_records WHERE id = $1 AND system = $2 AND kind = $3"
    ))
    .bind(id)
    .bind(book.system())
    .bind(book.kind())
    .fetch_optional(db)
    .await?
    .filter(|r| sees(r.client_id))
    .ok_or_else(|| ApiError::not_found(book.noun()))
}

/// Replaces the fields of a record. For CRM leads, turning `qualified` on stamps
/// `qualified_at` (and returns `true`: the lead is newly qualified).
pub(crate) async fn replace(
    db: &mut PgConnection,
    current: &Record,
    fields: &Fields,
) -> ApiResult<(Record, bool)> {
    let newly_qualified = fields.qualified == Some(true) && current.qualified != Some(true);
    let record = sqlx::query_as::<_, Record>(concat!(
        "UPDATE pipeline_records SET name = $2, email = $3, phone = $4, company = $5,
             message = $6, qualified = $7,
             qualified_at = CASE WHEN $8 THEN now() ELSE qualified_at END,
             updated_at = now()
         WHERE id = $1 RETURNING ",
        columns!()
    ))
    .bind(current.id)
    .bind(&fields.name)
    .bind(&fields.email)
    .bind(&fields.phone)
    .bind(&fields.company)
    .bind(&fields.message)
    .bind(fields.qualified)
    .bind(newly_qualified)
    .fetch_optional(db)
    .await?
    .ok_or_else(|| ApiError::not_found("record"))?;
    Ok((record, newly_qualified))
}

/// Deletes a record.
pub(crate) async fn delete(db: &mut PgConnection, book: Book, id: Uuid) -> ApiResult<()> {
    let deleted =
        sqlx::query("DELETE FROM pipeline_records WHERE id = $1 AND system = $2 AND kind = $3")
            .bind(id)
            .bind(book.system())
            .bind(book.kind())
            .execute(db)
            .await?
            .rows_affected();
    if deleted == 0 {
        return Err(ApiError::not_found(book.noun()));
    }
    Ok(())
}

/// A page of a book, newest first, limited to `scope`'s client when given.
pub(crate) async fn list(
    pg: &sqlx::PgPool,
    book: Book,
    scope: Option<Uuid>,
    params: PageParams,
) -> ApiResult<Page<Record>> {
    Listing::new("pipeline_records", columns!(), "created_at DESC, id DESC")
        .text("system", Some(book.system()))
        .text("kind", Some(book.kind()))
        .uuid("client_id", scope)
        .page::<Record, _>(pg, params)
        .await
}
