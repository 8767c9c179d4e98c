//! Per-conversation order across delay tiers.
//!
//! The dispatcher keeps a conversation's jobs in order while they are in this process. A job that
//! is parked in a delay tier leaves the process, and the jobs behind it must not overtake it. So a
//! conversation with jobs out in the tiers has a *chain*: every job that leaves for a tier (parked
//! after failures, or following) gets a sequence number, carried in the `x-blinger-chain` header.
//! While any member is out, a new job of the conversation joins the chain instead of being sent;
//! a member coming back is sent only if no older member is still out, otherwise it goes round
//! again. Sequence numbers grow across restarts (they start from the clock), so members from an
//! earlier run count as older.
//!
//! Limits: the chain lives in memory. After a restart the members still out are unknown, so a new
//! job may overtake them; and a member that never comes back (its tier purged) is forgotten after
//! its expected return plus a margin, so one lost message cannot block its conversation forever.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

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
    next_seq: AtomicU64,
    tiers: Vec<Duration>,
}

impl Chains {
    pub fn new(tiers: Vec<Duration>) -> Chains {
        let start = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(1);
        Chains {
            chains: Mutex::new(HashMap::new()),
            next_seq: AtomicU64::new(start),
            tiers,
        }
    }

    /// Routes a job of `conversation` that arrived with chain sequence `seq` (from its header).
    pub fn route(&self, conversation: &str, seq: Option<u64>, now: Instant) -> Route {
        let mut chains = self.chains.lock().expect("chains lock");
        let Some(out) = chains.get_mut(conversation) else {
            return Route::Send;
        };
        out.retain(|_, back| *back + LOST_AFTER > now);
        if let Some(seq) = seq {
            out.remove(&seq);
        }
        let older_out = match seq {
            Some(seq) => out.range(..seq).next().is_some(),
            None => !out.is_empty(),
        };
        if !older_out {
            if out.is_empty() {
                chains.remove(conversation);
            }
            return Route::Send;
        }
        let latest = out.values().max().copied().unwrap_or(now);
        let tier = self
            .tiers
            .iter()
            // Same tier: FIFO keeps it behind. Another tier ending at the same moment may race;
            // then the member that comes back first simply goes round again.
            .position(|d| now + *d >= latest)
            .unwrap_or(self.tiers.len() - 1);
        let seq = seq.unwrap_or_else(|| self.new_seq());
        out.insert(seq, now + self.tiers[tier]);
        Route::Follow { seq, tier }
    }

    /// Records that a job left for `tier` after failing. Returns the sequence for its header.
    pub fn parked(&self, conversation: &str, seq: Option<u64>, tier: usize, now: Instant) -> u64 {
        let seq = seq.unwrap_or_else(|| self.new_seq());
        self.chains
            .lock()
            .expect("chains lock")
            .entry(conversation.to_owned())
            .or_default()
            .insert(seq, now + self.tiers[tier]);
        seq
    }

    /// Member `seq` of `conversation` is no longer out: it came back and left in another way
    /// than being sent or parked (a duplicate, expired, a conflict), or the republish that would
    /// have sent it out was not confirmed. Without this, a member that is not out would hold up
    /// its conversation, or stay in memory for good.
    pub fn leave(&self, conversation: &str, seq: u64) {
        let mut chains = self.chains.lock().expect("chains lock");
        if let Some(out) = chains.get_mut(conversation) {
            out.remove(&seq);
            if out.is_empty() {
                chains.remove(conversation);
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
        assert_eq!(c.route("x", None, t0), Route::Send);
        let a = c.parked("x", None, 0, t0); // A failed: out until t0+5
        let Route::Follow { seq: b, tier: 0 } = c.route("x", None, t0) else {
            panic!("B must follow A into tier 0")
        };
        assert!(b > a);
        // A back at t0+5 and parked again, into the 30 s tier.
        let t5 = t0 + Duration::from_secs(5);
        assert_eq!(c.route("x", Some(a), t5), Route::Send);
        c.parked("x", Some(a), 1, t5);
        // B back: A is still out, so B goes round again, into a tier that ends after A's.
        let t6 = t0 + Duration::from_secs(6);
        assert_eq!(c.route("x", Some(b), t6), Route::Follow { seq: b, tier: 1 });
        // A new job C joins the chain too.
        let Route::Follow { seq: cc, .. } = c.route("x", None, t6) else {
            panic!("C must follow")
        };
        assert!(cc > b);
        // A back and delivered; B back: nothing older out, sent; C back: sent.
        let t35 = t5 + Duration::from_secs(30);
        assert_eq!(c.route("x", Some(a), t35), Route::Send);
        let t37 = t6 + Duration::from_secs(31);
        assert_eq!(c.route("x", Some(b), t37), Route::Send);
        assert_eq!(c.route("x", Some(cc), t37), Route::Send);
        assert!(c.is_empty());
        // Other conversations are never affected.
        c.parked("x", None, 0, t37);
        assert_eq!(c.route("y", None, t37), Route::Send);
    }

    #[test]
    fn a_member_that_leaves_otherwise_holds_nothing_up() {
        let c = Chains::new(tiers());
        let t0 = Instant::now();
        // Parked, but its republish was refused: it never went out.
        let a = c.parked("x", None, 0, t0);
        c.leave("x", a);
        assert_eq!(c.route("x", None, t0), Route::Send, "no phantom member");
        assert!(c.is_empty());
        // A member that comes back as a duplicate (or expired) is not sent, and leaves.
        let b = c.parked("y", None, 0, t0);
        c.leave("y", b);
        assert!(c.is_empty(), "nothing kept for the conversation");
        // Leaving keeps the other members.
        let d = c.parked("z", None, 0, t0);
        let Route::Follow { seq: e, .. } = c.route("z", None, t0) else {
            panic!("e follows d")
        };
        c.leave("z", d);
        assert_eq!(c.route("z", Some(e), t0), Route::Send);
    }

    #[test]
    fn a_lost_member_does_not_block_its_conversation_forever() {
        let c = Chains::new(tiers());
        let t0 = Instant::now();
        c.parked("x", None, 0, t0);
        assert!(matches!(c.route("x", None, t0), Route::Follow { .. }));
        let later = t0 + Duration::from_secs(5) + LOST_AFTER + Duration::from_secs(40);
        assert_eq!(c.route("x", None, later), Route::Send);
    }

    proptest! {
        /// A conversation's jobs, each failing at random, come out of the chain in publish order.
        #[test]
        fn sends_happen_in_publish_order(fails in proptest::collection::vec(0u8..3, 1..12)) {
            let c = Chains::new(tiers());
            let mut now = Instant::now();
            // The work queue (FIFO) and the tiers, as (return time, job, seq).
            let mut queue: VecDeque<(usize, Option<u64>)> = (0..fails.len()).map(|i| (i, None)).collect();
            let mut tiers_out: Vec<(Instant, u64, usize, Option<u64>)> = Vec::new();
            let mut failures_left = fails.clone();
            let mut sent = Vec::new();
            let mut order = 0u64;
            for _ in 0..10_000 {
                if let Some((job, seq)) = queue.pop_front() {
                    match c.route("x", seq, now) {
                        Route::Send => {
                            if failures_left[job] > 0 {
                                failures_left[job] -= 1;
                                let seq = c.parked("x", seq, 0, now);
                                order += 1;
                                tiers_out.push((now + tiers()[0], order, job, Some(seq)));
                            } else {
                                sent.push(job);
                            }
                        }
                        Route::Follow { seq, tier } => {
                            order += 1;
                            tiers_out.push((now + tiers()[tier], order, job, Some(seq)));
                        }
                    }
                    continue;
                }
                if tiers_out.is_empty() {
                    break;
                }
                // The next message to expire goes back to the work queue.
                tiers_out.sort();
                let (back, _, job, seq) = tiers_out.remove(0);
                now = now.max(back);
                queue.push_back((job, seq));
            }
            prop_assert_eq!(sent, (0..fails.len()).collect::<Vec<_>>());
        }
    }
}
