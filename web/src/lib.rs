//! What every termopar product's HTTP side shares, so that each product crate (the API's
//! own resources, the chat webhook, and the ones to come) answers alike: one error model
//! ([`error`]), one way to know the caller ([`auth`]), pages ([`pagination`]), response
//! shapes ([`responses`]) and the middleware of every request ([`http`]).

pub mod auth;
pub mod days;
pub mod error;
pub mod http;
pub mod openapi;
pub mod pagination;
pub mod rate;
pub mod responses;
pub mod settings;
pub mod tokens;
pub mod validate;

pub use auth::{Authenticator, BearerAuth, Principal, Role};
pub use error::{ApiError, ApiResult, ErrorCode};
