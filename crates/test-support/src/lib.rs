//! The one harness of blinger-worker's tests: a real RabbitMQ, the sandbox Blinger, a worker run
//! in-process (or as the real binary), and helpers to publish and inspect queues.
//!
//! - [`amqp`]: the broker (from `AMQP_URL`, else testcontainers where Docker works, else a clear
//!   failure: a test that needs the broker never passes without one), names unique to a test,
//!   publishing, queue depths, dead letters, the store;
//! - [`poll`]: waiting for a condition;
//! - [`net`]: a TCP proxy to cut the broker connection;
//! - [`TestEnv`] (here): one integration test's world, the worker in-process;
//! - [`reliability`]: the reliability suite, whose worlds run the real binary on the same pieces.

pub mod amqp;
pub mod net;
pub mod poll;
pub mod reliability;

pub use amqp::{Broker, DeadLetter, Msg, Names, Publisher, broker};
pub use net::{TcpProxy, amqp_socket, free_port, via};
pub use poll::{eventually, until};

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blinger_sandbox::{Sandbox, SandboxConfig};
use blinger_worker::broker::Topology;
use blinger_worker::config::RunSettings;
use blinger_worker::contract::job::Kind;
use blinger_worker::runtime::telemetry::{Health, Metrics};
use blinger_worker::runtime::worker::Worker;
use clap::Parser;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
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

/// The token the sandbox accepts in every test world (tests about tokens use their own).
pub const TOKEN: &str = "test-token-5b1f";

/// The delay tiers of a test worker unless a test sets its own.
pub const TEST_DELAYS: &str = "1s,2s";

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
    /// Every queue a worker of this env was configured with (tiers included), for cleanup.
    used_queues: Mutex<BTreeSet<String>>,
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
            used_queues: Mutex::new(BTreeSet::new()),
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
        let data_dir = self.data_dir.path().display().to_string();
        let mut args: Vec<String> = vec!["test".into()];
        args.extend(self.names.amqp_args(&self.broker.url, TEST_DELAYS));
        for (k, v) in [
            ("--api-url", self.sandbox.base_url().as_str()),
            ("--data-dir", &data_dir),
            ("--metrics-addr", "127.0.0.1:0"),
            ("--rate-limit", "2000"),
            ("--rate-burst", "200"),
            ("--request-timeout", "3s"),
            ("--shutdown-grace", "5s"),
        ] {
            args.extend([k.to_owned(), v.to_owned()]);
        }
        args.extend(self.base_args.iter().cloned());
        let has_token_flag = extra
            .iter()
            .copied()
            .chain(self.base_args.iter().map(String::as_str))
            .any(|a| a.starts_with("--api-token"));
        if !has_token_flag {
            args.extend(["--api-token".to_owned(), TOKEN.to_owned()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let settings = Cli::try_parse_from(args)
            .expect("valid test settings")
            .settings;
        self.used_queues
            .lock()
            .unwrap()
            .extend(amqp::queues_of(&Topology::new(&settings.amqp)));
        settings
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
        self.declare_with(&[]).await;
    }

    /// Declares the topology of a worker started with `extra` flags; returns it.
    pub async fn declare_with(&self, extra: &[&str]) -> Topology {
        let settings = self.settings(extra);
        let topology = Topology::new(&settings.amqp);
        blinger_worker::broker::topology::declare(&self.channel, &settings.amqp, &topology)
            .await
            .expect("topology declared");
        topology
    }

    /// The binary at `bin` configured for this env through its environment only (broker,
    /// names, the test tiers, the data directory) and nothing inherited, as an operator runs it.
    /// A test adds its own variables and arguments.
    pub fn command(&self, bin: &str) -> std::process::Command {
        let mut cmd = std::process::Command::new(bin);
        cmd.env_clear()
            .env("AMQP_URL", &self.broker.url)
            .env("BLINGER_WORKER_EXCHANGE", &self.names.exchange)
            .env("BLINGER_WORKER_QUEUE", &self.names.queue)
            .env("BLINGER_WORKER_DEAD_LETTER_QUEUE", &self.names.dead)
            // The harness's tiers: a topology the binary declares must match the worker's.
            .env("BLINGER_WORKER_RETRY_DELAYS", TEST_DELAYS)
            .env("BLINGER_WORKER_DATA_DIR", self.data_dir.path())
            .envs(self.names.partitions_env())
            .stdin(std::process::Stdio::null());
        cmd
    }

    /// Publishes one message straight into `queue` through the default exchange, persistent
    /// and confirmed: a dead letter or a tier message as the worker would have left it.
    pub async fn publish_to_queue(&self, queue: &str, body: &[u8], properties: BasicProperties) {
        let confirm = self
            .channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body,
                properties.with_delivery_mode(2),
            )
            .await
            .expect("publish");
        assert!(confirm.await.expect("confirm").is_ack(), "broker nacked");
    }

    /// Opens the store of this env's data directory once the worker has let go of it.
    pub async fn open_store(&self) -> blinger_worker::store::Store {
        amqp::open_store(self.data_dir.path()).await
    }

    /// Publishes a raw body like a publisher would: persistent, JSON, timestamped, confirmed.
    pub async fn publish_raw(&self, routing_key: &str, body: &[u8]) {
        amqp::publish_batch(
            &self.channel,
            &self.names.exchange,
            &[Msg::new(routing_key, body)],
        )
        .await
        .expect("publish confirmed");
    }

    /// Publishes a job; the routing key is its kind.
    pub async fn publish(&self, job: &serde_json::Value) {
        let kind = job["kind"].as_str().unwrap_or("unknown").to_owned();
        self.publish_raw(&kind, job.to_string().as_bytes()).await;
    }

    /// Messages now ready in a queue (it must exist).
    pub async fn queue_len(&self, queue: &str) -> u32 {
        amqp::ready(&self.conn, queue).await.expect("queue exists")
    }

    /// Jobs waiting to be worked on (ready, not delivered to a consumer): the work queue's, and
    /// in partitioned mode (`BLINGER_TEST_PARTITIONS`) also the router input's and every
    /// partition queue's. What a test means by "nothing left" or "handed back" in either mode.
    pub async fn jobs_waiting(&self) -> u32 {
        let mut queues = vec![self.names.queue.clone()];
        if let Some(partitioned) = Topology::new(&self.settings(&[]).amqp).partitioned {
            queues.push(partitioned.input.clone());
            queues.extend(partitioned.queues.iter().cloned());
        }
        let mut waiting = 0;
        for queue in &queues {
            waiting += self.queue_len(queue).await;
        }
        waiting
    }

    /// Takes up to `n` dead letters, waiting up to `timeout` for them.
    pub async fn dead_letters(&self, n: usize, timeout: Duration) -> Vec<DeadLetter> {
        amqp::take(&self.channel, &self.names.dead, n, timeout).await
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
        amqp::take(&self.channel, queue, n, timeout)
            .await
            .into_iter()
            .map(|m| (m.routing_key.clone(), m.json()))
            .collect()
    }

    /// Deletes this test's queues (every tier any of its workers used) and exchanges.
    pub async fn cleanup(self) {
        let mut used = std::mem::take(&mut *self.used_queues.lock().unwrap());
        used.extend(amqp::queues_of(&Topology::new(
            &self.names.amqp_settings(&self.broker.url, TEST_DELAYS),
        )));
        let queues: Vec<String> = used.into_iter().collect();
        amqp::delete_all(&self.conn, &queues, &self.names.exchanges()).await;
        let _ = self.conn.close(200, "bye".into()).await;
        self.sandbox.shutdown().await;
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

pub fn text_job(conversation: &str, text: &str) -> serde_json::Value {
    serde_json::json!({
        "kind": "send-text",
        "id": uuid::Uuid::new_v4().to_string(),
        "conversation_id": conversation,
        "text": text,
    })
}

/// Runs `cmd` to completion off the async runtime, writing `stdin` to it when given, with its
/// output captured.
pub async fn output(
    mut cmd: std::process::Command,
    stdin: Option<Vec<u8>>,
) -> std::process::Output {
    use std::io::Write;
    use std::process::Stdio;
    if stdin.is_some() {
        cmd.stdin(Stdio::piped());
    }
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    tokio::task::spawn_blocking(move || {
        let mut child = cmd.spawn().expect("the binary starts");
        if let Some(input) = stdin {
            let mut pipe = child.stdin.take().expect("stdin pipe");
            pipe.write_all(&input).expect("write stdin");
        }
        child.wait_with_output().expect("the binary finishes")
    })
    .await
    .expect("command task")
}

/// The most of `times` that fall within any one `window`, and the first of them (`span(a, b)` is
/// how long after `a` `b` came). A rate check: requests started or seen in any sliding second.
pub fn most_within<T: Ord + Copy>(
    times: &[T],
    window: Duration,
    span: impl Fn(T, T) -> Duration,
) -> (usize, Option<T>) {
    let mut at = times.to_vec();
    at.sort();
    let mut best = (0, None);
    let mut first = 0;
    for last in 0..at.len() {
        while span(at[first], at[last]) >= window {
            first += 1;
        }
        if last - first + 1 > best.0 {
            best = (last - first + 1, Some(at[first]));
        }
    }
    best
}
