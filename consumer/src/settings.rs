//! Settings of the consumer.

use std::{net::SocketAddr, time::Duration};

use anyhow::{bail, Context};
use termopar_core::{
    reading::Limits,
    settings::{env_or, env_parse, env_var, MqttEndpoint},
};

/// Where the consumer connects and how it batches.
#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    /// The broker (`MQTT_URL`, default `mqtt://127.0.0.1:1883`, and `MQTT_USERNAME` /
    /// `MQTT_PASSWORD` when it requires credentials).
    pub broker: MqttEndpoint,
    /// MQTT client id (`MQTT_CLIENT_ID`, default `termopar-consumer`). With a persistent
    /// session the broker keeps this id's subscription and unacknowledged messages while
    /// it is away, so every consumer instance needs its own stable id.
    pub client_id: String,
    /// Share group (`CONSUMER_SHARE_GROUP`): subscribe `$share/<group>/...` so several
    /// consumers split the load. Needs a broker that keeps persistent shared sessions
    /// (Mosquitto, EMQX): rumqttd 0.20 crashes on that combination.
    pub share_group: Option<String>,
    /// Topic prefix (`MQTT_TOPIC_PREFIX`, default none).
    pub topic_prefix: String,
    /// Keep the session (and queued messages) across disconnects. Always on in
    /// production; `MQTT_CLEAN_SESSION=true` turns it off.
    pub persistent_session: bool,
    /// Store once this many readings are waiting (`CONSUMER_BATCH_SIZE`, default 5000).
    pub batch_size: usize,
    /// Store at the latest this long after the first waiting message
    /// (`CONSUMER_BATCH_DELAY_MS`, default 20).
    pub batch_delay: Duration,
    /// Store once this many QoS 1 messages wait for their acknowledgement
    /// (`CONSUMER_MAX_UNACKED`, default 1000). termopar's rumqttd sends at most 1000
    /// unacknowledged messages to a subscriber, so waiting for more would only wait for
    /// the delay; against a broker with a smaller window (Mosquitto's
    /// `max_inflight_messages`, 20 by default), set it to that window.
    pub max_unacked: usize,
    /// Batches stored at once (`CONSUMER_PIPELINE`, default 2). Each batch takes its
    /// share of `max_unacked`, so the next batch fills while one is stored;
    /// acknowledgements stay in order.
    pub pipeline: usize,
    /// Payload limits (`CONSUMER_MAX_PAYLOAD_BYTES`, default 256 KiB).
    pub limits: Limits,
    /// `/metrics` and `/health` of a standalone consumer (`CONSUMER_METRICS_ADDR`,
    /// default `127.0.0.1:9101`; `off` disables).
    pub metrics_addr: Option<SocketAddr>,
}

impl ConsumerSettings {
    /// Reads the settings from the environment.
    pub fn from_env() -> anyhow::Result<Self> {
        let metrics = env_or("CONSUMER_METRICS_ADDR", "127.0.0.1:9101");
        let d = Self::new(MqttEndpoint::from_env()?, "termopar-consumer");
        let settings = Self {
            client_id: env_or("MQTT_CLIENT_ID", &d.client_id),
            share_group: env_var("CONSUMER_SHARE_GROUP"),
            topic_prefix: env_or("MQTT_TOPIC_PREFIX", &d.topic_prefix),
            persistent_session: !env_parse("MQTT_CLEAN_SESSION", !d.persistent_session)?,
            batch_size: env_parse("CONSUMER_BATCH_SIZE", d.batch_size)?,
            batch_delay: Duration::from_millis(env_parse(
                "CONSUMER_BATCH_DELAY_MS",
                d.batch_delay.as_millis() as u64,
            )?),
            max_unacked: env_parse("CONSUMER_MAX_UNACKED", d.max_unacked)?,
            pipeline: env_parse("CONSUMER_PIPELINE", d.pipeline)?,
            limits: Limits {
                max_payload_bytes: env_parse(
                    "CONSUMER_MAX_PAYLOAD_BYTES",
                    d.limits.max_payload_bytes,
                )?,
                ..d.limits
            },
            broker: d.broker,
            metrics_addr: if metrics == "off" {
                None
            } else {
                Some(metrics.parse().context("invalid CONSUMER_METRICS_ADDR")?)
            },
        };
        settings.validate()?;
        Ok(settings)
    }

    /// Settings for `broker` with defaults everywhere else (tests, edge mode).
    pub fn new(broker: MqttEndpoint, client_id: impl Into<String>) -> Self {
        Self {
            broker,
            client_id: client_id.into(),
            share_group: None,
            topic_prefix: String::new(),
            persistent_session: true,
            batch_size: 5000,
            batch_delay: Duration::from_millis(20),
            max_unacked: 1000,
            pipeline: 2,
            limits: Limits::default(),
            metrics_addr: None,
        }
    }

    /// Checks values that parse but make no sense.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.batch_size == 0 || self.max_unacked == 0 || self.pipeline == 0 {
            bail!(
                "CONSUMER_BATCH_SIZE, CONSUMER_MAX_UNACKED and CONSUMER_PIPELINE must be positive"
            );
        }
        if self.client_id.is_empty() {
            bail!("MQTT_CLIENT_ID must not be empty");
        }
        if let Some(group) = &self.share_group {
            if group.is_empty() || group.contains(['/', '+', '#']) {
                bail!("CONSUMER_SHARE_GROUP must be a plain name, not {group:?}");
            }
        }
        Ok(())
    }
}
