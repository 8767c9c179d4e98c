//! Scenario 3, Blinger chaos: the sandbox answers 20 % 5xx, 10 % 429 (`Retry-After: 1`), stalls 5 % of
//! requests past the worker's request timeout, with latency jitter. Every job must be delivered
//! exactly once, none dead-lettered, and the request rate measured at the sandbox must stay
//! within the configured limit.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use super::{Expect, Progress, conclude, dead_summary, finish};
use crate::reliability::Ctx;
use crate::reliability::harness::{World, secs};
use crate::reliability::jobs::Plan;
use crate::reliability::report::Figures;

pub async fn run(ctx: &Ctx) -> Figures {
    let started = Instant::now();
    let n = ctx.pick(400, 3_000);
    let n2 = ctx.pick(400, 3_000);
    let conversations = ctx.pick(100, 500);
    let rate: u64 = 100;
    let burst: u64 = 20;
    let delays = "1s,2s,4s,8s,15s,30s,60s,120s";
    let mut f = Figures::new("3 Blinger chaos", ctx);
    f.setup = format!(
        "{n} jobs, then {n2} more without the 429s, over {conversations} conversations; sandbox 20 % 5xx, 10 % 429 (Retry-After 1), \
         5 % stalls of 5 s, latency 5–105 ms; worker request timeout 2 s, 4 in-process attempts, \
         tiers {delays}, rate limit {rate}/s burst {burst}; keyless calls 64 at a time (scenario 1 \
         covers the default of 1, which would make this run last a keyless call per round trip)"
    );
    let mut world = World::new(ctx, "chaos", delays).await;
    world.sandbox.update(|c| {
        c.error_rate = 0.2;
        c.rate_429 = 0.1;
        c.retry_after_secs = 1;
        c.timeout_rate = 0.05;
        c.timeout_secs = 5;
        c.latency_ms = 5;
        c.latency_jitter_ms = 100;
    });
    world.declare().await;
    let plan = Plan::mixed(n, conversations, "conv-", ctx.seed);
    let expect = Expect::of(&plan, &HashSet::new());
    world.publish(&plan.messages()).await;
    let (rate_s, burst_s) = (rate.to_string(), burst.to_string());
    let mut worker = world.start_worker(&[
        ("BLINGER_WORKER_RATE_LIMIT", &rate_s),
        ("BLINGER_WORKER_RATE_BURST", &burst_s),
        ("BLINGER_WORKER_REQUEST_TIMEOUT", "2s"),
        ("BLINGER_WORKER_MAX_IN_PROCESS_ATTEMPTS", "4"),
        ("BLINGER_WORKER_KEYLESS_CONCURRENCY", "64"),
    ]);
    let mut progress = Progress::default();
    let took = progress
        .wait_all(
            &world.sandbox,
            &expect,
            Duration::from_secs(ctx.pick(240, 1200)),
        )
        .await;
    // Let stalled requests and parked jobs settle.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let phase1_records = world.sandbox.requests();
    let phase1_window = super::max_in_window(&phase1_records, Duration::from_secs(1));
    // Phase 2: the same chaos without 429s, so the rate limiter itself is what holds the rate.
    let last_seq = phase1_records.last().map_or(0, |r| r.seq);
    world.sandbox.update(|c| c.rate_429 = 0.0);
    let plan2 = Plan::mixed(n2, conversations, "conv2-", ctx.seed ^ 2);
    world.publish(&plan2.messages()).await;
    let expect2 = Expect::of(&plan2, &HashSet::new());
    let mut progress2 = Progress::default();
    let took2 = progress2
        .wait_all(
            &world.sandbox,
            &expect2,
            Duration::from_secs(ctx.pick(120, 600)),
        )
        .await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let phase2_records = world.sandbox.requests_since(last_seq);
    let phase2_window = super::max_in_window(&phase2_records, Duration::from_secs(1));
    let phase2_span = match (
        phase2_records.first().and_then(|r| super::arrival(&r.ts)),
        phase2_records.last().and_then(|r| super::arrival(&r.ts)),
    ) {
        (Some(a), Some(b)) => b.duration_since(a).unwrap_or_default(),
        _ => Duration::ZERO,
    };
    let phase2_mean = phase2_records.len() as f64 / phase2_span.as_secs_f64().max(1.0);
    let mut plan_all = plan.clone();
    for j in &plan2.jobs {
        plan_all.push_job(j.clone());
    }
    let metrics = worker.metrics().await.unwrap_or_default();
    let (exit, _) = worker.stop(Duration::from_secs(60)).await;
    let stats = world.sandbox.stats();
    let out = conclude(&world, &plan_all, &[]).await;
    let a = &out.analysis;

    let over_rate = stats.per_second.iter().filter(|&&c| c > rate).count();
    let over_bound = stats
        .per_second
        .iter()
        .filter(|&&c| c > rate + burst)
        .count();
    let busy: Vec<u64> = stats
        .per_second
        .iter()
        .copied()
        .filter(|&c| c > 0)
        .collect();
    let mean = busy.iter().sum::<u64>() as f64 / busy.len().max(1) as f64;
    let parked =
        crate::reliability::harness::metric_sum(&metrics, "blinger_worker_jobs_retried_total", &[]);

    f.outcome(n + n2, &out);
    f.recovery = format!(
        "all delivered in {} (with 429s), {} (without)",
        took.map_or("(timeout)".into(), secs),
        took2.map_or("(timeout)".into(), secs)
    );
    f.detail(
        "phase 2 (no 429s): requests in any sliding 1-second window",
        format!(
            "max {phase2_window}, mean {phase2_mean:.1} /s over {}",
            secs(phase2_span)
        ),
    );
    f.detail(
        "phase 1 (with 429s): requests in any sliding 1-second window",
        format!("max {phase1_window}"),
    );
    f.detail(
        "injected",
        format!(
            "{} 5xx, {} 429, {} stalls, of {} requests",
            stats.injected.errors,
            stats.injected.rate_limited,
            stats.injected.timeouts,
            stats.total
        ),
    );
    f.detail(
        "request rate at the sandbox (1-second buckets from the first request)",
        format!(
            "max {} /s, mean {mean:.1} /s over {} busy seconds; {} buckets above the limit {rate}, \
             {} above limit + burst {}",
            stats.max_rate_per_sec,
            busy.len(),
            over_rate,
            over_bound,
            rate + burst
        ),
    );
    f.detail("retries (in-process and parks)", parked);
    f.detail("requests by outcome", format!("{:?}", a.by_outcome));

    f.check("no job lost", a.lost.is_empty(), a.lost.len());
    f.check(
        "every job delivered exactly once",
        a.delivered == n + n2 && a.sent_once(),
        a.duplicates_text(),
    );
    f.check(
        "none dead-lettered",
        out.dead.is_empty(),
        dead_summary(&out.dead),
    );
    let window_max = phase1_window.max(phase2_window) as u64;
    f.check(
        "rate never above limit + burst in any sliding 1-second window",
        // 2 requests of tolerance: arrivals are stamped by the sandbox, in milliseconds, after
        // the network and the scheduler, which can bring two sends a little closer.
        window_max <= rate + burst + 2,
        format!(
            "max {window_max} requests in one second, limit {rate}/s + burst {burst} (a token \
             bucket lets at most burst + rate × 1 s through in any 1-second window; 2 requests \
             of tolerance for arrival-time jitter)"
        ),
    );
    f.check(
        "rate never above limit + burst in any 1-second bucket",
        stats.max_rate_per_sec <= rate + burst,
        format!(
            "max {} /s against {rate}/s + burst {burst} (a token bucket allows at most \
             rate + burst in any 1-second window)",
            stats.max_rate_per_sec
        ),
    );
    f.check("order kept", a.order_violations == 0, a.order_violations);
    f.check_drained(out.backlog);
    f.check_exits("exit 0", &[exit]);
    finish(world, f, started).await
}
