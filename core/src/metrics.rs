//! Prometheus metrics shared by every service.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        OnceLock,
    },
    time::Duration,
};

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Latency buckets in seconds, from 100 µs to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// How often histogram samples recorded since are folded into their buckets.
///
/// The recorder keeps every histogram sample as recorded until a scrape renders it or its
/// upkeep runs, and a recorder built with `build_recorder` runs no upkeep of its own: a
/// node nobody scrapes (what `make run` starts) kept every sample it ever recorded,
/// ~16 bytes per histogram sample (several per batch stored, store call and request),
/// for as long as it ran.
pub const UPKEEP_EVERY: Duration = Duration::from_secs(1);

static UPKEEPS: AtomicU64 = AtomicU64::new(0);

/// The process-wide recorder, installed on first call (with a thread that runs its
/// upkeep every [`UPKEEP_EVERY`]). Every service in a process (edge mode runs several)
/// shares it and renders it at its own `/metrics`.
pub fn prometheus() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(LATENCY_BUCKETS)
                .expect("static buckets are valid")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (a test harness): then ours only
            // renders what it sees, which is still a valid, empty exposition.
            let _ = metrics::set_global_recorder(recorder);
            let upkept = handle.clone();
            std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || loop {
                    std::thread::sleep(UPKEEP_EVERY);
                    upkept.run_upkeep();
                    UPKEEPS.fetch_add(1, Ordering::Release);
                })
                .expect("failed to start the metrics upkeep thread");
            handle
        })
        .clone()
}

/// Upkeeps of the recorder run so far (see [`UPKEEP_EVERY`]).
pub fn upkeeps() -> u64 {
    UPKEEPS.load(Ordering::Acquire)
}

/// Installs the recorder and binds `addr`, then returns the server of `/metrics`
/// (Prometheus text) and `/health`, which runs until `shutdown`: the operations endpoints
/// of the processes that have no API of their own (broker, consumer). Both happen before
/// this returns, so a metric recorded right after is never lost to a recorder installed
/// late, and an address already taken is an error at start instead of a silent task.
pub async fn serve(
    addr: std::net::SocketAddr,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<impl std::future::Future<Output = anyhow::Result<()>> + Send> {
    use poem::{
        get, handler,
        listener::{Listener, TcpListener},
        Route, Server,
    };

    #[handler]
    fn metrics_text() -> poem::Response {
        poem::Response::builder()
            .content_type("text/plain; version=0.0.4")
            .body(prometheus().render())
    }

    #[handler]
    fn health() -> &'static str {
        "{\"status\":\"ok\"}"
    }

    prometheus();
    let acceptor = TcpListener::bind(addr)
        .into_acceptor()
        .await
        .map_err(|e| anyhow::anyhow!("cannot serve metrics on {addr}: {e}"))?;
    tracing::info!(%addr, "metrics listening");
    let app = Route::new()
        .at("/metrics", get(metrics_text))
        .at("/health", get(health));
    Ok(async move {
        Server::new_with_acceptor(acceptor)
            .run_with_graceful_shutdown(app, shutdown, None)
            .await?;
        Ok(())
    })
}
