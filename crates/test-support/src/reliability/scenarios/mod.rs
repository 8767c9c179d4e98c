//! The ten scenarios of issue 3, the three of issue 11 (11 to 13), the first of issue 14 (14), and what they share: following delivery progress, and
//! concluding a run (dead-letter queue, store, analysis).

/// Calls `$then!` with every scenario's name, in the order the full profile runs them. The one
/// list of scenarios: it declares their modules, [`NAMES`] and [`run`] here, and the tests of
/// `crates/blinger-worker/tests/reliability.rs`.
#[macro_export]
macro_rules! for_each_scenario {
    ($then:ident) => {
        $then!(
            crash,
            broker_restart,
            chaos,
            blinger_down,
            hostile,
            path_injection,
            wrong_token,
            secrets,
            disk,
            shutdown,
            probe_expiry,
            forbidden_conversation,
            huge_conversation,
            replicas
        );
    };
}

macro_rules! index {
    ($($name:ident),*) => {
        $(pub mod $name;)*

        /// Every scenario's name, in running order (`--only` takes these).
        pub const NAMES: &[&str] = &[$(stringify!($name)),*];

        /// Runs the scenario called `name`; `None` if there is no such scenario.
        pub async fn run(name: &str, ctx: &Ctx) -> Option<Figures> {
            match name {
                $(stringify!($name) => Some($name::run(ctx).await),)*
                _ => None,
            }
        }
    };
}

for_each_scenario!(index);

use std::collections::HashSet;
use std::time::{Duration, Instant, SystemTime};

use blinger_sandbox::{Endpoint, Sandbox};
use blinger_worker::contract::job::Kind;
use uuid::Uuid;

use super::Ctx;
use super::harness::{DeadLetter, World};
use super::jobs::{Analysis, Plan};
use super::report::Figures;
pub use super::report::dead_summary;

/// Which jobs must reach the sandbox.
#[derive(Debug, Clone, Default)]
pub struct Expect {
    /// text/file uuids and assign-agent agent ids.
    pub ids: HashSet<String>,
    /// request-review jobs (their calls carry no id).
    pub reviews: usize,
}

impl Expect {
    pub fn of(plan: &Plan, except: &HashSet<Uuid>) -> Expect {
        let mut e = Expect::default();
        for j in plan.jobs.iter().filter(|j| !except.contains(&j.id)) {
            match j.kind {
                Kind::SendText | Kind::SendFile => {
                    e.ids.insert(j.id.to_string());
                }
                Kind::AssignAgent => {
                    e.ids.insert(format!("agent-{}", j.id));
                }
                Kind::RequestReview => e.reviews += 1,
            }
        }
        e
    }

    pub fn total(&self) -> usize {
        self.ids.len() + self.reviews
    }
}

/// Follows the sandbox's records incrementally (cheap to poll during a 20,000-job run).
#[derive(Debug, Default)]
pub struct Progress {
    last_seq: u64,
    ids: HashSet<String>,
    reviews: usize,
    /// Accepted (200) requests seen, duplicates included.
    pub accepted: usize,
    /// All API requests seen.
    pub requests: usize,
    pub last_accept: Option<Instant>,
}

impl Progress {
    pub fn poll(&mut self, sandbox: &Sandbox) {
        for r in sandbox.requests_since(self.last_seq) {
            self.last_seq = r.seq;
            self.requests += 1;
            if r.status != 200 {
                continue;
            }
            self.accepted += 1;
            self.last_accept = Some(Instant::now());
            match r.endpoint {
                Endpoint::RequestReview => self.reviews += 1,
                Endpoint::AssignAgent => {
                    if let Some(a) = r.agent_id {
                        self.ids.insert(a);
                    }
                }
                _ => {
                    if let Some(u) = r.uuid {
                        self.ids.insert(u);
                    }
                }
            }
        }
    }

    /// Expected jobs seen accepted so far (request-reviews by count).
    pub fn delivered(&self, expect: &Expect) -> usize {
        expect.ids.iter().filter(|i| self.ids.contains(*i)).count()
            + self.reviews.min(expect.reviews)
    }

    pub fn done(&self, expect: &Expect) -> bool {
        self.delivered(expect) >= expect.total()
    }

    /// Polls until every expected job was accepted or `timeout` passes; time taken if done.
    pub async fn wait_all(
        &mut self,
        sandbox: &Sandbox,
        expect: &Expect,
        timeout: Duration,
    ) -> Option<Duration> {
        let started = Instant::now();
        loop {
            self.poll(sandbox);
            if self.done(expect) {
                return Some(started.elapsed());
            }
            if started.elapsed() >= timeout {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Waits until no one of `workers` holds a job and the work queue and tiers (and in partitioned
/// mode the router input and the partitions) have nothing ready, on two samples 200 ms apart (or
/// `timeout` passes). [`Progress::done`] counts request-review jobs by accepted calls, and a kill
/// repeats some of those calls: the count can be reached while one review job is still queued,
/// and stopping the worker then would leave it undelivered.
pub async fn wait_settled(
    world: &World,
    workers: &[&super::harness::WorkerProc],
    timeout: Duration,
) {
    let started = Instant::now();
    let mut quiet = 0;
    while quiet < 2 && started.elapsed() < timeout {
        let mut holding = false;
        for worker in workers {
            let in_flight = worker.metric("blinger_worker_jobs_in_flight", &[]).await;
            holding |= in_flight != Some(0.0);
        }
        let settled = !holding && world.backlog().await == 0;
        quiet = if settled { quiet + 1 } else { 0 };
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `/healthz` and `blinger_worker_paused` sampled during a run, for what the scenario cannot
/// ask the worker afterwards: did it ever say it was unhealthy, how long did a pause last.
#[derive(Debug, Default)]
pub struct Samples {
    /// `/healthz` statuses (`None`: no answer).
    pub healthz: Vec<Option<u16>>,
    /// When, and whether the paused gauge was 1 (`None`: no answer).
    pub paused: Vec<(Instant, Option<bool>)>,
}

impl Samples {
    /// One sample of each.
    pub async fn take(&mut self, worker: &super::harness::WorkerProc) {
        self.healthz.push(worker.healthz().await);
        let paused = worker
            .metric("blinger_worker_paused", &[])
            .await
            .map(|v| v == 1.0);
        self.paused.push((Instant::now(), paused));
    }

    /// `/healthz` samples that were not 200.
    pub fn unhealthy(&self) -> usize {
        self.healthz.iter().filter(|s| **s != Some(200)).count()
    }

    /// Each stretch of paused samples: from its first paused sample to the first sample after
    /// it that was not paused (or the last sample, if the run ended paused).
    pub fn paused_stretches(&self) -> Vec<Duration> {
        let mut out = Vec::new();
        let mut since: Option<Instant> = None;
        for (at, paused) in &self.paused {
            match (paused, since) {
                (Some(true), None) => since = Some(*at),
                (Some(false), Some(s)) => {
                    out.push(at.duration_since(s));
                    since = None;
                }
                _ => {}
            }
        }
        if let (Some(s), Some((last, _))) = (since, self.paused.last()) {
            out.push(last.duration_since(s));
        }
        out
    }

    /// The time between two samples: the resolution of the stretches.
    pub fn mean_interval(&self) -> Duration {
        match (self.paused.first(), self.paused.last()) {
            (Some((a, _)), Some((b, _))) if self.paused.len() > 1 => {
                b.duration_since(*a) / (self.paused.len() as u32 - 1)
            }
            _ => Duration::ZERO,
        }
    }
}

/// What a finished run left behind.
pub struct Outcome {
    pub analysis: Analysis,
    pub dead: Vec<DeadLetter>,
    /// Messages still ready in the work queue and the delay tiers.
    pub backlog: u32,
}

/// Ends a scenario: deletes its world (queues, exchanges, the sandbox) and stamps the time it
/// took since `started`.
pub async fn finish(world: World, mut f: Figures, started: Instant) -> Figures {
    world.cleanup().await;
    f.set_elapsed(started.elapsed());
    f
}

/// After the last worker exited: takes the dead letters, reads the store, analyses the records.
pub async fn conclude(world: &World, plan: &Plan, boundaries: &[SystemTime]) -> Outcome {
    let backlog = world.backlog().await;
    let dead = world.take_dead_letters().await;
    let dead_ids: HashSet<Uuid> = dead.iter().filter_map(|d| d.job_id()).collect();
    let store = world.open_store().await;
    let records = world.sandbox.requests();
    let analysis = Analysis::of(plan, &records, Some(&store), &dead_ids, boundaries);
    let _ = store.close().await;
    Outcome {
        analysis,
        dead,
        backlog,
    }
}

/// Arrival time of a recorded request.
pub fn arrival(ts: &str) -> Option<SystemTime> {
    let t = time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_nanos(t.unix_timestamp_nanos() as u64))
}

/// Mean and max of durations, "mean 1.2 s, max 3.4 s".
pub fn mean_max(ds: &[Duration]) -> String {
    if ds.is_empty() {
        return "-".into();
    }
    let sum: Duration = ds.iter().sum();
    let max = ds.iter().max().unwrap();
    format!(
        "mean {:.2} s, max {:.2} s",
        sum.as_secs_f64() / ds.len() as f64,
        max.as_secs_f64()
    )
}

/// The largest number of requests whose arrival falls within any window of length `window`
/// (sliding, not aligned to buckets), from the sandbox's arrival timestamps (millisecond
/// resolution).
pub fn max_in_window(records: &[blinger_sandbox::RecordedRequest], window: Duration) -> usize {
    peak_window(records, window).0
}

/// The most requests that arrived within any `window`, and when that window began.
pub fn peak_window(
    records: &[blinger_sandbox::RecordedRequest],
    window: Duration,
) -> (usize, Option<SystemTime>) {
    let at: Vec<SystemTime> = records.iter().filter_map(|r| arrival(&r.ts)).collect();
    crate::most_within(&at, window, |a, b| b.duration_since(a).unwrap_or_default())
}
