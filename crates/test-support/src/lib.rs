//! The one harness of blinger-worker's tests: a real RabbitMQ, the sandbox Blinger, a worker run
//! in-process (or as the real binary), and helpers to publish and inspect queues. The
//! reliability suite ([`reliability`]) builds its worlds on the same pieces.
//!
//! RabbitMQ comes from `AMQP_URL` when it is set (CI starts the Debian server), else from
//! testcontainers where Docker works (a laptop). With neither, tests fail with a clear message:
//! a test that needs the broker never passes without one.

pub mod reliability;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blinger_sandbox::{Sandbox, SandboxConfig};
use blinger_worker::config::RunSettings;
use blinger_worker::contract::job::Kind;
use blinger_worker::runtime::telemetry::{Health, Metrics};
use blinger_worker::runtime::worker::Worker;
use clap::Parser;
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The repository's root (README, docs, schemas, the chart), wherever the tests run from.
pub fn repo_root() -> &'static std::path::Path {
    std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

/// Cargo's target directory: `CARGO_TARGET_DIR` when set, else `target/` at the root.
pub fn target_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"))
}

pub const TOKEN: &str = "test-token-5b1f";

/// A RabbitMQ for this test process.
pub struct Broker {
    pub url: String,
    _container: Option<Box<dyn std::any::Any + Send>>,
}

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
}

impl Names {
    pub fn new(test: &str) -> Names {
        let tag = &uuid::Uuid::new_v4().simple().to_string()[..8];
        let base = format!("t.{test}.{tag}");
        Names {
            exchange: format!("{base}.x"),
            queue: base.clone(),
            dead: format!("{base}.dead"),
            events: format!("{base}.events"),
        }
    }
}

/// One test's world.
pub struct TestEnv {
    pub broker: Broker,
    pub names: Names,
    pub sandbox: Sandbox,
    pub data_dir: tempfile::TempDir,
    pub conn: Connection,
    pub channel: Channel,
    /// Extra flags for every worker this env starts.
    pub base_args: Vec<String>,
}

impl TestEnv {
    pub async fn new(test: &str) -> TestEnv {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                std::env::var("RUST_LOG").unwrap_or_else(|_| "blinger_worker=info".into()),
            )
            .with_test_writer()
            .try_init();
        let broker = broker().await;
        let sandbox = Sandbox::start(
            "127.0.0.1:0".parse().unwrap(),
            SandboxConfig::with_token(TOKEN),
            None,
        )
        .await
        .expect("sandbox starts");
        let conn = Connection::connect(&broker.url, ConnectionProperties::default())
            .await
            .unwrap_or_else(|e| panic!("cannot reach RabbitMQ for the test publisher: {e}"));
        let channel = conn.create_channel().await.unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        TestEnv {
            broker,
            names: Names::new(test),
            sandbox,
            data_dir: tempfile::tempdir().unwrap(),
            conn,
            channel,
            base_args: Vec::new(),
        }
    }

    /// Worker settings pointing at this env, with `extra` flags last (they win).
    pub fn settings(&self, extra: &[&str]) -> RunSettings {
        #[derive(Parser)]
        #[command(args_override_self = true)]
        struct Cli {
            #[command(flatten)]
            settings: RunSettings,
        }
        let base_url = self.sandbox.base_url();
        let data_dir = self.data_dir.path().display().to_string();
        let mut args: Vec<String> = vec!["test".into()];
        let mut push = |k: &str, v: &str| {
            args.push(k.into());
            args.push(v.into());
        };
        push("--amqp-url", &self.broker.url);
        push("--exchange", &self.names.exchange);
        push("--queue", &self.names.queue);
        push("--dead-letter-queue", &self.names.dead);
        push("--receipts-exchange", &self.names.events);
        push("--api-url", &base_url);
        push("--data-dir", &data_dir);
        push("--metrics-addr", "127.0.0.1:0");
        push("--retry-delays", "1s,2s");
        push("--rate-limit", "2000");
        push("--rate-burst", "200");
        push("--request-timeout", "3s");
        push("--shutdown-grace", "5s");
        args.extend(self.base_args.iter().cloned());
        let has_token_flag = extra
            .iter()
            .chain(
                self.base_args
                    .iter()
                    .map(String::as_str)
                    .collect::<Vec<_>>()
                    .iter(),
            )
            .any(|a| a.starts_with("--api-token"));
        if !has_token_flag {
            args.push("--api-token".into());
            args.push(TOKEN.into());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        Cli::try_parse_from(args)
            .expect("valid test settings")
            .settings
    }

    /// Starts a worker in-process.
    pub async fn start_worker(&self, extra: &[&str]) -> RunningWorker {
        let worker = Worker::start(self.settings(extra))
            .await
            .unwrap_or_else(|e| panic!("worker starts: {e}"));
        RunningWorker::spawn(worker)
    }

    /// Declares the topology as the worker would, so jobs can be published before it starts.
    pub async fn declare(&self) {
        let settings = self.settings(&[]);
        let topology = blinger_worker::broker::Topology::new(&settings.amqp);
        blinger_worker::broker::topology::declare(&self.channel, &settings.amqp, &topology)
            .await
            .expect("topology declared");
    }

    /// Opens the store of this env's data directory once the worker has let go of it.
    pub async fn open_store(&self) -> blinger_worker::store::Store {
        let mut last = None;
        for _ in 0..100 {
            match blinger_worker::store::Store::open(self.data_dir.path()) {
                Ok(store) => return store,
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("store still locked: {last:?}");
    }

    /// Publishes a raw body like a publisher would: persistent, JSON, timestamped, confirmed.
    pub async fn publish_raw(&self, routing_key: &str, body: &[u8]) {
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_timestamp(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_secs(),
            );
        let confirm = self
            .channel
            .basic_publish(
                self.names.exchange.as_str().into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                props,
            )
            .await
            .expect("publish");
        assert!(confirm.await.expect("confirm").is_ack(), "broker nacked");
    }

    /// Publishes a job; the routing key is its kind.
    pub async fn publish(&self, job: &serde_json::Value) {
        let kind = job["kind"].as_str().unwrap_or("unknown").to_owned();
        self.publish_raw(&kind, job.to_string().as_bytes()).await;
    }

    /// Messages now ready in a queue.
    pub async fn queue_len(&self, queue: &str) -> u32 {
        let q = self
            .channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("queue exists");
        q.message_count()
    }

    /// Takes up to `n` dead letters, waiting up to `timeout` for them.
    pub async fn dead_letters(&self, n: usize, timeout: Duration) -> Vec<DeadLetter> {
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + timeout;
        while out.len() < n && tokio::time::Instant::now() < deadline {
            match self
                .channel
                .basic_get(
                    self.names.dead.as_str().into(),
                    BasicGetOptions { no_ack: true },
                )
                .await
                .expect("basic.get")
            {
                Some(msg) => out.push(DeadLetter::from(&msg.delivery)),
                None => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        out
    }

    /// A server-named queue bound to the receipts exchange (declare it before the worker runs).
    pub async fn receipts_queue(&self) -> String {
        self.declare().await;
        let q = self
            .channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let name = q.name().as_str().to_owned();
        self.channel
            .queue_bind(
                name.as_str().into(),
                self.names.events.as_str().into(),
                "#".into(),
                Default::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        name
    }

    /// Takes up to `n` messages from `queue` as (routing key, JSON body).
    pub async fn take_json(
        &self,
        queue: &str,
        n: usize,
        timeout: Duration,
    ) -> Vec<(String, serde_json::Value)> {
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + timeout;
        while out.len() < n && tokio::time::Instant::now() < deadline {
            match self
                .channel
                .basic_get(queue.into(), BasicGetOptions { no_ack: true })
                .await
                .expect("basic.get")
            {
                Some(msg) => out.push((
                    msg.delivery.routing_key.as_str().to_owned(),
                    serde_json::from_slice(&msg.delivery.data).expect("JSON"),
                )),
                None => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        out
    }

    /// Deletes this test's queues and exchange (quorum queues are not free on a shared broker).
    pub async fn cleanup(self) {
        let mut queues = vec![self.names.queue.clone(), self.names.dead.clone()];
        for d in ["1s", "2s"] {
            queues.push(format!("{}.retry.{d}", self.names.queue));
        }
        for q in queues {
            let _ = self
                .channel
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        for exchange in [&self.names.exchange, &self.names.events] {
            let _ = self
                .channel
                .exchange_delete(exchange.as_str().into(), Default::default())
                .await;
        }
        let _ = self.conn.close(200, "bye".into()).await;
        self.sandbox.shutdown().await;
    }
}

/// A dead-lettered message as the DLQ holds it.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub body: Vec<u8>,
    pub headers: BTreeMap<String, String>,
    pub content_type: Option<String>,
    pub timestamp: Option<u64>,
}

impl DeadLetter {
    fn from(delivery: &lapin::message::Delivery) -> DeadLetter {
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
            body: delivery.data.clone(),
            headers,
            content_type: delivery
                .properties
                .content_type()
                .as_ref()
                .map(|c| c.as_str().to_owned()),
            timestamp: *delivery.properties.timestamp(),
        }
    }

    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map(String::as_str).unwrap_or("")
    }
}

/// A worker running in this process.
pub struct RunningWorker {
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub metrics_addr: SocketAddr,
    pub stop: CancellationToken,
    pub handle: JoinHandle<anyhow::Result<()>>,
}

impl RunningWorker {
    pub fn spawn(worker: Worker) -> RunningWorker {
        let stop = CancellationToken::new();
        RunningWorker {
            metrics: worker.metrics(),
            health: worker.health(),
            metrics_addr: worker.metrics_addr(),
            handle: tokio::spawn(worker.run(stop.clone())),
            stop,
        }
    }

    /// Graceful stop; returns once the worker has exited.
    pub async fn stop(self) {
        self.stop.cancel();
        self.handle
            .await
            .expect("worker task")
            .expect("worker exits cleanly");
    }

    pub fn delivered(&self, kind: &str) -> u64 {
        self.metrics.jobs_delivered.with_label_values(&[kind]).get()
    }

    pub fn delivered_total(&self) -> u64 {
        Kind::ALL.iter().map(|k| self.delivered(k.as_str())).sum()
    }

    /// Retries counted for `kind` (in-process retries and parks in a delay tier).
    pub fn retried(&self, kind: &str) -> u64 {
        self.metrics.jobs_retried.with_label_values(&[kind]).get()
    }

    pub fn dead(&self, kind: &str, reason: &str) -> u64 {
        self.metrics
            .jobs_dead_lettered
            .with_label_values(&[kind, reason])
            .get()
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        let r = reqwest::get(format!("http://{}{path}", self.metrics_addr))
            .await
            .expect("ops endpoint answers");
        (r.status().as_u16(), r.text().await.unwrap())
    }
}

/// Polls `check` every 25 ms until it holds or `timeout` passes.
pub async fn eventually(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

pub fn text_job(conversation: &str, text: &str) -> serde_json::Value {
    serde_json::json!({
        "kind": "send-text",
        "id": uuid::Uuid::new_v4().to_string(),
        "conversation_id": conversation,
        "text": text,
    })
}

/// A TCP proxy in front of RabbitMQ that a test can cut, to simulate a lost broker connection.
pub struct TcpProxy {
    pub addr: SocketAddr,
    cut: Arc<Mutex<CancellationToken>>,
    refusing: Arc<std::sync::atomic::AtomicBool>,
    task: JoinHandle<()>,
}

impl TcpProxy {
    pub async fn start(upstream: SocketAddr) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(Mutex::new(CancellationToken::new()));
        let refusing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let task = {
            let cut = cut.clone();
            let refusing = refusing.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((mut inbound, _)) = listener.accept().await else {
                        return;
                    };
                    if refusing.load(std::sync::atomic::Ordering::SeqCst) {
                        drop(inbound);
                        continue;
                    }
                    let token = cut.lock().unwrap().clone();
                    tokio::spawn(async move {
                        let Ok(mut outbound) = TcpStream::connect(upstream).await else {
                            return;
                        };
                        tokio::select! {
                            _ = token.cancelled() => {}
                            _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        }
                    });
                }
            })
        };
        TcpProxy {
            addr,
            cut,
            refusing,
            task,
        }
    }

    /// Drops every open connection.
    pub fn cut(&self) {
        let mut token = self.cut.lock().unwrap();
        token.cancel();
        *token = CancellationToken::new();
    }

    /// While true, new connections are closed at once (the broker is "down").
    pub fn set_refusing(&self, refusing: bool) {
        self.refusing
            .store(refusing, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Host and port of an amqp:// URL.
pub fn amqp_socket(url: &str) -> SocketAddr {
    let parsed = url::Url::parse(url).unwrap();
    let host = parsed.host_str().unwrap();
    let port = parsed.port().unwrap_or(5672);
    let host = if host == "localhost" {
        "127.0.0.1"
    } else {
        host
    };
    format!("{host}:{port}").parse().unwrap()
}

/// The same URL with its host and port replaced by `addr`.
pub fn via(url: &str, addr: SocketAddr) -> String {
    let mut parsed = url::Url::parse(url).unwrap();
    parsed.set_host(Some(&addr.ip().to_string())).unwrap();
    parsed.set_port(Some(addr.port())).unwrap();
    parsed.to_string()
}
