//! MQTT topic names: `clients/{client_id}/sensors/{sensor_id}/readings`, behind an
//! optional prefix (so several deployments or test runs can share one broker).

use crate::ids::{ClientId, SensorId};

/// Topic names of one deployment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Topics {
    prefix: String,
}

/// Why a topic is not a readings topic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TopicError(String);

impl Topics {
    /// Topics under `prefix` (empty for none; a trailing `/` is added when missing).
    pub fn new(prefix: &str) -> Self {
        let prefix = prefix.trim_matches('/');
        Self {
            prefix: if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}/")
            },
        }
    }

    /// The readings topic of a sensor.
    pub fn readings(&self, client: ClientId, sensor: SensorId) -> String {
        format!("{}clients/{client}/sensors/{sensor}/readings", self.prefix)
    }

    /// The readings topic with `{client_id}` and `{sensor_id}` left as placeholders, for
    /// people to fill in (the console's ready `mosquitto_pub` line).
    pub fn readings_template(&self) -> String {
        format!(
            "{}clients/{{client_id}}/sensors/{{sensor_id}}/readings",
            self.prefix
        )
    }

    /// `clients/{client_id}/sensors/{sensor_id}/`: the start of every topic of one
    /// sensor (its readings, and commands later).
    pub fn sensor_subtree(&self, client: ClientId, sensor: SensorId) -> String {
        format!("{}clients/{client}/sensors/{sensor}/", self.prefix)
    }

    /// A readings topic no device has: the nil client's, for a sensor named `nonce`. A
    /// consumer that publishes one to the broker it reads from knows, when the message
    /// comes back, that it received everything the broker had logged before it.
    pub fn drain_marker(&self, nonce: uuid::Uuid) -> String {
        self.readings(ClientId(uuid::Uuid::nil()), SensorId(nonce))
    }

    /// Where every drain marker's topic starts.
    pub fn drain_markers(&self) -> String {
        format!("{}clients/{}/", self.prefix, uuid::Uuid::nil())
    }

    /// The filter matching every readings topic.
    pub fn readings_filter(&self) -> String {
        format!("{}clients/+/sensors/+/readings", self.prefix)
    }

    /// The filter of a shared subscription in `group` (MQTT v5 `$share`).
    pub fn shared_readings_filter(&self, group: &str) -> String {
        format!("$share/{group}/{}", self.readings_filter())
    }

    /// The client and sensor a readings topic names.
    pub fn parse(&self, topic: &str) -> Result<(ClientId, SensorId), TopicError> {
        let rest = topic
            .strip_prefix(&self.prefix)
            .ok_or_else(|| TopicError(format!("topic {topic:?} is outside {:?}", self.prefix)))?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            ["clients", client, "sensors", sensor, "readings"] => {
                let client = client
                    .parse()
                    .map_err(|_| TopicError(format!("client id {client:?} is not a UUID")))?;
                let sensor = sensor
                    .parse()
                    .map_err(|_| TopicError(format!("sensor id {sensor:?} is not a UUID")))?;
                Ok((client, sensor))
            }
            _ => Err(TopicError(format!(
                "topic {topic:?} is not clients/{{client_id}}/sensors/{{sensor_id}}/readings"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    #[test]
    fn a_readings_topic_round_trips_with_and_without_prefix() {
        let (c, s) = (ClientId(Uuid::new_v4()), SensorId(Uuid::new_v4()));
        for prefix in ["", "test-1", "/a/b/"] {
            let topics = Topics::new(prefix);
            assert_eq!(topics.parse(&topics.readings(c, s)), Ok((c, s)), "{prefix}");
        }
        assert_eq!(
            Topics::new("x").readings_filter(),
            "x/clients/+/sensors/+/readings"
        );
        assert_eq!(
            Topics::new("").shared_readings_filter("g"),
            "$share/g/clients/+/sensors/+/readings"
        );
    }

    #[test]
    fn other_topics_are_rejected_with_a_reason() {
        let topics = Topics::new("p");
        let id = Uuid::new_v4();
        let cases = [
            format!("clients/{id}/sensors/{id}/readings"),
            format!("p/clients/{id}/sensors/{id}"),
            format!("p/clients/nope/sensors/{id}/readings"),
            format!("p/clients/{id}/sensors/nope/readings"),
            format!("p/clients/{id}/sensors/{id}/readings/extra"),
            "p/".to_owned(),
        ];
        for topic in cases {
            assert!(topics.parse(&topic).is_err(), "{topic}");
        }
    }
}
