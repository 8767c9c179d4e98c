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
//! Quorum queues on RabbitMQ 4.x have a delivery limit of 20 unless they set one, and every
//! hand-back (a nack with requeue, a channel or connection closed with the message unacked) counts
//! toward it, on 3.10 as on 4.x. The dead-letter queue has no dead-letter exchange of its own, so
//! at that limit a dead letter would be dropped after 20 readings by `blinger-worker dlq`; a tier
//! message would leave its tier early. So the dead-letter queue and the tiers are declared with
//! [`PARKING_DELIVERY_LIMIT`]. A queue declared by an earlier version without it is kept as it is
//! (see [`declare_upgrading`]): RabbitMQ refuses to redeclare a queue with other arguments.
//!
//! In partitioned mode (`BLINGER_WORKER_PARTITIONS` = P > 0, docs/scale-out.md 4.2) the
//! publishers' exchange feeds the router's input instead of the work queue, and the work queue
//! keeps only what comes back from the delay tiers (their dead-letter target):
//!
//! ```text
//! exchange blinger.outbound ─"#"─> queue blinger.outbound.in (single active consumer: the router)
//! queue blinger.outbound (returns of the delay tiers; routed too, not bound to the exchange)
//! exchange blinger.outbound.partitions (direct; alternate exchange blinger.outbound.unrouted)
//!   └─ "00".."15" ─> queues blinger.outbound.p.00 .. .p.15 (single active consumer each)
//! exchange blinger.outbound.unrouted (fanout) ─> queue blinger.outbound.unrouted (routed again)
//! stream blinger.outbound.topology (one record: P and the hash version, checked at every start)
//! exchange blinger.outbound.events ─"delivered.#"─> stream blinger.outbound.log (the delivered
//!   records, sealed receipts; x-max-age = BLINGER_WORKER_RETENTION)
//! exchange blinger.outbound.members (fanout): the replicas' heartbeats and 429s, each replica
//!   reading them through an exclusive, server-named queue of its own
//! ```
//!
//! Delay tiers use per-queue TTLs, not a broker plugin: every message in a tier waits the same
//! time, so they leave in the order they entered. With quorum queues, broker-side dead-lettering is
//! `at-least-once` (which requires `overflow: reject-publish`), so a message moving between queues
//! is never dropped.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connection, ExchangeKind};

use crate::config::{AmqpSettings, QueueType};
use crate::engine::partition::label;
use crate::engine::retry::tier_queue_name;

/// Messages ready in `queue` (unacknowledged ones not counted), read by a passive declare:
/// `None` when the queue does not exist, in which case the broker has closed `channel`.
/// The one depth reading of the worker (`dlq`), its tests and its benchmarks.
pub async fn ready_count(channel: &Channel, queue: &str) -> Result<Option<u32>, lapin::Error> {
    let declared = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    match declared {
        Ok(q) => Ok(Some(q.message_count())),
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether the broker answered 404 NOT_FOUND (a passive declare of something missing).
pub fn is_not_found(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(err) if err.get_id() == 404)
}

/// Names of the queues the worker uses, derived once from the settings.
#[derive(Debug, Clone)]
pub struct Topology {
    pub exchange: String,
    pub queue: String,
    pub dead_letter_queue: String,
    pub receipts_exchange: String,
    /// Tier queue names, in the order of [`AmqpSettings::retry_delays`].
    pub tiers: Vec<String>,
    /// The partitioned topology; `None` in single-queue mode (P = 0).
    pub partitioned: Option<Partitioned>,
}

/// Names of the partitioned mode's queues and exchanges, derived from the work queue's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partitioned {
    /// P.
    pub count: u16,
    /// The router's input, bound to the publishers' exchange: `{queue}.in`.
    pub input: String,
    /// Direct exchange of the partition queues: `{queue}.partitions`.
    pub exchange: String,
    /// Alternate exchange of [`Partitioned::exchange`] and its queue: `{queue}.unrouted`.
    pub unrouted: String,
    /// The stream holding the layout record: `{queue}.topology`.
    pub layout: String,
    /// The delivered-records log, a stream: `{queue}.log` (docs/scale-out.md 4.5).
    pub log: String,
    /// Fanout exchange of the replicas' heartbeats and throttles: `{queue}.members`
    /// (docs/scale-out.md 4.8). Each replica reads it through a queue of its own, exclusive to
    /// its connection.
    pub members: String,
    /// `{queue}.p.00` … in partition order.
    pub queues: Vec<String>,
}

impl Partitioned {
    pub fn new(queue: &str, count: u16) -> Partitioned {
        Partitioned {
            count,
            input: format!("{queue}.in"),
            exchange: format!("{queue}.partitions"),
            unrouted: format!("{queue}.unrouted"),
            layout: format!("{queue}.topology"),
            log: format!("{queue}.log"),
            members: format!("{queue}.members"),
            queues: (0..count)
                .map(|p| format!("{queue}.p.{}", label(p, count)))
                .collect(),
        }
    }

    /// The routing key of partition `p` on [`Partitioned::exchange`].
    pub fn routing_key(&self, p: u16) -> String {
        label(p, self.count)
    }

    /// Every queue of the partitioned mode (the work queue and the tiers aside).
    pub fn all_queues(&self) -> Vec<String> {
        let mut all = vec![
            self.input.clone(),
            self.unrouted.clone(),
            self.layout.clone(),
            self.log.clone(),
        ];
        all.extend(self.queues.iter().cloned());
        all
    }
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
            partitioned: (settings.partitions > 0)
                .then(|| Partitioned::new(&settings.queue, settings.partitions)),
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

/// `x-delivery-limit` of the dead-letter queue and the tiers (quorum): never reached in practice,
/// with the same meaning on RabbitMQ 3.10 and 4.x. Not `-1`: that is "no limit" on 4.x only, and
/// on 3.10 drops a message at its first redelivery (both measured by `crates/blinger-worker/tests/broker_versions.rs`).
pub const PARKING_DELIVERY_LIMIT: i32 = i32::MAX;

/// Dead-letter everything the broker drops from a queue to `target` via the default exchange.
fn dead_letter_to(args: &mut FieldTable, queue_type: QueueType, target: &str) {
    args.insert("x-dead-letter-exchange".into(), string(""));
    args.insert("x-dead-letter-routing-key".into(), string(target));
    if queue_type == QueueType::Quorum {
        args.insert("x-dead-letter-strategy".into(), string("at-least-once"));
        args.insert("x-overflow".into(), string("reject-publish"));
    }
}

/// Declares everything on `channel`. Safe to repeat; fails if an existing queue has different
/// arguments (RabbitMQ's PRECONDITION_FAILED), which the caller reports with the queue's name.
pub async fn declare(
    channel: &Channel,
    settings: &AmqpSettings,
    topology: &Topology,
) -> lapin::Result<()> {
    declare_all(None, channel, settings, topology).await
}

/// [`declare`], except that a dead-letter queue or tier declared by an earlier version (quorum,
/// without [`PARKING_DELIVERY_LIMIT`]) is accepted as it is, with a warning that names the policy
/// to set on RabbitMQ 4.x. Each such queue is tried first on a channel of its own from
/// `connection`, since a refused declare closes its channel; `channel` is left usable.
pub async fn declare_upgrading(
    connection: &Connection,
    channel: &Channel,
    settings: &AmqpSettings,
    topology: &Topology,
) -> lapin::Result<()> {
    declare_all(Some(connection), channel, settings, topology).await
}

async fn declare_all(
    connection: Option<&Connection>,
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

    declare_parking(
        connection,
        channel,
        &topology.dead_letter_queue,
        settings.queue_type,
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
        .queue_declare(topology.queue.as_str().into(), durable, work_args.clone())
        .await?;
    match &topology.partitioned {
        None => bind(channel, &topology.queue, &topology.exchange, "#").await?,
        Some(partitioned) => {
            declare_partitioned(
                channel,
                settings.queue_type,
                topology,
                partitioned,
                work_args,
            )
            .await?;
            declare_log(connection, channel, settings, topology, partitioned).await?;
        }
    }

    for (name, delay) in topology.tiers.iter().zip(&settings.retry_delays.0) {
        let mut args = type_args(settings.queue_type);
        args.insert(
            "x-message-ttl".into(),
            AMQPValue::LongInt(delay.as_millis().min(i32::MAX as u128) as i32),
        );
        dead_letter_to(&mut args, settings.queue_type, &topology.queue);
        declare_parking(connection, channel, name, settings.queue_type, args).await?;
    }
    Ok(())
}

async fn bind(channel: &Channel, queue: &str, exchange: &str, key: &str) -> lapin::Result<()> {
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
}

/// The partitioned mode's additions. The work queue is unbound from the publishers' exchange
/// (a no-op when it never was): what it receives from now on are the tiers' returns, and a job
/// published to both it and the router's input would be routed twice.
async fn declare_partitioned(
    channel: &Channel,
    queue_type: QueueType,
    topology: &Topology,
    partitioned: &Partitioned,
    work_args: FieldTable,
) -> lapin::Result<()> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let exchange = |name: &str, kind: ExchangeKind, args: FieldTable| {
        let name = name.to_owned();
        async move {
            channel
                .exchange_declare(
                    name.as_str().into(),
                    kind,
                    ExchangeDeclareOptions {
                        durable: true,
                        ..ExchangeDeclareOptions::default()
                    },
                    args,
                )
                .await
        }
    };
    let mut single_active = work_args;
    single_active.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));

    channel
        .queue_declare(
            partitioned.input.as_str().into(),
            durable,
            single_active.clone(),
        )
        .await?;
    bind(channel, &partitioned.input, &topology.exchange, "#").await?;
    channel
        .queue_unbind(
            topology.queue.as_str().into(),
            topology.exchange.as_str().into(),
            "#".into(),
            FieldTable::default(),
        )
        .await?;

    exchange(
        &partitioned.unrouted,
        ExchangeKind::Fanout,
        FieldTable::default(),
    )
    .await?;
    channel
        .queue_declare(
            partitioned.unrouted.as_str().into(),
            durable,
            type_args(queue_type),
        )
        .await?;
    bind(channel, &partitioned.unrouted, &partitioned.unrouted, "").await?;
    let mut alternate = FieldTable::default();
    alternate.insert("alternate-exchange".into(), string(&partitioned.unrouted));
    exchange(&partitioned.exchange, ExchangeKind::Direct, alternate).await?;
    exchange(
        &partitioned.members,
        ExchangeKind::Fanout,
        FieldTable::default(),
    )
    .await?;
    for (p, name) in (0..partitioned.count).zip(&partitioned.queues) {
        channel
            .queue_declare(name.as_str().into(), durable, single_active.clone())
            .await?;
        bind(
            channel,
            name,
            &partitioned.exchange,
            &partitioned.routing_key(p),
        )
        .await?;
    }
    let mut stream = FieldTable::default();
    stream.insert("x-queue-type".into(), string("stream"));
    channel
        .queue_declare(partitioned.layout.as_str().into(), durable, stream)
        .await?;
    Ok(())
}

/// The delivered-records log: a stream bound to the receipts exchange with `delivered.#`, so a
/// `delivered` receipt is the record (no publish of its own), kept for the retention.
///
/// A stream's age limit cannot be changed by declaring it again (RabbitMQ refuses other
/// arguments). With `connection`, a log declared with another retention is kept as it is, with a
/// warning that names the policy that changes it; without, the refusal is the caller's error.
async fn declare_log(
    connection: Option<&Connection>,
    channel: &Channel,
    settings: &AmqpSettings,
    topology: &Topology,
    partitioned: &Partitioned,
) -> lapin::Result<()> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), string("stream"));
    args.insert(
        "x-max-age".into(),
        string(&format!("{}s", settings.retention.as_secs().max(1))),
    );
    let name = partitioned.log.as_str();
    match connection {
        None => {
            channel.queue_declare(name.into(), durable, args).await?;
        }
        Some(connection) => {
            let probe = connection.create_channel().await?;
            match probe.queue_declare(name.into(), durable, args).await {
                Ok(_) => {
                    let _ = probe.close(200, "declared".into()).await;
                }
                Err(e) if is_precondition_failed(&e) => {
                    let passive = QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    };
                    channel
                        .queue_declare(name.into(), passive, FieldTable::default())
                        .await?;
                    let pattern = format!("^{}$", regex_escape(name));
                    tracing::warn!(
                        queue = name,
                        "the delivered-records log {name} was declared with another age limit and \
                         keeps it; BLINGER_WORKER_RETENTION does not change a declared stream. To \
                         change it, set a policy, e.g. rabbitmqctl set_policy --apply-to queues \
                         'blinger-worker-log-{name}' '{pattern}' '{{\"max-age\": \"7D\"}}' \
                         (docs/deploy.md, \"Partitions\")"
                    );
                }
                Err(e) => {
                    let _ = probe.close(200, "declared".into()).await;
                    return Err(e);
                }
            }
        }
    }
    bind(channel, name, &topology.receipts_exchange, "delivered.#").await
}

fn is_precondition_failed(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(err) if err.get_id() == 406)
}

/// Declares the dead-letter queue or a tier: with [`PARKING_DELIVERY_LIMIT`] if quorum; with
/// `connection`, falling back to `args` alone (what earlier versions declared) when the queue
/// exists without the limit.
async fn declare_parking(
    connection: Option<&Connection>,
    channel: &Channel,
    name: &str,
    queue_type: QueueType,
    args: FieldTable,
) -> lapin::Result<()> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    if queue_type != QueueType::Quorum {
        channel.queue_declare(name.into(), durable, args).await?;
        return Ok(());
    }
    let mut limited = args.clone();
    limited.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongInt(PARKING_DELIVERY_LIMIT),
    );
    let Some(connection) = connection else {
        channel.queue_declare(name.into(), durable, limited).await?;
        return Ok(());
    };
    let probe = connection.create_channel().await?;
    match probe.queue_declare(name.into(), durable, limited).await {
        Ok(_) => {
            let _ = probe.close(200, "declared".into()).await;
            Ok(())
        }
        Err(e) if is_precondition_failed(&e) => {
            // The probe channel is closed by the broker. An incompatible queue of another kind
            // fails here as it always did, on the caller's channel.
            channel.queue_declare(name.into(), durable, args).await?;
            let pattern = format!("^{}$", regex_escape(name));
            let advice = format!(
                "queue {name} was declared by an earlier blinger-worker without x-delivery-limit, \
                 and is kept as it is. On RabbitMQ 4.x that gives it a delivery limit of 20, and \
                 every reading by `blinger-worker dlq` counts toward it: set a policy, e.g. \
                 rabbitmqctl set_policy --apply-to queues 'blinger-worker-limit-{name}' '{pattern}' \
                 '{{\"delivery-limit\": {PARKING_DELIVERY_LIMIT}}}' (docs/deploy.md, \
                 \"RabbitMQ versions\")"
            );
            if tracing::dispatcher::has_been_set() {
                tracing::warn!(queue = name, "{advice}");
            } else {
                // The operator commands log nothing: tell the operator directly.
                eprintln!("blinger-worker: warning: {advice}");
            }
            Ok(())
        }
        Err(e) => {
            let _ = probe.close(200, "declared".into()).await;
            Err(e)
        }
    }
}

/// `name` as a regular expression that matches only itself (RabbitMQ policy patterns).
fn regex_escape(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}
