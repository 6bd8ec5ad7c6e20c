//! Corrections and deletions of stored readings (admins).
//!
//! Segments are never changed in place: the segment holding the reading is replaced by
//! a new one (without the reading, for a deletion), swapped in PostgreSQL under the
//! bucket's row lock, and the bucket's rollup, its hour and the sensor's latest row are
//! recomputed from the segments in the same transaction.

use std::sync::Arc;

use mongodb::bson::oid::ObjectId;
use uuid::Uuid;

use super::{queries::Place, DocRef, ReadingStore, Segment, StoreError};
use crate::reading::{Celsius, Reading};

/// How many times a correction starts over when a merge replaced its segment first.
const ATTEMPTS: usize = 3;

/// What to do to a reading.
#[derive(Clone, Copy)]
enum Edit {
    /// Set its temperature, keeping the first original value.
    Correct(Celsius),
    /// Remove it.
    Delete,
}

impl ReadingStore {
    /// Sets a reading's temperature (the first original value is kept in
    /// `original_temperature`) and brings its bucket, hour, the latest row and the caches
    /// up to date. Returns the corrected reading, or `None` if there is none.
    #[tracing::instrument(skip_all, fields(reading_id = %id))]
    pub async fn correct(
        &self,
        id: Uuid,
        temperature: Celsius,
    ) -> Result<Option<Reading>, StoreError> {
        self.edit(id, Edit::Correct(temperature)).await
    }

    /// Deletes a reading and brings its bucket, hour, the latest row and the caches up
    /// to date. Returns the deleted reading, or `None` if there was none.
    #[tracing::instrument(skip_all, fields(reading_id = %id))]
    pub async fn delete(&self, id: Uuid) -> Result<Option<Reading>, StoreError> {
        self.edit(id, Edit::Delete).await
    }

    async fn edit(&self, id: Uuid, edit: Edit) -> Result<Option<Reading>, StoreError> {
        for _ in 0..ATTEMPTS {
            if let Some(done) = self.try_edit(id, edit).await? {
                return Ok(done);
            }
        }
        Err(StoreError::Corrupt(format!(
            "the segment of reading {id} kept changing during a correction"
        )))
    }

    /// One attempt; `None` when the segment was replaced meanwhile.
    async fn try_edit(&self, id: Uuid, edit: Edit) -> Result<Option<Option<Reading>>, StoreError> {
        let Some(Place {
            bucket_id,
            sensor,
            bucket,
            candidates,
        }) = self.place(id).await?
        else {
            return Ok(Some(None));
        };
        let mut holder: Option<(DocRef, Arc<Segment>)> = None;
        for (doc, segment) in candidates
            .iter()
            .zip(self.fetch_segments(&candidates, true).await?)
        {
            let Some(segment) = segment else {
                return Ok(None);
            };
            if segment.readings.iter().any(|r| r.id == id) {
                holder = Some((*doc, segment));
            }
        }
        let Some((old_doc, old)) = holder else {
            return Err(StoreError::Corrupt(format!(
                "reading {id} is indexed but in none of its bucket's segments"
            )));
        };
        let before = old
            .readings
            .iter()
            .find(|r| r.id == id)
            .cloned()
            .expect("found above");
        let mut readings: Vec<Reading> = old.readings.clone();
        let after = match edit {
            Edit::Delete => {
                readings.retain(|r| r.id != id);
                None
            }
            Edit::Correct(t) => {
                let r = readings
                    .iter_mut()
                    .find(|r| r.id == id)
                    .expect("found above");
                if !r.extra.contains_key("original_temperature") {
                    r.extra
                        .insert("original_temperature".into(), r.temperature.get().into());
                }
                r.temperature = t;
                Some(r.clone())
            }
        };
        let replacement =
            (!readings.is_empty()).then(|| Arc::new(Segment::new(ObjectId::new(), readings)));

        // The replacement, into the document store (expiring unless the swap commits).
        let new_ids: Vec<Vec<u8>> = replacement.iter().map(|s| s.id.bytes().to_vec()).collect();
        let intent: i64 = sqlx::query_scalar(
            "INSERT INTO raw_doc_expiry (docs, due_at, pending_write)
             VALUES ($1, now() + make_interval(secs => $2), true) RETURNING id",
        )
        .bind(&new_ids)
        .bind(self.tuning.intent_ttl.as_secs_f64())
        .fetch_one(&self.pg)
        .await?;
        let mut len = 0;
        if let Some(s) = &replacement {
            let doc = s.encode();
            len = doc.as_bytes().len() as i32;
            self.segments.insert_one(&doc).await?;
            metrics::counter!("raw_store_bytes_written_total", "by" => "correction")
                .increment(len as u64);
            self.recent.insert(s.id, Arc::clone(s));
        }

        let mut tx = self.pg.begin().await?;
        // The latest row first, then the bucket: the order ingestion locks them in.
        sqlx::query("SELECT 1 FROM sensor_latest WHERE sensor_id = $1 FOR UPDATE")
            .bind(sensor.0)
            .execute(&mut *tx)
            .await?;
        sqlx::query("SELECT 1 FROM reading_buckets WHERE id = $1 FOR UPDATE")
            .bind(bucket_id)
            .execute(&mut *tx)
            .await?;
        let swapped = sqlx::query("DELETE FROM raw_docs WHERE doc = $1 AND bucket_id = $2")
            .bind(old_doc.id.bytes().to_vec())
            .bind(bucket_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        let kept = sqlx::query("DELETE FROM raw_doc_expiry WHERE id = $1")
            .bind(intent)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if swapped != 1 || kept != 1 {
            tx.rollback().await?;
            return Ok(None);
        }
        if let Some(s) = &replacement {
            let (first, last) = s.span();
            sqlx::query(
                "INSERT INTO raw_docs (doc, bucket_id, count, first_ts, last_ts, bytes)
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(s.id.bytes().to_vec())
            .bind(bucket_id)
            .bind(s.readings.len() as i32)
            .bind(first)
            .bind(last)
            .bind(len)
            .execute(&mut *tx)
            .await?;
        } else {
            sqlx::query("UPDATE reading_buckets SET docs = docs - 1 WHERE id = $1")
                .bind(bucket_id)
                .execute(&mut *tx)
                .await?;
        }
        if after.is_none() {
            sqlx::query("DELETE FROM reading_ids WHERE id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        self.rollup_from_segments(&mut tx, sensor, bucket_id, bucket)
            .await?;
        self.recompute_latest(&mut tx, sensor).await?;
        self.announce(tx, sensor, bucket).await?;
        self.latest.invalidate(sensor).await;
        Ok(Some(match edit {
            Edit::Delete => Some(before),
            Edit::Correct(_) => after,
        }))
    }
}
