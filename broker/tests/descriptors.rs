//! What a client connection costs the broker in open files. A test binary of its own:
//! nothing else opens files in this process while it counts.

use std::time::Duration;

use termopar_broker::BrokerSettings;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

fn open_files() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// An MQTT 3.1.1 CONNECT (clean session, keepalive 60 s) of `client_id`.
fn connect_packet(client_id: &str) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60];
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend_from_slice(&body);
    packet
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_connection_holds_one_descriptor_in_the_broker() {
    let broker = termopar_broker::start(&BrokerSettings::ephemeral(), None)
        .await
        .unwrap();
    let addr = termopar_broker::reachable(broker.addr);
    // One connection first: whatever the broker opens once (timers, runtimes) is open.
    let mut warm = TcpStream::connect(addr).await.unwrap();
    warm.write_all(&connect_packet("warm")).await.unwrap();
    let mut connack = [0u8; 4];
    warm.read_exact(&mut connack).await.unwrap();

    let before = open_files();
    let clients = 40;
    let mut connected = Vec::new();
    for i in 0..clients {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(&connect_packet(&format!("device-{i}")))
            .await
            .unwrap();
        let mut connack = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut connack))
            .await
            .expect("a CONNACK in time")
            .unwrap();
        assert_eq!(connack, [0x20, 2, 0, 0], "accepted");
        connected.push(stream);
    }
    let per_client = (open_files() - before) as f64 / clients as f64;
    // The client's own socket and the one the front accepted; rumqttd's side is an
    // in-memory stream (through a loopback socket it was four).
    assert!(
        per_client <= 2.05,
        "{per_client} descriptors per client in this process"
    );
    assert_eq!(broker.stats().connections, clients as i64 + 1);
}
