//! The operations port: `GET /metrics` (Prometheus text), `GET /healthz` (the process is alive:
//! 503 when it is stuck, paused on 401/403 with jobs waiting and none probing for 2 minutes),
//! `GET /readyz` (broker channel open, store writable, not paused by 401/403; 503 with the reason
//! otherwise), and read-only views of the store, `GET /store/stats` and `GET /store/{uuid}`: the
//! store is locked by the running worker, so `blinger-worker store get` asks here instead. They
//! show what the store holds for a job id (no secrets; ids are unguessable UUIDs).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::store::Store;
use crate::telemetry::{Health, Metrics};

#[derive(Clone)]
struct Ops {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    store: Store,
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

/// Serves until `stop` fires.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    store: Store,
    stop: CancellationToken,
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
        });
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
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
    match ops.store.stats() {
        Ok(stats) => Json(stats).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

async fn store_get(State(ops): State<Ops>, Path(id): Path<String>) -> axum::response::Response {
    let Ok(id) = uuid::Uuid::try_parse(&id) else {
        return (StatusCode::BAD_REQUEST, "not a UUID\n").into_response();
    };
    match ops.store.get(&id) {
        Ok(Some(record)) => Json(record).into_response(),
        Ok(None) => (StatusCode::NOT_FOUND, "not delivered\n").into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}
