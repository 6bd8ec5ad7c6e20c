//! Who sees what: the tenant rules every resource applies. A caller who may not see a
//! resource gets a 404, never a 403, so that other tenants' ids do not leak.

use termopar_core::{directory::SensorEntry, ids::SensorId};
use uuid::Uuid;

use crate::{
    auth::BearerAuth,
    error::{ApiError, ApiResult},
    state::AppState,
};

/// 404 unless the caller may see client `id`.
pub(crate) fn check_client(auth: &BearerAuth, id: Uuid) -> ApiResult<()> {
    if auth.0.sees_client(id) {
        Ok(())
    } else {
        Err(ApiError::not_found("client"))
    }
}

/// A sensor the caller may see, or 404.
pub(crate) async fn visible_sensor(
    state: &AppState,
    auth: &BearerAuth,
    id: Uuid,
) -> ApiResult<SensorEntry> {
    state
        .directory
        .get(SensorId(id))
        .await?
        .filter(|e| auth.0.sees_client(e.client_id.0))
        .ok_or_else(|| ApiError::not_found("sensor"))
}
