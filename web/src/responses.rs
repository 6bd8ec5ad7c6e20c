//! Response types several resources share.

use poem_openapi::ApiResponse;

/// The answer to a successful DELETE.
#[derive(ApiResponse)]
pub enum Deleted {
    /// Deleted.
    #[oai(status = 204)]
    Deleted,
}

/// The answer of a successful read or update: the resource as JSON.
#[derive(ApiResponse)]
pub enum Found<T: poem_openapi::types::ToJSON> {
    /// OK.
    #[oai(status = 200)]
    Ok(poem_openapi::payload::Json<T>),
}

/// The answer of a successful create: the new resource as JSON.
#[derive(ApiResponse)]
pub enum Created<T: poem_openapi::types::ToJSON> {
    /// Created.
    #[oai(status = 201)]
    Created(poem_openapi::payload::Json<T>),
}
