//! The broker topology, declared idempotently by the worker at every (re)connect.
//!
//! ```text
//! exchange blinger.outbound (topic, durable)
//!   └─ "#" ─> queue blinger.outbound (quorum: delivery limit, dead-letters to the DLQ)
//! queue blinger.outbound.retry.<delay> (one per tier; TTL = delay; expired messages are
//!   dead-lettered through the default exchange back to the work queue)
//! queue blinger.outbound.dead (the dead-letter queue)
//! exchange blinger.outbound.events (topic, durable): delivery receipts
//! ```
//!
//! Delay tiers use per-queue TTLs, not a broker plugin: every message in a tier waits the same
//! time, so they leave in the order they entered. With quorum queues, broker-side dead-lettering is
//! `at-least-once` (which requires `overflow: reject-publish`), so a message moving between queues
//! is never dropped.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, ExchangeKind};

use crate::config::{AmqpSettings, QueueType};
use crate::retry::tier_queue_name;

/// Names of the queues the worker uses, derived once from the settings.
#[derive(Debug, Clone)]
pub struct Topology {
    pub exchange: String,
    pub queue: String,
    pub dead_letter_queue: String,
    pub receipts_exchange: String,
    /// Tier queue names, in the order of [`AmqpSettings::retry_delays`].
    pub tiers: Vec<String>,
}

impl Topology {
    pub fn new(settings: &AmqpSettings) -> Topology {
        Topology {
            exchange: settings.exchange.clone(),
            queue: settings.queue.clone(),
            dead_letter_queue: settings.dead_letter_queue.clone(),
            receipts_exchange: settings.receipts_exchange.clone(),
            tiers: settings
                .retry_delays
                .0
                .iter()
                .map(|d| tier_queue_name(&settings.queue, *d))
                .collect(),
        }
    }
}

fn string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

fn type_args(queue_type: QueueType) -> FieldTable {
    let mut args = FieldTable::default();
    if queue_type == QueueType::Quorum {
        args.insert("x-queue-type".into(), string("quorum"));
    }
    args
}

/// Dead-letter everything the broker drops from a queue to `target` via the default exchange.
fn dead_letter_to(args: &mut FieldTable, queue_type: QueueType, target: &str) {
    args.insert("x-dead-letter-exchange".into(), string(""));
    args.insert("x-dead-letter-routing-key".into(), string(target));
    if queue_type == QueueType::Quorum {
        args.insert("x-dead-letter-strategy".into(), string("at-least-once"));
        args.insert("x-overflow".into(), string("reject-publish"));
    }
}

/// Declares everything. Safe to repeat; fails if an existing queue has different arguments
/// (RabbitMQ's PRECONDITION_FAILED), which the caller reports with the queue's name.
pub async fn declare(
    channel: &Channel,
    settings: &AmqpSettings,
    topology: &Topology,
) -> lapin::Result<()> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    for exchange in [&topology.exchange, &topology.receipts_exchange] {
        channel
            .exchange_declare(
                exchange.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
    }

    channel
        .queue_declare(
            topology.dead_letter_queue.as_str().into(),
            durable,
            type_args(settings.queue_type),
        )
        .await?;

    let mut work_args = type_args(settings.queue_type);
    if settings.queue_type == QueueType::Quorum {
        work_args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongInt(settings.delivery_limit.min(i32::MAX as u32) as i32),
        );
    }
    dead_letter_to(
        &mut work_args,
        settings.queue_type,
        &topology.dead_letter_queue,
    );
    channel
        .queue_declare(topology.queue.as_str().into(), durable, work_args)
        .await?;
    channel
        .queue_bind(
            topology.queue.as_str().into(),
            topology.exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;

    for (name, delay) in topology.tiers.iter().zip(&settings.retry_delays.0) {
        let mut args = type_args(settings.queue_type);
        args.insert(
            "x-message-ttl".into(),
            AMQPValue::LongInt(delay.as_millis().min(i32::MAX as u128) as i32),
        );
        dead_letter_to(&mut args, settings.queue_type, &topology.queue);
        channel
            .queue_declare(name.as_str().into(), durable, args)
            .await?;
    }
    Ok(())
}
