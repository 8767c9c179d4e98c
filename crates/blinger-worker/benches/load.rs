//! End-to-end load benchmark: the real `blinger-worker` binary against the broker's own ceiling.
//!
//! ```sh
//! AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f cargo bench --bench load -- --jobs 100000
//! cargo bench --bench load -- --amqp-url amqp://guest:guest@127.0.0.1:5673/%2f   # another broker
//! cargo bench --bench load -- --jobs 5000 --queue-types classic --no-sweep   # a quick run
//! ```
//!
//! For each queue type (quorum, classic), in one run on one machine:
//! - (a) ceiling: a bare lapin consumer (a child process of this bench, so its RSS and CPU are its
//!   own) on a work queue declared by `blinger_worker::broker::topology::declare` (same type and
//!   arguments as the worker's), same prefetch, that only acks each message;
//! - (b) the release `blinger-worker` binary, spawned with environment settings, against the
//!   in-process sandbox at 0 ms latency;
//! - (c) the same at 50 ms sandbox latency;
//!
//! each with N persistent `send-text` jobs over 1,000 conversations, all published (with
//! confirms) before the consumer starts, so what is timed is consumption. Then a concurrency sweep
//! at 50 ms latency (quorum), and one point capped by the rate limit.
//!
//! Figures: jobs/s = N / (first delivery .. last delivery); latency = publish (the publisher's
//! clock, also written in ms into the AMQP timestamp) to delivered (ceiling: the consumer received
//! it; worker: the sandbox answered the call, as recorded by the sandbox: the store record and the
//! ack follow within a few ms); peak RSS = VmHWM; CPU = utime+stime of the consumer process,
//! per 1,000 jobs. The broker's CPU (beam.smp) and this process's (publisher idle, sandbox busy)
//! over the same window are shown too, since all share the machine's cores.
//!
//! Checked for every worker run: every uuid delivered exactly once (sandbox duplicates == 0,
//! unique uuids == N), nothing dead-lettered, the work queue empty after the worker stopped; for
//! (c) and the sweep, per-conversation order in the sandbox's records.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use blinger_sandbox::{Sandbox, SandboxConfig};
use blinger_worker::broker::Topology;
use blinger_worker::broker::topology::declare;
use blinger_worker::config::{AmqpSettings, QueueType};
use clap::Parser;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeleteOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

const WORKER: &str = env!("CARGO_BIN_EXE_blinger-worker");
const TOKEN: &str = "loadbench-token";
const TEXT: &str = "Hello! Your order #10482 has shipped and should arrive on Thursday.";

#[derive(Parser, Debug, Clone)]
#[command(about = "End-to-end load benchmark of blinger-worker")]
struct Args {
    /// The broker to measure against (its version is read from the connection and reported).
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    amqp_url: String,
    /// Jobs per run of (a), (b) and (c).
    #[arg(long, default_value_t = 100_000)]
    jobs: usize,
    /// Conversations the jobs are spread over (round robin).
    #[arg(long, default_value_t = 1000)]
    conversations: usize,
    /// Queue types to measure.
    #[arg(long, value_delimiter = ',', default_value = "quorum,classic")]
    queue_types: Vec<String>,
    /// Prefetch of the worker and of the ceiling consumer.
    #[arg(long, default_value_t = 1000)]
    prefetch: u16,
    /// Worker concurrency for (b) and (c).
    #[arg(long, default_value_t = 512)]
    concurrency: u32,
    /// Sandbox latency of (c), ms.
    #[arg(long, default_value_t = 50)]
    latency_ms: u64,
    /// Concurrency values of the sweep (50 ms latency, quorum).
    #[arg(long, value_delimiter = ',', default_value = "8,32,128,512")]
    sweep: Vec<u32>,
    /// Most jobs per sweep point (fewer for low concurrency, to keep each point ~10 s).
    #[arg(long, default_value_t = 20_000)]
    sweep_jobs: usize,
    #[arg(long)]
    no_sweep: bool,
    /// Worker receipts (on by default in the worker).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    receipts: bool,
    /// Partition counts (BLINGER_WORKER_PARTITIONS) to run (b) with, this build; 0 is the
    /// single-queue mode. E.g. `--partitions 0,16` compares the two in the same run.
    #[arg(long, value_delimiter = ',', default_value = "0")]
    partitions: Vec<u16>,
    /// Which of the runs to do: a (ceiling), b (0 ms), c (latency).
    #[arg(long, value_delimiter = ',', default_value = "a,b,c")]
    runs: Vec<String>,
    /// Extra environment for the worker process, KEY=VALUE (repeatable), e.g. to try
    /// MALLOC_ARENA_MAX=2 or BLINGER_WORKER_RECEIPTS=false.
    #[arg(long = "worker-env")]
    worker_env: Vec<String>,
    /// Also run (b) with another worker binary, in the same run, as LABEL=PATH (repeatable):
    /// a build of an earlier commit (before/after), or of other features.
    #[arg(long = "compare", value_parser = parse_compare)]
    compare: Vec<(String, PathBuf)>,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Worker logs and data directories go here.
    #[arg(long, default_value = "target/loadbench")]
    work_dir: PathBuf,
    /// Internal: run as the ceiling consumer.
    #[arg(long, hide = true)]
    ceiling_child: bool,
    #[arg(long, hide = true)]
    queue: Option<String>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

static AMQP_URL: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// `--amqp-url` (or `AMQP_URL`); the ceiling child gets it through `AMQP_URL`.
fn amqp_url() -> String {
    AMQP_URL.get().expect("set in main").clone()
}

/// Host and port of the broker's AMQP listener.
fn amqp_addr() -> (String, u16) {
    let url = url::Url::parse(&amqp_url()).expect("AMQP URL");
    let host = url.host_str().unwrap_or("127.0.0.1").to_owned();
    (host, url.port().unwrap_or(5672))
}

/// The version the broker announces in connection.start (lapin does not expose it).
fn broker_version() -> String {
    use std::io::Read;
    let (host, port) = amqp_addr();
    let read = || -> std::io::Result<String> {
        let mut s = std::net::TcpStream::connect((host.as_str(), port))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"AMQP\x00\x00\x09\x01")?;
        let mut buf = vec![0u8; 8192];
        let mut len = 0;
        let key = b"\x07versionS";
        loop {
            let n = s.read(&mut buf[len..])?;
            if n == 0 || len + n == buf.len() {
                return Ok("unknown".into());
            }
            len += n;
            if let Some(at) = buf[..len].windows(key.len()).position(|w| w == key) {
                let at = at + key.len();
                if len >= at + 4 {
                    let n = u32::from_be_bytes(buf[at..at + 4].try_into().unwrap()) as usize;
                    if len >= at + 4 + n {
                        return Ok(String::from_utf8_lossy(&buf[at + 4..at + 4 + n]).into_owned());
                    }
                }
            }
        }
    };
    read().unwrap_or_else(|_| "unknown".into())
}

fn now_ms() -> u64 {
    blinger_worker::store::now_ms()
}

/// One measured run.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
struct Row {
    label: String,
    queue_type: String,
    jobs: usize,
    concurrency: Option<u32>,
    latency_ms: Option<u64>,
    rate_limit: Option<u32>,
    publish_per_sec: f64,
    jobs_per_sec: f64,
    p50_ms: u64,
    p99_ms: u64,
    peak_rss_mib: f64,
    cpu_s_per_1k: f64,
    broker_cpu_s_per_1k: f64,
    bench_cpu_s_per_1k: f64,
    seconds: f64,
    checks: String,
}

/// What the ceiling child reports on its stdout.
#[derive(Debug, Serialize, Deserialize)]
struct ChildReport {
    received: usize,
    first_ms: u64,
    last_ms: u64,
    latencies: Vec<u64>,
    vm_hwm_kib: u64,
    cpu_ticks: u64,
}

fn main() {
    let args = Args::parse();
    AMQP_URL.set(args.amqp_url.clone()).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    if args.ceiling_child {
        let report = rt.block_on(ceiling_child(&args));
        println!("{}", serde_json::to_string(&report).unwrap());
        return;
    }
    rt.block_on(run(args));
}

// ---------------------------------------------------------------- /proc

fn clk_tck() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: &str) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // Fields after the command name (which may hold spaces) start at the last ')'.
    let rest = &stat[stat.rfind(')').map_or(0, |i| i + 2)..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // state is field 3 of stat; utime and stime are fields 14 and 15.
    let get = |i: usize| {
        fields
            .get(i - 3)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    get(14) + get(15)
}

/// Sockets the process holds open: its pooled HTTP connections, plus the AMQP connection and the
/// metrics listener. Peak RSS follows the HTTP connections (~30 KiB each in hyper's buffers and
/// channels), and the pool may open more of them than the worker's concurrency (docs/performance.md).
fn open_sockets(pid: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|fds| {
            fds.flatten()
                .filter(|fd| {
                    std::fs::read_link(fd.path())
                        .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"))
                })
                .count()
        })
        .unwrap_or(0)
}

fn vm_hwm_kib(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// The broker's Erlang VM, if it runs on this machine (read only: its CPU time): the `beam.smp`
/// that holds the listening socket of the AMQP port (several brokers may run here), else the only
/// `beam.smp`.
fn broker_pid() -> Option<String> {
    let beams: Vec<PathBuf> = std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.parse::<u32>().is_ok())
                && std::fs::read_to_string(e.path().join("comm"))
                    .is_ok_and(|c| c.trim() == "beam.smp")
        })
        .map(|e| e.path())
        .collect();
    let name = |p: &PathBuf| p.file_name().unwrap().to_string_lossy().into_owned();
    let port = amqp_addr().1;
    // Inodes of sockets listening (state 0A) on the port, from /proc/net/tcp{,6}.
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        for line in std::fs::read_to_string(table)
            .unwrap_or_default()
            .lines()
            .skip(1)
        {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local_port = f
                .get(1)
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if local_port == Some(port) && f.get(3) == Some(&"0A") {
                if let Some(inode) = f.get(9) {
                    inodes.push(format!("socket:[{inode}]"));
                }
            }
        }
    }
    let listens = |pid: &PathBuf| {
        std::fs::read_dir(pid.join("fd")).is_ok_and(|fds| {
            fds.flatten().any(|fd| {
                std::fs::read_link(fd.path())
                    .is_ok_and(|l| inodes.iter().any(|i| l.as_os_str() == i.as_str()))
            })
        })
    };
    match beams.iter().find(|p| listens(p)) {
        Some(p) => Some(name(p)),
        None if beams.len() == 1 => Some(name(&beams[0])),
        None => None,
    }
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

// ---------------------------------------------------------------- broker helpers

fn amqp_settings(base: &str, queue_type: &str, partitions: u16) -> AmqpSettings {
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        amqp: AmqpSettings,
    }
    Cli::parse_from([
        "loadbench",
        "--amqp-url",
        &amqp_url(),
        "--exchange",
        &format!("{base}.x"),
        "--queue",
        base,
        "--dead-letter-queue",
        &format!("{base}.dead"),
        "--receipts-exchange",
        &format!("{base}.events"),
        "--queue-type",
        queue_type,
        "--retry-delays",
        "5s,30s",
        "--partitions",
        &partitions.to_string(),
    ])
    .amqp
}

struct Topo {
    settings: AmqpSettings,
    topology: Topology,
}

impl Topo {
    async fn declare(channel: &Channel, label: &str, queue_type: &str, partitions: u16) -> Topo {
        let tag = &Uuid::new_v4().simple().to_string()[..8];
        let base = format!("loadbench.{label}.{tag}");
        let settings = amqp_settings(&base, queue_type, partitions);
        let topology = Topology::new(&settings);
        declare(channel, &settings, &topology)
            .await
            .expect("topology declared");
        Topo { settings, topology }
    }

    async fn ready(&self, channel: &Channel, queue: &str) -> u32 {
        blinger_worker::broker::topology::ready_count(channel, queue)
            .await
            .ok()
            .flatten()
            .unwrap_or(u32::MAX)
    }

    /// Ready messages once the count settles at 0 (a quorum queue applies acks a little later
    /// than the consumer sent them), or the last count after 5 s.
    async fn settled_ready(&self, channel: &Channel, queue: &str) -> u32 {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let n = self.ready(channel, queue).await;
            if n == 0 || Instant::now() > deadline {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn delete(&self, channel: &Channel) {
        let t = &self.topology;
        let partitioned = t.partitioned.iter().flat_map(|p| p.all_queues());
        for q in std::iter::once(t.queue.clone())
            .chain(std::iter::once(t.dead_letter_queue.clone()))
            .chain(t.tiers.iter().cloned())
            .chain(partitioned)
        {
            let _ = channel
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        let partitioned = t
            .partitioned
            .iter()
            .flat_map(|p| [p.exchange.clone(), p.unrouted.clone()]);
        for x in [t.exchange.clone(), t.receipts_exchange.clone()]
            .into_iter()
            .chain(partitioned)
        {
            let _ = channel
                .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
                .await;
        }
    }
}

/// The jobs of one run: body, uuid, conversation index and sequence number within it.
struct Jobs {
    conv_ids: Vec<String>,
    /// uuid -> (conversation index, sequence in its conversation, publish ms)
    meta: HashMap<Uuid, (usize, usize, u64)>,
}

/// Publishes `n` persistent jobs with confirms (a window of 1,000 outstanding); returns jobs/s.
async fn publish(channel: &Channel, topo: &Topo, n: usize, conversations: usize) -> (Jobs, f64) {
    let conv_ids: Vec<String> = (0..conversations)
        .map(|_| Uuid::new_v4().to_string())
        .collect();
    let mut meta = HashMap::with_capacity(n);
    let mut window = std::collections::VecDeque::new();
    let started = Instant::now();
    for i in 0..n {
        let id = Uuid::new_v4();
        let conv = i % conversations;
        let seq = i / conversations;
        let body = serde_json::to_vec(&serde_json::json!({
            "kind": "send-text",
            "id": id.to_string(),
            "conversation_id": conv_ids[conv],
            "text": format!("{TEXT} [{seq}]"),
        }))
        .unwrap();
        let ts = now_ms();
        meta.insert(id, (conv, seq, ts));
        let confirm = channel
            .basic_publish(
                topo.topology.exchange.as_str().into(),
                "send-text".into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_content_type("application/json".into())
                    .with_timestamp(ts),
            )
            .await
            .expect("publish");
        window.push_back(confirm);
        if window.len() >= 1000 {
            let c = window.pop_front().unwrap().await.expect("confirm");
            assert!(c.is_ack(), "publish nacked");
        }
    }
    for c in window {
        assert!(c.await.expect("confirm").is_ack(), "publish nacked");
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    (Jobs { conv_ids, meta }, rate)
}

// ---------------------------------------------------------------- (a) ceiling

async fn ceiling_child(args: &Args) -> ChildReport {
    let n = args.jobs;
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("connect");
    let channel = conn.create_channel().await.expect("channel");
    channel
        .basic_qos(args.prefetch, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = channel
        .basic_consume(
            args.queue.as_deref().expect("--queue").into(),
            "loadbench-ceiling".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let mut latencies = Vec::with_capacity(n);
    let mut first_ms = 0;
    let mut last_ms = 0;
    while latencies.len() < n {
        let delivery = match tokio::time::timeout(Duration::from_secs(60), consumer.next()).await {
            Ok(Some(Ok(d))) => d,
            other => panic!("ceiling consumer stopped early: {other:?}"),
        };
        let now = now_ms();
        if first_ms == 0 {
            first_ms = now;
        }
        last_ms = now;
        let ts = (*delivery.properties.timestamp()).unwrap_or(now);
        latencies.push(now.saturating_sub(ts));
        delivery.ack(BasicAckOptions::default()).await.expect("ack");
    }
    // A synchronous round trip after the last ack (the broker handles a channel's frames in
    // order), then a moment for a quorum queue to settle them: closing at once can hand the
    // last acks' messages back to the queue.
    let _ = blinger_worker::broker::topology::ready_count(
        &channel,
        args.queue.as_deref().expect("--queue"),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = channel.close(200, "done".into()).await;
    let _ = conn.close(200, "done".into()).await;
    ChildReport {
        received: latencies.len(),
        first_ms,
        last_ms,
        latencies,
        vm_hwm_kib: vm_hwm_kib("self"),
        cpu_ticks: cpu_ticks("self"),
    }
}

async fn run_ceiling(args: &Args, channel: &Channel, queue_type: &str, tck: u64) -> Row {
    let n = args.jobs;
    let topo = Topo::declare(channel, "ceiling", queue_type, 0).await;
    let (_jobs, publish_rate) = publish(channel, &topo, n, args.conversations).await;
    let broker = broker_pid();
    let broker_before = broker.as_deref().map_or(0, cpu_ticks);
    let started = Instant::now();
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ceiling-child",
            "--jobs",
            &n.to_string(),
            "--prefetch",
            &args.prefetch.to_string(),
            "--queue",
            &topo.topology.queue,
        ])
        .env("AMQP_URL", amqp_url())
        .stderr(Stdio::inherit())
        .output()
        .expect("ceiling child runs");
    let seconds_total = started.elapsed().as_secs_f64();
    let broker_ticks = broker.as_deref().map_or(0, cpu_ticks) - broker_before;
    assert!(out.status.success(), "ceiling child failed");
    let report: ChildReport =
        serde_json::from_slice(out.stdout.split(|b| *b == b'\n').next().unwrap())
            .expect("child report");
    let mut left = topo.settled_ready(channel, &topo.topology.queue).await;
    for q in topo.topology.partitioned.iter().flat_map(|p| {
        std::iter::once(p.input.clone())
            .chain(std::iter::once(p.unrouted.clone()))
            .chain(p.queues.iter().cloned())
    }) {
        left = left.saturating_add(topo.settled_ready(channel, &q).await);
    }
    topo.delete(channel).await;
    let mut lat = report.latencies;
    lat.sort_unstable();
    let seconds = (report.last_ms - report.first_ms).max(1) as f64 / 1000.0;
    Row {
        label: "(a) ceiling: bare lapin consumer, ack only".into(),
        queue_type: queue_type.into(),
        jobs: n,
        concurrency: None,
        latency_ms: None,
        rate_limit: None,
        publish_per_sec: publish_rate,
        jobs_per_sec: n as f64 / seconds,
        p50_ms: percentile(&lat, 0.50),
        p99_ms: percentile(&lat, 0.99),
        peak_rss_mib: report.vm_hwm_kib as f64 / 1024.0,
        cpu_s_per_1k: report.cpu_ticks as f64 / tck as f64 / n as f64 * 1000.0,
        broker_cpu_s_per_1k: broker_ticks as f64 / tck as f64 / n as f64 * 1000.0,
        bench_cpu_s_per_1k: 0.0,
        seconds,
        checks: format!(
            "received {}/{n}, queue left {left}; child ran {seconds_total:.1}s incl. connect",
            report.received
        ),
    }
}

// ---------------------------------------------------------------- (b), (c) the worker

struct WorkerRun<'a> {
    label: String,
    queue_type: &'a str,
    jobs: usize,
    concurrency: u32,
    latency_ms: u64,
    rate_limit: u32,
    check_order: bool,
    /// BLINGER_WORKER_PARTITIONS.
    partitions: u16,
    /// The worker binary: this build's, or `--baseline-bin`.
    bin: &'a Path,
}

/// A run's label with its partition count, when partitioned.
fn partitions_label(label: &str, partitions: u16) -> String {
    if partitions == 0 {
        label.to_owned()
    } else {
        format!("{label}, {partitions} partitions")
    }
}

fn parse_compare(s: &str) -> Result<(String, PathBuf), String> {
    let (label, path) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected LABEL=PATH"))?;
    Ok((label.to_owned(), PathBuf::from(path)))
}

fn parse_rfc3339_ms(s: &str) -> u64 {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .expect("sandbox timestamps are RFC 3339");
    (t.unix_timestamp_nanos() / 1_000_000) as u64
}

async fn run_worker(
    args: &Args,
    channel: &Channel,
    sandbox: &Sandbox,
    run: WorkerRun<'_>,
    tck: u64,
) -> Row {
    let n = run.jobs;
    let topo = Topo::declare(channel, "worker", run.queue_type, run.partitions).await;
    let (jobs, publish_rate) = publish(channel, &topo, n, args.conversations).await;
    sandbox.reset();
    sandbox.update(|c| c.latency_ms = run.latency_ms);

    std::fs::create_dir_all(&args.work_dir).unwrap();
    let data = tempfile::Builder::new()
        .prefix("data-")
        .tempdir_in(&args.work_dir)
        .unwrap();
    let log_path = args.work_dir.join(format!(
        "worker-{}-{}-c{}-{}ms.log",
        run.queue_type, n, run.concurrency, run.latency_ms
    ));
    let log = std::fs::File::create(&log_path).unwrap();
    let s = &topo.settings;
    let mut child = Command::new(run.bin)
        .arg("run")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("AMQP_URL", amqp_url())
        .env("BLINGER_API_URL", sandbox.base_url())
        .env("BLINGER_API_TOKEN", TOKEN)
        .env("BLINGER_WORKER_DATA_DIR", data.path())
        .env(
            "BLINGER_WORKER_METRICS_ADDR",
            format!("127.0.0.1:{}", test_support::free_port()),
        )
        .env("BLINGER_WORKER_CONCURRENCY", run.concurrency.to_string())
        .env("BLINGER_WORKER_PREFETCH", args.prefetch.to_string())
        .env("BLINGER_WORKER_RATE_LIMIT", run.rate_limit.to_string())
        .env(
            "BLINGER_WORKER_RATE_BURST",
            run.rate_limit.min(100_000).to_string(),
        )
        .env("BLINGER_WORKER_QUEUE_TYPE", run.queue_type)
        .env("BLINGER_WORKER_EXCHANGE", &s.exchange)
        .env("BLINGER_WORKER_QUEUE", &s.queue)
        .env("BLINGER_WORKER_DEAD_LETTER_QUEUE", &s.dead_letter_queue)
        .env("BLINGER_WORKER_RECEIPTS_EXCHANGE", &s.receipts_exchange)
        .env("BLINGER_WORKER_RETRY_DELAYS", "5s,30s")
        .env("BLINGER_WORKER_PARTITIONS", run.partitions.to_string())
        .env("BLINGER_WORKER_RECEIPTS", args.receipts.to_string())
        .env("BLINGER_WORKER_LOG_LEVEL", "warn")
        .envs(args.worker_env.iter().filter_map(|kv| kv.split_once('=')))
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("worker binary starts");
    let pid = child.id().to_string();
    // Optional profile of the worker while it consumes: LOADBENCH_PERF=<directory>. Attached
    // once the first request arrived (all the worker's threads exist by then).
    let perf_out = std::env::var_os("LOADBENCH_PERF").map(|dir| {
        PathBuf::from(dir).join(format!(
            "perf-{}-c{}-{}ms.data",
            run.queue_type, run.concurrency, run.latency_ms
        ))
    });
    let mut perf = None;
    let broker = broker_pid();
    let broker_before = broker.as_deref().map_or(0, cpu_ticks);
    let self_before = cpu_ticks("self");

    // Wait for every job to be accepted by the sandbox.
    let deadline = Instant::now() + Duration::from_secs(60 + (n as u64 / 100));
    let mut last_progress = (0, Instant::now());
    loop {
        let stats = sandbox.stats();
        if stats.delivered + stats.duplicates >= n as u64 {
            break;
        }
        if let (Some(out), None, true) = (&perf_out, &perf, stats.total > 0) {
            perf = Some(
                Command::new("perf")
                    .args(["record", "-F", "499", "--call-graph", "dwarf,16384", "-o"])
                    .arg(out)
                    .args(["-p", &pid])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("perf starts"),
            );
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("worker exited early ({status}); see {}", log_path.display());
        }
        if stats.delivered != last_progress.0 {
            last_progress = (stats.delivered, Instant::now());
        }
        if Instant::now() > deadline || last_progress.1.elapsed() > Duration::from_secs(30) {
            eprintln!(
                "  stalled at {}/{n} delivered; see {}",
                stats.delivered,
                log_path.display()
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Let the last records and acks land before sampling and stopping.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let worker_ticks = cpu_ticks(&pid);
    let rss_kib = vm_hwm_kib(&pid);
    let sockets = open_sockets(&pid);
    let broker_ticks = broker.as_deref().map_or(0, cpu_ticks) - broker_before;
    let self_ticks = cpu_ticks("self") - self_before;
    if let Some(mut perf) = perf {
        let perf_pid = perf.id().to_string();
        let _ = Command::new("kill").args(["-INT", &perf_pid]).status();
        let _ = perf.wait();
    }
    Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill runs");
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();

    // Checks and figures from the sandbox's records.
    let stats = sandbox.stats();
    let records = sandbox.requests();
    let mut first_arrival = u64::MAX;
    let mut last_answer = 0;
    let mut lat = Vec::with_capacity(records.len());
    let mut next_seq: Vec<usize> = vec![0; jobs.conv_ids.len()];
    let mut order_violations = 0usize;
    let mut unknown = 0usize;
    for r in &records {
        let arrival = parse_rfc3339_ms(&r.ts);
        let answered = arrival + r.latency_ms;
        first_arrival = first_arrival.min(arrival);
        last_answer = last_answer.max(answered);
        let Some(&(conv, seq, published)) = r
            .uuid
            .as_deref()
            .and_then(|u| Uuid::parse_str(u).ok())
            .and_then(|u| jobs.meta.get(&u))
        else {
            unknown += 1;
            continue;
        };
        lat.push(answered.saturating_sub(published));
        // Records are in answer order; one conversation is sequential, so its sequence numbers
        // must come in order.
        if seq != next_seq[conv] {
            order_violations += 1;
        }
        next_seq[conv] = seq + 1;
    }
    lat.sort_unstable();
    let left = topo.settled_ready(channel, &topo.topology.queue).await;
    let dead = topo.ready(channel, &topo.topology.dead_letter_queue).await;
    topo.delete(channel).await;
    let seconds = (last_answer.saturating_sub(first_arrival)).max(1) as f64 / 1000.0;
    let ok = stats.duplicates == 0
        && stats.unique_uuids == n as u64
        && stats.total == n as u64
        && left == 0
        && dead == 0
        && unknown == 0
        && (!run.check_order || order_violations == 0)
        && status.success();
    let checks = format!(
        "{}: unique {}/{n}, dup {}, requests {}, left {left}, dead {dead}{}, exit {}; {sockets} sockets open",
        if ok { "OK" } else { "FAILED" },
        stats.unique_uuids,
        stats.duplicates,
        stats.total,
        if run.check_order {
            format!(", order violations {order_violations}")
        } else {
            String::new()
        },
        status.code().map_or("signal".into(), |c| c.to_string()),
    );
    Row {
        label: run.label,
        queue_type: run.queue_type.into(),
        jobs: n,
        concurrency: Some(run.concurrency),
        latency_ms: Some(run.latency_ms),
        rate_limit: Some(run.rate_limit),
        publish_per_sec: publish_rate,
        jobs_per_sec: n as f64 / seconds,
        p50_ms: percentile(&lat, 0.50),
        p99_ms: percentile(&lat, 0.99),
        peak_rss_mib: rss_kib as f64 / 1024.0,
        cpu_s_per_1k: worker_ticks as f64 / tck as f64 / n as f64 * 1000.0,
        broker_cpu_s_per_1k: broker_ticks as f64 / tck as f64 / n as f64 * 1000.0,
        bench_cpu_s_per_1k: self_ticks as f64 / tck as f64 / n as f64 * 1000.0,
        seconds,
        checks,
    }
}

// ---------------------------------------------------------------- main run

fn print_table(title: &str, rows: &[Row]) {
    println!("\n### {title}\n");
    println!(
        "| run | queue | jobs | conc. | latency | jobs/s | p50 ms | p99 ms | peak RSS MiB | CPU s/1k jobs | broker CPU s/1k | bench+sandbox CPU s/1k | publish jobs/s | checks |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {} | {:.0} | {} | {} | {:.1} | {:.3} | {:.3} | {:.3} | {:.0} | {} |",
            r.label,
            r.queue_type,
            r.jobs,
            r.concurrency.map_or("-".into(), |c| c.to_string()),
            r.latency_ms.map_or("-".into(), |l| format!("{l} ms")),
            r.jobs_per_sec,
            r.p50_ms,
            r.p99_ms,
            r.peak_rss_mib,
            r.cpu_s_per_1k,
            r.broker_cpu_s_per_1k,
            r.bench_cpu_s_per_1k,
            r.publish_per_sec,
            r.checks
        );
    }
}

async fn run(args: Args) {
    let tck = clk_tck();
    let began = Instant::now();
    let version = broker_version();
    let (host, port) = amqp_addr();
    eprintln!(
        "loadbench: RabbitMQ {version} at {host}:{port}, {} jobs per run, queue types {:?}, \
         prefetch {}, worker {WORKER}",
        args.jobs, args.queue_types, args.prefetch
    );
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| panic!("RabbitMQ at AMQP_URL ({}): {e}", amqp_url()));
    let channel = conn.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let sandbox = Sandbox::start(
        "127.0.0.1:0".parse().unwrap(),
        SandboxConfig {
            max_records: args.jobs.max(args.sweep_jobs) + 1000,
            ..SandboxConfig::with_token(TOKEN)
        },
        None,
    )
    .await
    .expect("sandbox starts");

    // (c), the sweep and the `--compare` binaries run with the first partition count.
    let first = args.partitions.first().copied().unwrap_or(0);
    let mut main_rows = Vec::new();
    let mut ratios = Vec::new();
    for qt in &args.queue_types {
        let _: QueueType = clap::ValueEnum::from_str(qt, true).expect("quorum or classic");
        let want = |r: &str| args.runs.iter().any(|x| x == r);
        let mut a = None;
        if want("a") {
            eprintln!("[{qt}] (a) ceiling ...");
            let row = run_ceiling(&args, &channel, qt, tck).await;
            eprintln!("  {:.0} jobs/s", row.jobs_per_sec);
            a = Some(row);
        }
        // (b) with this build, then with each `--compare` binary: same queue type, same sandbox.
        let mut b = None;
        let this_build: Vec<_> = args
            .partitions
            .iter()
            .map(|&p| (p, partitions_label("worker", p), PathBuf::from(WORKER)))
            .collect();
        let b_runs = this_build.iter().filter(|_| want("b")).cloned();
        let compared = args
            .compare
            .iter()
            .map(|(label, bin)| (first, partitions_label(label, first), bin.clone()));
        for (i, (partitions, label, bin)) in b_runs.chain(compared).enumerate() {
            let bin = &bin;
            eprintln!("[{qt}] (b) {label} ({}), 0 ms ...", bin.display());
            let row = run_worker(
                &args,
                &channel,
                &sandbox,
                WorkerRun {
                    label: format!("(b) {label}, sandbox 0 ms"),
                    queue_type: qt,
                    jobs: args.jobs,
                    concurrency: args.concurrency,
                    latency_ms: 0,
                    rate_limit: 1_000_000,
                    check_order: true,
                    partitions,
                    bin,
                },
                tck,
            )
            .await;
            eprintln!("  {:.0} jobs/s; {}", row.jobs_per_sec, row.checks);
            if i == 0 && want("b") {
                b = Some(row);
            } else {
                main_rows.push(row);
            }
        }
        let mut c = None;
        if want("c") {
            eprintln!("[{qt}] (c) worker, {} ms ...", args.latency_ms);
            let row = run_worker(
                &args,
                &channel,
                &sandbox,
                WorkerRun {
                    label: format!(
                        "(c) worker, sandbox {} ms, {} conversations",
                        args.latency_ms, args.conversations
                    ),
                    queue_type: qt,
                    jobs: args.jobs,
                    concurrency: args.concurrency,
                    latency_ms: args.latency_ms,
                    rate_limit: 1_000_000,
                    check_order: true,
                    partitions: first,
                    bin: Path::new(WORKER),
                },
                tck,
            )
            .await;
            eprintln!("  {:.0} jobs/s; {}", row.jobs_per_sec, row.checks);
            c = Some(row);
        }
        if let (Some(a), Some(b)) = (&a, &b) {
            ratios.push((qt.clone(), b.jobs_per_sec / a.jobs_per_sec));
        }
        main_rows.extend([a, b, c].into_iter().flatten());
    }

    let mut sweep_rows = Vec::new();
    if !args.no_sweep {
        let qt = args.queue_types.first().cloned().unwrap_or("quorum".into());
        let mut points: Vec<(u32, u32)> = args.sweep.iter().map(|&c| (c, 1_000_000)).collect();
        if let Some(&max) = args.sweep.iter().max() {
            points.push((max, 1000));
        }
        for (concurrency, rate_limit) in points {
            // ~concurrency / latency jobs per second: keep each point near 10 s.
            let per_sec = concurrency as usize * 1000 / args.latency_ms.max(1) as usize;
            let jobs =
                (per_sec.min(rate_limit as usize) * 10).clamp(1000, args.sweep_jobs.max(1000));
            eprintln!(
                "[sweep] concurrency {concurrency}, rate limit {rate_limit}/s, {jobs} jobs ..."
            );
            let row = run_worker(
                &args,
                &channel,
                &sandbox,
                WorkerRun {
                    label: format!(
                        "sweep: concurrency {concurrency}{}",
                        if rate_limit < 1_000_000 {
                            format!(", rate limit {rate_limit}/s")
                        } else {
                            String::new()
                        }
                    ),
                    queue_type: &qt,
                    jobs,
                    concurrency,
                    latency_ms: args.latency_ms,
                    rate_limit,
                    check_order: true,
                    partitions: first,
                    bin: Path::new(WORKER),
                },
                tck,
            )
            .await;
            eprintln!("  {:.0} jobs/s; {}", row.jobs_per_sec, row.checks);
            sweep_rows.push(row);
        }
    }

    sandbox.shutdown().await;
    let _ = conn.close(200, "done".into()).await;

    println!(
        "\n## blinger-worker load benchmark\n\nRabbitMQ {version} at {host}:{port}; {} jobs per run, prefetch {}, worker concurrency {}, {} conversations, receipts {}{}; total wall time {:.0} s",
        args.jobs,
        args.prefetch,
        args.concurrency,
        args.conversations,
        if args.receipts { "on" } else { "off" },
        if args.worker_env.is_empty() {
            String::new()
        } else {
            format!(", worker env {}", args.worker_env.join(" "))
        },
        began.elapsed().as_secs_f64()
    );
    print_table("Throughput against the ceiling", &main_rows);
    println!("\n| queue | (b)/(a) |\n|---|---:|");
    for (qt, r) in &ratios {
        println!("| {qt} | {r:.2} |");
    }
    if !sweep_rows.is_empty() {
        print_table(
            &format!("Concurrency sweep at {} ms latency", args.latency_ms),
            &sweep_rows,
        );
    }
    if let Some(path) = &args.json {
        let json = serde_json::json!({
            "broker_version": version, "broker": format!("{host}:{port}"),
            "jobs": args.jobs, "prefetch": args.prefetch, "concurrency": args.concurrency,
            "conversations": args.conversations, "receipts": args.receipts,
            "rows": main_rows, "ratios": ratios, "sweep": sweep_rows,
            "wall_seconds": began.elapsed().as_secs_f64(),
        });
        let mut f = std::fs::File::create(path).unwrap();
        writeln!(f, "{}", serde_json::to_string_pretty(&json).unwrap()).unwrap();
        eprintln!("wrote {}", path.display());
    }
}
