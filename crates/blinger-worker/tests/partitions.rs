//! Partitioned mode (`BLINGER_WORKER_PARTITIONS`): the router, the partition queues, the layout
//! record, against the real RabbitMQ and the sandbox. The rest of the behaviour is the
//! single-queue suite run again with `BLINGER_TEST_PARTITIONS=16` (scripts/test.sh).

use std::collections::BTreeMap;
use std::time::Duration;

use blinger_worker::broker::router::Router;
use blinger_worker::engine::partition::partition_of;
use blinger_worker::runtime::telemetry::Metrics;
use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable, LongString};
use test_support::amqp::consume_all;
use test_support::*;
use tokio_util::sync::CancellationToken;

const T: Duration = Duration::from_secs(30);

fn ls(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

/// The router alone: every job lands in its conversation's partition queue, in publish order,
/// with the properties it may keep; what it cannot read goes to partition 0; nothing stays in
/// the input.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_puts_each_job_in_its_conversations_partition_in_order() {
    let env = TestEnv::new("router").await;
    let topology = env.declare_with(&["--partitions", "4"]).await;
    let partitioned = topology.partitioned.clone().unwrap();
    let conversations: Vec<String> = (0..12).map(|i| format!("conv-{i}")).collect();
    let mut published = BTreeMap::<String, Vec<String>>::new();
    for round in 0..5 {
        for c in &conversations {
            let job = text_job(c, &format!("{round}"));
            publish_noted(&env, &mut published, &job).await;
        }
    }
    // A hostile publisher's properties: CC into another partition, a priority, a forged trail.
    // In a conversation of its own: on RabbitMQ 4.x the input queue itself delivers a priority
    // above 4 first, before the router sees the job (pinned in broker_versions.rs); what this
    // checks is that the copy drops it.
    let mut headers = FieldTable::default();
    headers.insert(
        "CC".into(),
        AMQPValue::FieldArray(vec![ls(&partitioned.routing_key(1))].into()),
    );
    headers.insert("x-blinger-retries".into(), AMQPValue::LongLongInt(7));
    headers.insert("trace-id".into(), ls("t-1"));
    let hostile = text_job("conv-hostile", "5");
    published
        .entry("conv-hostile".to_owned())
        .or_default()
        .push(hostile["id"].as_str().unwrap().to_owned());
    env.channel
        .basic_publish(
            env.names.exchange.as_str().into(),
            "send-text".into(),
            BasicPublishOptions::default(),
            &serde_json::to_vec(&hostile).unwrap(),
            BasicProperties::default()
                .with_delivery_mode(2)
                .with_priority(9)
                .with_headers(headers),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    env.publish_raw("send-text", b"not json").await;

    let metrics = Metrics::new();
    let alive = CancellationToken::new();
    let router = Router::start(
        &env.conn,
        &topology,
        256 * 1024,
        metrics.clone(),
        alive.clone(),
    )
    .await
    .expect("router starts");
    assert!(
        eventually(T, || metrics.router_routed.get() == 62).await,
        "62 routed, got {}",
        metrics.router_routed.get()
    );
    router.stop().await;
    alive.cancel();
    assert!(
        until(T, || async { env.queue_len(&partitioned.input).await == 0 })
            .await
            .is_some(),
        "the input is empty once the copies are confirmed and acked"
    );

    let mut found = BTreeMap::<String, Vec<String>>::new();
    let mut unreadable = 0;
    for (p, queue) in partitioned.queues.iter().enumerate() {
        for msg in consume_all(&env.conn, queue, Duration::from_secs(1)).await {
            let Ok(job) = serde_json::from_slice::<serde_json::Value>(&msg.body) else {
                assert_eq!(p, 0, "an unreadable body goes to partition 0");
                unreadable += 1;
                continue;
            };
            let conversation = job["conversation_id"].as_str().unwrap().to_owned();
            assert_eq!(
                p,
                usize::from(partition_of(&conversation, 4)),
                "{conversation} in its partition"
            );
            if job["text"] == "5" {
                assert_eq!(msg.properties.priority(), &None, "priority dropped");
                assert_eq!(msg.header("trace-id"), "t-1");
                assert!(!msg.headers.contains_key("CC"), "CC dropped");
                assert!(
                    msg.headers.contains_key("x-blinger-retries"),
                    "kept for the seal check"
                );
            }
            found
                .entry(conversation)
                .or_default()
                .push(job["id"].as_str().unwrap().to_owned());
        }
    }
    assert_eq!(unreadable, 1);
    assert_eq!(
        found, published,
        "every job once, in publish order per conversation"
    );
    env.cleanup().await;
}

/// Jobs published to the exchange reach Blinger through the router and the partitions, once
/// each and in order per conversation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_worker_delivers_every_job_once_in_order() {
    let env = TestEnv::new("partitioned").await;
    let worker = env.start_worker(&["--partitions", "8"]).await;
    let mut published = BTreeMap::<String, Vec<String>>::new();
    for round in 0..10 {
        for c in 0..30 {
            let job = text_job(&format!("c-{c}"), &format!("{round}"));
            publish_noted(&env, &mut published, &job).await;
        }
    }
    assert!(
        eventually(T, || worker.delivered_total() == 300).await,
        "300 delivered, got {}",
        worker.delivered_total()
    );
    let sent = sends_by_conversation(&env.sandbox);
    assert_eq!(
        sent, published,
        "sent once each, in publish order per conversation"
    );
    let (_, metrics) = worker.get("/metrics").await;
    assert!(
        metrics.contains("blinger_worker_router_routed_total 300"),
        "{metrics}"
    );
    worker.stop().await;
    env.cleanup().await;
}

/// A copy the partitions exchange cannot route (its partition queue is missing) is caught by the
/// unrouted queue and routed again, not dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_no_partition_took_is_routed_again() {
    let env = TestEnv::new("unrouted").await;
    let worker = env.start_worker(&["--partitions", "4"]).await;
    let job = text_job("c-unrouted", "caught");
    // As a router would publish into a partition that is not there.
    let confirm = env
        .channel
        .basic_publish(
            format!("{}.partitions", env.names.queue).as_str().into(),
            "99".into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            &serde_json::to_vec(&job).unwrap(),
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(
        matches!(confirm, lapin::Confirmation::Ack(None)),
        "taken by the alternate exchange: {confirm:?}"
    );
    assert!(eventually(T, || worker.delivered_total() == 1).await);
    assert_eq!(worker.metrics.router_unrouted.get(), 1);
    worker.stop().await;
    env.cleanup().await;
}

/// The partition count is fixed at install: a worker with another count, or in single-queue mode,
/// refuses to start on a partitioned deployment, naming the procedure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_another_partition_count_refuses_to_start() {
    let env = TestEnv::new("layout").await;
    let worker = env.start_worker(&["--partitions", "4"]).await;
    worker.stop().await;
    // The same count starts again (it reads the record the first one wrote).
    env.start_worker(&["--partitions", "4"]).await.stop().await;
    for (flags, says) in [
        (
            &["--partitions", "8"][..],
            "was installed with 4 partitions",
        ),
        (&["--partitions", "0"][..], "are partitioned"),
    ] {
        let refused = blinger_worker::runtime::worker::Worker::start(env.settings(flags)).await;
        let message = refused.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(message.contains(says), "{flags:?}: {message}");
        assert!(message.contains("docs/deploy.md"), "{message}");
    }
    env.cleanup().await;
}

/// The delivered-records log (docs/scale-out.md 4.5): a replica with an empty store, as after its
/// volume was lost, recognises every job another replica delivered and acks it unsent; a forged
/// "delivered" record (unsealed, published where receipts go) makes no job vanish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_with_an_empty_store_recognises_what_another_delivered() {
    let env = TestEnv::new("log").await;
    let shared = [
        "--partitions",
        "4",
        "--trail-key",
        "one-key-for-every-replica",
    ];
    let mut jobs = Vec::new();
    for i in 0..30 {
        let conversation = format!("c-log-{}", i % 6);
        jobs.push(if i % 3 == 0 {
            serde_json::json!({"kind": "request-review", "id": uuid::Uuid::new_v4(),
                               "conversation_id": conversation})
        } else {
            text_job(&conversation, &format!("{i}"))
        });
    }
    // The first replica with receipts off: its records go to the log directly.
    let first = env
        .start_worker(&[&shared[..], &["--receipts", "false"]].concat())
        .await;
    for job in &jobs {
        env.publish(job).await;
    }
    assert!(
        eventually(T, || first.delivered_total() == 30).await,
        "30 delivered by the first, got {}",
        first.delivered_total()
    );
    first.stop().await;
    assert_eq!(env.sandbox.requests().len(), 30);

    // Someone who may publish receipts forges the record of a job not yet sent.
    let forged = text_job("c-log-forged", "must still be sent");
    let receipt = serde_json::json!({
        "id": forged["id"], "kind": "send-text", "conversation_id": "c-log-forged",
        "outcome": "delivered", "reason": null, "blinger_message_id": "forged",
        "blinger_status": "delivered", "http_status": 200, "attempts": 1,
        "received_at": "2026-12-01T00:00:00Z", "finished_at": "2026-12-01T00:00:01Z"});
    let mut headers = FieldTable::default();
    headers.insert(
        "x-blinger-seal".into(),
        ls("00112233445566778899aabbccddeeff"),
    );
    env.channel
        .basic_publish(
            env.names.events.as_str().into(),
            "delivered.send-text".into(),
            BasicPublishOptions::default(),
            &serde_json::to_vec(&receipt).unwrap(),
            BasicProperties::default().with_headers(headers),
        )
        .await
        .unwrap()
        .await
        .unwrap();

    // The second replica: another, empty data directory; every job comes again.
    let empty = tempfile::tempdir().unwrap();
    let dir = empty.path().display().to_string();
    let second = env
        .start_worker(&[&shared[..], &["--data-dir", &dir]].concat())
        .await;
    for job in jobs.iter().chain([&forged]) {
        env.publish(job).await;
    }
    let duplicates = |w: &RunningWorker| {
        ["send-text", "request-review"]
            .iter()
            .map(|k| w.metrics.jobs_duplicate.with_label_values(&[k]).get())
            .sum::<u64>()
    };
    assert!(
        eventually(T, || duplicates(&second) == 30
            && second.delivered_total() == 1)
        .await,
        "the 30 recognised, the forged one sent: {} duplicates, {} delivered",
        duplicates(&second),
        second.delivered_total()
    );
    let requests = env.sandbox.requests();
    assert_eq!(
        requests.len(),
        31,
        "nothing sent twice, the forged job sent once"
    );
    assert_eq!(
        requests.last().unwrap().body["uuid"],
        forged["id"],
        "the last call is the forged job's"
    );
    assert!(second.metrics.log_records_applied.get() >= 30);
    assert!(
        second.metrics.log_records_rejected.get() >= 1,
        "the forgery is counted"
    );
    second.stop().await;
    env.cleanup().await;
}

/// A partition taken over in the middle of a session (docs/scale-out.md 4.6): the jobs the
/// previous consumer leaves behind are looked up only after this replica has read the log back
/// past the takeover, so a job the previous owner recorded just before it went is not sent again,
/// however far this replica's reading of the log lags behind.
///
/// The lag is made certain, not hoped for: the replica (the real binary) is stopped with SIGSTOP
/// while the previous owner's record goes into the log behind 50,000 other entries and the owner
/// goes; on SIGCONT the job is in the replica's socket at once, the record 25 credit round trips
/// of the log away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_taken_over_is_not_sent_before_the_log_is_read_back() {
    use blinger_worker::config::Secret;
    use blinger_worker::contract::delivered_log;
    use blinger_worker::contract::trail::TrailKey;
    use futures_util::StreamExt;
    use lapin::options::{BasicConsumeOptions, BasicQosOptions};

    const KEY: &str = "one-key-for-every-replica";
    const OTHER_ENTRIES: usize = 50_000;
    let env = TestEnv::new("takeover").await;
    let flags = ["--partitions", "1", "--trail-key", KEY];
    let topology = env.declare_with(&flags).await;
    let partition = topology.partitioned.clone().unwrap().queues[0].clone();
    let log = topology.partitioned.clone().unwrap().log;

    // The previous owner: the partition's first consumer, so its active one.
    let owner = env.conn.create_channel().await.unwrap();
    owner
        .basic_qos(1, BasicQosOptions::default())
        .await
        .unwrap();
    let mut owned = owner
        .basic_consume(
            partition.as_str().into(),
            "previous-owner".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();

    // The replica under test: it reads the log up to its end, then waits on the partition.
    let port = test_support::net::free_port();
    let replica = env
        .command(env!("CARGO_BIN_EXE_blinger-worker"))
        .arg("run")
        .env("BLINGER_API_URL", env.sandbox.base_url())
        .env("BLINGER_API_TOKEN", TOKEN)
        .env("BLINGER_WORKER_PARTITIONS", "1")
        .env("BLINGER_WORKER_TRAIL_KEY", KEY)
        .env("BLINGER_WORKER_METRICS_ADDR", format!("127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let replica = Child(Some(replica));
    let pid = replica.pid();

    // The replica's router puts the job into the partition, where the previous owner gets it.
    let job = text_job("c-takeover", "must reach Blinger once");
    env.publish(&job).await;
    let delivery = tokio::time::timeout(T, owned.next())
        .await
        .expect("the previous owner gets the job")
        .unwrap()
        .unwrap();
    let sent: serde_json::Value = serde_json::from_slice(&delivery.data).unwrap();
    assert_eq!(sent["id"], job["id"]);

    signal(&pid, "-STOP");
    // The previous owner "sends" it: its record is confirmed in the log behind other entries
    // (here unsealed ones, which every reader skips), then the owner goes without an ack.
    let mut confirms = Vec::with_capacity(OTHER_ENTRIES);
    for _ in 0..OTHER_ENTRIES {
        confirms.push(
            env.channel
                .basic_publish(
                    "".into(),
                    log.as_str().into(),
                    BasicPublishOptions::default(),
                    b"{}",
                    BasicProperties::default(),
                )
                .await
                .unwrap(),
        );
    }
    for confirm in confirms {
        assert!(confirm.await.unwrap().is_ack());
    }
    let receipt = serde_json::to_vec(&serde_json::json!({
        "id": job["id"], "kind": "send-text", "conversation_id": "c-takeover",
        "outcome": "delivered", "reason": null, "blinger_message_id": "sent-by-the-previous-owner",
        "blinger_status": "delivered", "http_status": 200, "attempts": 1,
        "received_at": "2026-12-07T00:00:00Z", "finished_at": "2026-12-07T00:00:01Z"}))
    .unwrap();
    let key = TrailKey::from_secret(&Secret::new(KEY)).unwrap();
    let mut headers = FieldTable::default();
    for (name, value) in delivered_log::record_headers(&receipt, None, &key) {
        headers.insert(name.into(), value);
    }
    env.publish_to_queue(
        &log,
        &receipt,
        BasicProperties::default().with_headers(headers),
    )
    .await;
    owner
        .close(200, "the previous owner goes".into())
        .await
        .unwrap();
    // The broker hands the job to the stopped replica.
    tokio::time::sleep(Duration::from_millis(500)).await;
    signal(&pid, "-CONT");

    let duplicates = "blinger_worker_jobs_duplicate_total{kind=\"send-text\"} 1";
    let settled = test_support::poll::until(T, || async {
        let metrics = match reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await {
            Ok(answer) => answer.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        metrics.contains(duplicates) || !env.sandbox.requests().is_empty()
    })
    .await;
    assert!(
        settled.is_some(),
        "the replica neither sent nor recognised the job"
    );
    assert_eq!(
        env.sandbox.requests().len(),
        0,
        "the job the previous owner recorded was sent again by the replica that took over"
    );
    signal(&pid, "-TERM");
    drop(replica);
    env.cleanup().await;
}

/// Publishes `job` and notes its id under its conversation, in publish order.
async fn publish_noted(
    env: &TestEnv,
    published: &mut BTreeMap<String, Vec<String>>,
    job: &serde_json::Value,
) {
    published
        .entry(job["conversation_id"].as_str().unwrap().to_owned())
        .or_default()
        .push(job["id"].as_str().unwrap().to_owned());
    env.publish(job).await;
}

/// The uuid of every text job the sandbox got, by conversation, in the order it got them.
fn sends_by_conversation(sandbox: &blinger_sandbox::Sandbox) -> BTreeMap<String, Vec<String>> {
    let mut sent = BTreeMap::<String, Vec<String>>::new();
    for r in sandbox.requests() {
        let conversation = r.path.split('/').rev().nth(1).unwrap().to_owned();
        sent.entry(conversation)
            .or_default()
            .push(r.body["uuid"].as_str().unwrap().to_owned());
    }
    sent
}

/// A spawned replica, killed if the test ends before it stops.
struct Child(Option<std::process::Child>);

impl Child {
    fn pid(&self) -> String {
        self.0.as_ref().unwrap().id().to_string()
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn signal(pid: &str, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([signal, pid])
        .status()
        .unwrap();
    assert!(status.success(), "kill {signal} {pid}");
}

/// A replica that stops (a scale-down, a rollout) hands its partitions over in order: the next
/// replica gets a partition only after the jobs this one held went back to the queue, ahead of
/// the rest. (Cancelling the consumer instead made the broker activate the next replica at once,
/// which sent later jobs while the earlier ones were still held here.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_stops_hands_its_partitions_over_in_order() {
    let env = TestEnv::new("handover").await;
    // One job at a time per conversation, 200 ms each: the first replica holds most of its
    // prefetch in the lanes when it stops, and its grace lets it finish only a few.
    env.sandbox.update(|c| c.latency_ms = 200);
    let shared = [
        "--partitions",
        "1",
        "--trail-key",
        "one-key-for-every-replica",
        "--partition-prefetch",
        "20",
        "--shutdown-grace",
        "1s",
        // No job goes round a delay tier: a chain does not move with its partition yet
        // (docs/scale-out.md 7, step 5), and that is not what this test is about.
        "--fair-share",
        "0",
    ];
    let first = env.start_worker(&shared).await;
    let second_dir = tempfile::tempdir().unwrap();
    let dir = second_dir.path().display().to_string();
    let mut published = BTreeMap::<String, Vec<String>>::new();
    for i in 0..40 {
        let job = text_job(&format!("c-handover-{}", i % 2), &i.to_string());
        publish_noted(&env, &mut published, &job).await;
    }
    assert!(
        eventually(T, || first.delivered_total() >= 2).await,
        "the first replica delivers"
    );
    let second = env
        .start_worker(&[&shared[..], &["--data-dir", &dir]].concat())
        .await;
    // The second replica is subscribed (it waits behind the first) before the first stops: it
    // subscribes within milliseconds of reading the log to its end.
    assert!(eventually(T, || second.health.not_ready_reason().is_none()).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    first.stop().await;
    assert!(
        eventually(T, || env.sandbox.requests().len() >= 40).await,
        "all sent, got {}",
        env.sandbox.requests().len()
    );
    // A job handed back after its call may be sent again (recognised by its uuid): order is
    // that of first sends.
    let mut sent = sends_by_conversation(&env.sandbox);
    for ids in sent.values_mut() {
        let mut seen = std::collections::HashSet::new();
        ids.retain(|id| seen.insert(id.clone()));
    }
    assert_eq!(
        sent, published,
        "first sends in publish order per conversation"
    );
    second.stop().await;
    env.cleanup().await;
}

/// Replicas of one deployment keep to one rate limit together (issue 14, guarantee 3), split by
/// the partitions each holds, through heartbeats on the real broker: three replicas, holding 8,
/// 4 and 4 of 16 partitions, each calling as fast as its limiter lets it, never start more than
/// the limit plus the burst in any second between them, and use all of it. One that leaves
/// gives its part to the others; a 429 one of them gets holds the others back too.
///
/// Each replica here is the membership and the limiter of a worker, without the rest: which
/// replica a partition goes to is the broker's choice (on 3.10 the first subscriber gets them
/// all), so the test hands them out itself. Before the shared limit each replica had the whole
/// limit, and the three together started three times as many (checked by making
/// `Members` give every replica the whole limit: 162 in one second for a limit of 50 + 5).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_keep_to_one_rate_limit_split_by_the_partitions_they_hold() {
    use std::num::NonZeroU32;
    use std::sync::{Arc, Mutex};

    use blinger_worker::broker::members::Members;
    use blinger_worker::config::Secret;
    use blinger_worker::contract::trail::TrailKey;
    use blinger_worker::engine::ratelimit::Limiter;
    use lapin::options::ExchangeDeclareOptions;
    use tokio::time::Instant;

    const RATE: u32 = 50;
    const BURST: u32 = 5;
    let env = TestEnv::new("shared-rate").await;
    let exchange = format!("{}.members", env.names.queue);
    env.channel
        .exchange_declare(
            exchange.as_str().into(),
            lapin::ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let key = TrailKey::from_secret(&Secret::new("one-key-for-every-replica")).unwrap();
    struct Replica {
        limiter: Arc<Limiter>,
        metrics: Arc<Metrics>,
        members: Option<Members>,
        _conn: lapin::Connection,
    }
    let mut replicas = Vec::new();
    for holds in [0u16..8, 8..12, 12..16] {
        let conn = lapin::Connection::connect(&env.broker.url, Default::default())
            .await
            .unwrap();
        let limiter = Arc::new(Limiter::shared(
            NonZeroU32::new(RATE).unwrap(),
            NonZeroU32::new(BURST).unwrap(),
        ));
        let metrics = Metrics::new();
        let members = Members::start(
            &conn,
            &exchange,
            key.clone(),
            limiter.clone(),
            metrics.clone(),
            CancellationToken::new(),
        )
        .await
        .unwrap();
        for p in holds {
            members.hold(p);
        }
        replicas.push(Replica {
            limiter,
            metrics,
            members: Some(members),
            _conn: conn,
        });
    }
    let shares = |replicas: &[Replica]| -> Vec<f64> {
        replicas
            .iter()
            .map(|r| r.metrics.rate_share.get())
            .collect()
    };
    assert!(
        eventually(T, || shares(&replicas) == [0.5, 0.25, 0.25]).await,
        "each replica's part is its partitions' part: {:?}",
        shares(&replicas)
    );
    assert!(replicas.iter().all(|r| r.metrics.replicas.get() == 3));

    // Every replica calls as fast as its limiter lets it, for 4 s.
    let started = Arc::new(Mutex::new(Vec::new()));
    let until = Instant::now() + Duration::from_secs(4);
    let mut callers = tokio::task::JoinSet::new();
    for r in &replicas {
        for _ in 0..8 {
            let (limiter, started) = (r.limiter.clone(), started.clone());
            callers.spawn(async move {
                loop {
                    tokio::select! {
                        _ = limiter.acquire() => started.lock().unwrap().push(Instant::now()),
                        _ = tokio::time::sleep_until(until) => return,
                    }
                }
            });
        }
    }
    while callers.join_next().await.is_some() {}
    let at = started.lock().unwrap().clone();
    let (peak, _) = most_within(&at, Duration::from_secs(1), |a, b| b - a);
    // The buckets start empty (a part given after none), so 4 s allow 4 × 50 and the
    // bursts refilled meanwhile add nothing: each bucket runs dry at once.
    assert!(
        peak <= (RATE + BURST) as usize,
        "at most the limit + the burst in any second between them: {peak}"
    );
    assert!(
        at.len() >= (RATE as usize * 4) * 9 / 10,
        "and they use the whole limit: {} in 4 s",
        at.len()
    );

    // The third leaves: the others take its part.
    replicas[2].members.take().unwrap().leave().await;
    assert!(
        eventually(T, || {
            let s = shares(&replicas);
            (s[0] - 8.0 / 12.0).abs() < 1e-9 && (s[1] - 4.0 / 12.0).abs() < 1e-9 && s[2] == 0.0
        })
        .await,
        "8 and 4 of 12: {:?}",
        shares(&replicas)
    );

    // A 429 the first one gets holds the second back too.
    replicas[0].limiter.throttle(Some(Duration::from_secs(2)));
    assert!(
        eventually(T, || replicas[1].metrics.peer_throttles.get() == 1).await,
        "the second hears of the first one's 429"
    );
    let waited = Instant::now();
    replicas[1].limiter.acquire().await;
    assert!(
        waited.elapsed() >= Duration::from_millis(1500),
        "the second waited for the first one's Retry-After: {:?}",
        waited.elapsed()
    );
    env.cleanup().await;
}
