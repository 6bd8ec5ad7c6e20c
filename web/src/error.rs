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

/// Every error code the API answers, with its status, stated once. The strings are the
/// contract: clients match on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// 400: the request cannot be understood.
    BadRequest,
    /// 401: no valid credentials.
    Unauthorized,
    /// 401: a webhook body without a valid signature.
    InvalidSignature,
    /// 403: authenticated, but the role does not allow this.
    Forbidden,
    /// 403: a tracking hit from a page whose origin its site does not allow.
    OriginNotAllowed,
    /// 404: no such resource, or not visible to the caller's tenant.
    NotFound,
    /// 404: a chat message or close before its conversation exists (retry later).
    ConversationNotFound,
    /// 405: the route exists, the method does not.
    MethodNotAllowed,
    /// 409: conflicts with what is stored.
    Conflict,
    /// 409: a message for a closed conversation.
    ConversationClosed,
    /// 411: a body without a length where one is required.
    LengthRequired,
    /// 413: the body is larger than the server accepts.
    PayloadTooLarge,
    /// 415: the body is not of an accepted media type.
    UnsupportedMediaType,
    /// 422: a field's value is not acceptable.
    ValidationFailed,
    /// 422: an HTTP ingest where no reading was accepted.
    Rejected,
    /// 422: a webhook event of a type this API does not know.
    UnknownEventType,
    /// 422: a tracking hit for a site that does not exist.
    UnknownSite,
    /// 429: too many requests for one key (a tracked site); retry later.
    RateLimited,
    /// 500: a bug; logged where it happens, never explained to the client.
    Internal,
    /// 503: a store cannot be reached; retrying later can help.
    StorageUnavailable,
    /// Any other status poem answers before a handler runs (its status is kept).
    Other,
}

impl ErrorCode {
    /// The code as clients see it.
    pub fn as_str(self) -> &'static str {
        self.describe().0
    }

    /// The status every error of this code is answered with.
    pub fn status(self) -> StatusCode {
        self.describe().1
    }

    fn describe(self) -> (&'static str, StatusCode) {
        use ErrorCode::*;
        match self {
            BadRequest => ("bad_request", StatusCode::BAD_REQUEST),
            Unauthorized => ("unauthorized", StatusCode::UNAUTHORIZED),
            InvalidSignature => ("invalid_signature", StatusCode::UNAUTHORIZED),
            Forbidden => ("forbidden", StatusCode::FORBIDDEN),
            OriginNotAllowed => ("origin_not_allowed", StatusCode::FORBIDDEN),
            NotFound => ("not_found", StatusCode::NOT_FOUND),
            ConversationNotFound => ("conversation_not_found", StatusCode::NOT_FOUND),
            MethodNotAllowed => ("method_not_allowed", StatusCode::METHOD_NOT_ALLOWED),
            Conflict => ("conflict", StatusCode::CONFLICT),
            ConversationClosed => ("conversation_closed", StatusCode::CONFLICT),
            LengthRequired => ("length_required", StatusCode::LENGTH_REQUIRED),
            PayloadTooLarge => ("payload_too_large", StatusCode::PAYLOAD_TOO_LARGE),
            UnsupportedMediaType => ("unsupported_media_type", StatusCode::UNSUPPORTED_MEDIA_TYPE),
            ValidationFailed => ("validation_failed", StatusCode::UNPROCESSABLE_ENTITY),
            Rejected => ("rejected", StatusCode::UNPROCESSABLE_ENTITY),
            UnknownEventType => ("unknown_event_type", StatusCode::UNPROCESSABLE_ENTITY),
            UnknownSite => ("unknown_site", StatusCode::UNPROCESSABLE_ENTITY),
            RateLimited => ("rate_limited", StatusCode::TOO_MANY_REQUESTS),
            Internal => ("internal", StatusCode::INTERNAL_SERVER_ERROR),
            StorageUnavailable => ("storage_unavailable", StatusCode::SERVICE_UNAVAILABLE),
            Other => ("error", StatusCode::BAD_REQUEST),
        }
    }

    /// The code poem's own refusals (before a handler runs) get, by status.
    fn of_status(status: StatusCode) -> Self {
        match status {
            StatusCode::BAD_REQUEST => ErrorCode::BadRequest,
            StatusCode::UNAUTHORIZED => ErrorCode::Unauthorized,
            StatusCode::FORBIDDEN => ErrorCode::Forbidden,
            StatusCode::NOT_FOUND => ErrorCode::NotFound,
            StatusCode::METHOD_NOT_ALLOWED => ErrorCode::MethodNotAllowed,
            StatusCode::PAYLOAD_TOO_LARGE => ErrorCode::PayloadTooLarge,
            StatusCode::UNSUPPORTED_MEDIA_TYPE => ErrorCode::UnsupportedMediaType,
            StatusCode::LENGTH_REQUIRED => ErrorCode::LengthRequired,
            s if s.is_server_error() => ErrorCode::Internal,
            _ => ErrorCode::Other,
        }
    }
}

/// An error answered to the client.
#[derive(Debug, Clone)]
pub struct ApiError {
    status: StatusCode,
    code: ErrorCode,
    // Boxed: results carrying it stay small on the happy path.
    body: Box<ErrorBody>,
}

/// Result of a handler.
pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    /// An error of `code`, answered with that code's status.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::with_status(code, code.status(), message)
    }

    fn with_status(code: ErrorCode, status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            body: Box::new(ErrorBody {
                code: code.as_str().to_owned(),
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
        Self::new(ErrorCode::BadRequest, message)
    }

    /// 422: the request is well-formed but a field's value is not acceptable.
    pub fn validation(field: &str, message: impl Into<String>) -> Self {
        Self::new(ErrorCode::ValidationFailed, message).with_field(field)
    }

    /// 401: no valid credentials.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unauthorized, message)
    }

    /// 403: authenticated, but the role does not allow this.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Forbidden, message)
    }

    /// 404: the resource does not exist, or belongs to a tenant the caller cannot see.
    pub fn not_found(what: &str) -> Self {
        Self::new(ErrorCode::NotFound, format!("{what} not found"))
    }

    /// 409: the request conflicts with what is stored.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Conflict, message)
    }

    /// 413: the body is larger than the server accepts.
    pub fn payload_too_large(limit: usize) -> Self {
        Self::new(
            ErrorCode::PayloadTooLarge,
            format!("request body larger than {limit} bytes"),
        )
    }

    /// 503: a store cannot be reached; retrying later can help.
    pub fn unavailable(what: &str) -> Self {
        Self::new(
            ErrorCode::StorageUnavailable,
            format!("{what} is unavailable, retry later"),
        )
    }

    /// 500: a bug. The cause is logged here, once, inside the request's span (so the
    /// line carries its request id), and never shown to the client.
    pub fn internal(cause: &(dyn std::error::Error + 'static)) -> Self {
        tracing::error!(error = %ErrorChain(cause), "internal error");
        Self::new(ErrorCode::Internal, "internal server error")
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The stable code.
    pub fn code(&self) -> ErrorCode {
        self.code
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
                ErrorCode::ValidationFailed,
                "a value is out of the accepted range",
            ),
            // A NUL character in text: PostgreSQL cannot store or compare one.
            Some("22021") => Self::new(
                ErrorCode::ValidationFailed,
                "text must not contain a NUL character",
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
    let code = ErrorCode::of_status(status);
    if code == ErrorCode::Internal {
        tracing::error!(error = %err, status = %status, "unhandled error");
        return ApiError::with_status(code, status, "internal server error").into_response();
    }
    let message = match status {
        StatusCode::UNAUTHORIZED => "missing or invalid bearer token".to_owned(),
        StatusCode::NOT_FOUND if field.is_none() => "no such route".to_owned(),
        StatusCode::METHOD_NOT_ALLOWED => "method not allowed on this route".to_owned(),
        _ => path_error.unwrap_or_else(|| err.to_string()),
    };
    let mut api_err = ApiError::with_status(code, status, message);
    if let Some(field) = field {
        api_err = api_err.with_field(field);
    }
    api_err.into_response()
}

/// A panic in a handler: logged, answered as an opaque 500 in the usual shape.
pub fn panic_response(_panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("handler panicked");
    ApiError::new(ErrorCode::Internal, "internal server error").into_response()
}
