//! The router of partitioned mode: takes every job from where it arrives and copies it into its
//! conversation's partition queue (docs/scale-out.md 4.3).
//!
//! It reads three queues:
//! - `{queue}.in`, the publishers' jobs. It is a single-active-consumer queue: of the routers of
//!   all replicas one at a time reads it, in publish order, and copies in that order, so the
//!   jobs of a conversation reach their partition in the order they were published;
//! - `{queue}`, the returns of the delay tiers. Their order is kept by their sealed chain
//!   sequence, not by arrival ([`crate::engine::order`]), so routers may compete for it;
//! - `{queue}.unrouted`, what the partitions exchange could not route (a partition queue was
//!   deleted): routed again once the session has re-declared the topology.
//!
//! A message moves as everywhere in the worker: publish, the broker's confirm, then the ack of
//! the original, so a crash in between leaves a duplicate in the partition, never a loss (the
//! partition's owner acks a duplicate without calling Blinger). Publishes are pipelined on one
//! confirm channel and settled in publish order; the acks go out batched ([`Acks`]), each only
//! once its own copy and every earlier one is confirmed. The first refusal ends the router's
//! session: nothing after it is acked, and closing the channels hands those messages back, in
//! order, to whichever router reads the queue next.
//!
//! The router reads only `conversation_id` ([`partition::route`]); a body without a readable one
//! goes to partition [`partition::UNREADABLE`], whose owner dead-letters it with its reason.
//! The copy's properties are [`outgoing::routed`] (the sealed trail kept, nothing that steers).
//!
//! Residual risk, stated: the copies are mandatory, and the partitions exchange has an alternate
//! exchange, so a copy is returned only if both its partition queue and `{queue}.unrouted` were
//! deleted. lapin attributes a `basic.return` to the next confirm it resolves: the return ends the
//! session, but the copy it belonged to may already have been judged confirmed and its original
//! acked.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::select_all;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, PublisherConfirm};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::acks::Acks;
use super::confirms::judge;
use super::outgoing;
use super::topology::{Partitioned, Topology};
use crate::engine::partition;
use crate::runtime::telemetry::Metrics;

/// Unacked messages per input: enough to keep the confirms pipelined.
pub const PREFETCH: u16 = 256;

/// How long a stopping router waits for the confirms of what it already copied.
const SETTLE_AT_STOP: Duration = Duration::from_secs(5);

/// Why a router's session ended other than by [`Router::stop`].
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("RabbitMQ channel of the router: {0}")]
    Channel(#[from] lapin::Error),
    #[error(
        "RabbitMQ refused a copy into partition {partition} ({refusal}); handing back what is not confirmed"
    )]
    Refused {
        partition: String,
        refusal: super::confirms::ConfirmError,
    },
    #[error("the router's consumer of {0} was cancelled or closed")]
    ConsumerEnded(String),
}

/// One queue the router reads.
struct Input {
    queue: String,
    channel: Channel,
    acks: Arc<Acks>,
    tag: String,
}

/// A copy in flight.
struct InFlight {
    input: usize,
    tag: u64,
    partition: u16,
    confirm: PublisherConfirm,
}

/// A running router.
pub struct Router {
    task: tokio::task::JoinHandle<Result<(), RouterError>>,
    stop: CancellationToken,
}

impl Router {
    /// Opens the router's channels on `connection` and starts routing. `alive` ends with the
    /// session.
    pub async fn start(
        connection: &Connection,
        topology: &Topology,
        max_body_bytes: usize,
        metrics: Arc<Metrics>,
        alive: CancellationToken,
    ) -> Result<Router, RouterError> {
        let partitioned = topology
            .partitioned
            .clone()
            .expect("a router only in partitioned mode");
        let publish = connection.create_channel().await?;
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let mut inputs = Vec::new();
        let mut consumers = Vec::new();
        let sources = [
            partitioned.input.clone(),
            topology.queue.clone(),
            partitioned.unrouted.clone(),
        ];
        for (i, queue) in sources.into_iter().enumerate() {
            let channel = connection.create_channel().await?;
            channel
                .basic_qos(PREFETCH, BasicQosOptions::default())
                .await?;
            let tag = format!("blinger-router-{}", uuid::Uuid::new_v4().simple());
            let consumer = channel
                .basic_consume(
                    queue.as_str().into(),
                    tag.as_str().into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            let acks = Arc::new(Acks::new(channel.clone()));
            let flusher = acks.clone();
            let until = alive.clone();
            tokio::spawn(async move { flusher.run(until).await });
            consumers.push(consumer.map(move |d| (i, d)));
            inputs.push(Input {
                queue,
                channel,
                acks,
                tag,
            });
        }
        let stop = CancellationToken::new();
        let routing = Routing {
            partitioned,
            max_body_bytes,
            publish,
            inputs,
            metrics,
        };
        let task = tokio::spawn(routing.run(select_all(consumers), stop.clone()));
        Ok(Router { task, stop })
    }

    /// Waits until the router fails; never returns while it routes.
    pub async fn failed(&mut self) -> RouterError {
        match (&mut self.task).await {
            Ok(Err(e)) => e,
            Ok(Ok(())) => std::future::pending().await,
            Err(e) => RouterError::ConsumerEnded(format!("router task: {e}")),
        }
    }

    /// Stops reading, waits (bounded) for the confirms of what was copied, acks those and
    /// closes the router's channels: what was not copied goes back to its queue, in order.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

struct Routing {
    partitioned: Partitioned,
    max_body_bytes: usize,
    publish: Channel,
    inputs: Vec<Input>,
    metrics: Arc<Metrics>,
}

impl Routing {
    async fn run(
        self,
        mut deliveries: impl futures_util::Stream<
            Item = (usize, lapin::Result<lapin::message::Delivery>),
        > + Unpin,
        stop: CancellationToken,
    ) -> Result<(), RouterError> {
        let (copies, pending) = mpsc::unbounded_channel();
        let acks: Vec<_> = self.inputs.iter().map(|i| i.acks.clone()).collect();
        let mut settler = tokio::spawn(settle(
            pending,
            acks,
            self.partitioned.clone(),
            self.metrics.clone(),
        ));
        let ended = loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => break Ok(()),
                settled = &mut settler => {
                    break Err(match settled {
                        Ok(Err(e)) => e,
                        _ => RouterError::ConsumerEnded("router settler".into()),
                    });
                }
                next = deliveries.next() => match next {
                    Some((input, Ok(delivery))) => {
                        let copy = self.copy(input, delivery).await?;
                        if copies.send(copy).is_err() {
                            // The settler ended on a refusal: the next turn reports it.
                            continue;
                        }
                    }
                    Some((_, Err(e))) => break Err(e.into()),
                    None => break Err(RouterError::ConsumerEnded("every input".into())),
                },
            }
        };
        // Nothing more is copied; what was copied is settled (bounded), and acked.
        for input in &self.inputs {
            let _ = input
                .channel
                .basic_cancel(input.tag.as_str().into(), BasicCancelOptions::default())
                .await;
        }
        drop(copies);
        if !settler.is_finished() {
            let _ = tokio::time::timeout(SETTLE_AT_STOP, &mut settler).await;
        }
        for input in &self.inputs {
            let _ = tokio::time::timeout(SETTLE_AT_STOP, input.acks.flush(true)).await;
            let _ = input.channel.close(200, "router stopped".into()).await;
        }
        let _ = self.publish.close(200, "router stopped".into()).await;
        ended
    }

    /// Publishes the copy of one delivery of `input` into its partition.
    async fn copy(
        &self,
        input: usize,
        delivery: lapin::message::Delivery,
    ) -> Result<InFlight, RouterError> {
        let source = &self.inputs[input];
        source.acks.received(delivery.delivery_tag);
        if source.queue == self.partitioned.unrouted {
            self.metrics.router_unrouted.inc();
        }
        let partition =
            partition::route(&delivery.data, self.max_body_bytes, self.partitioned.count);
        let confirm = self
            .publish
            .basic_publish(
                self.partitioned.exchange.as_str().into(),
                self.partitioned.routing_key(partition).as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &delivery.data,
                outgoing::routed(&delivery.properties),
            )
            .await?;
        Ok(InFlight {
            input,
            tag: delivery.delivery_tag,
            partition,
            confirm,
        })
    }
}

/// Settles the copies in publish order: each confirmed one's original is acked; at the first
/// refusal nothing more is.
async fn settle(
    mut pending: mpsc::UnboundedReceiver<InFlight>,
    acks: Vec<Arc<Acks>>,
    partitioned: Partitioned,
    metrics: Arc<Metrics>,
) -> Result<(), RouterError> {
    while let Some(copy) = pending.recv().await {
        match judge(copy.confirm.await?) {
            Ok(()) => {
                acks[copy.input].done(copy.tag);
                metrics.router_routed.inc();
            }
            Err(refusal) => {
                return Err(RouterError::Refused {
                    partition: partitioned.routing_key(copy.partition),
                    refusal,
                });
            }
        }
    }
    Ok(())
}
