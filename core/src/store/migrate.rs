//! Moving readings stored by the previous version (one document each in `readings`)
//! into segments.
//!
//! Raw readings are the truth the rollups are computed from, so the move rebuilds the
//! rollups from them: the first run clears the rollups and latest rows (in the
//! transaction that records the migration as started), then every legacy reading goes
//! through [`ReadingStore::store`], exactly as if it arrived now. Readings of batches the
//! previous version left pending (written, never rolled up) are counted like the rest,
//! once. An interrupted move is resumed by running it again: readings already moved are
//! duplicates for `store`. The legacy collection is dropped only once everything in it
//! is stored. Every process that writes readings runs this before it starts writing,
//! under an advisory lock, so nothing new is counted before the rollups are rebuilt.

use std::time::Instant;

use mongodb::bson::{doc, Document};

use super::{codec::legacy, ReadingStore, StoreError};
use crate::reading::Reading;

/// Advisory lock held while migrating.
const MIGRATION_LOCK: i64 = 0x7470_6d69_6772_0001;
/// The migration's name in `store_migrations`.
const NAME: &str = "segments";
/// Legacy readings stored per call.
const CHUNK: usize = 10_000;

/// What a migration did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MigrationReport {
    /// Legacy documents read.
    pub read: u64,
    /// Readings stored as segments.
    pub stored: u64,
    /// Readings already moved by an earlier, interrupted run.
    pub already: u64,
    /// Documents that are not readings, or readings of sensors deleted since: left out.
    pub skipped: u64,
}

impl ReadingStore {
    /// Moves readings of the previous version's shape into segments, if there are any;
    /// see the module docs. Waits for a migration another process is running.
    pub async fn migrate_legacy(&self) -> Result<MigrationReport, StoreError> {
        let mut lock = self.pg.acquire().await?;
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(MIGRATION_LOCK)
            .execute(&mut *lock)
            .await?;
        let result = self.migrate_locked().await;
        sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(MIGRATION_LOCK)
            .execute(&mut *lock)
            .await?;
        result
    }

    async fn migrate_locked(&self) -> Result<MigrationReport, StoreError> {
        let mut report = MigrationReport::default();
        if self.legacy.find_one(doc! {}).await?.is_none() {
            return Ok(report);
        }
        let started = Instant::now();
        tracing::info!("moving readings of the previous version into segments");
        let mut tx = self.pg.begin().await?;
        let first_run = sqlx::query(
            "INSERT INTO store_migrations (name) VALUES ($1) ON CONFLICT (name) DO NOTHING",
        )
        .bind(NAME)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if first_run {
            // Rebuilt from the raw readings below.
            sqlx::query("DELETE FROM reading_buckets")
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM reading_days")
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM reading_day_quarters")
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM sensor_latest")
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;

        let mut cursor = self.legacy.find(doc! {}).batch_size(CHUNK as u32).await?;
        let mut chunk: Vec<Reading> = Vec::with_capacity(CHUNK);
        loop {
            let more = cursor.advance().await?;
            if more {
                report.read += 1;
                let d =
                    Document::try_from(cursor.current()).map_err(mongodb::error::Error::from)?;
                match legacy::decode(&d) {
                    Some(reading) => chunk.push(reading),
                    None => report.skipped += 1,
                }
            }
            if chunk.len() >= CHUNK || (!more && !chunk.is_empty()) {
                let outcome = self.store(&chunk).await?;
                report.stored += outcome.inserted as u64;
                report.already += outcome.duplicates as u64;
                report.skipped += outcome.refused.len() as u64;
                chunk.clear();
                tracing::info!(read = report.read, "moving readings");
            }
            if !more {
                break;
            }
        }
        // Batches the previous version left pending are now stored like the rest.
        sqlx::query("DELETE FROM ingest_batches")
            .execute(&self.pg)
            .await?;
        self.legacy.drop().await?;
        sqlx::query("UPDATE store_migrations SET finished_at = now() WHERE name = $1")
            .bind(NAME)
            .execute(&self.pg)
            .await?;
        tracing::info!(
            read = report.read,
            stored = report.stored,
            already = report.already,
            skipped = report.skipped,
            seconds = started.elapsed().as_secs_f64(),
            "readings moved into segments"
        );
        Ok(report)
    }
}
