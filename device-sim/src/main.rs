use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::Parser;
use rumqttc::QoS;
use termopar_core::{settings::MqttEndpoint, topic::Topics};
use termopar_device_sim::{provision, run, SimConfig};

/// Simulates the temperature sensors of two demo clients (a cold-storage company and a
/// pharmaceutical warehouse) and publishes their readings over MQTT.
///
/// The clients and sensors are created through the API when missing (admin
/// credentials), then readings are published to
/// `clients/{client_id}/sensors/{sensor_id}/readings`, each with an `id` (so redelivery
/// never double counts) and a `ts`. Values follow a daily cycle in the site's local time,
/// with noise and occasional spikes. Works against any MQTT 3.1.1 broker.
///
/// Examples:
///   device-sim --count 1000 --rate 100
///   device-sim --start 2026-01-01T00:00:00Z --speed 3600 --rate 500 --batch 10   # backfill
///   device-sim --duration 60 --bad-ratio 0.05                                     # with bad data
///   device-sim --per-device --sensors 50 --rate 100                               # a fleet of devices
#[derive(Debug, Parser)]
#[command(name = "device-sim", version, verbatim_doc_comment)]
struct Cli {
    /// The termopar API, used to provision clients and sensors.
    #[arg(long, env = "API_URL", default_value = "http://127.0.0.1:8080")]
    api_url: String,
    /// Admin e-mail for provisioning.
    #[arg(long, env = "ADMIN_EMAIL", default_value = "admin@termopar.local")]
    admin_email: String,
    /// Admin password for provisioning.
    #[arg(
        long,
        env = "ADMIN_PASSWORD",
        default_value = "termopar-admin",
        hide_env_values = true
    )]
    admin_password: String,
    /// The broker: mqtt://host:port.
    #[arg(long, env = "MQTT_URL", default_value = termopar_core::settings::DEFAULT_MQTT_URL)]
    mqtt_url: String,
    /// MQTT username, when the broker requires credentials.
    #[arg(long, env = "MQTT_USERNAME")]
    mqtt_username: Option<String>,
    /// MQTT password.
    #[arg(long, env = "MQTT_PASSWORD", hide_env_values = true)]
    mqtt_password: Option<String>,
    /// MQTT client id.
    #[arg(long, default_value = "termopar-device-sim")]
    client_id: String,
    /// Topic prefix (must match the consumer's MQTT_TOPIC_PREFIX).
    #[arg(long, env = "MQTT_TOPIC_PREFIX", default_value = "")]
    topic_prefix: String,
    /// Sensors per client.
    #[arg(long, default_value_t = 3)]
    sensors: usize,
    /// Messages per second, across all sensors.
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    /// Stop after this many messages.
    #[arg(long)]
    count: Option<u64>,
    /// Stop after this many seconds.
    #[arg(long)]
    duration: Option<f64>,
    /// MQTT QoS: 0 or 1.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    qos: u8,
    /// Readings per message; above 1 each message is a JSON array.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Simulated start time (RFC 3339), for backfilling history. Publishing stops when
    /// the simulated clock reaches now.
    #[arg(long)]
    start: Option<DateTime<Utc>>,
    /// Simulated seconds per real second (with --start: 3600 = an hour per second).
    #[arg(long, default_value_t = 1.0)]
    speed: f64,
    /// Fraction (0..1) of deliberately bad messages: malformed JSON, wrong types, NaN,
    /// absurd values, bad timestamps, garbage, unknown sensors, wrong client.
    #[arg(long, default_value_t = 0.0)]
    bad_ratio: f64,
    /// Random seed, for reproducible runs.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// No progress bar.
    #[arg(long)]
    no_progress: bool,
    /// Connect each sensor as its own device, with its own device secret (rotated at
    /// start for sensors that exist), instead of one client with MQTT_USERNAME: what a
    /// broker with MQTT_AUTH=devices sees from a real fleet. Deliberately bad messages
    /// aimed at other sensors' topics are then refused by the broker's device ACL.
    #[arg(long)]
    per_device: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    termopar_core::telemetry::init("warn");
    let cli = Cli::parse();
    let mut broker = MqttEndpoint::parse(&cli.mqtt_url)?;
    if let (Some(u), Some(p)) = (&cli.mqtt_username, &cli.mqtt_password) {
        broker = broker.with_credentials(u, p);
    }
    let sensors = provision(
        &cli.api_url,
        &cli.admin_email,
        &cli.admin_password,
        cli.sensors,
        cli.per_device,
    )
    .await
    .context("provisioning the demo clients failed")?;
    eprintln!(
        "simulating {} sensors of 2 clients -> {}:{}",
        sensors.len(),
        broker.host,
        broker.port
    );
    let summary = run(SimConfig {
        client_id: cli.client_id,
        rate: cli.rate,
        count: cli.count,
        duration: cli.duration.map(Duration::from_secs_f64),
        qos: if cli.qos == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        },
        batch: cli.batch,
        start: cli.start,
        speed: cli.speed,
        bad_ratio: cli.bad_ratio,
        seed: cli.seed,
        progress: !cli.no_progress,
        per_device: cli.per_device,
        ..SimConfig::new(broker, Topics::new(&cli.topic_prefix), sensors)
    })
    .await?;
    println!(
        "sent {} messages ({} readings, {} deliberately bad), acked {}, in {:.1} s: {:.0} msgs/s",
        summary.messages,
        summary.readings,
        summary.bad,
        summary.acked,
        summary.elapsed.as_secs_f64(),
        summary.rate()
    );
    if summary.acked < summary.messages {
        anyhow::bail!(
            "{} messages were not acknowledged",
            summary.messages - summary.acked
        );
    }
    Ok(())
}
