//! The delivery engine: what happens to a job between its arrival and its ack, with no knowledge
//! of how the broker or Blinger are reached beyond their clients.
//!
//! - [`dispatch`]: per-conversation lanes, the concurrency cap and the keyless permits;
//! - [`order`]: order per conversation across delay tiers and restarts (the chains);
//! - [`fair`]: the fair share of the prefetch (deferral of the newest job of a big lane);
//! - [`retry`]: backoff and the delay tiers; [`ratelimit`]: the global request cap;
//! - [`membership`]: the live replicas and this one's share of the cap (partitioned mode);
//! - [`pause`]: pausing on 401/403 and the probe that resumes;
//! - [`decide`]: what follows a call Blinger did not accept (a pure table);
//! - [`pipeline`]: one job from delivery to ack, driving the above;
//! - [`partition`]: which partition queue a conversation belongs to (partitioned mode).

pub mod decide;
pub mod dispatch;
pub mod fair;
pub mod membership;
pub mod order;
pub mod ownership;
pub mod partition;
pub mod pause;
pub mod pipeline;
pub mod ratelimit;
pub mod retry;
