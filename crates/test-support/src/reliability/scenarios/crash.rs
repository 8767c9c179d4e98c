//! Scenario 1, Crash: `kill -9` the worker at random moments while it delivers a mixed load, restart it
//! each time, and account for every job from the sandbox's records and the store.

use std::collections::HashSet;
use std::time::{Duration, Instant, SystemTime};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{Expect, Progress, conclude, wait_settled, dead_summary, finish, mean_max};
use crate::reliability::Ctx;
use crate::reliability::harness::{World, secs};
use crate::reliability::jobs::Plan;
use crate::reliability::report::Figures;

pub async fn run(ctx: &Ctx) -> Figures {
    let started = Instant::now();
    let n = ctx.pick(1_500, 20_000);
    let conversations = ctx.pick(100, 500);
    let kills = ctx.pick(3, 12);
    let rate = ctx.pick(300, 500);
    let concurrency = 64;
    let mut f = Figures::new("1 crash", ctx);
    f.setup = format!(
        "{n} jobs (4 kinds) over {conversations} conversations, {kills} × kill -9 + restart; \
         concurrency {concurrency} (keyless calls 1 at a time, the default), prefetch 200, rate limit {rate}/s, \
         sandbox latency 10–50 ms"
    );

    let mut world = World::new(ctx, "crash", "5s,30s,2m,10m,30m").await;
    world.sandbox.update(|c| {
        c.latency_ms = 10;
        c.latency_jitter_ms = 40;
    });
    world.declare().await;
    let plan = Plan::mixed(n, conversations, "conv-", ctx.seed);
    let expect = Expect::of(&plan, &HashSet::new());
    let rate_s = rate.to_string();
    let conc_s = concurrency.to_string();
    let overrides = [
        ("BLINGER_WORKER_RATE_LIMIT", rate_s.as_str()),
        ("BLINGER_WORKER_RATE_BURST", "50"),
        ("BLINGER_WORKER_CONCURRENCY", conc_s.as_str()),
        ("BLINGER_WORKER_PREFETCH", "200"),
    ];

    let mut worker = world.start_worker(&overrides);
    let first_ready = worker.wait_ready(Duration::from_secs(60)).await;
    // Publish from a task while the worker runs.
    let mut publisher = world.new_publisher().await;
    let msgs = plan.messages();
    let publishing = tokio::spawn(async move {
        publisher.publish(&msgs).await;
        publisher.republished
    });

    // Kill moments: random points of progress (fraction of jobs accepted), plus a random delay.
    let mut rng = StdRng::seed_from_u64(ctx.seed ^ 0xC0FFEE);
    let mut marks: Vec<f64> = (0..kills).map(|_| rng.random_range(0.05..0.92)).collect();
    marks.sort_by(f64::total_cmp);
    let mut progress = Progress::default();
    let mut boundaries: Vec<SystemTime> = Vec::new();
    let mut restarts: Vec<SystemTime> = Vec::new();
    let mut to_ready: Vec<Duration> = Vec::new();
    let mut in_flight_at_kill: Vec<f64> = Vec::new();
    let mut missed_ready = 0;
    for mark in &marks {
        let target = (*mark * expect.total() as f64) as usize;
        let deadline = Instant::now() + Duration::from_secs(ctx.pick(120, 600));
        while progress.delivered(&expect) < target && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            progress.poll(&world.sandbox);
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..250))).await;
        if let Some(v) = worker.metric("blinger_worker_jobs_in_flight", &[]).await {
            in_flight_at_kill.push(v);
        }
        boundaries.push(worker.kill9());
        restarts.push(SystemTime::now());
        worker = world.start_worker(&overrides);
        match worker.wait_ready(Duration::from_secs(60)).await {
            Some(d) => to_ready.push(d),
            None => missed_ready += 1,
        }
    }
    let republished = publishing.await.expect("publisher task");
    let drain_timeout = Duration::from_secs(ctx.pick(180, 900));
    let drained = progress
        .wait_all(&world.sandbox, &expect, drain_timeout)
        .await;
    wait_settled(&world, &[&worker], Duration::from_secs(60)).await;
    let (exit, stop_took) = worker.stop(Duration::from_secs(60)).await;
    let out = conclude(&world, &plan, &boundaries).await;
    let a = &out.analysis;

    // Time from each restart to the first job accepted from the new instance.
    let records = world.sandbox.requests();
    let mut to_first: Vec<Duration> = Vec::new();
    for r in &restarts {
        if let Some(t) = records
            .iter()
            .filter(|x| x.status == 200)
            .filter_map(|x| super::arrival(&x.ts))
            .filter(|t| t >= r)
            .min()
        {
            to_first.push(t.duration_since(*r).unwrap_or_default());
        }
    }

    f.outcome(n, &out);
    f.dead_lettered = dead_summary(&out.dead);
    f.order = format!(
        "{} jobs sent after a later job of their conversation, {} of them across a kill",
        a.order_violations, a.order_violations_across_restart
    );
    f.recovery = format!(
        "restart → ready {}; restart → first delivery {}",
        mean_max(&to_ready),
        mean_max(&to_first)
    );
    f.detail("kills", kills);
    f.detail(
        "jobs in flight at each kill (metric)",
        format!("{in_flight_at_kill:?}"),
    );
    f.detail(
        "repeated calls charged to each killed instance (resends + second calls)",
        format!(
            "{:?}",
            &a.repeats_by_instance[..a.repeats_by_instance.len() - 1]
        ),
    );
    f.detail(
        "second calls (request-review/assign-agent) per killed instance",
        format!(
            "{:?}",
            &a.second_calls_by_instance[..a.second_calls_by_instance.len() - 1]
        ),
    );
    f.detail("API requests", a.requests);
    f.detail("requests by outcome", format!("{:?}", a.by_outcome));
    f.detail("publisher re-sends (broker hiccups)", republished);
    f.detail(
        "first start → ready",
        first_ready.map_or("never".into(), secs),
    );
    f.detail(
        "all accepted after the last kill",
        drained.map_or("not within the timeout".into(), secs),
    );
    f.detail(
        "final SIGTERM → exit",
        format!("{} ({:?})", secs(stop_took), exit),
    );

    f.check_kills_kept_every_job(n, a);
    f.check_no_dead_letters(&out.dead);
    f.check(
        "order kept within each worker run",
        a.order_violations == a.order_violations_across_restart,
        format!(
            "{} violations within a run",
            a.order_violations - a.order_violations_across_restart
        ),
    );
    f.check(
        "every accepted job has its store record",
        a.unrecorded.is_empty(),
        format!("{} without", a.unrecorded.len()),
    );
    f.check_drained(out.backlog);
    f.check(
        "every restart became ready",
        missed_ready == 0,
        format!("{missed_ready} did not"),
    );
    f.check_exits("final SIGTERM exits 0", &[exit]);
    finish(world, f, started).await
}
