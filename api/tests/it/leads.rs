//! The lead pipeline (seed 003) with real workers: forms to marketing and the CRM over
//! HTTP, a qualified lead's e-mail to a real SMTP server (a sink speaking SMTP over TCP),
//! retries, dead jobs and the dashboard, idempotency, tenants.

use std::{sync::Arc, time::Duration};

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use test_support::{eventually, free_port, DEFAULT_DEADLINE};
use tokio::net::{TcpListener, TcpStream};

use crate::{
    harness::{assert_error, id, read, TestApp},
    sinks::SmtpSink,
};

const ORIGIN: &str = "https://shop.example.com";

/// Forwards connections on `port` to `to` once started: a system that comes back.
async fn forward(port: u16, to: String) {
    let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let to = to.clone();
            tokio::spawn(async move {
                if let Ok(mut outbound) = TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
}

impl TestApp {
    /// Posts a form at a root path of the seed (`/leads/`, `/costumers/`) from `origin`.
    async fn form(
        &self,
        path: &str,
        origin: Option<&str>,
        body: Value,
    ) -> (StatusCode, Value, reqwest::header::HeaderMap) {
        let mut req = self.http.post(self.url(path)).json(&body);
        if let Some(origin) = origin {
            req = req.header("Origin", origin);
        }
        let resp = req.send().await.unwrap();
        let headers = resp.headers().clone();
        let (status, body) = read(resp).await;
        (status, body, headers)
    }

    /// The list at `path` once it has `n` items.
    async fn list_once(&self, path: &str, token: &str, n: i64) -> Value {
        eventually(path, DEFAULT_DEADLINE, || async {
            let (status, page) = self.get(path, token).await;
            assert_eq!(status, StatusCode::OK, "{page}");
            (page["total"] == n).then_some(page)
        })
        .await
    }

    /// Jobs of `queue` in `state`, once there are `n`.
    pub(crate) async fn jobs_once(&self, queue: &str, state: &str, n: usize) -> Vec<Value> {
        eventually(
            &format!("{n} {state} jobs of {queue}"),
            DEFAULT_DEADLINE,
            || async {
                let (status, page) = self
                    .get(&format!("/jobs?queue={queue}&state={state}"), &self.admin)
                    .await;
                assert_eq!(status, StatusCode::OK, "{page}");
                let items = page["items"].as_array().unwrap().clone();
                (items.len() == n).then_some(items)
            },
        )
        .await
    }
}

fn lead(site: &str) -> Value {
    json!({
        "site_id": site,
        "name": "Ana Souza",
        "email": "ana@example.com",
        "phone": "+55 11 99999-0000",
        "message": "Quero um orçamento"
    })
}

#[tokio::test]
async fn the_seeds_flow_reaches_marketing_the_crm_and_the_leads_inbox() {
    let smtp = SmtpSink::start().await;
    let app = TestApp::spawn_with(|s| {
        s.leads.smtp.port = smtp.port;
    })
    .await;
    let client = app.create_client("Shop").await;
    let site = app.create_site(id(&client), "Shop", &[ORIGIN]).await;

    // 1: the lead form, at the seed's path.
    let (status, posted, headers) = app.form("/leads/", Some(ORIGIN), lead(id(&site))).await;
    assert_eq!(status, StatusCode::CREATED, "{posted}");
    assert_eq!(headers["access-control-allow-origin"], ORIGIN);
    assert_eq!(posted["client_id"], client["id"]);
    assert_eq!(posted["site_id"], site["id"]);

    // 1.1 and 1.2: in marketing and in the CRM, once each.
    let marketing = app.list_once("/marketing/leads", &app.admin, 1).await;
    let crm = app.list_once("/crm/leads", &app.admin, 1).await;
    for page in [&marketing, &crm] {
        let item = &page["items"][0];
        assert_eq!(item["email"], "ana@example.com");
        assert_eq!(item["name"], "Ana Souza");
        assert_eq!(item["client_id"], client["id"]);
        assert_eq!(item["message"], "Quero um orçamento");
    }
    assert_eq!(crm["items"][0]["qualified"], false);
    app.jobs_once("lead_to_marketing", "done", 1).await;
    app.jobs_once("lead_to_crm", "done", 1).await;
    assert!(smtp.mails().is_empty(), "no e-mail before qualification");

    // 2 and 2.1: qualified in the CRM (PUT at the seed's path), the lead gets one e-mail.
    let crm_lead = crm["items"][0].clone();
    let mut qualified = crm_lead.clone();
    qualified["qualified"] = json!(true);
    let resp = app
        .http
        .put(app.url(&format!("/crm/leads/{}/", id(&crm_lead))))
        .bearer_auth(&app.admin)
        .json(&json!({
            "name": qualified["name"], "email": qualified["email"],
            "phone": qualified["phone"], "message": qualified["message"], "qualified": true
        }))
        .send()
        .await
        .unwrap();
    let (status, updated) = read(resp).await;
    assert_eq!(status, StatusCode::OK, "{updated}");
    assert_eq!(updated["qualified"], true);
    assert!(updated["qualified_at"].is_string());
    let mail = eventually("the e-mail", DEFAULT_DEADLINE, || async {
        smtp.mails().first().cloned()
    })
    .await;
    assert_eq!(mail.recipients, vec!["ana@example.com".to_owned()]);
    assert!(
        mail.data.contains("To: \"Ana Souza\" <ana@example.com>")
            || mail.data.contains("To: Ana Souza <ana@example.com>"),
        "{}",
        mail.data
    );
    assert!(mail.data.contains("Hello Ana Souza"), "{}", mail.data);
    app.jobs_once("qualified_lead_email", "done", 1).await;
    let (_, emailed) = app
        .get(&format!("/crm/leads/{}", id(&crm_lead)), &app.admin)
        .await;
    assert!(emailed["emailed_at"].is_string(), "{emailed}");

    // Saving it again qualified is no new qualification: no second job, no second mail.
    let (status, _) = app
        .call(
            Method::PUT,
            &format!("/crm/leads/{}", id(&crm_lead)),
            Some(&app.admin),
            Some(json!({"name": "Ana Souza", "email": "ana@example.com", "qualified": true})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, all_email_jobs) = app
        .get("/jobs?queue=qualified_lead_email", &app.admin)
        .await;
    assert_eq!(all_email_jobs["total"], 1, "{all_email_jobs}");
    assert_eq!(smtp.mails().len(), 1);

    // 3 and 3.1: the customer form (the seed's `costumers`) reaches the CRM's customers.
    let (status, customer, _) = app
        .form(
            "/costumers/",
            Some(ORIGIN),
            json!({"site_id": id(&site), "name": "Loja Ltda", "email": "compras@loja.example", "company": "Loja"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{customer}");
    let crm_customers = app.list_once("/crm/costumers", &app.admin, 1).await;
    assert_eq!(crm_customers["items"][0]["email"], "compras@loja.example");
    assert_eq!(crm_customers["items"][0]["company"], "Loja");
    let (_, website) = read(
        app.http
            .get(app.url("/costumers/"))
            .bearer_auth(&app.admin)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(website["total"], 1, "{website}");
    for path in ["/costumers", "/customers", "/crm/costumers"] {
        let (status, same) = app.get(path, &app.admin).await;
        assert_eq!(status, StatusCode::OK, "/api/v1{path}: {same}");
        assert_eq!(same["total"], 1, "/api/v1{path}: {same}");
    }

    // The dashboard counts what happened, per queue (once the last job's result is in).
    app.jobs_once("customer_to_crm", "done", 1).await;
    let (_, queues) = app.get("/jobs/queues", &app.admin).await;
    let done = |q: &str| {
        queues
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["queue"] == q)
            .map(|c| c["done"].clone())
    };
    for q in [
        "lead_to_marketing",
        "lead_to_crm",
        "qualified_lead_email",
        "customer_to_crm",
    ] {
        assert_eq!(done(q), Some(json!(1)), "{queues}");
    }
    let (_, workers) = app.get("/jobs/workers", &app.admin).await;
    assert!(workers.as_array().unwrap().len() >= 4, "{workers}");
    assert!(
        workers
            .as_array()
            .unwrap()
            .iter()
            .all(|w| w["alive"] == true),
        "{workers}"
    );
}

#[tokio::test]
async fn a_job_whose_system_is_down_dies_with_its_error_and_a_dashboard_retry_delivers_it_once() {
    let marketing_port = free_port();
    let app = TestApp::spawn_with(|s| {
        s.leads.marketing_url = Some(format!("http://127.0.0.1:{marketing_port}"));
        s.leads.max_attempts = 3;
        s.leads.backoff = Duration::from_millis(20);
        s.leads.backoff_max = Duration::from_millis(100);
    })
    .await;
    let client = app.create_client("Shop").await;
    let site = app.create_site(id(&client), "Shop", &[ORIGIN]).await;
    let (status, _, _) = app.form("/leads", Some(ORIGIN), lead(id(&site))).await;
    assert_eq!(status, StatusCode::CREATED);

    // The CRM is up: its job succeeds; marketing refuses connections until the job dies.
    app.list_once("/crm/leads", &app.admin, 1).await;
    let dead = app.jobs_once("lead_to_marketing", "dead", 1).await;
    let job = &dead[0];
    assert_eq!(job["attempts"], 3, "{job}");
    assert_eq!(job["max_attempts"], 3);
    let error = job["last_result"].to_string();
    assert!(error.contains("rror"), "the last error is kept: {error}");
    assert!(job["payload"]["record_id"].is_string(), "{job}");
    let (_, marketing) = app.get("/marketing/leads", &app.admin).await;
    assert_eq!(marketing["total"], 0);

    // A running or done job is not retried; an unknown one is 404.
    let done = app.jobs_once("lead_to_crm", "done", 1).await;
    let again = app
        .post(
            &format!("/jobs/{}/retry", done[0]["id"].as_str().unwrap()),
            &app.admin,
            json!({}),
        )
        .await;
    assert_error(&again, StatusCode::CONFLICT, "conflict");
    let missing = app
        .post("/jobs/01JUNKNOWNJOB/retry", &app.admin, json!({}))
        .await;
    assert_error(&missing, StatusCode::NOT_FOUND, "not_found");

    // Marketing comes back; the dashboard's retry delivers the lead, once.
    forward(
        marketing_port,
        app.base.trim_start_matches("http://").to_owned(),
    )
    .await;
    let (status, retried) = app
        .post(
            &format!("/jobs/{}/retry", job["id"].as_str().unwrap()),
            &app.admin,
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{retried}");
    app.jobs_once("lead_to_marketing", "done", 1).await;
    let marketing = app.list_once("/marketing/leads", &app.admin, 1).await;
    assert_eq!(marketing["items"][0]["email"], "ana@example.com");

    // The dashboard's page is served; only admins see its data.
    let page = app.http.get(app.url("/ui/jobs")).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    assert!(page.text().await.unwrap().contains("/jobs/queues"));
    let (_, operator) = app.user_with_token("operator", Some(id(&client))).await;
    let refused = app.get("/jobs/queues", &operator).await;
    assert_error(&refused, StatusCode::FORBIDDEN, "forbidden");
}

#[tokio::test]
async fn a_repeated_idempotency_key_creates_nothing_new() {
    let app = TestApp::spawn().await;
    let client = app.create_client("Shop").await;
    let body = json!({"client_id": id(&client), "name": "Ana", "email": "ana@example.com"});
    let post = |body: Value, key: &'static str| {
        let req = app
            .request(Method::POST, "/marketing/leads", Some(&app.admin))
            .header("Idempotency-Key", key)
            .json(&body);
        async move { read(req.send().await.unwrap()).await }
    };
    let (status, first) = post(body.clone(), "website-lead:1").await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    let (status, second) = post(body.clone(), "website-lead:1").await;
    assert_eq!(status, StatusCode::OK, "{second}");
    assert_eq!(first["id"], second["id"]);
    let (status, other) = post(body, "website-lead:2").await;
    assert_eq!(status, StatusCode::CREATED);
    assert_ne!(other["id"], first["id"]);
    let (_, list) = app.get("/marketing/leads", &app.admin).await;
    assert_eq!(list["total"], 2);
}

#[tokio::test]
async fn forms_name_a_site_and_every_other_route_keeps_tenants_apart() {
    let app = TestApp::spawn_with(|s| s.leads.workers = false).await;
    let a = app.create_client("A").await;
    let b = app.create_client("B").await;
    let site = app.create_site(id(&a), "A shop", &[ORIGIN]).await;

    // Forms: unknown site, origin not allowed, bad fields, preflight.
    let (status, body, _) = app
        .form(
            "/leads",
            Some(ORIGIN),
            lead("00000000-0000-0000-0000-000000000000"),
        )
        .await;
    assert_error(
        &(status, body),
        StatusCode::UNPROCESSABLE_ENTITY,
        "unknown_site",
    );
    let (status, body, _) = app
        .form("/leads", Some("https://evil.example"), lead(id(&site)))
        .await;
    assert_error(&(status, body), StatusCode::FORBIDDEN, "origin_not_allowed");
    let mut bad = lead(id(&site));
    bad["email"] = json!("not an address");
    let (status, body, _) = app.form("/leads", Some(ORIGIN), bad).await;
    assert_error(
        &(status, body),
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
    );
    let preflight = app
        .http
        .request(Method::OPTIONS, app.url("/api/v1/leads"))
        .header("Origin", ORIGIN)
        .send()
        .await
        .unwrap();
    assert_eq!(preflight.status(), StatusCode::NO_CONTENT);
    assert_eq!(preflight.headers()["access-control-allow-origin"], ORIGIN);

    let (status, website_lead, _) = app.form("/leads", Some(ORIGIN), lead(id(&site))).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, marketing_lead) = app
        .post(
            "/marketing/leads",
            &app.admin,
            json!({"client_id": id(&a), "name": "M", "email": "m@a.example"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{marketing_lead}");
    let (status, crm_lead) = app
        .post(
            "/crm/leads",
            &app.admin,
            json!({"client_id": id(&a), "name": "C", "email": "c@a.example"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{crm_lead}");
    let (status, crm_customer) = app
        .post(
            "/crm/customers",
            &app.admin,
            json!({"client_id": id(&a), "name": "K", "email": "k@a.example"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{crm_customer}");

    let (_, operator_b) = app.user_with_token("operator", Some(id(&b))).await;
    let (_, viewer_a) = app.user_with_token("viewer", Some(id(&a))).await;
    let person = json!({"name": "X", "email": "x@b.example"});
    for (path, record) in [
        ("/leads", &website_lead),
        ("/marketing/leads", &marketing_lead),
        ("/crm/leads", &crm_lead),
        ("/crm/customers", &crm_customer),
    ] {
        // Another tenant's operator sees none of it and changes none of it.
        let (_, list) = app.get(path, &operator_b).await;
        assert_eq!(list["total"], 0, "{path}: {list}");
        let one = format!("{path}/{}", id(record));
        assert_error(
            &app.get(&one, &operator_b).await,
            StatusCode::NOT_FOUND,
            "not_found",
        );
        let put = app
            .call(Method::PUT, &one, Some(&operator_b), Some(person.clone()))
            .await;
        assert_error(&put, StatusCode::NOT_FOUND, "not_found");
        assert_error(
            &app.delete(&one, &operator_b).await,
            StatusCode::NOT_FOUND,
            "not_found",
        );
        // A viewer of the tenant reads, and changes nothing.
        let (status, got) = app.get(&one, &viewer_a).await;
        assert_eq!(status, StatusCode::OK, "{got}");
        let put = app
            .call(Method::PUT, &one, Some(&viewer_a), Some(person.clone()))
            .await;
        assert_error(&put, StatusCode::FORBIDDEN, "forbidden");
    }
    // An operator creates for its own client only, and never moves a record.
    let (status, own) = app.post("/crm/leads", &operator_b, person.clone()).await;
    assert_eq!(status, StatusCode::CREATED, "{own}");
    assert_eq!(own["client_id"], b["id"]);
    let moved = app
        .call(
            Method::PUT,
            &format!("/crm/leads/{}", id(&own)),
            Some(&operator_b),
            Some(json!({"client_id": id(&a), "name": "X", "email": "x@b.example"})),
        )
        .await;
    assert_error(
        &moved,
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
    );
    // `qualified` belongs to CRM leads only.
    let wrong = app
        .post(
            "/marketing/leads",
            &app.admin,
            json!({"client_id": id(&a), "name": "Q", "email": "q@a.example", "qualified": true}),
        )
        .await;
    assert_error(
        &wrong,
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
    );
    // Deleting works for the tenant's operator.
    let (_, operator_a) = app.user_with_token("operator", Some(id(&a))).await;
    let (status, _) = app
        .delete(&format!("/leads/{}", id(&website_lead)), &operator_a)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (_, left) = app.get("/leads", &app.admin).await;
    assert_eq!(left["total"], 0);
}

/// `termopar-api workers` as its own process over the test's database, killed (SIGKILL)
/// when dropped.
struct WorkersProcess(std::process::Child);

impl WorkersProcess {
    fn start(app: &TestApp, marketing_url: &str) -> Self {
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_termopar-api"))
            .arg("workers")
            .env("DATABASE_URL", &app.db.url)
            .env("JWT_SECRET", crate::harness::JWT_SECRET)
            .env("MARKETING_URL", marketing_url)
            .env("CRM_URL", &app.base)
            .env("JOBS_ORPHAN_SECS", "2")
            .env("PIPELINE_HTTP_TIMEOUT_SECS", "300")
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start termopar-api workers");
        Self(child)
    }
}

impl Drop for WorkersProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A proxy to `to` that passes requests on but never passes an answer back: the
/// downstream system has done the work, the job never learns it. Counts the answers
/// it withheld.
async fn withholding_proxy(to: String) -> (u16, Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::AsyncReadExt;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let withheld = Arc::new(AtomicUsize::new(0));
    let count = withheld.clone();
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let (to, count) = (to.clone(), count.clone());
            tokio::spawn(async move {
                let Ok(outbound) = TcpStream::connect(to).await else {
                    return;
                };
                let (mut in_read, _in_write) = inbound.into_split();
                let (mut out_read, mut out_write) = outbound.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut in_read, &mut out_write).await;
                });
                let mut first = [0u8; 1];
                if out_read.read(&mut first).await.is_ok_and(|n| n > 0) {
                    count.fetch_add(1, Ordering::SeqCst);
                }
                // Hold the connection open, answering nothing.
                let _ = tokio::io::copy(&mut out_read, &mut tokio::io::sink()).await;
                std::future::pending::<()>().await;
            });
        }
    });
    (port, withheld)
}

#[tokio::test]
async fn a_worker_killed_mid_job_leaves_the_job_to_another_and_the_lead_exists_once() {
    use std::sync::atomic::Ordering;
    let app = TestApp::spawn_with(|s| s.leads.workers = false).await;
    let client = app.create_client("Shop").await;
    let site = app.create_site(id(&client), "Shop", &[ORIGIN]).await;
    let upstream = app.base.trim_start_matches("http://").to_owned();
    let (proxy, withheld) = withholding_proxy(upstream).await;

    let first = WorkersProcess::start(&app, &format!("http://127.0.0.1:{proxy}"));
    let (status, _, _) = app.form("/leads", Some(ORIGIN), lead(id(&site))).await;
    assert_eq!(status, StatusCode::CREATED);
    // Marketing stored the lead and answered; the answer never reaches the worker.
    eventually("marketing's answer withheld", DEFAULT_DEADLINE, || async {
        (withheld.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    app.list_once("/marketing/leads", &app.admin, 1).await;
    let running = app.jobs_once("lead_to_marketing", "running", 1).await;
    drop(first); // SIGKILL, mid-job.

    // Another worker process takes the orphaned job once its heartbeats stop, runs it
    // again, and marketing finds the lead the first try created.
    let _second = WorkersProcess::start(&app, &app.base);
    let done = app.jobs_once("lead_to_marketing", "done", 1).await;
    assert_eq!(done[0]["id"], running[0]["id"]);
    assert!(done[0]["attempts"].as_i64().unwrap() >= 1, "{}", done[0]);
    assert_ne!(
        done[0]["lock_by"], running[0]["lock_by"],
        "run by another worker"
    );
    let (_, marketing) = app.get("/marketing/leads", &app.admin).await;
    assert_eq!(
        marketing["total"], 1,
        "exactly once downstream: {marketing}"
    );
    let crm = app.list_once("/crm/leads", &app.admin, 1).await;
    assert_eq!(crm["items"][0]["email"], "ana@example.com");
}

#[tokio::test]
async fn the_workers_restore_their_service_account_when_an_admin_deletes_it() {
    let app = TestApp::spawn_with(|s| {
        s.auth.user_cache_ttl = Duration::from_millis(200);
        s.leads.backoff = Duration::from_millis(50);
        s.leads.backoff_max = Duration::from_millis(200);
    })
    .await;
    let client = app.create_client("Shop").await;
    let site = app.create_site(id(&client), "Shop", &[ORIGIN]).await;
    let (status, _, _) = app.form("/leads", Some(ORIGIN), lead(id(&site))).await;
    assert_eq!(status, StatusCode::CREATED);
    app.list_once("/marketing/leads", &app.admin, 1).await;

    let service = |users: &Value| {
        users["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|u| u["email"] == "jobs@termopar.internal")
            .cloned()
    };
    let (_, users) = app.get("/users?page_size=1000", &app.admin).await;
    let account = service(&users).expect("the workers' account exists");
    assert_eq!(account["role"], "admin");
    let (status, _) = app
        .delete(&format!("/users/{}", id(&account)), &app.admin)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);

    let mut second = lead(id(&site));
    second["email"] = json!("bruno@example.com");
    let (status, _, _) = app.form("/leads", Some(ORIGIN), second).await;
    assert_eq!(status, StatusCode::CREATED);
    app.list_once("/marketing/leads", &app.admin, 2).await;
    app.jobs_once("lead_to_marketing", "done", 2).await;
    let (_, users) = app.get("/users?page_size=1000", &app.admin).await;
    assert_eq!(service(&users).expect("restored")["role"], "admin");
}

#[tokio::test]
async fn a_refusal_no_retry_can_change_kills_the_job_at_its_first_attempt() {
    let port = free_port();
    let app = TestApp::spawn_with(|s| {
        // Marketing "moved": every post there is answered 404.
        s.leads.marketing_url = Some(format!("http://127.0.0.1:{port}/moved"));
        s.leads.backoff = Duration::from_millis(20);
        s.leads.backoff_max = Duration::from_millis(100);
    })
    .await;
    forward(port, app.base.trim_start_matches("http://").to_owned()).await;
    let client = app.create_client("Shop").await;
    let site = app.create_site(id(&client), "Shop", &[ORIGIN]).await;
    let (status, _, _) = app.form("/leads", Some(ORIGIN), lead(id(&site))).await;
    assert_eq!(status, StatusCode::CREATED);
    let dead = app.jobs_once("lead_to_marketing", "dead", 1).await;
    assert_eq!(dead[0]["attempts"], 1, "{}", dead[0]);
    assert!(
        dead[0]["last_result"].to_string().contains("404"),
        "{}",
        dead[0]
    );
}

/// The workers of every queue are woken through one `LISTEN` connection, not one each
/// (apalis's own pubsub kept a pool connection per worker for as long as it ran).
#[tokio::test]
async fn the_job_workers_listen_on_one_connection_for_every_queue() {
    let app = TestApp::spawn().await;
    let count = |sql: &'static str| {
        let pg = app.db.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(sql)
                .fetch_one(&pg)
                .await
                .unwrap()
        }
    };
    let queues = termopar_leads::jobs::QUEUES.len() as i64;
    eventually(
        "every queue's worker registered",
        DEFAULT_DEADLINE,
        || async { (count("SELECT count(*) FROM apalis.workers").await == queues).then_some(()) },
    )
    .await;
    let listening = "SELECT count(*) FROM pg_stat_activity
                     WHERE datname = current_database() AND query LIKE 'LISTEN %apalis::job::insert%'";
    eventually("the listener", DEFAULT_DEADLINE, || async {
        (count(listening).await > 0).then_some(())
    })
    .await;
    assert_eq!(count(listening).await, 1);
}
