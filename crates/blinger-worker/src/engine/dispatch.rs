//! The dispatcher: per-conversation lanes over a bounded pool of concurrent jobs.
//!
//! Messages arrive in the order the broker delivers them. Each conversation gets a lane (a FIFO
//! of its jobs) worked by one task at a time, so jobs of one conversation are sent in the order
//! they were consumed; lanes of different conversations run concurrently, at most `concurrency`
//! jobs at once (a fair semaphore, taken per job, so a busy or retrying conversation holds one
//! slot at most and never holds up the others; jobs waiting for a keyless permit, see
//! [`Pipeline::keyless`], hold no slot). Invalid messages need no order: they are
//! dead-lettered straight away.
//!
//! What waits in a lane is unacked and counts against the prefetch (in partitioned mode, its
//! partition consumer's prefetch: the counts are kept per [`SessionLink::group`]): a job arriving for a
//! conversation (or of a keyless kind) that holds its share of the prefetch makes it give up one
//! job not yet started, deferred round a delay tier ([`crate::engine::fair`]), so one
//! conversation cannot keep the others' jobs from arriving.
//!
//! The worker's slots open in steps at start ([`Dispatcher::with_slow_start`]): a worker that
//! starts on a backlog would otherwise begin `concurrency` calls at once, each opening a
//! connection, and the HTTP pool keeps the connections still being opened when the first calls
//! finish, as extras (measured in docs/performance.md: 750–970 connections for 512 slots, ~30 KiB
//! each; at Blinger, as many TLS handshakes at once).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::message::Delivery;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, SemaphorePermit};
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::contract::job;
use crate::contract::trail::{Found, Trail};
use crate::engine::fair::{Admit, FairShare, Held, Member, Yield, who_yields};
use crate::engine::pipeline::{Pipeline, SessionLink, Work};
use crate::runtime::telemetry::kind_label;
use crate::store::now_ms;

pub struct Dispatcher {
    pipeline: Arc<Pipeline>,
    lanes: Mutex<Lanes>,
    permits: Arc<Semaphore>,
    tasks: TaskTracker,
    max_body_bytes: usize,
    fair: FairShare,
    /// How long a lane's job takes, microseconds, a moving average (sizes deferrals).
    job_micros: AtomicU64,
}

/// Weight of the newest job in [`Dispatcher::job_micros`]: 1/16.
const JOB_TIME_WEIGHT: u64 = 16;

/// The lanes, and the deliveries held (not yet acked or handed back) per fair-share group.
#[derive(Default)]
struct Lanes {
    lanes: HashMap<String, Lane>,
    groups: HashMap<u16, Count>,
}

/// Deliveries held of one fair-share group ([`SessionLink::group`]: one partition, or the whole
/// work queue), each group sharing its own prefetch.
#[derive(Default)]
struct Count {
    total: usize,
    keyless: usize,
}

impl Lanes {
    fn group(&mut self, group: u16) -> &mut Count {
        self.groups.entry(group).or_default()
    }
}

/// One conversation's jobs: waiting ones, and `held` = those plus the running one. A
/// conversation's deliveries all come from one group.
struct Lane {
    waiting: VecDeque<Work>,
    held: usize,
    group: u16,
}

impl Lane {
    /// Puts `work` among the waiting jobs, in sequence order.
    fn insert(&mut self, work: Work) {
        let at = self
            .waiting
            .iter()
            .position(|w| w.seq > work.seq)
            .unwrap_or(self.waiting.len());
        self.waiting.insert(at, work);
    }
}

fn is_keyless(work: &Work) -> bool {
    work.job
        .as_ref()
        .is_ok_and(|job| !job.kind().carries_uuid())
}

/// Slots opened at once by [`Dispatcher::with_slow_start`], and then at each step.
const SLOW_START_STEP: usize = 32;
/// Time between two steps: 512 slots are open after 375 ms.
const SLOW_START_EVERY: Duration = Duration::from_millis(25);

impl Dispatcher {
    /// A dispatcher with all `concurrency` slots open.
    pub fn new(
        pipeline: Arc<Pipeline>,
        concurrency: usize,
        max_body_bytes: usize,
        fair: FairShare,
    ) -> Arc<Self> {
        Self::with_slots(
            pipeline,
            Arc::new(Semaphore::new(concurrency)),
            max_body_bytes,
            fair,
        )
    }

    /// A dispatcher whose `concurrency` slots open [`SLOW_START_STEP`] at a time (see the module
    /// docs). Call within the runtime.
    pub fn with_slow_start(
        pipeline: Arc<Pipeline>,
        concurrency: usize,
        max_body_bytes: usize,
        fair: FairShare,
    ) -> Arc<Self> {
        Self::with_slots(pipeline, slowly_opening(concurrency), max_body_bytes, fair)
    }

    fn with_slots(
        pipeline: Arc<Pipeline>,
        permits: Arc<Semaphore>,
        max_body_bytes: usize,
        fair: FairShare,
    ) -> Arc<Self> {
        Arc::new(Dispatcher {
            pipeline,
            lanes: Mutex::new(Lanes::default()),
            permits,
            tasks: TaskTracker::new(),
            max_body_bytes,
            fair,
            job_micros: AtomicU64::new(0),
        })
    }

    /// Takes one delivery. Never blocks: the prefetch limit bounds what can be waiting.
    pub fn submit(self: &Arc<Self>, delivery: Delivery, session: &Arc<SessionLink>) {
        session.outbox.received(delivery.delivery_tag);
        let job = job::decode(&delivery.data, self.max_body_bytes);
        let (trail, found) = Trail::decode(
            &delivery.properties,
            &delivery.data,
            self.pipeline.trail_key(),
        );
        if found == Found::Ignored {
            warn!(
                id = job.as_ref().map(|j| j.id.to_string()).unwrap_or_default(),
                "ignoring x-blinger-* headers the worker did not write (a publisher's, or sealed \
                 with another BLINGER_WORKER_TRAIL_KEY)"
            );
        }
        let seq = match &job {
            Ok(job) => {
                let seq = self.pipeline.arrived(job, &trail);
                debug!(id = %job.id, seq, chain = ?trail.chain, redelivered = delivery.redelivered, "arrived");
                seq
            }
            Err(_) => 0,
        };
        let work = Work {
            delivery,
            session: session.clone(),
            job,
            trail,
            seq,
            received_ms: now_ms(),
        };
        self.pipeline
            .metrics()
            .jobs_received
            .with_label_values(&[kind_label(work.kind())])
            .inc();
        let keyless = is_keyless(&work);
        let mut lanes = self.lanes.lock().expect("lanes lock");
        let conversation = match &work.job {
            Ok(job) => job.conversation_id.clone(),
            Err(_) => {
                let group = session.group;
                lanes.group(group).total += 1;
                drop(lanes);
                let this = self.clone();
                self.tasks.spawn(async move {
                    {
                        let _permit = this
                            .permits
                            .acquire()
                            .await
                            .expect("semaphore never closed");
                        Box::pin(this.pipeline.process(work, None)).await;
                    }
                    this.lanes.lock().expect("lanes lock").group(group).total -= 1;
                });
                return;
            }
        };
        let group = session.group;
        let conversation_held = lanes.lanes.get(&conversation).map_or(0, |lane| lane.held);
        let count = lanes.group(group);
        let held = Held {
            total: count.total,
            conversation: conversation_held,
            keyless: count.keyless,
        };
        count.total += 1;
        count.keyless += usize::from(keyless);
        let per_job = Duration::from_micros(self.job_micros.load(Ordering::Relaxed));
        // Not while paused: nothing flows then, and deferred jobs would only go round.
        if self.fair.admit(held, keyless) == Admit::Defer && !self.pipeline.is_paused() {
            // One job of the conversation not yet started leaves: the arriving one, or the
            // youngest waiting in its lane, whose place the arriving one takes (`who_yields`).
            let leaving = match lanes.lanes.get_mut(&conversation) {
                Some(lane)
                    if who_yields(
                        Member {
                            seq: work.seq,
                            keyless,
                        },
                        lane.waiting.back().map(|w| Member {
                            seq: w.seq,
                            keyless: is_keyless(w),
                        }),
                    ) == Yield::Youngest =>
                {
                    let youngest = lane.waiting.pop_back().expect("a youngest job waits");
                    lane.insert(work);
                    youngest
                }
                _ => work,
            };
            self.defer(lanes, conversation, leaving, held.conversation, per_job);
            return;
        }
        drop(lanes);
        self.enqueue(conversation, work);
    }

    /// Sends `work` round a tier (see [`crate::engine::fair`]); it counts as held until acked.
    /// If it cannot be, it waits in its lane after all. `lanes` is held until its chain records
    /// it, so no younger job of its conversation is routed before.
    fn defer(
        self: &Arc<Self>,
        lanes: std::sync::MutexGuard<'_, Lanes>,
        conversation: String,
        work: Work,
        waiting: usize,
        per_job: Duration,
    ) {
        let Some(tier) = self.pipeline.defer(&work, waiting, per_job) else {
            drop(lanes);
            self.enqueue(conversation, work);
            return;
        };
        drop(lanes);
        let this = self.clone();
        self.tasks.spawn(async move {
            if this.pipeline.park_deferred(&work, tier).await {
                let mut lanes = this.lanes.lock().expect("lanes lock");
                let count = lanes.group(work.session.group);
                count.total -= 1;
                count.keyless -= usize::from(is_keyless(&work));
            } else {
                // Not sent round: it waits in its lane after all (still in the chain, so
                // nothing younger overtook it).
                this.enqueue(conversation, work);
            }
        });
    }

    /// Puts a job into its conversation's lane, in sequence order, starting the lane if idle.
    fn enqueue(self: &Arc<Self>, conversation: String, work: Work) {
        {
            let mut lanes = self.lanes.lock().expect("lanes lock");
            if let Some(lane) = lanes.lanes.get_mut(&conversation) {
                lane.insert(work);
                lane.held += 1;
                return;
            }
            let group = work.session.group;
            lanes.lanes.insert(
                conversation.clone(),
                Lane {
                    waiting: VecDeque::from([work]),
                    held: 1,
                    group,
                },
            );
        }
        let this = self.clone();
        self.tasks
            .spawn(async move { this.run_lane(conversation).await });
    }

    /// The lane's next job; `finished` tells whether the last one was keyless (it is no longer
    /// held). Ends the lane when it is empty.
    fn next_of(&self, conversation: &str, finished: Option<bool>) -> Option<Work> {
        let mut guard = self.lanes.lock().expect("lanes lock");
        let lanes = &mut *guard;
        let lane = lanes
            .lanes
            .get_mut(conversation)
            .expect("a running lane exists");
        if let Some(keyless) = finished {
            lane.held -= 1;
            let count = lanes.groups.entry(lane.group).or_default();
            count.total -= 1;
            count.keyless -= usize::from(keyless);
        }
        let next = lane.waiting.pop_front();
        if next.is_none() {
            lanes.lanes.remove(conversation);
        }
        next
    }

    async fn run_lane(self: Arc<Self>, conversation: String) {
        let mut next = self.next_of(&conversation, None);
        while let Some(work) = next {
            let was_keyless = is_keyless(&work);
            {
                let (_permit, keyless) = self.slot(was_keyless).await;
                // Boxed: a job's future is kilobytes (the HTTP call's state), and a lane waiting
                // for a slot should not carry one; only the jobs running at once do.
                let started = tokio::time::Instant::now();
                Box::pin(self.pipeline.process(work, keyless)).await;
                let took = started.elapsed().as_micros() as u64;
                let _ = self
                    .job_micros
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |avg| {
                        Some(avg - avg / JOB_TIME_WEIGHT + took / JOB_TIME_WEIGHT)
                    });
            }
            next = self.next_of(&conversation, Some(was_keyless));
        }
    }

    /// A concurrency slot, and the keyless permit when the job needs one. A keyless job waits
    /// for its permit before taking a slot, so a queue of them never holds up other
    /// conversations; and it never holds the permit while it waits for a slot: the jobs holding
    /// the slots may need the permit to go on (a job back from a backoff, or the probe of a
    /// pause, gives it up while it waits and takes it again), and a lane holding it while
    /// waiting for their slots would stop them all for good.
    async fn slot(&self, keyless: bool) -> (SemaphorePermit<'_>, Option<OwnedSemaphorePermit>) {
        let permits = self.pipeline.keyless();
        loop {
            if !keyless {
                let slot = self.permits.acquire().await.expect("never closed");
                return (slot, None);
            }
            let permit = permits.clone().acquire_owned().await.expect("never closed");
            if let Ok(slot) = self.permits.try_acquire() {
                return (slot, Some(permit));
            }
            drop(permit);
            let slot = self.permits.acquire().await.expect("never closed");
            if let Ok(permit) = permits.clone().try_acquire_owned() {
                return (slot, Some(permit));
            }
        }
    }

    /// Jobs held in lanes and not yet started, plus running ones.
    pub fn pending(&self) -> usize {
        self.lanes
            .lock()
            .expect("lanes lock")
            .lanes
            .values()
            .map(|lane| lane.waiting.len())
            .sum::<usize>()
            + self.tasks.len()
    }

    /// Waits until every lane and task has finished. Call after consumption stopped.
    pub async fn drained(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// A semaphore of `total` permits, [`SLOW_START_STEP`] of them available at once and the rest
/// added in steps every [`SLOW_START_EVERY`].
fn slowly_opening(total: usize) -> Arc<Semaphore> {
    let first = total.min(SLOW_START_STEP);
    let permits = Arc::new(Semaphore::new(first));
    if first < total {
        let opening = permits.clone();
        tokio::spawn(async move {
            let mut open = first;
            while open < total {
                tokio::time::sleep(SLOW_START_EVERY).await;
                let more = SLOW_START_STEP.min(total - open);
                opening.add_permits(more);
                open += more;
            }
        });
    }
    permits
}

#[cfg(test)]
mod tests {
    use lapin::BasicProperties;
    use lapin::types::FieldTable;

    use super::*;
    use crate::broker::outbox::Sent;
    use crate::contract::trail::TrailKey;
    use crate::engine::pipeline::tests::{text, world};

    fn delivery(tag: u64, job: &serde_json::Value, trail: Option<(&Trail, &TrailKey)>) -> Delivery {
        let data = job.to_string().into_bytes();
        let mut d = Delivery::mock(tag, "".into(), "send-text".into(), false, data);
        if let Some((trail, key)) = trail {
            let mut headers = FieldTable::default();
            for (k, v) in trail.headers(&d.data, key) {
                headers.insert(k.into(), v);
            }
            d.properties = BasicProperties::default().with_headers(headers);
        }
        d
    }

    /// A deferred job back from its tier, older than the jobs its lane took in meanwhile, is not
    /// deferred again: the youngest job waiting leaves instead, and the returning one is sent
    /// before the rest. Before, the returning job went round again, and the jobs waiting, which
    /// cannot be sent before it, followed it round the tier one by one (a 1,000-job conversation
    /// drained in 111–248 s instead of 45 s, tests/fairness.rs).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_job_back_from_its_tier_takes_the_place_of_the_youngest_one_waiting() {
        let w = world().await;
        // Calls long enough that none ends while the seven jobs are submitted (microseconds).
        w.sandbox.update(|c| c.latency_ms = 500);
        // Prefetch 8, share 2: from 6 deliveries held, a conversation holding 2 gives one up.
        let dispatcher = Dispatcher::new(w.pipeline.clone(), 4, 256 * 1024, FairShare::new(8, 2));
        let job = |t: &str| {
            let mut job = text("big");
            job["text"] = t.into();
            job
        };
        // Its sequence is older than those of the jobs arriving after it (they start from the
        // clock and grow); it comes back sealed with it, as from a tier.
        let back = job("back");
        let decoded = crate::contract::job::decode(back.to_string().as_bytes(), 1 << 20).unwrap();
        let seq = w.pipeline.arrived(&decoded, &Trail::default());
        for i in 1..=6u64 {
            dispatcher.submit(delivery(i, &job(&i.to_string()), None), &w.session);
        }
        let trail = Trail {
            chain: Some(seq),
            ..Trail::default()
        };
        let key = w.pipeline.trail_key().clone();
        dispatcher.submit(delivery(7, &back, Some((&trail, &key))), &w.session);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while w.sandbox.requests().len() < 6 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut requests = w.sandbox.requests();
        requests.sort_by_key(|r| r.seq);
        let sent: Vec<String> = requests
            .iter()
            .map(|r| r.body["text"].as_str().unwrap_or_default().to_owned())
            .collect();
        let deferred: Vec<String> = w
            .outbox
            .sent()
            .into_iter()
            .filter_map(|s| match s {
                Sent::Republish { body, .. } => {
                    let job: serde_json::Value = serde_json::from_slice(&body).unwrap();
                    Some(job["text"].as_str().unwrap_or_default().to_owned())
                }
                _ => None,
            })
            .collect();
        assert_eq!(
            deferred,
            ["6"],
            "the youngest waiting job is deferred; sent {sent:?}"
        );
        // "1" may have started before "back" arrived; the rest wait for "back".
        assert!(
            sent == ["1", "back", "2", "3", "4", "5"] || sent == ["back", "1", "2", "3", "4", "5"],
            "sent {sent:?}"
        );
        dispatcher.drained().await;
    }

    #[tokio::test(start_paused = true)]
    async fn slots_open_in_steps_up_to_the_concurrency() {
        let permits = slowly_opening(100);
        assert_eq!(permits.available_permits(), 32);
        let mut seen = vec![permits.available_permits()];
        for _ in 0..6 {
            tokio::time::sleep(SLOW_START_EVERY).await;
            tokio::task::yield_now().await;
            seen.push(permits.available_permits());
        }
        assert_eq!(seen, [32, 64, 96, 100, 100, 100, 100]);
    }

    #[tokio::test]
    async fn a_small_concurrency_is_open_at_once() {
        assert_eq!(slowly_opening(8).available_permits(), 8);
        assert_eq!(slowly_opening(32).available_permits(), 32);
    }
}
