//! One way in for readings, whatever carried them (MQTT or HTTP): find the sensor,
//! parse and validate, store the good readings once, dead-letter the rest with a reason.
//!
//! Two steps, so a caller that retries (the consumer, while a store is down) retries
//! each on its own: [`Intake::prepare`] needs only the sensor directory;
//! [`Intake::commit`] stores, and is safe to call again with the same [`Prepared`] after
//! an error (readings are idempotent by id, dead letters by theirs).

use std::{future::Future, sync::Arc};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::{
    directory::SensorDirectory,
    ids::{ClientId, SensorId},
    reading::{parse_message, Limits, Reading, Reject, RejectReason},
    store::{DeadLetter, ReadingStore, StoreError, StoreOutcome},
    topic::Topics,
};

/// Where validated readings go. Production uses [`ReadingStore`]; benchmarks swap in
/// sinks that measure or discard, to separate the pipeline's cost from the stores'.
pub trait Sink: Clone + Send + Sync + 'static {
    /// Stores readings exactly once (safe to call again after an error).
    fn store(
        &self,
        readings: &[Reading],
    ) -> impl Future<Output = Result<StoreOutcome, StoreError>> + Send;
    /// Stores refused messages (safe to call again after an error).
    fn dead_letter(
        &self,
        letters: &[DeadLetter],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// The sink's background work (recovery, merges) until `stop` turns true.
    fn maintain(
        &self,
        _stop: tokio::sync::watch::Receiver<bool>,
    ) -> impl Future<Output = ()> + Send + 'static {
        async {}
    }
}

impl Sink for ReadingStore {
    async fn store(&self, readings: &[Reading]) -> Result<StoreOutcome, StoreError> {
        ReadingStore::store(self, readings).await
    }

    async fn dead_letter(&self, letters: &[DeadLetter]) -> Result<(), StoreError> {
        ReadingStore::dead_letter(self, letters).await
    }

    fn maintain(
        &self,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> impl Future<Output = ()> + Send + 'static {
        self.clone().maintain(MAINTENANCE_EVERY, stop)
    }
}

/// How often a store's background work runs.
pub const MAINTENANCE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// How a message names its sensor.
#[derive(Debug, Clone, Copy)]
pub enum Address<'a> {
    /// An MQTT topic `clients/{client}/sensors/{sensor}/readings`: the sensor must exist
    /// and belong to that client.
    Topic(&'a str),
    /// A sensor the caller already authenticated (HTTP ingest).
    Sensor(SensorId),
}

/// A message carrying readings.
#[derive(Debug, Clone)]
pub struct Incoming<'a> {
    /// How it names its sensor.
    pub address: Address<'a>,
    /// The payload: a reading or an array of readings, as JSON.
    pub payload: Bytes,
    /// When it was received.
    pub received_at: DateTime<Utc>,
}

/// Messages checked and parsed, ready to [`Intake::commit`].
#[derive(Debug, Default)]
pub struct Prepared {
    readings: Vec<Reading>,
    letters: Vec<DeadLetter>,
    /// The dead letter a store refusal becomes, per message with readings.
    refusals: Vec<DeadLetter>,
    /// For each reading, its message's place in `refusals`.
    origin: Vec<usize>,
}

/// What a commit did.
#[derive(Debug, Default)]
pub struct Report {
    /// Readings stored now.
    pub stored: usize,
    /// Readings stored before (redeliveries).
    pub duplicates: usize,
    /// Everything refused, as dead-lettered (payload refusals and store refusals).
    pub rejected: Vec<DeadLetter>,
    /// Ids of the readings stored now or before, in message order.
    pub ids: Vec<Uuid>,
}

/// Checks, parses and stores readings.
#[derive(Clone)]
pub struct Intake {
    directory: SensorDirectory,
    topics: Topics,
    limits: Limits,
}

impl Intake {
    /// An intake resolving sensors through `directory`, topics under `topics`.
    pub fn new(directory: SensorDirectory, topics: Topics, limits: Limits) -> Self {
        Self {
            directory,
            topics,
            limits,
        }
    }

    /// The parse limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Finds each message's sensor and parses it. Fails only when the directory cannot
    /// answer (PostgreSQL down and the sensor not cached).
    pub async fn prepare(&self, messages: &[Incoming<'_>]) -> Result<Prepared, Arc<sqlx::Error>> {
        let mut out = Prepared::default();
        for m in messages {
            let (source, topic) = match m.address {
                Address::Topic(t) => ("mqtt", Some(t.to_owned())),
                Address::Sensor(_) => ("http", None),
            };
            let letter =
                |reject: Reject, sensor: Option<SensorId>, client: Option<ClientId>| DeadLetter {
                    source,
                    topic: topic.clone(),
                    sensor_id: sensor,
                    client_id: client,
                    payload: m.payload.clone(),
                    reason: reject.reason,
                    detail: reject.detail,
                    index: reject.index,
                    received_at: m.received_at,
                };
            let (claimed, sensor) = match m.address {
                Address::Sensor(s) => (None, s),
                Address::Topic(t) => match self.topics.parse(t) {
                    Ok((client, sensor)) => (Some(client), sensor),
                    Err(e) => {
                        out.letters.push(letter(
                            Reject::message(RejectReason::InvalidTopic, e.to_string()),
                            None,
                            None,
                        ));
                        continue;
                    }
                },
            };
            let client = match self.directory.get(sensor).await? {
                None => {
                    out.letters.push(letter(
                        Reject::message(RejectReason::UnknownSensor, format!("no sensor {sensor}")),
                        Some(sensor),
                        None,
                    ));
                    continue;
                }
                Some(e) if claimed.is_some_and(|c| c != e.client_id) => {
                    out.letters.push(letter(
                        Reject::message(
                            RejectReason::ClientMismatch,
                            format!(
                                "sensor {sensor} does not belong to client {}",
                                claimed.expect("checked")
                            ),
                        ),
                        Some(sensor),
                        Some(e.client_id),
                    ));
                    continue;
                }
                Some(e) => e.client_id,
            };
            match parse_message(&m.payload, sensor, client, m.received_at, &self.limits) {
                Ok(parsed) => {
                    out.refusals.push(letter(
                        Reject::message(RejectReason::StoreRejected, String::new()),
                        Some(sensor),
                        Some(client),
                    ));
                    out.origin.extend(std::iter::repeat_n(
                        out.refusals.len() - 1,
                        parsed.readings.len(),
                    ));
                    out.readings.extend(parsed.readings);
                    out.letters.extend(
                        parsed
                            .rejects
                            .into_iter()
                            .map(|r| letter(r, Some(sensor), Some(client))),
                    );
                }
                Err(reject) => out.letters.push(letter(reject, Some(sensor), Some(client))),
            }
        }
        Ok(out)
    }

    /// Stores the readings and dead-letters the refusals (again after an error: each is
    /// stored once).
    pub async fn commit(
        &self,
        sink: &impl Sink,
        prepared: &Prepared,
    ) -> Result<Report, StoreError> {
        let outcome = sink.store(&prepared.readings).await?;
        let mut rejected = prepared.letters.clone();
        for (index, why) in &outcome.refused {
            let mut letter = prepared.refusals[prepared.origin[*index]].clone();
            letter.detail.clone_from(why);
            rejected.push(letter);
        }
        sink.dead_letter(&rejected).await?;
        let refused: std::collections::HashSet<usize> =
            outcome.refused.iter().map(|(i, _)| *i).collect();
        Ok(Report {
            stored: outcome.inserted,
            duplicates: outcome.duplicates,
            ids: prepared
                .readings
                .iter()
                .enumerate()
                .filter(|(i, _)| !refused.contains(i))
                .map(|(_, r)| r.id)
                .collect(),
            rejected,
        })
    }
}
