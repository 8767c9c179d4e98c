//! Micro-benchmarks of the per-job hot path (`cargo bench --bench hot_path`, ~3 minutes).
//!
//! Groups:
//! - `decode`: `job::decode` (JSON + validation) for each kind, and `send-text` with a large text;
//! - `store`: lookup (hit, miss), and `Store::record` (insert + group commit) with 1, 16 and 64
//!   concurrent writers, reported per record, next to a baseline of one fsync per record
//!   (the same two inserts as `Store::record`, then `sled::Db::flush`, on the same disk);
//! - `request`: `blinger::Client::request` (URL with the encoded segment + JSON body) per kind;
//! - `dispatch`: the real `Dispatcher::submit` with lapin's `Delivery::mock` (its acker is not
//!   connected). The pipeline behind it returns at once (its session is marked dead), so this is
//!   decode + metrics + per-conversation lane bookkeeping + one task + one semaphore permit per
//!   job. The session's broker is in memory (`MemoryOutbox`): no RabbitMQ needed;
//! - `pipeline`: the same dispatcher with a live pipeline, against the in-process sandbox over
//!   real HTTP with a real store (group commit) and an in-memory outbox: the worker's whole
//!   per-job cost except the broker's (no receipts; acks are recorded in memory).
//!
//! Store benchmarks write under `target/bench-store` (a real disk: fsync cost is real; `/tmp`
//! may be tmpfs).

use std::hint::black_box;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blinger_sandbox::{Sandbox, SandboxConfig};
use blinger_worker::blinger::Client;
use blinger_worker::broker::Topology;
use blinger_worker::broker::outbox::MemoryOutbox;
use blinger_worker::config::{AmqpSettings, Secret, TokenSource};
use blinger_worker::contract::job::{self, Action, Job};
use blinger_worker::contract::trail::TrailKey;
use blinger_worker::engine::dispatch::Dispatcher;
use blinger_worker::engine::fair::FairShare;
use blinger_worker::engine::pipeline::{Parts, Pipeline, SessionLink};
use blinger_worker::engine::ratelimit::Limiter;
use blinger_worker::engine::retry::RetryPolicy;
use blinger_worker::runtime::telemetry::{Health, Metrics};
use blinger_worker::store::{Delivered, Store, now_ms};
use clap::Parser;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use lapin::message::Delivery;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const LIMIT: usize = 256 * 1024;
const CONV: &str = "e1d247c8-5cd8-4f93-b9d7-15fd3259ac22";
const TOKEN: &str = "bench-token";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn text_job(id: Uuid, conv: &str, text: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "kind": "send-text", "id": id.to_string(), "conversation_id": conv, "text": text,
    }))
    .unwrap()
}

fn bodies() -> Vec<(&'static str, Vec<u8>)> {
    let id = Uuid::new_v4().to_string();
    let j = |v: serde_json::Value| serde_json::to_vec(&v).unwrap();
    let typical = "Hello! Your order #10482 has shipped and should arrive on Thursday. Reply here if anything is wrong.";
    vec![
        ("send-text/typical", text_job(Uuid::new_v4(), CONV, typical)),
        (
            "send-text/expires_at",
            j(
                serde_json::json!({"kind":"send-text","id":id,"conversation_id":CONV,"text":typical,
                "expires_at":"2030-01-01T00:00:00Z"}),
            ),
        ),
        (
            "send-text/large-64KiB",
            text_job(
                Uuid::new_v4(),
                CONV,
                &"Lorem ipsum dolor sit amet é ".repeat(2260),
            ),
        ),
        (
            "send-text/large-246KiB",
            text_job(
                Uuid::new_v4(),
                CONV,
                &"Lorem ipsum dolor sit amet é ".repeat(8400),
            ),
        ),
        (
            "send-file/typical",
            j(
                serde_json::json!({"kind":"send-file","id":id,"conversation_id":CONV,
                "file_url":"https://files.example.com/uploads/2024/05/invoice-10482.pdf"}),
            ),
        ),
        (
            "request-review/typical",
            j(serde_json::json!({"kind":"request-review","id":id,"conversation_id":CONV})),
        ),
        (
            "assign-agent/typical",
            j(
                serde_json::json!({"kind":"assign-agent","id":id,"conversation_id":CONV,
                "agent_id":"5f0c2a9e-agent-17"}),
            ),
        ),
        (
            "invalid/missing-field",
            j(serde_json::json!({"kind":"assign-agent","id":id,"conversation_id":CONV})),
        ),
    ]
}

fn decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode");
    g.measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500));
    for (name, body) in bodies() {
        assert!(body.len() <= LIMIT, "{name} is {} bytes", body.len());
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_with_input(BenchmarkId::from_parameter(name), &body, |b, body| {
            b.iter(|| {
                let _ = black_box(job::decode(black_box(body), LIMIT));
            })
        });
    }
    g.finish();
}

fn record() -> Delivered {
    Delivered {
        delivered_at_ms: now_ms(),
        kind: "send-text".into(),
        blinger_id: Some(Uuid::new_v4().to_string()),
        blinger_status: Some("delivered".into()),
        attempts: 1,
        digest: None,
    }
}

fn store_dir(name: &str) -> tempfile::TempDir {
    let base = test_support::target_dir().join("bench-store");
    std::fs::create_dir_all(&base).unwrap();
    tempfile::Builder::new()
        .prefix(name)
        .tempdir_in(base)
        .unwrap()
}

fn store(c: &mut Criterion) {
    let rt = runtime();
    let mut g = c.benchmark_group("store");
    g.measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_millis(500))
        .sample_size(20);

    // Lookups against 100,000 records.
    let dir = store_dir("lookup");
    let store = rt.block_on(async { Store::open(dir.path()).unwrap() });
    let ids: Vec<Uuid> = (0..100_000).map(|_| Uuid::new_v4()).collect();
    rt.block_on(async {
        let writers: Vec<_> = ids
            .chunks(1000)
            .map(|chunk| {
                let store = store.clone();
                let chunk = chunk.to_vec();
                tokio::spawn(async move {
                    let futs = chunk.iter().map(|id| {
                        let store = store.clone();
                        async move { store.record(id, &record()).await.unwrap() }
                    });
                    futures_util::future::join_all(futs).await;
                })
            })
            .collect();
        for w in writers {
            w.await.unwrap();
        }
    });
    g.throughput(Throughput::Elements(1));
    let mut i = 0usize;
    g.bench_function("get/hit", |b| {
        b.iter(|| {
            i = (i + 7919) % ids.len();
            black_box(store.get(&ids[i]).unwrap().unwrap());
        })
    });
    let misses: Vec<Uuid> = (0..1000).map(|_| Uuid::new_v4()).collect();
    let mut i = 0usize;
    g.bench_function("get/miss", |b| {
        b.iter(|| {
            i = (i + 1) % misses.len();
            black_box(store.get(&misses[i]).unwrap());
        })
    });
    rt.block_on(store.close()).unwrap();
    drop(dir);

    // Record + group commit, W concurrent writers, time per record.
    for writers in [1usize, 16, 64] {
        let dir = store_dir("record");
        let store = rt.block_on(async { Store::open(dir.path()).unwrap() });
        g.bench_function(BenchmarkId::new("record/group-commit", writers), |b| {
            b.iter_custom(|iters| {
                let per_writer = (iters as usize).div_ceil(writers);
                let store = store.clone();
                rt.block_on(async move {
                    let start = Instant::now();
                    let tasks: Vec<_> = (0..writers)
                        .map(|_| {
                            let store = store.clone();
                            tokio::spawn(async move {
                                for _ in 0..per_writer {
                                    store.record(&Uuid::new_v4(), &record()).await.unwrap();
                                }
                            })
                        })
                        .collect();
                    for t in tasks {
                        t.await.unwrap();
                    }
                    // Normalise to exactly `iters` records.
                    start
                        .elapsed()
                        .mul_f64(iters as f64 / (per_writer * writers) as f64)
                })
            })
        });
        rt.block_on(store.close()).unwrap();
    }

    // Baseline: the naive way, one fsync (sled flush) per record, one writer.
    let dir = store_dir("baseline");
    let db = sled::Config::new()
        .path(dir.path())
        .mode(sled::Mode::HighThroughput)
        .flush_every_ms(Some(1000))
        .cache_capacity(16 * 1024 * 1024)
        .open()
        .unwrap();
    let delivered = db.open_tree("delivered").unwrap();
    let by_time = db.open_tree("delivered_by_time").unwrap();
    g.bench_function("record/fsync-per-record-baseline", |b| {
        b.iter(|| {
            // The same writes as `Store::record` (time index + record), then one fsync each.
            let id = Uuid::new_v4();
            let record = record();
            let value = serde_json::to_vec(&record).unwrap();
            let mut key = [0u8; 24];
            key[..8].copy_from_slice(&record.delivered_at_ms.to_be_bytes());
            key[8..].copy_from_slice(id.as_bytes());
            by_time.insert(key, &[]).unwrap();
            delivered.insert(id.as_bytes(), value).unwrap();
            db.flush().unwrap();
        })
    });
    g.finish();
}

fn request(c: &mut Criterion) {
    let client = Client::new(
        &url::Url::parse("https://widget.blinger.io/api/external/v1").unwrap(),
        &Secret::new(TOKEN),
        Duration::from_secs(10),
    )
    .unwrap();
    let job = |action| Job {
        id: Uuid::new_v4(),
        conversation_id: CONV.into(),
        action,
        expires_at: None,
    };
    let jobs = [
        (
            "send-text",
            job(Action::SendText {
                text: "Hello! Your order #10482 has shipped and should arrive on Thursday.".into(),
            }),
        ),
        (
            "send-file",
            job(Action::SendFile {
                file_url: url::Url::parse("https://files.example.com/uploads/invoice-10482.pdf")
                    .unwrap(),
            }),
        ),
        ("request-review", job(Action::RequestReview)),
        (
            "assign-agent",
            job(Action::AssignAgent {
                agent_id: "5f0c2a9e-agent-17".into(),
            }),
        ),
        (
            "send-text/hostile-conversation-id",
            Job {
                conversation_id: "../../conversation/ä?x=1#frag/".repeat(4),
                ..job(Action::SendText { text: "hi".into() })
            },
        ),
    ];
    let mut g = c.benchmark_group("request");
    g.measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500));
    for (name, job) in &jobs {
        g.bench_with_input(BenchmarkId::from_parameter(name), job, |b, job| {
            b.iter(|| black_box(client.request(black_box(job))))
        });
    }
    g.finish();
}

/// Settings parsed like the binary's (environment included), for the topology names.
fn amqp_settings() -> AmqpSettings {
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        amqp: AmqpSettings,
    }
    Cli::parse_from(["bench", "--queue", "bench.unused"]).amqp
}

struct World {
    pipeline: Arc<Pipeline>,
    _dir: tempfile::TempDir,
}

fn world(rt: &tokio::runtime::Runtime, api: &str) -> World {
    let dir = store_dir("pipeline");
    let metrics = Metrics::new();
    let health = Health::new(metrics.clone());
    let store = rt.block_on(async { Store::open(dir.path()).unwrap() });
    let client = Client::new(
        &url::Url::parse(api).unwrap(),
        &Secret::new(TOKEN),
        Duration::from_secs(10),
    )
    .unwrap();
    let settings = amqp_settings();
    let pipeline = Pipeline::new(Parts {
        client,
        token: TokenSource::Literal(Secret::new(TOKEN)),
        store,
        limiter: std::sync::Arc::new(Limiter::new(
            NonZeroU32::new(1_000_000).unwrap(),
            NonZeroU32::new(100_000).unwrap(),
        )),
        policy: RetryPolicy::new(4, settings.retry_delays.0.clone()),
        topology: Topology::new(&settings),
        metrics,
        health,
        stopping: CancellationToken::new(),
        trail_key: TrailKey::load(None, dir.path()).unwrap(),
        receipts: None,
        keyless_concurrency: None,
    });
    World {
        pipeline: Arc::new(pipeline),
        _dir: dir,
    }
}

/// A session whose broker is in memory ([`MemoryOutbox`]): acks and republishes cost what
/// they cost the pipeline, not a broker's round trip.
fn session() -> Arc<SessionLink> {
    Arc::new(SessionLink {
        outbox: Arc::new(MemoryOutbox::default()),
        alive: CancellationToken::new(),
        header_budget: blinger_worker::broker::outgoing::DEFAULT_HEADER_BUDGET,
        group: 0,
    })
}

fn deliveries(n: usize, conversations: usize) -> Vec<Delivery> {
    let convs: Vec<String> = (0..conversations)
        .map(|_| Uuid::new_v4().to_string())
        .collect();
    (0..n)
        .map(|i| {
            let body = text_job(
                Uuid::new_v4(),
                &convs[i % conversations],
                "Hello! Your order #10482 has shipped and should arrive on Thursday.",
            );
            Delivery::mock(
                i as u64 + 1,
                "blinger.outbound".into(),
                "send-text".into(),
                false,
                body,
            )
        })
        .collect()
}

fn dispatch(c: &mut Criterion) {
    let rt = runtime();
    const JOBS: usize = 1000;

    // Scheduling only: the session is dead, so `Pipeline::process` returns at once.
    let w = world(&rt, "http://127.0.0.1:9/api/external/v1");
    let dead = session();
    dead.alive.cancel();
    let mut g = c.benchmark_group("dispatch");
    g.measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_millis(500))
        .sample_size(20)
        .throughput(Throughput::Elements(JOBS as u64));
    for conversations in [1usize, 100, 1000] {
        {
            let concurrency = 64usize;
            let id = BenchmarkId::new(
                format!("submit+lane/{JOBS}-jobs/concurrency-{concurrency}"),
                format!("{conversations}-conversations"),
            );
            g.bench_function(id, |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let batch = deliveries(JOBS, conversations);
                        let dispatcher = Dispatcher::new(
                            w.pipeline.clone(),
                            concurrency,
                            LIMIT,
                            FairShare::off(),
                        );
                        total += rt.block_on(async {
                            let start = Instant::now();
                            for d in batch {
                                dispatcher.submit(d, &dead);
                            }
                            dispatcher.drained().await;
                            start.elapsed()
                        });
                    }
                    total
                })
            });
        }
    }
    g.finish();

    // The whole per-job path in-process: sandbox over HTTP, store with group commit, mock acks.
    let sandbox = rt.block_on(async {
        Sandbox::start(
            "127.0.0.1:0".parse().unwrap(),
            SandboxConfig {
                max_records: 10_000,
                ..SandboxConfig::with_token(TOKEN)
            },
            None,
        )
        .await
        .unwrap()
    });
    let w = world(&rt, &sandbox.base_url());
    let live = session();
    let ran = std::sync::atomic::AtomicBool::new(false);
    let mut g = c.benchmark_group("pipeline");
    g.measurement_time(Duration::from_secs(5))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(10)
        .throughput(Throughput::Elements(JOBS as u64));
    {
        let concurrency = 64usize;
        g.bench_function(
            BenchmarkId::new(
                format!("in-process/{JOBS}-jobs/1000-conversations"),
                format!("concurrency-{concurrency}"),
            ),
            |b| {
                ran.store(true, std::sync::atomic::Ordering::Relaxed);
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let batch = deliveries(JOBS, 1000);
                        let dispatcher = Dispatcher::new(
                            w.pipeline.clone(),
                            concurrency,
                            LIMIT,
                            FairShare::off(),
                        );
                        total += rt.block_on(async {
                            let start = Instant::now();
                            for d in batch {
                                dispatcher.submit(d, &live);
                            }
                            dispatcher.drained().await;
                            start.elapsed()
                        });
                    }
                    total
                })
            },
        );
    }
    g.finish();
    // Only when it ran: a filter (`cargo bench --bench hot_path -- store`) skips it.
    if ran.load(std::sync::atomic::Ordering::Relaxed) {
        let delivered = sandbox.stats().delivered;
        assert!(delivered > 0, "the pipeline bench delivered nothing");
    }
    rt.block_on(async {
        sandbox.shutdown().await;
    });
}

criterion_group!(benches, decode, store, request, dispatch);
criterion_main!(benches);
