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

/// The client a list is limited to, given the caller and the client it asked for:
/// `Ok(None)` for every client (admins asking for none), `Err(())` when the caller asked
/// for a client it cannot see (the list is then empty, exactly as for an unknown id).
pub(crate) fn list_scope(auth: &BearerAuth, asked: Option<Uuid>) -> Result<Option<Uuid>, ()> {
    match (auth.0.tenant_scope(), asked) {
        (Some(own), Some(asked)) if own != asked => Err(()),
        (Some(own), _) => Ok(Some(own)),
        (None, asked) => Ok(asked),
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
