//! Merging a bucket's segments, so history reads few documents and no reading is
//! rewritten more than a few times.
//!
//! - **Tiers** (open and closed buckets): a segment of fewer than [`SEGMENT_READINGS`]
//!   readings has a level by its size (1-3, 4-15, 16-63, 64-255 readings). When a
//!   bucket has more segments than three per level it can have (`raw_docs_bound` in
//!   SQL), every level holding four or more is merged into one segment of the next,
//!   cascading. A sensor sending one reading a message gets its readings rewritten about
//!   once per level (four times over 900 readings), each time as ~36 bytes, and its
//!   open bucket never has more than ~12 small segments, the newest of them smallest.
//! - **Final** (closed buckets, [`super::Tuning::close_after`] past their end): the
//!   segments become as few as their readings need, in time order, except full ones
//!   that overlap no other, which stay.
//!
//! A pass merges many buckets at once, up to about [`PASS_READINGS`] readings (a bucket
//! is always taken whole). It reads, merges and writes in rounds of
//! [`super::Tuning::merge_round`] readings, so its memory is bounded whatever a bucket
//! holds (a final merge's groups go in time order, and what one group leaves short of a
//! full segment goes on with the next); each round's new segments are recorded as
//! expiring first, and kept pending while the pass runs. Then it swaps them for the old
//! ones in PostgreSQL under the buckets' row locks,
//! for each bucket whose old segments are still all there (a correction or another
//! compactor may have replaced one: that bucket's new segments expire at once). The
//! old ones expire after a grace period.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use chrono::{DateTime, Utc};
use mongodb::bson::{oid::ObjectId, RawDocumentBuf};

use super::{
    codec::BUCKET_MINUTES, write::chunks, DocRef, ReadingStore, Segment, StoreError, SEGMENT_BYTES,
    SEGMENT_READINGS,
};
use crate::reading::Reading;

/// What a compaction pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CompactReport {
    /// Buckets looked at.
    pub buckets: usize,
    /// Segments merged away.
    pub merged: usize,
    /// Segments written.
    pub written: usize,
    /// Bytes of segments written.
    pub bytes: u64,
    /// Rounds of reading, merging and writing (see `Tuning::merge_round`).
    pub rounds: usize,
}

/// Buckets of each kind (tiers, final) one pass looks at.
const PASS: i64 = 512;

/// Readings one pass merges, about: it takes due buckets until their merges hold this
/// many (always one bucket at least, however large; it is read, merged and written in
/// rounds of [`super::Tuning::merge_round`] readings).
const PASS_READINGS: i64 = 256 * 1024;

/// A segment as the index lists it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(super) struct DocRow {
    pub bucket_id: i64,
    pub doc: Vec<u8>,
    pub fragment: bool,
    pub count: i32,
    pub first_ts: DateTime<Utc>,
    pub last_ts: DateTime<Utc>,
    pub bytes: i32,
}

/// A segment's size level, or `None` for a full one (which tiers leave alone).
fn level(count: i64, bytes: i64) -> Option<u8> {
    match count {
        _ if bytes >= (SEGMENT_BYTES / 2) as i64 => None,
        0..=3 => Some(0),
        4..=15 => Some(1),
        16..=63 => Some(2),
        64..=255 => Some(3),
        _ => None,
    }
}

/// Which segments to merge by tiers: groups of indexes into `docs`, each group one
/// merge. Simulated on counts, cascading (four merged segments may make a fourth of the
/// next level).
fn tier_plan(docs: &[DocRow]) -> Vec<Vec<usize>> {
    // (readings, bytes, the original segments it is made of)
    let mut items: Vec<(i64, i64, Vec<usize>)> = docs
        .iter()
        .enumerate()
        .filter(|(_, d)| level(i64::from(d.count), i64::from(d.bytes)).is_some())
        .map(|(i, d)| (i64::from(d.count), i64::from(d.bytes), vec![i]))
        .collect();
    let mut done: Vec<Vec<usize>> = Vec::new();
    loop {
        let mut per_level = [0usize; 4];
        for (count, bytes, _) in &items {
            if let Some(l) = level(*count, *bytes) {
                per_level[l as usize] += 1;
            }
        }
        let Some(l) = (0..4).find(|&l| per_level[l] >= 4) else {
            break;
        };
        let (merge, keep): (Vec<_>, Vec<_>) = items
            .into_iter()
            .partition(|(c, b, _)| level(*c, *b) == Some(l as u8));
        items = keep;
        let merged = merge
            .into_iter()
            .fold((0, 0, Vec::new()), |mut acc, (c, b, o)| {
                acc.0 += c;
                acc.1 += b;
                acc.2.extend(o);
                acc
            });
        if level(merged.0, merged.1).is_some() {
            items.push(merged);
        } else {
            done.push(merged.2);
        }
    }
    done.extend(items.into_iter().map(|(_, _, o)| o));
    done.retain(|o| o.len() >= 2);
    done
}

/// A closed bucket's final merge in groups of about `round` readings (whole segments,
/// in time order), merged one after another (see [`final_plan`]).
fn final_groups(docs: &[DocRow], round: usize) -> Vec<Vec<usize>> {
    let mut chosen = final_plan(docs);
    chosen.sort_by_key(|&i| (docs[i].first_ts, docs[i].last_ts));
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut held = 0;
    for i in chosen {
        let count = docs[i].count.max(0) as usize;
        match groups.last_mut() {
            Some(last) if held + count <= round => last.push(i),
            _ => {
                held = 0;
                groups.push(vec![i]);
            }
        }
        held += count;
    }
    groups
}

/// Which segments a closed bucket's final merge rewrites: all but the full ones in the
/// main collection that overlap no other; nothing when that leaves no fragment and fewer
/// than two segments.
fn final_plan(docs: &[DocRow]) -> Vec<usize> {
    let overlaps = |i: usize| {
        docs.iter()
            .enumerate()
            .any(|(j, o)| j != i && o.first_ts <= docs[i].last_ts && docs[i].first_ts <= o.last_ts)
    };
    let rest: Vec<usize> = (0..docs.len())
        .filter(|&i| {
            let d = &docs[i];
            let full =
                d.count as usize >= SEGMENT_READINGS / 2 || d.bytes as usize >= SEGMENT_BYTES / 2;
            d.fragment || !full || overlaps(i)
        })
        .collect();
    if rest.len() >= 2 || rest.iter().any(|&i| docs[i].fragment) {
        rest
    } else {
        Vec::new()
    }
}

/// What a pass merges in one bucket: groups of segments, each merged into new ones (a
/// final merge's groups in time order, what one leaves short of a full segment carried
/// into the next), with their readings.
struct Plan {
    bucket_id: i64,
    is_final: bool,
    groups: Vec<(Vec<DocRef>, i64)>,
}

/// A segment a merge wrote, as the index records it.
struct Written {
    id: ObjectId,
    count: i32,
    first: DateTime<Utc>,
    last: DateTime<Utc>,
    bytes: i32,
    /// Kept for the cache of recent segments (a tier merge's: its bucket is open, and
    /// history reads it soon).
    segment: Option<Arc<Segment>>,
}

/// One bucket's merges in a pass: the segments it loses and gains.
struct Merge {
    bucket_id: i64,
    /// A final merge writes lasting segments; a tier merge, fragments.
    is_final: bool,
    old: Vec<DocRef>,
    new: Vec<Written>,
    /// A segment it read was gone (replaced meanwhile): it is not swapped in.
    gone: bool,
    /// Readings of the final merge's last group not yet in a segment.
    carry: Vec<Reading>,
}

impl ReadingStore {
    /// One compaction pass at time `now` (the clock is a parameter so benchmarks can
    /// simulate hours): merges the buckets that are due, up to [`PASS`] of each kind, as
    /// one batch: one listing, one insert of the new segments, one transaction swapping
    /// them in. Merging per bucket would cost a few round trips for every seven readings
    /// of a sensor sending one every ten seconds.
    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn compact(&self, now: DateTime<Utc>) -> Result<CompactReport, StoreError> {
        let closed_before = now
            - chrono::Duration::minutes(BUCKET_MINUTES)
            - chrono::Duration::from_std(self.tuning.close_after).expect("small");
        let due: Vec<(i64, bool)> = sqlx::query_as(
            "(SELECT id, false FROM reading_buckets
              WHERE docs > raw_docs_bound(count) AND docs > checked_docs
              ORDER BY bucket LIMIT $2)
             UNION ALL
             (SELECT id, true FROM reading_buckets
              WHERE NOT settled AND bucket < $1
              ORDER BY bucket LIMIT $2)",
        )
        .bind(closed_before)
        .bind(PASS)
        .fetch_all(&self.pg)
        .await?;
        // A closed bucket due both ways gets the final merge only.
        let mut kinds: HashMap<i64, bool> = HashMap::new();
        for (id, is_final) in due {
            *kinds.entry(id).or_default() |= is_final;
        }
        let mut report = CompactReport {
            buckets: kinds.len(),
            ..Default::default()
        };
        if kinds.is_empty() {
            return Ok(report);
        }
        let ids: Vec<i64> = kinds.keys().copied().collect();
        let rows: Vec<DocRow> = sqlx::query_as(
            "SELECT bucket_id, doc, fragment, count, first_ts, last_ts, bytes FROM raw_docs
             WHERE bucket_id = ANY($1)",
        )
        .bind(&ids)
        .fetch_all(&self.pg)
        .await?;
        let mut per_bucket: HashMap<i64, Vec<DocRow>> = HashMap::new();
        for row in rows {
            per_bucket.entry(row.bucket_id).or_default().push(row);
        }

        // Plan every bucket; those with nothing to merge now are noted as looked at.
        let mut plans: Vec<Plan> = Vec::new();
        let (mut idle, mut idle_final) = (Vec::new(), Vec::new());
        for (&bucket_id, &is_final) in &kinds {
            let docs = per_bucket.remove(&bucket_id).unwrap_or_default();
            let groups: Vec<Vec<usize>> = if is_final {
                final_groups(&docs, self.tuning.merge_round)
            } else {
                tier_plan(&docs)
            };
            let groups: Vec<(Vec<DocRef>, i64)> = groups
                .into_iter()
                .filter(|g| !g.is_empty())
                .map(|g| {
                    let readings = g.iter().map(|&i| i64::from(docs[i].count)).sum();
                    g.into_iter()
                        .map(|i| DocRef::from_row(&docs[i].doc, docs[i].fragment))
                        .collect::<Result<_, _>>()
                        .map(|refs| (refs, readings))
                })
                .collect::<Result<_, _>>()?;
            if groups.is_empty() {
                idle.push(bucket_id);
                idle_final.push(is_final);
            } else {
                plans.push(Plan {
                    bucket_id,
                    is_final,
                    groups,
                });
            }
        }
        if !idle.is_empty() {
            sqlx::query(
                "UPDATE reading_buckets b SET checked_docs = b.docs, settled = b.settled OR i.f
                 FROM unnest($1::int8[], $2::bool[]) AS i(id, f) WHERE b.id = i.id",
            )
            .bind(&idle)
            .bind(&idle_final)
            .execute(&self.pg)
            .await?;
        }
        // As many buckets as about PASS_READINGS readings (the rest wait for the next
        // pass: they are still due).
        let mut taken = 0;
        plans.retain(|p| {
            let keep = taken == 0 || taken < PASS_READINGS;
            taken += p.groups.iter().map(|g| g.1).sum::<i64>();
            keep
        });
        if plans.is_empty() {
            return Ok(report);
        }

        // Read, merge and write in rounds of about `merge_round` readings, so a pass
        // holds no more than that in memory whatever the buckets hold; the swap in
        // PostgreSQL at the end takes each bucket whole.
        let mut merges: Vec<Merge> = plans
            .iter()
            .map(|p| Merge {
                bucket_id: p.bucket_id,
                is_final: p.is_final,
                old: p.groups.iter().flat_map(|g| g.0.iter().copied()).collect(),
                new: Vec::new(),
                gone: false,
                carry: Vec::new(),
            })
            .collect();
        let work: Vec<(usize, usize)> = plans
            .iter()
            .enumerate()
            .flat_map(|(p, plan)| (0..plan.groups.len()).map(move |g| (p, g)))
            .collect();
        let mut intents: Vec<i64> = Vec::new();
        let mut next = 0;
        while next < work.len() {
            let mut round = Vec::new();
            let mut held = 0;
            while let Some(&(p, g)) = work.get(next) {
                let readings = plans[p].groups[g].1;
                if !round.is_empty() && held + readings > self.tuning.merge_round as i64 {
                    break;
                }
                held += readings;
                round.push((p, g));
                next += 1;
            }
            let wanted: Vec<DocRef> = round
                .iter()
                .filter(|(p, _)| !merges[*p].gone)
                .flat_map(|&(p, g)| plans[p].groups[g].0.iter().copied())
                .collect();
            // A final merge's buckets are closed: nothing reads them soon, and the cache
            // of recent segments is left as it is.
            let keep = round.iter().any(|(p, _)| !plans[*p].is_final);
            let fetched: HashMap<ObjectId, Arc<Segment>> = self
                .fetch_segments(&wanted, keep)
                .await?
                .into_iter()
                .zip(&wanted)
                .filter_map(|(s, d)| s.map(|s| (d.id, s)))
                .collect();
            let mut made: Vec<(usize, Arc<Segment>)> = Vec::new();
            for &(p, g) in &round {
                let merge = &mut merges[p];
                if merge.gone {
                    continue;
                }
                let mut readings = std::mem::take(&mut merge.carry);
                for d in &plans[p].groups[g].0 {
                    match fetched.get(&d.id) {
                        Some(segment) => readings.extend(segment.readings.iter().cloned()),
                        // Replaced meanwhile: the next pass sees the bucket as it is.
                        None => merge.gone = true,
                    }
                }
                if merge.gone {
                    continue;
                }
                readings.sort_by_key(|r| (r.ts, r.id));
                let mut parts = chunks(readings, |r| {
                    36 + if r.extra.is_empty() {
                        0
                    } else {
                        serde_json::to_vec(&r.extra).map_or(0, |v| v.len())
                    }
                });
                // What a final merge's group leaves short of a full segment goes on with
                // the next group (the next in time), so the bucket ends with at most one
                // short segment.
                let more = g + 1 < plans[p].groups.len();
                if merge.is_final
                    && more
                    && parts.last().is_some_and(|l| l.len() < SEGMENT_READINGS)
                {
                    merge.carry = parts.pop().unwrap_or_default();
                }
                made.extend(
                    parts
                        .into_iter()
                        .map(|part| (p, Arc::new(Segment::new(ObjectId::new(), part)))),
                );
            }
            if made.is_empty() {
                continue;
            }
            // The rounds written before stay pending for as long as the pass runs.
            if !intents.is_empty() {
                let kept = sqlx::query(
                    "UPDATE raw_doc_expiry SET due_at = now() + make_interval(secs => $2)
                     WHERE id = ANY($1)",
                )
                .bind(&intents)
                .bind(self.tuning.intent_ttl.as_secs_f64())
                .execute(&self.pg)
                .await?
                .rows_affected();
                if kept != intents.len() as u64 {
                    // An earlier round's segments expired: this pass took too long.
                    return Ok(report);
                }
            }
            let (intent, lens) = self.write_merged(&made, &merges).await?;
            intents.push(intent);
            report.rounds += 1;
            for ((p, segment), bytes) in made.into_iter().zip(lens) {
                let (first, last) = segment.span();
                let merge = &mut merges[p];
                merge.new.push(Written {
                    id: segment.id,
                    count: segment.readings.len() as i32,
                    first,
                    last,
                    bytes,
                    segment: (!merge.is_final).then_some(segment),
                });
            }
        }
        self.swap(&merges, &intents, &mut report).await?;
        Ok(report)
    }

    /// Writes merged segments (recorded as expiring first, as one intent): returns the
    /// intent and each segment's size.
    async fn write_merged(
        &self,
        made: &[(usize, Arc<Segment>)],
        merges: &[Merge],
    ) -> Result<(i64, Vec<i32>), StoreError> {
        let encoded: Vec<RawDocumentBuf> = made.iter().map(|(_, s)| s.encode()).collect();
        let lens: Vec<i32> = encoded.iter().map(|d| d.as_bytes().len() as i32).collect();
        let refs: Vec<DocRef> = made
            .iter()
            .map(|(p, s)| DocRef {
                id: s.id,
                fragment: !merges[*p].is_final,
            })
            .collect();
        let ids = |fragment: bool| -> Vec<Vec<u8>> {
            refs.iter()
                .filter(|r| r.fragment == fragment)
                .map(|r| r.id.bytes().to_vec())
                .collect()
        };
        let intent: i64 = sqlx::query_scalar(
            "INSERT INTO raw_doc_expiry (docs, fragments, due_at, pending_write)
             VALUES ($1, $2, now() + make_interval(secs => $3), true) RETURNING id",
        )
        .bind(ids(false))
        .bind(ids(true))
        .bind(self.tuning.intent_ttl.as_secs_f64())
        .fetch_one(&self.pg)
        .await?;
        let refused = self.insert_documents(&refs, &encoded).await?;
        if let Some((_, why)) = refused.first() {
            // The intent makes whatever was written expire.
            return Err(StoreError::Corrupt(format!(
                "a merged segment was refused: {why}"
            )));
        }
        let bytes: u64 = lens.iter().map(|&l| l as u64).sum();
        metrics::counter!("raw_store_bytes_written_total", "by" => "merge").increment(bytes);
        Ok((intent, lens))
    }

    /// Swaps the merges' new segments (written under `intents`) for the old ones, for the
    /// buckets whose old segments are all still registered.
    async fn swap(
        &self,
        merges: &[Merge],
        intents: &[i64],
        report: &mut CompactReport,
    ) -> Result<(), StoreError> {
        let mut tx = self.pg.begin().await?;
        let kept = sqlx::query("DELETE FROM raw_doc_expiry WHERE id = ANY($1)")
            .bind(intents)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if kept != intents.len() as u64 {
            // This took longer than the intents lived: the new segments are gone.
            tx.rollback().await?;
            return Ok(());
        }
        // Lock the buckets in the order ingestion does (sensor, bucket), then see which
        // still have all the segments their merge read.
        let bucket_ids: Vec<i64> = merges.iter().map(|m| m.bucket_id).collect();
        sqlx::query(
            "SELECT 1 FROM reading_buckets WHERE id = ANY($1) ORDER BY sensor_id, bucket FOR UPDATE",
        )
        .bind(&bucket_ids)
        .execute(&mut *tx)
        .await?;
        let old: Vec<Vec<u8>> = merges
            .iter()
            .flat_map(|m| m.old.iter().map(|d| d.id.bytes().to_vec()))
            .collect();
        let present: HashSet<Vec<u8>> =
            sqlx::query_scalar::<_, Vec<u8>>("SELECT doc FROM raw_docs WHERE doc = ANY($1)")
                .bind(&old)
                .fetch_all(&mut *tx)
                .await?
                .into_iter()
                .collect();
        let (mut go_old, mut go_bucket) = (Vec::new(), Vec::new());
        let mut add = NewColumns::default();
        let mut stale_new: Vec<Vec<u8>> = Vec::new();
        let (mut upd_id, mut upd_delta, mut upd_final) = (Vec::new(), Vec::new(), Vec::new());
        let mut swapped: Vec<&Merge> = Vec::new();
        for m in merges {
            if m.gone
                || !m
                    .old
                    .iter()
                    .all(|d| present.contains(d.id.bytes().as_slice()))
            {
                if m.is_final {
                    stale_new.extend(m.new.iter().map(|w| w.id.bytes().to_vec()));
                }
                continue;
            }
            for d in &m.old {
                go_old.push(d.id.bytes().to_vec());
                go_bucket.push(m.bucket_id);
            }
            for w in &m.new {
                add.doc.push(w.id.bytes().to_vec());
                add.bucket.push(m.bucket_id);
                add.count.push(w.count);
                add.first.push(w.first);
                add.last.push(w.last);
                add.bytes.push(w.bytes);
                add.fragment.push(!m.is_final);
            }
            upd_id.push(m.bucket_id);
            upd_delta.push(m.new.len() as i32 - m.old.len() as i32);
            upd_final.push(m.is_final);
            report.merged += m.old.len();
            report.written += m.new.len();
            report.bytes += m.new.iter().map(|w| w.bytes as u64).sum::<u64>();
            swapped.push(m);
        }
        sqlx::query(
            "DELETE FROM raw_docs d USING unnest($1::bytea[], $2::int8[]) AS o(doc, bucket_id)
             WHERE d.doc = o.doc AND d.bucket_id = o.bucket_id",
        )
        .bind(&go_old)
        .bind(&go_bucket)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO raw_docs (doc, bucket_id, count, first_ts, last_ts, bytes, fragment)
             SELECT * FROM unnest($1::bytea[], $2::int8[], $3::int[], $4::timestamptz[],
                                  $5::timestamptz[], $6::int[], $7::bool[])",
        )
        .bind(&add.doc)
        .bind(&add.bucket)
        .bind(&add.count)
        .bind(&add.first)
        .bind(&add.last)
        .bind(&add.bytes)
        .bind(&add.fragment)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE reading_buckets b SET docs = b.docs + u.delta, checked_docs = 0,
                    settled = b.settled OR u.f
             FROM unnest($1::int8[], $2::int[], $3::bool[]) AS u(id, delta, f) WHERE b.id = u.id",
        )
        .bind(&upd_id)
        .bind(&upd_delta)
        .bind(&upd_final)
        .execute(&mut *tx)
        .await?;
        if !stale_new.is_empty() {
            // Final merges another writer overtook: their new segments expire at once
            // (fragments go with their hour's collection).
            sqlx::query("INSERT INTO raw_doc_expiry (docs, due_at) VALUES ($1, now())")
                .bind(&stale_new)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        for w in swapped.iter().flat_map(|m| &m.new) {
            if let Some(segment) = &w.segment {
                self.recent.insert(w.id, Arc::clone(segment));
            }
        }
        Ok(())
    }
}

#[derive(Default)]
struct NewColumns {
    doc: Vec<Vec<u8>>,
    bucket: Vec<i64>,
    count: Vec<i32>,
    first: Vec<DateTime<Utc>>,
    last: Vec<DateTime<Utc>>,
    bytes: Vec<i32>,
    fragment: Vec<bool>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn rows(counts: &[i32]) -> Vec<DocRow> {
        let t0 = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        counts
            .iter()
            .enumerate()
            .map(|(i, &count)| DocRow {
                bucket_id: 1,
                doc: vec![i as u8; 12],
                fragment: false,
                count,
                first_ts: t0 + chrono::Duration::seconds(10 * i as i64),
                last_ts: t0 + chrono::Duration::seconds(10 * i as i64 + 9),
                bytes: 36 * count + 200,
            })
            .collect()
    }

    #[test]
    fn four_small_segments_merge_and_the_merge_cascades() {
        assert!(tier_plan(&rows(&[1, 1, 1])).is_empty());
        assert_eq!(tier_plan(&rows(&[1, 1, 1, 1])), vec![vec![0, 1, 2, 3]]);
        // Four singles make a fourth segment of 4-15, and those four merge into one.
        let plan = tier_plan(&rows(&[5, 6, 7, 1, 1, 1, 1, 300]));
        assert_eq!(plan.len(), 1);
        let mut merged = plan[0].clone();
        merged.sort();
        assert_eq!(merged, vec![0, 1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn a_bucket_fed_one_reading_at_a_time_keeps_few_segments_and_rewrites_each_reading_a_few_times()
    {
        // Simulate a sensor sending 900 readings one by one, merged whenever due.
        let mut docs: Vec<i32> = Vec::new();
        let mut rewritten = 0i64;
        for _ in 0..900 {
            docs.push(1);
            let plan = tier_plan(&rows(&docs));
            for group in &plan {
                rewritten += group.iter().map(|&i| i64::from(docs[i])).sum::<i64>();
            }
            let merged: Vec<i32> = plan
                .iter()
                .map(|g| g.iter().map(|&i| docs[i]).sum())
                .collect();
            let gone: std::collections::HashSet<usize> = plan.into_iter().flatten().collect();
            docs = docs
                .iter()
                .enumerate()
                .filter(|(i, _)| !gone.contains(i))
                .map(|(_, &c)| c)
                .chain(merged)
                .collect();
            let small = docs.iter().filter(|&&c| c < 256).count();
            assert!(small <= 12, "{docs:?}");
        }
        assert_eq!(docs.iter().sum::<i32>(), 900);
        assert!(rewritten <= 900 * 5, "{rewritten}");
    }

    #[test]
    fn a_large_final_merge_is_cut_into_groups_of_whole_segments_in_time_order() {
        let mut docs = rows(&[100, 100, 100, 50, 300, 10]);
        for d in &mut docs {
            d.fragment = true;
        }
        // Listed out of time order: grouped in it.
        docs.swap(0, 3);
        assert_eq!(
            final_groups(&docs, 250),
            vec![vec![3, 1], vec![2, 0], vec![4], vec![5]]
        );
        assert_eq!(final_groups(&docs, 10_000), vec![vec![3, 1, 2, 0, 4, 5]]);
    }

    #[test]
    fn the_final_merge_keeps_full_segments_that_overlap_nothing() {
        let mut docs = rows(&[200, 1, 1]);
        assert_eq!(final_plan(&docs), vec![1, 2]);
        // A late segment spanning the full one makes it part of the merge.
        docs[2].first_ts = docs[0].first_ts;
        docs[2].last_ts = docs[1].last_ts;
        assert_eq!(final_plan(&docs), vec![0, 1, 2]);
        assert!(final_plan(&rows(&[200, 1])).is_empty());
        // A fragment always moves, even alone.
        let mut lone = rows(&[3]);
        lone[0].fragment = true;
        assert_eq!(final_plan(&lone), vec![0]);
    }
}
