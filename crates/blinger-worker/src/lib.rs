//! blinger-worker: a durable RabbitMQ worker that delivers outbound jobs to the Blinger
//! chat-widget API exactly once per job id, in order per conversation, or parks them in a
//! dead-letter queue with the reason.
//!
//! One module per outside system and one per concern:
//! - [`contract`]: what publishers rely on — the job body, the worker's sealed `x-blinger-*`
//!   headers (trail), the receipts;
//! - [`config`]: settings (flags and environment), secrets;
//! - [`broker`]: RabbitMQ — connection, topology, acks, confirmed publishing;
//! - [`blinger`]: Blinger — the HTTP client, its typed answers (crate `blinger-api`), the one
//!   table that classifies failures;
//! - [`store`]: the idempotency store (sled) with group commit, and the chains' journal;
//! - [`engine`]: one job from delivery to ack — dispatch, order, fair share, retry, pause,
//!   rate limit, the pipeline;
//! - [`runtime`]: the process — lifecycle and reconnects, shutdown, telemetry, the ops port;
//! - [`cli`]: the operator commands (`publish`, `dlq`, `store`).
//!
//! The sandbox Blinger is its own crate (`blinger-sandbox`), a dev-dependency only.

pub mod blinger;
pub mod broker;
pub mod cli;
pub mod config;
pub mod contract;
pub mod engine;
pub mod runtime;
pub mod store;
