//! Losing the broker and shutting down with work in flight.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use test_support::*;

const T: Duration = Duration::from_secs(60);

fn accepted_per_uuid(env: &TestEnv) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for r in env.sandbox.requests() {
        if r.status == 200 {
            *counts.entry(r.uuid.unwrap_or_default()).or_insert(0) += 1;
        }
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_broker_connection_is_recovered_without_loss_or_duplicates() {
    let mut env = TestEnv::new("reconnect").await;
    let proxy = TcpProxy::start(amqp_socket(&env.broker.url)).await;
    env.base_args = vec!["--amqp-url".into(), via(&env.broker.url, proxy.addr)];
    env.sandbox.update(|c| c.latency_ms = 20);
    let worker = env.start_worker(&["--concurrency", "4"]).await;
    for i in 0..60 {
        env.publish(&text_job(&format!("c-{}", i % 7), "before"))
            .await;
    }
    assert!(eventually(T, || worker.delivered("send-text") >= 10).await);
    // The broker vanishes for a while: connections are cut and refused.
    proxy.set_refusing(true);
    proxy.cut();
    assert!(eventually(T, || worker.metrics.amqp_connected.get() == 0).await);
    assert_eq!(worker.get("/readyz").await.0, 503);
    for i in 0..40 {
        env.publish(&text_job(&format!("c-{}", i % 7), "during"))
            .await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let down_at = Instant::now();
    proxy.set_refusing(false);
    assert!(eventually(T, || worker.metrics.amqp_connected.get() == 1).await);
    let recovered_in = down_at.elapsed();
    assert!(
        eventually(T, || worker.delivered("send-text") == 100).await,
        "delivered {}",
        worker.delivered("send-text")
    );
    let counts = accepted_per_uuid(&env);
    assert_eq!(counts.len(), 100, "every job accepted");
    assert!(counts.values().all(|&n| n == 1), "none accepted twice");
    assert_eq!(worker.get("/readyz").await.0, 200);
    eprintln!("reconnected {recovered_in:?} after the broker came back");
    worker.stop().await;
    assert_eq!(env.jobs_waiting().await, 0);
    env.cleanup().await;
}

/// `AMQP_URL` as a list of nodes (two proxies in front of the broker stand for two cluster
/// nodes): the worker starts while the first is down, and when the node it is on goes away it
/// carries on through the other, without loss or duplicates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_of_nodes_fails_over_to_the_one_that_answers() {
    let mut env = TestEnv::new("failover").await;
    let upstream = amqp_socket(&env.broker.url);
    let (a, b) = (
        TcpProxy::start(upstream).await,
        TcpProxy::start(upstream).await,
    );
    let list = format!(
        "{},{}",
        via(&env.broker.url, a.addr),
        via(&env.broker.url, b.addr)
    );
    env.base_args = vec!["--amqp-url".into(), list];
    env.sandbox.update(|c| c.latency_ms = 20);
    a.set_refusing(true);
    let worker = env.start_worker(&["--concurrency", "4"]).await;
    assert!(eventually(T, || worker.metrics.amqp_connected.get() == 1).await);
    for i in 0..30 {
        env.publish(&text_job(&format!("c-{}", i % 7), "on b"))
            .await;
    }
    assert!(eventually(T, || worker.delivered("send-text") >= 10).await);
    // The node the worker is on goes away; the other is back.
    a.set_refusing(false);
    b.set_refusing(true);
    b.cut();
    assert!(eventually(T, || worker.metrics.amqp_connected.get() == 0).await);
    for i in 0..30 {
        env.publish(&text_job(&format!("c-{}", i % 7), "on a"))
            .await;
    }
    let moved_at = Instant::now();
    assert!(
        eventually(T, || worker.metrics.amqp_connected.get() == 1).await,
        "never reconnected through the other node"
    );
    eprintln!(
        "on the other node {:?} after losing its own",
        moved_at.elapsed()
    );
    assert!(
        eventually(T, || worker.delivered("send-text") == 60).await,
        "delivered {}",
        worker.delivered("send-text")
    );
    let counts = accepted_per_uuid(&env);
    assert_eq!(counts.len(), 60, "every job accepted");
    assert!(counts.values().all(|&n| n == 1), "none accepted twice");
    worker.stop().await;
    assert_eq!(env.jobs_waiting().await, 0);
    env.cleanup().await;
}

/// A job retrying in-process when its broker session is lost stops calling Blinger: the broker
/// redelivers it on the next session (with several replicas, to another one), and that copy
/// makes the calls. Before the fix the old copy went on with its backoff round on a session
/// that no longer existed (seen failing: calls went on during the outage).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_session_is_lost_makes_no_further_call() {
    let mut env = TestEnv::new("lostcall").await;
    let proxy = TcpProxy::start(amqp_socket(&env.broker.url)).await;
    env.base_args = vec!["--amqp-url".into(), via(&env.broker.url, proxy.addr)];
    env.sandbox.update(|c| c.status_override = Some(503));
    let worker = env
        .start_worker(&["--max-in-process-attempts", "100"])
        .await;
    env.publish(&text_job("c-lost", "retry me")).await;
    assert!(eventually(T, || env.sandbox.requests().len() >= 3).await);
    proxy.set_refusing(true);
    proxy.cut();
    assert!(eventually(T, || worker.metrics.amqp_connected.get() == 0).await);
    // A call already on its way when the session went may still land.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let at_loss = env.sandbox.requests().len();
    // Backoff from 250 ms, doubling: the old copy would have called at least twice in 8 s.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let after = env.sandbox.requests().len();
    assert_eq!(
        after,
        at_loss,
        "{} calls for a job whose session was gone",
        after - at_loss
    );
    // Back: the redelivered copy is delivered, once.
    env.sandbox.update(|c| c.status_override = None);
    proxy.set_refusing(false);
    assert!(
        eventually(T, || worker.delivered("send-text") == 1).await,
        "delivered {}",
        worker.delivered("send-text")
    );
    worker.stop().await;
    assert_eq!(env.jobs_waiting().await, 0);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_the_jobs_already_received() {
    let env = TestEnv::new("drain").await;
    env.sandbox.update(|c| c.latency_ms = 100);
    let worker = env
        // In partitioned mode too, the broker hands over every job at once.
        .start_worker(&[
            "--concurrency",
            "16",
            "--shutdown-grace",
            "20s",
            "--partition-prefetch",
            "200",
        ])
        .await;
    let total = 200;
    for i in 0..total {
        env.publish(&text_job(&format!("c-{}", i % 50), &i.to_string()))
            .await;
    }
    assert!(eventually(T, || worker.delivered("send-text") >= 16).await);
    assert!(
        worker.metrics.jobs_in_flight.get() > 0,
        "work in flight at the signal"
    );
    if env.names.partitions.is_some() {
        // A copy the router puts in a partition after its consumer stopped waits there (handed
        // back, not lost): let the router finish first, as the broker did in single-queue mode.
        assert!(eventually(T, || worker.metrics.router_routed.get() == total).await);
    }
    let at_signal = worker.delivered("send-text");
    let metrics = worker.metrics.clone();
    worker.stop().await;
    let delivered = metrics
        .jobs_delivered
        .with_label_values(&["send-text"])
        .get();
    assert!(delivered > at_signal, "jobs kept going after the signal");
    let queued = env.jobs_waiting().await as u64;
    assert_eq!(delivered + queued, total, "nothing lost");
    // Everything the broker had handed over (prefetch 200) was finished within the grace.
    assert_eq!(queued, 0);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_hands_back_what_the_grace_period_cannot_finish() {
    let env = TestEnv::new("handback").await;
    env.sandbox.update(|c| c.latency_ms = 400);
    let worker = env
        .start_worker(&["--concurrency", "16", "--shutdown-grace", "1s"])
        .await;
    let total = 200;
    for i in 0..total {
        env.publish(&text_job(&format!("c-{}", i % 50), &i.to_string()))
            .await;
    }
    assert!(eventually(T, || worker.delivered("send-text") >= 16).await);
    let started = Instant::now();
    worker.stop().await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(1 + 5 + 2), "stopped in {took:?}");
    let delivered_first = accepted_per_uuid(&env).len();
    // The broker counts the handed-back jobs as ready once it has processed the channel's close:
    // at once on RabbitMQ 3.10, a moment later on 4.0 (its quorum queue returns them through
    // its log), so wait for the count to add up.
    let mut queued = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        queued = env.jobs_waiting().await as usize;
        if delivered_first + queued >= total {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(queued > 0, "some jobs were handed back");
    assert_eq!(
        delivered_first + queued,
        total,
        "nothing lost: delivered + handed back"
    );
    // A new worker takes the rest; nothing is sent twice.
    env.sandbox.update(|c| c.latency_ms = 0);
    let worker = env.start_worker(&[]).await;
    assert!(eventually(T, || accepted_per_uuid(&env).len() == total).await);
    let counts = accepted_per_uuid(&env);
    assert!(counts.values().all(|&n| n == 1), "none accepted twice");
    assert_eq!(env.sandbox.stats().duplicates, 0);
    worker.stop().await;
    env.cleanup().await;
}
