//! Where validated readings go.

use std::future::Future;

use termopar_core::{
    ingest::{DeadLetter, IngestStore, StoreError, StoreOutcome},
    reading::Reading,
};

/// Destination of a batch. Production uses [`IngestStore`]; benchmarks swap in sinks
/// that measure or discard, to separate the pipeline's cost from the stores'.
pub trait Sink: Clone + Send + Sync + 'static {
    /// Stores readings exactly once (safe to call again after an error).
    fn store(
        &self,
        readings: &[Reading],
    ) -> impl Future<Output = Result<StoreOutcome, StoreError>> + Send;
    /// Stores refused messages.
    fn dead_letter(
        &self,
        letters: &[DeadLetter],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Finishes work a crash left half done; returns how much it finished.
    fn recover(
        &self,
        _older_than: std::time::Duration,
    ) -> impl Future<Output = Result<usize, StoreError>> + Send {
        async { Ok(0) }
    }
}

impl Sink for IngestStore {
    async fn store(&self, readings: &[Reading]) -> Result<StoreOutcome, StoreError> {
        IngestStore::store(self, readings).await
    }

    async fn dead_letter(&self, letters: &[DeadLetter]) -> Result<(), StoreError> {
        IngestStore::dead_letter(self, letters).await
    }

    async fn recover(&self, older_than: std::time::Duration) -> Result<usize, StoreError> {
        IngestStore::recover(self, older_than).await
    }
}
