//! Liveness, readiness and metrics: plain endpoints outside `/api/v1`.

use std::time::Duration;

use poem::{handler, http::StatusCode, web::Data, IntoResponse, Response};
use serde_json::json;

use crate::state::AppState;

/// How long a readiness check may take before its store counts as down.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// `GET /health`: the process is alive.
#[handler]
#[tracing::instrument(skip_all)]
pub(crate) async fn health() -> Response {
    poem::web::Json(json!({ "status": "ok" })).into_response()
}

/// `GET /ready`: PostgreSQL and the MongoDB-compatible store answer, and the MQTT
/// broker accepts connections when one is configured. 503 otherwise, with which check
/// failed.
#[handler]
#[tracing::instrument(skip_all)]
pub(crate) async fn ready(state: Data<&AppState>) -> Response {
    let pg = async {
        sqlx::query("SELECT 1")
            .execute(&state.pg)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    let mongo = async {
        termopar_core::mongo::ping(&state.mongo)
            .await
            .map_err(|e| e.to_string())
    };
    let broker = async {
        match &state.ready_broker {
            Some(b) => tokio::net::TcpStream::connect((b.host.as_str(), b.port))
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            None => Ok(()),
        }
    };
    let (pg, mongo, mqtt) =
        tokio::join!(with_timeout(pg), with_timeout(mongo), with_timeout(broker));
    let ok = pg.is_ok() && mongo.is_ok() && mqtt.is_ok();
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let check = |r: Result<(), String>| r.map_or_else(|e| e, |()| "ok".to_owned());
    let mut checks = json!({ "postgres": check(pg), "mongodb": check(mongo) });
    if state.ready_broker.is_some() {
        checks["mqtt"] = check(mqtt).into();
    }
    poem::web::Json(json!({
        "status": if ok { "ready" } else { "unavailable" },
        "checks": checks,
    }))
    .with_status(status)
    .into_response()
}

async fn with_timeout(
    check: impl std::future::Future<Output = Result<(), String>>,
) -> Result<(), String> {
    tokio::time::timeout(CHECK_TIMEOUT, check)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {CHECK_TIMEOUT:?}")))
}

/// `GET /metrics`: Prometheus text exposition.
#[handler]
#[tracing::instrument(skip_all)]
pub(crate) async fn metrics() -> Response {
    Response::builder()
        .content_type("text/plain; version=0.0.4")
        .body(termopar_core::metrics::prometheus().render())
}
