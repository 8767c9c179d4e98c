//! A stand-in for the Blinger API that tests, the demo and the benchmarks talk to over real HTTP.
//!
//! The worker's promises (exactly-once delivery, per-conversation order, honouring the rate limit
//! and `Retry-After`, never letting a conversation id change the endpoint called) can only be
//! checked against a server that sees every request. The sandbox guarantees:
//!
//! - the four endpoints under [`BASE_PATH`], answering the documented shapes, built from the same
//!   [`blinger_api`] structs the worker parses;
//! - `Authorization` compared byte for byte with the configured token (401 otherwise), and
//!   malformed requests answered 400/413/422;
//! - idempotency on the message `uuid` like a real API: a repeated uuid gets the first message
//!   back and is counted as a duplicate; an injected failure never counts as a delivery;
//! - every request recorded, path still percent-encoded as received, token never kept, in memory
//!   and optionally in a JSONL file, with counters (including the highest per-second arrival
//!   rate) that cost O(1) per request;
//! - switches for latency, 5xx, 429 with `Retry-After`, stalls, downtime and fixed statuses,
//!   changeable while running (`Sandbox::update` or `PUT /_sandbox/config`).
//!
//! Control endpoints (no authorisation, outside the API base path): `GET /_sandbox/stats`,
//! `GET /_sandbox/requests?since=SEQ&limit=N`, `GET|PUT|PATCH /_sandbox/config`,
//! `POST /_sandbox/reset`, `GET /_sandbox/healthz`.

mod config;
mod record;
mod responses;
mod server;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

pub use config::{DEFAULT_TOKEN, SandboxConfig};
pub use record::{Endpoint, InjectedStats, Outcome, RecordedRequest, Stats};
pub use server::BASE_PATH;

use record::{Journal, WriterMsg};
use server::{Shared, lock};

/// How long `shutdown` waits for open connections before abandoning them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// A running sandbox server. Dropping it stops the server (without waiting); prefer
/// [`Sandbox::shutdown`], which also flushes the record file.
pub struct Sandbox {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: Option<JoinHandle<()>>,
}

impl Sandbox {
    /// Binds `addr` (port 0 picks a free port) and serves until shutdown. With `record_file`,
    /// every request is also appended to that file as one JSON line.
    pub async fn start(
        addr: SocketAddr,
        config: SandboxConfig,
        record_file: Option<PathBuf>,
    ) -> std::io::Result<Sandbox> {
        config
            .validate()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let writer = match &record_file {
            Some(path) => Some(record::spawn_writer(path)?),
            None => None,
        };
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::new(config, Journal::new(writer)));
        let app = server::router(shared.clone());
        let cancel = shared.cancel.clone();
        let server = tokio::spawn(async move {
            let serve = axum::serve(listener, app)
                .with_graceful_shutdown(async move { cancel.cancelled().await });
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "sandbox server stopped");
            }
        });
        Ok(Sandbox {
            addr,
            shared,
            server: Some(server),
        })
    }

    /// The address actually bound.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://{addr}/api/external/v1`: what the worker's `BLINGER_API_URL` should be.
    pub fn base_url(&self) -> String {
        format!("http://{}{BASE_PATH}", self.addr)
    }

    /// `http://{addr}`: where the `/_sandbox/*` control endpoints are.
    pub fn root_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request recorded since start or the last reset (up to `max_records`), in `seq` order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.journal).records().to_vec()
    }

    /// The recorded requests with `seq > since`.
    pub fn requests_since(&self, since: u64) -> Vec<RecordedRequest> {
        lock(&self.shared.journal).since(since, usize::MAX)
    }

    pub fn stats(&self) -> Stats {
        self.shared.stats()
    }

    /// Replaces the switches; the next request uses them. A changed `seed` restarts the random
    /// sequence.
    pub fn set_config(&self, config: SandboxConfig) {
        self.shared.set_config(config);
    }

    pub fn config(&self) -> SandboxConfig {
        (*self.shared.config()).clone()
    }

    /// Changes some switches: `sandbox.update(|c| c.error_rate = 0.5)`.
    pub fn update(&self, f: impl FnOnce(&mut SandboxConfig)) {
        self.shared.update(f);
    }

    /// Forgets records, counters and delivered uuids (`seq` keeps counting).
    pub fn reset(&self) {
        self.shared.reset();
    }

    /// Polls every 20 ms until `pred` holds for the recorded requests; false if `timeout` passed
    /// first. `pred` runs under the records lock: keep it to a scan.
    pub async fn wait_for(
        &self,
        pred: impl Fn(&[RecordedRequest]) -> bool,
        timeout: Duration,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if pred(lock(&self.shared.journal).records()) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops accepting, wakes every injected sleep, waits (bounded) for open connections, and
    /// flushes the record file.
    pub async fn shutdown(mut self) {
        self.shared.cancel.cancel();
        if let Some(server) = self.server.take() {
            let abort = server.abort_handle();
            if tokio::time::timeout(SHUTDOWN_GRACE, server).await.is_err() {
                abort.abort();
            }
        }
        self.flush().await;
    }

    /// Writes buffered record lines to the file now.
    pub async fn flush(&self) {
        let writer = lock(&self.shared.journal).writer();
        if let Some(writer) = writer {
            let (ack, done) = tokio::sync::oneshot::channel();
            if writer.send(WriterMsg::Flush(ack)).is_ok() {
                let _ = done.await;
            }
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.shared.cancel.cancel();
    }
}
