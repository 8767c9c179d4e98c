//! The operations port: `GET /metrics` (Prometheus text), `GET /healthz` (the process is alive:
//! 503 when it is stuck, paused on 401/403 with jobs waiting and none probing for 2 minutes),
//! `GET /readyz` (broker channel open, store writable, not paused by 401/403; 503 with the reason
//! otherwise), and read-only views of the store, `GET /store/stats` and `GET /store/{uuid}`: the
//! store is locked by the running worker, so `blinger-worker store get` asks here instead. They
//! show what the store holds for a job id (no secrets; ids are unguessable UUIDs).
//!
//! The port is open to whatever can reach the pod, so no client can make it cost the worker more
//! than a fixed amount ([`Limits`]):
//! - at most [`Limits::max_connections`] connections are served at once; further ones wait in the
//!   kernel's accept backlog (no file descriptor, no task, no buffer in the worker) until one
//!   ends;
//! - a connection that does not send a complete request head within
//!   [`Limits::header_read_timeout`] (a slowloris client, or an idle keep-alive connection) is
//!   closed, so a slot is never held for long;
//! - request heads are read into a buffer of at most [`Limits::max_buf_size`] bytes;
//! - `/store/stats` counts every record (sled has no cheaper count): the count runs on a blocking
//!   thread, one at a time, and a count less than [`STATS_FRESH`] old answers the requests that
//!   arrive meanwhile, so no request scans the store on a runtime thread and a flood of requests
//!   costs one scan.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{Mutex, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

use crate::runtime::telemetry::{Health, Metrics};
use crate::store::{Store, StoreError, StoreStats};

/// What one client can cost the worker through the ops port.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once.
    pub max_connections: usize,
    /// Time a connection has to send a complete request head, counted from its start or from the
    /// end of its previous request.
    pub header_read_timeout: Duration,
    /// Read buffer of one connection (hyper's minimum is 8 KiB).
    pub max_buf_size: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            // Kubelet probes, a Prometheus scrape and an operator command need a handful.
            max_connections: 64,
            header_read_timeout: Duration::from_secs(5),
            max_buf_size: 16 * 1024,
        }
    }
}

/// How long a store count answers later `/store/stats` requests.
pub const STATS_FRESH: Duration = Duration::from_secs(5);

/// Counts the store (blocking: it reads every record).
type Count = Arc<dyn Fn() -> Result<StoreStats, StoreError> + Send + Sync>;

#[derive(Clone)]
struct Ops {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    store: Store,
    count: Count,
    /// The last store count and when it was taken; locked for the length of a count, so counts
    /// never run concurrently.
    stats: Arc<Mutex<Option<(Instant, StoreStats)>>>,
}

/// Binds the port; an error names the setting.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, std::io::Error> {
    TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot listen on {addr} (BLINGER_WORKER_METRICS_ADDR): {e}"),
        )
    })
}

/// Serves with the default [`Limits`] until `stop` fires.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    store: Store,
    stop: CancellationToken,
) -> std::io::Result<()> {
    serve_with(listener, metrics, health, store, stop, Limits::default()).await
}

/// Serves until `stop` fires; then lets the requests in progress finish (at most
/// `header_read_timeout` more) and returns.
pub async fn serve_with(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    store: Store,
    stop: CancellationToken,
    limits: Limits,
) -> std::io::Result<()> {
    let count: Count = {
        let store = store.clone();
        Arc::new(move || store.stats())
    };
    serve_ops(listener, metrics, health, store, count, stop, limits).await
}

async fn serve_ops(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    store: Store,
    count: Count,
    stop: CancellationToken,
    limits: Limits,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(live))
        .route("/readyz", get(ready))
        .route("/store/stats", get(store_stats))
        .route("/store/{id}", get(store_get))
        .with_state(Ops {
            metrics,
            health,
            store,
            count,
            stats: Arc::new(Mutex::new(None)),
        });
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let connections = TaskTracker::new();
    loop {
        // A slot first, then the accept: past the limit, connections stay in the backlog.
        let slot = tokio::select! {
            _ = stop.cancelled() => break,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                // Out of file descriptors and the like: wait a little instead of spinning.
                Err(e) => {
                    debug!(error = %e, "ops port: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let service = TowerToHyperService::new(app.clone());
        let stop = stop.clone();
        connections.spawn(async move {
            let _slot = slot;
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .max_buf_size(limits.max_buf_size.max(8192));
            let conn = http.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let result = tokio::select! {
                result = conn.as_mut() => result,
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    match tokio::time::timeout(limits.header_read_timeout, conn.as_mut()).await {
                        Ok(result) => result,
                        Err(_) => Ok(()),
                    }
                }
            };
            if let Err(e) = result {
                debug!(%peer, error = %e, "ops port: connection ended");
            }
        });
    }
    connections.close();
    connections.wait().await;
    Ok(())
}

async fn metrics_text(State(ops): State<Ops>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        ops.metrics.render(),
    )
}

/// 200 unless the worker is stuck in a state it cannot leave (then Kubernetes restarts it).
async fn live(State(ops): State<Ops>) -> impl IntoResponse {
    match ops.health.not_live_reason(tokio::time::Instant::now()) {
        None => (StatusCode::OK, "ok\n".to_owned()),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not live: {reason}\n"),
        ),
    }
}

async fn ready(State(ops): State<Ops>) -> impl IntoResponse {
    match ops.health.not_ready_reason() {
        None => (StatusCode::OK, "ready\n".to_owned()),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        ),
    }
}

async fn store_stats(State(ops): State<Ops>) -> axum::response::Response {
    let mut last = ops.stats.lock().await;
    if let Some((at, stats)) = last.as_ref()
        && at.elapsed() < STATS_FRESH
    {
        return Json(stats.clone()).into_response();
    }
    let count = ops.count.clone();
    match tokio::task::spawn_blocking(move || count()).await {
        Ok(Ok(stats)) => {
            *last = Some((Instant::now(), stats.clone()));
            Json(stats).into_response()
        }
        Ok(Err(e)) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "store count failed\n").into_response(),
    }
}

async fn store_get(State(ops): State<Ops>, Path(id): Path<String>) -> axum::response::Response {
    let Ok(id) = uuid::Uuid::try_parse(&id) else {
        return (StatusCode::BAD_REQUEST, "not a UUID\n").into_response();
    };
    // One lookup, but it may read the disk: not on a runtime thread either.
    let store = ops.store.clone();
    match tokio::task::spawn_blocking(move || store.get(&id)).await {
        Ok(Ok(Some(record))) => Json(record).into_response(),
        Ok(Ok(None)) => (StatusCode::NOT_FOUND, "not delivered\n").into_response(),
        Ok(Err(e)) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "store lookup failed\n").into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    struct Port {
        addr: SocketAddr,
        stop: CancellationToken,
        _dir: tempfile::TempDir,
    }

    async fn start(limits: Limits) -> Port {
        start_counting(limits, None).await
    }

    /// With `count`, the store count is that function instead of the store's.
    async fn start_counting(limits: Limits, count: Option<Count>) -> Port {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Metrics::new();
        let health = Health::new(metrics.clone());
        let stop = CancellationToken::new();
        let count = count.unwrap_or_else(|| {
            let store = store.clone();
            Arc::new(move || store.stats())
        });
        tokio::spawn(serve_ops(
            listener,
            metrics,
            health,
            store,
            count,
            stop.clone(),
            limits,
        ));
        Port {
            addr,
            stop,
            _dir: dir,
        }
    }

    /// Reads until the server closes the connection or `within` passes; the bytes read, and
    /// whether it closed.
    async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> (String, bool) {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
                Err(_) => return (String::from_utf8_lossy(&seen).into_owned(), false),
                Ok(Ok(0)) | Ok(Err(_)) => {
                    return (String::from_utf8_lossy(&seen).into_owned(), true);
                }
                Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
            }
        }
    }

    #[tokio::test]
    async fn a_slow_or_silent_client_is_cut_off() {
        let port = start(Limits {
            header_read_timeout: Duration::from_millis(300),
            ..Limits::default()
        })
        .await;
        // Slowloris: a request head that never ends.
        let mut slow = TcpStream::connect(port.addr).await.unwrap();
        slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        // And a connection that says nothing at all.
        let mut silent = TcpStream::connect(port.addr).await.unwrap();
        let (_, closed) = read_until_closed(&mut slow, Duration::from_secs(5)).await;
        assert!(closed, "a request head trickling in kept its connection");
        let (_, closed) = read_until_closed(&mut silent, Duration::from_secs(5)).await;
        assert!(closed, "a silent connection was kept");
        // A real request is still answered.
        let mut ok = TcpStream::connect(port.addr).await.unwrap();
        ok.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let (answer, _) = read_until_closed(&mut ok, Duration::from_secs(5)).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        port.stop.cancel();
    }

    #[tokio::test]
    async fn connections_past_the_limit_wait_for_a_free_slot() {
        let port = start(Limits {
            max_connections: 2,
            header_read_timeout: Duration::from_secs(60),
            ..Limits::default()
        })
        .await;
        let idle_a = TcpStream::connect(port.addr).await.unwrap();
        let idle_b = TcpStream::connect(port.addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut waiting = TcpStream::connect(port.addr).await.unwrap();
        waiting
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let (answer, _) = read_until_closed(&mut waiting, Duration::from_secs(1)).await;
        assert_eq!(answer, "", "served past the connection limit");
        drop(idle_a);
        let (answer, _) = read_until_closed(&mut waiting, Duration::from_secs(5)).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
        drop(idle_b);
        port.stop.cancel();
    }

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        read_until_closed(&mut s, Duration::from_secs(30)).await.0
    }

    /// The store count runs off the runtime, one at a time: on a single-threaded runtime, where
    /// a count on the runtime thread would stop everything else, a flood of `/store/stats`
    /// requests over a store that takes a second to count costs one count, and `/healthz` is
    /// answered meanwhile.
    #[tokio::test(flavor = "current_thread")]
    async fn store_counts_never_stall_the_runtime() {
        let counts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count: Count = {
            let counts = counts.clone();
            Arc::new(move || {
                counts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                // A big store: sled counts by reading every record.
                std::thread::sleep(Duration::from_secs(1));
                Ok(StoreStats {
                    records: 7,
                    size_on_disk_bytes: 1,
                })
            })
        };
        let port = start_counting(Limits::default(), Some(count)).await;
        // Ticks every 10 ms for 1.5 s: a count on the runtime thread makes a one-second gap.
        let ticker = tokio::spawn(async {
            let mut worst = Duration::ZERO;
            let start = Instant::now();
            let mut last = start;
            while start.elapsed() < Duration::from_millis(1500) {
                tokio::time::sleep(Duration::from_millis(10)).await;
                worst = worst.max(last.elapsed());
                last = Instant::now();
            }
            worst
        });
        let stats: Vec<_> = (0..10)
            .map(|_| tokio::spawn(get(port.addr, "/store/stats")))
            .collect();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let started = Instant::now();
        let health = get(port.addr, "/healthz").await;
        let took = started.elapsed();
        assert!(health.starts_with("HTTP/1.1 200"), "{health}");
        assert!(
            took < Duration::from_millis(500),
            "/healthz waited {took:?} for a store count"
        );
        for s in stats {
            let answer = s.await.unwrap();
            assert!(answer.contains("\"records\":7"), "{answer}");
        }
        assert_eq!(
            counts.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "one count for the flood"
        );
        let worst = ticker.await.unwrap();
        assert!(
            worst < Duration::from_millis(500),
            "the runtime stalled for {worst:?}"
        );
        port.stop.cancel();
    }
}
