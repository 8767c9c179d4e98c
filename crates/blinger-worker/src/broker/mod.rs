//! The RabbitMQ side: connecting, the topology, consuming, and publisher-confirmed republishing.
//!
//! A [`Session`] is one connection with its channels: one consumes the work queue, one in confirm
//! mode carries receipts, and a [`Republisher`] pool carries the delay-tier and dead-letter
//! republishes, one at a time per channel so that each confirm is exactly its own. A message
//! moves between queues only as "publish, wait for the broker's confirm, then ack the original",
//! so a crash in between leaves a duplicate in the target queue, never a loss; the store turns a
//! duplicate job into a no-op.

pub mod acks;
pub mod confirms;
pub mod layout;
pub mod log;
pub mod members;
pub mod outbox;
pub mod outgoing;
pub mod republisher;
pub mod router;
pub mod topology;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use lapin::options::{BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

use tracing::{info, warn};

use crate::config::{AmqpSettings, AmqpUrlError, redact_url};
pub use republisher::Republisher;
pub use topology::Topology;

/// Headers the worker reads and writes. Public: operators and publishers see them.
pub mod headers {
    /// Dead-letter reason: `invalid`, `rejected`, `retries-exhausted`, `expired`.
    pub const REASON: &str = "x-blinger-reason";
    /// Readable detail of the last failure.
    pub const ERROR: &str = "x-blinger-error";
    /// Last HTTP status from Blinger, where there was one.
    pub const STATUS: &str = "x-blinger-status";
    /// HTTP calls made for this job so far, across retries.
    pub const ATTEMPTS: &str = "x-blinger-attempts";
    /// Times the job has been parked in a delay tier.
    pub const RETRIES: &str = "x-blinger-retries";
    /// Order of a job among its conversation's jobs out in delay tiers (see `order`).
    pub const CHAIN: &str = "x-blinger-chain";
    /// Unix milliseconds of the worker's first receipt (latency when there is no AMQP timestamp).
    pub const FIRST_SEEN: &str = "x-blinger-first-seen";
}

#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    #[error("cannot connect to RabbitMQ at {url} (AMQP_URL): {source}")]
    Connect { url: String, source: lapin::Error },
    #[error("declaring the topology: {0}")]
    Declare(lapin::Error),
    #[error("RabbitMQ channel: {0}")]
    Channel(#[from] lapin::Error),
    #[error("RabbitMQ refused the publish to {0} (nack)")]
    Nacked(String),
    #[error("publish to {0} was not routed to any queue")]
    Unroutable(String),
    #[error(transparent)]
    Url(#[from] AmqpUrlError),
    #[error(transparent)]
    Layout(#[from] layout::LayoutError),
    #[error("publish abandoned: the worker is stopping")]
    Abandoned,
}

/// One connection and its channels.
pub struct Session {
    pub connection: Connection,
    pub consume: Channel,
    /// Receipts (not mandatory, pipelined).
    pub publish: Channel,
    /// Delay-tier and dead-letter republishes.
    pub republisher: std::sync::Arc<Republisher>,
    /// Partitioned mode: one consuming channel per partition queue, in partition order (each
    /// with its own prefetch and acks, so one partition can be handed back alone). Empty in
    /// single-queue mode, where `consume` takes the work queue.
    pub partitions: Vec<Channel>,
}

impl Session {
    /// Connects, opens the channels and declares the topology; checks the partition layout.
    /// `prefetch` is the work queue's, `partition_prefetch` each partition consumer's.
    pub async fn open(
        settings: &AmqpSettings,
        topology: &Topology,
        prefetch: u16,
        partition_prefetch: u16,
        name: &str,
    ) -> Result<Session, AmqpError> {
        let connection = connect(settings, name).await?;
        let consume = connection.create_channel().await?;
        consume
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let publish = connection.create_channel().await?;
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let republisher = Republisher::open(&connection, republisher::CHANNELS).await?;
        topology::declare_upgrading(&connection, &publish, settings, topology)
            .await
            .map_err(AmqpError::Declare)?;
        layout::check(&connection, topology).await?;
        let mut partitions = Vec::new();
        for _ in topology.partitioned.iter().flat_map(|p| &p.queues) {
            let channel = connection.create_channel().await?;
            channel
                .basic_qos(partition_prefetch, BasicQosOptions::default())
                .await?;
            partitions.push(channel);
        }
        Ok(Session {
            connection,
            consume,
            publish,
            republisher: std::sync::Arc::new(republisher),
            partitions,
        })
    }

    /// Closes the channels and the connection; the broker returns unacked deliveries to the
    /// queue. Bounded in time: a connection that died under us may never answer.
    pub async fn close(&self) {
        let closing = async {
            let _ = self.consume.close(200, "shutdown".into()).await;
            for channel in &self.partitions {
                let _ = channel.close(200, "shutdown".into()).await;
            }
            let _ = self.publish.close(200, "shutdown".into()).await;
            self.republisher.close().await;
            let _ = self.connection.close(200, "shutdown".into()).await;
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), closing).await;
    }
}

/// Stack of every thread that decodes or drops what the broker sends: lapin's reader thread and
/// the runtime's workers. A header table can nest arrays and tables as deep as a frame allows
/// (about 26,000 levels in 128 KiB; RabbitMQ accepts it), and lapin's decoder, like every
/// `Drop` of the value, recurses once per level: on the default 2 MiB stack such a message
/// aborts the process at every redelivery (crates/blinger-worker/tests/hostile_publishers.rs). Measured with 26,000
/// levels: lapin's reader needs more than 128 MiB in a debug build. 256 MiB is address space,
/// not memory: only the pages a deep message touches become resident.
pub const DECODER_STACK_BYTES: usize = 256 * 1024 * 1024;

/// The URL of `settings`, checked (a malformed one is refused with an error that quotes none of
/// it), asking for the broker's own `frame_max` whatever the URL says.
///
/// A message's properties (its headers) travel in one frame, which cannot be split, and the
/// broker hands a consumer each message with the header frame its publisher sent: up to the
/// broker's `frame_max` (128 KiB by default). A consumer that negotiated smaller frames takes
/// such a frame as a protocol violation and lapin closes the whole connection, at every
/// redelivery of that one message. So the worker always takes the broker's value. lapin keeps
/// 32 frames of buffer each way per connection: at 128 KiB that is 8 MiB of address space, of
/// which only what large messages touch becomes resident (measured in docs/performance.md).
fn broker_uris(url: &crate::config::Secret) -> Result<Vec<lapin::uri::AMQPUri>, AmqpUrlError> {
    let mut uris = crate::config::amqp_uris(url)?;
    for uri in &mut uris {
        // None: no limit of the client's own, so the broker's `frame_max` is what is negotiated.
        uri.query.frame_max = None;
    }
    Ok(uris)
}

/// Where the next connection attempt starts in the list of `AMQP_URL`: the node of the last
/// connection that opened. One per process: the worker and a command each have one list.
static NEXT_NODE: AtomicUsize = AtomicUsize::new(0);

/// The order to try `n` nodes in, starting with `start`: each once, wrapping around.
fn attempt_order(start: usize, n: usize) -> impl Iterator<Item = usize> {
    (0..n).map(move |i| (start + i) % n)
}

/// Opens a connection: to the one node of `AMQP_URL`, or to the first that answers of a list
/// (starting with the node of the last connection). Errors name the setting and never show the
/// password.
pub async fn connect(settings: &AmqpSettings, name: &str) -> Result<Connection, AmqpError> {
    let uris = broker_uris(&settings.url)?;
    let texts = crate::config::split_amqp_urls(settings.url.expose());
    let n = uris.len();
    // A node that does not answer at all (a host gone without a reset) must not hold up the
    // others for long; a lone node may take its time.
    let patience = if n == 1 {
        Duration::from_secs(15)
    } else {
        Duration::from_secs(5)
    };
    let mut last = None;
    for i in attempt_order(NEXT_NODE.load(Ordering::Relaxed) % n, n) {
        match connect_one(uris[i].clone(), texts[i], name, patience).await {
            Ok(connection) => {
                NEXT_NODE.store(i, Ordering::Relaxed);
                if n > 1 {
                    info!(node = i + 1, of = n, url = %redact_url(texts[i]), "connected to RabbitMQ");
                }
                return Ok(connection);
            }
            Err(e) => {
                if n > 1 {
                    warn!(node = i + 1, of = n, error = %e, "RabbitMQ node unreachable; trying the next");
                }
                last = Some(e);
            }
        }
    }
    Err(last.expect("AMQP_URL names at least one node"))
}

async fn connect_one(
    uri: lapin::uri::AMQPUri,
    url: &str,
    name: &str,
    patience: Duration,
) -> Result<Connection, AmqpError> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    let connecting = Connection::connect_uri(uri, properties);
    match tokio::time::timeout(patience, connecting).await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(source)) => Err(AmqpError::Connect {
            url: redact_url(url),
            source,
        }),
        Err(_) => Err(AmqpError::Connect {
            url: redact_url(url),
            source: lapin::Error::from(lapin::ErrorKind::IOError(std::sync::Arc::new(
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("timed out after {}s", patience.as_secs()),
                ),
            ))),
        }),
    }
}

/// Publishes a persistent message and waits for the broker's confirm. `mandatory` makes an
/// unroutable publish an error instead of a silent drop.
pub async fn publish_confirmed(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Result<(), AmqpError> {
    publish_confirmed_with(channel, exchange, routing_key, body, properties, true).await
}

/// [`publish_confirmed`], choosing whether an unroutable publish is returned (`mandatory`).
///
/// lapin hands a `basic.return` to the next confirm it resolves, not to the publish it belongs
/// to, and RabbitMQ acks several confirms at once under load: on a channel with concurrent
/// publishes, a returned publish makes some *other* publish look unroutable (or its own loss
/// look confirmed). So a mandatory publish is exact only on a channel that carries one publish
/// at a time ([`Republisher`]); concurrent publishes on one channel must not be mandatory.
pub async fn publish_confirmed_with(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
    mandatory: bool,
) -> Result<(), AmqpError> {
    let confirm = channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions {
                mandatory,
                ..BasicPublishOptions::default()
            },
            body,
            properties,
        )
        .await?;
    let target = || {
        if exchange.is_empty() {
            routing_key.to_owned()
        } else {
            format!("{exchange}/{routing_key}")
        }
    };
    confirms::judge(confirm.await?).map_err(|refusal| match refusal {
        confirms::ConfirmError::Unroutable => AmqpError::Unroutable(target()),
        confirms::ConfirmError::Nacked => AmqpError::Nacked(target()),
    })
}

pub fn string_value(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

/// Reads an integer header whatever integer type the publisher used.
pub fn header_u64(properties: &BasicProperties, name: &str) -> Option<u64> {
    let headers: &FieldTable = properties.headers().as_ref()?;
    match headers.inner().get(name)? {
        AMQPValue::ShortShortInt(v) => u64::try_from(*v).ok(),
        AMQPValue::ShortShortUInt(v) => Some(u64::from(*v)),
        AMQPValue::ShortInt(v) => u64::try_from(*v).ok(),
        AMQPValue::ShortUInt(v) => Some(u64::from(*v)),
        AMQPValue::LongInt(v) => u64::try_from(*v).ok(),
        AMQPValue::LongUInt(v) => Some(u64::from(*v)),
        AMQPValue::LongLongInt(v) => u64::try_from(*v).ok(),
        AMQPValue::Timestamp(v) => Some(*v),
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?.parse().ok(),
        _ => None,
    }
}

/// Reads a string header.
/// The message's AMQP `timestamp` in unix milliseconds. The property is seconds by the spec, but
/// many clients write milliseconds: a value above 1e11 (year 5138 in seconds, 1973 in ms) is
/// read as milliseconds. Zero means unset. The pipeline's latency and `dlq`'s age both read it
/// here, so they cannot disagree.
pub fn timestamp_ms(properties: &BasicProperties) -> Option<u64> {
    match (*properties.timestamp())? {
        0 => None,
        ts if ts > 100_000_000_000 => Some(ts),
        ts => Some(ts.saturating_mul(1000)),
    }
}

pub fn header_string(properties: &BasicProperties, name: &str) -> Option<String> {
    let headers: &FieldTable = properties.headers().as_ref()?;
    match headers.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    #[test]
    fn always_takes_the_brokers_frame_size() {
        let uri = &broker_uris(&Secret::new("amqp://u:p@host:5672/%2f")).unwrap()[0];
        assert_eq!(uri.query.frame_max, None);
        assert_eq!(uri.authority.userinfo.password, "p");
        let uris = broker_uris(&Secret::new(
            "amqp://u:p@host:5672/%2f?frame_max=16384&heartbeat=5,amqp://u:p@other/%2f?frame_max=4096",
        ))
        .unwrap();
        assert_eq!(uris.len(), 2);
        assert!(uris.iter().all(|u| u.query.frame_max.is_none()));
        assert_eq!(uris[0].query.heartbeat, Some(5));
        assert_eq!(uris[1].authority.host, "other");
        assert!(broker_uris(&Secret::new("http://nope")).is_err());
    }

    #[test]
    fn every_node_is_tried_once_from_the_last_good_one() {
        assert_eq!(attempt_order(0, 1).collect::<Vec<_>>(), [0]);
        assert_eq!(attempt_order(2, 3).collect::<Vec<_>>(), [2, 0, 1]);
        assert_eq!(attempt_order(1, 3).collect::<Vec<_>>(), [1, 2, 0]);
    }

    #[test]
    fn integer_headers_read_whatever_the_type() {
        let mut t = FieldTable::default();
        t.insert("a".into(), AMQPValue::LongInt(3));
        t.insert("b".into(), AMQPValue::ShortShortUInt(4));
        t.insert("c".into(), string_value("5"));
        t.insert("d".into(), AMQPValue::LongLongInt(-1));
        t.insert("e".into(), string_value("invalid"));
        let props = BasicProperties::default().with_headers(t);
        assert_eq!(header_u64(&props, "a"), Some(3));
        assert_eq!(header_u64(&props, "b"), Some(4));
        assert_eq!(header_u64(&props, "c"), Some(5));
        assert_eq!(header_u64(&props, "d"), None);
        assert_eq!(header_string(&props, "e").as_deref(), Some("invalid"));
        assert_eq!(header_u64(&props, "missing"), None);
    }
}
