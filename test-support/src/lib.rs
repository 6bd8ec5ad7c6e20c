//! Test harness shared by the crates' integration tests.
//!
//! Every test gets its own PostgreSQL database and its own MongoDB database, both
//! dropped when the test ends, so tests share nothing and can run in parallel.
//! The services themselves are started by `scripts/services.sh` (`make services`).

use std::{future::Future, str::FromStr, time::Duration};

use sqlx::{
    postgres::{PgConnectOptions, PgPoolOptions},
    ConnectOptions, Connection, Executor, PgConnection, PgPool,
};
use termopar_core::{
    ids::{ClientId, SensorId},
    settings::{
        env_or, DatabaseSettings, MongoSettings, DEFAULT_DATABASE_URL, DEFAULT_MONGODB_URI,
    },
};
use uuid::Uuid;

/// Default deadline of [`eventually`].
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(20);

fn server_options() -> PgConnectOptions {
    let url = env_or("DATABASE_URL", DEFAULT_DATABASE_URL);
    PgConnectOptions::from_str(&url).expect("DATABASE_URL is a valid PostgreSQL URL")
}

fn url_of(options: &PgConnectOptions) -> String {
    options.to_url_lossy().to_string()
}

/// A fresh, migrated PostgreSQL database, dropped when this value is dropped.
pub struct TestDb {
    server: PgConnectOptions,
    /// A small pool on it.
    pub pool: PgPool,
    /// Its URL.
    pub url: String,
    name: String,
}

impl TestDb {
    /// Creates the database and applies every migration.
    pub async fn new() -> Self {
        Self::on(server_options()).await
    }

    /// The same on the server `server` names (its database is ignored).
    pub async fn on(server: PgConnectOptions) -> Self {
        let name = format!("termopar_test_{}", Uuid::new_v4().simple());
        let mut admin = PgConnection::connect_with(&server.clone().database("postgres"))
            .await
            .expect("PostgreSQL is up (run `make services`)");
        admin
            // The name is generated here, never taken from input.
            .execute(sqlx::AssertSqlSafe(format!(r#"CREATE DATABASE "{name}""#)))
            .await
            .expect("create the test database");
        admin.close().await.ok();
        let options = server.clone().database(&name);
        let url = url_of(&options);
        let pool = PgPoolOptions::new()
            .max_connections(5)
            .connect_with(options)
            .await
            .expect("connect to the test database");
        termopar_core::db::MIGRATOR
            .run(&pool)
            .await
            .expect("migrations apply to an empty database");
        Self {
            server,
            pool,
            url,
            name,
        }
    }

    /// Settings pointing at this database.
    pub fn settings(&self) -> DatabaseSettings {
        DatabaseSettings::with_url(&self.url)
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A new client (zone UTC) with `n` sensors (no usable device secrets), straight
    /// into PostgreSQL.
    pub async fn client_with_sensors(&self, n: usize) -> (ClientId, Vec<SensorId>) {
        let client = Uuid::new_v4();
        sqlx::query("INSERT INTO clients (id, name, timezone) VALUES ($1, $2, 'UTC')")
            .bind(client)
            .bind(format!("client {client}"))
            .execute(&self.pool)
            .await
            .expect("insert a client");
        let sensors: Vec<Uuid> = sqlx::query_scalar(
            "INSERT INTO sensors (id, client_id, name, secret_hash)
             SELECT gen_random_uuid(), $1, 'sensor ' || i, '\\x00' FROM generate_series(1, $2) i
             RETURNING id",
        )
        .bind(client)
        .bind(n as i32)
        .fetch_all(&self.pool)
        .await
        .expect("insert sensors");
        (
            ClientId(client),
            sensors.into_iter().map(SensorId).collect(),
        )
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (name, server) = (self.name.clone(), self.server.clone());
        // Drop cannot await: use a thread with its own runtime, and wait for it so the
        // database is gone when the test ends. The pools on it (ours and the app's) live
        // on the test's runtime, which this blocks, so they are not closed gracefully:
        // FORCE terminates their sessions server-side.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for cleanup");
            rt.block_on(async move {
                if let Ok(mut admin) =
                    PgConnection::connect_with(&server.database("postgres")).await
                {
                    let _ = admin
                        .execute(sqlx::AssertSqlSafe(format!(
                            r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#
                        )))
                        .await;
                }
            });
        })
        .join();
    }
}

/// A fresh MongoDB database name on the shared server, dropped when this is dropped.
pub struct TestMongo {
    /// Settings pointing at it.
    pub settings: MongoSettings,
}

impl TestMongo {
    /// Picks a unique database name (nothing is created until first written).
    pub fn new() -> Self {
        Self {
            settings: MongoSettings {
                uri: env_or("MONGODB_URI", DEFAULT_MONGODB_URI),
                database: format!("termopar_test_{}", Uuid::new_v4().simple()),
            },
        }
    }

    /// A handle on the database.
    pub async fn database(&self) -> mongodb::Database {
        termopar_core::mongo::connect(&self.settings)
            .await
            .expect("valid MongoDB settings")
    }
}

impl Default for TestMongo {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestMongo {
    fn drop(&mut self) {
        let settings = self.settings.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for cleanup");
            rt.block_on(async move {
                if let Ok(db) = termopar_core::mongo::connect(&settings).await {
                    let _ = db.drop().await;
                }
            });
        })
        .join();
    }
}

/// Polls `check` until it returns `Some`, or panics after `deadline` naming `what`.
/// Tests wait for effects this way, never with fixed sleeps.
pub async fn eventually<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let until = tokio::time::Instant::now() + deadline;
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() >= until {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// A TCP port on 127.0.0.1 that nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

/// The development Mosquitto (`MOSQUITTO_URL`, default `mqtt://127.0.0.1:1884`).
/// The Python of the test tools' virtualenv (paho-mqtt), made by `scripts/services.sh`
/// in `TERMOPAR_DEV_DIR` (default `~/.local/share/termopar-dev`).
pub fn test_python() -> std::path::PathBuf {
    let dir = std::env::var_os("TERMOPAR_DEV_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".local/share/termopar-dev")
        });
    dir.join("venv/bin/python")
}

/// A self-signed certificate for `localhost` and 127.0.0.1, made by openssl in `dir`
/// as `{name}.pem` and `{name}.key`; returns both paths. Not a CA certificate (rustls
/// refuses a CA's as a server's own).
pub fn self_signed_cert(
    dir: &std::path::Path,
    name: &str,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let (cert, key) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    let status = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl is installed (make services)");
    assert!(status.success(), "openssl could not make a certificate");
    (cert, key)
}

pub fn mosquitto_endpoint() -> termopar_core::settings::MqttEndpoint {
    termopar_core::settings::MqttEndpoint::parse(&env_or("MOSQUITTO_URL", "mqtt://127.0.0.1:1884"))
        .expect("MOSQUITTO_URL is a valid mqtt:// URL")
}

/// A topic prefix no other test uses, for tests that share a broker.
pub fn unique_prefix() -> String {
    format!("test-{}", Uuid::new_v4().simple())
}

/// The edge node's binary (a test's `env!("CARGO_BIN_EXE_termopar")`) on `db` and
/// `mongo`, its API on `api_port` and MQTT front door on `mqtt_port` (loopback), with the
/// admin `admin` (e-mail, password) and warnings only on its output; add what else it
/// needs and spawn it.
pub fn edge_node(
    binary: &str,
    db: &TestDb,
    mongo: &TestMongo,
    (api_port, mqtt_port): (u16, u16),
    admin: (&str, &str),
) -> std::process::Command {
    let mut node = std::process::Command::new(binary);
    node.env("API_ADDR", format!("127.0.0.1:{api_port}"))
        .env("MQTT_ADDR", format!("127.0.0.1:{mqtt_port}"))
        .env("DATABASE_URL", &db.url)
        .env("MONGODB_URI", &mongo.settings.uri)
        .env("MONGODB_DB", &mongo.settings.database)
        .env("ADMIN_EMAIL", admin.0)
        .env("ADMIN_PASSWORD", admin.1)
        .env("JWT_SECRET", "edge-node-secret-of-at-least-32-bytes")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null());
    node
}

/// Waits (up to a minute) until the HTTP server on 127.0.0.1:`port` answers `GET /health`
/// with 200: a node started as a process is then serving.
pub async fn wait_until_healthy(port: u16) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    eventually("the node answers", Duration::from_secs(60), || async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        let request =
            format!("GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.ok()?;
        answer.starts_with(b"HTTP/1.1 200").then_some(())
    })
    .await;
}

/// A child process killed (SIGKILL) when dropped, so a failing test leaves none behind.
pub struct ChildGuard(pub std::process::Child);

impl ChildGuard {
    /// Kills the process at once (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A TCP proxy to a real service that a test can cut off and restore, to see how the
/// code behaves while the service is unreachable, or hold (bytes stop moving either way,
/// connections stay open) and release, to see it behave while the service is slow.
pub struct Proxy {
    /// Where clients connect.
    pub addr: std::net::SocketAddr,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    cut: tokio::sync::watch::Sender<u64>,
    held: tokio::sync::watch::Sender<bool>,
}

impl Proxy {
    /// Starts forwarding `127.0.0.1:<free port>` to `target`.
    pub async fn start(target: std::net::SocketAddr) -> Self {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().unwrap();
        let up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (cut, _) = tokio::sync::watch::channel(0u64);
        let (held, _) = tokio::sync::watch::channel(false);
        let (up2, cut2, held2) = (up.clone(), cut.clone(), held.clone());
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                if !up2.load(Ordering::SeqCst) {
                    drop(inbound); // refused: closed at once
                    continue;
                }
                let mut cut_rx = cut2.subscribe();
                let held = held2.clone();
                tokio::spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    let (from_client, to_client) = inbound.into_split();
                    let (from_service, to_service) = outbound.into_split();
                    tokio::select! {
                        _ = async {
                            tokio::join!(
                                forward(from_client, to_service, held.subscribe()),
                                forward(from_service, to_client, held.subscribe()),
                            )
                        } => {}
                        _ = cut_rx.changed() => {}
                    }
                });
            }
        });
        Self {
            addr,
            up,
            cut,
            held,
        }
    }

    /// Drops every open connection and refuses new ones.
    pub fn cut(&self) {
        self.up.store(false, std::sync::atomic::Ordering::SeqCst);
        self.cut.send_modify(|n| *n += 1);
    }

    /// Accepts connections again.
    pub fn restore(&self) {
        self.up.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Stops moving bytes in either direction; connections stay open.
    pub fn hold(&self) {
        self.held.send_replace(true);
    }

    /// Moves bytes again, what was held first.
    pub fn release(&self) {
        self.held.send_replace(false);
    }
}

/// Copies `from` to `to` until either ends, waiting while `held`.
async fn forward(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut held: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if held.wait_for(|h| !*h).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// Publishes with mosquitto_pub (a real, independent client); panics if it fails.
pub fn mosquitto_pub(
    endpoint: &termopar_core::settings::MqttEndpoint,
    topic: &str,
    payload: &[u8],
    qos: u8,
    version: &str,
) {
    let status = mosquitto_pub_status(endpoint, topic, payload, qos, version, None);
    assert!(status.success(), "mosquitto_pub failed: {status}");
}

/// Runs mosquitto_pub with optional credentials; returns its exit status.
pub fn mosquitto_pub_status(
    endpoint: &termopar_core::settings::MqttEndpoint,
    topic: &str,
    payload: &[u8],
    qos: u8,
    version: &str,
    credentials: Option<(&str, &str)>,
) -> std::process::ExitStatus {
    let file = std::env::temp_dir().join(format!("payload-{}", Uuid::new_v4().simple()));
    std::fs::write(&file, payload).unwrap();
    let mut cmd = std::process::Command::new("mosquitto_pub");
    cmd.args([
        "-h",
        &endpoint.host,
        "-p",
        &endpoint.port.to_string(),
        "-t",
        topic,
    ])
    .args(["-q", &qos.to_string(), "-V", version, "-f"])
    .arg(&file)
    .args(["-i", &format!("pub-{}", Uuid::new_v4().simple())]);
    if let Some((u, p)) = credentials {
        cmd.args(["-u", u, "-P", p]);
    }
    let status = cmd
        .status()
        .expect("mosquitto_pub is installed (make services)");
    let _ = std::fs::remove_file(file);
    status
}

/// Every stored reading, read the way nothing in production does: every segment and
/// fragment collection whole, keeping the segments PostgreSQL registers (a scan is fine
/// for a test's readings, and leaves out segments that are only expiring).
pub async fn stored_readings(
    pool: &PgPool,
    mongo: &mongodb::Database,
) -> Vec<termopar_core::reading::Reading> {
    use std::collections::HashSet;
    use termopar_core::store::{Segment, FRAGMENTS, SEGMENTS};
    let registered: HashSet<Vec<u8>> = sqlx::query_scalar::<_, Vec<u8>>("SELECT doc FROM raw_docs")
        .fetch_all(pool)
        .await
        .expect("list registered segments")
        .into_iter()
        .collect();
    let mut readings = Vec::new();
    let names = mongo
        .list_collection_names()
        .await
        .expect("list collections");
    for name in names
        .iter()
        .filter(|n| *n == SEGMENTS || n.starts_with(FRAGMENTS))
    {
        let mut cursor = mongo
            .collection::<mongodb::bson::RawDocumentBuf>(name)
            .find(mongodb::bson::doc! {})
            .await
            .expect("read segments");
        while cursor.advance().await.expect("read segments") {
            let segment = Segment::decode(cursor.current()).expect("a segment document");
            if registered.contains(segment.id.bytes().as_slice()) {
                readings.extend(segment.readings);
            }
        }
    }
    readings
}

/// How many readings are stored (registered), without reading the document store.
pub async fn stored_count(pool: &PgPool) -> u64 {
    sqlx::query_scalar::<_, i64>("SELECT coalesce(sum(count), 0)::int8 FROM raw_docs")
        .fetch_one(pool)
        .await
        .expect("count stored readings") as u64
}

/// A FerretDB process of one test's own (the binary `make services` built, named by
/// `FERRETDB_BIN`), on a free port, over SQLite files in a directory of its own: a test
/// may kill and restart it without touching anyone else's document store.
pub struct PrivateFerret {
    /// Where it listens.
    pub addr: std::net::SocketAddr,
    dir: std::path::PathBuf,
    child: Option<std::process::Child>,
}

impl PrivateFerret {
    /// Starts one over a new directory under `root`.
    pub async fn start(root: &std::path::Path) -> Self {
        let dir = root.join(format!("ferretdb-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("create the FerretDB directory");
        let mut ferret = Self {
            addr: std::net::SocketAddr::from(([127, 0, 0, 1], free_port())),
            dir,
            child: None,
        };
        ferret.restart().await;
        ferret
    }

    /// Its process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(std::process::Child::id)
    }

    /// Settings of a database named `database` on it.
    pub fn settings(&self, database: &str) -> MongoSettings {
        MongoSettings {
            uri: format!("mongodb://{}", self.addr),
            database: database.to_owned(),
        }
    }

    /// Stops it (SIGKILL: as a crash) and waits for the process to end.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it (again) on the same port and files; returns once it accepts connections.
    pub async fn restart(&mut self) {
        self.kill();
        let bin = std::env::var("FERRETDB_BIN")
            .expect("FERRETDB_BIN names FerretDB's binary (scripts/services.sh env)");
        for sub in ["sqlite", "state"] {
            std::fs::create_dir_all(self.dir.join(sub)).expect("FerretDB's directories");
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("ferretdb.log"))
            .expect("FerretDB's log");
        let child = std::process::Command::new(&bin)
            .arg("--handler=sqlite")
            .arg(format!(
                "--sqlite-url=file:{}/sqlite/?_pragma=synchronous(normal)",
                self.dir.display()
            ))
            .arg(format!("--state-dir={}/state", self.dir.display()))
            .arg(format!("--listen-addr={}", self.addr))
            .arg(format!("--debug-addr=127.0.0.1:{}", free_port()))
            .args(["--telemetry=disable", "--log-level=warn"])
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start FerretDB ({bin}): {e}"));
        self.child = Some(child);
        let addr = self.addr;
        eventually(
            "the private FerretDB answers",
            Duration::from_secs(30),
            || async move { tokio::net::TcpStream::connect(addr).await.ok().map(|_| ()) },
        )
        .await;
    }
}

impl PrivateFerret {
    /// Makes its disk read-only until the returned guard ends: from then on, every write
    /// to its files (`pwrite64`), `fsync`, `fdatasync` and `ftruncate` fails with `EROFS`,
    /// what a filesystem the kernel remounted read-only answers, until
    /// [`ReadOnlyDisk::end`]. Done with `strace` fault injection: a real read-only remount
    /// of the directory is refused while FerretDB holds its files open for writing
    /// (`mount point is busy`). Reads, and its network writes (`write`), go on.
    /// Returns once the first write has failed (so the fault is known to be in place).
    pub async fn read_only_disk(&self) -> ReadOnlyDisk {
        let pid = self
            .child
            .as_ref()
            .expect("the private FerretDB is running")
            .id();
        let log = self
            .dir
            .join(format!("strace-{}.log", Uuid::new_v4().simple()));
        let tracer = std::process::Command::new("strace")
            .args(["-f", "-qq", "-p", &pid.to_string()])
            .args(["-e", "trace=pwrite64,fsync,fdatasync,ftruncate"])
            .args([
                "-e",
                "inject=pwrite64,fsync,fdatasync,ftruncate:error=EROFS",
            ])
            .arg("-o")
            .arg(&log)
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("start strace (make services installs it)");
        let fault = ReadOnlyDisk {
            tracer: Some(tracer),
            log,
        };
        eventually(
            "a write of FerretDB failing with EROFS",
            Duration::from_secs(60),
            || async { (fault.failed_writes() > 0).then_some(()) },
        )
        .await;
        fault
    }
}

/// A FerretDB disk made read-only by [`PrivateFerret::read_only_disk`]; writable again
/// when ended or dropped.
pub struct ReadOnlyDisk {
    tracer: Option<std::process::Child>,
    log: std::path::PathBuf,
}

impl ReadOnlyDisk {
    /// Writes refused so far.
    pub fn failed_writes(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .map(|log| log.matches("EROFS").count())
            .unwrap_or(0)
    }

    /// Makes the disk writable again (strace detaches on SIGINT) and returns the number
    /// of writes refused.
    pub fn end(mut self) -> usize {
        self.detach();
        self.failed_writes()
    }

    fn detach(&mut self) {
        if let Some(mut tracer) = self.tracer.take() {
            let _ = std::process::Command::new("kill")
                .args(["-INT", &tracer.id().to_string()])
                .status();
            let _ = tracer.wait();
        }
    }
}

impl Drop for ReadOnlyDisk {
    fn drop(&mut self) {
        self.detach();
    }
}

impl Drop for PrivateFerret {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A PostgreSQL server of one test's own (Debian's binaries, a cluster made by `initdb`
/// in a directory of its own, on a free port): a test may stop and start it again.
pub struct PrivatePg {
    /// Its port on 127.0.0.1.
    pub port: u16,
    dir: std::path::PathBuf,
    bin: std::path::PathBuf,
}

impl PrivatePg {
    /// Makes the cluster and starts it.
    pub async fn start() -> Self {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL is installed (make services)")
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .max()
            .map(|v| std::path::PathBuf::from(format!("/usr/lib/postgresql/{v}/bin")))
            .expect("a PostgreSQL version in /usr/lib/postgresql");
        let dir = std::env::temp_dir().join(format!("termopar-pg-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("the cluster's directory");
        let pg = Self {
            port: free_port(),
            dir,
            bin,
        };
        if pg.as_root() {
            pg.run(
                std::process::Command::new("chown")
                    .arg("postgres:postgres")
                    .arg(&pg.dir),
            );
        }
        pg.run(
            pg.command("initdb")
                .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
                .arg(pg.dir.join("data")),
        );
        pg.start_again().await;
        pg
    }

    /// Connection options of its `postgres` database.
    pub fn options(&self) -> PgConnectOptions {
        PgConnectOptions::new()
            .host("127.0.0.1")
            .port(self.port)
            .username("postgres")
            .database("postgres")
    }

    /// Stops it as an operator's restart does (`pg_ctl stop -m fast`: sessions are ended,
    /// transactions in progress rolled back) and waits until it is down.
    pub fn stop(&self) {
        self.run(self.ctl().args(["stop", "-w", "-m", "fast"]));
    }

    /// Starts it; returns once it accepts connections.
    pub async fn start_again(&self) {
        self.run(
            self.ctl()
                .args(["start", "-w", "-l"])
                .arg(self.dir.join("log"))
                .arg("-o")
                .arg(format!(
                    "-p {} -k {} -c listen_addresses=127.0.0.1 -c shared_buffers=32MB",
                    self.port,
                    self.dir.display()
                )),
        );
        let options = self.options();
        eventually(
            "the private PostgreSQL answers",
            Duration::from_secs(30),
            || {
                let options = options.clone();
                async move { PgConnection::connect_with(&options).await.ok().map(|_| ()) }
            },
        )
        .await;
    }

    fn as_root(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata("/proc/self")
            .map(|m| m.uid() == 0)
            .unwrap_or(false)
    }

    /// A command of PostgreSQL's, as the `postgres` user when running as root (the server
    /// refuses to run as root).
    fn command(&self, name: &str) -> std::process::Command {
        let program = self.bin.join(name);
        if self.as_root() {
            let mut command = std::process::Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(program);
            command
        } else {
            std::process::Command::new(program)
        }
    }

    fn ctl(&self) -> std::process::Command {
        let mut command = self.command("pg_ctl");
        command.arg("-D").arg(self.dir.join("data"));
        command
    }

    fn run(&self, command: &mut std::process::Command) {
        let output = command.output().expect("run a PostgreSQL command");
        assert!(
            output.status.success(),
            "{command:?} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        let _ = self
            .ctl()
            .args(["stop", "-m", "immediate"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
