//! Who accessed what: a site's accesses over a period (raw, newest first; per local day;
//! top URLs and contexts) and every context a tracked user accessed.
//!
//! Counts come from the 15-minute rollups, never from a scan of raw hits. Raw hits are
//! read by `_id` only: `tracking_pages` says which pages of a site hold a window's hits.
//! Hits reach the rollups and the pages when the relay has moved them, about a tenth of
//! a second after their 202.

use chrono::{DateTime, NaiveDate, TimeDelta, Utc};
use chrono_tz::Tz;
use mongodb::bson::{doc, Bson, Document};
use poem::web::Data;
use poem_openapi::{
    param::{Path, Query},
    payload::Json,
    Object, OpenApi,
};
use sqlx::PgConnection;
use uuid::Uuid;

use termopar_core::tz::local_day_start;
use termopar_web::{
    days, pagination::PageParams, responses::Found, ApiError, ApiResult, BearerAuth,
};

use crate::{
    relay::{page_id, BUCKET_MS, PAGE_SPAN},
    routes::TrackingTags,
    sites, Tracking,
};

/// Default window of the rollup questions when `from` is not given: 7 days up to `to`.
const DEFAULT_WINDOW: TimeDelta = TimeDelta::days(7);
/// Longest window of one question.
const MAX_WINDOW: TimeDelta = TimeDelta::days(days::MAX_DAYS);
/// Pages read from the index at a time while walking a window.
const INDEX_CHUNK: i64 = 256;

/// A page view as stored.
#[derive(Debug, Clone, Object)]
pub(crate) struct Access {
    /// Id (`<page>:<n>`), stable.
    pub id: String,
    /// When it was received.
    pub received_at: DateTime<Utc>,
    /// The page's URL.
    pub url: String,
    /// The page's contexts.
    pub context: Vec<String>,
    /// The site's id of the user.
    pub user_id: String,
    /// The user's device, as the page sent it.
    pub device: Option<String>,
    /// The browser's user agent.
    pub user_agent: Option<String>,
}

/// A page of accesses, newest first.
#[derive(Debug, Object)]
pub(crate) struct AccessPage {
    /// The accesses.
    pub items: Vec<Access>,
    /// Page number (1 when `cursor` was given).
    pub page: u32,
    /// Items per page.
    pub page_size: u32,
    /// Accesses in the window.
    pub total: i64,
    /// Pass as `cursor` for the next page; absent on the last one.
    pub next_cursor: Option<String>,
}

/// Hits of one local day.
#[derive(Debug, Object)]
pub(crate) struct DayCount {
    /// The local date.
    pub date: NaiveDate,
    /// Accesses that day (`count`, as the contract names it).
    pub count: i64,
}

/// Accesses per local day, oldest first, every day of the range (0 when none).
#[derive(Debug, Object)]
pub(crate) struct DailyAccesses {
    /// The site.
    pub site_id: Uuid,
    /// The time zone of the days.
    pub tz: String,
    /// One item per day.
    pub items: Vec<DayCount>,
}

/// A URL or context with its count.
#[derive(Debug, Object, sqlx::FromRow)]
pub(crate) struct Ranked {
    /// The URL or context.
    pub key: String,
    /// Accesses in the window.
    pub hits: i64,
}

/// The most accessed URLs and contexts of a window.
#[derive(Debug, Object)]
pub(crate) struct TopAccesses {
    /// The site.
    pub site_id: Uuid,
    /// Start of the window used (`from` rounded down to 15 minutes).
    pub from: DateTime<Utc>,
    /// End of the window used, exclusive (`to` rounded up to 15 minutes).
    pub to: DateTime<Utc>,
    /// Accesses in the window.
    pub hits: i64,
    /// URLs, most accessed first.
    pub urls: Vec<Ranked>,
    /// Contexts, most accessed first.
    pub contexts: Vec<Ranked>,
}

/// A context a user accessed on a site.
#[derive(Debug, Object, sqlx::FromRow)]
pub(crate) struct UserContext {
    /// The site.
    pub site_id: Uuid,
    /// The context.
    pub context: String,
    /// Accesses of pages with this context (`count`, as the contract names it).
    pub count: i64,
    /// First access in the window.
    pub first_seen: DateTime<Utc>,
    /// Last access in the window.
    pub last_seen: DateTime<Utc>,
}

/// Every context a user accessed in a window, most recent first.
#[derive(Debug, Object)]
pub(crate) struct UserContexts {
    /// The site's id of the user.
    pub user_id: String,
    /// Start of the window used (`from` rounded down to 15 minutes).
    pub from: DateTime<Utc>,
    /// End of the window used, exclusive (`to` rounded up to 15 minutes).
    pub to: DateTime<Utc>,
    /// One item per site and context.
    pub items: Vec<UserContext>,
}

/// `from..to` of a rollup question, on 15-minute bounds: `to` defaults to now, `from`
/// to 7 days before `to`.
fn rollup_window(
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
) -> ApiResult<(DateTime<Utc>, DateTime<Utc>)> {
    let to = to.unwrap_or_else(Utc::now);
    let from = from.unwrap_or(to - DEFAULT_WINDOW);
    if from >= to {
        return Err(ApiError::bad_request("`from` must be before `to`").with_field("from"));
    }
    if to - from > MAX_WINDOW {
        return Err(ApiError::bad_request(format!(
            "at most {} days per request; narrow `from`..`to`",
            days::MAX_DAYS
        ))
        .with_field("to"));
    }
    let floor = |t: DateTime<Utc>| {
        let ms = t.timestamp_millis();
        DateTime::from_timestamp_millis(ms - ms.rem_euclid(BUCKET_MS)).unwrap_or(t)
    };
    let ceil = |t: DateTime<Utc>| {
        let f = floor(t);
        if f == t {
            t
        } else {
            f + TimeDelta::milliseconds(BUCKET_MS)
        }
    };
    Ok((floor(from), ceil(to)))
}

/// A page's place in the index, newest first: by `last_at`, then `row`, then `part`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Key {
    last_at: DateTime<Utc>,
    row: i64,
    part: i32,
}

/// Where a listing resumes: a page, and how many of its hits in the window were already
/// listed.
#[derive(Debug, Clone, PartialEq)]
struct Cursor {
    key: Key,
    skip: usize,
}

impl Cursor {
    fn encode(&self) -> String {
        let k = &self.key;
        format!(
            "{}.{}.{}.{}",
            k.last_at.timestamp_micros(),
            k.row,
            k.part,
            self.skip
        )
    }

    fn decode(s: &str) -> ApiResult<Self> {
        let bad = || ApiError::bad_request("not a cursor from this API").with_field("cursor");
        let parts: Vec<i64> = s
            .split('.')
            .map(|p| p.parse::<i64>().map_err(|_| bad()))
            .collect::<ApiResult<_>>()?;
        let [micros, row, part, skip] = parts[..] else {
            return Err(bad());
        };
        Ok(Self {
            key: Key {
                last_at: DateTime::from_timestamp_micros(micros).ok_or_else(bad)?,
                row,
                part: i32::try_from(part).map_err(|_| bad())?,
            },
            skip: usize::try_from(skip).map_err(|_| bad())?,
        })
    }
}

/// A page of the index.
#[derive(Debug, sqlx::FromRow)]
struct PageRow {
    last_at: DateTime<Utc>,
    row_id: i64,
    part: i32,
    first_at: DateTime<Utc>,
    hits: i32,
}

impl PageRow {
    fn key(&self) -> Key {
        Key {
            last_at: self.last_at,
            row: self.row_id,
            part: self.part,
        }
    }
}

impl Tracking {
    /// Index pages of `site` that may hold hits of `from..to`, newest first, from
    /// `start` on (the page at `start` included or not).
    async fn index_chunk(
        db: &mut PgConnection,
        site: Uuid,
        (from, to): (DateTime<Utc>, DateTime<Utc>),
        start: Option<(Key, bool)>,
    ) -> ApiResult<Vec<PageRow>> {
        // A page ends at most PAGE_SPAN after it starts, so one holding hits before `to`
        // ends before `to + PAGE_SPAN`: the index is entered there, not at the newest.
        let (key, inclusive) = start.unwrap_or((
            Key {
                last_at: to + PAGE_SPAN,
                row: i64::MAX,
                part: i32::MAX,
            },
            true,
        ));
        let bound = if inclusive { "<=" } else { "<" };
        Ok(sqlx::query_as::<_, PageRow>(sqlx::AssertSqlSafe(format!(
            "SELECT last_at, row_id, part, first_at, hits FROM tracking_pages
             WHERE site_id = $1 AND last_at >= $2 AND first_at < $3
               AND (last_at, row_id, part) {bound} ($4, $5, $6)
             ORDER BY last_at DESC, row_id DESC, part DESC LIMIT $7"
        )))
        .bind(site)
        .bind(from)
        .bind(to)
        .bind(key.last_at)
        .bind(key.row)
        .bind(key.part)
        .bind(INDEX_CHUNK)
        .fetch_all(db)
        .await?)
    }

    /// A page's hits in `from..to`, newest first.
    async fn page_hits(
        &self,
        site: Uuid,
        page: &PageRow,
        (from, to): (DateTime<Utc>, DateTime<Utc>),
    ) -> ApiResult<Vec<Access>> {
        let id = page_id(site, page.row_id, page.part);
        let doc = self
            .0
            .hits
            .find_one(doc! { "_id": &id })
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "could not read a page of raw hits");
                ApiError::unavailable("the document store")
            })?;
        let Some(doc) = doc else {
            // Indexed but gone: deleted with its site while this request ran.
            return Ok(Vec::new());
        };
        let mut hits: Vec<Access> = doc
            .get_array("hits")
            .map(|a| a.as_slice())
            .unwrap_or_default()
            .iter()
            .enumerate()
            .filter_map(|(n, h)| access(&id, n, h))
            .filter(|a| from <= a.received_at && a.received_at < to)
            .collect();
        // Newest first; among equal times, the later in the page first.
        hits.reverse();
        hits.sort_by_key(|a| std::cmp::Reverse(a.received_at));
        Ok(hits)
    }

    /// Hits of `page` in the window: its count when it lies inside, else read.
    async fn hits_in_window(
        &self,
        site: Uuid,
        page: &PageRow,
        window: (DateTime<Utc>, DateTime<Utc>),
    ) -> ApiResult<usize> {
        if window.0 <= page.first_at && page.last_at < window.1 {
            Ok(page.hits as usize)
        } else {
            Ok(self.page_hits(site, page, window).await?.len())
        }
    }

    /// Accesses in the window.
    async fn window_total(
        &self,
        db: &mut PgConnection,
        site: Uuid,
        (from, to): (DateTime<Utc>, DateTime<Utc>),
    ) -> ApiResult<i64> {
        let inside: i64 = sqlx::query_scalar(
            "SELECT coalesce(sum(hits), 0)::int8 FROM tracking_pages
             WHERE site_id = $1 AND first_at >= $2 AND last_at < $3",
        )
        .bind(site)
        .bind(from)
        .bind(to)
        .fetch_one(&mut *db)
        .await?;
        // Pages across either end of the window (few: a page spans a moment).
        let edges = sqlx::query_as::<_, PageRow>(
            "SELECT last_at, row_id, part, first_at, hits FROM tracking_pages
             WHERE site_id = $1 AND (
                 (last_at >= $2 AND last_at < $2 + $4 AND first_at < $2)
              OR (last_at >= $3 AND last_at < $3 + $4 AND first_at < $3))",
        )
        .bind(site)
        .bind(from)
        .bind(to)
        .bind(PAGE_SPAN)
        .fetch_all(&mut *db)
        .await?;
        let mut total = inside;
        for page in &edges {
            total += self.page_hits(site, page, (from, to)).await?.len() as i64;
        }
        Ok(total)
    }
}

/// A stored hit as an access.
fn access(doc_id: &str, n: usize, hit: &Bson) -> Option<Access> {
    let hit = hit.as_document()?;
    let user = hit.get_document("user").ok();
    let text =
        |d: Option<&Document>, key: &str| d.and_then(|d| d.get_str(key).ok()).map(str::to_owned);
    Some(Access {
        id: format!("{doc_id}:{n}"),
        received_at: DateTime::from_timestamp_millis(
            hit.get_datetime("at").ok()?.timestamp_millis(),
        )?,
        url: hit.get_str("url").ok()?.to_owned(),
        context: hit
            .get_array("context")
            .map(|a| {
                a.iter()
                    .filter_map(|c| c.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default(),
        user_id: text(user, "id")?,
        device: text(user, "device"),
        user_agent: text(Some(hit), "ua"),
    })
}

/// The client's time zone.
async fn client_tz(tracking: &Tracking, client: Uuid) -> ApiResult<Tz> {
    let name: Option<String> = sqlx::query_scalar("SELECT timezone FROM clients WHERE id = $1")
        .bind(client)
        .fetch_optional(tracking.pg())
        .await?;
    Ok(name
        .and_then(|n| termopar_core::tz::parse(&n))
        .unwrap_or(chrono_tz::UTC))
}

/// Questions about accesses.
pub struct AccessesApi;

#[OpenApi(tag = "TrackingTags::Tracking")]
impl AccessesApi {
    /// A site's accesses in a period, newest first.
    ///
    /// `from` (inclusive) and `to` (exclusive) are exact; without them, every access.
    /// Page with `page`, or follow `next_cursor` (stable while new hits arrive).
    #[oai(
        path = "/sites/:id/accesses",
        method = "get",
        operation_id = "siteAccesses"
    )]
    #[tracing::instrument(skip_all, fields(site = %id.0))]
    #[allow(clippy::too_many_arguments)]
    async fn accesses(
        &self,
        tracking: Data<&Tracking>,
        auth: BearerAuth,
        id: Path<Uuid>,
        /// Start (inclusive), RFC 3339.
        from: Query<Option<DateTime<Utc>>>,
        /// End (exclusive), RFC 3339.
        to: Query<Option<DateTime<Utc>>>,
        /// Page number, from 1 (ignored with `cursor`).
        #[oai(validator(minimum(value = "1")))]
        page: Query<Option<u32>>,
        /// Items per page (1 to 1000, default 50).
        #[oai(validator(minimum(value = "1"), maximum(value = "1000")))]
        page_size: Query<Option<u32>>,
        /// Where the previous page ended (its `next_cursor`).
        cursor: Query<Option<String>>,
    ) -> ApiResult<Found<AccessPage>> {
        let site = sites::visible(&tracking, &auth, id.0).await?;
        // Without bounds: every hit (none is received before 1970 or after 9999).
        let from = from.0.unwrap_or(DateTime::UNIX_EPOCH);
        let to = to.0.unwrap_or_else(|| {
            DateTime::from_timestamp(253_402_300_799, 0).expect("9999-12-31 is a time")
        });
        if from >= to {
            return Err(ApiError::bad_request("`from` must be before `to`").with_field("from"));
        }
        let window = (from, to);
        let cursor = cursor.0.as_deref().map(Cursor::decode).transpose()?;
        let params = PageParams::new(if cursor.is_some() { None } else { page.0 }, page_size.0);
        let size = params.page_size as usize;
        // Hits of the window still to pass over before the first one listed.
        let mut skip = match &cursor {
            Some(c) => c.skip,
            None => params.offset() as usize,
        };
        let mut start = cursor.as_ref().map(|c| (c.key, true));
        // Every read of the index sees one snapshot, so that the items and the total
        // agree while the relay adds pages.
        let mut db = tracking.pg().begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *db)
            .await?;
        if cursor.is_some() {
            // `skip` counts hits of the cursor's page only; if that page is gone
            // (deleted with its site meanwhile) the walk starts at the next one whole.
            let first = Tracking::index_chunk(&mut db, site.id, window, start).await?;
            if first.first().map(PageRow::key) != cursor.as_ref().map(|c| c.key) {
                skip = 0;
            }
        }
        let mut items: Vec<Access> = Vec::with_capacity(size);
        let mut next_cursor = None;
        'walk: loop {
            let chunk = Tracking::index_chunk(&mut db, site.id, window, start).await?;
            for (k, page) in chunk.iter().enumerate() {
                let n = tracking.hits_in_window(site.id, page, window).await?;
                if skip >= n {
                    skip -= n;
                    continue;
                }
                let before = items.len();
                let hits = tracking.page_hits(site.id, page, window).await?;
                items.extend(hits.into_iter().skip(skip).take(size - before));
                let used = skip + items.len() - before;
                skip = 0;
                if items.len() == size {
                    next_cursor = if used < n {
                        Some(Cursor {
                            key: page.key(),
                            skip: used,
                        })
                    } else {
                        // The next page, if any: in this chunk or the next query's.
                        let next = match chunk.get(k + 1) {
                            Some(next) => Some(next.key()),
                            None => Tracking::index_chunk(
                                &mut db,
                                site.id,
                                window,
                                Some((page.key(), false)),
                            )
                            .await?
                            .first()
                            .map(PageRow::key),
                        };
                        next.map(|key| Cursor { key, skip: 0 })
                    };
                    break 'walk;
                }
            }
            match chunk.last() {
                Some(last) if chunk.len() as i64 == INDEX_CHUNK => {
                    start = Some((last.key(), false))
                }
                _ => break,
            }
        }
        let total = tracking.window_total(&mut db, site.id, window).await?;
        db.commit().await?;
        Ok(Found::Ok(Json(AccessPage {
            items,
            page: params.page,
            page_size: params.page_size,
            total,
            next_cursor: next_cursor.map(|c| c.encode()),
        })))
    }

    /// A site's accesses per local day.
    ///
    /// Every day of `from..=to` (local dates in `tz`, default the client's zone), oldest
    /// first, with 0 for days without accesses. Exact: local days are whole 15-minute
    /// buckets in every zone. At most 1000 days; the default is the 30 up to today.
    #[oai(
        path = "/sites/:id/accesses/daily",
        method = "get",
        operation_id = "siteDailyAccesses"
    )]
    #[tracing::instrument(skip_all, fields(site = %id.0))]
    async fn daily(
        &self,
        tracking: Data<&Tracking>,
        auth: BearerAuth,
        id: Path<Uuid>,
        /// First local day (inclusive).
        from: Query<Option<NaiveDate>>,
        /// Last local day (inclusive).
        to: Query<Option<NaiveDate>>,
        /// IANA time zone, e.g. `America/Sao_Paulo`.
        tz: Query<Option<String>>,
    ) -> ApiResult<Found<DailyAccesses>> {
        let site = sites::visible(&tracking, &auth, id.0).await?;
        let tz = match days::timezone(tz.0.as_deref())? {
            Some(tz) => tz,
            None => client_tz(&tracking, site.client_id).await?,
        };
        let (from, to) = days::range(from.0, to.0, tz)?;
        let counts: Vec<(NaiveDate, i64)> = sqlx::query_as(
            "SELECT (bucket AT TIME ZONE $4)::date AS day, sum(hits)::int8
             FROM tracking_site_counts
             WHERE site_id = $1 AND bucket >= $2 AND bucket < $3
             GROUP BY day ORDER BY day",
        )
        .bind(site.id)
        .bind(local_day_start(tz, from))
        .bind(local_day_start(tz, to + chrono::Days::new(1)))
        .bind(tz.name())
        .fetch_all(tracking.pg())
        .await?;
        let mut counts = counts.into_iter().peekable();
        let mut items = Vec::new();
        let mut day = from;
        while day <= to {
            let hits = match counts.peek() {
                Some((d, n)) if *d == day => {
                    let n = *n;
                    counts.next();
                    n
                }
                _ => 0,
            };
            items.push(DayCount {
                date: day,
                count: hits,
            });
            day = day + chrono::Days::new(1);
        }
        Ok(Found::Ok(Json(DailyAccesses {
            site_id: site.id,
            tz: tz.name().to_owned(),
            items,
        })))
    }

    /// A site's most accessed URLs and contexts in a period.
    ///
    /// The window is taken in whole 15-minute buckets (`from` rounded down, `to` up; the
    /// answer says which); default the 7 days up to now, at most 1000 days.
    #[oai(
        path = "/sites/:id/accesses/top",
        method = "get",
        operation_id = "siteTopAccesses"
    )]
    #[tracing::instrument(skip_all, fields(site = %id.0))]
    async fn top(
        &self,
        tracking: Data<&Tracking>,
        auth: BearerAuth,
        id: Path<Uuid>,
        /// Start, RFC 3339.
        from: Query<Option<DateTime<Utc>>>,
        /// End, RFC 3339.
        to: Query<Option<DateTime<Utc>>>,
        /// How many URLs and contexts (1 to 100, default 10).
        #[oai(validator(minimum(value = "1"), maximum(value = "100")))]
        limit: Query<Option<u32>>,
    ) -> ApiResult<Found<TopAccesses>> {
        let site = sites::visible(&tracking, &auth, id.0).await?;
        let (from, to) = rollup_window(from.0, to.0)?;
        let limit = i64::from(limit.0.unwrap_or(10));
        let hits: i64 = sqlx::query_scalar(
            "SELECT coalesce(sum(hits), 0)::int8 FROM tracking_site_counts
             WHERE site_id = $1 AND bucket >= $2 AND bucket < $3",
        )
        .bind(site.id)
        .bind(from)
        .bind(to)
        .fetch_one(tracking.pg())
        .await?;
        let mut ranked = Vec::with_capacity(2);
        for (table, column) in [
            ("tracking_url_counts", "url"),
            ("tracking_context_counts", "context"),
        ] {
            ranked.push(
                sqlx::query_as::<_, Ranked>(sqlx::AssertSqlSafe(format!(
                    "SELECT {column} AS key, sum(hits)::int8 AS hits FROM {table}
                     WHERE site_id = $1 AND bucket >= $2 AND bucket < $3
                     GROUP BY {column} ORDER BY hits DESC, key LIMIT $4"
                )))
                .bind(site.id)
                .bind(from)
                .bind(to)
                .bind(limit)
                .fetch_all(tracking.pg())
                .await?,
            );
        }
        let contexts = ranked.pop().unwrap_or_default();
        let urls = ranked.pop().unwrap_or_default();
        Ok(Found::Ok(Json(TopAccesses {
            site_id: site.id,
            from,
            to,
            hits,
            urls,
            contexts,
        })))
    }

    /// Every context a tracked user accessed in a period.
    ///
    /// `id` is the site's own id of the user (`user.id` of the hits). Only the caller's
    /// client's sites count (admins: every site); a user with no access on them is a
    /// 404. The window is taken in whole 15-minute buckets (the answer says which);
    /// default the 7 days up to now.
    #[oai(
        path = "/tracked-users/:id/contexts",
        method = "get",
        operation_id = "trackedUserContexts"
    )]
    #[tracing::instrument(skip_all)]
    async fn user_contexts(
        &self,
        tracking: Data<&Tracking>,
        auth: BearerAuth,
        id: Path<String>,
        /// Start, RFC 3339.
        from: Query<Option<DateTime<Utc>>>,
        /// End, RFC 3339.
        to: Query<Option<DateTime<Utc>>>,
    ) -> ApiResult<Found<UserContexts>> {
        let (from, to) = rollup_window(from.0, to.0)?;
        let scope = auth.0.tenant_scope();
        let items = sqlx::query_as::<_, UserContext>(
            "SELECT u.site_id, u.context, sum(u.hits)::int8 AS count,
                    min(u.first_seen) AS first_seen, max(u.last_seen) AS last_seen
             FROM tracking_user_contexts u JOIN sites s ON s.id = u.site_id
             WHERE u.user_id = $1 AND u.bucket >= $2 AND u.bucket < $3
               AND ($4::uuid IS NULL OR s.client_id = $4)
             GROUP BY u.site_id, u.context
             ORDER BY last_seen DESC, u.site_id, u.context",
        )
        .bind(&id.0)
        .bind(from)
        .bind(to)
        .bind(scope)
        .fetch_all(tracking.pg())
        .await?;
        if items.is_empty() {
            let known: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM tracking_user_contexts u JOIN sites s ON s.id = u.site_id
                 WHERE u.user_id = $1 AND ($2::uuid IS NULL OR s.client_id = $2))",
            )
            .bind(&id.0)
            .bind(scope)
            .fetch_one(tracking.pg())
            .await?;
            if !known {
                return Err(ApiError::not_found("tracked user"));
            }
        }
        Ok(Found::Ok(Json(UserContexts {
            user_id: id.0,
            from,
            to,
            items,
        })))
    }
}
