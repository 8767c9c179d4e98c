//! The replicas' heartbeats and 429s on `{queue}.members` (partitioned mode, docs/scale-out.md
//! 4.8): the I/O around [`crate::engine::membership`], for one session.
//!
//! A fanout exchange, read by each replica through an exclusive, server-named classic queue (it
//! goes with the connection). Every [`Timing::interval`], and at once when a partition delivers
//! to it for the first time in the session ([`Members::hold`]), the replica publishes its
//! heartbeat;
//! every heartbeat read, its own included, goes to the membership (a replica heard for the first
//! time is answered with a heartbeat at once, so a join costs the others a round trip of
//! holding back, not an interval), and the share it gives is applied to the rate limiter at once, and at least every [`EVALUATE`] as time passes (a lease
//! that runs out ends the share within that). A 429 this replica got is passed on; one another
//! replica got closes this replica's bucket too.
//!
//! When the session ends, so does the share (0 until the next session's membership gives one).
//! At shutdown, [`Members::leave`] gives it up and says so, after the last calls are over.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connection};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};
use uuid::Uuid;

use crate::contract::members::{self, Said};
use crate::contract::trail::TrailKey;
use crate::engine::membership::{Membership, Share, Timing};
use crate::engine::ratelimit::Limiter;
use crate::runtime::telemetry::Metrics;

/// How often the share is worked out again while nothing is heard.
pub const EVALUATE: Duration = Duration::from_millis(100);
/// Heartbeats a reader may fall behind by before the oldest are dropped (the newest matter).
const QUEUE_LENGTH: i64 = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum MembersError {
    #[error("RabbitMQ channel of the replicas' heartbeats: {0}")]
    Channel(#[from] lapin::Error),
    #[error("the consumer of the replicas' heartbeats was cancelled or closed")]
    ConsumerEnded,
}

/// What the session's task and [`Members::leave`] share.
struct Shared {
    membership: Mutex<Membership>,
    channel: Channel,
    exchange: String,
    key: TrailKey,
    limiter: Arc<Limiter>,
    metrics: Arc<Metrics>,
    /// A heartbeat is due now, not at the next interval (a new holding).
    beat_now: Notify,
}

impl Shared {
    /// No share: the session is over (or the replica leaves).
    fn give_up(&self) {
        self.limiter.set_share(0.0);
        self.metrics.rate_share.set(0.0);
        self.metrics.replicas.set(0);
    }

    /// The share now, applied.
    fn apply(&self, now: Instant) -> Share {
        let (share, counted) = {
            let membership = self.membership.lock().expect("membership lock");
            (membership.share(now), membership.counted(now).len())
        };
        self.limiter.set_share(share.fraction());
        self.metrics.rate_share.set(share.fraction());
        self.metrics.replicas.set(counted as i64);
        share
    }

    async fn say(&self, said: &Said) -> Result<(), lapin::Error> {
        let (body, properties) = members::encode(said, &self.key);
        // Not confirmed: a heartbeat is its own confirm (read back, it gives the lease).
        let confirm = self
            .channel
            .basic_publish(
                self.exchange.as_str().into(),
                "".into(),
                BasicPublishOptions::default(),
                &body,
                properties,
            )
            .await?;
        drop(confirm);
        Ok(())
    }

    async fn beat(&self) -> Result<(), lapin::Error> {
        let heartbeat = self
            .membership
            .lock()
            .expect("membership lock")
            .heartbeat(Instant::now());
        self.say(&Said::Heartbeat(heartbeat)).await
    }
}

/// One session's membership.
pub struct Members {
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<MembersError>,
}

impl Members {
    /// Subscribes to `exchange` and starts beating. The share is 0 until the membership gives
    /// one; it goes back to 0 when `alive` ends or the task fails.
    pub async fn start(
        connection: &Connection,
        exchange: &str,
        key: TrailKey,
        limiter: Arc<Limiter>,
        metrics: Arc<Metrics>,
        alive: CancellationToken,
    ) -> Result<Members, MembersError> {
        let channel = connection.create_channel().await?;
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from("classic")),
        );
        args.insert("x-max-length".into(), AMQPValue::LongLongInt(QUEUE_LENGTH));
        let queue = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                args,
            )
            .await?;
        channel
            .queue_bind(
                queue.name().as_str().into(),
                exchange.into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let consumer = channel
            .basic_consume(
                queue.name().as_str().into(),
                "blinger-worker-members".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        let me = Uuid::new_v4();
        let shared = Arc::new(Shared {
            membership: Mutex::new(Membership::new(me, Timing::DEFAULT, Instant::now())),
            channel,
            exchange: exchange.to_owned(),
            key,
            limiter,
            metrics,
            beat_now: Notify::new(),
        });
        debug!(incarnation = %me, "joined the replicas' heartbeats");
        let task = tokio::spawn(run(shared.clone(), consumer, alive));
        Ok(Members { shared, task })
    }

    /// Waits until the task fails (the session is then over).
    pub async fn failed(&mut self) -> MembersError {
        match (&mut self.task).await {
            Ok(e) => e,
            Err(_) => MembersError::ConsumerEnded,
        }
    }

    /// Partition `p` delivered to this replica (its first delivery in the session): it counts
    /// toward this replica's share once the others have heard of it, a round trip from now.
    pub fn hold(&self, p: u16) {
        let new = self
            .shared
            .membership
            .lock()
            .expect("membership lock")
            .hold(p);
        if new {
            self.shared.beat_now.notify_one();
        }
    }

    /// Gives the share up and tells the others, who take it over at once: the last step of a
    /// replica that stops, once its calls are over.
    pub async fn leave(self) {
        self.shared
            .membership
            .lock()
            .expect("membership lock")
            .leave();
        self.shared.apply(Instant::now());
        self.task.abort();
        if let Err(e) = self.shared.beat().await {
            debug!(error = %e, "the leaving heartbeat was not sent; the others wait out the lease");
        }
    }
}

impl Drop for Members {
    fn drop(&mut self) {
        self.task.abort();
        self.shared.give_up();
    }
}

async fn run(
    shared: Arc<Shared>,
    mut consumer: lapin::Consumer,
    alive: CancellationToken,
) -> MembersError {
    let timing = shared.membership.lock().expect("membership lock").timing();
    let mut beat = tokio::time::interval(timing.interval);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut evaluate = tokio::time::interval(EVALUATE);
    let mut throttles = shared.limiter.local_throttles();
    let me = shared.membership.lock().expect("membership lock").me();
    let mut last = Share::None(crate::engine::membership::Waiting::Lease);
    let failed = loop {
        tokio::select! {
            _ = alive.cancelled() => break MembersError::ConsumerEnded,
            _ = beat.tick() => if let Err(e) = shared.beat().await {
                break e.into();
            },
            _ = shared.beat_now.notified() => if let Err(e) = shared.beat().await {
                break e.into();
            },
            _ = evaluate.tick() => {
                shared.membership.lock().expect("membership lock").expire(Instant::now());
            }
            changed = throttles.changed() => {
                if changed.is_err() {
                    continue;
                }
                let until = *throttles.borrow_and_update();
                if let Some(pause) = until.map(|u| u.saturating_duration_since(Instant::now()))
                    && let Err(e) = shared.say(&Said::Throttle { from: me, pause }).await
                {
                    break e.into();
                }
            }
            delivery = consumer.next() => match delivery {
                Some(Ok(delivery)) => {
                    match members::decode(&delivery.properties, &delivery.data, &shared.key) {
                        Ok(Said::Heartbeat(heartbeat)) => {
                            let newcomer = shared
                                .membership
                                .lock()
                                .expect("membership lock")
                                .heard(&heartbeat, Instant::now());
                            if newcomer && let Err(e) = shared.beat().await {
                                break e.into();
                            }
                        }
                        Ok(Said::Throttle { from, pause }) => {
                            if from != me {
                                shared.limiter.throttle_from_peer(pause);
                                shared.metrics.peer_throttles.inc();
                            }
                        }
                        Err(unusable) => {
                            shared.metrics.members_rejected.inc();
                            debug!(%unusable, "ignored a message on the replicas' exchange");
                        }
                    }
                }
                Some(Err(e)) => break e.into(),
                None => break MembersError::ConsumerEnded,
            },
        }
        let share = shared.apply(Instant::now());
        if share != last {
            // Info when sending starts or stops, debug as the part changes (a takeover of 16
            // partitions changes it 16 times in a few milliseconds).
            match (last, share) {
                (Share::Of { .. }, Share::Of { held, among }) => debug!(
                    held,
                    among,
                    "rate limit: this replica's part is {held} of the {among} partitions held"
                ),
                (_, Share::Of { held, among }) => info!(
                    held,
                    among,
                    "rate limit: this replica's part is {held} of the {among} partitions held"
                ),
                (_, Share::None(why)) => info!(?why, "no share of the rate limit"),
            }
            last = share;
        }
    };
    shared.give_up();
    failed
}
