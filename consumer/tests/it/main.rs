//! Consumer tests against real brokers (the embedded rumqttd and Mosquitto), real
//! PostgreSQL and FerretDB, with mosquitto_pub and consumer processes killed mid-stream.

mod alarms;
mod corpus;
mod crash;
mod harness;
mod mosquitto;
mod pipeline;
mod store;
