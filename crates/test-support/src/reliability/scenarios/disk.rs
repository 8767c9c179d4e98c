//! Scenario 9, Disk: the data directory unwritable at start (a read-only tmpfs, and a directory the
//! worker's non-root user may not write), and full during a run (a small tmpfs filled up).
//!
//! The promise: a clear error at start; during the run, no job acked without its durable
//! record. Checked by killing the worker (`kill -9`) while the disk is full, taking the queue's
//! contents (what was not acked), and opening the store: every job acked by then must have its
//! record. Then space is freed and everything must be delivered.
//!
//! Needs root (for `mount -t tmpfs` and `setpriv`); without it the scenario says so and checks
//! nothing.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};


use super::{Expect, Progress, conclude, dead_summary, finish};
use crate::reliability::Ctx;
use crate::reliability::harness::{Msg, World, free_port, secs};
use crate::reliability::jobs::Plan;
use crate::reliability::report::Figures;

/// A tmpfs mounted for the scenario; unmounted on drop.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(dir: &Path, options: &str) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(dir)
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
        }
        Ok(Tmpfs {
            dir: dir.to_owned(),
        })
    }

    fn free_bytes(&self) -> u64 {
        let out = Command::new("df")
            .args(["-B1", "--output=avail"])
            .arg(&self.dir)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Fills the filesystem with `filler` files until a write fails (ENOSPC).
    fn fill(&self) -> u64 {
        use std::io::Write;
        let mut written = 0u64;
        let mut k = 0;
        loop {
            k += 1;
            let Ok(mut file) = std::fs::File::create(self.dir.join(format!("filler-{k}"))) else {
                break;
            };
            let chunk = vec![0xAAu8; 4096];
            let mut full = false;
            for _ in 0..256 {
                match file.write_all(&chunk) {
                    Ok(()) => written += chunk.len() as u64,
                    Err(_) => {
                        full = true;
                        break;
                    }
                }
            }
            if file.sync_all().is_err() || full {
                break;
            }
        }
        written
    }

    fn unfill(&self) {
        for e in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            if e.file_name().to_string_lossy().starts_with("filler-") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Runs the worker to its start-up failure; returns (exit ok?, one line?, output, time).
fn start_failure(
    bin: &Path,
    env: &std::collections::BTreeMap<String, String>,
    as_nobody: bool,
) -> (bool, String, Duration) {
    let started = Instant::now();
    let mut cmd = if as_nobody {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(bin);
        c
    } else {
        Command::new(bin)
    };
    let out = cmd
        .arg("run")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env)
        .output()
        .expect("worker runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (
        out.status.success(),
        text.trim().to_owned(),
        started.elapsed(),
    )
}

pub async fn run(ctx: &Ctx) -> Figures {
    let started = Instant::now();
    let mut f = Figures::new("9 disk", ctx);
    if !is_root() {
        f.setup = "not run: needs root for tmpfs mounts and setpriv".into();
        f.detail("why not run", "this process is not root");
        return f;
    }
    let batch = ctx.pick(150, 1_000);
    let hold = Duration::from_secs(ctx.pick(6, 30));
    f.setup = format!(
        "start with a read-only data dir, an unwritable one (non-root worker), a file; then a \
         32 MiB tmpfs data dir filled up during the run: {batch} jobs before, {batch} while full \
         ({} held, then space freed), {batch} while full again (then kill -9, audit, restart)",
        secs(hold)
    );
    let mut world = World::new(ctx, "disk", "1s,2s,4s,8s,16s,30s").await;
    world.declare().await;
    let root = tempfile::tempdir().unwrap();
    let mut start_errors = Vec::new();
    let mut clear_errors = 0;
    let mut error_cases = 0;

    // (a) Unwritable at start.
    let ro = Tmpfs::mount(&root.path().join("ro"), "ro,size=1m").expect("mount a read-only tmpfs");
    let unwritable = root.path().join("locked");
    std::fs::create_dir_all(&unwritable).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&unwritable, std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    let file_instead = root.path().join("a-file");
    std::fs::write(&file_instead, "not a directory").unwrap();
    for (label, dir, nobody) in [
        ("read-only filesystem (existing dir)", ro.dir.clone(), false),
        (
            "read-only filesystem (dir to create)",
            ro.dir.join("data"),
            false,
        ),
        (
            "dir not writable by the worker's user",
            unwritable.join("data"),
            true,
        ),
        (
            "a file where the dir should be",
            file_instead.clone(),
            false,
        ),
    ] {
        let mut env = world.worker_env();
        env.insert("BLINGER_WORKER_DATA_DIR".into(), dir.display().to_string());
        env.insert(
            "BLINGER_WORKER_METRICS_ADDR".into(),
            format!("127.0.0.1:{}", free_port()),
        );
        let (ok, text, took) = start_failure(&ctx.bin, &env, nobody);
        error_cases += 1;
        if !ok && text.lines().count() == 1 && text.contains("BLINGER_WORKER_DATA_DIR") {
            clear_errors += 1;
        }
        start_errors.push(format!(
            "{label} → exit {} in {}: {text}",
            if ok { "0" } else { "≠0" },
            secs(took)
        ));
    }
    drop(ro);

    // (b) Full during the run.
    let fs = Tmpfs::mount(&root.path().join("small"), "size=32m").expect("mount a tmpfs");
    world.set_data_dir(fs.dir.join("data"));
    let mut plan = Plan::default();
    let a_plan = Plan::mixed(batch, 30, "a-", ctx.seed);
    let b_plan = Plan::mixed(batch, 30, "b-", ctx.seed ^ 1);
    let c_plan = Plan::mixed(batch, 30, "c-", ctx.seed ^ 2);
    for p in [&a_plan, &b_plan, &c_plan] {
        for j in &p.jobs {
            plan.push_job(j.clone());
        }
    }
    let mut worker = world.start_worker(&[("BLINGER_WORKER_RATE_LIMIT", "500")]);
    worker.wait_ready(Duration::from_secs(60)).await;
    let mut progress = Progress::default();
    world.publish(&a_plan.messages()).await;
    let e_a = Expect::of(&a_plan, &HashSet::new());
    progress
        .wait_all(&world.sandbox, &e_a, Duration::from_secs(60))
        .await;

    // Phase 1: full, then space freed while the worker runs.
    let free_before = fs.free_bytes();
    let filled = fs.fill();
    world.publish(&b_plan.messages()).await;
    tokio::time::sleep(hold).await;
    let ready_full = worker.readyz().await;
    let readyz_full = worker.get_text("/readyz").await.unwrap_or_default();
    let delivered_metric_full = worker
        .metric("blinger_worker_jobs_delivered_total", &[])
        .await
        .unwrap_or(0.0);
    let alive_full = worker.alive();
    fs.unfill();
    let freed_at = Instant::now();
    let e_ab = {
        let mut ab = a_plan.clone();
        for j in &b_plan.jobs {
            ab.push_job(j.clone());
        }
        Expect::of(&ab, &HashSet::new())
    };
    // From the moment space is freed: when /readyz turns 200 again, when batch 2 is all in.
    let mut ready_again = None;
    let mut all_b = None;
    let deadline = Duration::from_secs(ctx.pick(90, 180));
    while freed_at.elapsed() < deadline && (ready_again.is_none() || all_b.is_none()) {
        if ready_again.is_none() && worker.readyz().await == Some(200) {
            ready_again = Some(freed_at.elapsed());
        }
        if all_b.is_none() {
            progress.poll(&world.sandbox);
            if progress.done(&e_ab) {
                all_b = Some(freed_at.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let delivered_metric_after = worker
        .metric("blinger_worker_jobs_delivered_total", &[])
        .await
        .unwrap_or(0.0);
    let recovered_by_itself = ready_again.is_some() && delivered_metric_after >= (2 * batch) as f64;

    // Phase 2: full again, kill -9 while full, audit what was acked against the store.
    // sled may have space left in a segment it already allocated: keep jobs coming until a
    // store write fails.
    let _ = fs.fill();
    world.publish(&c_plan.messages()).await;
    let mut extra_batches = 0u64;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if worker.readyz().await == Some(503) || extra_batches >= 30 {
            break;
        }
        let more = Plan::mixed(
            batch / 3,
            30,
            &format!("c{extra_batches}-"),
            ctx.seed ^ (10 + extra_batches),
        );
        world.publish(&more.messages()).await;
        for j in more.jobs {
            plan.push_job(j);
        }
        extra_batches += 1;
    }
    tokio::time::sleep(hold).await;
    let ready_full2 = worker.readyz().await;
    let boundaries: Vec<SystemTime> = vec![worker.kill9()];
    // Jobs not acked are back in the queue: take them (to put them back after the audit).
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Each is put back where it was, as it was: a parked job keeps its sealed trail (its place
    // in its conversation's chain), or the restarted worker would wait for chain members that
    // never come back.
    let mut taken: Vec<Msg> = Vec::new();
    for q in std::iter::once(world.names.queue.clone()).chain(world.tier_queues()) {
        for m in world.take_all(&q).await {
            taken.push(Msg {
                routing_key: q.clone(),
                body: m.body,
                properties: Some(m.properties),
            });
        }
    }
    let unacked: HashSet<uuid::Uuid> = taken
        .iter()
        .filter_map(|m| {
            let v: serde_json::Value = serde_json::from_slice(&m.body).ok()?;
            uuid::Uuid::parse_str(v["id"].as_str()?).ok()
        })
        .collect();
    let dead_now = world.take_dead_letters().await;
    let dead_ids: HashSet<uuid::Uuid> = dead_now.iter().filter_map(|d| d.job_id()).collect();
    // A supervisor restarting the worker while the disk is still full: each start must fail
    // clearly, and must not damage the store (sled 0.34 leaves an incomplete snapshot behind).
    let mut full_starts = Vec::new();
    for _ in 0..2 {
        let mut env = world.worker_env();
        env.insert(
            "BLINGER_WORKER_METRICS_ADDR".into(),
            format!("127.0.0.1:{}", free_port()),
        );
        let (ok, text, took) = start_failure(&ctx.bin, &env, false);
        full_starts.push((ok, text, took));
    }
    fs.unfill();
    let store = match blinger_worker::store::Store::open(&world.data_dir) {
        Ok(store) => store,
        Err(e) => {
            f.check(
                "the store opens after starts on a full disk",
                false,
                format!("{e}"),
            );
            drop(fs);
            return finish(world, f, started).await;
        }
    };
    let mut acked = 0;
    let mut acked_without_record = Vec::new();
    for j in &plan.jobs {
        if unacked.contains(&j.id) || dead_ids.contains(&j.id) {
            continue;
        }
        acked += 1;
        if store.get(&j.id).ok().flatten().is_none() {
            acked_without_record.push(j.id);
        }
    }
    let _ = store.close().await;
    // Put the unacked jobs back (same bodies, same properties, same queues) and restart with
    // space.
    crate::amqp::publish_batch(world.publisher.channel(), "", &taken)
        .await
        .expect("the unacked jobs put back");
    let restart_at = Instant::now();
    let mut worker = world.start_worker(&[("BLINGER_WORKER_RATE_LIMIT", "500")]);
    let e_all = Expect::of(&plan, &HashSet::new());
    let all = progress
        .wait_all(&world.sandbox, &e_all, Duration::from_secs(120))
        .await
        .map(|_| restart_at.elapsed());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (exit, _) = worker.stop(Duration::from_secs(60)).await;
    let out = conclude(&world, &plan, &boundaries).await;
    let a = &out.analysis;
    drop(fs);

    f.outcome(plan.len(), &out);
    f.duplicated = format!(
        "{}; max per kill {}",
        a.duplicates_text(),
        a.max_repeats_per_kill()
    );
    f.dead_lettered = dead_summary(&out.dead);
    f.order = format!("{} violations", a.order_violations);
    f.recovery = format!(
        "space freed → batch 2 all accepted {}; → /readyz 200 {}; restart after the kill → all {}",
        all_b.map_or("never".into(), secs),
        ready_again.map_or("never".into(), secs),
        all.map_or("never".into(), secs)
    );
    f.detail("start-up errors", start_errors.join(" / "));
    f.detail(
        "tmpfs",
        format!(
            "{} MiB free before filling, {} MiB filled",
            free_before >> 20,
            filled >> 20
        ),
    );
    f.detail(
        "while full (phase 1): /readyz, worker alive, delivered metric",
        format!(
            "{ready_full:?} {:?}, {alive_full}, {delivered_metric_full}",
            readyz_full.trim()
        ),
    );
    f.detail(
        "while full (phase 2): /readyz; extra batches until a store write failed",
        format!("{ready_full2:?}; {extra_batches}"),
    );
    f.detail(
        "audit after kill -9 while full",
        format!(
            "{acked} jobs acked, {} of them without a store record; {} unacked back in the queue",
            acked_without_record.len(),
            unacked.len()
        ),
    );
    f.detail(
        "kinds",
        plan.kinds_text(),
    );

    f.check(
        "unwritable data dir: one clear line naming BLINGER_WORKER_DATA_DIR, non-zero exit",
        clear_errors == error_cases,
        format!("{clear_errors} of {error_cases}"),
    );
    f.detail(
        "starts while the disk was still full",
        full_starts
            .iter()
            .map(|(ok, text, took)| {
                format!(
                    "exit {} in {} ({} lines), last: {}",
                    if *ok { "0" } else { "≠0" },
                    secs(*took),
                    text.lines().count(),
                    text.lines().last().unwrap_or("")
                )
            })
            .collect::<Vec<_>>()
            .join(" / "),
    );
    f.check(
        "the store opens after starts on a full disk",
        true,
        "opened, audit done",
    );
    f.check(
        "no job acked without its durable record",
        acked_without_record.is_empty(),
        format!("{} of {acked}", acked_without_record.len()),
    );
    f.check(
        "not ready while the disk is full",
        ready_full == Some(503) && ready_full2 == Some(503),
        format!("{ready_full:?} {}", readyz_full.trim()),
    );
    f.check(
        "worker stays up while the disk is full",
        alive_full,
        alive_full,
    );
    f.check(
        "recovers by itself when space is freed",
        recovered_by_itself,
        format!("ready again: {ready_again:?}, delivered metric {delivered_metric_after}"),
    );
    f.check("no job lost", a.lost.is_empty(), a.lost.len());
    f.check(
        "no message created twice",
        a.created_twice == 0,
        a.created_twice,
    );
    f.check_no_dead_letters(&out.dead);
    f.check_exits("exit 0 at the end", &[exit]);
    finish(world, f, started).await
}
