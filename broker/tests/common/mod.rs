//! What the broker's test binaries share.

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::mpsc::UnboundedReceiver;

/// Edge mode's consumer, as the broker sees it: an MQTT 3.1.1 client on rumqttd's own
/// port with its internal credentials, subscribed to `filter`. Returns once the broker
/// confirmed the subscription, with the client (kept for as long as it should stay
/// connected) and the `(topic, payload)` of every publish it receives.
pub async fn direct_subscriber(
    broker: &termopar_broker::RunningBroker,
    filter: &str,
) -> (AsyncClient, UnboundedReceiver<(String, Vec<u8>)>) {
    let direct = broker.direct_endpoint();
    let mut options = MqttOptions::new("consumer", &direct.host, direct.port);
    if let Some((user, password)) = &direct.credentials {
        use secrecy::ExposeSecret;
        options.set_credentials(user, password.expose_secret());
    }
    let (client, mut eventloop) = AsyncClient::new(options, 16);
    client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    let (got_tx, got) = tokio::sync::mpsc::unbounded_channel();
    let (subscribed_tx, subscribed) = tokio::sync::oneshot::channel();
    let mut subscribed_tx = Some(subscribed_tx);
    tokio::spawn(async move {
        while let Ok(event) = eventloop.poll().await {
            match event {
                Event::Incoming(Packet::SubAck(_)) => {
                    if let Some(tx) = subscribed_tx.take() {
                        let _ = tx.send(());
                    }
                }
                Event::Incoming(Packet::Publish(p)) => {
                    let _ = got_tx.send((p.topic, p.payload.to_vec()));
                }
                _ => {}
            }
        }
    });
    tokio::time::timeout(std::time::Duration::from_secs(20), subscribed)
        .await
        .expect("the broker confirms the subscription")
        .unwrap();
    (client, got)
}
