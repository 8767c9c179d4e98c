//! blinger-worker: a durable RabbitMQ worker that delivers outbound jobs to the Blinger
//! chat-widget API exactly once per job id, in order per conversation, or parks them in a
//! dead-letter queue with the reason.
//!
//! One module per outside system and one per concern:
//! - [`config`]: settings (flags and environment), secrets;
//! - [`job`]: the job contract, decoding and validation; [`trail`]: the worker's own sealed
//!   headers on a job (retries, chain, attempts), decoded once;
//! - [`amqp`]: RabbitMQ connection, topology, confirmed publishing;
//! - [`blinger`]: the Blinger HTTP client and its typed answers;
//! - [`store`]: the idempotency store (sled) with group commit;
//! - [`failure`]: the one place that classifies failures;
//! - [`retry`]: backoff and delay tiers; [`ratelimit`]: the global request cap;
//! - [`pause`]: pausing on 401/403; [`pipeline`]: one job from delivery to ack;
//! - [`receipts`]: outcome events for publishers; [`ops`]: the operator commands;
//! - [`dispatch`]: per-conversation ordering and concurrency; [`order`]: order across delay tiers;
//! - [`telemetry`]: metrics, health flags, logs; [`ops_http`]: /metrics /healthz /readyz;
//! - [`shutdown`]: signals; [`worker`]: lifecycle and reconnects;
//! - [`ops`]: the operator commands (`publish`, `dlq`, `store`);
//! - [`sandbox`]: a stand-in Blinger server for tests, demos and benchmarks.

pub mod amqp;
pub mod blinger;
pub mod config;
pub mod dispatch;
pub mod failure;
pub mod fair;
pub mod job;
pub mod ops;
pub mod ops_http;
pub mod order;
pub mod pause;
pub mod pipeline;
pub mod ratelimit;
pub mod receipts;
pub mod retry;
pub mod sandbox;
pub mod shutdown;
pub mod store;
pub mod telemetry;
pub mod trail;
pub mod worker;
