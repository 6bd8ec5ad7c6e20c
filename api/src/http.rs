//! Middleware for every request: body size limit and request metrics.

use std::time::Instant;

use poem::{
    http::{header, Method},
    Body, Endpoint, IntoResponse, Request, Response, Result,
};
use poem_openapi::OperationId;

use crate::{error::ApiError, state::AppState};

/// Refuses bodies over the configured limit with 413, whether or not the client sent a
/// `Content-Length` (chunked bodies are read up to the limit, never beyond).
pub async fn limit_body<E: Endpoint>(next: E, mut req: Request) -> Result<Response> {
    let max = req
        .data::<AppState>()
        .expect("AppState is attached to every route")
        .max_body_bytes;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(len) if len > max as u64 => return Err(ApiError::payload_too_large(max).into()),
        Some(_) => {}
        None if req.method() == Method::GET || req.method() == Method::HEAD => {}
        None => {
            let body = req.take_body();
            let bytes = body
                .into_bytes_limit(max)
                .await
                .map_err(|_| ApiError::payload_too_large(max))?;
            req.set_body(Body::from_bytes(bytes));
        }
    }
    Ok(next.call(req).await?.into_response())
}

/// Counts requests and their latency per OpenAPI operation and status.
pub async fn record_metrics<E: Endpoint>(next: E, req: Request) -> Result<Response> {
    let started = Instant::now();
    let result = next.call(req).await.map(IntoResponse::into_response);
    let (operation, status) = match &result {
        Ok(resp) => (
            resp.data::<OperationId>().map_or("other", |op| op.0),
            resp.status(),
        ),
        Err(err) => (
            err.data::<OperationId>().map_or("other", |op| op.0),
            err.status(),
        ),
    };
    metrics::counter!("http_requests_total", "operation" => operation, "status" => status.as_str().to_owned())
        .increment(1);
    metrics::histogram!("http_request_duration_seconds", "operation" => operation)
        .record(started.elapsed().as_secs_f64());
    result
}
