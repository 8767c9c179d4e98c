//! What the pipeline asks of the broker for the deliveries of one session, as one small trait:
//! ack, hand back, a confirmed republish, a confirmed publish. The pipeline decides; this does.
//!
//! [`SessionOutbox`] is the real one (the session's lapin channels). [`MemoryOutbox`] records
//! every call in memory and can refuse republishes to chosen queues: the pipeline's unit tests and
//! the hot-path benchmark run with it, without a broker (the integration tests stay on the real
//! RabbitMQ).
//!
//! Guarantees of an implementation: `ack` and `hand_back` settle exactly the tag given, and a
//! batched ack never covers a tag that is [`received`](Outbox::received) but not settled;
//! `republish` is `Ok` only once the broker confirmed the copy was routed to the queue.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use lapin::options::BasicNackOptions;
use lapin::{BasicProperties, Channel};

use super::acks::Acks;
use super::{AmqpError, Republisher, publish_confirmed_with};

/// The answer of a broker operation.
pub type BrokerFuture<'a> = Pin<Box<dyn Future<Output = Result<(), AmqpError>> + Send + 'a>>;

/// The broker, as the pipeline sees one session of it.
pub trait Outbox: Send + Sync {
    /// A delivery arrived: no batched ack may cover it until it is settled.
    fn received(&self, tag: u64);
    /// The delivery is finished: ack it (batched, within milliseconds).
    fn ack(&self, tag: u64);
    /// Gives the delivery back now (nack with requeue).
    fn hand_back(&self, tag: u64) -> BrokerFuture<'_>;
    /// A copy to `queue` through the default exchange, mandatory: `Ok` once confirmed as routed.
    fn republish<'a>(
        &'a self,
        queue: &'a str,
        body: &'a [u8],
        properties: BasicProperties,
    ) -> BrokerFuture<'a>;
    /// A message to `exchange` (not mandatory: nobody bound is fine), confirmed.
    fn publish<'a>(
        &'a self,
        exchange: &'a str,
        routing_key: &'a str,
        body: Vec<u8>,
        properties: BasicProperties,
    ) -> BrokerFuture<'a>;
}

/// The real outbox of a session: acks batched on the consuming channel, republishes through the
/// [`Republisher`] pool, publishes (receipts) on the session's confirm channel.
pub struct SessionOutbox {
    pub consume: Channel,
    pub publish: Channel,
    pub republisher: Arc<Republisher>,
    pub acks: Acks,
}

impl SessionOutbox {
    pub fn new(consume: Channel, publish: Channel, republisher: Arc<Republisher>) -> Self {
        SessionOutbox {
            acks: Acks::new(consume.clone()),
            consume,
            publish,
            republisher,
        }
    }
}

impl Outbox for SessionOutbox {
    fn received(&self, tag: u64) {
        self.acks.received(tag);
    }

    fn ack(&self, tag: u64) {
        self.acks.done(tag);
    }

    fn hand_back(&self, tag: u64) -> BrokerFuture<'_> {
        Box::pin(async move {
            self.consume
                .basic_nack(
                    tag,
                    BasicNackOptions {
                        requeue: true,
                        ..BasicNackOptions::default()
                    },
                )
                .await?;
            // Only once the nack is on the wire may a batched ack pass this tag.
            self.acks.forget(tag);
            Ok(())
        })
    }

    fn republish<'a>(
        &'a self,
        queue: &'a str,
        body: &'a [u8],
        properties: BasicProperties,
    ) -> BrokerFuture<'a> {
        Box::pin(self.republisher.publish(queue, body, properties))
    }

    fn publish<'a>(
        &'a self,
        exchange: &'a str,
        routing_key: &'a str,
        body: Vec<u8>,
        properties: BasicProperties,
    ) -> BrokerFuture<'a> {
        Box::pin(async move {
            publish_confirmed_with(
                &self.publish,
                exchange,
                routing_key,
                &body,
                properties,
                false,
            )
            .await
        })
    }
}

/// One call an outbox received.
#[derive(Debug, Clone, PartialEq)]
pub enum Sent {
    Ack(u64),
    HandBack(u64),
    Republish {
        queue: String,
        body: Vec<u8>,
        properties: Box<BasicProperties>,
    },
    Publish {
        exchange: String,
        routing_key: String,
        body: Vec<u8>,
    },
}

/// An outbox in memory: every call recorded in order; republishes to the queues in `refuse`
/// fail as a broker that cannot route them would.
#[derive(Debug, Default)]
pub struct MemoryOutbox {
    sent: Mutex<Vec<Sent>>,
    refuse: Mutex<Vec<String>>,
    /// While true, publishes wait (a broker slow to confirm).
    held: tokio::sync::watch::Sender<bool>,
}

impl MemoryOutbox {
    /// Republishes to `queue` fail from now on.
    pub fn refuse(&self, queue: &str) {
        self.refuse
            .lock()
            .expect("outbox lock")
            .push(queue.to_owned());
    }

    /// Publishes wait for [`MemoryOutbox::release_publishes`] from now on.
    pub fn hold_publishes(&self) {
        self.held.send_replace(true);
    }

    pub fn release_publishes(&self) {
        self.held.send_replace(false);
    }

    /// Everything sent so far, in order.
    pub fn sent(&self) -> Vec<Sent> {
        self.sent.lock().expect("outbox lock").clone()
    }

    fn push(&self, sent: Sent) {
        self.sent.lock().expect("outbox lock").push(sent);
    }
}

impl Outbox for MemoryOutbox {
    fn received(&self, _tag: u64) {}

    fn ack(&self, tag: u64) {
        self.push(Sent::Ack(tag));
    }

    fn hand_back(&self, tag: u64) -> BrokerFuture<'_> {
        self.push(Sent::HandBack(tag));
        Box::pin(async { Ok(()) })
    }

    fn republish<'a>(
        &'a self,
        queue: &'a str,
        body: &'a [u8],
        properties: BasicProperties,
    ) -> BrokerFuture<'a> {
        let refused = self
            .refuse
            .lock()
            .expect("outbox lock")
            .iter()
            .any(|q| q == queue);
        if refused {
            return Box::pin(async move { Err(AmqpError::Unroutable(queue.to_owned())) });
        }
        self.push(Sent::Republish {
            queue: queue.to_owned(),
            body: body.to_vec(),
            properties: Box::new(properties),
        });
        Box::pin(async { Ok(()) })
    }

    fn publish<'a>(
        &'a self,
        exchange: &'a str,
        routing_key: &'a str,
        body: Vec<u8>,
        _properties: BasicProperties,
    ) -> BrokerFuture<'a> {
        let mut held = self.held.subscribe();
        Box::pin(async move {
            let _ = held.wait_for(|held| !held).await;
            self.push(Sent::Publish {
                exchange: exchange.to_owned(),
                routing_key: routing_key.to_owned(),
                body,
            });
            Ok(())
        })
    }
}
