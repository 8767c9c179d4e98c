//! RabbitMQ as the tests see it: finding a broker, names unique to one test, publishing as a
//! careful publisher does, and reading queues back (depths, dead letters, JSON messages).
//!
//! Both front ends build on these: [`crate::TestEnv`] (integration tests, the worker
//! in-process) and [`crate::reliability::harness::World`] (the real binary under faults).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use blinger_worker::broker::Topology;
use blinger_worker::config::AmqpSettings;
use lapin::options::{BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::AMQPValue;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

/// A RabbitMQ for this test process.
pub struct Broker {
    pub url: String,
    _container: Option<Box<dyn std::any::Any + Send>>,
}

/// The broker at `AMQP_URL`, else a testcontainers RabbitMQ where Docker works, else a panic
/// that says what to set: a test that needs the broker never passes without one.
pub async fn broker() -> Broker {
    if let Ok(url) = std::env::var("AMQP_URL") {
        return Broker {
            url,
            _container: None,
        };
    }
    use testcontainers_modules::rabbitmq::RabbitMq;
    use testcontainers_modules::testcontainers::ImageExt;
    use testcontainers_modules::testcontainers::runners::AsyncRunner;
    match RabbitMq::default().with_tag("4.1-management").start().await {
        Ok(container) => {
            let port = container
                .get_host_port_ipv4(5672)
                .await
                .expect("RabbitMQ container port");
            Broker {
                url: format!("amqp://guest:guest@127.0.0.1:{port}/%2f"),
                _container: Some(Box::new(container)),
            }
        }
        Err(e) => panic!(
            "these tests need RabbitMQ: set AMQP_URL (e.g. amqp://guest:guest@127.0.0.1:5672/%2f) \
             or make Docker available for testcontainers ({e})"
        ),
    }
}

/// Queue and exchange names unique to one test, so tests can share a broker.
#[derive(Debug, Clone)]
pub struct Names {
    pub exchange: String,
    pub queue: String,
    pub dead: String,
    pub events: String,
    /// `BLINGER_WORKER_PARTITIONS` of every worker of the test: `BLINGER_TEST_PARTITIONS` of
    /// the test process, so that a suite can be run again in partitioned mode unchanged.
    pub partitions: Option<u16>,
}

impl Names {
    /// `t.<test>.<tag>` and its exchanges and dead-letter queue.
    pub fn new(test: &str) -> Names {
        let tag = &uuid::Uuid::new_v4().simple().to_string()[..8];
        let base = format!("t.{test}.{tag}");
        Names {
            exchange: format!("{base}.x"),
            queue: base.clone(),
            dead: format!("{base}.dead"),
            events: format!("{base}.events"),
            partitions: std::env::var("BLINGER_TEST_PARTITIONS").ok().map(|p| {
                p.parse()
                    .expect("BLINGER_TEST_PARTITIONS is a partition count")
            }),
        }
    }

    /// The environment that gives a worker binary or CLI command these names' partition count
    /// (nothing in single-queue mode), for `Command::envs`.
    pub fn partitions_env(&self) -> Option<(&'static str, String)> {
        self.partitions
            .map(|p| ("BLINGER_WORKER_PARTITIONS", p.to_string()))
    }

    /// Every exchange a worker of these names may declare.
    pub fn exchanges(&self) -> Vec<String> {
        vec![
            self.exchange.clone(),
            self.events.clone(),
            format!("{}.partitions", self.queue),
            format!("{}.unrouted", self.queue),
            format!("{}.members", self.queue),
        ]
    }

    /// The worker's flags naming these queues and exchanges, on the broker at `url`, with the
    /// delay tiers `delays` (`BLINGER_WORKER_RETRY_DELAYS`).
    pub fn amqp_args(&self, url: &str, delays: &str) -> Vec<String> {
        [
            ("--amqp-url", url),
            ("--exchange", &self.exchange),
            ("--queue", &self.queue),
            ("--dead-letter-queue", &self.dead),
            ("--receipts-exchange", &self.events),
            ("--retry-delays", delays),
        ]
        .into_iter()
        .flat_map(|(k, v)| [k.to_owned(), v.to_owned()])
        .chain(
            self.partitions
                .into_iter()
                .flat_map(|p| ["--partitions".to_owned(), p.to_string()]),
        )
        .collect()
    }

    /// The worker's AMQP settings for these names, parsed as the worker parses its flags.
    pub fn amqp_settings(&self, url: &str, delays: &str) -> AmqpSettings {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            amqp: AmqpSettings,
        }
        let args = std::iter::once("test".to_owned()).chain(self.amqp_args(url, delays));
        Cli::try_parse_from(args).expect("valid AMQP settings").amqp
    }
}

/// Every queue of a topology: the work queue, its delay tiers (named by the worker's own
/// rule) and the dead-letter queue.
pub fn queues_of(topology: &Topology) -> Vec<String> {
    let mut queues = vec![topology.queue.clone(), topology.dead_letter_queue.clone()];
    queues.extend(topology.tiers.iter().cloned());
    queues.extend(topology.partitioned.iter().flat_map(|p| p.all_queues()));
    queues
}

/// Deletes `queues` and `exchanges`, ignoring what is already gone (quorum queues are not free
/// on a shared broker). Each on its own channel: a failed delete closes its channel.
pub async fn delete_all(conn: &Connection, queues: &[String], exchanges: &[String]) {
    for q in queues {
        if let Ok(ch) = conn.create_channel().await {
            let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
            let _ = ch.close(200, "ok".into()).await;
        }
    }
    for x in exchanges {
        if let Ok(ch) = conn.create_channel().await {
            let _ = ch
                .exchange_delete(x.as_str().into(), Default::default())
                .await;
            let _ = ch.close(200, "ok".into()).await;
        }
    }
}

/// Messages ready in `queue` (unacknowledged ones not counted); `None` if it does not exist or
/// the broker did not answer. On a channel of its own, since a passive declare of a missing
/// queue closes its channel.
pub async fn ready(conn: &Connection, queue: &str) -> Option<u32> {
    let ch = conn.create_channel().await.expect("inspection channel");
    let count = blinger_worker::broker::topology::ready_count(&ch, queue)
        .await
        .ok()
        .flatten();
    if count.is_some() {
        let _ = ch.close(200, "ok".into()).await;
    }
    count
}

/// A message as a queue holds it: dead letters, parked copies, receipts.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub routing_key: String,
    pub body: Vec<u8>,
    /// Header values as text (strings, integers; others in their debug form).
    pub headers: BTreeMap<String, String>,
    pub content_type: Option<String>,
    pub timestamp: Option<u64>,
    /// The properties as they came, headers included (to put a message back as it was).
    pub properties: BasicProperties,
}

impl DeadLetter {
    pub fn from_delivery(delivery: &lapin::message::Delivery) -> DeadLetter {
        let mut headers = BTreeMap::new();
        if let Some(table) = delivery.properties.headers() {
            for (k, v) in table.inner() {
                let value = match v {
                    AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                    AMQPValue::LongLongInt(i) => i.to_string(),
                    AMQPValue::LongInt(i) => i.to_string(),
                    other => format!("{other:?}"),
                };
                headers.insert(k.as_str().to_owned(), value);
            }
        }
        DeadLetter {
            routing_key: delivery.routing_key.as_str().to_owned(),
            body: delivery.data.clone(),
            headers,
            content_type: delivery
                .properties
                .content_type()
                .as_ref()
                .map(|c| c.as_str().to_owned()),
            timestamp: *delivery.properties.timestamp(),
            properties: delivery.properties.clone(),
        }
    }

    /// A header's text, or "" when it is absent.
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map(String::as_str).unwrap_or("")
    }

    /// The job id, when the body is JSON with a string `id`.
    pub fn job_id(&self) -> Option<uuid::Uuid> {
        let v: serde_json::Value = serde_json::from_slice(&self.body).ok()?;
        uuid::Uuid::parse_str(v.get("id")?.as_str()?).ok()
    }

    /// The body as JSON (receipts, jobs).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }
}

/// Takes every message of `queue` by consuming it (auto-ack: they are gone), until none has
/// come for `idle`. For queues `basic.get` refuses: a quorum queue with single active consumer.
pub async fn consume_all(conn: &Connection, queue: &str, idle: Duration) -> Vec<DeadLetter> {
    use futures_util::StreamExt;
    let channel = conn.create_channel().await.expect("channel");
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "test-consume-all".into(),
            lapin::options::BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("basic.consume");
    let mut out = Vec::new();
    while let Ok(Some(delivery)) = tokio::time::timeout(idle, consumer.next()).await {
        out.push(DeadLetter::from_delivery(&delivery.expect("delivery")));
    }
    let _ = channel.close(200, "taken".into()).await;
    out
}

/// Takes up to `n` messages from `queue` (acknowledged: they are gone), waiting up to
/// `timeout` for them; `n = usize::MAX` with a zero timeout takes what is there now.
pub async fn take(channel: &Channel, queue: &str, n: usize, timeout: Duration) -> Vec<DeadLetter> {
    let mut out = Vec::new();
    let deadline = Instant::now() + timeout;
    while out.len() < n {
        match channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic.get")
        {
            Some(msg) => out.push(DeadLetter::from_delivery(&msg.delivery)),
            None if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            None => break,
        }
    }
    out
}

/// Opens the store in `dir` once the worker has let go of it (up to 5 s).
pub async fn open_store(dir: &Path) -> blinger_worker::store::Store {
    let mut last = None;
    for _ in 0..100 {
        match blinger_worker::store::Store::open(dir) {
            Ok(store) => return store,
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("store still locked: {last:?}");
}

/// A body to publish and the routing key to publish it with.
#[derive(Debug, Clone)]
pub struct Msg {
    pub routing_key: String,
    pub body: Vec<u8>,
    /// Properties to publish with instead of the defaults (persistent JSON); the timestamp is
    /// set either way.
    pub properties: Option<BasicProperties>,
}

impl Msg {
    pub fn new(routing_key: &str, body: &[u8]) -> Msg {
        Msg {
            routing_key: routing_key.to_owned(),
            body: body.to_vec(),
            properties: None,
        }
    }
}

/// Why a batch was not confirmed: the publisher reconnects and publishes it again.
#[derive(Debug)]
pub enum PublishError {
    Channel(lapin::Error),
    ConfirmTimedOut,
    Nacked,
}

/// Publishes `msgs` as a publisher does (persistent, JSON, timestamped), all in flight at once,
/// then waits for every confirm.
pub async fn publish_batch(
    channel: &Channel,
    exchange: &str,
    msgs: &[Msg],
) -> Result<(), PublishError> {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut confirms = Vec::with_capacity(msgs.len());
    for m in msgs {
        let props = m
            .properties
            .clone()
            .unwrap_or_else(|| {
                BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_delivery_mode(2)
            })
            .with_timestamp(now);
        let confirm = channel
            .basic_publish(
                exchange.into(),
                m.routing_key.as_str().into(),
                BasicPublishOptions::default(),
                &m.body,
                props,
            )
            .await
            .map_err(PublishError::Channel)?;
        confirms.push(confirm);
    }
    for c in confirms {
        let confirmation = tokio::time::timeout(Duration::from_secs(30), c)
            .await
            .map_err(|_| PublishError::ConfirmTimedOut)?
            .map_err(PublishError::Channel)?;
        if !confirmation.is_ack() {
            return Err(PublishError::Nacked);
        }
    }
    Ok(())
}

/// A publisher connection in confirm mode on one exchange, reconnecting when the broker goes
/// away.
pub struct Publisher {
    url: String,
    exchange: String,
    conn: Option<Connection>,
    channel: Option<Channel>,
    /// Publishes that had to be repeated because the broker went away mid-batch.
    pub republished: u64,
}

impl Publisher {
    /// A publisher connected to `url` (retrying for up to `patience`).
    pub async fn connect(url: &str, exchange: &str, patience: Duration) -> Publisher {
        let mut p = Publisher {
            url: url.to_owned(),
            exchange: exchange.to_owned(),
            conn: None,
            channel: None,
            republished: 0,
        };
        p.reconnect(patience).await;
        p
    }

    /// (Re)opens the publisher connection, retrying until `patience` runs out.
    pub async fn reconnect(&mut self, patience: Duration) {
        let deadline = Instant::now() + patience;
        loop {
            match Connection::connect(&self.url, ConnectionProperties::default()).await {
                Ok(conn) => {
                    let channel = conn.create_channel().await.expect("channel");
                    channel
                        .confirm_select(ConfirmSelectOptions::default())
                        .await
                        .expect("confirm mode");
                    self.conn = Some(conn);
                    self.channel = Some(channel);
                    return;
                }
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("cannot reach RabbitMQ for the test publisher: {e}"),
            }
        }
    }

    /// The connection; reopened first if the broker dropped it.
    pub async fn conn(&mut self) -> &Connection {
        if self.conn.as_ref().is_none_or(|c| !c.status().connected()) {
            self.reconnect(Duration::from_secs(10)).await;
        }
        self.conn.as_ref().expect("connected")
    }

    /// The connection as it is (for inspection while it is known to be up).
    pub fn connection(&self) -> &Connection {
        self.conn.as_ref().expect("publisher connected")
    }

    /// The confirm-mode channel.
    pub fn channel(&self) -> &Channel {
        self.channel.as_ref().expect("publisher connected")
    }

    /// Publishes in windows of 256, many in flight. If the broker goes away mid-batch,
    /// reconnects and republishes the unconfirmed rest (at-least-once publishing, as a careful
    /// publisher does).
    pub async fn publish(&mut self, msgs: &[Msg]) {
        const WINDOW: usize = 256;
        let mut start = 0;
        while start < msgs.len() {
            let end = (start + WINDOW).min(msgs.len());
            match publish_batch(self.channel(), &self.exchange, &msgs[start..end]).await {
                Ok(()) => start = end,
                Err(_) => {
                    self.republished += (end - start) as u64;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    self.reconnect(Duration::from_secs(180)).await;
                }
            }
        }
    }

    /// Closes the connection.
    pub async fn close(&mut self) {
        if let Some(conn) = self.conn.take() {
            let _ = conn.close(200, "bye".into()).await;
        }
        self.channel = None;
    }
}
