//! Middleware for every request: request ids, body size limit and request metrics.

use std::time::Instant;

use poem::{
    http::{header, HeaderValue, Method},
    Body, Endpoint, IntoResponse, Request, Response, Result,
};
use poem_openapi::OperationId;
use tracing::Instrument;

use crate::error::ApiError;

/// The header a request id travels in, both ways.
pub const REQUEST_ID: &str = "x-request-id";

/// The request's id: the caller's `X-Request-Id` when it is a sensible one (1 to 128
/// visible ASCII characters), else a new UUID v7.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// Gives every request an id and a span carrying it, so that every log line written
/// while serving it (internal errors included) names it; answers with the id in
/// `X-Request-Id`. Handlers find it as request data ([`RequestId`]); the request's own
/// headers stay as sent (the chat webhook's raw log keeps what the sender sent).
pub async fn request_id<E: Endpoint>(next: E, mut req: Request) -> Result<Response> {
    let id = req
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| (1..=128).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    let value = HeaderValue::from_str(&id).expect("checked: visible ASCII");
    let span = tracing::info_span!(
        "request",
        request_id = %id,
        method = %req.method(),
        path = %req.uri().path(),
    );
    req.set_data(RequestId(id));
    let mut resp = next.call(req).instrument(span).await?.into_response();
    resp.headers_mut().insert(REQUEST_ID, value);
    Ok(resp)
}

/// Refuses bodies over `max` bytes with 413, whether or not the client sent a
/// `Content-Length` (chunked bodies are read up to the limit, never beyond).
pub async fn limit_body<E: Endpoint>(next: E, mut req: Request, max: usize) -> Result<Response> {
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
