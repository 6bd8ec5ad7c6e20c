//! Integration tests of the API over real HTTP on port 0, each against its own fresh
//! PostgreSQL database and MongoDB database.

mod alarms;
mod auth;
mod authorization;
mod clients;
mod console;
mod contract;
mod daily;
mod errors;
mod harness;
mod leads;
mod lifecycle;
mod operations;
mod readings;
mod sensors;
mod sinks;
mod tracking;
mod users;
mod webhook;
mod webhook_model;
