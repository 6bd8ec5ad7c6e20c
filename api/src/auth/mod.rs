//! Logging in: token issue and refresh ([`AuthApi`]); passwords are `credentials`'.
//! Checking tokens is `termopar_web::auth`'s.

mod routes;

pub(crate) use routes::AuthApi;
pub(crate) use termopar_web::{tokens::TokenType, BearerAuth};
