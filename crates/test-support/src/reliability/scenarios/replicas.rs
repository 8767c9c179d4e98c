//! Scenario 14, Replicas (issue 14, scenarios (a) and (c), on one broker): a partitioned
//! deployment (16 partitions, one trail key) delivers a mixed load while it is scaled from one
//! replica to three, a random one of the three is killed (`kill -9`) every 1–2 s, six times, and
//! started again at once, half the time with a fresh, empty data directory (its volume lost), and
//! then scaled down to two (SIGTERM) while jobs still flow. Every job is accounted for from the sandbox's
//! records; the delivered records come from a last replica started with an empty data directory
//! after the others stopped, which reads them all from the delivered-records log.
//!
//! What it states across replicas: nothing lost, nothing created twice, keyless second calls only
//! from the killed replica's call in flight, no order violation per conversation, and how long
//! delivery pauses after each kill, and that the replicas keep to one rate limit together (100/s
//! with a burst of 10, low enough to hold the load back): the most requests Blinger sees in any
//! 1 s. On
//! RabbitMQ 3.10 one replica usually holds every partition (no spreading yet), so the check
//! bites hardest at the handovers, when a new holder's share is given in steps; the check of
//! replicas sending at once is `replicas_keep_to_one_rate_limit_split_by_the_partitions_they_hold`
//! (tests/partitions.rs). One part of issue 14 is not built yet, so the scenario leaves it out and
//! says so: the fair share is off (a conversation's jobs out in the delay tiers are known only to
//! the replica that sent them there until chain snapshots are shared, step 5 of
//! docs/scale-out.md 7).

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{Expect, Progress, conclude, finish, mean_max, peak_window, wait_settled};
use crate::reliability::Ctx;
use crate::reliability::harness::{World, WorkerProc, free_port, secs};
use crate::reliability::jobs::Plan;
use crate::reliability::report::Figures;

const PARTITIONS: u16 = 16;
const REPLICAS: usize = 3;
const KILLS: usize = 6;
const TRAIL_KEY: &str = "replicas-scenario-shared-trail-key";

/// One replica's place: its process and its data directory.
struct Slot {
    proc: WorkerProc,
    dir: PathBuf,
}

pub async fn run(ctx: &Ctx) -> Figures {
    let started = Instant::now();
    let n = ctx.pick(4_000, 20_000);
    let conversations = 100;
    let rate = 100;
    let burst = 10;
    let mut f = Figures::new("14 replicas", ctx);
    f.setup = format!(
        "1 → {REPLICAS} replicas under load, then {REPLICAS} → {}, {PARTITIONS} partitions, {n} jobs (4 kinds) over {conversations} \
         conversations; {KILLS} × kill -9 of a random replica every 1–2 s, each started again at \
         once, half the time with an empty data directory; concurrency 64, prefetch 200, fair \
         share off, one rate limit of {rate}/s + burst {burst} for the replicas together, sandbox \
         latency 10–50 ms; \
         one broker",
        REPLICAS - 1
    );

    let mut world = World::new(ctx, "replicas", "5s,30s,2m,10m,30m").await;
    world.names.partitions = Some(PARTITIONS);
    world.sandbox.update(|c| {
        c.latency_ms = 10;
        c.latency_jitter_ms = 40;
    });
    let plan = Plan::mixed(n, conversations, "conv-", ctx.seed);
    let expect = Expect::of(&plan, &HashSet::new());
    let rate_s = rate.to_string();
    let burst_s = burst.to_string();
    let root = world.data_dir.clone();

    let mut generation = 0u32;
    let mut start = |world: &mut World, replica: usize, dir: Option<PathBuf>| -> Slot {
        generation += 1;
        let dir = dir.unwrap_or_else(|| root.join(format!("replica-{replica}-{generation}")));
        let dir_s = dir.display().to_string();
        let addr = format!("127.0.0.1:{}", free_port());
        let host = format!("replica-{replica}");
        let proc = world.start_worker(&[
            ("BLINGER_WORKER_PARTITIONS", &PARTITIONS.to_string()),
            ("BLINGER_WORKER_TRAIL_KEY", TRAIL_KEY),
            ("BLINGER_WORKER_RATE_LIMIT", &rate_s),
            ("BLINGER_WORKER_RATE_BURST", &burst_s),
            ("BLINGER_WORKER_CONCURRENCY", "64"),
            ("BLINGER_WORKER_PREFETCH", "200"),
            // No job goes round a delay tier to make room for other conversations: a
            // conversation's members out in the tiers are known only to the replica that sent
            // them there until chain snapshots are shared (docs/scale-out.md 7, step 5). With
            // the default fair share, kills reordered 442 jobs (docs/reliability.md).
            ("BLINGER_WORKER_FAIR_SHARE", "0"),
            ("BLINGER_WORKER_DATA_DIR", &dir_s),
            ("BLINGER_WORKER_METRICS_ADDR", &addr),
            ("HOSTNAME", &host),
        ]);
        Slot { proc, dir }
    };

    let mut slots: Vec<Slot> = vec![start(&mut world, 0, None)];
    let mut missed_ready = 0;
    if slots[0].proc.wait_ready(Duration::from_secs(60)).await.is_none() {
        missed_ready += 1;
    }
    let mut publisher = world.new_publisher().await;
    let msgs = plan.messages();
    let publishing = tokio::spawn(async move {
        publisher.publish(&msgs).await;
        publisher.republished
    });

    let mut rng = StdRng::seed_from_u64(ctx.seed ^ 0x5EED_0014);
    let mut progress = Progress::default();
    let mut kills_at: Vec<SystemTime> = Vec::new();
    let mut to_ready: Vec<Duration> = Vec::new();
    let mut fresh_dirs = 0;
    // Scale up under load, once the first replica delivers.
    let began = Instant::now();
    while progress.accepted < 100 && began.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(20)).await;
        progress.poll(&world.sandbox);
    }
    let scale_up = Instant::now();
    for replica in 1..REPLICAS {
        slots.push(start(&mut world, replica, None));
    }
    for slot in &mut slots[1..] {
        if slot.proc.wait_ready(Duration::from_secs(60)).await.is_none() {
            missed_ready += 1;
        }
    }
    let scale_up_ready = scale_up.elapsed();
    for _ in 0..KILLS {
        tokio::time::sleep(Duration::from_millis(rng.random_range(1_000..2_000))).await;
        let victim = rng.random_range(0..REPLICAS);
        kills_at.push(slots[victim].proc.kill9());
        let fresh = rng.random_bool(0.5);
        let dir = if fresh {
            fresh_dirs += 1;
            None
        } else {
            Some(slots[victim].dir.clone())
        };
        slots[victim] = start(&mut world, victim, dir);
        match slots[victim].proc.wait_ready(Duration::from_secs(60)).await {
            Some(d) => to_ready.push(d),
            None => missed_ready += 1,
        }
    }
    // Scale down while jobs still flow: the replica leaving hands back what it holds.
    progress.poll(&world.sandbox);
    let before_scale_down = progress.delivered(&expect);
    // The replica holding the most jobs leaves (the broker may have given another one nothing).
    let mut holding = Vec::with_capacity(slots.len());
    for slot in &slots {
        let held = slot
            .proc
            .metric("blinger_worker_jobs_in_flight", &[])
            .await
            .unwrap_or(0.0);
        holding.push(held);
    }
    let busiest = (0..slots.len())
        .max_by(|a, b| holding[*a].total_cmp(&holding[*b]))
        .expect("three replicas");
    let held_at_scale_down = holding[busiest];
    let mut leaving = slots.remove(busiest);
    let scale_down_at = SystemTime::now();
    let (scale_down_exit, scale_down_took) = leaving.proc.stop(Duration::from_secs(60)).await;
    let republished = publishing.await.expect("publisher task");
    let drained = progress
        .wait_all(
            &world.sandbox,
            &expect,
            Duration::from_secs(ctx.pick(240, 900)),
        )
        .await;
    let replicas: Vec<&WorkerProc> = slots.iter().map(|slot| &slot.proc).collect();
    wait_settled(&world, &replicas, Duration::from_secs(60)).await;
    // All at once, as a rollout would: each hands back what it holds to the others.
    let mut exits = Vec::new();
    for slot in &slots {
        slot.proc.sigterm();
    }
    for slot in &mut slots {
        exits.push(slot.proc.wait(Duration::from_secs(60)).await);
    }
    // The records: a replica with an empty data directory reads every one from the log.
    let mut audit = start(&mut world, REPLICAS, None);
    let audit_ready = audit.proc.wait_ready(Duration::from_secs(120)).await;
    let audit_records = audit
        .proc
        .metric("blinger_worker_log_records_applied_total", &[])
        .await
        .unwrap_or(0.0);
    let (audit_exit, _) = audit.proc.stop(Duration::from_secs(60)).await;
    world.set_data_dir(audit.dir.clone());
    let out = conclude(&world, &plan, &kills_at).await;
    let a = &out.analysis;

    let records = world.sandbox.requests();
    let accepted: Vec<SystemTime> = {
        let mut at: Vec<SystemTime> = records
            .iter()
            .filter(|r| r.status == 200)
            .filter_map(|r| super::arrival(&r.ts))
            .collect();
        at.sort();
        at
    };
    // Per kill: the time until the next accepted call from any replica.
    let to_next: Vec<Duration> = kills_at
        .iter()
        .filter_map(|k| {
            accepted
                .iter()
                .find(|t| *t >= k)
                .map(|t| t.duration_since(*k).unwrap_or_default())
        })
        .collect();
    // The longest stretch without an accepted call while the kills went on.
    let (first_kill, last_kill) = (kills_at[0], kills_at[KILLS - 1]);
    let longest_gap = accepted
        .windows(2)
        .filter(|w| w[1] >= first_kill && w[0] <= last_kill + Duration::from_secs(2))
        .map(|w| w[1].duration_since(w[0]).unwrap_or_default())
        .max()
        .unwrap_or_default();
    let (peak, peak_at) = peak_window(&records, Duration::from_secs(1));
    // When it was, from the first kill (negative: before it), to tell a join, a kill or the
    // scale-down apart.
    let peak_from_first_kill = peak_at.map(|at| match at.duration_since(kills_at[0]) {
        Ok(after) => format!("{:.2} s after the first kill", after.as_secs_f64()),
        Err(before) => format!("{:.2} s before the first kill", before.duration().as_secs_f64()),
    });

    f.outcome(n, &out);
    f.order = format!(
        "{} jobs sent after a later job of their conversation ({} across a kill)",
        a.order_violations, a.order_violations_across_restart
    );
    f.recovery = format!(
        "kill → next accepted call {}; longest stretch without one during the kills {}; restart → ready {}",
        mean_max(&to_next),
        secs(longest_gap),
        mean_max(&to_ready)
    );
    f.detail("kills", KILLS);
    f.detail(
        "scale 1 → 3: the two new replicas ready after",
        secs(scale_up_ready),
    );
    f.detail(
        "scale 3 → 2: SIGTERM → exit",
        format!(
            "{} ({:?}), holding {held_at_scale_down} jobs, with {before_scale_down} of {} jobs accepted, \
             {:.2} s after the first kill",
            secs(scale_down_took),
            scale_down_exit,
            expect.total(),
            scale_down_at
                .duration_since(kills_at[0])
                .unwrap_or_default()
                .as_secs_f64()
        ),
    );
    f.detail("restarts with an empty data directory", fresh_dirs);
    f.detail(
        "repeated calls charged to the stretch before each kill (resends + second calls)",
        format!(
            "{:?}",
            &a.repeats_by_instance[..a.repeats_by_instance.len() - 1]
        ),
    );
    f.detail("API requests", a.requests);
    f.detail("requests by outcome", format!("{:?}", a.by_outcome));
    f.detail("publisher re-sends (broker hiccups)", republished);
    f.detail(
        "all accepted after the last kill",
        drained.map_or("not within the timeout".into(), secs),
    );
    f.detail(
        "records the auditing replica read from the log",
        audit_records,
    );

    f.check_kills_kept_every_job(n, a);
    f.check_no_dead_letters(&out.dead);
    f.check(
        "order kept per conversation across replicas",
        a.order_violations == 0,
        format!("{} violations", a.order_violations),
    );
    f.check(
        "every accepted job has its record in the log",
        a.unrecorded.is_empty(),
        format!("{} without", a.unrecorded.len()),
    );
    f.check(
        "the replicas together keep to one rate limit (requests in any 1 s ≤ limit + burst)",
        // 2 requests of tolerance, as in scenario 3: the stamps are the sandbox's, taken after
        // the network and the scheduler of this busy test process.
        peak <= rate + burst + 2,
        format!(
            "highest in any 1 s: {peak} (from {}), limit {rate}/s + burst {burst} (2 requests of \
             tolerance for arrival-time jitter)",
            peak_from_first_kill.unwrap_or_default()
        ),
    );
    f.check_drained(out.backlog);
    f.check(
        "every replica became ready (the auditing one included)",
        missed_ready == 0 && audit_ready.is_some(),
        format!(
            "{missed_ready} did not; audit: {}",
            audit_ready.map_or("never".into(), secs)
        ),
    );
    exits.push(scale_down_exit);
    exits.push(audit_exit);
    f.check_exits("every SIGTERM exits 0", &exits);
    finish(world, f, started).await
}
