//! Building the application from settings and serving it.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

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
use termopar_alarms::{AlarmRulesApi, AlarmsApi};
use termopar_chat::{Chat, ChatApi};
use termopar_console::Console;
use termopar_core::tasks::Tasks;
use termopar_leads::{
    jobs::{Wakeups, QUEUES},
    CrmCustomersApi, CrmLeadsApi, JobsApi, Leads, MarketingLeadsApi, WebsiteCustomersApi,
    WebsiteLeadsApi,
};
use termopar_tracking::{AccessesApi, SitesApi, TrackApi, Tracking};
use termopar_web::{
    error::{into_json_error, panic_response},
    http::{limit_body, record_metrics, request_id},
};

use crate::{
    auth::AuthApi, clients::ClientsApi, daily::DailyApi, daily::DailyCache,
    dead_letters::DeadLettersApi, health, readings::ReadingsApi, sensors::SensorsApi,
    settings::Settings, state::AppState, users::UsersApi,
};

/// Longest the background tasks get at shutdown to drain what they hold, after the
/// last request was answered.
const DRAIN_GRACE: Duration = Duration::from_secs(30);

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
            ChatApi,
            SitesApi,
            TrackApi,
            AccessesApi,
            (AlarmRulesApi, AlarmsApi),
            (
                WebsiteLeadsApi,
                WebsiteCustomersApi,
                MarketingLeadsApi,
                CrmLeadsApi,
                CrmCustomersApi,
                JobsApi,
            ),
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

/// The OpenAPI document as JSON (what `/openapi.json` serves): poem-openapi's, with
/// optional properties nullable and the handlers' own checks as constraints.
pub fn openapi_json() -> String {
    let constraints = [
        crate::clients::CONSTRAINTS,
        crate::sensors::CONSTRAINTS,
        crate::users::CONSTRAINTS,
        termopar_tracking::CONSTRAINTS,
        termopar_alarms::CONSTRAINTS,
    ]
    .concat();
    termopar_web::openapi::refine(&openapi().spec(), &constraints)
}

/// What the routes serve: the API's own state and each product's.
#[derive(Clone)]
pub struct Handles {
    /// The API's own resources.
    pub state: AppState,
    /// The chat webhook product.
    pub chat: Chat,
    /// The web tracking product.
    pub tracking: Tracking,
    /// The lead pipeline.
    pub leads: Leads,
    /// Finished days of daily averages.
    pub daily: DailyCache,
    /// The web console.
    pub console: Console,
    max_body_bytes: usize,
}

/// Every route of the API, with its middleware.
fn routes(handles: Handles) -> BoxEndpoint<'static> {
    let spec = openapi();
    let (swagger, redoc) = (spec.swagger_ui(), spec.redoc());
    let api = Arc::new(spec.boxed());
    let document = openapi_json();
    let spec_json = poem::endpoint::make_sync(move |_| {
        poem::IntoResponse::with_content_type(document.clone(), "application/json; charset=utf-8")
    });
    let max_body = handles.max_body_bytes;
    let console = handles.console.clone();
    let handles_console = handles.console.clone();
    let app = Route::new()
        .at("/openapi.json", spec_json)
        .nest("/docs", swagger)
        .nest("/redoc", redoc)
        .at("/health", get(health::health))
        .at("/ready", get(health::ready))
        .at("/metrics", get(health::metrics))
        .at("/ui/conversations", get(termopar_chat::page()))
        .at("/ui/jobs", get(termopar_leads::page()))
        .nest("/ui", handles.console.routes())
        .at("/t.js", get(termopar_tracking::script()))
        // The chat system's own paths (seed 001): the same operations as under /api/v1.
        .at("/webhook", api.clone())
        .at("/conversations", api.clone())
        .at("/conversations/:id", api.clone())
        // The pipeline's systems at the seed's paths (seed 003), `costumers` included.
        .at("/leads", api.clone())
        .at("/leads/:id", api.clone())
        .at("/customers", api.clone())
        .at("/customers/:id", api.clone())
        .at("/costumers", costumers(api.clone()))
        .at("/costumers/:id", costumers(api.clone()))
        .at("/marketing/leads", api.clone())
        .at("/marketing/leads/:id", api.clone())
        .at("/crm/leads", api.clone())
        .at("/crm/leads/:id", api.clone())
        .at("/crm/customers", api.clone())
        .at("/crm/customers/:id", api.clone())
        .at("/crm/costumers", costumers(api.clone()))
        .at("/crm/costumers/:id", costumers(api.clone()))
        .nest(
            API_PREFIX,
            Route::new()
                .at("/costumers", costumers(api.clone()))
                .at("/costumers/:id", costumers(api.clone()))
                .at("/crm/costumers", costumers(api.clone()))
                .at("/crm/costumers/:id", costumers(api.clone()))
                .nest("/", api),
        )
        // `/webhook/` and `/webhook` alike, everywhere.
        .with(NormalizePath::new(TrailingSlash::Trim))
        .around(move |next, req| limit_body(next, req, max_body))
        .with(AddData::new(handles.state.auth.clone()))
        .with(AddData::new(handles.state.alarms.clone()))
        .with(AddData::new(handles.state))
        .with(AddData::new(handles.chat))
        .with(AddData::new(handles.tracking))
        .with(AddData::new(handles.leads))
        .with(AddData::new(handles.daily))
        .around(move |next, req| {
            let console = console.clone();
            async move { console.bridge(next, req).await }
        })
        .with(CatchPanic::new().with_handler(panic_response))
        .around(record_metrics)
        .catch_all_error(into_json_error)
        .around(request_id)
        .boxed();
    // The console's page guards call the application in-process.
    let app = Arc::new(app);
    handles_console.attach(&app);
    app.boxed()
}

/// Runs the lead pipeline's job workers alone until `shutdown`, then lets them finish
/// the jobs they hold (up to the drain grace; a job cut short runs again elsewhere).
pub async fn run_workers(
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let pg = termopar_core::db::connect_and_migrate(&settings.database).await?;
    termopar_leads::migrate(&pg)
        .await
        .context("failed to create the job queue's tables")?;
    let tasks = Tasks::new();
    let jwt = termopar_web::tokens::Jwt::new(&settings.auth);
    let api_url = format!("http://{}", settings.addr);
    let wakeups = Wakeups::start(&tasks, &pg, &QUEUES);
    termopar_leads::run_workers(&settings.leads, &pg, jwt, &api_url, &tasks, &wakeups)?;
    termopar_alarms::notify::start_workers(&settings.leads, &pg, &tasks, &wakeups)?;
    tracing::info!("job workers running");
    shutdown.await;
    tasks.shutdown(DRAIN_GRACE).await;
    Ok(())
}

/// The seed's `costumers` paths: the same operations as `customers`.
fn costumers(api: Arc<BoxEndpoint<'static>>) -> impl poem::Endpoint {
    poem::endpoint::make(move |mut req: poem::Request| {
        let api = api.clone();
        async move {
            let path = req.uri().path().replacen("costumers", "customers", 1);
            let query = req
                .uri()
                .query()
                .map(|q| format!("?{q}"))
                .unwrap_or_default();
            if let Ok(uri) = format!("{path}{query}").parse() {
                *req.uri_mut() = uri;
            }
            api.call(req).await
        }
    })
}

/// A built API, bound to its address but not yet serving.
pub struct Application {
    listener: std::net::TcpListener,
    addr: SocketAddr,
    handles: Handles,
    tasks: Tasks,
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
        termopar_leads::migrate(&pg)
            .await
            .context("failed to create the job queue's tables")?;
        let app = Self::with_stores(settings, pg, mongo)?;
        app.handles
            .state
            .store
            .prepare()
            .await
            .context("failed to move readings of the previous version")?;
        Ok(app)
    }

    /// Binds the listener over stores the caller already holds (which may be down: the
    /// API then answers 503 until they come back), and starts the background tasks.
    pub fn with_stores(settings: &Settings, pg: PgPool, mongo: Database) -> anyhow::Result<Self> {
        // Install the recorder before the first request records anything.
        termopar_core::metrics::prometheus();
        let listener = std::net::TcpListener::bind(settings.addr)
            .with_context(|| format!("failed to bind {}", settings.addr))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        if settings.auth.uses_dev_jwt_secret() {
            tracing::warn!(
                "JWT_SECRET is not set: tokens are signed with the public development \
                 secret. Anyone can forge them. Set JWT_SECRET before exposing this API."
            );
        }
        let tasks = Tasks::new();
        let daily = DailyCache::new();
        let listening = (daily.clone(), pg.clone());
        tasks.spawn("daily cache invalidation", move |stop| {
            listening.0.listen(listening.1, stop)
        });
        let chat = Chat::start(&settings.webhook, pg.clone(), &mongo, &tasks);
        let tracking = Tracking::start(&settings.tracking, pg.clone(), &mongo, &tasks);
        let state = AppState::new(settings, pg.clone(), mongo, daily.hook());
        // The clock of no-data alarms runs here (in edge mode, beside the consumer).
        state
            .alarms
            .start_clock(&tasks, termopar_alarms::CLOCK_EVERY);
        let console = Console::new(
            settings.console.clone(),
            pg.clone(),
            state.auth.jwt().clone(),
        );
        // The job system's workers (the lead pipeline's and the alarms' notifications),
        // woken by one listener.
        let wakeups = settings
            .leads
            .workers
            .then(|| Wakeups::start(&tasks, &pg, &QUEUES));
        if let Some(wakeups) = &wakeups {
            termopar_alarms::notify::start_workers(&settings.leads, &pg, &tasks, wakeups)?;
        }
        let leads = Leads::start(
            &settings.leads,
            pg,
            tracking.clone(),
            state.auth.jwt().clone(),
            &format!("http://{addr}"),
            &tasks,
            wakeups.as_ref(),
        )?;
        Ok(Self {
            listener,
            addr,
            handles: Handles {
                state,
                chat,
                tracking,
                leads,
                daily,
                console,
                max_body_bytes: settings.max_body_bytes,
            },
            tasks,
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The API's own state.
    pub fn state(&self) -> &AppState {
        &self.handles.state
    }

    /// What the routes serve (for commands and tests that act as the routes do).
    pub fn handles(&self) -> &Handles {
        &self.handles
    }

    /// Serves until `shutdown` resolves, then finishes in-flight requests, and then stops
    /// the background tasks, each draining what it holds: every delivery answered is
    /// committed, and its raw record relayed.
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
        let Self {
            listener,
            handles,
            tasks,
            ..
        } = self;
        let acceptor = TcpAcceptor::from_std(listener)?;
        let served = Server::new_with_acceptor(acceptor)
            .run_with_graceful_shutdown(routes(handles), shutdown, None)
            .await
            .context("HTTP server failed");
        tasks.shutdown(DRAIN_GRACE).await;
        served
    }

    /// Stops the background tasks without serving (after a one-off command).
    pub async fn stop(self) {
        let Self { handles, tasks, .. } = self;
        drop(handles);
        tasks.shutdown(DRAIN_GRACE).await;
    }
}
