//! The web console, served by the API under `/ui`: session login, admin pages, live
//! sensors and charts.
//!
//! The console has no data access of its own. Its pages are shells rendered on the
//! server (askama) whose scripts call the public API (`/api/v1/...`) with the session
//! cookie, which [`Console::bridge`] turns into the same bearer token a client would
//! send; the page guards ask the API in-process too. So a console user can see and
//! change exactly what the same user could through the API, with the API's validation
//! messages, and nothing else.

mod assets;
mod pages;
pub mod session;
pub mod settings;

use std::sync::{Arc, OnceLock, Weak};

use poem::{
    endpoint::BoxEndpoint,
    http::{header, Method, StatusCode},
    Body, Endpoint, IntoResponse, Request, Response,
};
use serde_json::Value;
use sqlx::PgPool;
use subtle::ConstantTimeEq;
use termopar_web::{
    error::{ApiError, ApiResult},
    tokens::{Jwt, TokenType},
};
use uuid::Uuid;

pub use session::{Session, Sessions};
pub use settings::ConsoleSettings;

/// The public API's path prefix, which the console's pages and guards call.
pub const API: &str = "/api/v1";

/// The header the console's scripts put on their background polling, so that a page left
/// open does not keep its session from idling out.
pub const POLL_HEADER: &str = "x-console-poll";

/// The header carrying a session's CSRF token on state-changing requests.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// The web console. Cheap to clone.
#[derive(Clone)]
pub struct Console {
    sessions: Sessions,
    jwt: Jwt,
    settings: Arc<ConsoleSettings>,
    /// The whole application, for the console's in-process API calls; set once the
    /// application is built (weak: the application owns the console).
    app: Arc<OnceLock<Weak<BoxEndpoint<'static>>>>,
}

/// An answer of an in-process API call.
pub(crate) struct Answer {
    pub status: StatusCode,
    pub body: Value,
}

impl Console {
    /// The console over `pg` (sessions), minting access tokens with `jwt`.
    pub fn new(settings: ConsoleSettings, pg: PgPool, jwt: Jwt) -> Self {
        Self {
            sessions: Sessions::new(pg, &settings),
            jwt,
            settings: Arc::new(settings),
            app: Arc::new(OnceLock::new()),
        }
    }

    /// Gives the console the application it is part of (call once, after building it).
    pub fn attach(&self, app: &Arc<BoxEndpoint<'static>>) {
        let _ = self.app.set(Arc::downgrade(app));
    }

    /// The console's routes, to nest under `/ui`.
    pub fn routes(&self) -> BoxEndpoint<'static> {
        pages::routes(self.clone())
    }

    /// A short-lived access token for a session's user, as `POST /auth/login` would give.
    fn token(&self, session: &Session) -> String {
        self.jwt.issue(
            TokenType::Access,
            session.user_id,
            session.token_version,
            Uuid::new_v4(),
        )
    }

    /// Middleware for the whole application: a request without `Authorization` that
    /// carries a live session cookie is authenticated as the session's user, and if it
    /// may change something (any method but GET, HEAD, OPTIONS) it must carry the
    /// session's CSRF token in `X-CSRF-Token` and, when the browser says where it comes
    /// from, come from this origin.
    /// The console's own pages (`/ui/...`) check their forms themselves.
    pub async fn bridge<E: Endpoint>(&self, next: E, mut req: Request) -> poem::Result<Response> {
        if req.headers().contains_key(header::AUTHORIZATION) || req.uri().path().starts_with("/ui/")
        {
            return next.call(req).await.map(IntoResponse::into_response);
        }
        let Some(secret) = session::secret_of(&req) else {
            return next.call(req).await.map(IntoResponse::into_response);
        };
        let activity = !req.headers().contains_key(POLL_HEADER);
        if let Some(session) = self.sessions.find(&secret, activity).await? {
            if !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
                check_csrf(&req, &session)?;
            }
            let bearer = format!("Bearer {}", self.token(&session));
            if let Ok(value) = bearer.parse() {
                req.headers_mut().insert(header::AUTHORIZATION, value);
            }
        }
        next.call(req).await.map(IntoResponse::into_response)
    }

    /// Calls the application in-process, as `token`'s user (or anonymously).
    pub(crate) async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> ApiResult<Answer> {
        let app = self
            .app
            .get()
            .and_then(Weak::upgrade)
            .ok_or_else(|| internal("the console is not attached to an application"))?;
        let mut req = Request::builder()
            .method(method)
            .uri(
                path.parse()
                    .map_err(|_| ApiError::bad_request("bad path"))?,
            )
            .header(header::ACCEPT, "application/json");
        if let Some(token) = token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let req = match body {
            Some(body) => req
                .content_type("application/json")
                .body(Body::from_json(body).map_err(internal)?),
            None => req.finish(),
        };
        let resp = app.get_response(req).await;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .into_bytes()
            .await
            .map_err(|e| internal(format!("reading an in-process answer: {e}")))?;
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok(Answer { status, body })
    }
}

/// A 500 for a bug of the console's own, logged once.
pub(crate) fn internal(cause: impl std::fmt::Display) -> ApiError {
    let error = anyhow::anyhow!("{cause}");
    ApiError::internal(&*error)
}

/// 403 unless a cookie-authenticated change carries its session's CSRF token and, when the
/// browser names it, comes from a page of this origin.
fn check_csrf(req: &Request, session: &Session) -> ApiResult<()> {
    let given = req
        .headers()
        .get(CSRF_HEADER)
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    if !bool::from(given.ct_eq(session.csrf.as_bytes())) {
        metrics::counter!("console_csrf_rejected_total").increment(1);
        return Err(ApiError::forbidden(
            "missing or wrong CSRF token: reload the page",
        ));
    }
    if !same_origin(req) {
        metrics::counter!("console_csrf_rejected_total").increment(1);
        return Err(ApiError::forbidden("cross-origin request refused"));
    }
    Ok(())
}

/// False when the request's `Origin` names another host than the one it was sent to.
pub(crate) fn same_origin(req: &Request) -> bool {
    let Some(origin) = req
        .headers()
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
    else {
        return true;
    };
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()));
    match (url::Url::parse(origin), host) {
        (Ok(origin), Some(host)) => {
            let origin_host = match origin.port() {
                Some(port) => format!("{}:{port}", origin.host_str().unwrap_or_default()),
                None => origin.host_str().unwrap_or_default().to_owned(),
            };
            origin_host.eq_ignore_ascii_case(host)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_of_other_hosts_are_not_same_origin() {
        let req = |origin: Option<&str>| {
            let mut b = Request::builder().header(header::HOST, "console.example:8080");
            if let Some(o) = origin {
                b = b.header(header::ORIGIN, o);
            }
            b.finish()
        };
        assert!(same_origin(&req(None)));
        assert!(same_origin(&req(Some("http://console.example:8080"))));
        assert!(same_origin(&req(Some("https://CONSOLE.example:8080"))));
        assert!(!same_origin(&req(Some("http://evil.example:8080"))));
        assert!(!same_origin(&req(Some("http://console.example"))));
        assert!(!same_origin(&req(Some("null"))));
    }
}
