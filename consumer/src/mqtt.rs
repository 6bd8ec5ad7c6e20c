//! The MQTT side: connection options and the event loop task.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, Publish, QoS};
use secrecy::ExposeSecret;
use tokio::sync::{mpsc, watch};

use crate::settings::ConsumerSettings;

/// A message from the broker, with what is needed to acknowledge it.
#[derive(Debug)]
pub struct Message {
    /// Topic.
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    /// When it arrived.
    pub received_at: DateTime<Utc>,
    /// The packet to acknowledge (QoS 1 and 2 only).
    pub ack: Option<Publish>,
    /// Connection it arrived on: an acknowledgement is only valid on that connection.
    pub epoch: u64,
    /// The drain marker this consumer published (see [`crate::Drainer`]): acknowledged in
    /// its turn, never stored.
    pub marker: bool,
}

/// The current connection number, bumped on every CONNACK.
#[derive(Clone, Default)]
pub struct Epoch(Arc<AtomicU64>);

impl Epoch {
    /// The current connection.
    pub fn current(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }
    fn bump(&self) -> u64 {
        self.0.fetch_add(1, Ordering::AcqRel) + 1
    }
}

/// The client's options from the settings.
pub fn options(settings: &ConsumerSettings) -> MqttOptions {
    let mut options = MqttOptions::new(
        settings.client_id.clone(),
        settings.broker.host.clone(),
        settings.broker.port,
    );
    options
        .set_keep_alive(Duration::from_secs(15))
        .set_clean_session(!settings.persistent_session)
        .set_manual_acks(true)
        .set_max_packet_size(4 * 1024 * 1024, 64 * 1024)
        .set_request_channel_capacity(4096);
    if let Some((user, pass)) = &settings.broker.credentials {
        options.set_credentials(user.clone(), pass.expose_secret().to_owned());
    }
    options
}

/// Polls the event loop until `messages` is closed: forwards publishes, subscribes on
/// every connection (a persistent session keeps the subscription, but subscribing again
/// is harmless and covers a broker that lost it), and reconnects with backoff.
pub async fn drive(
    client: AsyncClient,
    mut eventloop: EventLoop,
    filter: String,
    messages: mpsc::Sender<Message>,
    epoch: Epoch,
    subscribed: watch::Sender<bool>,
    progress: crate::Progress,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let acknowledged = p.qos != QoS::AtMostOnce;
                let marker = progress.received(&p.topic, acknowledged);
                let message = Message {
                    topic: p.topic.clone(),
                    payload: p.payload.clone(),
                    received_at: Utc::now(),
                    ack: acknowledged.then_some(p),
                    epoch: epoch.current(),
                    marker,
                };
                if !marker {
                    metrics::counter!("consumer_messages_received_total").increment(1);
                }
                if messages.send(message).await.is_err() {
                    return;
                }
            }
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                let n = epoch.bump();
                backoff = Duration::from_millis(100);
                metrics::gauge!("consumer_connected").set(1.0);
                tracing::info!(session_present = ack.session_present, connection = n, %filter, "connected to the broker");
                if let Err(e) = client.try_subscribe(filter.clone(), QoS::AtLeastOnce) {
                    tracing::error!(error = %e, "could not queue the subscription");
                }
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                metrics::gauge!("consumer_subscribed").set(1.0);
                subscribed.send_replace(true);
            }
            Ok(_) => {}
            Err(e) => {
                metrics::gauge!("consumer_connected").set(0.0);
                metrics::gauge!("consumer_subscribed").set(0.0);
                subscribed.send_replace(false);
                if messages.is_closed() {
                    return;
                }
                tracing::warn!(error = %e, retry_in = ?backoff, "broker connection lost");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}
