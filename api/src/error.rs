//! The API's one error type and the one place that turns any failure into a JSON body
//! `{"code","message"}` with the matching status.
//!
//! Handlers return [`ApiError`]; everything else that can fail before a handler runs
//! (routing, payload parsing, authentication, body limits, panics) reaches
//! [`into_json_error`], so no client ever sees a plain-text or HTML error.

use poem::{http::StatusCode, web::Json as PoemJson, IntoResponse, Response};
use poem_openapi::{
    error::{ParseParamError, ParsePathError},
    payload::Json,
    registry::{MetaMediaType, MetaResponse, MetaResponses, Registry},
    types::Type,
    ApiResponse, Object,
};
use serde::Serialize;

/// The body of every error response.
#[derive(Debug, Clone, Object, Serialize)]
pub struct ErrorBody {
    /// Stable, machine-readable code (`not_found`, `validation_failed`, ...).
    pub code: String,
    /// What went wrong, for people.
    pub message: String,
    /// The request field at fault, when one is.
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// Machine-readable details, where an error has them (the refused readings of an
    /// ingest request).
    #[oai(skip_serializing_if_is_none)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<serde_json::Value>,
}

/// An error answered to the client.
#[derive(Debug, Clone)]
pub struct ApiError {
    status: StatusCode,
    // Boxed: results carrying it stay small on the happy path.
    body: Box<ErrorBody>,
}

/// Result of a handler.
pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    /// An error with any status and code.
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            body: Box::new(ErrorBody {
                code: code.to_owned(),
                message: message.into(),
                field: None,
                details: None,
            }),
        }
    }

    /// Names the request field at fault.
    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.body.field = Some(field.into());
        self
    }

    /// Adds machine-readable details.
    pub fn with_details(mut self, details: serde_json::Value) -> Self {
        self.body.details = Some(details);
        self
    }

    /// 400: the request cannot be understood.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// 422: the request is well-formed but a field's value is not acceptable.
    pub fn validation(field: &str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            message,
        )
        .with_field(field)
    }

    /// 401: no valid credentials.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    /// 403: authenticated, but the role does not allow this.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// 404: the resource does not exist, or belongs to a tenant the caller cannot see.
    pub fn not_found(what: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} not found"),
        )
    }

    /// 409: the request conflicts with what is stored.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }

    /// 413: the body is larger than the server accepts.
    pub fn payload_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("request body larger than {limit} bytes"),
        )
    }

    /// 503: a store cannot be reached; retrying later can help.
    pub fn unavailable(what: &str) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "storage_unavailable",
            format!("{what} is unavailable, retry later"),
        )
    }

    /// 500: a bug. The cause is logged here and never shown to the client.
    pub fn internal(cause: &(dyn std::error::Error + 'static)) -> Self {
        tracing::error!(error = %ErrorChain(cause), "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal server error",
        )
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The stable code.
    pub fn code(&self) -> &str {
        &self.body.code
    }

    /// The human message.
    pub fn message(&self) -> &str {
        &self.body.message
    }

    /// The JSON body.
    pub fn body(&self) -> &ErrorBody {
        &self.body
    }
}

/// Displays an error with its whole chain of causes.
struct ErrorChain<'a>(&'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(err: sqlx::Error) -> Self {
        use termopar_core::db;
        if db::is_unavailable(&err) {
            tracing::warn!(error = %err, "PostgreSQL unavailable");
            return Self::unavailable("PostgreSQL");
        }
        match db::sqlstate(&err).as_deref() {
            Some("23505") => Self::conflict(unique_message(db::constraint(&err))),
            Some("23503") => Self::conflict("the resource is still referenced by others"),
            Some("23514") | Some("22001") => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "validation_failed",
                "a value is out of the accepted range",
            ),
            _ => Self::internal(&err),
        }
    }
}

impl From<std::sync::Arc<sqlx::Error>> for ApiError {
    fn from(err: std::sync::Arc<sqlx::Error>) -> Self {
        termopar_core::db::shared_error(&err).into()
    }
}

impl From<termopar_core::store::StoreError> for ApiError {
    fn from(err: termopar_core::store::StoreError) -> Self {
        use termopar_core::store::StoreError;
        match err {
            StoreError::Postgres(e) => e.into(),
            StoreError::Mongo(e) => e.into(),
            e @ StoreError::Corrupt(_) => Self::internal(&e),
        }
    }
}

impl From<mongodb::error::Error> for ApiError {
    fn from(err: mongodb::error::Error) -> Self {
        if termopar_core::mongo::is_unavailable(&err) {
            tracing::warn!(error = %err, "MongoDB unavailable");
            Self::unavailable("MongoDB")
        } else {
            Self::internal(&err)
        }
    }
}

/// A readable message for a unique violation, by constraint name.
fn unique_message(constraint: Option<&str>) -> String {
    match constraint {
        Some("users_email_key") => "a user with this email already exists".into(),
        Some("clients_name_key") => "a client with this name already exists".into(),
        Some("sensors_client_name_key") => "this client already has a sensor with this name".into(),
        Some(other) => format!("already exists ({other})"),
        None => "already exists".into(),
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        PoemJson(*self.body)
            .with_status(self.status)
            .into_response()
    }
}

impl From<ApiError> for poem::Error {
    fn from(err: ApiError) -> Self {
        let message = err.body.message.clone();
        let mut e = poem::Error::from_response(err.into_response());
        e.set_error_message(message);
        e
    }
}

/// The statuses an operation can answer with besides its successes. Every operation
/// documents all of them: they are the same error shape, and clients handle them alike.
const DOCUMENTED: &[(u16, &str)] = &[
    (
        400,
        "The request is malformed: bad JSON, a bad UUID or parameter.",
    ),
    (401, "Missing, expired or invalid credentials."),
    (403, "The caller's role does not allow this operation."),
    (404, "Not found, or not visible to the caller's tenant."),
    (
        409,
        "Conflicts with stored state (duplicate, still referenced).",
    ),
    (413, "The request body is too large."),
    (415, "The request body is not JSON."),
    (422, "A field has an unacceptable value; `field` names it."),
    (503, "A store is unavailable; retry later."),
];

impl ApiResponse for ApiError {
    fn meta() -> MetaResponses {
        MetaResponses {
            responses: DOCUMENTED
                .iter()
                .map(|&(status, description)| MetaResponse {
                    description,
                    status: Some(status),
                    status_range: None,
                    content: vec![MetaMediaType {
                        content_type: "application/json; charset=utf-8",
                        schema: <Json<ErrorBody> as poem_openapi::payload::Payload>::schema_ref(),
                    }],
                    headers: vec![],
                })
                .collect(),
        }
    }

    fn register(registry: &mut Registry) {
        ErrorBody::register(registry);
    }
}

/// Turns any error that escaped a handler into the JSON error shape. Installed once
/// around the whole route tree.
pub async fn into_json_error(err: poem::Error) -> Response {
    if err.is_from_response() {
        // Already one of ours (an ApiError turned into poem::Error).
        return err.into_response();
    }
    let status = err.status();
    // poem-openapi names path parameters `param0`, `param1`... internally, so for those
    // the field is reported as `path` and the message says what was wrong with it.
    let path_error = err
        .downcast_ref::<ParsePathError>()
        .map(|e| format!("invalid path parameter: {}", e.reason));
    let field = err
        .downcast_ref::<ParseParamError>()
        .map(|e| e.name)
        .or(path_error.as_ref().map(|_| "path"));
    let code = match status {
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::FORBIDDEN => "forbidden",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::LENGTH_REQUIRED => "length_required",
        s if s.is_server_error() => {
            tracing::error!(error = %err, status = %s, "unhandled error");
            return ApiError::new(status, "internal", "internal server error").into_response();
        }
        _ => "error",
    };
    let message = match status {
        StatusCode::UNAUTHORIZED => "missing or invalid bearer token".to_owned(),
        StatusCode::NOT_FOUND if field.is_none() => "no such route".to_owned(),
        StatusCode::METHOD_NOT_ALLOWED => "method not allowed on this route".to_owned(),
        _ => path_error.unwrap_or_else(|| err.to_string()),
    };
    let mut api_err = ApiError::new(status, code, message);
    if let Some(field) = field {
        api_err = api_err.with_field(field);
    }
    api_err.into_response()
}

/// A panic in a handler: logged, answered as an opaque 500 in the usual shape.
pub fn panic_response(_panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("handler panicked");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "internal server error",
    )
    .into_response()
}
