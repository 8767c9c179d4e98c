//! Scenario 11, Probe job expires while paused (issue 11): Blinger refuses the token (401), so the
//! one job the worker holds becomes the probe; more jobs arrive and wait behind the pause; the
//! probing job's `expires_at` passes while it waits to probe again. It must be dead-lettered
//! `expired` (once), another waiting job must take the probe over at once, and fixing the token
//! file must deliver every other job without a restart. Before issue 11 nobody took over: 0 of
//! 20 waiting jobs were delivered 100 s after the fix, the worker stayed paused until restarted,
//! and `/healthz` said it was fine. `/healthz` is sampled throughout: the probe was taken over,
//! so the worker is not stuck and must not say it is.
//!
//! The timing follows the probe's schedule (`crates/blinger-worker/src/engine/pause.rs`): a first wait of 1 s, doubled after
//! every refusal. Alone, the expiring job is refused at about 0, 1 and 3 s after it was
//! published and then waits 4 s; the others are published after its third refusal, and it
//! expires 5.5 s after publishing, within that wait.

use std::collections::HashSet;
use std::time::{Duration, Instant, SystemTime};

use blinger_worker::contract::job::Kind;
use uuid::Uuid;

use super::{Expect, Progress, Samples, arrival, conclude, dead_summary, finish};
use crate::reliability::Ctx;
use crate::reliability::harness::{TOKEN, World, secs};
use crate::reliability::jobs::Plan;
use crate::reliability::report::Figures;

/// Time between samples and polls.
const TICK: Duration = Duration::from_millis(100);

pub async fn run(ctx: &Ctx) -> Figures {
    let started = Instant::now();
    let n = ctx.pick(300, 1_000);
    // More lanes than concurrency slots (64) in both profiles: the first full run (100) stayed
    // paused after the fix (docs/reliability.md, scenario 11).
    let conversations = ctx.pick(80, 100);
    let expires_in = Duration::from_millis(5_500);
    let mut f = Figures::new("11 probe job expires while paused", ctx);
    f.setup = format!(
        "wrong token in BLINGER_API_TOKEN_FILE; one send-text job with expires_at {} after its \
         publishing is alone and probes (refused at about 0, 1 and 3 s); then {n} jobs (4 kinds, \
         no expiry) over {conversations} conversations, one of them the probe's, wait behind the \
         pause; the probe expires during its 4 s wait; the token file is fixed once another job \
         took the probe over and was refused",
        secs(expires_in)
    );
    let mut world = World::new(ctx, "probe-expiry", "1s,2s").await;
    world.declare().await;
    let token_file = world.log_dir.join("token");
    std::fs::write(&token_file, "wrong-token\n").unwrap();
    let token_path = token_file.display().to_string();
    let mut worker = world.start_worker(&[
        ("BLINGER_API_TOKEN", ""),
        ("BLINGER_API_TOKEN_FILE", &token_path),
    ]);
    let ready = worker.wait_ready(Duration::from_secs(30)).await;
    let mut samples = Samples::default();

    // The expiring job first and alone; the others planned behind it (one shares its
    // conversation, so its lane must move on after the expiry too).
    let probe_conversation = "pexp-0";
    let mut plan = Plan::default();
    let published_at = SystemTime::now();
    let expires_sys = published_at + expires_in;
    let probe_id = plan.push_expiring(
        Kind::SendText,
        probe_conversation,
        time::OffsetDateTime::from(expires_sys),
    );
    for j in Plan::mixed(n, conversations, "pexp-", ctx.seed).jobs {
        plan.push(j.kind, &j.conversation);
    }
    let msgs = plan.messages();
    world.publish(&msgs[..1]).await;
    let expires_instant = Instant::now() + expires_in;
    let is_probe = |u: &Option<String>| u.as_deref() == Some(probe_id.to_string().as_str());

    // Three refusals of the expiring job: it now waits 4 s before its next probe.
    let mut refused_alone = false;
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        samples.take(&worker).await;
        if world.sandbox.stats().unauthorized >= 3 {
            refused_alone = true;
            break;
        }
        tokio::time::sleep(TICK).await;
    }
    let paused_alone = worker.metric("blinger_worker_paused", &[]).await;
    let ready_paused = worker.readyz().await;
    world.publish(&msgs[1..]).await;
    let others_at = SystemTime::now();
    let others_before_expiry = others_at < expires_sys;

    // The expiry: the job reaches the dead-letter queue.
    let mut expired_seen = None;
    let mut paused_at_expiry = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        samples.take(&worker).await;
        if world.ready(&world.names.dead).await.unwrap_or(0) >= 1 {
            expired_seen = Some(Instant::now());
            paused_at_expiry = worker.metric("blinger_worker_paused", &[]).await;
            break;
        }
        tokio::time::sleep(TICK).await;
    }

    // The takeover: a refused call of another job after the expiry, the token still wrong.
    let mut takeover = None;
    let deadline = Instant::now() + Duration::from_secs(ctx.pick(70, 130));
    while expired_seen.is_some() && Instant::now() < deadline {
        samples.take(&worker).await;
        takeover = world
            .sandbox
            .requests()
            .into_iter()
            .filter(|r| r.status == 401 && !is_probe(&r.uuid))
            .filter_map(|r| arrival(&r.ts))
            .find(|at| *at >= expires_sys);
        if takeover.is_some() {
            break;
        }
        tokio::time::sleep(TICK).await;
    }
    let records_wrong = world.sandbox.requests();
    let accepted_while_wrong = records_wrong.iter().filter(|r| r.status == 200).count();
    let probe_refusals: Vec<String> = records_wrong
        .iter()
        .filter(|r| is_probe(&r.uuid))
        .filter_map(|r| arrival(&r.ts))
        .map(|at| secs(at.duration_since(published_at).unwrap_or_default()))
        .collect();
    // Calls between the others' publishing and the expiry: none if the expiring job held the
    // probe to the end (only the probe calls while paused).
    let calls_before_expiry = records_wrong
        .iter()
        .filter_map(|r| arrival(&r.ts))
        .filter(|at| *at > others_at && *at < expires_sys)
        .count();
    let refused_while_wrong = world.sandbox.stats().unauthorized;
    let probes_after_expiry: Vec<&str> = records_wrong
        .iter()
        .filter(|r| r.status == 401 && !is_probe(&r.uuid))
        .map(|r| r.endpoint.as_str())
        .collect();

    // The fix.
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let fixed_at = Instant::now();
    let expect = Expect::of(&plan, &HashSet::from([probe_id]));
    let mut progress = Progress::default();
    let mut first = None;
    let mut all = None;
    let deadline = fixed_at + Duration::from_secs(ctx.pick(120, 300));
    while Instant::now() < deadline {
        samples.take(&worker).await;
        progress.poll(&world.sandbox);
        if first.is_none() && progress.accepted > 0 {
            first = Some(fixed_at.elapsed());
        }
        if progress.done(&expect) {
            all = Some(fixed_at.elapsed());
            break;
        }
        tokio::time::sleep(TICK).await;
    }
    let ready_after = worker.readyz().await;
    let paused_after = worker.metric("blinger_worker_paused", &[]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (exit, _) = worker.stop(Duration::from_secs(60)).await;
    let out = conclude(&world, &plan, &[]).await;
    let a = &out.analysis;
    let probe_dead: Vec<_> = out
        .dead
        .iter()
        .filter(|d| d.job_id() == Some(probe_id))
        .collect();
    let probe_accepted = world
        .sandbox
        .requests()
        .iter()
        .any(|r| r.status == 200 && is_probe(&r.uuid));
    let others = plan.len() - 1;
    let others_delivered = a.delivered - usize::from(probe_accepted);
    let lost_others: Vec<&Uuid> = a.lost.iter().filter(|u| **u != probe_id).collect();

    f.outcome(plan.len(), &out);
    f.recovery = format!(
        "expiry → another job probes {}; token fixed → first delivery {}, → all {}",
        takeover.map_or("never".into(), |t| secs(
            t.duration_since(expires_sys).unwrap_or_default()
        )),
        first.map_or("never".into(), secs),
        all.map_or("never".into(), secs)
    );
    f.detail("start → /readyz 200", ready.map_or("never".into(), secs));
    f.detail(
        "the expiring job's refused calls (after its publishing)",
        probe_refusals.join(", "),
    );
    f.detail(
        "others published after the expiring job (its expiry at 5.5 s)",
        secs(others_at.duration_since(published_at).unwrap_or_default()),
    );
    f.detail(
        "expires_at → seen in the dead-letter queue",
        expired_seen.map_or("never".into(), |t| {
            secs(t.saturating_duration_since(expires_instant))
        }),
    );
    f.detail(
        "paused gauge: alone, at the expiry, after the fix",
        format!("{paused_alone:?}, {paused_at_expiry:?}, {paused_after:?}"),
    );
    f.detail("401 answers while the token was wrong", refused_while_wrong);
    f.detail(
        "refused probes of other jobs before the fix (endpoint)",
        probes_after_expiry.join(", "),
    );
    f.detail(
        "/healthz samples (every ~0.1 s from the first job to the last delivery), not 200",
        format!("{}, {}", samples.healthz.len(), samples.unhealthy()),
    );

    f.check(
        "paused with the expiring job alone, refused 3 times before the others came (gauge 1, \
         /readyz 503)",
        refused_alone && paused_alone == Some(1.0) && ready_paused == Some(503),
        format!(
            "refused 3 times: {refused_alone}, gauge {paused_alone:?}, /readyz {ready_paused:?}"
        ),
    );
    f.check(
        "the expiring job held the probe when it expired (others published before the expiry, no \
         call between)",
        others_before_expiry && calls_before_expiry == 0,
        format!(
            "published before the expiry: {others_before_expiry}; calls in between: \
             {calls_before_expiry}"
        ),
    );
    f.check(
        "the expired job dead-lettered once, reason expired, while paused, never accepted",
        probe_dead.len() == 1
            && probe_dead[0].header("x-blinger-reason") == "expired"
            && paused_at_expiry == Some(1.0)
            && !probe_accepted,
        format!(
            "{} dead letters, reason {:?}, paused {paused_at_expiry:?}, accepted {probe_accepted}",
            probe_dead.len(),
            probe_dead.first().map(|d| d.header("x-blinger-reason"))
        ),
    );
    f.check(
        "nothing else dead-lettered",
        out.dead.len() == probe_dead.len(),
        dead_summary(&out.dead),
    );
    f.check(
        "another job took the probe over while the token was still wrong",
        takeover.is_some(),
        takeover.map_or(
            "no refused call of another job after the expiry".into(),
            |t| {
                format!(
                    "{} after the expiry",
                    secs(t.duration_since(expires_sys).unwrap_or_default())
                )
            },
        ),
    );
    f.check(
        "nothing accepted while the token was wrong",
        accepted_while_wrong == 0,
        accepted_while_wrong,
    );
    f.check(
        "every other job delivered after the fix, without a restart (resumed: /readyz 200, \
         gauge 0)",
        all.is_some()
            && others_delivered == others
            && lost_others.is_empty()
            && ready_after == Some(200)
            && paused_after == Some(0.0),
        format!(
            "{others_delivered} of {others}, {} lost; /readyz {ready_after:?}, gauge \
             {paused_after:?}",
            lost_others.len()
        ),
    );
    f.check_sent_once("nothing sent twice", a);
    f.check(
        "order kept per conversation",
        a.order_violations == 0,
        a.order_violations,
    );
    f.check(
        "/healthz 200 throughout (the worker was never stuck)",
        !samples.healthz.is_empty() && samples.unhealthy() == 0,
        format!(
            "{} of {} samples not 200",
            samples.unhealthy(),
            samples.healthz.len()
        ),
    );
    f.check_exits("exit 0", &[exit]);
    finish(world, f, started).await
}
