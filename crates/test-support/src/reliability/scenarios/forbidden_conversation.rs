//! Scenario 12, One forbidden conversation among healthy ones (issue 11): the sandbox answers 403
//! for one conversation (it belongs to another account; the token is fine), whose jobs are
//! published among many jobs to healthy conversations. A 403 first pauses the worker like a
//! wrong token; once another job (another conversation) is accepted, a 403 again for the same job
//! is evidence that the job is forbidden: it is dead-lettered `rejected` with status 403, and the
//! worker carries on. No single message may pause the worker for longer than one probe round.
//! Before issue 11 every 403 paused everybody and the probe was that same job, forever: 0 of 60
//! healthy jobs delivered after 90 s.
//!
//! Phase 1 keeps healthy traffic flowing (a trickle of one healthy job a second after the batch)
//! until every forbidden job is dead-lettered. Phase 2 is the limit of the evidence rule: one
//! forbidden job with nothing else queued is refused like a wrong token and pauses the worker,
//! as long as no other job arrives to be compared with (the first short run, without the
//! trickle, left the last forbidden job alone at the end: paused 140 s and counting); a healthy
//! job published 5 s later must resolve it within two probe rounds.
//!
//! `blinger_worker_paused` is sampled every ~0.1 s through the run; the longest paused stretch
//! is checked against [`PAUSE_BOUND`].

use std::collections::HashSet;
use std::time::{Duration, Instant};

use blinger_worker::contract::job::Kind;
use uuid::Uuid;

use super::{Expect, Progress, Samples, conclude, dead_summary, finish};
use crate::reliability::Ctx;
use crate::reliability::harness::{World, secs};
use crate::reliability::jobs::Plan;
use crate::reliability::report::Figures;

/// The longest a pause may last: one probe round is at most the probe's longest wait (60 s),
/// plus slack for the calls and the sampling.
const PAUSE_BOUND: Duration = Duration::from_secs(70);

const TICK: Duration = Duration::from_millis(100);

pub async fn run(ctx: &Ctx) -> Figures {
    let started = Instant::now();
    let healthy = ctx.pick(30, 50);
    let per_conversation = ctx.pick(10, 20);
    let forbidden_jobs = ctx.pick(5, 10);
    let forbidden = "forbidden-0";
    let mut f = Figures::new("12 one forbidden conversation", ctx);
    f.setup = format!(
        "{forbidden_jobs} jobs to a conversation the sandbox answers 403 for, among {} jobs to \
         {healthy} healthy conversations ({per_conversation} each), 4 kinds, published \
         interleaved before the worker starts, then one healthy job a second until the forbidden \
         ones are dead-lettered; then one more forbidden job alone, and a healthy one 5 s later; \
         defaults otherwise (concurrency 64, prefetch 200, \
         rate limit 50/s, keyless calls 1 at a time)",
        healthy * per_conversation
    );
    let mut world = World::new(ctx, "forbidden", "1s,2s").await;
    world
        .sandbox
        .update(|c| c.forbidden_conversations = vec![forbidden.to_owned()]);
    world.declare().await;

    // Round r: job r of every healthy conversation, with a forbidden job every other round.
    let mut plan = Plan::default();
    let mut forbidden_ids: HashSet<Uuid> = HashSet::new();
    let mut k = 0usize;
    let mut kind = || {
        k += 1;
        Kind::ALL[k % Kind::ALL.len()]
    };
    for round in 0..per_conversation {
        for c in 0..healthy {
            plan.push(kind(), &format!("healthy-{c}"));
            if c == healthy / 2 && round % 2 == 0 && forbidden_ids.len() < forbidden_jobs {
                forbidden_ids.insert(plan.push(kind(), forbidden));
            }
        }
    }
    while forbidden_ids.len() < forbidden_jobs {
        forbidden_ids.insert(plan.push(kind(), forbidden));
    }
    let mut expect = Expect::of(&plan, &forbidden_ids);
    world.publish(&plan.messages()).await;
    let mut worker = world.start_worker(&[]);
    let start_at = Instant::now();

    // Phase 1: the batch, then a trickle of one healthy job a second (each to a conversation of
    // its own) for as long as forbidden jobs are left, so that the last of them is still among
    // healthy ones (phase 2 is the one left alone).
    let mut samples = Samples::default();
    let mut progress = Progress::default();
    let batch_expect = expect.clone();
    let mut batch_done = None;
    let mut healthy_done = None;
    let mut dead_done = None;
    let mut trickled = 0usize;
    let mut last_trickle = Instant::now();
    let deadline = start_at + Duration::from_secs(ctx.pick(150, 300));
    let mut tick = 0u32;
    while Instant::now() < deadline {
        samples.take(&worker).await;
        progress.poll(&world.sandbox);
        if dead_done.is_none() && tick.is_multiple_of(5) {
            let dead_seen = world.ready(&world.names.dead).await.unwrap_or(0) as usize;
            if dead_seen >= forbidden_jobs {
                dead_done = Some(start_at.elapsed());
            }
        }
        if dead_done.is_none() && last_trickle.elapsed() >= Duration::from_secs(1) {
            let mut one = Plan::default();
            let id = one.push(Kind::SendText, &format!("healthy-trickle-{trickled}"));
            world.publish(&one.messages()).await;
            plan.push_job(one.jobs.remove(0));
            expect.ids.insert(id.to_string());
            trickled += 1;
            last_trickle = Instant::now();
        }
        if batch_done.is_none() && progress.done(&batch_expect) {
            batch_done = Some(start_at.elapsed());
        }
        if healthy_done.is_none() && dead_done.is_some() && progress.done(&expect) {
            healthy_done = Some(start_at.elapsed());
        }
        if healthy_done.is_some() && dead_done.is_some() {
            break;
        }
        tick += 1;
        tokio::time::sleep(TICK).await;
    }
    let stretches_phase1 = samples.paused_stretches();

    // Phase 2: one forbidden job with nothing else queued. With no other job to compare, its 403
    // cannot be told from a token problem: the worker pauses and probes with it. A healthy job
    // published 5 s later takes a probe turn; once it is accepted, the lone job's next 403 is
    // evidence, and it is dead-lettered.
    let lone_id = plan.push(Kind::SendText, forbidden);
    forbidden_ids.insert(lone_id);
    world.publish(&plan.messages()[plan.len() - 1..]).await;
    let lone_at = Instant::now();
    while lone_at.elapsed() < Duration::from_secs(5) {
        samples.take(&worker).await;
        tokio::time::sleep(TICK).await;
    }
    let lone_paused = worker.metric("blinger_worker_paused", &[]).await;
    let late_id = plan.push(Kind::SendText, "healthy-late");
    expect.ids.insert(late_id.to_string());
    world.publish(&plan.messages()[plan.len() - 1..]).await;
    let late_at = Instant::now();
    let mut late_delivered = None;
    let mut lone_dead = None;
    let deadline = late_at + Duration::from_secs(150);
    while Instant::now() < deadline && (late_delivered.is_none() || lone_dead.is_none()) {
        samples.take(&worker).await;
        progress.poll(&world.sandbox);
        if late_delivered.is_none() && progress.done(&expect) {
            late_delivered = Some(late_at.elapsed());
        }
        if lone_dead.is_none()
            && world.ready(&world.names.dead).await.unwrap_or(0) as usize > forbidden_jobs
        {
            lone_dead = Some(late_at.elapsed());
        }
        tokio::time::sleep(TICK).await;
    }
    let forbidden_jobs = forbidden_jobs + 1;
    let paused_end = worker.metric("blinger_worker_paused", &[]).await;
    let ready_end = worker.readyz().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (exit, _) = worker.stop(Duration::from_secs(60)).await;
    let out = conclude(&world, &plan, &[]).await;
    let a = &out.analysis;
    let records = world.sandbox.requests();
    let forbidden_calls = records
        .iter()
        .filter(|r| r.conversation_id.as_deref() == Some(forbidden))
        .count();
    let forbidden_accepted = records
        .iter()
        .filter(|r| r.conversation_id.as_deref() == Some(forbidden) && r.status == 200)
        .count();
    let healthy_refused = records
        .iter()
        .filter(|r| r.conversation_id.as_deref() != Some(forbidden) && r.status != 200)
        .count();
    let dead_forbidden: Vec<_> = out
        .dead
        .iter()
        .filter(|d| d.job_id().is_some_and(|id| forbidden_ids.contains(&id)))
        .collect();
    let dead_forbidden_ids: HashSet<Uuid> =
        dead_forbidden.iter().filter_map(|d| d.job_id()).collect();
    let rejected_403 = dead_forbidden
        .iter()
        .filter(|d| {
            d.header("x-blinger-reason") == "rejected" && d.header("x-blinger-status") == "403"
        })
        .count();
    let healthy_total = plan.len() - forbidden_jobs;
    progress.poll(&world.sandbox);
    let healthy_delivered = progress.delivered(&expect);
    let stretches = samples.paused_stretches();
    let longest = stretches.iter().max().copied();

    f.outcome(plan.len(), &out);
    f.dead_lettered = format!(
        "{} ({rejected_403} of the {forbidden_jobs} forbidden jobs rejected with status 403)",
        dead_summary(&out.dead)
    );
    f.order = format!("{} violations", a.order_violations);
    f.recovery = format!(
        "from the start: the healthy batch all delivered in {}, the forbidden jobs among them \
         all dead-lettered in {}; longest pause {} (phase 1), {} (overall, the lone job \
         included)",
        batch_done.map_or("never".into(), secs),
        dead_done.map_or("never".into(), secs),
        stretches_phase1
            .iter()
            .max()
            .map_or("none seen".into(), |d| secs(*d)),
        longest.map_or("none seen".into(), secs)
    );
    f.detail(
        "paused stretches seen (sampled every ~0.1 s)",
        format!(
            "{}: {}",
            stretches.len(),
            stretches
                .iter()
                .map(|d| secs(*d))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    f.detail(
        "healthy jobs trickled in (one a second) until the forbidden ones were dead-lettered",
        trickled,
    );
    f.detail(
        "phase 2, a lone forbidden job: paused gauge 5 s after it, healthy job then published → delivered, → the lone job dead-lettered",
        format!(
            "{lone_paused:?}, {}, {}",
            late_delivered.map_or("never".into(), secs),
            lone_dead.map_or("never".into(), secs)
        ),
    );
    f.detail(
        "sampling interval",
        format!("{} ms", samples.mean_interval().as_millis()),
    );
    f.detail(
        "calls for the forbidden conversation (all 403), per forbidden job",
        format!(
            "{forbidden_calls}, {:.1}",
            forbidden_calls as f64 / forbidden_jobs as f64
        ),
    );
    f.detail("API requests by outcome", format!("{:?}", a.by_outcome));
    f.detail(
        "at the end: paused gauge, /readyz",
        format!("{paused_end:?}, {ready_end:?}"),
    );

    f.check(
        "every healthy job delivered",
        healthy_done.is_some() && healthy_delivered == healthy_total,
        format!("{healthy_delivered} of {healthy_total}"),
    );
    f.check(
        "every forbidden job dead-lettered once, reason rejected, status 403, never accepted",
        dead_forbidden.len() == forbidden_jobs
            && dead_forbidden_ids.len() == forbidden_jobs
            && rejected_403 == forbidden_jobs
            && forbidden_accepted == 0,
        format!(
            "{} dead letters for {} of {forbidden_jobs} jobs, {rejected_403} rejected/403, \
             {forbidden_accepted} accepted",
            dead_forbidden.len(),
            dead_forbidden_ids.len()
        ),
    );
    f.check(
        "no healthy job dead-lettered or refused",
        out.dead.len() == dead_forbidden.len() && healthy_refused == 0,
        format!(
            "{} other dead letters, {healthy_refused} refused calls",
            out.dead.len() - dead_forbidden.len()
        ),
    );
    f.check(
        &format!(
            "never paused longer than one probe round (longest paused stretch < {})",
            secs(PAUSE_BOUND)
        ),
        longest.is_none_or(|l| l < PAUSE_BOUND) && dead_done.is_some(),
        longest.map_or("no pause seen".into(), secs),
    );
    f.check(
        "a lone forbidden job is resolved once a healthy job arrives (within two probe rounds, \
         130 s)",
        late_delivered.is_some_and(|d| d < 2 * PAUSE_BOUND - Duration::from_secs(10))
            && lone_dead.is_some_and(|d| d < 2 * PAUSE_BOUND - Duration::from_secs(10)),
        format!(
            "delivered {}, dead-lettered {}",
            late_delivered.map_or("never".into(), secs),
            lone_dead.map_or("never".into(), secs)
        ),
    );
    f.check(
        "resumed at the end (gauge 0, /readyz 200)",
        paused_end == Some(0.0) && ready_end == Some(200),
        format!("{paused_end:?}, {ready_end:?}"),
    );
    f.check_sent_once("nothing sent twice", a);
    f.check(
        "order kept per conversation",
        a.order_violations == 0,
        a.order_violations,
    );
    f.check_drained(out.backlog);
    f.check_exits("exit 0", &[exit]);
    finish(world, f, started).await
}
