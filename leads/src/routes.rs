//! The three systems' routes (seed 003): the website's forms and records, the
//! marketing system's leads, the CRM's leads and customers. Form posts are public (they
//! come from pages of a client's site); everything else is JWT and tenant-scoped.

use poem::{web::Data, Request};
use poem_openapi::{
    param::{Header, Path, Query},
    payload::Json,
    ApiResponse, OpenApi,
};
use uuid::Uuid;

use termopar_web::{
    pagination::{Page, PageParams},
    responses::{Deleted, Found},
    ApiError, ApiResult, BearerAuth, ErrorCode,
};

use termopar_tracking::Preflight;

use crate::{
    jobs::{self, Job, Queue},
    records::{self, Book, Fields, Form, Person, Record},
    Leads,
};

/// The pipeline's groups in the OpenAPI document.
#[derive(poem_openapi::Tags)]
pub(crate) enum PipelineTags {
    /// The website: lead and customer forms posted from a client's site.
    Website,
    /// The marketing automation system's leads.
    Marketing,
    /// The CRM's leads and customers.
    Crm,
}

/// A form post that was stored (its jobs are enqueued with it).
#[derive(ApiResponse)]
pub(crate) enum FormPosted {
    /// Stored; marketing and the CRM get it in the background.
    #[oai(status = 201)]
    Created(
        Json<Record>,
        /// The page's origin, when its site allows it.
        #[oai(header = "Access-Control-Allow-Origin")]
        Option<String>,
        #[oai(header = "Vary")] String,
    ),
}

/// A record created by a system's POST.
#[derive(ApiResponse)]
pub(crate) enum Saved {
    /// Created.
    #[oai(status = 201)]
    Created(Json<Record>),
    /// Already created under this `Idempotency-Key`: the record of the first request.
    #[oai(status = 200)]
    Existing(Json<Record>),
}

/// Jobs a new record of `book` starts.
fn jobs_of_new(book: Book, record: &Record) -> Vec<(Queue, Job)> {
    let job = |qualified_at| Job {
        record_id: record.id,
        qualified_at,
        enqueued_at: chrono::Utc::now(),
    };
    match book {
        Book::WebsiteLeads => vec![
            (Queue::LeadToMarketing, job(None)),
            (Queue::LeadToCrm, job(None)),
        ],
        Book::WebsiteCustomers => vec![(Queue::CustomerToCrm, job(None))],
        Book::CrmLeads if record.qualified == Some(true) => {
            vec![(Queue::QualifiedEmail, job(record.qualified_at))]
        }
        _ => Vec::new(),
    }
}

async fn enqueue_all(
    leads: &Leads,
    db: &mut sqlx::PgConnection,
    jobs: Vec<(Queue, Job)>,
) -> ApiResult<()> {
    for (queue, job) in jobs {
        jobs::enqueue(db, queue, &[job], leads.settings().max_attempts).await?;
    }
    Ok(())
}

/// A form post from a page: checked against its site (exists, allows the page's
/// origin, within its rate), stored with its jobs in one transaction.
async fn post_form(leads: &Leads, req: &Request, book: Book, form: &Form) -> ApiResult<FormPosted> {
    let origin = req.headers().get("origin").and_then(|v| v.to_str().ok());
    let client_id = leads.tracking().site_client(form.site_id, origin).await?;
    if !leads.within_rate(form.site_id) {
        metrics::counter!("pipeline_forms_rejected_total", "reason" => "rate_limited").increment(1);
        return Err(ApiError::new(
            ErrorCode::RateLimited,
            "too many form posts for this site; retry in a moment",
        ));
    }
    let fields = Fields::of_form(book, form)?;
    let mut tx = leads.pg().begin().await?;
    let (record, _) =
        records::insert(&mut tx, book, client_id, Some(form.site_id), &fields, None).await?;
    enqueue_all(leads, &mut tx, jobs_of_new(book, &record)).await?;
    tx.commit().await?;
    metrics::counter!("pipeline_forms_total", "kind" => book.kind()).increment(1);
    tracing::info!(record = %record.id, site = %form.site_id, kind = book.kind(), "form stored");
    Ok(FormPosted::Created(
        Json(record),
        origin.map(str::to_owned),
        "Origin".into(),
    ))
}

/// A record created by a system's API (marketing, CRM), honouring `Idempotency-Key`.
async fn create(
    leads: &Leads,
    auth: &BearerAuth,
    book: Book,
    body: &Person,
    key: Option<String>,
) -> ApiResult<Saved> {
    let client_id = auth.0.client_for_new(body.client_id, "records")?;
    let key = key
        .map(|k| termopar_web::validate::name("Idempotency-Key", &k, 200))
        .transpose()?;
    let fields = Fields::of_person(book, body)?;
    let mut tx = leads.pg().begin().await?;
    let (record, new) =
        records::insert(&mut tx, book, client_id, None, &fields, key.as_deref()).await?;
    if new {
        enqueue_all(leads, &mut tx, jobs_of_new(book, &record)).await?;
    }
    tx.commit().await?;
    Ok(if new {
        Saved::Created(Json(record))
    } else {
        Saved::Existing(Json(record))
    })
}

async fn list(
    leads: &Leads,
    auth: &BearerAuth,
    book: Book,
    client_id: Option<Uuid>,
    page: Option<u32>,
    page_size: Option<u32>,
) -> ApiResult<Found<Page<Record>>> {
    let params = PageParams::new(page, page_size);
    let Ok(scope) = auth.0.list_scope(client_id) else {
        return Ok(Found::Ok(Json(params.page(Vec::new(), 0))));
    };
    Ok(Found::Ok(Json(
        records::list(leads.pg(), book, scope, params).await?,
    )))
}

async fn get(leads: &Leads, auth: &BearerAuth, book: Book, id: Uuid) -> ApiResult<Found<Record>> {
    let mut db = leads.pg().acquire().await?;
    let record = records::visible(&mut db, book, id, |c| auth.0.sees_client(c)).await?;
    Ok(Found::Ok(Json(record)))
}

/// Replaces a record; a CRM lead that becomes qualified gets its e-mail job, in the
/// same transaction.
async fn replace(
    leads: &Leads,
    auth: &BearerAuth,
    book: Book,
    id: Uuid,
    body: &Person,
) -> ApiResult<Found<Record>> {
    let fields = Fields::of_person(book, body)?;
    let mut tx = leads.pg().begin().await?;
    let current = records::visible(&mut tx, book, id, |c| auth.0.sees_client(c)).await?;
    auth.0.require_manager_of(current.client_id)?;
    if body.client_id.is_some_and(|c| c != current.client_id) {
        return Err(ApiError::validation(
            "client_id",
            "a record cannot move to another client",
        ));
    }
    let (record, newly_qualified) = records::replace(&mut tx, &current, &fields).await?;
    if newly_qualified {
        let job = Job {
            record_id: record.id,
            qualified_at: record.qualified_at,
            enqueued_at: chrono::Utc::now(),
        };
        enqueue_all(leads, &mut tx, vec![(Queue::QualifiedEmail, job)]).await?;
        tracing::info!(lead = %record.id, "lead qualified; e-mail enqueued");
    }
    tx.commit().await?;
    Ok(Found::Ok(Json(record)))
}

async fn delete(leads: &Leads, auth: &BearerAuth, book: Book, id: Uuid) -> ApiResult<Deleted> {
    let mut tx = leads.pg().begin().await?;
    let current = records::visible(&mut tx, book, id, |c| auth.0.sees_client(c)).await?;
    auth.0.require_manager_of(current.client_id)?;
    records::delete(&mut tx, book, id).await?;
    tx.commit().await?;
    Ok(Deleted::Deleted)
}

/// The read, replace and delete operations of one book, under `$path`.
macro_rules! book_api {
    ($api:ident, $path:literal, $book:expr, $tag:literal, $what:literal,
     $list:literal, $get:literal, $replace:literal, $delete:literal, { $($extra:tt)* }) => {
        #[doc = concat!("Reading and changing ", $what, ".")]
        pub struct $api;

        #[OpenApi(prefix_path = $path, tag = $tag)]
        impl $api {
            #[doc = concat!("List ", $what, ", newest first. Operators and viewers see their client's only.")]
            #[oai(path = "/", method = "get", operation_id = $list)]
            #[tracing::instrument(skip_all)]
            async fn list(
                &self,
                leads: Data<&Leads>,
                auth: BearerAuth,
                /// Only records of this client.
                client_id: Query<Option<Uuid>>,
                /// Page number, from 1.
                #[oai(validator(minimum(value = "1")))]
                page: Query<Option<u32>>,
                /// Items per page (1 to 1000, default 50).
                #[oai(validator(minimum(value = "1"), maximum(value = "1000")))]
                page_size: Query<Option<u32>>,
            ) -> ApiResult<Found<Page<Record>>> {
                list(&leads, &auth, $book, client_id.0, page.0, page_size.0).await
            }

            #[doc = concat!("Get one of the ", $what, ".")]
            #[oai(path = "/:id", method = "get", operation_id = $get)]
            #[tracing::instrument(skip_all, fields(id = %id.0))]
            async fn get(
                &self,
                leads: Data<&Leads>,
                auth: BearerAuth,
                id: Path<Uuid>,
            ) -> ApiResult<Found<Record>> {
                get(&leads, &auth, $book, id.0).await
            }

            #[doc = concat!("Replace one of the ", $what, " (admins, and operators of its client).")]
            #[oai(path = "/:id", method = "put", operation_id = $replace)]
            #[tracing::instrument(skip_all, fields(id = %id.0))]
            async fn replace(
                &self,
                leads: Data<&Leads>,
                auth: BearerAuth,
                id: Path<Uuid>,
                body: Json<Person>,
            ) -> ApiResult<Found<Record>> {
                replace(&leads, &auth, $book, id.0, &body).await
            }

            #[doc = concat!("Delete one of the ", $what, " (admins, and operators of its client).")]
            #[oai(path = "/:id", method = "delete", operation_id = $delete)]
            #[tracing::instrument(skip_all, fields(id = %id.0))]
            async fn delete(
                &self,
                leads: Data<&Leads>,
                auth: BearerAuth,
                id: Path<Uuid>,
            ) -> ApiResult<Deleted> {
                delete(&leads, &auth, $book, id.0).await
            }

            $($extra)*
        }
    };
}

book_api!(
    WebsiteLeadsApi,
    "/leads",
    Book::WebsiteLeads,
    "PipelineTags::Website",
    "website leads",
    "listWebsiteLeads",
    "getWebsiteLead",
    "replaceWebsiteLead",
    "deleteWebsiteLead",
    {
        /// Post the lead form (public: from a page of a registered site).
        ///
        /// Stored with two jobs, in one transaction: the lead goes to marketing and to the
        /// CRM in the background. 422 `unknown_site`, 403 `origin_not_allowed` (the page's
        /// `Origin` is not one its site allows), 429 `rate_limited`.
        #[oai(path = "/", method = "post", operation_id = "postLeadForm")]
        #[tracing::instrument(skip_all)]
        async fn lead_form(
            &self,
            leads: Data<&Leads>,
            req: &Request,
            body: Json<Form>,
        ) -> ApiResult<FormPosted> {
            post_form(&leads, req, Book::WebsiteLeads, &body).await
        }

        /// CORS preflight of the lead form.
        #[oai(path = "/", method = "options", operation_id = "preflightLeadForm")]
        #[tracing::instrument(skip_all)]
        async fn lead_preflight(
            &self,
            leads: Data<&Leads>,
            /// The page's origin.
            #[oai(name = "Origin")]
            origin: Header<Option<String>>,
        ) -> ApiResult<Preflight> {
            leads.tracking().preflight(origin.0).await
        }
    }
);
book_api!(
    WebsiteCustomersApi,
    "/customers",
    Book::WebsiteCustomers,
    "PipelineTags::Website",
    "website customers",
    "listWebsiteCustomers",
    "getWebsiteCustomer",
    "replaceWebsiteCustomer",
    "deleteWebsiteCustomer",
    {
        /// Post the customer form (public: from a page of a registered site).
        ///
        /// Stored with its job, in one transaction: the customer goes to the CRM in the
        /// background. Also at `/costumers` (the seed's spelling).
        #[oai(path = "/", method = "post", operation_id = "postCustomerForm")]
        #[tracing::instrument(skip_all)]
        async fn customer_form(
            &self,
            leads: Data<&Leads>,
            req: &Request,
            body: Json<Form>,
        ) -> ApiResult<FormPosted> {
            post_form(&leads, req, Book::WebsiteCustomers, &body).await
        }

        /// CORS preflight of the customer form.
        #[oai(path = "/", method = "options", operation_id = "preflightCustomerForm")]
        #[tracing::instrument(skip_all)]
        async fn customer_preflight(
            &self,
            leads: Data<&Leads>,
            /// The page's origin.
            #[oai(name = "Origin")]
            origin: Header<Option<String>>,
        ) -> ApiResult<Preflight> {
            leads.tracking().preflight(origin.0).await
        }
    }
);
book_api!(
    MarketingLeadsApi,
    "/marketing/leads",
    Book::MarketingLeads,
    "PipelineTags::Marketing",
    "marketing leads",
    "listMarketingLeads",
    "getMarketingLead",
    "replaceMarketingLead",
    "deleteMarketingLead",
    {
        /// Create a marketing lead (what the pipeline's job does for each website lead).
        ///
        /// With `Idempotency-Key`, a second request with the same key (for the same client)
        /// creates nothing and answers 200 with the first one's lead.
        #[oai(path = "/", method = "post", operation_id = "createMarketingLead")]
        #[tracing::instrument(skip_all)]
        async fn marketing_lead(
            &self,
            leads: Data<&Leads>,
            auth: BearerAuth,
            /// A key of the request's purpose (1 to 200 characters).
            #[oai(name = "Idempotency-Key")]
            key: Header<Option<String>>,
            body: Json<Person>,
        ) -> ApiResult<Saved> {
            create(&leads, &auth, Book::MarketingLeads, &body, key.0).await
        }
    }
);
book_api!(
    CrmLeadsApi,
    "/crm/leads",
    Book::CrmLeads,
    "PipelineTags::Crm",
    "CRM leads",
    "listCrmLeads",
    "getCrmLead",
    "replaceCrmLead",
    "deleteCrmLead",
    {
        /// Create a CRM lead (what the pipeline's job does for each website lead). One
        /// created with `qualified: true` gets its e-mail. `Idempotency-Key` as for
        /// marketing leads.
        #[oai(path = "/", method = "post", operation_id = "createCrmLead")]
        #[tracing::instrument(skip_all)]
        async fn crm_lead(
            &self,
            leads: Data<&Leads>,
            auth: BearerAuth,
            /// A key of the request's purpose (1 to 200 characters).
            #[oai(name = "Idempotency-Key")]
            key: Header<Option<String>>,
            body: Json<Person>,
        ) -> ApiResult<Saved> {
            create(&leads, &auth, Book::CrmLeads, &body, key.0).await
        }
    }
);
book_api!(
    CrmCustomersApi,
    "/crm/customers",
    Book::CrmCustomers,
    "PipelineTags::Crm",
    "CRM customers",
    "listCrmCustomers",
    "getCrmCustomer",
    "replaceCrmCustomer",
    "deleteCrmCustomer",
    {
        /// Create a CRM customer (what the pipeline's job does for each website customer).
        /// Also at `/crm/costumers`. `Idempotency-Key` as for marketing leads.
        #[oai(path = "/", method = "post", operation_id = "createCrmCustomer")]
        #[tracing::instrument(skip_all)]
        async fn crm_customer(
            &self,
            leads: Data<&Leads>,
            auth: BearerAuth,
            /// A key of the request's purpose (1 to 200 characters).
            #[oai(name = "Idempotency-Key")]
            key: Header<Option<String>>,
            body: Json<Person>,
        ) -> ApiResult<Saved> {
            create(&leads, &auth, Book::CrmCustomers, &body, key.0).await
        }
    }
);
