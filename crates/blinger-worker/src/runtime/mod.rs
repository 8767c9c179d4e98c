//! The running process: the worker's lifecycle and reconnects ([`worker`]), signals and the
//! shutdown budget ([`shutdown`]), metrics, health flags and logs ([`telemetry`]) and the ops
//! port (`/metrics`, `/healthz`, `/readyz`: [`ops_http`]).

pub mod ops_http;
pub mod shutdown;
pub mod telemetry;
pub mod worker;
