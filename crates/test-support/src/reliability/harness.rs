//! One scenario's world and the worker as a real child process.
//!
//! A [`World`] owns uniquely named queues and exchanges on a broker (the shared one from
//! `AMQP_URL`, or a private node), an in-process sandbox Blinger, a data directory and a
//! publisher connection. [`WorkerProc`] is the `blinger-worker run` binary, configured only
//! through its public environment variables, with its output captured to a log file.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime};

use blinger_sandbox::{Sandbox, SandboxConfig};
use blinger_worker::broker::Topology;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;

use super::Ctx;
use crate::amqp::{self, Broker};

pub use crate::TOKEN;
pub use crate::amqp::{DeadLetter, Msg, Names, Publisher};
pub use crate::net::free_port;
pub use crate::poll::until;

/// Everything one scenario runs against.
pub struct World {
    pub scenario: String,
    pub amqp_url: String,
    _shared: Option<Broker>,
    pub names: Names,
    /// `BLINGER_WORKER_RETRY_DELAYS` of this world's workers.
    pub delays: String,
    pub sandbox: Sandbox,
    pub data_dir: PathBuf,
    _data_tmp: Option<tempfile::TempDir>,
    pub log_dir: PathBuf,
    pub metrics_port: u16,
    pub publisher: Publisher,
    workers_started: u32,
    bin: PathBuf,
}

impl World {
    /// A world on the shared broker (`AMQP_URL`, else testcontainers, else a clear failure).
    pub async fn new(ctx: &Ctx, scenario: &str, delays: &str) -> World {
        let shared = amqp::broker().await;
        let url = shared.url.clone();
        World::on(ctx, scenario, delays, url, Some(shared)).await
    }

    /// A world on the broker at `amqp_url` (a private node).
    pub async fn on(
        ctx: &Ctx,
        scenario: &str,
        delays: &str,
        amqp_url: String,
        shared: Option<Broker>,
    ) -> World {
        let sandbox = Sandbox::start(
            "127.0.0.1:0".parse().unwrap(),
            SandboxConfig {
                seed: Some(ctx.seed),
                ..SandboxConfig::with_token(TOKEN)
            },
            None,
        )
        .await
        .expect("sandbox starts");
        let names = Names::new(scenario);
        let log_dir = ctx.out_dir.join(ctx.profile.as_str()).join(&names.queue);
        std::fs::create_dir_all(&log_dir).expect("log directory");
        let data_tmp = tempfile::tempdir().expect("data directory");
        let publisher =
            Publisher::connect(&amqp_url, &names.exchange, Duration::from_secs(30)).await;
        World {
            scenario: scenario.to_owned(),
            amqp_url,
            _shared: shared,
            names,
            delays: delays.to_owned(),
            sandbox,
            data_dir: data_tmp.path().join("data"),
            _data_tmp: Some(data_tmp),
            log_dir,
            metrics_port: free_port(),
            publisher,
            workers_started: 0,
            bin: ctx.bin.clone(),
        }
    }

    /// Publishes through the world's publisher (see [`Publisher::publish`]).
    pub async fn publish(&mut self, msgs: &[Msg]) {
        self.publisher.publish(msgs).await;
    }

    /// Another publisher on this world's exchange (for publishing from a task).
    pub async fn new_publisher(&self) -> Publisher {
        Publisher::connect(
            &self.amqp_url,
            &self.names.exchange,
            Duration::from_secs(30),
        )
        .await
    }

    /// The worker's topology for this world: queue names, the delay tiers by the worker's rule.
    pub fn topology(&self) -> Topology {
        Topology::new(&self.names.amqp_settings(&self.amqp_url, &self.delays))
    }

    /// The retry tier queue names of this world.
    pub fn tier_queues(&self) -> Vec<String> {
        self.topology().tiers
    }

    /// Uses `dir` as the data directory instead of the temporary one (a tmpfs, say).
    pub fn set_data_dir(&mut self, dir: PathBuf) {
        self.data_dir = dir;
    }

    /// The environment of `blinger-worker run` for this world (before a scenario's overrides).
    pub fn worker_env(&self) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        let mut set = |k: &str, v: String| {
            env.insert(k.to_owned(), v);
        };
        set("AMQP_URL", self.amqp_url.clone());
        set("BLINGER_WORKER_EXCHANGE", self.names.exchange.clone());
        set("BLINGER_WORKER_QUEUE", self.names.queue.clone());
        set("BLINGER_WORKER_DEAD_LETTER_QUEUE", self.names.dead.clone());
        set(
            "BLINGER_WORKER_RECEIPTS_EXCHANGE",
            self.names.events.clone(),
        );
        set("BLINGER_WORKER_RETRY_DELAYS", self.delays.clone());
        if let Some(p) = self.names.partitions {
            set("BLINGER_WORKER_PARTITIONS", p.to_string());
        }
        set("BLINGER_API_URL", self.sandbox.base_url());
        set("BLINGER_API_TOKEN", TOKEN.to_owned());
        set(
            "BLINGER_WORKER_DATA_DIR",
            self.data_dir.display().to_string(),
        );
        set(
            "BLINGER_WORKER_METRICS_ADDR",
            format!("127.0.0.1:{}", self.metrics_port),
        );
        // RELIABILITY_WORKER_LOG (e.g. `blinger_worker=debug`) to see what a worker did.
        set(
            "BLINGER_WORKER_LOG_LEVEL",
            std::env::var("RELIABILITY_WORKER_LOG").unwrap_or_else(|_| "info".to_owned()),
        );
        env
    }

    /// Starts a worker with this world's environment plus `overrides` (an empty value removes a
    /// variable).
    pub fn start_worker(&mut self, overrides: &[(&str, &str)]) -> WorkerProc {
        let mut env = self.worker_env();
        for (k, v) in overrides {
            if v.is_empty() {
                env.remove(*k);
            } else {
                env.insert((*k).to_owned(), (*v).to_owned());
            }
        }
        self.workers_started += 1;
        let log = self
            .log_dir
            .join(format!("worker-{:02}.log", self.workers_started));
        WorkerProc::spawn(&self.bin, &env, log)
    }

    /// Declares the topology the way the worker does (so jobs can be published before it runs).
    pub async fn declare(&self) {
        let settings = self.names.amqp_settings(&self.amqp_url, &self.delays);
        blinger_worker::broker::topology::declare(
            self.publisher.channel(),
            &settings,
            &Topology::new(&settings),
        )
        .await
        .expect("topology declared");
    }

    /// Messages ready in `queue` (unacked ones are not counted); `None` if it does not exist.
    pub async fn ready(&self, queue: &str) -> Option<u32> {
        amqp::ready(self.publisher.connection(), queue).await
    }

    /// Declares a classic queue outside the worker's topology (a target a hostile message may
    /// try to reach); deleted by [`World::delete_queue`].
    pub async fn declare_queue(&self, queue: &str) {
        let ch = self
            .publisher
            .connection()
            .create_channel()
            .await
            .expect("channel");
        ch.queue_declare(
            queue.into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("queue declared");
        let _ = ch.close(200, "ok".into()).await;
    }

    pub async fn delete_queue(&self, queue: &str) {
        amqp::delete_all(self.publisher.connection(), &[queue.to_owned()], &[]).await;
    }

    /// Ready messages in the work queue and every delay tier, and in partitioned mode in the
    /// router's input, the unrouted queue and every partition.
    pub async fn backlog(&self) -> u32 {
        let topology = self.topology();
        let mut queues = vec![self.names.queue.clone()];
        queues.extend(topology.tiers.iter().cloned());
        if let Some(p) = &topology.partitioned {
            queues.extend([p.input.clone(), p.unrouted.clone()]);
            queues.extend(p.queues.iter().cloned());
        }
        let mut total = 0;
        for q in &queues {
            total += self.ready(q).await.unwrap_or(0);
        }
        total
    }

    /// Takes every message now in the dead-letter queue.
    pub async fn take_dead_letters(&self) -> Vec<DeadLetter> {
        self.take_all(&self.names.dead).await
    }

    /// Takes every message now ready in `queue` (acknowledged: they are gone).
    pub async fn take_all(&self, queue: &str) -> Vec<DeadLetter> {
        let ch = self
            .publisher
            .connection()
            .create_channel()
            .await
            .expect("inspection channel");
        let out = amqp::take(&ch, queue, usize::MAX, Duration::ZERO).await;
        let _ = ch.close(200, "ok".into()).await;
        out
    }

    /// Opens the worker's store (the worker must have exited).
    pub async fn open_store(&self) -> blinger_worker::store::Store {
        amqp::open_store(&self.data_dir).await
    }

    /// Deletes this world's queues and exchanges and stops the sandbox.
    pub async fn cleanup(mut self) {
        let queues = amqp::queues_of(&self.topology());
        let conn = self.publisher.conn().await;
        amqp::delete_all(conn, &queues, &self.names.exchanges()).await;
        self.publisher.close().await;
        self.sandbox.shutdown().await;
    }
}

/// `blinger-worker run` as a child process.
pub struct WorkerProc {
    child: Child,
    pub pid: u32,
    pub metrics_addr: SocketAddr,
    pub log: PathBuf,
    pub started: Instant,
    exit: Option<ExitStatus>,
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .expect("http client")
}

impl WorkerProc {
    pub fn spawn(bin: &Path, env: &BTreeMap<String, String>, log: PathBuf) -> WorkerProc {
        let out = std::fs::File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let metrics_addr = env
            .get("BLINGER_WORKER_METRICS_ADDR")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| "127.0.0.1:9464".parse().unwrap());
        let child = Command::new(bin)
            .arg("run")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(env)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        WorkerProc {
            pid: child.id(),
            child,
            metrics_addr,
            log,
            started: Instant::now(),
            exit: None,
        }
    }

    fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .args([sig, &self.pid.to_string()])
            .status();
    }

    /// `kill -9`, reaped; returns the moment it was dead. Not the moment before: running `kill`
    /// takes milliseconds, and a call the process made in them, lost with it, was charged to the
    /// next instance (which then showed two lost keyless calls for one kill).
    pub fn kill9(&mut self) -> SystemTime {
        self.signal("-KILL");
        self.exit = self.child.wait().ok();
        SystemTime::now()
    }

    pub fn sigterm(&self) {
        self.signal("-TERM");
    }

    /// Waits for the process to exit, up to `timeout`.
    pub async fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exit {
                return Some(status);
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                self.exit = Some(status);
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.exit.is_none() && matches!(self.child.try_wait(), Ok(None))
    }

    /// `GET /readyz`: the status, or `None` when nothing answers.
    pub async fn readyz(&self) -> Option<u16> {
        http()
            .get(format!("http://{}/readyz", self.metrics_addr))
            .send()
            .await
            .ok()
            .map(|r| r.status().as_u16())
    }

    /// `GET /healthz`: the status, or `None` when nothing answers.
    pub async fn healthz(&self) -> Option<u16> {
        http()
            .get(format!("http://{}/healthz", self.metrics_addr))
            .send()
            .await
            .ok()
            .map(|r| r.status().as_u16())
    }

    pub async fn get_text(&self, path: &str) -> Option<String> {
        let r = http()
            .get(format!("http://{}{path}", self.metrics_addr))
            .send()
            .await
            .ok()?;
        r.text().await.ok()
    }

    pub async fn metrics(&self) -> Option<String> {
        self.get_text("/metrics").await
    }

    /// Sum of the samples of `name` whose labels include every `labels` pair.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.metrics().await.map(|t| metric_sum(&t, name, labels))
    }

    /// Waits until `/readyz` answers 200; returns how long that took from now.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Option<Duration> {
        let started = Instant::now();
        while started.elapsed() < timeout {
            if self.readyz().await == Some(200) {
                return Some(started.elapsed());
            }
            if !self.alive() {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        None
    }

    /// SIGTERM, then wait for the exit; returns the status and how long it took.
    pub async fn stop(&mut self, timeout: Duration) -> (Option<ExitStatus>, Duration) {
        let started = Instant::now();
        self.sigterm();
        let status = self.wait(timeout).await;
        (status, started.elapsed())
    }

    pub fn log_text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }
}

impl Drop for WorkerProc {
    fn drop(&mut self) {
        if self.exit.is_none() && matches!(self.child.try_wait(), Ok(None)) {
            self.signal("-KILL");
            let _ = self.child.wait();
        }
    }
}

/// Sum of the samples of metric `name` (exact name, before `{`) whose labels contain every pair.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut total = 0.0;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let (metric, label_text) = match series.split_once('{') {
            Some((m, rest)) => (m, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if metric != name {
            continue;
        }
        if labels
            .iter()
            .all(|(k, v)| label_text.contains(&format!("{k}=\"{v}\"")))
        {
            total += value.parse::<f64>().unwrap_or(0.0);
        }
    }
    total
}

/// Accepted (HTTP 200) requests the sandbox recorded so far.
pub fn accepted(sandbox: &Sandbox) -> usize {
    let s = sandbox.stats();
    s.by_status.get(&200).copied().unwrap_or(0) as usize
}

/// Distinct jobs of `ids` accepted at least once: text/file by uuid, assign-agent by agent id.
pub fn distinct_ids(sandbox: &Sandbox) -> HashSet<String> {
    sandbox
        .requests()
        .into_iter()
        .filter(|r| r.status == 200)
        .filter_map(|r| r.uuid.or(r.agent_id))
        .collect()
}

/// Seconds with one decimal, for tables.
pub fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}
