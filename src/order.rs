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
//! store), in order, with each member's job id, and the worker acks a job it sent out only once
//! that is durable; a new process starts from the chains written. The sequences of jobs handed
//! back (also every job still waiting when the process stops) are kept in the journal by job
//! id until the job is done, so their redeliveries, which carry no header, get them again; so
//! does a job whose republish into a tier had not been confirmed when the process died (it is
//! a member, known by its id). A job redelivered with neither (it was in the process when it
//! died, and never left for a tier) is older than every member out: it was consumed before
//! them (a job consumed after a member went out joins the chain at once, see
//! [`Chains::route`]), so it gets a sequence below every one the worker hands out otherwise.
//! The model tests below state this: in publish order across stops (with failures and lost
//! sessions), and across crashes (with deferred jobs, republishes in flight and duplicates).
//!
//! Limits, all after a crash (`kill -9`, OOM), none after a stop: a crash right after a job was
//! parked after a failure, while younger jobs of its conversation still wait in its lane (they
//! follow it at their turn, milliseconds later unless they wait for a slot), lets those
//! younger jobs, redelivered, go first; so can a crash while jobs whose sequence was kept (a
//! lost session, a stop) are being redelivered and worked, for the jobs consumed after them.
//! A member that never comes back (its tier purged, a redelivery taken by another consumer) is
//! forgotten after its expected return plus a margin, so one lost message cannot block its
//! conversation forever.

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
    chains: Mutex<HashMap<String, BTreeMap<u64, Member>>>,
    /// Sequences of jobs handed back to the broker (or whose republish may not have gone out
    /// when the last process stopped), by job id, until the job is done: a redelivery comes
    /// without its sequence.
    handed_back: Mutex<HashMap<Uuid, (u64, Instant)>>,
    next_seq: AtomicU64,
    /// Sequences of jobs redelivered without one: below [`OLD_SEQ_END`], so below every
    /// sequence from the clock.
    old_seq: AtomicU64,
    tiers: Vec<Duration>,
    journal: Option<Box<dyn Journal>>,
    /// An instant and the Unix milliseconds it was, to write expected returns as wall-clock
    /// times (a new process reads them back against its own clock).
    anchor: (Instant, u64),
}

/// A member out: when it is expected back, and which job it is (a job redelivered without its
/// sequence is known by its id).
#[derive(Debug, Clone, Copy)]
struct Member {
    back: Instant,
    id: Uuid,
}

/// A member out as a [`Journal`] keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct SavedMember {
    pub seq: u64,
    /// Its expected return, in Unix ms.
    pub back_ms: u64,
    pub id: Uuid,
}

/// A handed-back job's sequence as a [`Journal`] keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct SavedKnown {
    pub seq: u64,
    /// When it was handed back, in Unix ms.
    pub at_ms: u64,
}

/// Where chains outlive the process. Called under the chains lock, so writes land in the order
/// the chains changed.
pub trait Journal: Send + Sync {
    /// `conversation`'s members out, empty when it has none.
    fn write(&self, conversation: &str, members: &[SavedMember]);
    /// Handed-back job `id`'s sequence, or `None` once the job is done.
    fn know(&self, id: Uuid, known: Option<SavedKnown>);
}

/// A conversation's chain as a [`Journal`] keeps it.
pub type SavedChain = (String, Vec<SavedMember>);

/// What a [`Journal`] held when the process started.
#[derive(Debug, Clone, Default)]
pub struct Restored {
    pub chains: Vec<SavedChain>,
    pub known: Vec<(Uuid, SavedKnown)>,
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
            anchor: (Instant::now(), unix_ms()),
        }
    }

    /// Chains kept in `journal`, starting from what it held (`restored`, as written to it).
    pub fn with_journal(
        tiers: Vec<Duration>,
        journal: Box<dyn Journal>,
        restored: Restored,
    ) -> Chains {
        Chains::with_journal_at(tiers, journal, restored, (Instant::now(), unix_ms()))
    }

    /// [`Chains::with_journal`], with `anchor` = an instant and the Unix ms it is (tests).
    fn with_journal_at(
        tiers: Vec<Duration>,
        journal: Box<dyn Journal>,
        restored: Restored,
        anchor: (Instant, u64),
    ) -> Chains {
        let mut chains = Chains::new(tiers);
        chains.anchor = anchor;
        let (now, now_ms) = anchor;
        let mut map = HashMap::new();
        let mut known = HashMap::new();
        let lost_ms = LOST_AFTER.as_millis() as u64;
        for (id, k) in restored.known {
            if k.at_ms + lost_ms > now_ms {
                known.insert(id, (k.seq, instant_of(k.at_ms, now, now_ms)));
            } else {
                journal.know(id, None);
            }
        }
        for (conversation, members) in restored.chains {
            let out: BTreeMap<u64, Member> = members
                .into_iter()
                .filter(|m| m.back_ms + lost_ms > now_ms)
                .map(|m| {
                    let back = instant_of(m.back_ms, now, now_ms);
                    (m.seq, Member { back, id: m.id })
                })
                .collect();
            for (&seq, member) in &out {
                // A member whose message may still be in the work queue (its republish not
                // confirmed when the process died) comes back without its sequence: its id
                // finds it.
                known.entry(member.id).or_insert((seq, now));
            }
            if !out.is_empty() {
                map.insert(conversation, out);
            }
        }
        let seqs = map
            .values()
            .flat_map(|out| out.keys().copied())
            .chain(known.values().map(|(seq, _)| *seq));
        for seq in seqs {
            // Never a sequence at or below one restored: a job redelivered without one is
            // younger than those redelivered to an earlier process (the broker redelivers in
            // order), and a clock may have gone back.
            let counter = if seq < OLD_SEQ_END {
                &chains.old_seq
            } else {
                &chains.next_seq
            };
            counter.fetch_max(seq + 1, Ordering::Relaxed);
        }
        chains.chains = Mutex::new(map);
        chains.handed_back = Mutex::new(known);
        chains.journal = Some(journal);
        chains
    }

    /// The sequence of an arriving job: the one in its sealed header (a member coming back),
    /// the one it had when it was handed back (kept until [`Chains::done`]), one older than
    /// every member out if it is `redelivered` without either (see the module docs), or a new
    /// one (younger than every job so far).
    pub fn arrived(&self, id: Option<Uuid>, header: Option<u64>, redelivered: bool) -> u64 {
        let remembered = id.and_then(|id| {
            self.handed_back
                .lock()
                .expect("chains lock")
                .get(&id)
                .map(|(seq, _)| *seq)
        });
        header.or(remembered).unwrap_or_else(|| {
            if redelivered {
                self.old_seq.fetch_add(1, Ordering::Relaxed)
            } else {
                self.new_seq()
            }
        })
    }

    /// Whether `seq` was given to a job redelivered without one. Such a job must not be deferred
    /// ([`crate::fair`]): after another restart, a job redelivered again without a sequence could
    /// not be told older or younger than it.
    pub fn is_redelivered(seq: u64) -> bool {
        seq < OLD_SEQ_END
    }

    /// Writes `conversation`'s chain to the journal (under the chains lock).
    fn save(&self, conversation: &str, out: Option<&BTreeMap<u64, Member>>) {
        let Some(journal) = &self.journal else { return };
        // Against the anchor: one mapping from instants to wall-clock times for the whole
        // process.
        let (at, at_ms) = self.anchor;
        let members: Vec<SavedMember> = out
            .into_iter()
            .flatten()
            .map(|(&seq, m)| SavedMember {
                seq,
                back_ms: unix_ms_of(m.back, at, at_ms),
                id: m.id,
            })
            .collect();
        journal.write(conversation, &members);
    }

    /// Routes job `id` (`seq`) of `conversation` before sending it.
    pub fn route(&self, conversation: &str, id: Uuid, seq: u64, now: Instant) -> Route {
        let mut chains = self.chains.lock().expect("chains lock");
        let Some(out) = chains.get_mut(conversation) else {
            return Route::Send;
        };
        let before = out.len();
        out.retain(|_, m| m.back + LOST_AFTER > now);
        let was_out = out.remove(&seq).is_some();
        if out.range(..seq).next().is_none() {
            if out.is_empty() {
                chains.remove(conversation);
                self.save(conversation, None);
            } else if was_out || out.len() != before {
                self.save(conversation, Some(out));
            }
            return Route::Send;
        }
        let tier = self.follow_tier(out, seq, now);
        let back = now + self.tiers[tier];
        out.insert(seq, Member { back, id });
        self.save(conversation, Some(out));
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
        id: Uuid,
        seq: u64,
        now: Instant,
        waiting: usize,
        per_job: Duration,
    ) -> usize {
        let mut chains = self.chains.lock().expect("chains lock");
        let out = chains.entry(conversation.to_owned()).or_default();
        out.retain(|_, m| m.back + LOST_AFTER > now);
        let ahead = waiting + out.range(..seq).count();
        let wait = per_job.saturating_mul(u32::try_from(ahead).unwrap_or(u32::MAX));
        let long_enough = self
            .tiers
            .iter()
            .position(|d| *d >= wait)
            .unwrap_or(self.tiers.len() - 1);
        let tier = self.follow_tier(out, seq, now).max(long_enough);
        let back = now + self.tiers[tier];
        out.insert(seq, Member { back, id });
        self.save(conversation, Some(out));
        tier
    }

    /// The shortest tier that ends after every member out older than `seq`. Younger members
    /// may come back first: they see this one out and follow it. Not waiting for them keeps a
    /// chain's members coming back in sequence order, so each round sends many, not one.
    fn follow_tier(&self, out: &BTreeMap<u64, Member>, seq: u64, now: Instant) -> usize {
        let latest = out.range(..seq).map(|(_, m)| m.back).max().unwrap_or(now);
        self.tiers
            .iter()
            .position(|d| now + *d >= latest)
            .unwrap_or(self.tiers.len() - 1)
    }

    /// Records that job `seq` left for `tier` after failing.
    pub fn parked(&self, conversation: &str, id: Uuid, seq: u64, tier: usize, now: Instant) {
        let mut chains = self.chains.lock().expect("chains lock");
        let out = chains.entry(conversation.to_owned()).or_default();
        let back = now + self.tiers[tier];
        out.insert(seq, Member { back, id });
        self.save(conversation, Some(out));
    }

    /// Records that job `id` (`seq`) was handed back to the broker: it counts as out until it is
    /// redelivered, or for [`LOST_AFTER`], and keeps its sequence ([`Chains::remember`]).
    pub fn handed_back(&self, conversation: &str, id: Uuid, seq: u64, now: Instant) {
        {
            let mut chains = self.chains.lock().expect("chains lock");
            let out = chains.entry(conversation.to_owned()).or_default();
            out.insert(seq, Member { back: now, id });
            self.save(conversation, Some(out));
        }
        self.remember(id, seq, now);
    }

    /// Keeps job `id`'s sequence, in the journal too, until [`Chains::done`] (or for
    /// [`LOST_AFTER`]): the job was handed back, and its redelivery comes without it. When the
    /// process stops, this is enough for the jobs waiting in it: they are redelivered before
    /// anything that comes back from a tier.
    pub fn remember(&self, id: Uuid, seq: u64, now: Instant) {
        let mut handed_back = self.handed_back.lock().expect("chains lock");
        if handed_back.len() >= HANDED_BACK_SWEEP {
            handed_back.retain(|id, (_, at)| {
                let keep = *at + LOST_AFTER > now;
                if !keep && let Some(journal) = &self.journal {
                    journal.know(*id, None);
                }
                keep
            });
        }
        handed_back.insert(id, (seq, now));
        if let Some(journal) = &self.journal {
            let (at, at_ms) = self.anchor;
            let at_ms = unix_ms_of(now, at, at_ms);
            journal.know(id, Some(SavedKnown { seq, at_ms }));
        }
    }

    /// Job `id` is done with the work queue (acked): its sequence is no longer needed.
    pub fn done(&self, id: Uuid) {
        let mut handed_back = self.handed_back.lock().expect("chains lock");
        if handed_back.remove(&id).is_some()
            && let Some(journal) = &self.journal
        {
            journal.know(id, None);
        }
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
                self.save(conversation, None);
            } else {
                self.save(conversation, Some(out));
            }
        }
    }

    /// Whether a member older than `seq` is out in `conversation`.
    pub fn has_older_out(&self, conversation: &str, seq: u64) -> bool {
        let chains = self.chains.lock().expect("chains lock");
        chains
            .get(conversation)
            .is_some_and(|out| out.range(..seq).next().is_some())
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

    /// The id of a job whose id plays no part in a test.
    const NIL: Uuid = Uuid::nil();

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
        assert_eq!(c.route("x", NIL, a, t0), Route::Send);
        c.parked("x", NIL, a, 0, t0); // A failed: out until t0+5
        let b = c.arrived(None, None, false);
        assert!(b > a);
        assert_eq!(
            c.route("x", NIL, b, t0),
            Route::Follow { seq: b, tier: 0 },
            "B must follow A into tier 0"
        );
        // A back at t0+5 and parked again, into the 30 s tier.
        let t5 = t0 + Duration::from_secs(5);
        assert_eq!(
            c.route("x", NIL, c.arrived(None, Some(a), false), t5),
            Route::Send
        );
        c.parked("x", NIL, a, 1, t5);
        // B back: A is still out, so B goes round again, into a tier that ends after A's.
        let t6 = t0 + Duration::from_secs(6);
        assert_eq!(c.route("x", NIL, b, t6), Route::Follow { seq: b, tier: 1 });
        // A new job C joins the chain too.
        let cc = c.arrived(None, None, false);
        assert!(matches!(c.route("x", NIL, cc, t6), Route::Follow { .. }));
        // A back and delivered; B back: nothing older out, sent; C back: sent.
        let t35 = t5 + Duration::from_secs(30);
        assert_eq!(c.route("x", NIL, a, t35), Route::Send);
        let t37 = t6 + Duration::from_secs(31);
        assert_eq!(c.route("x", NIL, b, t37), Route::Send);
        assert_eq!(c.route("x", NIL, cc, t37), Route::Send);
        assert!(c.is_empty());
        // Other conversations are never affected.
        c.parked("x", NIL, c.arrived(None, None, false), 0, t37);
        assert_eq!(c.route("y", NIL, c.arrived(None, None, false), t37), Route::Send);
    }

    #[test]
    fn a_deferred_job_holds_up_younger_jobs_only() {
        let c = Chains::new(tiers());
        let t0 = Instant::now();
        // A and B wait in their lane; C arrives while the conversation holds its share.
        let a = c.arrived(None, None, false);
        let b = c.arrived(None, None, false);
        let cc = c.arrived(None, None, false);
        assert_eq!(c.defer("x", NIL, cc, t0, 2, Duration::ZERO), 0);
        // A and B are older than C: sent.
        assert_eq!(c.route("x", NIL, a, t0), Route::Send);
        assert_eq!(c.route("x", NIL, b, t0), Route::Send);
        // D, younger, follows C.
        let d = c.arrived(None, None, false);
        assert_eq!(c.route("x", NIL, d, t0), Route::Follow { seq: d, tier: 0 });
        // C back: sent; then D.
        let t5 = t0 + Duration::from_secs(5);
        assert_eq!(
            c.route("x", NIL, c.arrived(None, Some(cc), false), t5),
            Route::Send
        );
        assert_eq!(
            c.route("x", NIL, c.arrived(None, Some(d), false), t5),
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
            c.defer("x", NIL, c.arrived(None, None, false), t0, 40, per_job),
            0
        );
        // 40 waiting and 1 out ahead, then 2, ...: past 50 jobs ahead, the 30 s tier.
        let tiers: Vec<usize> = (0..20)
            .map(|_| c.defer("x", NIL, c.arrived(None, None, false), t0, 40, per_job))
            .collect();
        assert_eq!(tiers[..10], [0; 10]);
        assert!(tiers[10..].iter().all(|&t| t == 1), "{tiers:?}");
        // Never shorter than the members out ahead: 2 waiting, but the 30 s tier.
        assert_eq!(
            c.defer("x", NIL, c.arrived(None, None, false), t0, 2, per_job),
            1
        );
        // A 5,000-job backlog goes to the longest tier.
        assert_eq!(
            c.defer("y", NIL, c.arrived(None, None, false), t0, 5000, per_job),
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
        assert_eq!(c.defer("x", NIL, b, t0, 1, Duration::ZERO), 0);
        // A's session is lost before A is sent: B comes back first, and must wait for A.
        c.handed_back("x", id, a, t0);
        let t5 = t0 + Duration::from_secs(5);
        assert!(matches!(c.route("x", NIL, b, t5), Route::Follow { .. }));
        // A redelivered (no header): same sequence, sent; then B.
        assert_eq!(c.arrived(Some(id), None, false), a);
        assert_eq!(c.route("x", NIL, a, t5), Route::Send);
        assert_eq!(c.route("x", NIL, b, t5 + Duration::from_secs(30)), Route::Send);
        assert!(c.is_empty());
        // The memory is gone once the job is done.
        c.done(id);
        assert!(c.arrived(Some(id), None, false) > b);
    }

    #[test]
    fn a_member_that_leaves_otherwise_holds_nothing_up() {
        let c = Chains::new(tiers());
        let t0 = Instant::now();
        // A member that comes back as a duplicate (or expired) is not sent, and leaves.
        let b = c.arrived(None, None, false);
        c.parked("y", NIL, b, 0, t0);
        c.leave("y", b);
        assert!(c.is_empty(), "nothing kept for the conversation");
        // Leaving keeps the other members.
        let d = c.arrived(None, None, false);
        c.parked("z", NIL, d, 0, t0);
        let e = c.arrived(None, None, false);
        assert!(matches!(c.route("z", NIL, e, t0), Route::Follow { .. }));
        c.leave("z", d);
        assert_eq!(c.route("z", NIL, e, t0), Route::Send);
    }

    #[test]
    fn a_lost_member_does_not_block_its_conversation_forever() {
        let c = Chains::new(tiers());
        let t0 = Instant::now();
        c.parked("x", NIL, c.arrived(None, None, false), 0, t0);
        assert!(matches!(
            c.route("x", NIL, c.arrived(None, None, false), t0),
            Route::Follow { .. }
        ));
        let later = t0 + Duration::from_secs(5) + LOST_AFTER + Duration::from_secs(40);
        assert_eq!(
            c.route("x", NIL, c.arrived(None, None, false), later),
            Route::Send
        );
    }

    #[derive(Default)]
    struct Saved {
        chains: HashMap<String, Vec<SavedMember>>,
        known: HashMap<Uuid, SavedKnown>,
    }

    /// A journal in memory, shared by the "processes" of a test.
    #[derive(Clone, Default)]
    struct Mem(std::sync::Arc<Mutex<Saved>>);

    impl Journal for Mem {
        fn write(&self, conversation: &str, members: &[SavedMember]) {
            let mut m = self.0.lock().unwrap();
            if members.is_empty() {
                m.chains.remove(conversation);
            } else {
                m.chains.insert(conversation.to_owned(), members.to_vec());
            }
        }

        fn know(&self, id: Uuid, known: Option<SavedKnown>) {
            let mut m = self.0.lock().unwrap();
            match known {
                Some(k) => m.known.insert(id, k),
                None => m.known.remove(&id),
            };
        }
    }

    impl Mem {
        fn restart(&self) -> Chains {
            self.restart_at(Instant::now(), unix_ms())
        }

        /// A process started at `now`, which is `now_ms` on the wall clock.
        fn restart_at(&self, now: Instant, now_ms: u64) -> Chains {
            let saved = self.0.lock().unwrap();
            let restored = Restored {
                chains: saved.chains.clone().into_iter().collect(),
                known: saved.known.clone().into_iter().collect(),
            };
            drop(saved);
            Chains::with_journal_at(tiers(), Box::new(self.clone()), restored, (now, now_ms))
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
        c.defer("x", NIL, k, t0, 1, Duration::ZERO);
        assert!(j < k);
        let c = mem.restart();
        // J is redelivered without a sequence: older than K, sent.
        let j2 = c.arrived(Some(j_id), None, true);
        assert!(j2 < k);
        assert_eq!(c.route("x", NIL, j2, Instant::now()), Route::Send);
        // A new job follows K, still out.
        let l = c.arrived(None, None, false);
        assert!(l > k, "sequences keep growing across restarts");
        assert!(matches!(
            c.route("x", NIL, l, Instant::now()),
            Route::Follow { .. }
        ));
        // K back, then L: both sent, and the journal is empty again.
        assert_eq!(c.route("x", NIL, k, Instant::now()), Route::Send);
        assert_eq!(c.route("x", NIL, l, Instant::now()), Route::Send);
        assert!(mem.0.lock().unwrap().chains.is_empty());
        // Members long past their return are not restored.
        let id = Uuid::new_v4();
        mem.write(
            "y",
            &[SavedMember {
                seq: k,
                back_ms: 1,
                id,
            }],
        );
        assert!(mem.restart().is_empty());
    }

    /// What happens next in the model of [`sends_happen_in_publish_order`].
    #[derive(Debug, Clone, Copy)]
    enum Step {
        /// The broker hands over the next message of the work queue (deferred if `true`).
        Arrive(bool),
        /// The lane works its oldest waiting job (it fails if `true`).
        Work(bool),
        /// The oldest republish in flight (a job deferred or following on arrival) is confirmed,
        /// and the job acked.
        Confirm,
        /// The session is lost: every job in the process is handed back.
        Lose,
        /// The process stops: republishes in flight are confirmed, the jobs waiting are handed
        /// back; the next process knows only the journal.
        Stop,
        /// The process dies: every job in it is redelivered; a republish in flight went out
        /// (and its job is redelivered as well) if `true`.
        Crash(bool),
    }

    fn step(failures: bool, stops: bool, crashes: bool) -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => any::<bool>().prop_map(Step::Arrive),
            4 => prop::bool::weighted(if failures { 0.3 } else { 0.0 }).prop_map(Step::Work),
            2 => Just(Step::Confirm),
            1 => Just(Step::Lose),
            1 => Just(Step::Stop),
            1 => any::<bool>().prop_map(Step::Crash),
        ]
        .prop_map(move |step| match step {
            // With crashes, no lost sessions: the limit in the module docs.
            Step::Lose if crashes => Step::Confirm,
            Step::Stop if !stops => Step::Confirm,
            Step::Crash(_) if !crashes => Step::Confirm,
            other => other,
        })
    }

    /// A job in the process: (job, seq, the header it came with (a redelivery carries it
    /// again), the order it was consumed in).
    type InProcess = (usize, u64, Option<u64>, u64);

    /// The model: a conversation's jobs through a work queue, a process (its lane and its
    /// republishes in flight) that may stop or die, the store's duplicate check, and the delay
    /// tiers; returns the jobs in the order they were sent.
    fn model(jobs: usize, steps: Vec<Step>) -> Vec<usize> {
        let mem = Mem::default();
        let start = (Instant::now(), unix_ms());
        let mut c = mem.restart_at(start.0, start.1);
        let mut now = start.0;
        let ids: Vec<Uuid> = (0..jobs).map(|_| Uuid::new_v4()).collect();
        // The work queue (FIFO; handed-back jobs go to its front in the order they were
        // consumed) as (job, header, redelivered); the lane, in sequence order; republishes in
        // flight, with their tiers; the tiers as (return time, order, job, seq).
        let mut queue: VecDeque<(usize, Option<u64>, bool)> =
            (0..jobs).map(|i| (i, None, false)).collect();
        let mut lane: Vec<InProcess> = Vec::new();
        let mut flight: VecDeque<(InProcess, usize)> = VecDeque::new();
        let mut tiers_out: Vec<(Instant, u64, usize, u64)> = Vec::new();
        let mut sent = Vec::new();
        let mut order = 0u64;
        let mut consumed = 0u64;
        let tier_out = |tiers_out: &mut Vec<_>, order: &mut u64, now, tier: usize, job, seq| {
            *order += 1;
            tiers_out.push((now + tiers()[tier], *order, job, seq));
        };
        // Every job in the process back to the front of the work queue, in the order consumed.
        let requeue = |queue: &mut VecDeque<_>, mut jobs: Vec<InProcess>| {
            jobs.sort_by_key(|j| j.3);
            for (job, _, header, _) in jobs.into_iter().rev() {
                queue.push_front((job, header, true));
            }
        };
        let mut steps = steps.into_iter();
        for _ in 0..10_000 {
            let mut step = steps.next().unwrap_or(Step::Work(false));
            // A step with nothing to act on: the lane works, or else what can move does.
            step = match step {
                Step::Arrive(_) if queue.is_empty() => Step::Work(false),
                Step::Confirm if flight.is_empty() => Step::Work(false),
                other => other,
            };
            step = match step {
                Step::Work(_) if lane.is_empty() && !queue.is_empty() => Step::Arrive(false),
                Step::Work(_) if lane.is_empty() && !flight.is_empty() => Step::Confirm,
                other => other,
            };
            match step {
                Step::Arrive(defer) => {
                    // What the dispatcher does with an arriving job.
                    let (job, header, redelivered) = queue.pop_front().unwrap();
                    let seq = c.arrived(Some(ids[job]), header, redelivered);
                    consumed += 1;
                    let it = (job, seq, header, consumed);
                    if defer && !Chains::is_redelivered(seq) {
                        let tier =
                            c.defer("x", ids[job], seq, now, lane.len(), Duration::from_secs(1));
                        flight.push_back((it, tier));
                        continue;
                    }
                    match c.route("x", ids[job], seq, now) {
                        Route::Send => {
                            let at = lane.partition_point(|j| j.1 < seq);
                            lane.insert(at, it);
                        }
                        Route::Follow { tier, .. } => flight.push_back((it, tier)),
                    }
                }
                Step::Confirm => {
                    let ((job, seq, ..), tier) = flight.pop_front().unwrap();
                    tier_out(&mut tiers_out, &mut order, now, tier, job, seq);
                    c.done(ids[job]);
                }
                Step::Lose => {
                    // A republish in flight fails with its session: the job goes back to its
                    // lane, and is handed back with the others.
                    let mut all: Vec<_> = lane.drain(..).collect();
                    all.extend(flight.drain(..).map(|(it, _)| it));
                    for &(job, seq, ..) in &all {
                        c.handed_back("x", ids[job], seq, now);
                    }
                    requeue(&mut queue, all);
                }
                Step::Stop => {
                    for ((job, seq, ..), tier) in flight.drain(..) {
                        tier_out(&mut tiers_out, &mut order, now, tier, job, seq);
                        c.done(ids[job]);
                    }
                    let all: Vec<_> = lane.drain(..).collect();
                    for &(job, seq, ..) in &all {
                        // What `Pipeline::settle` does while stopping.
                        c.remember(ids[job], seq, now);
                    }
                    requeue(&mut queue, all);
                    // The wall clock goes on with the model's time.
                    c = mem.restart_at(now, start.1 + (now - start.0).as_millis() as u64);
                }
                Step::Crash(went_out) => {
                    let mut all: Vec<_> = lane.drain(..).collect();
                    for (it, tier) in flight.drain(..) {
                        if went_out {
                            tier_out(&mut tiers_out, &mut order, now, tier, it.0, it.1);
                        }
                        all.push(it);
                    }
                    requeue(&mut queue, all);
                    c = mem.restart_at(now, start.1 + (now - start.0).as_millis() as u64);
                }
                Step::Work(fail) => {
                    if !lane.is_empty() {
                        let (job, seq, ..) = lane.remove(0);
                        if sent.contains(&job) {
                            // The store knows it: acked as a duplicate, and it leaves.
                            c.leave("x", seq);
                            c.done(ids[job]);
                            continue;
                        }
                        // Sent, parked or following: acked.
                        c.done(ids[job]);
                        match c.route("x", ids[job], seq, now) {
                            Route::Send if fail => {
                                c.parked("x", ids[job], seq, 0, now);
                                tier_out(&mut tiers_out, &mut order, now, 0, job, seq);
                            }
                            Route::Send => sent.push(job),
                            Route::Follow { seq, tier } => {
                                tier_out(&mut tiers_out, &mut order, now, tier, job, seq);
                            }
                        }
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
            steps in proptest::collection::vec(step(true, false, false), 0..60),
        ) {
            prop_assert_eq!(model(jobs, steps), (0..jobs).collect::<Vec<_>>());
        }

        /// ... and across stops of the process.
        #[test]
        fn sends_keep_their_order_across_stops(
            jobs in 1usize..12,
            steps in proptest::collection::vec(step(true, true, false), 0..60),
        ) {
            prop_assert_eq!(model(jobs, steps), (0..jobs).collect::<Vec<_>>());
        }

        /// ... and across crashes, for jobs that were deferred rather than parked after a
        /// failure, with no session lost (the limits in the module docs), also while their
        /// republish was in flight.
        #[test]
        fn deferred_jobs_keep_their_order_across_crashes(
            jobs in 1usize..12,
            steps in proptest::collection::vec(step(false, false, true), 0..60),
        ) {
            prop_assert_eq!(model(jobs, steps), (0..jobs).collect::<Vec<_>>());
        }
    }
}
