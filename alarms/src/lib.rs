//! The alarms product (issue 18): rules on a sensor or on every sensor of a client,
//! evaluated in event time as readings are stored; each excursion is one alarm, kept
//! with its history for audits.
//!
//! [`eval`] is the semantics (a pure function of a sensor's readings) and the
//! incremental tracker; [`engine`] keeps one tracker per rule and sensor and recomputes
//! from the stored readings when a reading arrives late.

// Items are `pub(crate)` unless another crate uses them.
#![warn(unreachable_pub)]

pub mod engine;
pub mod eval;
