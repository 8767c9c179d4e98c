//! Per-conversation order across delay tiers.
//!
//! The dispatcher keeps a conversation's jobs in order while they are in this process. A job that
//! is parked in a delay tier leaves the process, and the jobs behind it must not overtake it. So
//! every job gets a sequence number when it arrives (a member coming back keeps the one in its
//! sealed `x-blinger-chain` header), and a conversation with jobs out in the tiers has a *chain*:
//! the sequence numbers of its members out. A job is sent only if no member with a smaller
//! sequence is out; otherwise it follows them into a tier (and goes round again if it comes
//! back too early). Jobs leave for a tier after failures (parked), to follow older members, or
//! deferred because their conversation holds its share of the prefetch ([`crate::engine::fair`]): a
//! deferred job is younger than the jobs of its conversation still waiting, which are sent
//! before it. Sequence numbers grow across restarts (they start from the clock), so members
//! from an earlier run count as older.
//!
//! A job handed back to the broker (its session lost, or a republish that failed) stays in the
//! chain until it is redelivered, with the same sequence: a younger member coming back from a
//! tier meanwhile cannot overtake it. A job handed back when the process stops needs no such
//! place: it is redelivered before anything that comes back from a tier.
//!
//! Across restarts and crashes: the chains and the sequences live in a [`Journal`] (the
//! store). Every change of a conversation's chain is written, in order, with each member's job
//! id; so is the sequence of every job that arrives without one in its header, by job id, from
//! its arrival until it is done (acked), because a redelivery of the original message carries
//! no header. Before a copy of a job goes to a tier, the journal is flushed, so no copy exists
//! whose membership a crash could lose. A new process starts from what the journal kept: the
//! members out, each given its margin from the start ([`LOST_AFTER`]: if it came back while no
//! process ran, it is in the work queue), and the known sequences. A job redelivered with
//! neither a header nor a known sequence arrived in a process that died before the journal
//! had its sequence; the journal applies writes in order and keeps a prefix of them, so
//! everything it kept happened before that job arrived, and a new sequence (younger than
//! everything) is its place. The model tests below state the guarantee: publish order kept
//! with failures, deferrals, lost sessions, stops, and crashes that keep any prefix of the
//! unflushed writes, also with republishes in flight.
//!
//! Cost: one small write per job at arrival and one at its ack, in the store's batches; a flush
//! before each job goes to a tier (after failures, following, deferred).
//!
//! Limits: a member that never comes back (its tier purged, a redelivery taken by another
//! consumer) is forgotten after its expected return plus a margin, so one lost message cannot
//! block its conversation forever; a known sequence whose job never comes back is forgotten
//! after a day. The journal keeps a prefix of its writes only as far as sled does: its log is
//! replayed in order up to the last complete write. After the store was reopened in a running
//! process (a failed write, a full disk), a crash before the next restart may find the writes
//! made before the reopen missing.

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
    /// The sequences of jobs that arrived without one in their header, by job id, from their
    /// arrival until they are done (acked): a redelivery comes without it.
    known: Mutex<HashMap<Uuid, (u64, Instant)>>,
    next_seq: AtomicU64,
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

/// A job's sequence as a [`Journal`] keeps it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SavedKnown {
    pub conversation: String,
    pub seq: u64,
    /// When the job arrived, in Unix ms.
    pub at_ms: u64,
}

/// Where chains outlive the process. Called under the chains lock, so writes land in the order
/// the chains changed.
pub trait Journal: Send + Sync {
    /// `conversation`'s members out, empty when it has none.
    fn write(&self, conversation: &str, members: &[SavedMember]);
    /// Job `id`'s sequence, or `None` once the job is done.
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

/// Known sequences kept before old ones are swept: far more than a prefetch (at most 65,535)
/// holds. A job's sequence is forgotten when it is done; these are the jobs handed back that
/// never came back (another consumer took them, a purge).
const KNOWN_SWEEP: usize = 1 << 18;

/// How long a known sequence is kept, at most: a job consumed, handed back and not redelivered
/// for this long is not coming back.
const KNOWN_FOR: Duration = Duration::from_secs(24 * 3600);

impl Chains {
    pub fn new(tiers: Vec<Duration>) -> Chains {
        let start = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        Chains {
            chains: Mutex::new(HashMap::new()),
            known: Mutex::new(HashMap::new()),
            next_seq: AtomicU64::new(start),
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
        let known_ms = KNOWN_FOR.as_millis() as u64;
        for (id, k) in restored.known {
            if k.at_ms + known_ms > now_ms {
                known.insert(id, (k.seq, instant_of(k.at_ms, now, now_ms)));
            } else {
                journal.know(id, None);
            }
        }
        for (conversation, members) in restored.chains {
            // Members due back while no process ran are likely in the work queue by now: each
            // is given its margin from the start of this process.
            let out: BTreeMap<u64, Member> = members
                .into_iter()
                .map(|m| {
                    let back = instant_of(m.back_ms, now, now_ms).max(now);
                    (m.seq, Member { back, id: m.id })
                })
                .collect();
            if !out.is_empty() {
                map.insert(conversation, out);
            }
        }
        let seqs = map
            .values()
            .flat_map(|out| out.keys().copied())
            .chain(known.values().map(|(seq, _)| *seq));
        for seq in seqs {
            // Never a sequence at or below one restored (a clock that went back).
            chains.next_seq.fetch_max(seq + 1, Ordering::Relaxed);
        }
        chains.chains = Mutex::new(map);
        chains.known = Mutex::new(known);
        chains.journal = Some(journal);
        chains
    }

    /// The sequence of an arriving job of `conversation`: the one in its sealed header (a
    /// member coming back), the one it was given when it first arrived (kept, in the journal
    /// too, until [`Chains::done`]), or a new one, younger than every job so far, kept from now
    /// on.
    ///
    /// A job redelivered with neither arrived in a process that died before the journal had
    /// its sequence. The journal applies writes in order and keeps a prefix of them, so
    /// everything it kept happened before that job arrived: every member out and every known
    /// sequence of its conversation is older than it, and so is a new sequence.
    pub fn arrived(&self, conversation: &str, id: Uuid, header: Option<u64>) -> u64 {
        if let Some(seq) = header {
            return seq;
        }
        let mut known = self.known.lock().expect("chains lock");
        if let Some((seq, _)) = known.get(&id) {
            return *seq;
        }
        let seq = self.new_seq();
        let now = Instant::now();
        if known.len() >= KNOWN_SWEEP {
            known.retain(|id, (_, at)| {
                let keep = *at + KNOWN_FOR > now;
                if !keep && let Some(journal) = &self.journal {
                    journal.know(*id, None);
                }
                keep
            });
        }
        known.insert(id, (seq, now));
        if let Some(journal) = &self.journal {
            let (at, at_ms) = self.anchor;
            let at_ms = unix_ms_of(now, at, at_ms);
            let conversation = conversation.to_owned();
            journal.know(
                id,
                Some(SavedKnown {
                    conversation,
                    seq,
                    at_ms,
                }),
            );
        }
        seq
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
    /// [`crate::engine::fair`]); returns the tier. Call before any younger job of the conversation is
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
    /// redelivered (with its sequence: [`Chains::arrived`]), or for [`LOST_AFTER`].
    pub fn handed_back(&self, conversation: &str, id: Uuid, seq: u64, now: Instant) {
        let mut chains = self.chains.lock().expect("chains lock");
        let out = chains.entry(conversation.to_owned()).or_default();
        out.insert(seq, Member { back: now, id });
        self.save(conversation, Some(out));
    }

    /// Job `id` is done with the work queue (acked): its sequence is no longer needed.
    pub fn done(&self, id: Uuid) {
        let mut known = self.known.lock().expect("chains lock");
        if known.remove(&id).is_some()
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
        let a = c.arrived("x", Uuid::new_v4(), None);
        assert_eq!(c.route("x", NIL, a, t0), Route::Send);
        c.parked("x", NIL, a, 0, t0); // A failed: out until t0+5
        let b = c.arrived("x", Uuid::new_v4(), None);
        assert!(b > a);
        assert_eq!(
            c.route("x", NIL, b, t0),
            Route::Follow { seq: b, tier: 0 },
            "B must follow A into tier 0"
        );
        // A back at t0+5 and parked again, into the 30 s tier.
        let t5 = t0 + Duration::from_secs(5);
        assert_eq!(
            c.route("x", NIL, c.arrived("x", Uuid::new_v4(), Some(a)), t5),
            Route::Send
        );
        c.parked("x", NIL, a, 1, t5);
        // B back: A is still out, so B goes round again, into a tier that ends after A's.
        let t6 = t0 + Duration::from_secs(6);
        assert_eq!(c.route("x", NIL, b, t6), Route::Follow { seq: b, tier: 1 });
        // A new job C joins the chain too.
        let cc = c.arrived("x", Uuid::new_v4(), None);
        assert!(matches!(c.route("x", NIL, cc, t6), Route::Follow { .. }));
        // A back and delivered; B back: nothing older out, sent; C back: sent.
        let t35 = t5 + Duration::from_secs(30);
        assert_eq!(c.route("x", NIL, a, t35), Route::Send);
        let t37 = t6 + Duration::from_secs(31);
        assert_eq!(c.route("x", NIL, b, t37), Route::Send);
        assert_eq!(c.route("x", NIL, cc, t37), Route::Send);
        assert!(c.is_empty());
        // Other conversations are never affected.
        c.parked("x", NIL, c.arrived("x", Uuid::new_v4(), None), 0, t37);
        assert_eq!(
            c.route("y", NIL, c.arrived("x", Uuid::new_v4(), None), t37),
            Route::Send
        );
    }

    #[test]
    fn a_deferred_job_holds_up_younger_jobs_only() {
        let c = Chains::new(tiers());
        let t0 = Instant::now();
        // A and B wait in their lane; C arrives while the conversation holds its share.
        let a = c.arrived("x", Uuid::new_v4(), None);
        let b = c.arrived("x", Uuid::new_v4(), None);
        let cc = c.arrived("x", Uuid::new_v4(), None);
        assert_eq!(c.defer("x", NIL, cc, t0, 2, Duration::ZERO), 0);
        // A and B are older than C: sent.
        assert_eq!(c.route("x", NIL, a, t0), Route::Send);
        assert_eq!(c.route("x", NIL, b, t0), Route::Send);
        // D, younger, follows C.
        let d = c.arrived("x", Uuid::new_v4(), None);
        assert_eq!(c.route("x", NIL, d, t0), Route::Follow { seq: d, tier: 0 });
        // C back: sent; then D.
        let t5 = t0 + Duration::from_secs(5);
        assert_eq!(
            c.route("x", NIL, c.arrived("x", Uuid::new_v4(), Some(cc)), t5),
            Route::Send
        );
        assert_eq!(
            c.route("x", NIL, c.arrived("x", Uuid::new_v4(), Some(d)), t5),
            Route::Send
        );
        assert!(c.is_empty());
    }

    #[test]
    fn a_long_backlog_is_deferred_for_as_long_as_it_takes_to_send_what_is_ahead() {
        let c = Chains::new(tiers());
        let t0 = Instant::now();
        let per_job = Duration::from_millis(100);
        // A new job of `conversation` deferred with `waiting` jobs in its lane: its tier.
        let defer_new = |conversation: &str, waiting: usize| {
            let seq = c.arrived(conversation, Uuid::new_v4(), None);
            c.defer(conversation, NIL, seq, t0, waiting, per_job)
        };
        // 40 waiting × 100 ms = 4 s: the 5 s tier.
        assert_eq!(defer_new("x", 40), 0);
        // 40 waiting and 1 out ahead, then 2, ...: past 50 jobs ahead, the 30 s tier.
        let tiers: Vec<usize> = (0..20).map(|_| defer_new("x", 40)).collect();
        assert_eq!(tiers[..10], [0; 10]);
        assert!(tiers[10..].iter().all(|&t| t == 1), "{tiers:?}");
        // Never shorter than the members out ahead: 2 waiting, but the 30 s tier.
        assert_eq!(defer_new("x", 2), 1);
        // A 5,000-job backlog goes to the longest tier.
        assert_eq!(defer_new("y", 5000), 2);
    }

    #[test]
    fn a_handed_back_job_keeps_its_place_until_it_is_redelivered() {
        let c = Chains::new(tiers());
        let t0 = Instant::now();
        let id = Uuid::new_v4();
        let a = c.arrived("x", id, None);
        let b = c.arrived("x", Uuid::new_v4(), None);
        assert_eq!(c.defer("x", NIL, b, t0, 1, Duration::ZERO), 0);
        // A's session is lost before A is sent: B comes back first, and must wait for A.
        c.handed_back("x", id, a, t0);
        let t5 = t0 + Duration::from_secs(5);
        assert!(matches!(c.route("x", NIL, b, t5), Route::Follow { .. }));
        // A redelivered (no header): same sequence, sent; then B.
        assert_eq!(c.arrived("x", id, None), a);
        assert_eq!(c.route("x", NIL, a, t5), Route::Send);
        assert_eq!(
            c.route("x", NIL, b, t5 + Duration::from_secs(30)),
            Route::Send
        );
        assert!(c.is_empty());
        // The memory is gone once the job is done.
        c.done(id);
        assert!(c.arrived("x", id, None) > b);
    }

    #[test]
    fn a_member_that_leaves_otherwise_holds_nothing_up() {
        let c = Chains::new(tiers());
        let t0 = Instant::now();
        // A member that comes back as a duplicate (or expired) is not sent, and leaves.
        let b = c.arrived("x", Uuid::new_v4(), None);
        c.parked("y", NIL, b, 0, t0);
        c.leave("y", b);
        assert!(c.is_empty(), "nothing kept for the conversation");
        // Leaving keeps the other members.
        let d = c.arrived("x", Uuid::new_v4(), None);
        c.parked("z", NIL, d, 0, t0);
        let e = c.arrived("x", Uuid::new_v4(), None);
        assert!(matches!(c.route("z", NIL, e, t0), Route::Follow { .. }));
        c.leave("z", d);
        assert_eq!(c.route("z", NIL, e, t0), Route::Send);
    }

    #[test]
    fn a_lost_member_does_not_block_its_conversation_forever() {
        let c = Chains::new(tiers());
        let t0 = Instant::now();
        c.parked("x", NIL, c.arrived("x", Uuid::new_v4(), None), 0, t0);
        assert!(matches!(
            c.route("x", NIL, c.arrived("x", Uuid::new_v4(), None), t0),
            Route::Follow { .. }
        ));
        let later = t0 + Duration::from_secs(5) + LOST_AFTER + Duration::from_secs(40);
        assert_eq!(
            c.route("x", NIL, c.arrived("x", Uuid::new_v4(), None), later),
            Route::Send
        );
    }

    #[derive(Clone, Default)]
    struct Saved {
        chains: HashMap<String, Vec<SavedMember>>,
        known: HashMap<Uuid, SavedKnown>,
    }

    enum Write {
        Chain(String, Vec<SavedMember>),
        Know(Uuid, Option<SavedKnown>),
    }

    /// A journal in memory, shared by the "processes" of a test: what is durable, and the
    /// writes since the last flush, of which a crash keeps a prefix (as the store does).
    #[derive(Clone, Default)]
    struct Mem(std::sync::Arc<Mutex<(Saved, Vec<Write>)>>);

    impl Journal for Mem {
        fn write(&self, conversation: &str, members: &[SavedMember]) {
            let write = Write::Chain(conversation.to_owned(), members.to_vec());
            self.0.lock().unwrap().1.push(write);
        }

        fn know(&self, id: Uuid, known: Option<SavedKnown>) {
            self.0.lock().unwrap().1.push(Write::Know(id, known));
        }
    }

    impl Mem {
        fn flush(&self) {
            self.crash(usize::MAX);
        }

        /// The first `keep` writes since the last flush become durable, the rest are lost.
        fn crash(&self, keep: usize) {
            let mut m = self.0.lock().unwrap();
            let (saved, pending) = &mut *m;
            for write in pending.drain(..).take(keep) {
                match write {
                    Write::Chain(conversation, members) if members.is_empty() => {
                        saved.chains.remove(&conversation);
                    }
                    Write::Chain(conversation, members) => {
                        saved.chains.insert(conversation, members);
                    }
                    Write::Know(id, Some(k)) => {
                        saved.known.insert(id, k);
                    }
                    Write::Know(id, None) => {
                        saved.known.remove(&id);
                    }
                }
            }
        }

        fn durable(&self) -> Saved {
            self.0.lock().unwrap().0.clone()
        }

        /// A process started after a stop (everything flushed).
        fn restart(&self) -> Chains {
            self.flush();
            self.restart_at(Instant::now(), unix_ms())
        }

        /// A process started at `now`, which is `now_ms` on the wall clock, from what is
        /// durable.
        fn restart_at(&self, now: Instant, now_ms: u64) -> Chains {
            let saved = self.durable();
            let restored = Restored {
                chains: saved.chains.into_iter().collect(),
                known: saved.known.into_iter().collect(),
            };
            Chains::with_journal_at(tiers(), Box::new(self.clone()), restored, (now, now_ms))
        }
    }

    #[test]
    fn a_restarted_process_knows_the_members_out_and_the_jobs_it_had() {
        let mem = Mem::default();
        let c = mem.restart();
        let t0 = Instant::now();
        let (j_id, k_id) = (Uuid::new_v4(), Uuid::new_v4());
        // J waits in its lane; K, younger, is deferred; then the process stops.
        let j = c.arrived("x", j_id, None);
        let k = c.arrived("x", k_id, None);
        c.defer("x", k_id, k, t0, 1, Duration::ZERO);
        assert!(j < k);
        let c = mem.restart();
        // J is redelivered without a header: it gets its sequence again, older than K's.
        assert_eq!(c.arrived("x", j_id, None), j);
        assert_eq!(c.route("x", j_id, j, Instant::now()), Route::Send);
        c.done(j_id);
        // A new job follows K, still out.
        let l_id = Uuid::new_v4();
        let l = c.arrived("x", l_id, None);
        assert!(l > k, "sequences keep growing across restarts");
        assert!(matches!(
            c.route("x", l_id, l, Instant::now()),
            Route::Follow { .. }
        ));
        // K back, then L: both sent, and the journal is empty again.
        assert_eq!(c.route("x", k_id, k, Instant::now()), Route::Send);
        assert_eq!(c.route("x", l_id, l, Instant::now()), Route::Send);
        c.done(k_id);
        c.done(l_id);
        mem.flush();
        assert!(mem.durable().chains.is_empty());
        assert!(mem.durable().known.is_empty());
        // A member due back while no process ran is likely in the work queue: it gets its
        // margin from the start of the new process, and is forgotten only after it.
        let lost_id = Uuid::new_v4();
        mem.write(
            "y",
            &[SavedMember {
                seq: k,
                back_ms: 1,
                id: lost_id,
            }],
        );
        let c = mem.restart();
        let t = Instant::now();
        let y = c.arrived("y", Uuid::new_v4(), None);
        assert!(matches!(c.route("y", NIL, y, t), Route::Follow { .. }));
        // Back after the lost member's margin: sent.
        let later = t + LOST_AFTER + Duration::from_secs(1);
        assert_eq!(c.route("y", NIL, y, later), Route::Send);
    }

    /// What happens next in the model of [`sends_happen_in_publish_order`].
    #[derive(Debug, Clone, Copy)]
    enum Step {
        /// The broker hands over the next message of the work queue (deferred if `true`).
        Arrive(bool),
        /// The lane works its oldest waiting job (it fails if `true`).
        Work(bool),
        /// The oldest republish of a deferred job in flight is confirmed, and the job acked.
        Confirm,
        /// The session is lost: every job in the process is handed back.
        Lose,
        /// The process stops: republishes in flight are confirmed, the jobs waiting are handed
        /// back, the journal is flushed; the next process knows only the journal.
        Stop,
        /// The process dies: every job in it is redelivered. If `true`, the republishes in
        /// flight went out (their jobs are redelivered as well; the journal was flushed before
        /// them); else the journal keeps the given number of the writes since its last flush.
        Crash(bool, u8),
    }

    fn step(failures: bool, stops: bool, crashes: bool) -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => any::<bool>().prop_map(Step::Arrive),
            4 => prop::bool::weighted(if failures { 0.3 } else { 0.0 }).prop_map(Step::Work),
            2 => Just(Step::Confirm),
            1 => Just(Step::Lose),
            1 => Just(Step::Stop),
            1 => (any::<bool>(), 0u8..8).prop_map(|(out, keep)| Step::Crash(out, keep)),
        ]
        .prop_map(move |step| match step {
            Step::Stop if !stops => Step::Confirm,
            Step::Crash(..) if !crashes => Step::Confirm,
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
        // consumed) as (job, header); the lane, in sequence order; republishes in
        // flight, with their tiers; the tiers as (return time, order, job, seq).
        let mut queue: VecDeque<(usize, Option<u64>)> = (0..jobs).map(|i| (i, None)).collect();
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
                queue.push_front((job, header));
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
                    let (job, header) = queue.pop_front().unwrap();
                    let seq = c.arrived("x", ids[job], header);
                    consumed += 1;
                    let it = (job, seq, header, consumed);
                    if defer {
                        let tier =
                            c.defer("x", ids[job], seq, now, lane.len(), Duration::from_secs(1));
                        flight.push_back((it, tier));
                        continue;
                    }
                    // Into its lane, in sequence order; routed at its turn.
                    let at = lane.partition_point(|j| j.1 < seq);
                    lane.insert(at, it);
                }
                Step::Confirm => {
                    // `Pipeline::park_deferred`: the journal flushed, the republish, the ack.
                    let ((job, seq, ..), tier) = flight.pop_front().unwrap();
                    mem.flush();
                    tier_out(&mut tiers_out, &mut order, now, tier, job, seq);
                    c.done(ids[job]);
                }
                Step::Lose => {
                    // A republish in flight fails with its session: the job goes back to its
                    // lane, and is handed back with the others.
                    let mut all = std::mem::take(&mut lane);
                    all.extend(flight.drain(..).map(|(it, _)| it));
                    for &(job, seq, ..) in &all {
                        c.handed_back("x", ids[job], seq, now);
                    }
                    requeue(&mut queue, all);
                }
                Step::Stop => {
                    mem.flush();
                    for ((job, seq, ..), tier) in flight.drain(..) {
                        tier_out(&mut tiers_out, &mut order, now, tier, job, seq);
                        c.done(ids[job]);
                    }
                    // The jobs waiting are handed back, and the store closed (flushed).
                    let all = std::mem::take(&mut lane);
                    requeue(&mut queue, all);
                    mem.flush();
                    // The wall clock goes on with the model's time.
                    c = mem.restart_at(now, start.1 + (now - start.0).as_millis() as u64);
                }
                Step::Crash(went_out, keep) => {
                    if went_out {
                        mem.flush();
                    } else {
                        mem.crash(usize::from(keep));
                    }
                    let mut all = std::mem::take(&mut lane);
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
                        // Sent (its record flushed), parked or following (the journal flushed
                        // before the republish); then acked.
                        match c.route("x", ids[job], seq, now) {
                            Route::Send if fail => {
                                c.parked("x", ids[job], seq, 0, now);
                                mem.flush();
                                tier_out(&mut tiers_out, &mut order, now, 0, job, seq);
                            }
                            Route::Send => {
                                mem.flush();
                                sent.push(job);
                            }
                            Route::Follow { seq, tier } => {
                                mem.flush();
                                tier_out(&mut tiers_out, &mut order, now, tier, job, seq);
                            }
                        }
                        c.done(ids[job]);
                    } else if !tiers_out.is_empty() {
                        // The next message to expire goes back to the work queue.
                        tiers_out.sort();
                        let (back, _, job, seq) = tiers_out.remove(0);
                        now = now.max(back);
                        queue.push_back((job, Some(seq)));
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

        /// ... and across crashes (the journal keeping any prefix of its unflushed writes),
        /// also while republishes were in flight.
        #[test]
        fn sends_keep_their_order_across_crashes(
            jobs in 1usize..12,
            steps in proptest::collection::vec(step(true, true, true), 0..60),
        ) {
            prop_assert_eq!(model(jobs, steps), (0..jobs).collect::<Vec<_>>());
        }
    }
}
