//! Building the application from settings and serving it.

use std::{future::Future, net::SocketAddr, sync::Arc};

use anyhow::Context;
use mongodb::Database;
use poem::{
    endpoint::BoxEndpoint,
    get,
    listener::TcpAcceptor,
    middleware::{AddData, CatchPanic, NormalizePath, TrailingSlash},
    EndpointExt, Route, Server,
};
use poem_openapi::OpenApiService;
use sqlx::PgPool;

use crate::{
    auth::AuthApi,
    clients::ClientsApi,
    conversations::ConversationsApi,
    daily::DailyApi,
    dead_letters::DeadLettersApi,
    error::{into_json_error, panic_response},
    health,
    http::{limit_body, record_metrics},
    readings::ReadingsApi,
    sensors::SensorsApi,
    settings::Settings,
    state::AppState,
    ui,
    users::UsersApi,
};

/// Path prefix of the versioned API.
pub const API_PREFIX: &str = "/api/v1";

/// The OpenAPI service of everything under `/api/v1`.
fn openapi() -> OpenApiService<impl poem_openapi::OpenApi, ()> {
    OpenApiService::new(
        (
            AuthApi,
            UsersApi,
            ClientsApi,
            SensorsApi,
            ReadingsApi,
            DailyApi,
            DeadLettersApi,
            ConversationsApi,
        ),
        "termopar",
        env!("CARGO_PKG_VERSION"),
    )
    .description(
        "IoT temperature platform: sensors publish over MQTT, this API serves their \
         metadata and readings. Every error is `{\"code\",\"message\"}`.",
    )
    .server(API_PREFIX)
}

/// The OpenAPI document as JSON (what `/openapi.json` serves).
pub fn openapi_json() -> String {
    openapi().spec()
}

/// Every route of the API, with its middleware.
pub fn routes(state: AppState) -> BoxEndpoint<'static> {
    let spec = openapi();
    let (spec_json, swagger, redoc) = (spec.spec_endpoint(), spec.swagger_ui(), spec.redoc());
    let api = Arc::new(spec.boxed());
    Route::new()
        .at("/openapi.json", spec_json)
        .nest("/docs", swagger)
        .nest("/redoc", redoc)
        .at("/health", get(health::health))
        .at("/ready", get(health::ready))
        .at("/metrics", get(health::metrics))
        .at("/ui/conversations", get(ui::conversations))
        // The chat system's own paths (seed 001): the same operations as under /api/v1.
        .at("/webhook", api.clone())
        .at("/conversations", api.clone())
        .at("/conversations/:id", api.clone())
        .nest(API_PREFIX, api)
        // `/webhook/` and `/webhook` alike, everywhere.
        .with(NormalizePath::new(TrailingSlash::Trim))
        .around(limit_body)
        .with(AddData::new(state))
        .with(CatchPanic::new().with_handler(panic_response))
        .around(record_metrics)
        .catch_all_error(into_json_error)
        .boxed()
}

/// A built API, bound to its address but not yet serving.
pub struct Application {
    listener: std::net::TcpListener,
    addr: SocketAddr,
    state: AppState,
}

impl Application {
    /// Connects to the stores (creating the database and applying migrations), ensures
    /// the bootstrap admin, and binds the listener.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let pg = termopar_core::db::connect_and_migrate(&settings.database).await?;
        let mongo = termopar_core::mongo::connect(&settings.mongo).await?;
        Self::prepare(&settings, pg, mongo).await
    }

    /// Over stores already connected and migrated: moves readings stored by the
    /// previous version into the current shape (before HTTP ingest can store any),
    /// ensures the bootstrap admin, and binds the listener.
    pub async fn prepare(settings: &Settings, pg: PgPool, mongo: Database) -> anyhow::Result<Self> {
        if let Some(admin) = &settings.bootstrap_admin {
            crate::bootstrap::ensure_admin(&pg, admin).await?;
        }
        let app = Self::with_stores(settings, pg, mongo)?;
        app.state
            .store
            .prepare()
            .await
            .context("failed to move readings of the previous version")?;
        Ok(app)
    }

    /// Binds the listener over stores the caller already holds (which may be down: the
    /// API then answers 503 until they come back).
    pub fn with_stores(settings: &Settings, pg: PgPool, mongo: Database) -> anyhow::Result<Self> {
        // Install the recorder before the first request records anything.
        termopar_core::metrics::prometheus();
        let listener = std::net::TcpListener::bind(settings.addr)
            .with_context(|| format!("failed to bind {}", settings.addr))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        if settings.uses_dev_jwt_secret() {
            tracing::warn!(
                "JWT_SECRET is not set: tokens are signed with the public development \
                 secret. Anyone can forge them. Set JWT_SECRET before exposing this API."
            );
        }
        Ok(Self {
            listener,
            addr,
            state: AppState::new(settings, pg, mongo),
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The shared state.
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` resolves, then finishes in-flight requests.
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
        let acceptor = TcpAcceptor::from_std(self.listener)?;
        let listener = tokio::spawn(self.state.daily.clone().listen(self.state.pg.clone()));
        Server::new_with_acceptor(acceptor)
            .run_with_graceful_shutdown(routes(self.state), shutdown, None)
            .await
            .context("HTTP server failed")?;
        listener.abort();
        Ok(())
    }
}
