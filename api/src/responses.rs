//! Response types several resources share.

use poem_openapi::ApiResponse;

/// The answer to a successful DELETE.
#[derive(ApiResponse)]
pub enum Deleted {
    /// Deleted.
    #[oai(status = 204)]
    Deleted,
}
