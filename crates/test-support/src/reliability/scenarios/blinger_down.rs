//! Scenario 4, Blinger down: the sandbox answers 503 to everything for a while (2 minutes in the full
//! profile) while jobs keep coming, then comes back. Nothing may be dead-lettered; the backlog
//! must drain, and the time it takes is the figure.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use super::{Expect, Progress, conclude, finish};
use crate::reliability::Ctx;
use crate::reliability::harness::{World, metric_sum, secs};
use crate::reliability::jobs::Plan;
use crate::reliability::report::Figures;

pub async fn run(ctx: &Ctx) -> Figures {
    let started = Instant::now();
    let n = ctx.pick(300, 3_000);
    let conversations = ctx.pick(60, 300);
    let outage = Duration::from_secs(ctx.pick(15, 120));
    // Full: the defaults. Short: the same shape, scaled to a 15 s outage.
    let delays = ctx.pick("2s,5s,10s,30s,60s", "5s,30s,2m,10m,30m");
    let rate = ctx.pick("100", "200");
    let mut f = Figures::new("4 Blinger down", ctx);
    f.setup = format!(
        "{n} jobs over {conversations} conversations, a third before the outage and the rest \
         during it; sandbox answers 503 to everything for {}; tiers {delays}, 4 in-process \
         attempts (backoff 250 ms doubling to 5 s), rate limit {rate}/s, keyless calls 64 at a \
         time",
        secs(outage)
    );
    let mut world = World::new(ctx, "down", delays).await;
    world.sandbox.update(|c| c.latency_ms = 5);
    world.declare().await;
    let plan = Plan::mixed(n, conversations, "conv-", ctx.seed);
    let expect = Expect::of(&plan, &HashSet::new());
    let mut worker = world.start_worker(&[
        ("BLINGER_WORKER_RATE_LIMIT", rate),
        ("BLINGER_WORKER_KEYLESS_CONCURRENCY", "64"),
    ]);
    worker.wait_ready(Duration::from_secs(60)).await;
    let msgs = plan.messages();
    let first = msgs.len() / 3;
    world.publish(&msgs[..first]).await;
    let mut progress = Progress::default();
    // Let some of the first third through, then take Blinger down.
    let deadline = Instant::now() + Duration::from_secs(60);
    while progress.delivered(&expect) < first / 2 && Instant::now() < deadline {
        progress.poll(&world.sandbox);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    world.sandbox.update(|c| c.down = true);
    let down_at = Instant::now();
    let before = progress.delivered(&expect);
    // The rest arrives during the outage, in batches.
    let rest = &msgs[first..];
    let batches = 5;
    for chunk in rest.chunks(rest.len().div_ceil(batches)) {
        world.publish(chunk).await;
        tokio::time::sleep(outage / (batches as u32 + 1)).await;
    }
    let remaining = outage.saturating_sub(down_at.elapsed());
    tokio::time::sleep(remaining).await;
    let ready_during = worker.readyz().await;
    let metrics_down = worker.metrics().await.unwrap_or_default();
    let mut where_at_recovery = vec![format!(
        "work queue {}",
        world.ready(&world.names.queue).await.unwrap_or(0)
    )];
    for q in world.tier_queues() {
        let n = world.ready(&q).await.unwrap_or(0);
        let tier = q.rsplit('.').next().unwrap_or("").to_owned();
        where_at_recovery.push(format!("tier {tier} {n}"));
    }
    world.sandbox.update(|c| c.down = false);
    let up_at = Instant::now();
    let up_wall = std::time::SystemTime::now();
    progress.poll(&world.sandbox);
    let at_recovery = progress.delivered(&expect);
    let drained = progress
        .wait_all(
            &world.sandbox,
            &expect,
            Duration::from_secs(ctx.pick(150, 2400)),
        )
        .await;
    let drain_time = drained.map(|_| up_at.elapsed());
    let metrics = worker.metrics().await.unwrap_or_default();
    let (exit, _) = worker.stop(Duration::from_secs(60)).await;
    let stats = world.sandbox.stats();
    let out = conclude(&world, &plan, &[]).await;
    let a = &out.analysis;

    f.outcome(n, &out);
    f.recovery = format!(
        "backlog of {} jobs drained {} after Blinger came back",
        expect.total() - at_recovery,
        drain_time.map_or("(not within the timeout)".into(), secs)
    );
    // When the backlog's jobs were accepted, counted from Blinger's return.
    let mut after: Vec<f64> = world
        .sandbox
        .requests()
        .iter()
        .filter(|r| r.status == 200)
        .filter_map(|r| super::arrival(&r.ts))
        .filter_map(|t| t.duration_since(up_wall).ok())
        .map(|d| d.as_secs_f64())
        .collect();
    after.sort_by(f64::total_cmp);
    let q = |p: f64| -> String {
        if after.is_empty() {
            return "-".into();
        }
        format!("{:.1} s", after[((after.len() - 1) as f64 * p) as usize])
    };
    f.detail("delivered before the outage", before);
    f.detail(
        "backlog accepted after Blinger's return: first, 10 %, median, 90 %, last",
        format!("{}, {}, {}, {}, {}", q(0.0), q(0.1), q(0.5), q(0.9), q(1.0)),
    );
    f.detail(
        "where the backlog waited when Blinger came back (ready messages)",
        where_at_recovery.join(", "),
    );
    f.detail("503 answers during the outage", stats.injected.errors);
    f.detail(
        "retries (in-process + parks) during the outage / in all",
        format!(
            "{} / {}",
            metric_sum(&metrics_down, "blinger_worker_jobs_retried_total", &[]),
            metric_sum(&metrics, "blinger_worker_jobs_retried_total", &[])
        ),
    );
    f.detail("/readyz during the outage", format!("{ready_during:?}"));
    f.detail("requests by outcome", format!("{:?}", a.by_outcome));

    f.check("no job lost", a.lost.is_empty(), a.lost.len());
    f.check_no_dead_letters(&out.dead);
    f.check(
        "backlog drained",
        drained.is_some() && a.delivered == n,
        format!("{} of {n}", a.delivered),
    );
    f.check_sent_once("nothing sent twice", a);
    f.check("order kept", a.order_violations == 0, a.order_violations);
    f.check_drained(out.backlog);
    f.check_exits("exit 0", &[exit]);
    finish(world, f, started).await
}
