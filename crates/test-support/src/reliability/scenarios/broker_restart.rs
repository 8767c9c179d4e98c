//! Scenario 2, Broker restart: a private RabbitMQ node is stopped (`rabbitmqctl stop`) and started again,
//! twice, while the worker delivers a steady stream of jobs. The worker must reconnect by
//! itself; `/readyz` is watched every 100 ms throughout.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::Mutex;

use super::{Expect, Progress, conclude, mean_max, wait_settled};
use crate::reliability::Ctx;
use crate::reliability::broker::PrivateBroker;
use crate::reliability::harness::{World, secs};
use crate::reliability::jobs::Plan;
use crate::reliability::report::Figures;

/// `/readyz` samples: (when, status or None when nothing answered).
type Samples = Arc<Mutex<Vec<(Instant, Option<u16>)>>>;

pub async fn run(ctx: &Ctx) -> Figures {
    let started = Instant::now();
    let n = ctx.pick(600, 6_000);
    let conversations = ctx.pick(60, 300);
    let down_for = Duration::from_secs(ctx.pick(3, 10));
    let batches = 6;
    let mut f = Figures::new("2 broker restart", ctx);
    f.setup = format!(
        "{n} jobs over {conversations} conversations published in {batches} batches; private \
         RabbitMQ node stopped for {} then started, twice; quorum queues; rate limit 100/s, sandbox latency 10–30 ms",
        secs(down_for)
    );
    let mut broker = PrivateBroker::start("restart").await;
    let mut world = World::on(ctx, "restart", "5s,30s,2m,10m,30m", broker.url(), None).await;
    world.sandbox.update(|c| {
        c.latency_ms = 10;
        c.latency_jitter_ms = 20;
    });
    world.declare().await;
    let plan = Plan::mixed(n, conversations, "conv-", ctx.seed);
    let expect = Expect::of(&plan, &HashSet::new());
    let overrides = [("BLINGER_WORKER_RATE_LIMIT", "100")];
    let mut worker = world.start_worker(&overrides);
    worker.wait_ready(Duration::from_secs(60)).await;

    let samples: Samples = Arc::default();
    let watching = Arc::new(AtomicBool::new(true));
    let watcher = {
        let samples = samples.clone();
        let watching = watching.clone();
        let addr = worker.metrics_addr;
        tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_millis(500))
                .build()
                .unwrap();
            while watching.load(Ordering::SeqCst) {
                let status = http
                    .get(format!("http://{addr}/readyz"))
                    .send()
                    .await
                    .ok()
                    .map(|r| r.status().as_u16());
                samples.lock().await.push((Instant::now(), status));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    let msgs = plan.messages();
    let per_batch = msgs.len().div_ceil(batches);
    let mut progress = Progress::default();
    // (stop asked, node exited, node up again) per restart.
    let mut down_windows: Vec<(Instant, Instant, Instant)> = Vec::new();
    let mut stop_took: Vec<Duration> = Vec::new();
    let mut boundaries: Vec<SystemTime> = Vec::new();
    let mut reconnect: Vec<Duration> = Vec::new();
    let mut start_took: Vec<Duration> = Vec::new();
    let mut in_flight: Vec<f64> = Vec::new();
    let mut left_in_batch: Vec<usize> = Vec::new();
    for (b, chunk) in msgs.chunks(per_batch).enumerate() {
        world.publish(chunk).await;
        // Let the batch get under way, then restart the broker after batches 2 and 4, with the
        // batch still in flight.
        let pause = if b == 1 || b == 3 {
            ctx.pick(300, 2000)
        } else {
            ctx.pick(1200, 8000)
        };
        tokio::time::sleep(Duration::from_millis(pause)).await;
        progress.poll(&world.sandbox);
        if b == 1 || b == 3 {
            in_flight.push(
                worker
                    .metric("blinger_worker_jobs_in_flight", &[])
                    .await
                    .unwrap_or(-1.0),
            );
            left_in_batch.push(
                chunk.len() + b * per_batch
                    - progress.delivered(&expect).min(chunk.len() + b * per_batch),
            );
            let down_at = Instant::now();
            boundaries.push(SystemTime::now());
            stop_took.push(broker.stop().await);
            let stopped_at = Instant::now();
            tokio::time::sleep(down_for).await;
            start_took.push(broker.start_again().await);
            let up_at = Instant::now();
            down_windows.push((down_at, stopped_at, up_at));
            match worker.wait_ready(Duration::from_secs(120)).await {
                Some(d) => reconnect.push(d),
                None => reconnect.push(Duration::from_secs(120)),
            }
            world.publisher.reconnect(Duration::from_secs(60)).await;
        }
    }
    let drained = progress
        .wait_all(
            &world.sandbox,
            &expect,
            Duration::from_secs(ctx.pick(120, 600)),
        )
        .await;
    wait_settled(&world, &[&worker], Duration::from_secs(60)).await;
    watching.store(false, Ordering::SeqCst);
    let _ = watcher.await;
    let ready_after = worker.readyz().await;
    let (exit, _) = worker.stop(Duration::from_secs(60)).await;
    let out = conclude(&world, &plan, &boundaries).await;
    let a = &out.analysis;

    // /readyz while the broker was down (from 1 s after its node had exited, to let the worker
    // notice, until it was started again): every answer must be 503. The window starts at the
    // exit, not at `rabbitmqctl stop`: from the command to closing its connections RabbitMQ takes
    // 0.5-0.7 s on 3.10 and 0.7-1.2 s on 4.0 (measured here; the node exits 1.7-2.2 s after the
    // command), which is the broker's time, not the worker's.
    let samples = samples.lock().await.clone();
    let mut during = 0;
    let mut ready_while_down = 0;
    let mut noticed: Vec<Duration> = Vec::new();
    for (asked, down, up) in &down_windows {
        if let Some((t, _)) = samples.iter().find(|(t, s)| t >= asked && *s != Some(200)) {
            noticed.push(t.duration_since(*asked));
        }
        for (t, s) in &samples {
            if *t > *down + Duration::from_secs(1) && t < up {
                during += 1;
                if *s == Some(200) {
                    ready_while_down += 1;
                }
            }
        }
    }

    f.outcome(n, &out);
    f.order = format!(
        "{} violations ({} across a restart)",
        a.order_violations, a.order_violations_across_restart
    );
    f.recovery = format!("broker up → /readyz 200: {}", mean_max(&reconnect));
    f.detail(
        "at each stop: jobs in flight (metric), jobs published and not yet accepted",
        format!("{in_flight:?}, {left_in_batch:?}"),
    );
    f.detail("broker stop → /readyz not 200", mean_max(&noticed));
    f.detail("rabbitmqctl stop → node exited", mean_max(&stop_took));
    f.detail("private node start time", mean_max(&start_took));
    f.detail(
        "/readyz samples while down (from 1 s after the node exited)",
        format!("{during}, of which 200: {ready_while_down}"),
    );
    f.detail("/readyz after the run", format!("{ready_after:?}"));
    f.detail(
        "publisher re-sends after the restarts",
        world.publisher.republished,
    );
    f.detail("API requests by outcome", format!("{:?}", a.by_outcome));
    f.detail(
        "all accepted after the last batch",
        drained.map_or("not within the timeout".into(), secs),
    );

    f.check(
        "no job lost",
        a.lost.is_empty(),
        format!("{} lost", a.lost.len()),
    );
    f.check_sent_once("nothing sent twice", a);
    f.check_no_dead_letters(&out.dead);
    f.check(
        "reconnected by itself after each restart",
        reconnect.len() == 2 && reconnect.iter().all(|d| *d < Duration::from_secs(120)),
        mean_max(&reconnect),
    );
    f.check(
        "/readyz false while the broker was down",
        during > 0 && ready_while_down == 0,
        format!("{ready_while_down} of {during} samples were 200"),
    );
    f.check(
        "/readyz true after",
        ready_after == Some(200),
        format!("{ready_after:?}"),
    );
    f.check(
        "order kept within each connection",
        a.order_violations == a.order_violations_across_restart,
        a.order_violations,
    );
    f.check_drained(out.backlog);
    f.check_exits("exit 0 on SIGTERM", &[exit]);
    world.cleanup().await;
    broker.stop().await;
    f.set_elapsed(started.elapsed());
    f
}
