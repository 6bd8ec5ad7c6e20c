//! The console's pages: shells rendered on the server, guarded by the session and the
//! user's role; their scripts fill them from the public API.

use askama::Template;
use poem::{
    get, handler,
    http::{header, Method, StatusCode},
    middleware::Compression,
    post,
    web::{Data, Form, Path, Query},
    EndpointExt, IntoResponse, Request, Response, Route,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use termopar_web::tokens::TokenType;
use uuid::Uuid;

use crate::{assets, internal, session, Console, Session, API};

/// The console's routes.
pub(crate) fn routes(console: Console) -> poem::endpoint::BoxEndpoint<'static> {
    Route::new()
        .at("/", get(index))
        .at("/login", get(login_page).post(login))
        .at("/logout", post(logout))
        .at("/session", get(session_info))
        .at("/sensors", get(sensors))
        .at("/sensors/:id", get(sensor))
        .at("/sites", get(sites))
        .at("/sites/:id", get(site))
        .at("/alarms", get(alarms))
        .at("/admin/:entity", get(admin))
        .at("/assets/:name", get(assets::serve))
        .with(Compression::new())
        .data(console)
        .boxed()
}

/// The user a page is rendered for, as the API describes them (`GET /auth/me`).
#[derive(Debug, Clone, Deserialize)]
struct Me {
    email: String,
    role: String,
    client_id: Option<Uuid>,
}

/// A logged-in page request: who, and the token the guards call the API with.
struct Visit {
    me: Me,
    token: String,
    csrf: String,
}

impl Visit {
    fn is_admin(&self) -> bool {
        self.me.role == "admin"
    }

    fn manages(&self) -> bool {
        matches!(self.me.role.as_str(), "admin" | "operator")
    }
}

/// One link of the navigation.
struct Nav {
    href: &'static str,
    label: &'static str,
    current: bool,
}

/// What every logged-in page's frame shows.
struct Shell {
    title: String,
    email: String,
    role: String,
    csrf: String,
    nav: Vec<Nav>,
    styles: Vec<String>,
    scripts: Vec<String>,
}

impl Shell {
    fn new(visit: &Visit, title: impl Into<String>, current: &str, charts: bool) -> Self {
        let mut links = vec![
            ("/ui/sensors", "Sensors"),
            ("/ui/alarms", "Alarms"),
            ("/ui/sites", "Sites"),
        ];
        if visit.manages() {
            links.push(("/ui/admin/sensors", "Manage sensors"));
        }
        if visit.is_admin() {
            links.extend([
                ("/ui/admin/clients", "Clients"),
                ("/ui/admin/users", "Users"),
                ("/ui/conversations", "Conversations"),
                ("/ui/jobs", "Jobs"),
            ]);
        }
        let mut styles = vec![assets::url("console.css")];
        let mut scripts = Vec::new();
        if charts {
            styles.push(assets::url("uplot.min.css"));
            scripts.push(assets::url("uplot.min.js"));
            scripts.push(assets::url("charts.js"));
        }
        scripts.push(assets::url("console.js"));
        Self {
            title: title.into(),
            email: visit.me.email.clone(),
            role: visit.me.role.clone(),
            csrf: visit.csrf.clone(),
            nav: links
                .into_iter()
                .map(|(href, label)| Nav {
                    href,
                    label,
                    current: href == current,
                })
                .collect(),
            styles,
            scripts,
        }
    }
}

#[derive(Template)]
#[template(path = "login.html")]
struct LoginPage {
    css: String,
    next: String,
    email: String,
    error: String,
}

#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage {
    shell: Shell,
    status: u16,
    message: String,
}

#[derive(Template)]
#[template(path = "sensors.html")]
struct SensorsPage {
    shell: Shell,
    client_id: String,
    is_admin: bool,
    poll_ms: u128,
    stale_secs: u64,
}

#[derive(Template)]
#[template(path = "alarms.html")]
struct AlarmsPage {
    shell: Shell,
    manages: bool,
}

#[derive(Template)]
#[template(path = "sensor.html")]
struct SensorPage {
    shell: Shell,
    id: Uuid,
    name: String,
    location: String,
    timezone: String,
}

#[derive(Template)]
#[template(path = "site.html")]
struct SitePage {
    shell: Shell,
    id: Uuid,
    name: String,
    origins: String,
    timezone: String,
}

#[derive(Template)]
#[template(path = "entity.html")]
struct EntityPage {
    shell: Shell,
    entity: &'static Entity,
    spec: String,
    editable: bool,
    is_admin: bool,
    own_client: String,
    mqtt_host: String,
    mqtt_port: u16,
    mqtt_tls: bool,
    topic: String,
}

/// A column of an entity's table.
#[derive(Serialize)]
struct Column {
    key: &'static str,
    label: &'static str,
}

const fn col(key: &'static str, label: &'static str) -> Column {
    Column { key, label }
}

/// The columns most lists end with.
const CLIENT: Column = col("client_id", "Client");
const CREATED: Column = col("created_at", "Created");

/// A field of an entity's form.
#[derive(Serialize)]
struct Field {
    name: &'static str,
    label: &'static str,
    /// `text`, `email`, `password`, `role`, `client`, `timezone` or `lines`.
    kind: &'static str,
    /// Required when creating.
    required: bool,
    /// Sent when creating / when editing.
    create: bool,
    edit: bool,
    help: &'static str,
}

impl Field {
    const fn new(name: &'static str, label: &'static str, kind: &'static str) -> Self {
        Self {
            name,
            label,
            kind,
            required: true,
            create: true,
            edit: true,
            help: "",
        }
    }

    const fn optional(mut self) -> Self {
        self.required = false;
        self
    }

    const fn create_only(mut self) -> Self {
        self.edit = false;
        self
    }

    const fn help(mut self, help: &'static str) -> Self {
        self.help = help;
        self
    }

    fn input_type(&self) -> &'static str {
        match self.kind {
            "email" => "email",
            "password" => "password",
            _ => "text",
        }
    }
}

/// Something the admin pages list, create, edit and delete through the API.
#[derive(Serialize)]
struct Entity {
    key: &'static str,
    title: &'static str,
    singular: &'static str,
    api: &'static str,
    columns: &'static [Column],
    fields: &'static [Field],
    /// What the search box searches.
    search: &'static str,
    /// The page of one item, when there is one (`{id}` is replaced).
    link: Option<&'static str>,
    /// Who may open the page: `admin`, or `manager` (admins and operators), or `any`.
    access: &'static str,
}

const CLIENTS: Entity = Entity {
    key: "clients",
    title: "Clients",
    singular: "client",
    api: "/api/v1/clients",
    columns: &[col("name", "Name"), col("timezone", "Time zone"), CREATED],
    fields: &[
        Field::new("name", "Name", "text"),
        Field::new("timezone", "Time zone", "timezone")
            .help("IANA name, e.g. America/Sao_Paulo; daily averages use it"),
    ],
    search: "name",
    link: None,
    access: "admin",
};

const USERS: Entity = Entity {
    key: "users",
    title: "Users",
    singular: "user",
    api: "/api/v1/users",
    columns: &[col("email", "E-mail"), col("role", "Role"), CLIENT, CREATED],
    fields: &[
        Field::new("email", "E-mail", "email"),
        Field::new("password", "Password", "password")
            .help("at least 8 characters; leave empty to keep it when editing"),
        Field::new("role", "Role", "role"),
        Field::new("client_id", "Client", "client")
            .optional()
            .help("required for operators and viewers, empty for admins"),
    ],
    search: "e-mail",
    link: None,
    access: "admin",
};

const SENSORS: Entity = Entity {
    key: "sensors",
    title: "Manage sensors",
    singular: "sensor",
    api: "/api/v1/sensors",
    columns: &[
        col("name", "Name"),
        col("location", "Location"),
        CLIENT,
        CREATED,
    ],
    fields: &[
        Field::new("name", "Name", "text"),
        Field::new("location", "Location", "text").optional(),
        Field::new("client_id", "Client", "client").create_only(),
    ],
    search: "name or location",
    link: Some("/ui/sensors/{id}"),
    access: "manager",
};

const SITES: Entity = Entity {
    key: "sites",
    title: "Sites",
    singular: "site",
    api: "/api/v1/sites",
    columns: &[
        col("name", "Name"),
        col("origins", "Origins"),
        CLIENT,
        CREATED,
    ],
    fields: &[
        Field::new("name", "Name", "text"),
        Field::new("origins", "Allowed origins", "lines")
            .help("one per line, e.g. https://shop.example; * for any"),
        Field::new("client_id", "Client", "client").create_only(),
    ],
    search: "name",
    link: Some("/ui/sites/{id}"),
    access: "any",
};

/// A response made of a page, with the headers every console page carries.
fn html(status: StatusCode, body: Result<String, askama::Error>) -> Response {
    match body {
        Ok(body) => Response::builder()
            .status(status)
            .content_type("text/html; charset=utf-8")
            .header(header::CACHE_CONTROL, "no-store")
            .header("x-frame-options", "DENY")
            .header("x-content-type-options", "nosniff")
            .header("referrer-policy", "same-origin")
            .header(
                "content-security-policy",
                "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; \
                 frame-ancestors 'none'; form-action 'self'",
            )
            .body(body),
        Err(e) => poem::Error::from(internal(format!("template: {e}"))).into_response(),
    }
}

fn redirect(to: &str) -> Response {
    Response::builder()
        .status(StatusCode::SEE_OTHER)
        .header(header::LOCATION, to)
        .header(header::CACHE_CONTROL, "no-store")
        .finish()
}

/// Where to go back to after logging in: a console path only.
fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n) if n.starts_with("/ui/") && !n.starts_with("//") && !n.contains('\\') => {
            n.to_owned()
        }
        _ => "/ui/sensors".to_owned(),
    }
}

fn to_login(req: &Request) -> Response {
    // The original URI: nested routes see their path without the `/ui` prefix.
    let here = req
        .original_uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/ui/sensors");
    let next: String = url::form_urlencoded::byte_serialize(here.as_bytes()).collect();
    redirect(&format!("/ui/login?next={next}"))
}

fn error_page(visit: &Visit, status: StatusCode, message: &str) -> Response {
    html(
        status,
        ErrorPage {
            shell: Shell::new(
                visit,
                status.canonical_reason().unwrap_or("Error"),
                "",
                false,
            ),
            status: status.as_u16(),
            message: message.to_owned(),
        }
        .render(),
    )
}

/// The 503 page when the API cannot answer a guard.
fn unavailable() -> Response {
    Response::builder()
        .status(StatusCode::SERVICE_UNAVAILABLE)
        .content_type("text/plain; charset=utf-8")
        .header(header::RETRY_AFTER, "5")
        .body("The console cannot reach its storage right now; retry in a few seconds.")
}

/// The session of `req` and its user, or the response to give instead (to the login page,
/// or a 503).
async fn visit(console: &Console, req: &Request) -> Result<Visit, Response> {
    let Some(secret) = session::secret_of(req) else {
        return Err(to_login(req));
    };
    let session: Session = match console.sessions.find(&secret, true).await {
        Ok(Some(session)) => session,
        Ok(None) => return Err(to_login(req)),
        Err(_) => return Err(unavailable()),
    };
    let token = console.token(&session);
    match console
        .call(Method::GET, &format!("{API}/auth/me"), Some(&token), None)
        .await
    {
        Ok(answer) if answer.status == StatusCode::OK => {
            match serde_json::from_value::<Me>(answer.body) {
                Ok(me) => Ok(Visit {
                    me,
                    token,
                    csrf: session.csrf,
                }),
                Err(_) => Err(unavailable()),
            }
        }
        Ok(answer) if answer.status == StatusCode::UNAUTHORIZED => {
            // The user is gone, or changed password or role: the session is over.
            let _ = console.sessions.close(&secret).await;
            Err(to_login(req))
        }
        _ => Err(unavailable()),
    }
}

macro_rules! visit_or_return {
    ($console:expr, $req:expr) => {
        match visit($console, $req).await {
            Ok(visit) => visit,
            Err(response) => return response,
        }
    };
}

#[handler]
#[tracing::instrument(skip_all)]
fn index() -> Response {
    redirect("/ui/sensors")
}

#[derive(Deserialize)]
struct NextQuery {
    next: Option<String>,
}

#[handler]
#[tracing::instrument(skip_all)]
async fn login_page(
    req: &Request,
    console: Data<&Console>,
    Query(q): Query<NextQuery>,
) -> Response {
    let next = safe_next(q.next.as_deref());
    if let Some(secret) = session::secret_of(req) {
        if let Ok(Some(_)) = console.sessions.find(&secret, true).await {
            return redirect(&next);
        }
    }
    login_form(StatusCode::OK, next, String::new(), String::new())
}

fn login_form(status: StatusCode, next: String, email: String, error: String) -> Response {
    html(
        status,
        LoginPage {
            css: assets::url("console.css"),
            next,
            email,
            error,
        }
        .render(),
    )
}

#[derive(Deserialize)]
struct LoginForm {
    email: String,
    password: String,
    next: Option<String>,
}

#[handler]
#[tracing::instrument(skip_all)]
async fn login(req: &Request, console: Data<&Console>, Form(form): Form<LoginForm>) -> Response {
    let next = safe_next(form.next.as_deref());
    if !crate::same_origin(req) {
        return login_form(
            StatusCode::FORBIDDEN,
            next,
            form.email,
            "This form was posted from another site.".into(),
        );
    }
    let body = json!({"email": form.email, "password": form.password});
    let answer = match console
        .call(
            Method::POST,
            &format!("{API}/auth/login"),
            None,
            Some(&body),
        )
        .await
    {
        Ok(answer) => answer,
        Err(_) => return unavailable(),
    };
    if answer.status != StatusCode::OK {
        let message = match answer.status {
            StatusCode::UNAUTHORIZED => "Wrong e-mail or password.".to_owned(),
            StatusCode::SERVICE_UNAVAILABLE => return unavailable(),
            _ => answer.body["message"]
                .as_str()
                .unwrap_or("Logging in failed.")
                .to_owned(),
        };
        let status = if answer.status.is_server_error() {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            answer.status
        };
        metrics::counter!("console_logins_total", "outcome" => "refused").increment(1);
        return login_form(status, next, form.email, message);
    }
    let claims = answer.body["access_token"]
        .as_str()
        .and_then(|token| console.jwt.verify(token, TokenType::Access).ok());
    let Some(claims) = claims else {
        return poem::Error::from(internal("the login answer has no valid access token"))
            .into_response();
    };
    let secret = match console.sessions.open(claims.sub, claims.ver).await {
        Ok(secret) => secret,
        Err(_) => return unavailable(),
    };
    metrics::counter!("console_logins_total", "outcome" => "ok").increment(1);
    let mut response = redirect(&next);
    if let Ok(cookie) = console.sessions.cookie(req, Some(&secret)).parse() {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    response
}

#[derive(Deserialize)]
struct LogoutForm {
    csrf: String,
}

#[handler]
#[tracing::instrument(skip_all)]
async fn logout(req: &Request, console: Data<&Console>, Form(form): Form<LogoutForm>) -> Response {
    if let Some(secret) = session::secret_of(req) {
        match console.sessions.find(&secret, false).await {
            Ok(Some(session)) => {
                let given = form.csrf.as_bytes();
                if !bool::from(subtle::ConstantTimeEq::ct_eq(
                    given,
                    session.csrf.as_bytes(),
                )) || !crate::same_origin(req)
                {
                    return Response::builder()
                        .status(StatusCode::FORBIDDEN)
                        .content_type("text/plain; charset=utf-8")
                        .body("This logout was not sent by the console's own page.");
                }
                if console.sessions.close(&secret).await.is_err() {
                    return unavailable();
                }
            }
            Ok(None) => {}
            Err(_) => return unavailable(),
        }
    }
    let mut response = redirect("/ui/login");
    if let Ok(cookie) = console.sessions.cookie(req, None).parse() {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    response
}

/// `GET /ui/session`: who is logged in, and the CSRF token, for the products' own pages
/// (conversations, jobs) that call the API with the session. Same-origin scripts only:
/// no CORS header is ever sent.
#[handler]
#[tracing::instrument(skip_all)]
async fn session_info(req: &Request, console: Data<&Console>) -> Response {
    match visit(&console, req).await {
        Ok(visit) => poem::web::Json(json!({
            "email": visit.me.email,
            "role": visit.me.role,
            "client_id": visit.me.client_id,
            "csrf": visit.csrf,
        }))
        .with_header(header::CACHE_CONTROL, "no-store")
        .into_response(),
        Err(response) if response.status() == StatusCode::SEE_OTHER => {
            poem::Error::from(termopar_web::error::ApiError::unauthorized("not logged in"))
                .into_response()
        }
        Err(response) => response,
    }
}

#[handler]
#[tracing::instrument(skip_all)]
async fn sensors(req: &Request, console: Data<&Console>) -> Response {
    let visit = visit_or_return!(&console, req);
    let page = SensorsPage {
        shell: Shell::new(&visit, "Sensors", "/ui/sensors", false),
        client_id: visit
            .me
            .client_id
            .map(|c| c.to_string())
            .unwrap_or_default(),
        is_admin: visit.is_admin(),
        poll_ms: console.settings.poll_every.as_millis(),
        stale_secs: console.settings.stale_after.as_secs(),
    };
    html(StatusCode::OK, page.render())
}

#[handler]
#[tracing::instrument(skip_all)]
async fn alarms(req: &Request, console: Data<&Console>) -> Response {
    let visit = visit_or_return!(&console, req);
    let page = AlarmsPage {
        shell: Shell::new(&visit, "Alarms", "/ui/alarms", false),
        manages: visit.manages(),
    };
    html(StatusCode::OK, page.render())
}

/// Reads `path` through the API as the visitor: the item, or the page to answer instead
/// (404 for what the visitor cannot see, exactly as the API answers).
async fn fetch_as(console: &Console, visit: &Visit, path: &str) -> Result<Value, Response> {
    match console
        .call(Method::GET, path, Some(&visit.token), None)
        .await
    {
        Ok(answer) if answer.status == StatusCode::OK => Ok(answer.body),
        Ok(answer) if answer.status.is_client_error() => Err(error_page(
            visit,
            answer.status,
            answer.body["message"].as_str().unwrap_or("not found"),
        )),
        _ => Err(unavailable()),
    }
}

/// A sensor or site (`what`: `sensors` or `sites`) the visitor can see, with its client's
/// time zone; or the page to answer instead (404 for an id that is not one, or not the
/// visitor's to see).
async fn item_with_zone(
    console: &Console,
    visit: &Visit,
    what: &str,
    id: &str,
) -> Result<(Uuid, Value, String), Response> {
    let Ok(id) = id.parse::<Uuid>() else {
        return Err(error_page(visit, StatusCode::NOT_FOUND, "not found"));
    };
    let item = fetch_as(console, visit, &format!("{API}/{what}/{id}")).await?;
    let client = item["client_id"].as_str().unwrap_or_default();
    let client = fetch_as(console, visit, &format!("{API}/clients/{client}")).await?;
    let timezone = client["timezone"].as_str().unwrap_or("UTC").to_owned();
    Ok((id, item, timezone))
}

fn text(item: &Value, key: &str) -> String {
    item[key].as_str().unwrap_or_default().to_owned()
}

#[handler]
#[tracing::instrument(skip_all)]
async fn sensor(req: &Request, console: Data<&Console>, Path(id): Path<String>) -> Response {
    let visit = visit_or_return!(&console, req);
    let (id, sensor, timezone) = match item_with_zone(&console, &visit, "sensors", &id).await {
        Ok(found) => found,
        Err(response) => return response,
    };
    let name = text(&sensor, "name");
    let page = SensorPage {
        shell: Shell::new(&visit, format!("Sensor {name}"), "/ui/sensors", true),
        id,
        name,
        location: text(&sensor, "location"),
        timezone,
    };
    html(StatusCode::OK, page.render())
}

#[handler]
#[tracing::instrument(skip_all)]
async fn site(req: &Request, console: Data<&Console>, Path(id): Path<String>) -> Response {
    let visit = visit_or_return!(&console, req);
    let (id, site, timezone) = match item_with_zone(&console, &visit, "sites", &id).await {
        Ok(found) => found,
        Err(response) => return response,
    };
    let name = text(&site, "name");
    let origins = site["origins"]
        .as_array()
        .map(|o| {
            o.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default();
    let page = SitePage {
        shell: Shell::new(&visit, format!("Site {name}"), "/ui/sites", true),
        id,
        name,
        origins,
        timezone,
    };
    html(StatusCode::OK, page.render())
}

fn entity_page(
    console: &Console,
    visit: &Visit,
    entity: &'static Entity,
    current: &str,
) -> Response {
    let allowed = match entity.access {
        "admin" => visit.is_admin(),
        "manager" => visit.manages(),
        _ => true,
    };
    if !allowed {
        return error_page(
            visit,
            StatusCode::FORBIDDEN,
            "Your role may not open this page.",
        );
    }
    let settings = &console.settings;
    let (mqtt_host, mqtt_port, mqtt_tls) = match &settings.mqtt_public_url {
        Some(url) => (
            url.host_str().unwrap_or_default().to_owned(),
            url.port()
                .unwrap_or(if url.scheme() == "mqtts" { 8883 } else { 1883 }),
            url.scheme() == "mqtts",
        ),
        None => (String::new(), settings.mqtt_port, false),
    };
    let spec = serde_json::to_string(entity)
        .unwrap_or_default()
        .replace("</", "<\\/");
    let page = EntityPage {
        shell: Shell::new(visit, entity.title, current, false),
        entity,
        spec,
        editable: visit.manages(),
        is_admin: visit.is_admin(),
        own_client: visit
            .me
            .client_id
            .map(|c| c.to_string())
            .unwrap_or_default(),
        mqtt_host,
        mqtt_port,
        mqtt_tls,
        topic: settings.topics.readings_template(),
    };
    html(StatusCode::OK, page.render())
}

#[handler]
#[tracing::instrument(skip_all)]
async fn sites(req: &Request, console: Data<&Console>) -> Response {
    let visit = visit_or_return!(&console, req);
    entity_page(&console, &visit, &SITES, "/ui/sites")
}

#[handler]
#[tracing::instrument(skip_all)]
async fn admin(req: &Request, console: Data<&Console>, Path(entity): Path<String>) -> Response {
    let visit = visit_or_return!(&console, req);
    let (entity, current) = match entity.as_str() {
        "clients" => (&CLIENTS, "/ui/admin/clients"),
        "users" => (&USERS, "/ui/admin/users"),
        "sensors" => (&SENSORS, "/ui/admin/sensors"),
        _ => return error_page(&visit, StatusCode::NOT_FOUND, "no such page"),
    };
    entity_page(&console, &visit, entity, current)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_console_paths_are_returned_to_after_login() {
        assert_eq!(safe_next(Some("/ui/sensors/1?x=2")), "/ui/sensors/1?x=2");
        assert_eq!(safe_next(Some("https://evil.example/ui/")), "/ui/sensors");
        assert_eq!(safe_next(Some("//evil.example/ui/")), "/ui/sensors");
        assert_eq!(safe_next(Some("/ui/\\evil")), "/ui/sensors");
        assert_eq!(safe_next(None), "/ui/sensors");
    }
}
