//! Accepted hits on their way out of the outbox: raw into MongoDB (`tracking_hits`), and
//! counted into the rollups the questions are answered from.
//!
//! One step claims the oldest outbox rows (`FOR UPDATE SKIP LOCKED`: several API
//! processes share the work), writes their hits to MongoDB as one document per site per
//! row (a *page* of hits, found later by its `_id` through `tracking_pages`, never by a
//! scan), adds them to the rollups, records the pages and deletes the rows, all in one
//! PostgreSQL transaction: the rollups count each hit exactly once. A page's `_id` is
//! derived from its row, so a step that inserted and then lost its commit inserts the
//! same documents again the next time, which MongoDB refuses and the step takes as done.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use anyhow::Context;
use chrono::{DateTime, Utc};
use mongodb::{
    bson::{self, doc, Bson, Document},
    Collection,
};
use sqlx::PgPool;
use tokio::sync::{mpsc, Notify};
use uuid::Uuid;

use termopar_core::{
    outbox::{self, Pace},
    tasks::Stop,
};

use crate::hit::StoredHit;

/// Collection of raw hits: pages of one site's hits.
pub const HITS: &str = "tracking_hits";
/// Outbox rows one step moves.
const RELAY_ROWS: i64 = 64;
/// Rollup bucket: 15 minutes (every zone's offset is a multiple of it).
pub(crate) const BUCKET_MS: i64 = 15 * 60 * 1000;
/// Widest span of receive times in one page. Pages are found by their last hit's time;
/// a bound on their width lets a window's query start at its end in the index.
pub(crate) const PAGE_SPAN: chrono::TimeDelta = chrono::TimeDelta::seconds(60);
/// Pause after a step that emptied the outbox: under load a step then carries the hits
/// of many groups (fewer, larger MongoDB inserts and rollup upserts), at the price of
/// the rollups trailing the 202 by about this much.
const PACE: Pace = Pace {
    pause: Duration::from_millis(100),
    idle_check: Duration::from_secs(1),
};

/// Moves the outbox until stopped, then drains what the writers committed.
pub(crate) async fn run(
    pg: PgPool,
    collection: Collection<Document>,
    wake: Arc<Notify>,
    stop: Stop,
    writers: mpsc::Receiver<()>,
) {
    let step = move || {
        let (pg, collection) = (pg.clone(), collection.clone());
        async move { step(&pg, &collection).await }
    };
    outbox::relay("tracking hits", step, PACE, wake, stop, writers).await
}

/// The 15-minute bucket `at_ms` falls in.
pub(crate) fn bucket(at_ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(at_ms - at_ms.rem_euclid(BUCKET_MS)).unwrap_or_default()
}

/// A page: one document of a site's hits of one outbox row.
struct Page {
    site_id: Uuid,
    row: i64,
    part: i32,
    first_at: DateTime<Utc>,
    last_at: DateTime<Utc>,
    hits: i32,
}

/// The `_id` of a page.
pub(crate) fn page_id(site: Uuid, row: i64, part: i32) -> String {
    format!("{site}:{row:x}:{part}")
}

/// A user's context in a bucket: (user, bucket, site, context).
type UserKey<'a> = (&'a str, DateTime<Utc>, Uuid, &'a str);
/// Hits, first and last seen.
type Seen = (i64, DateTime<Utc>, DateTime<Utc>);

/// What one step adds to the rollups, keyed in index order (so that concurrent steps of
/// several processes lock rows in the same order).
#[derive(Default)]
struct Rollups<'a> {
    sites: BTreeMap<(Uuid, DateTime<Utc>), i64>,
    urls: BTreeMap<(Uuid, DateTime<Utc>, &'a str), i64>,
    contexts: BTreeMap<(Uuid, DateTime<Utc>, &'a str), i64>,
    users: BTreeMap<UserKey<'a>, Seen>,
}

impl<'a> Rollups<'a> {
    fn add(&mut self, hit: &'a StoredHit) {
        let (site, b, at) = (hit.site_id, bucket(hit.at_ms), hit.at());
        *self.sites.entry((site, b)).or_default() += 1;
        *self.urls.entry((site, b, &hit.url)).or_default() += 1;
        for c in &hit.context {
            *self.contexts.entry((site, b, c)).or_default() += 1;
            let e = self
                .users
                .entry((&hit.user_id, b, site, c))
                .or_insert((0, at, at));
            e.0 += 1;
            e.1 = e.1.min(at);
            e.2 = e.2.max(at);
        }
    }

    async fn write(&self, tx: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
        let (s, b, n): (Vec<_>, Vec<_>, Vec<_>) =
            self.sites.iter().map(|((s, b), n)| (*s, *b, *n)).collect();
        sqlx::query(
            "INSERT INTO tracking_site_counts AS t (site_id, bucket, hits)
             SELECT * FROM unnest($1::uuid[], $2::timestamptz[], $3::int8[])
             ON CONFLICT (site_id, bucket) DO UPDATE SET hits = t.hits + EXCLUDED.hits",
        )
        .bind(s)
        .bind(b)
        .bind(n)
        .execute(&mut *tx)
        .await?;
        for (table, column, counts) in [
            ("tracking_url_counts", "url", &self.urls),
            ("tracking_context_counts", "context", &self.contexts),
        ] {
            if counts.is_empty() {
                continue;
            }
            let mut s = Vec::with_capacity(counts.len());
            let mut b = Vec::with_capacity(counts.len());
            let mut k = Vec::with_capacity(counts.len());
            let mut n = Vec::with_capacity(counts.len());
            for ((site, bucket, key), count) in counts {
                s.push(*site);
                b.push(*bucket);
                k.push(*key);
                n.push(*count);
            }
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO {table} AS t (site_id, bucket, {column}, hits)
                 SELECT * FROM unnest($1::uuid[], $2::timestamptz[], $3::text[], $4::int8[])
                 ON CONFLICT (site_id, bucket, {column}) DO UPDATE SET hits = t.hits + EXCLUDED.hits"
            )))
            .bind(s)
            .bind(b)
            .bind(k)
            .bind(n)
            .execute(&mut *tx)
            .await?;
        }
        if !self.users.is_empty() {
            let len = self.users.len();
            let (mut u, mut b, mut s, mut c) = (
                Vec::with_capacity(len),
                Vec::with_capacity(len),
                Vec::with_capacity(len),
                Vec::with_capacity(len),
            );
            let (mut n, mut first, mut last) = (
                Vec::with_capacity(len),
                Vec::with_capacity(len),
                Vec::with_capacity(len),
            );
            for ((user, bucket, site, context), (count, f, l)) in &self.users {
                u.push(*user);
                b.push(*bucket);
                s.push(*site);
                c.push(*context);
                n.push(*count);
                first.push(*f);
                last.push(*l);
            }
            sqlx::query(
                "INSERT INTO tracking_user_contexts AS t
                     (user_id, bucket, site_id, context, hits, first_seen, last_seen)
                 SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::uuid[], $4::text[],
                                      $5::int8[], $6::timestamptz[], $7::timestamptz[])
                 ON CONFLICT (user_id, bucket, site_id, context) DO UPDATE SET
                     hits = t.hits + EXCLUDED.hits,
                     first_seen = least(t.first_seen, EXCLUDED.first_seen),
                     last_seen = greatest(t.last_seen, EXCLUDED.last_seen)",
            )
            .bind(u)
            .bind(b)
            .bind(s)
            .bind(c)
            .bind(n)
            .bind(first)
            .bind(last)
            .execute(&mut *tx)
            .await?;
        }
        Ok(())
    }
}

/// A hit as its page keeps it.
fn hit_document(hit: &StoredHit) -> Document {
    let mut user = doc! { "id": &hit.user_id };
    if let Some(device) = &hit.device {
        user.insert("device", device);
    }
    let mut d = doc! {
        "at": bson::DateTime::from_millis(hit.at_ms),
        "url": &hit.url,
        "context": hit.context.iter().map(|c| Bson::String(c.clone())).collect::<Vec<_>>(),
        "user": user,
    };
    if let Some(ua) = &hit.user_agent {
        d.insert("ua", ua);
    }
    d
}

/// Splits one row's hits into pages: per site, in receive order, a new page whenever
/// the page would span more than [`PAGE_SPAN`].
fn pages<'a>(
    row: i64,
    hits: &'a [StoredHit],
    live: &BTreeSet<Uuid>,
) -> Vec<(Page, Vec<&'a StoredHit>)> {
    let mut by_site: BTreeMap<Uuid, Vec<&StoredHit>> = BTreeMap::new();
    for hit in hits.iter().filter(|h| live.contains(&h.site_id)) {
        by_site.entry(hit.site_id).or_default().push(hit);
    }
    let mut out = Vec::new();
    for (site_id, mut hits) in by_site {
        hits.sort_by_key(|h| h.at_ms);
        let mut chunk: Vec<&StoredHit> = Vec::new();
        let flush = |chunk: &mut Vec<&'a StoredHit>, out: &mut Vec<(Page, Vec<&'a StoredHit>)>| {
            if chunk.is_empty() {
                return;
            }
            let page = Page {
                site_id,
                row,
                part: out.len() as i32,
                first_at: chunk[0].at(),
                last_at: chunk[chunk.len() - 1].at(),
                hits: chunk.len() as i32,
            };
            out.push((page, std::mem::take(chunk)));
        };
        for hit in hits {
            if chunk.first().is_some_and(|f| hit.at() - f.at() > PAGE_SPAN) {
                flush(&mut chunk, &mut out);
            }
            chunk.push(hit);
        }
        flush(&mut chunk, &mut out);
    }
    out
}

/// Moves up to [`RELAY_ROWS`] outbox rows; returns whether more may be waiting.
#[tracing::instrument(skip_all)]
async fn step(pg: &PgPool, collection: &Collection<Document>) -> anyhow::Result<bool> {
    let mut tx = pg.begin().await?;
    let claimed: Vec<(i64, Vec<u8>)> = sqlx::query_as(
        "SELECT id, hits FROM tracking_outbox ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
    )
    .bind(RELAY_ROWS)
    // Planned each time: the outbox swings between empty and large.
    .persistent(false)
    .fetch_all(&mut *tx)
    .await?;
    if claimed.is_empty() {
        return Ok(false);
    }
    let more = claimed.len() as i64 == RELAY_ROWS;
    let mut rows = Vec::with_capacity(claimed.len());
    for (id, bytes) in &claimed {
        let hits: Vec<StoredHit> = serde_json::from_slice(bytes)
            .with_context(|| format!("tracking_outbox row {id} does not hold hits"))?;
        rows.push((*id, hits));
    }
    // Hits of sites deleted since they were accepted go with their site.
    let sites: Vec<Uuid> = rows
        .iter()
        .flat_map(|(_, hits)| hits.iter().map(|h| h.site_id))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let live: BTreeSet<Uuid> = sqlx::query_scalar("SELECT id FROM sites WHERE id = ANY($1)")
        .bind(&sites)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .collect();
    let mut rollups = Rollups::default();
    let mut docs = Vec::new();
    let mut index = Vec::new();
    let mut moved = 0u64;
    for (row, hits) in &rows {
        for (page, hits) in pages(*row, hits, &live) {
            moved += hits.len() as u64;
            hits.iter().for_each(|h| rollups.add(h));
            docs.push(doc! {
                "_id": page_id(page.site_id, page.row, page.part),
                "site_id": page.site_id.to_string(),
                "hits": hits.iter().map(|h| Bson::Document(hit_document(h))).collect::<Vec<_>>(),
            });
            index.push(page);
        }
    }
    if !docs.is_empty() {
        if let Err(e) = collection.insert_many(docs).ordered(false).await {
            // Pages written before (their commit was lost) are refused as duplicates.
            if !termopar_core::mongo::only_duplicate_keys(&e) {
                return Err(e.into());
            }
        }
    }
    rollups.write(&mut tx).await?;
    if !index.is_empty() {
        sqlx::query(
            "INSERT INTO tracking_pages (site_id, last_at, row_id, part, first_at, hits)
             SELECT * FROM unnest($1::uuid[], $2::timestamptz[], $3::int8[], $4::int4[],
                                  $5::timestamptz[], $6::int4[])
             ON CONFLICT DO NOTHING",
        )
        .bind(index.iter().map(|p| p.site_id).collect::<Vec<_>>())
        .bind(index.iter().map(|p| p.last_at).collect::<Vec<_>>())
        .bind(index.iter().map(|p| p.row).collect::<Vec<_>>())
        .bind(index.iter().map(|p| p.part).collect::<Vec<_>>())
        .bind(index.iter().map(|p| p.first_at).collect::<Vec<_>>())
        .bind(index.iter().map(|p| p.hits).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?;
    }
    let ids: Vec<i64> = rows.iter().map(|(id, _)| *id).collect();
    sqlx::query("DELETE FROM tracking_outbox WHERE id = ANY($1)")
        .bind(&ids)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    let total: usize = rows.iter().map(|(_, h)| h.len()).sum();
    metrics::counter!("tracking_hits_stored_total").increment(moved);
    metrics::counter!("tracking_hits_of_deleted_sites_total").increment(total as u64 - moved);
    Ok(more)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hit(site: Uuid, at_ms: i64) -> StoredHit {
        StoredHit {
            site_id: site,
            at_ms,
            url: "https://a.example/".into(),
            context: vec!["x".into()],
            user_id: "u".into(),
            device: None,
            user_agent: None,
        }
    }

    #[test]
    fn buckets_are_quarter_hours_also_before_1970() {
        let t = |s: &str| s.parse::<DateTime<Utc>>().unwrap();
        assert_eq!(
            bucket(t("2026-03-01T10:14:59.999Z").timestamp_millis()),
            t("2026-03-01T10:00:00Z")
        );
        assert_eq!(
            bucket(t("2026-03-01T10:15:00Z").timestamp_millis()),
            t("2026-03-01T10:15:00Z")
        );
        assert_eq!(
            bucket(t("1969-12-31T23:59:59Z").timestamp_millis()),
            t("1969-12-31T23:45:00Z")
        );
    }

    #[test]
    fn a_row_becomes_one_page_per_site_and_no_page_is_wider_than_its_span() {
        let (a, b, gone) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let live: BTreeSet<Uuid> = [a, b].into();
        let span = PAGE_SPAN.num_milliseconds();
        let hits = vec![
            hit(a, 1000),
            hit(b, 1001),
            hit(gone, 1002),
            hit(a, 999),
            hit(a, 1000 + span + 1),
        ];
        let pages = pages(7, &hits, &live);
        let summary: Vec<(Uuid, i32, i64, i64)> = pages
            .iter()
            .map(|(p, _)| {
                (
                    p.site_id,
                    p.hits,
                    p.first_at.timestamp_millis(),
                    p.last_at.timestamp_millis(),
                )
            })
            .collect();
        let mut expected = vec![
            (a, 2, 999, 1000),
            (a, 1, 1000 + span + 1, 1000 + span + 1),
            (b, 1, 1001, 1001),
        ];
        expected.sort_by_key(|e| (e.0, e.2));
        let mut summary_sorted = summary.clone();
        summary_sorted.sort_by_key(|e| (e.0, e.2));
        assert_eq!(summary_sorted, expected);
        let ids: BTreeSet<String> = pages
            .iter()
            .map(|(p, _)| page_id(p.site_id, p.row, p.part))
            .collect();
        assert_eq!(ids.len(), 3, "page ids are unique");
    }
}
