//! Edge mode's settings: the API's, the broker's and the consumer's, read together.

use anyhow::bail;
use termopar_broker::BrokerSettings;
use termopar_consumer::ConsumerSettings;

/// Everything edge mode needs.
#[derive(Debug, Clone)]
pub struct EdgeSettings {
    /// The API.
    pub api: termopar_api::Settings,
    /// The embedded broker.
    pub broker: BrokerSettings,
    /// The consumer; its broker endpoint is replaced by the embedded broker's.
    pub consumer: ConsumerSettings,
}

impl EdgeSettings {
    /// Reads all three from the environment, and refuses combinations that cannot work.
    pub fn from_env() -> anyhow::Result<Self> {
        let mut settings = Self {
            api: termopar_api::Settings::from_env()?,
            broker: BrokerSettings::from_env()?,
            consumer: ConsumerSettings::from_env()?,
        };
        settings.validate()?;
        // The in-process consumer pushes every new latest reading into the API's cache,
        // so entries can live longer than in cloud mode.
        if termopar_core::settings::env_var("LATEST_CACHE_TTL_MS").is_none() {
            settings.api.latest_cache_ttl = std::time::Duration::from_secs(60);
        }
        Ok(settings)
    }

    /// Refuses combinations known to fail.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.consumer.share_group.is_some() {
            bail!(
                "CONSUMER_SHARE_GROUP is set, but edge mode runs the embedded rumqttd, which \
                 crashes when a persistent shared subscriber disconnects abruptly (rumqttd \
                 0.20). Run consumers against Mosquitto or EMQX to share the load."
            );
        }
        Ok(())
    }
}
