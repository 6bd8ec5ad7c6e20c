//! `POST /track` (and its CORS preflight): hits from the tracker on client sites.

use std::{collections::BTreeMap, sync::Arc};

use chrono::Utc;
use poem::{web::Data, Request};
use poem_openapi::{
    param::Header,
    payload::{Json, ParsePayload, Payload},
    registry::{MetaSchemaRef, Registry},
    types::Type,
    ApiRequest, ApiResponse, Object, OpenApi,
};
use uuid::Uuid;

use termopar_web::{ApiError, ApiResult, ErrorCode};

use crate::{
    hit::{parse_body, Reject, StoredHit},
    sites::{self, SiteInfo},
    Tracking,
};

/// The tracking product's group in the OpenAPI document.
#[derive(poem_openapi::Tags)]
pub(crate) enum TrackingTags {
    /// Web tracking: sites, hits from their pages, and who accessed what.
    Tracking,
}

/// The user who viewed a page, as the site knows them.
#[derive(Debug, Object)]
pub(crate) struct TrackedUser {
    /// The site's own id of the user (1 to 128 characters).
    pub id: String,
    /// The user's device or browser (at most 200 characters).
    pub device: Option<String>,
}

/// A page view.
#[derive(Debug, Object)]
pub(crate) struct Hit {
    /// The site (its id in `/sites`).
    pub site_id: Uuid,
    /// The page's absolute http(s) URL (at most 2000 bytes).
    pub url: String,
    /// The page's contexts (at most 32 by default, each 1 to 100 characters).
    pub context: Option<Vec<String>>,
    /// Who viewed it.
    pub user: TrackedUser,
}

macro_rules! hits_payload {
    ($name:ident, $content_type:literal, $essence:literal) => {
        /// The body of `POST /track` as bytes, checked by the handler.
        pub(crate) struct $name(Vec<u8>);

        impl Payload for $name {
            const CONTENT_TYPE: &'static str = $content_type;

            fn check_content_type(content_type: &str) -> bool {
                content_type
                    .split(';')
                    .next()
                    .is_some_and(|essence| essence.trim().eq_ignore_ascii_case($essence))
            }

            fn schema_ref() -> MetaSchemaRef {
                Hit::schema_ref()
            }

            fn register(registry: &mut Registry) {
                Hit::register(registry);
            }
        }

        impl ParsePayload for $name {
            const IS_REQUIRED: bool = true;

            async fn from_request(
                request: &Request,
                body: &mut poem::RequestBody,
            ) -> poem::Result<Self> {
                use poem::FromRequest;
                Ok(Self(Vec::<u8>::from_request(request, body).await?))
            }
        }
    };
}

hits_payload!(JsonHits, "application/json", "application/json");
hits_payload!(TextHits, "text/plain", "text/plain");

/// One hit, or an array of hits, as JSON.
#[derive(ApiRequest)]
pub(crate) enum TrackBody {
    /// As `application/json`.
    Json(JsonHits),
    /// The same JSON as `text/plain`, which browsers send without a CORS preflight (what
    /// `navigator.sendBeacon` does).
    Text(TextHits),
}

/// A hit of a batch that was refused.
#[derive(Debug, Clone, Object)]
pub(crate) struct RejectedHit {
    /// Its place in the array, from 0.
    pub index: u32,
    /// Why, as an error code (`validation_failed`, `unknown_site`, ...).
    pub code: String,
    /// The field at fault, when one is.
    pub field: Option<String>,
    /// Why, for people.
    pub message: String,
}

/// What became of the hits of a request.
#[derive(Debug, Object)]
pub(crate) struct TrackAck {
    /// Hits accepted: stored durably before this answer.
    pub accepted: u32,
    /// Hits from crawlers and bots, dropped (when the bot filter is on).
    pub ignored: u32,
    /// Hits of the batch that were refused, with the reason.
    pub rejected: Vec<RejectedHit>,
}

/// The answer to a request with at least one hit accepted or ignored.
#[derive(ApiResponse)]
pub(crate) enum Tracked {
    /// Every accepted hit is durable: a crash of any process can no longer lose it.
    #[oai(status = 202)]
    Accepted(
        Json<TrackAck>,
        /// The page's origin, when its site allows it.
        #[oai(header = "Access-Control-Allow-Origin")]
        Option<String>,
        #[oai(header = "Vary")] String,
    ),
}

/// The answer to a CORS preflight of a public endpoint of client sites.
#[derive(ApiResponse)]
pub enum Preflight {
    /// Allowed when the origin is one a site allows (else without
    /// `Access-Control-Allow-Origin`, which the browser takes as a refusal).
    #[oai(status = 204)]
    Answered(
        #[oai(header = "Access-Control-Allow-Origin")] Option<String>,
        #[oai(header = "Access-Control-Allow-Methods")] String,
        #[oai(header = "Access-Control-Allow-Headers")] String,
        #[oai(header = "Access-Control-Max-Age")] u32,
        #[oai(header = "Vary")] String,
    ),
}

/// The hits of one request, sorted into what happens to each.
struct Sorted {
    accepted: Vec<StoredHit>,
    rejected: Vec<(usize, Reject)>,
}

impl Tracking {
    /// Checks each parsed hit against its site (exists, allows `origin`, within its
    /// rate), and stamps the accepted ones.
    async fn sort(
        &self,
        parsed: Vec<Result<crate::hit::Hit, Reject>>,
        origin: Option<&str>,
        user_agent: Option<&str>,
    ) -> ApiResult<Sorted> {
        let now = Utc::now();
        let mut sites: BTreeMap<Uuid, Option<Arc<SiteInfo>>> = BTreeMap::new();
        let mut checked = Vec::with_capacity(parsed.len());
        for hit in parsed {
            let hit = match hit {
                Ok(hit) => hit,
                Err(r) => {
                    checked.push(Err(r));
                    continue;
                }
            };
            if let std::collections::btree_map::Entry::Vacant(e) = sites.entry(hit.site_id) {
                e.insert(sites::lookup(self, hit.site_id).await?);
            }
            let verdict = match (&sites[&hit.site_id], origin) {
                (None, _) => Err(Reject::new(
                    "unknown_site",
                    ApiError::new(ErrorCode::UnknownSite, format!("no site {}", hit.site_id))
                        .with_field("site_id"),
                )),
                (Some(site), Some(origin)) if !site.allows(origin) => Err(Reject::new(
                    "origin_not_allowed",
                    ApiError::new(
                        ErrorCode::OriginNotAllowed,
                        format!("site {} does not allow pages of {origin}", hit.site_id),
                    ),
                )),
                _ => Ok(hit),
            };
            checked.push(verdict);
        }
        // The rate is per site, over the hits of this request that got this far.
        let mut per_site: BTreeMap<Uuid, u32> = BTreeMap::new();
        for hit in checked.iter().flatten() {
            *per_site.entry(hit.site_id).or_default() += 1;
        }
        let limited: Vec<Uuid> = per_site
            .into_iter()
            .filter(|(site, n)| !self.within_rate(*site, *n))
            .map(|(site, _)| site)
            .collect();
        let mut sorted = Sorted {
            accepted: Vec::with_capacity(checked.len()),
            rejected: Vec::new(),
        };
        for (index, hit) in checked.into_iter().enumerate() {
            match hit {
                Ok(hit) if limited.contains(&hit.site_id) => sorted.rejected.push((
                    index,
                    Reject::new(
                        "rate_limited",
                        ApiError::new(
                            ErrorCode::RateLimited,
                            format!("site {} sends more hits than its rate allows", hit.site_id),
                        ),
                    ),
                )),
                Ok(hit) => sorted.accepted.push(StoredHit::new(hit, now, user_agent)),
                Err(r) => sorted.rejected.push((index, r)),
            }
        }
        Ok(sorted)
    }

    fn within_rate(&self, site: Uuid, hits: u32) -> bool {
        self.0.limiter.allows(site, hits)
    }
}

/// Receiving hits.
pub struct TrackApi;

#[OpenApi(tag = "TrackingTags::Tracking")]
impl TrackApi {
    /// Receive page views from a site's pages (public: no token).
    ///
    /// The seed's hit `{"site_id","url","context":[..],"user":{"id","device"}}`, or an
    /// array of them, as `application/json` or `text/plain`. 202 once every accepted hit
    /// is durable, with the hits of a batch that were refused and why. A request whose
    /// hits are all refused gets the first refusal's status: 400 (not JSON), 403
    /// `origin_not_allowed` (the page's `Origin` is not one its site allows), 413 (body
    /// or batch too large), 422 (`unknown_site`, or `validation_failed` naming the
    /// field: bad URL, too many contexts, ...), 429 `rate_limited`. Crawlers and bots
    /// are answered 202 and dropped (`ignored`). The receive time and the user agent are
    /// added; the sender's address is never stored.
    #[oai(path = "/track", method = "post", operation_id = "track")]
    #[tracing::instrument(skip_all)]
    async fn track(
        &self,
        tracking: Data<&Tracking>,
        req: &Request,
        body: TrackBody,
    ) -> ApiResult<Tracked> {
        let body = match body {
            TrackBody::Json(JsonHits(b)) | TrackBody::Text(TextHits(b)) => b,
        };
        let settings = &tracking.settings();
        let origin = req.headers().get("origin").and_then(|v| v.to_str().ok());
        let user_agent = req
            .headers()
            .get("user-agent")
            .and_then(|v| v.to_str().ok());
        let refuse = |r: Reject, hits: usize| {
            r.count(hits);
            Err(r.error)
        };
        if body.len() > settings.max_body_bytes {
            let r = Reject::new(
                "too_large",
                ApiError::payload_too_large(settings.max_body_bytes),
            );
            return refuse(r, 1);
        }
        let parsed = match parse_body(&body, settings.max_hits, settings.max_contexts) {
            Ok(parsed) => parsed,
            Err(r) => return refuse(r, 1),
        };
        let allow_origin = origin.map(str::to_owned);
        let vary = "Origin".to_owned();
        if settings.bot_filter && user_agent.is_some_and(iscrawl::is_crawler) {
            let n = parsed.len();
            Reject::new("bot", ApiError::bad_request("bot")).count(n);
            return Ok(Tracked::Accepted(
                Json(TrackAck {
                    accepted: 0,
                    ignored: n as u32,
                    rejected: Vec::new(),
                }),
                allow_origin,
                vary,
            ));
        }
        let sorted = tracking.sort(parsed, origin, user_agent).await?;
        for (_, r) in &sorted.rejected {
            r.count(1);
        }
        if sorted.accepted.is_empty() {
            let (_, first) = sorted.rejected.first().expect("a hit was refused");
            let details = rejected(&sorted.rejected);
            return Err(first.error.clone().with_details(details));
        }
        let accepted = sorted.accepted.len() as u32;
        tracking.writer().submit(sorted.accepted).await?;
        Ok(Tracked::Accepted(
            Json(TrackAck {
                accepted,
                ignored: 0,
                rejected: rejected_items(&sorted.rejected),
            }),
            allow_origin,
            vary,
        ))
    }

    /// CORS preflight of `POST /track` (browsers send it before a JSON body).
    #[oai(path = "/track", method = "options", operation_id = "trackPreflight")]
    #[tracing::instrument(skip_all)]
    async fn preflight(
        &self,
        tracking: Data<&Tracking>,
        /// The page's origin.
        #[oai(name = "Origin")]
        origin: Header<Option<String>>,
    ) -> ApiResult<Preflight> {
        tracking.preflight(origin.0).await
    }
}

fn rejected_items(rejected: &[(usize, Reject)]) -> Vec<RejectedHit> {
    rejected
        .iter()
        .map(|(index, r)| RejectedHit {
            index: *index as u32,
            code: r.error.code().as_str().to_owned(),
            field: r.error.body().field.clone(),
            message: r.error.message().to_owned(),
        })
        .collect()
}

/// The refusals as error details: `[{"index","code","field","message"}]`.
fn rejected(rejected: &[(usize, Reject)]) -> serde_json::Value {
    serde_json::Value::Array(
        rejected_items(rejected)
            .into_iter()
            .map(|r| {
                serde_json::json!({
                    "index": r.index, "code": r.code, "field": r.field, "message": r.message
                })
            })
            .collect(),
    )
}

/// The tracker script sites include: `<script async src=".../t.js" data-site="ID">`.
pub fn script() -> impl poem::Endpoint {
    poem::endpoint::make_sync(|_| {
        poem::Response::builder()
            .content_type("application/javascript; charset=utf-8")
            .header("Cache-Control", "public, max-age=3600")
            .header("Access-Control-Allow-Origin", "*")
            .body(SCRIPT)
    })
}

/// The tracker itself (see `tracking/src/t.js`).
pub const SCRIPT: &str = include_str!("t.js");
