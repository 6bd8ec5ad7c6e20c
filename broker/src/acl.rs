//! Who a connection is, and what it may publish and subscribe to.

use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;
use termopar_core::{
    directory::{SensorDirectory, SensorEntry},
    ids::{ClientId, SensorId},
    topic::Topics,
};

/// Who a connection authenticated as.
#[derive(Debug, Clone)]
pub(crate) enum Principal {
    /// A service account (consumer, simulator), or anyone when authentication is off.
    Full,
    /// A device: one sensor.
    Device(Device),
}

/// A sensor connected as itself, and its topics.
#[derive(Debug, Clone)]
pub(crate) struct Device {
    pub sensor: SensorId,
    /// What the directory said at CONNECT: when it says otherwise, the connection ends.
    pub entry: SensorEntry,
    /// The one topic it may publish to.
    readings: String,
    /// `.../sensors/{id}/`: filters under it are its own.
    subtree: String,
}

impl Device {
    fn new(topics: &Topics, sensor: SensorId, entry: SensorEntry) -> Self {
        let readings = topics.readings(entry.client_id, sensor);
        let subtree = topics.sensor_subtree(entry.client_id, sensor);
        Self {
            sensor,
            entry,
            readings,
            subtree,
        }
    }

    pub(crate) fn client(&self) -> ClientId {
        self.entry.client_id
    }

    /// Only its own readings topic.
    pub(crate) fn may_publish(&self, topic: &[u8]) -> bool {
        topic == self.readings.as_bytes()
    }

    /// Filters inside its own subtree (`.../sensors/{id}` itself, or anything below it);
    /// wildcards only below it.
    pub(crate) fn may_subscribe(&self, filter: &[u8]) -> bool {
        let root = &self.subtree.as_bytes()[..self.subtree.len() - 1];
        filter == root || filter.starts_with(self.subtree.as_bytes())
    }
}

/// Why a CONNECT was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Unknown user, wrong secret, no credentials.
    Credentials,
    /// The directory could not be reached.
    Unavailable,
}

/// Checks CONNECT credentials: the service account, or a sensor id and its device
/// secret (through the cached directory).
pub(crate) struct Authenticator {
    pub directory: Option<SensorDirectory>,
    pub service: Option<(String, SecretString)>,
    pub require_auth: bool,
    pub topics: Topics,
    /// The runtime the directory's pool lives on (the front has its own).
    pub runtime: tokio::runtime::Handle,
}

impl Authenticator {
    pub(crate) async fn check(
        &self,
        username: Option<&[u8]>,
        password: Option<&[u8]>,
    ) -> Result<Principal, Refusal> {
        if !self.require_auth {
            return Ok(Principal::Full);
        }
        let (Some(username), Some(password)) = (username, password) else {
            return Err(Refusal::Credentials);
        };
        if let Some((user, pass)) = &self.service {
            if username == user.as_bytes() {
                let ok: bool = password.ct_eq(pass.expose_secret().as_bytes()).into();
                return if ok {
                    Ok(Principal::Full)
                } else {
                    Err(Refusal::Credentials)
                };
            }
        }
        let sensor = std::str::from_utf8(username)
            .ok()
            .and_then(|u| u.parse::<SensorId>().ok())
            .ok_or(Refusal::Credentials)?;
        let password = std::str::from_utf8(password).map_err(|_| Refusal::Credentials)?;
        let directory = self.directory.clone().ok_or(Refusal::Unavailable)?;
        let lookup = self
            .runtime
            .spawn(async move { directory.get(sensor).await })
            .await
            .map_err(|_| Refusal::Unavailable)?;
        match lookup {
            Ok(Some(entry)) if termopar_core::secrets::verify(password, &entry.secret_hash) => {
                Ok(Principal::Device(Device::new(&self.topics, sensor, entry)))
            }
            Ok(_) => Err(Refusal::Credentials),
            Err(e) => {
                tracing::warn!(error = %e, "device authentication could not reach PostgreSQL");
                Err(Refusal::Unavailable)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    #[test]
    fn a_device_publishes_to_its_readings_topic_and_subscribes_inside_its_subtree() {
        let topics = Topics::new("p");
        let (client, sensor) = (ClientId(Uuid::new_v4()), SensorId(Uuid::new_v4()));
        let other = SensorId(Uuid::new_v4());
        let d = Device::new(
            &topics,
            sensor,
            SensorEntry {
                client_id: client,
                secret_hash: vec![],
            },
        );
        assert!(d.may_publish(topics.readings(client, sensor).as_bytes()));
        assert!(!d.may_publish(topics.readings(client, other).as_bytes()));
        assert!(!d.may_publish(topics.readings(ClientId(Uuid::new_v4()), sensor).as_bytes()));
        assert!(
            !d.may_publish(format!("p/clients/{client}/sensors/{sensor}/readings/x").as_bytes())
        );
        let own = format!("p/clients/{client}/sensors/{sensor}");
        for ok in [
            own.clone(),
            format!("{own}/#"),
            format!("{own}/commands"),
            format!("{own}/+/x"),
        ] {
            assert!(d.may_subscribe(ok.as_bytes()), "{ok}");
        }
        for refused in [
            "#".to_owned(),
            format!("p/clients/{client}/sensors/+/readings"),
            format!("p/clients/{client}/#"),
            format!("{own}x/#"),
            format!("$share/g/{own}/#"),
            format!("p/clients/{client}/sensors/{other}/#"),
        ] {
            assert!(!d.may_subscribe(refused.as_bytes()), "{refused}");
        }
    }
}
