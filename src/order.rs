//! Per-conversation order across delay tiers.
//!
//! The dispatcher keeps a conversation's jobs in order while they are in this process. A job that
//! is parked in a delay tier leaves the process, and the jobs behind it must not overtake it. So
//! every job gets a sequence number when it arrives (a member coming back keeps the one in its
//! sealed `x-blinger-chain` header), and a conversation with jobs out in the tiers has a *chain*:
//! the sequence numbers of its members out. A job is sent only if no member with a smaller
//! sequence is out; otherwise it follows them into a tier (and goes round again if it comes
//! back too early). Jobs leave for a tier after failures (parked), to follow older members, or
//! deferred because their conversation holds its share of the prefetch ([`crate::fair`]): a
//! deferred job is younger than the jobs of its conversation still waiting, which are sent
//! before it. Sequence numbers grow across restarts (they start from the clock), so members
//! from an earlier run count as older.
//!
//! A job handed back to the broker (its session lost, or a republish that failed) stays in the
//! chain until it is redelivered, with the same sequence: a younger member coming back from a
//! tier meanwhile cannot overtake it.
//!
//! Across restarts: every change of a conversation's chain is written to a [`Journal`] (the
//! store), in order, and the worker acks a job it sent out only once that is durable; a new
//! process starts from the chains written. A job redelivered without a sequence (it was in the
//! process when it stopped, and never left for a tier) is older than every member out: it was
//! consumed before them (a job consumed after a member went out joins the chain at once, see
//! [`Chains::route`]), so it gets a sequence below every one the worker hands out otherwise.
//!
//! Limits: a member that never comes back (its tier purged, a redelivery taken by another
//! consumer) is forgotten after its expected return plus a margin, so one lost message cannot
//! block its conversation forever. A job redelivered after a crash that hit while its own
//! republish as a follower was in flight (milliseconds) counts as older than the members it was
//! following.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;
use uuid::Uuid;

/// A member not back this long after its expected return is considered lost.
const LOST_AFTER: Duration = Duration::from_secs(120);

/// What to do with a job before sending it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Nothing older is out: send it.
    Send,
    /// Older members are out: republish to `tier` with chain sequence `seq`.
    Follow { seq: u64, tier: usize },
}

pub struct Chains {
    chains: Mutex<HashMap<String, BTreeMap<u64, Instant>>>,
    /// Sequences of jobs handed back to the broker, by job id, until they are redelivered.
    handed_back: Mutex<HashMap<Uuid, (u64, Instant)>>,
    next_seq: AtomicU64,
    /// Sequences of jobs redelivered without one: below [`OLD_SEQ_END`], so below every
    /// sequence from the clock.
    old_seq: AtomicU64,
    tiers: Vec<Duration>,
    journal: Option<Box<dyn Journal>>,
}

/// Where chains outlive the process: given a conversation's members out as (sequence, expected
/// return in Unix ms), empty when it has none. Called under the chains lock, so writes land in
/// the order the chains changed.
pub trait Journal: Send + Sync {
    fn write(&self, conversation: &str, members: &[(u64, u64)]);
}

/// Sequences below this are for jobs redelivered without one; the clock's (microseconds since
/// 1970) are far above it.
const OLD_SEQ_END: u64 = 1 << 50;

/// Handed-back entries kept before expired ones are swept.
const HANDED_BACK_SWEEP: usize = 1024;

impl Chains {
    pub fn new(tiers: Vec<Duration>) -> Chains {
        let start = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0)
            .max(OLD_SEQ_END);
        Chains {
            chains: Mutex::new(HashMap::new()),
            handed_back: Mutex::new(HashMap::new()),
            next_seq: AtomicU64::new(start),
            old_seq: AtomicU64::new(1),
            tiers,
            journal: None,
        }
    }

    /// Chains kept in `journal`, starting from what it held (`restored`, as written to it).
    pub fn with_journal(
        tiers: Vec<Duration>,
        journal: Box<dyn Journal>,
        restored: Vec<(String, Vec<(u64, u64)>)>,
    ) -> Chains {
        let mut chains = Chains::new(tiers);
        let now = Instant::now();
        let now_ms = unix_ms();
        let mut map = HashMap::new();
        for (conversation, members) in restored {
            let out: BTreeMap<u64, Instant> = members
                .into_iter()
                .filter(|(_, back_ms)| back_ms + LOST_AFTER.as_millis() as u64 > now_ms)
                .map(|(seq, back_ms)| (seq, instant_of(back_ms, now, now_ms)))
                .collect();
            for &seq in out.keys() {
                // Never hand out a sequence at or below one restored (a clock that went back).
                let counter = if seq < OLD_SEQ_END {
                    &chains.old_seq
                } else {
                    &chains.next_seq
                };
                counter.fetch_max(seq + 1, Ordering::Relaxed);
            }
            if !out.is_empty() {
                map.insert(conversation, out);
            }
        }
        chains.chains = Mutex::new(map);
        chains.journal = Some(journal);
        chains
    }

    /// The sequence of an arriving job: the one in its sealed header (a member coming back),
    /// the one it had when it was handed back, one older than every member out if it is
    /// `redelivered` without either (see the module docs), or a new one (younger than every job
    /// so far).
    pub fn arrived(&self, id: Option<Uuid>, header: Option<u64>, redelivered: bool) -> u64 {
        let remembered = id.and_then(|id| {
            self.handed_back
                .lock()
                .expect("chains lock")
                .remove(&id)
                .map(|(seq, _)| seq)
        });
        header.or(remembered).unwrap_or_else(|| {
            if redelivered {
                self.old_seq.fetch_add(1, Ordering::Relaxed)
            } else {
                self.new_seq()
            }
        })
    }

    /// Writes `conversation`'s chain to the journal (under the chains lock).
    fn save(&self, conversation: &str, out: Option<&BTreeMap<u64, Instant>>, now: Instant) {
        let Some(journal) = &self.journal else { return };
        let now_ms = unix_ms();
        let members: Vec<(u64, u64)> = out
            .into_iter()
            .flatten()
            .map(|(seq, back)| (*seq, unix_ms_of(*back, now, now_ms)))
            .collect();
        journal.write(conversation, &members);
    }

    /// Routes job `seq` of `conversation` before sending it.
    pub fn route(&self, conversation: &str, seq: u64, now: Instant) -> Route {
        let mut chains = self.chains.lock().expect("chains lock");
        let Some(out) = chains.get_mut(conversation) else {
            return Route::Send;
        };
        let before = out.len();
        out.retain(|_, back| *back + LOST_AFTER > now);
        let was_out = out.remove(&seq).is_some();
        if out.range(..seq).next().is_none() {
            if out.is_empty() {
                chains.remove(conversation);
                self.save(conversation, None, now);
            } else if was_out || out.len() != before {
                self.save(conversation, Some(out), now);
            }
            return Route::Send;
        }
        let tier = self.follow_tier(out, seq, now);
        out.insert(seq, now + self.tiers[tier]);
        self.save(conversation, Some(out), now);
        Route::Follow { seq, tier }
    }

    /// Records that job `seq` leaves for a tier without being sent, deferred (see
    /// [`crate::fair`]); returns the tier. Call before any younger job of the conversation is
    /// routed, so that those follow it. `waiting` jobs of the conversation are in the worker,
    /// and each takes about `per_job`: the tier is the shortest that ends after every member
    /// out and after the jobs ahead of this one (those waiting and the older members out)
    /// could be sent, so that a long backlog goes round a few times, not once per tier round.
    pub fn defer(
        &self,
        conversation: &str,
        seq: u64,
        now: Instant,
        waiting: usize,
        per_job: Duration,
    ) -> usize {
        let mut chains = self.chains.lock().expect("chains lock");
        let out = chains.entry(conversation.to_owned()).or_default();
        out.retain(|_, back| *back + LOST_AFTER > now);
        let ahead = waiting + out.range(..seq).count();
        let wait = per_job.saturating_mul(u32::try_from(ahead).unwrap_or(u32::MAX));
        let long_enough = self
            .tiers
            .iter()
            .position(|d| *d >= wait)
            .unwrap_or(self.tiers.len() - 1);
        let tier = self.follow_tier(out, seq, now).max(long_enough);
        out.insert(seq, now + self.tiers[tier]);
        self.save(conversation, Some(out), now);
        tier
    }

    /// The shortest tier that ends after every member out older than `seq`. Younger members
    /// may come back first: they see this one out and follow it. Not waiting for them keeps a
    /// chain's members coming back in sequence order, so each round sends many, not one.
    fn follow_tier(&self, out: &BTreeMap<u64, Instant>, seq: u64, now: Instant) -> usize {
        let latest = out.range(..seq).map(|(_, back)| *back).max().unwrap_or(now);
        self.tiers
            .iter()
            .position(|d| now + *d >= latest)
            .unwrap_or(self.tiers.len() - 1)
    }

    /// Records that job `seq` left for `tier` after failing.
    pub fn parked(&self, conversation: &str, seq: u64, tier: usize, now: Instant) {
        let mut chains = self.chains.lock().expect("chains lock");
        let out = chains.entry(conversation.to_owned()).or_default();
        out.insert(seq, now + self.tiers[tier]);
        self.save(conversation, Some(out), now);
    }

    /// Records that job `id` (`seq`) was handed back to the broker: it counts as out until it is
    /// redelivered ([`Chains::arrived`] gives it its sequence again) or for [`LOST_AFTER`].
    pub fn handed_back(&self, conversation: &str, id: Uuid, seq: u64, now: Instant) {
        {
            let mut chains = self.chains.lock().expect("chains lock");
            let out = chains.entry(conversation.to_owned()).or_default();
            out.insert(seq, now);
            self.save(conversation, Some(out), now);
        }
        let mut handed_back = self.handed_back.lock().expect("chains lock");
        if handed_back.len() >= HANDED_BACK_SWEEP {
            handed_back.retain(|_, (_, at)| *at + LOST_AFTER > now);
        }
        handed_back.insert(id, (seq, now));
    }

    /// Job `seq` of `conversation` is not out: it came back and left in another way than being
    /// sent or parked (a duplicate, expired, a conflict). Without this, a member that is not out
    /// would hold up its conversation, or stay in memory for good.
    pub fn leave(&self, conversation: &str, seq: u64) {
        let mut chains = self.chains.lock().expect("chains lock");
        if let Some(out) = chains.get_mut(conversation)
            && out.remove(&seq).is_some()
        {
            if out.is_empty() {
                chains.remove(conversation);
                self.save(conversation, None, Instant::now());
            } else {
                self.save(conversation, Some(out), Instant::now());
            }
        }
    }

    fn new_seq(&self) -> u64 {
        self.next_seq.fetch_add(1, Ordering::Relaxed)
    }

    /// Conversations with members out (for tests and metrics).
    pub fn len(&self) -> usize {
        self.chains.lock().expect("chains lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `back` in Unix ms, given that `now` is `now_ms`.
fn unix_ms_of(back: Instant, now: Instant, now_ms: u64) -> u64 {
    if back >= now {
        now_ms.saturating_add((back - now).as_millis() as u64)
    } else {
        now_ms.saturating_sub((now - back).as_millis() as u64)
    }
}

/// `back_ms` as an instant, given that `now` is `now_ms`.
fn instant_of(back_ms: u64, now: Instant, now_ms: u64) -> Instant {
    if back_ms >= now_ms {
        now + Duration::from_millis(back_ms - now_ms)
    } else {
        now.checked_sub(Duration::from_millis(now_ms - back_ms))
            .unwrap_or(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::VecDeque;

    fn tiers() -> Vec<Duration> {
        vec![
            Duration::from_secs(5),
            Duration::from_secs(30),
            Duration::from_secs(120),
        ]
    }

    #[test]
    fn later_jobs_follow_and_members_wait_for_older_ones() {
        let c = Chains::new(tiers());
        let t0 = Instant::now();
        let a = c.arrived(None, None, false);
        assert_eq!(c.route("x", a, t0), Route::Send);
        c.parked("x", a, 0, t0); // A failed: out until t0+5
        let b = c.arrived(None, None, false);
        assert!(b > a);
        assert_eq!(
            c.route("x", b, t0),
            Route::Follow { seq: b, tier: 0 },
            "B must follow A into tier 0"
        );
        // A back at t0+5 and parked again, into the 30 s tier.
        let t5 = t0 + Duration::from_secs(5);
        assert_eq!(
            c.route("x", c.arrived(None, Some(a), false), t5),
            Route::Send
        );
        c.parked("x", a, 1, t5);
        // B back: A is still out, so B goes round again, into a tier that ends after A's.
        let t6 = t0 + Duration::from_secs(6);
        assert_eq!(c.route("x", b, t6), Route::Follow { seq: b, tier: 1 });
        // A new job C joins the chain too.
        let cc = c.arrived(None, None, false);
        assert!(matches!(c.route("x", cc, t6), Route::Follow { .. }));
        // A back and delivered; B back: nothing older out, sent; C back: sent.
        let t35 = t5 + Duration::from_secs(30);
        assert_eq!(c.route("x", a, t35), Route::Send);
        let t37 = t6 + Duration::from_secs(31);
        assert_eq!(c.route("x", b, t37), Route::Send);
        assert_eq!(c.route("x", cc, t37), Route::Send);
        assert!(c.is_empty());
        // Other conversations are never affected.
        c.parked("x", c.arrived(None, None, false), 0, t37);
        assert_eq!(c.route("y", c.arrived(None, None, false), t37), Route::Send);
    }

    #[test]
    fn a_deferred_job_holds_up_younger_jobs_only() {
        let c = Chains::new(tiers());
        let t0 = Instant::now();
        // A and B wait in their lane; C arrives while the conversation holds its share.
        let a = c.arrived(None, None, false);
        let b = c.arrived(None, None, false);
        let cc = c.arrived(None, None, false);
        assert_eq!(c.defer("x", cc, t0, 2, Duration::ZERO), 0);
        // A and B are older than C: sent.
        assert_eq!(c.route("x", a, t0), Route::Send);
        assert_eq!(c.route("x", b, t0), Route::Send);
        // D, younger, follows C.
        let d = c.arrived(None, None, false);
        assert_eq!(c.route("x", d, t0), Route::Follow { seq: d, tier: 0 });
        // C back: sent; then D.
        let t5 = t0 + Duration::from_secs(5);
        assert_eq!(
            c.route("x", c.arrived(None, Some(cc), false), t5),
            Route::Send
        );
        assert_eq!(
            c.route("x", c.arrived(None, Some(d), false), t5),
            Route::Send
        );
        assert!(c.is_empty());
    }

    #[test]
    fn a_long_backlog_is_deferred_for_as_long_as_it_takes_to_send_what_is_ahead() {
        let c = Chains::new(tiers());
        let t0 = Instant::now();
        let per_job = Duration::from_millis(100);
        // 40 waiting × 100 ms = 4 s: the 5 s tier.
        assert_eq!(
            c.defer("x", c.arrived(None, None, false), t0, 40, per_job),
            0
        );
        // 40 waiting and 1 out ahead, then 2, ...: past 50 jobs ahead, the 30 s tier.
        let tiers: Vec<usize> = (0..20)
            .map(|_| c.defer("x", c.arrived(None, None, false), t0, 40, per_job))
            .collect();
        assert_eq!(tiers[..10], [0; 10]);
        assert!(tiers[10..].iter().all(|&t| t == 1), "{tiers:?}");
        // Never shorter than the members out ahead: 2 waiting, but the 30 s tier.
        assert_eq!(
            c.defer("x", c.arrived(None, None, false), t0, 2, per_job),
            1
        );
        // A 5,000-job backlog goes to the longest tier.
        assert_eq!(
            c.defer("y", c.arrived(None, None, false), t0, 5000, per_job),
            2
        );
    }

    #[test]
    fn a_handed_back_job_keeps_its_place_until_it_is_redelivered() {
        let c = Chains::new(tiers());
        let t0 = Instant::now();
        let id = Uuid::new_v4();
        let a = c.arrived(Some(id), None, false);
        let b = c.arrived(None, None, false);
        assert_eq!(c.defer("x", b, t0, 1, Duration::ZERO), 0);
        // A's session is lost before A is sent: B comes back first, and must wait for A.
        c.handed_back("x", id, a, t0);
        let t5 = t0 + Duration::from_secs(5);
        assert!(matches!(c.route("x", b, t5), Route::Follow { .. }));
        // A redelivered (no header): same sequence, sent; then B.
        assert_eq!(c.arrived(Some(id), None, false), a);
        assert_eq!(c.route("x", a, t5), Route::Send);
        assert_eq!(c.route("x", b, t5 + Duration::from_secs(30)), Route::Send);
        assert!(c.is_empty());
        // The memory is gone once used.
        assert!(c.arrived(Some(id), None, false) > b);
    }

    #[test]
    fn a_member_that_leaves_otherwise_holds_nothing_up() {
        let c = Chains::new(tiers());
        let t0 = Instant::now();
        // A member that comes back as a duplicate (or expired) is not sent, and leaves.
        let b = c.arrived(None, None, false);
        c.parked("y", b, 0, t0);
        c.leave("y", b);
        assert!(c.is_empty(), "nothing kept for the conversation");
        // Leaving keeps the other members.
        let d = c.arrived(None, None, false);
        c.parked("z", d, 0, t0);
        let e = c.arrived(None, None, false);
        assert!(matches!(c.route("z", e, t0), Route::Follow { .. }));
        c.leave("z", d);
        assert_eq!(c.route("z", e, t0), Route::Send);
    }

    #[test]
    fn a_lost_member_does_not_block_its_conversation_forever() {
        let c = Chains::new(tiers());
        let t0 = Instant::now();
        c.parked("x", c.arrived(None, None, false), 0, t0);
        assert!(matches!(
            c.route("x", c.arrived(None, None, false), t0),
            Route::Follow { .. }
        ));
        let later = t0 + Duration::from_secs(5) + LOST_AFTER + Duration::from_secs(40);
        assert_eq!(
            c.route("x", c.arrived(None, None, false), later),
            Route::Send
        );
    }

    /// A journal in memory, shared by the "processes" of a test.
    #[derive(Clone, Default)]
    struct Mem(std::sync::Arc<Mutex<HashMap<String, Vec<(u64, u64)>>>>);

    impl Journal for Mem {
        fn write(&self, conversation: &str, members: &[(u64, u64)]) {
            let mut m = self.0.lock().unwrap();
            if members.is_empty() {
                m.remove(conversation);
            } else {
                m.insert(conversation.to_owned(), members.to_vec());
            }
        }
    }

    impl Mem {
        fn restart(&self) -> Chains {
            let restored = self.0.lock().unwrap().clone().into_iter().collect();
            Chains::with_journal(tiers(), Box::new(self.clone()), restored)
        }
    }

    #[test]
    fn a_restarted_process_knows_the_members_out() {
        let mem = Mem::default();
        let c = mem.restart();
        let t0 = Instant::now();
        let j_id = Uuid::new_v4();
        // J waits in its lane; K, younger, is deferred; then the process stops.
        let j = c.arrived(Some(j_id), None, false);
        let k = c.arrived(None, None, false);
        c.defer("x", k, t0, 1, Duration::ZERO);
        assert!(j < k);
        let c = mem.restart();
        // J is redelivered without a sequence: older than K, sent.
        let j2 = c.arrived(Some(j_id), None, true);
        assert!(j2 < k);
        assert_eq!(c.route("x", j2, Instant::now()), Route::Send);
        // A new job follows K, still out.
        let l = c.arrived(None, None, false);
        assert!(l > k, "sequences keep growing across restarts");
        assert!(matches!(
            c.route("x", l, Instant::now()),
            Route::Follow { .. }
        ));
        // K back, then L: both sent, and the journal is empty again.
        assert_eq!(c.route("x", k, Instant::now()), Route::Send);
        assert_eq!(c.route("x", l, Instant::now()), Route::Send);
        assert!(mem.0.lock().unwrap().is_empty());
        // Members long past their return are not restored.
        mem.write("y", &[(k, 1)]);
        assert!(mem.restart().is_empty());
    }

    /// What happens next in the model of [`sends_happen_in_publish_order`].
    #[derive(Debug, Clone, Copy)]
    enum Step {
        /// The broker hands over the next message of the work queue (deferred if `true`).
        Arrive(bool),
        /// The lane works its oldest waiting job (it fails if `true`).
        Work(bool),
        /// The session is lost: every job waiting in the lane is handed back.
        Lose,
        /// The process stops (or crashes): the jobs in it are redelivered to the next one, which
        /// knows only the journal.
        Restart,
    }

    fn step(failures: bool) -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => any::<bool>().prop_map(Step::Arrive),
            4 => prop::bool::weighted(if failures { 0.3 } else { 0.0 }).prop_map(Step::Work),
            1 => Just(Step::Lose),
            1 => Just(Step::Restart),
        ]
    }

    /// The model: a conversation's jobs through a work queue, a process (its lane) that may be
    /// restarted, and the delay tiers; returns the jobs in the order they were sent.
    fn model(jobs: usize, steps: Vec<Step>, restarts: bool) -> Vec<usize> {
        let mem = Mem::default();
        let mut c = mem.restart();
        let mut now = Instant::now();
        let ids: Vec<Uuid> = (0..jobs).map(|_| Uuid::new_v4()).collect();
        // The work queue (FIFO; a handed-back job goes to its front) as (job, header,
        // redelivered), the lane, and the tiers as (return time, order, job, seq).
        let mut queue: VecDeque<(usize, Option<u64>, bool)> =
            (0..jobs).map(|i| (i, None, false)).collect();
        let mut lane: VecDeque<(usize, u64)> = VecDeque::new();
        let mut tiers_out: Vec<(Instant, u64, usize, u64)> = Vec::new();
        let mut sent = Vec::new();
        let mut order = 0u64;
        let mut tier_out = |tiers_out: &mut Vec<_>, now: Instant, tier: usize, job, seq| {
            order += 1;
            tiers_out.push((now + tiers()[tier], order, job, seq));
        };
        // What the dispatcher does with an arriving job.
        let arrive = |c: &Chains,
                      lane: &mut VecDeque<(usize, u64)>,
                      tiers_out: &mut Vec<_>,
                      tier_out: &mut dyn FnMut(&mut Vec<_>, Instant, usize, usize, u64),
                      (job, header, redelivered): (usize, Option<u64>, bool),
                      defer: bool,
                      now: Instant| {
            let seq = c.arrived(Some(ids[job]), header, redelivered);
            if defer {
                let tier = c.defer("x", seq, now, lane.len(), Duration::from_secs(1));
                tier_out(tiers_out, now, tier, job, seq);
                return;
            }
            match c.route("x", seq, now) {
                Route::Send => {
                    let at = lane
                        .iter()
                        .position(|(_, s)| *s > seq)
                        .unwrap_or(lane.len());
                    lane.insert(at, (job, seq));
                }
                Route::Follow { seq, tier } => tier_out(tiers_out, now, tier, job, seq),
            }
        };
        let mut steps = steps.into_iter();
        for _ in 0..10_000 {
            let step = steps.next().unwrap_or(Step::Work(false));
            match step {
                Step::Arrive(defer) if !queue.is_empty() => {
                    let next = queue.pop_front().unwrap();
                    arrive(
                        &c,
                        &mut lane,
                        &mut tiers_out,
                        &mut tier_out,
                        next,
                        defer,
                        now,
                    );
                }
                Step::Lose => {
                    for (job, seq) in lane.drain(..).rev() {
                        c.handed_back("x", ids[job], seq, now);
                        queue.push_front((job, None, true));
                    }
                }
                Step::Restart if restarts => {
                    for (job, _) in lane.drain(..).rev() {
                        queue.push_front((job, None, true));
                    }
                    c = mem.restart();
                }
                Step::Work(fail) | Step::Arrive(fail) => {
                    if let Some((job, seq)) = lane.pop_front() {
                        match c.route("x", seq, now) {
                            Route::Send if fail => {
                                c.parked("x", seq, 0, now);
                                tier_out(&mut tiers_out, now, 0, job, seq);
                            }
                            Route::Send => sent.push(job),
                            Route::Follow { seq, tier } => {
                                tier_out(&mut tiers_out, now, tier, job, seq);
                            }
                        }
                    } else if let Some(next) = queue.pop_front() {
                        arrive(
                            &c,
                            &mut lane,
                            &mut tiers_out,
                            &mut tier_out,
                            next,
                            false,
                            now,
                        );
                    } else if !tiers_out.is_empty() {
                        // The next message to expire goes back to the work queue.
                        tiers_out.sort();
                        let (back, _, job, seq) = tiers_out.remove(0);
                        now = now.max(back);
                        queue.push_back((job, Some(seq), false));
                    } else {
                        break;
                    }
                }
                Step::Restart => {}
            }
        }
        sent
    }

    proptest! {
        /// A conversation's jobs come out of the chain in publish order, whatever fails, is
        /// deferred or handed back, and whenever the tiers give members back.
        #[test]
        fn sends_happen_in_publish_order(
            jobs in 1usize..12,
            steps in proptest::collection::vec(step(true), 0..60),
        ) {
            prop_assert_eq!(model(jobs, steps, false), (0..jobs).collect::<Vec<_>>());
        }

        /// ... and across restarts of the process, for deferred jobs.
        #[test]
        fn deferred_jobs_keep_their_order_across_restarts(
            jobs in 1usize..12,
            steps in proptest::collection::vec(step(false), 0..60),
        ) {
            prop_assert_eq!(model(jobs, steps, true), (0..jobs).collect::<Vec<_>>());
        }
    }
}
