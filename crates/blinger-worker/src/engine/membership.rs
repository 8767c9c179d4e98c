//! Which replicas are live, and what share of the deployment's rate limit this one may use
//! (partitioned mode, docs/scale-out.md 4.8). Pure bookkeeping, no I/O: the broker side is
//! [`crate::broker::members`], the bucket that applies the share [`crate::engine::ratelimit`].
//!
//! Every replica publishes a heartbeat every [`Timing::interval`] to a fanout exchange that every
//! replica reads; a heartbeat lists the replicas its sender counts as live and the partitions it
//! **holds**: those that delivered to it in its current session (the broker gives a partition to
//! one consumer at a time, and to another only once that one's channel is gone). The limit is
//! split by held partitions, so it follows the load: a replica's share is
//! `(partitions it holds that every replica it counts has heard of) / (partitions held by all the
//! replicas it counts, itself included)`. One replica holding every busy partition (RabbitMQ
//! 3.10 gives every partition to the first subscriber) has all of the limit. It takes any share
//! only when
//! - **its lease holds**: it has read back one of its own heartbeats sent less than
//!   [`Timing::lease`] ago (it can still publish and read; a replica cut off from the broker,
//!   frozen or lagging behind its own queue stops sending within the lease);
//! - **it has listened** for a lease since it began (it has heard every replica that sends);
//! - **every replica it counts has counted it**: each one's latest heartbeat lists it, and lists
//!   a heartbeat of it sent since its last gap (see below); a partition it holds counts once
//!   every one of them lists a heartbeat that announced it.
//!
//! What it guarantees: **the shares of all replicas never sum above 1**, so the requests of the
//! whole deployment never exceed `BLINGER_WORKER_RATE_LIMIT` (and the buckets' capacities
//! `BLINGER_WORKER_RATE_BURST`, but for a capacity below one request rounded up to one). Every replica's denominator covers every partition counted in
//! anyone's numerator. Why:
//! - *A partition newly held* counts for its holder only once every replica the holder counts has
//!   listed a heartbeat that announced it: each of those already has it in its denominator, and
//!   has already lowered its own share. Holdings only grow within a session; they go with it.
//! - *A replica that joins* takes a share only after every replica it counts has listed it. A
//!   replica still silent to the newcomer after a lease of listening sends nothing (its lease
//!   lapsed).
//! - *A replica that leaves* (SIGTERM) sets its share to 0 before it says so; the others raise
//!   theirs when they read that.
//! - *A replica that dies* is dropped by the others [`Timing::grace`] after its lease would end:
//!   a silent replica `k` last heard at `r` ended its lease by `r + lease` (its heartbeat was sent
//!   before it was heard), and the others drop it at `r + lease + grace`. A reader lagging behind
//!   its own queue cannot drop a live replica early: `k`'s later heartbeats are in the same queue
//!   ahead of the reader's own, so the reader's lease lapses first (heartbeats go out every
//!   interval, and `interval` plus publishing jitter stays below `grace`).
//! - *A replica frozen or starved* for longer than [`Timing::max_gap`] between two heartbeats
//!   (a paused VM, CPU starvation) may have been dropped by a reader lagging behind its queue
//!   that has not read its heartbeats after the gap yet; it takes a share again only once every
//!   replica it counts lists one of its heartbeats sent after the gap.
//!
//! Outside the guarantee: a broker cluster split in two (each half's replicas hear only their
//! half), and a process frozen for longer than `grace` between taking a token and its request
//! leaving; both are stated in docs/scale-out.md 4.8.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

use tokio::time::Instant;
use uuid::Uuid;

/// One process's identity in the membership: random per start, so a restarted pod is a new
/// member and its previous life is dropped like any dead replica.
pub type Incarnation = Uuid;

/// Most replicas a heartbeat may list (the chart allows 16; more is refused as unreadable).
pub const MAX_MEMBERS: usize = 64;

/// What a replica says every interval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heartbeat {
    pub from: Incarnation,
    /// Counts up per heartbeat of one incarnation; the sender finds its send time by it.
    pub seq: u64,
    /// The replicas the sender counts as live, itself included, each with the `seq` of the
    /// latest heartbeat of it the sender has read (its own: this one's); empty when it leaves.
    pub counts: Vec<(Incarnation, u64)>,
    /// The partitions the sender holds; empty when it leaves.
    pub holds: Vec<u16>,
    /// The sender is stopping and has given up its share.
    pub leaving: bool,
}

/// The membership's clock settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// Between two heartbeats.
    pub interval: Duration,
    /// How long a heartbeat read back keeps the sender's share, and how long a replica listens
    /// before it takes one.
    pub lease: Duration,
    /// How much longer than a lease a silent replica is still counted by the others.
    pub grace: Duration,
    /// Longest gap between two own heartbeats after which a replica keeps its standing; after a
    /// longer one it must be counted again. Below `grace` minus the publishing jitter.
    pub max_gap: Duration,
}

impl Timing {
    /// Heartbeats twice a second; a share ends 1.5 s after the last heartbeat read back; a dead
    /// replica's share goes to the others 2.5 s after it was last heard.
    pub const DEFAULT: Timing = Timing {
        interval: Duration::from_millis(500),
        lease: Duration::from_millis(1500),
        grace: Duration::from_millis(1000),
        max_gap: Duration::from_millis(800),
    };
}

#[derive(Debug)]
struct Peer {
    heard_at: Instant,
    /// Its latest heartbeat's `seq`.
    seq: u64,
    /// The `seq` of this replica's heartbeat its latest heartbeat lists, if it lists this one.
    lists_me: Option<u64>,
    /// How many partitions it holds.
    holds: u32,
}

/// One replica's view of the membership, for one session.
#[derive(Debug)]
pub struct Membership {
    me: Incarnation,
    timing: Timing,
    began: Instant,
    next_seq: u64,
    last_sent: Option<Instant>,
    /// The first own heartbeat after the last gap longer than [`Timing::max_gap`] (0: the
    /// session's first): the others must list this one or a later one.
    standing_from: u64,
    /// Own heartbeats sent and not read back yet: `(seq, sent at)`.
    sent: VecDeque<(u64, Instant)>,
    lease_until: Option<Instant>,
    peers: HashMap<Incarnation, Peer>,
    /// The partitions held, each with the `seq` of the first heartbeat that announces it.
    held: BTreeMap<u16, u64>,
    leaving: bool,
}

impl Membership {
    pub fn new(me: Incarnation, timing: Timing, now: Instant) -> Membership {
        Membership {
            me,
            timing,
            began: now,
            next_seq: 0,
            last_sent: None,
            standing_from: 0,
            sent: VecDeque::new(),
            lease_until: None,
            peers: HashMap::new(),
            held: BTreeMap::new(),
            leaving: false,
        }
    }

    pub fn me(&self) -> Incarnation {
        self.me
    }

    pub fn timing(&self) -> Timing {
        self.timing
    }

    /// This replica's heartbeat, to be published now.
    pub fn heartbeat(&mut self, now: Instant) -> Heartbeat {
        let seq = self.next_seq;
        self.next_seq += 1;
        if self
            .last_sent
            .is_some_and(|last| now.saturating_duration_since(last) > self.timing.max_gap)
        {
            self.standing_from = seq;
        }
        self.last_sent = Some(now);
        // Only heartbeats young enough to give a lease are worth remembering.
        while self
            .sent
            .front()
            .is_some_and(|(_, at)| now.saturating_duration_since(*at) >= self.timing.lease)
        {
            self.sent.pop_front();
        }
        self.sent.push_back((seq, now));
        Heartbeat {
            from: self.me,
            seq,
            counts: if self.leaving {
                Vec::new()
            } else {
                std::iter::once((self.me, seq))
                    .chain(self.live_peers(now).map(|(id, peer)| (*id, peer.seq)))
                    .collect()
            },
            holds: if self.leaving {
                Vec::new()
            } else {
                self.held.keys().copied().collect()
            },
            leaving: self.leaving,
        }
    }

    /// Partition `p` delivered to this replica in this session. True when it is new: this one
    /// should beat at once, so that the others hear of it in a round trip, not an interval.
    pub fn hold(&mut self, p: u16) -> bool {
        let announced_by = self.next_seq;
        let mut new = false;
        self.held.entry(p).or_insert_with(|| {
            new = true;
            announced_by
        });
        new
    }

    /// A heartbeat read from the exchange (this replica's own ones included). True when it
    /// comes from a replica not counted before, or one that holds more than it did: this one
    /// should beat at once, so that the sender learns it is counted, or its holdings heard of,
    /// in a round trip, not an interval.
    pub fn heard(&mut self, heartbeat: &Heartbeat, now: Instant) -> bool {
        if heartbeat.from == self.me {
            while let Some((seq, at)) = self.sent.front().copied() {
                if seq > heartbeat.seq {
                    break;
                }
                self.sent.pop_front();
                if seq == heartbeat.seq {
                    let until = at + self.timing.lease;
                    if self.lease_until.is_none_or(|held| held < until) {
                        self.lease_until = Some(until);
                    }
                }
            }
            return false;
        }
        if heartbeat.leaving {
            self.peers.remove(&heartbeat.from);
            return false;
        }
        let limit = self.timing.lease + self.timing.grace;
        let holds = u32::try_from(heartbeat.holds.len()).unwrap_or(u32::MAX);
        let previous = self.peers.insert(
            heartbeat.from,
            Peer {
                heard_at: now,
                seq: heartbeat.seq,
                lists_me: heartbeat
                    .counts
                    .iter()
                    .find(|(id, _)| *id == self.me)
                    .map(|(_, seq)| *seq),
                holds,
            },
        );
        previous.is_none_or(|peer| {
            now.saturating_duration_since(peer.heard_at) >= limit || peer.holds < holds
        })
    }

    /// This replica stops: its share is 0 from now on, and its next heartbeat says it leaves.
    pub fn leave(&mut self) {
        self.leaving = true;
    }

    /// Drops the replicas silent for longer than a lease and its grace.
    pub fn expire(&mut self, now: Instant) {
        let limit = self.timing.lease + self.timing.grace;
        self.peers
            .retain(|_, peer| now.saturating_duration_since(peer.heard_at) < limit);
    }

    fn live_peers(&self, now: Instant) -> impl Iterator<Item = (&Incarnation, &Peer)> {
        let limit = self.timing.lease + self.timing.grace;
        self.peers
            .iter()
            .filter(move |(_, peer)| now.saturating_duration_since(peer.heard_at) < limit)
    }

    /// The replicas counted as live now, this one first.
    pub fn counted(&self, now: Instant) -> Vec<Incarnation> {
        let mut peers: Vec<Incarnation> = self.live_peers(now).map(|(id, _)| *id).collect();
        peers.sort();
        std::iter::once(self.me).chain(peers).collect()
    }

    /// The fraction of the deployment's rate this replica may use now.
    pub fn share(&self, now: Instant) -> Share {
        if self.leaving {
            return Share::None(Waiting::Leaving);
        }
        if self.lease_until.is_none_or(|until| now >= until) {
            return Share::None(Waiting::Lease);
        }
        if now.saturating_duration_since(self.began) < self.timing.lease {
            return Share::None(Waiting::Listening);
        }
        let mut heard_up_to = u64::MAX;
        let mut among = u32::try_from(self.held.len()).unwrap_or(u32::MAX);
        for (_, peer) in self.live_peers(now) {
            match peer.lists_me {
                Some(seq) if seq >= self.standing_from => heard_up_to = heard_up_to.min(seq),
                _ => return Share::None(Waiting::Counted),
            }
            among = among.saturating_add(peer.holds);
        }
        let held = self
            .held
            .values()
            .filter(|announced_by| **announced_by <= heard_up_to)
            .count();
        match u32::try_from(held).unwrap_or(u32::MAX) {
            0 => Share::None(Waiting::Holding),
            held => Share::Of { held, among },
        }
    }
}

/// What [`Membership::share`] allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Share {
    /// `held / among` of the deployment's rate: this replica holds `held` partitions every
    /// replica it counts has heard of, of `among` held by them all.
    Of { held: u32, among: u32 },
    /// Nothing yet, or no longer.
    None(Waiting),
}

/// Why a replica has no share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waiting {
    /// No own heartbeat read back within the lease (just started, cut off, or lagging).
    Lease,
    /// Listening for the other replicas, for a lease after the start of the session.
    Listening,
    /// Some replica it counts does not count it yet.
    Counted,
    /// No partition it holds is heard of by every replica it counts yet (or it holds none: it
    /// has nothing to send).
    Holding,
    /// Stopping.
    Leaving,
}

impl Share {
    pub fn fraction(self) -> f64 {
        match self {
            Share::Of { held, among } => f64::from(held) / f64::from(among.max(held)),
            Share::None(_) => 0.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const T: Timing = Timing::DEFAULT;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Two replicas, heartbeats delivered at once. The first holds every partition (as the first
    /// subscriber does on RabbitMQ 3.10) and keeps all of the limit when the second joins; the
    /// limit is split only when the second holds partitions too, and each new holding counts
    /// only once the other has heard of it.
    #[test]
    fn the_limit_follows_the_partitions_held_and_each_holding_waits_to_be_heard() {
        let t0 = Instant::now();
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let mut first = Membership::new(a, T, t0);
        for p in 0..4 {
            assert!(first.hold(p));
        }
        assert!(!first.hold(0), "already held");
        // Alone: after a lease of listening and its own heartbeat read back, all of it.
        let hb = first.heartbeat(t0 + ms(1500));
        first.heard(&hb, t0 + ms(1501));
        assert_eq!(first.share(t0 + ms(1501)), Share::Of { held: 4, among: 4 });

        let joined = t0 + ms(2000);
        let mut second = Membership::new(b, T, joined);
        let hb = second.heartbeat(joined);
        second.heard(&hb, joined);
        assert!(first.heard(&hb, joined), "a new member: beat at once");
        // The first one holds back until the newcomer counts it too (a newcomer that has not
        // heard it yet might otherwise take the whole).
        assert_eq!(first.share(joined), Share::None(Waiting::Counted));
        let hb = first.heartbeat(joined + ms(1));
        assert!(
            second.heard(&hb, joined + ms(2)),
            "a new member: beat at once"
        );
        let hb = second.heartbeat(joined + ms(2));
        assert!(!first.heard(&hb, joined + ms(3)), "nothing new");
        second.heard(&hb, joined + ms(3));
        assert_eq!(first.share(joined + ms(3)), Share::Of { held: 4, among: 4 });
        // A partition handed to the newcomer while it listens (the first had lost it with its
        // session in real life; here the counts are what matter): the first one makes room at
        // once; the newcomer counts it once it has listened and the first has heard of it.
        let at = joined + ms(10);
        assert!(second.hold(9));
        let hb = second.heartbeat(at);
        second.heard(&hb, at);
        assert!(first.heard(&hb, at), "holds more: beat at once");
        assert_eq!(first.share(at), Share::Of { held: 4, among: 5 });
        assert_eq!(second.share(at), Share::None(Waiting::Listening));
        // Beating and reading every 500 ms, as the worker does.
        let mut at = at;
        for _ in 0..3 {
            at += ms(500);
            let beats = [first.heartbeat(at), second.heartbeat(at)];
            for hb in &beats {
                first.heard(hb, at);
                second.heard(hb, at);
            }
        }
        assert_eq!(second.share(at), Share::Of { held: 1, among: 5 });
        assert_eq!(first.share(at), Share::Of { held: 4, among: 5 });
        // A heartbeat of the first one that does not list the second (sent before it heard
        // it, read late) holds the second back again.
        let mut stale = first.heartbeat(at);
        stale.counts.retain(|(m, _)| *m != b);
        second.heard(&stale, at + ms(1));
        assert_eq!(second.share(at + ms(1)), Share::None(Waiting::Counted));
        // A newcomer that holds nothing has nothing to send.
        let mut third = Membership::new(Uuid::from_u128(3), T, t0);
        let hb = third.heartbeat(t0 + ms(1500));
        third.heard(&hb, t0 + ms(1500));
        assert_eq!(third.share(t0 + ms(1500)), Share::None(Waiting::Holding));
    }

    #[test]
    fn a_share_ends_with_the_lease_and_at_leaving() {
        let t0 = Instant::now();
        let mut m = Membership::new(Uuid::from_u128(1), T, t0);
        m.hold(3);
        let hb = m.heartbeat(t0 + ms(1000));
        // Read back late: the lease runs from the send time.
        m.heard(&hb, t0 + ms(2000));
        assert_eq!(m.share(t0 + ms(2000)), Share::Of { held: 1, among: 1 });
        assert_eq!(m.share(t0 + ms(2500)), Share::None(Waiting::Lease));
        let hb = m.heartbeat(t0 + ms(2500));
        m.heard(&hb, t0 + ms(2501));
        m.leave();
        assert_eq!(m.share(t0 + ms(2501)), Share::None(Waiting::Leaving));
        let last = m.heartbeat(t0 + ms(2600));
        assert!(last.leaving && last.counts.is_empty() && last.holds.is_empty());
    }

    #[test]
    fn a_silent_replica_is_counted_for_a_lease_and_its_grace() {
        let t0 = Instant::now();
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let mut m = Membership::new(a, T, t0);
        let mut other = Membership::new(b, T, t0);
        let hb = other.heartbeat(t0);
        m.heard(&hb, t0);
        assert_eq!(m.counted(t0 + ms(2499)), vec![a, b]);
        assert_eq!(m.counted(t0 + ms(2500)), vec![a]);
        m.expire(t0 + ms(2500));
        assert!(m.peers.is_empty());
    }

    /// The case the gap rule is for (found by the model below): a replica frozen for 1.3 s
    /// beats again and reads its own heartbeat back, while the other one lags behind its queue,
    /// has not read that heartbeat, and drops the frozen one 2.5 s after it last heard it.
    #[test]
    fn a_replica_back_from_a_freeze_is_counted_again_before_it_takes_a_share() {
        let t0 = Instant::now();
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let mut first = Membership::new(a, T, t0);
        let mut frozen = Membership::new(b, T, t0);
        first.hold(0);
        frozen.hold(1);
        let a0 = first.heartbeat(t0);
        let b0 = frozen.heartbeat(t0);
        first.heard(&a0, t0);
        first.heard(&b0, t0);
        let a1 = first.heartbeat(t0 + ms(500));
        let a2 = first.heartbeat(t0 + ms(1100));
        first.heard(&a1, t0 + ms(600));
        // Back after 1.3 s: reads everything, its own heartbeat last.
        let b1 = frozen.heartbeat(t0 + ms(1300));
        for hb in [&a0, &b0, &a1, &a2, &b1] {
            frozen.heard(hb, t0 + ms(1310));
        }
        // The first one beats on, and reads its own heartbeat of 1.1 s, not yet the frozen one's
        // of 1.3 s behind it.
        first.heartbeat(t0 + ms(1600));
        first.heard(&a2, t0 + ms(2000));
        first.heartbeat(t0 + ms(2100));
        let now = t0 + ms(2550);
        assert_eq!(
            first.share(now),
            Share::Of { held: 1, among: 1 },
            "it dropped the silent one"
        );
        assert_eq!(
            frozen.share(now),
            Share::None(Waiting::Counted),
            "a2 lists only its heartbeat before the gap"
        );
        // Beating on as usual, and once the first one has read up and said so, both have half.
        let b2 = frozen.heartbeat(t0 + ms(1800));
        frozen.heard(&b2, t0 + ms(1801));
        let b3 = frozen.heartbeat(t0 + ms(2300));
        frozen.heard(&b3, t0 + ms(2301));
        for hb in [&b1, &b2, &b3] {
            first.heard(hb, t0 + ms(2600));
        }
        let a3 = first.heartbeat(t0 + ms(2600));
        first.heard(&a3, t0 + ms(2610));
        frozen.heard(&a3, t0 + ms(2610));
        assert_eq!(first.share(t0 + ms(2611)), Share::Of { held: 1, among: 2 });
        assert_eq!(frozen.share(t0 + ms(2611)), Share::Of { held: 1, among: 2 });
    }

    /// One replica of the model: its membership, its inbox (its exclusive queue), and whether it
    /// is running, frozen or gone.
    struct Node {
        m: Membership,
        inbox: VecDeque<Heartbeat>,
        alive: bool,
        frozen: bool,
        last_beat: Instant,
        /// The partitions the broker has given it (one live consumer per partition).
        holds: std::collections::BTreeSet<u16>,
    }

    #[derive(Debug, Clone)]
    enum Step {
        /// Time passes (ms, ≤ 200: heartbeats go out at most this late).
        Wait(u64),
        /// A node reads up to this many messages of its inbox.
        Read(usize, usize),
        Join,
        Kill(usize),
        Leave(usize),
        Freeze(usize),
        Thaw(usize),
        /// The broker gives a node a partition no live node holds (its first delivery).
        Hold(usize, u16),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            6 => (1u64..200).prop_map(Step::Wait),
            6 => (0usize..8, 1usize..6).prop_map(|(n, k)| Step::Read(n, k)),
            1 => Just(Step::Join),
            1 => (0usize..8).prop_map(Step::Kill),
            1 => (0usize..8).prop_map(Step::Leave),
            1 => (0usize..8).prop_map(Step::Freeze),
            1 => (0usize..8).prop_map(Step::Thaw),
            3 => (0usize..8, 0u16..6).prop_map(|(n, p)| Step::Hold(n, p)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        /// Replicas join, read late, freeze, die, leave and are given partitions in any order,
        /// over one fanout exchange that puts every heartbeat in every bound queue at once; a
        /// partition goes to one live replica at a time, and to another only once that one is
        /// gone. A frozen or dead replica sends nothing while frozen; when it thaws, it may send
        /// as soon as its own view allows. At every moment the shares of the replicas that may
        /// send sum to at most one. And once things are quiet, each live replica has exactly its
        /// partitions' part.
        #[test]
        fn the_shares_never_sum_above_the_whole(steps in prop::collection::vec(step(), 1..300)) {
            let t0 = Instant::now();
            let mut now = t0;
            let mut next_id = 0u128;
            let mut nodes: Vec<Node> = Vec::new();
            let new_node = |now: Instant, next_id: &mut u128| {
                *next_id += 1;
                Node {
                    m: Membership::new(Uuid::from_u128(*next_id), T, now),
                    inbox: VecDeque::new(),
                    alive: true,
                    frozen: false,
                    last_beat: now - T.interval,
                    holds: Default::default(),
                }
            };
            nodes.push(new_node(now, &mut next_id));
            let publish = |nodes: &mut Vec<Node>, from: usize, now: Instant| {
                let hb = nodes[from].m.heartbeat(now);
                for node in nodes.iter_mut().filter(|n| n.alive) {
                    node.inbox.push_back(hb.clone());
                }
            };
            for s in steps {
                match s {
                    Step::Wait(d) => {
                        now += ms(d);
                        for i in 0..nodes.len() {
                            let n = &nodes[i];
                            if n.alive && !n.frozen && now - n.last_beat >= T.interval {
                                nodes[i].last_beat = now;
                                publish(&mut nodes, i, now);
                            }
                        }
                    }
                    Step::Read(i, k) => {
                        if let Some(node) = nodes.get_mut(i).filter(|n| n.alive && !n.frozen) {
                            for _ in 0..k {
                                let Some(hb) = node.inbox.pop_front() else { break };
                                node.m.heard(&hb, now);
                            }
                            node.m.expire(now);
                        }
                    }
                    Step::Join => {
                        if nodes.iter().filter(|n| n.alive).count() < 8 {
                            nodes.push(new_node(now, &mut next_id));
                        }
                    }
                    Step::Kill(i) => if let Some(n) = nodes.get_mut(i) { n.alive = false },
                    Step::Leave(i) => {
                        if nodes.get(i).is_some_and(|n| n.alive && !n.frozen) {
                            nodes[i].m.leave();
                            publish(&mut nodes, i, now);
                            nodes[i].alive = false;
                        }
                    }
                    Step::Freeze(i) => if let Some(n) = nodes.get_mut(i) { n.frozen = true },
                    Step::Thaw(i) => if let Some(n) = nodes.get_mut(i) { n.frozen = false },
                    Step::Hold(i, p) => {
                        let free = nodes.iter().all(|n| !n.alive || !n.holds.contains(&p));
                        if free && nodes.get(i).is_some_and(|n| n.alive && !n.frozen) {
                            nodes[i].holds.insert(p);
                            nodes[i].m.hold(p);
                        }
                    }
                }
                let total: f64 = nodes
                    .iter()
                    .filter(|n| n.alive && !n.frozen)
                    .map(|n| n.m.share(now).fraction())
                    .sum();
                prop_assert!(total <= 1.0 + 1e-9, "shares sum to {total} at {:?}", now - t0);
            }
            // Quiet: everyone thaws, beats and reads for a while.
            for n in &mut nodes {
                n.frozen = false;
            }
            for _ in 0..40 {
                now += ms(100);
                for i in 0..nodes.len() {
                    if nodes[i].alive && now - nodes[i].last_beat >= T.interval {
                        nodes[i].last_beat = now;
                        publish(&mut nodes, i, now);
                    }
                }
                for node in nodes.iter_mut().filter(|n| n.alive) {
                    while let Some(hb) = node.inbox.pop_front() {
                        node.m.heard(&hb, now);
                    }
                    node.m.expire(now);
                }
            }
            let among = nodes.iter().filter(|n| n.alive).map(|n| n.holds.len() as u32).sum();
            for node in nodes.iter().filter(|n| n.alive) {
                let expected = match node.holds.len() as u32 {
                    0 => Share::None(Waiting::Holding),
                    held => Share::Of { held, among },
                };
                prop_assert_eq!(node.m.share(now), expected);
            }
        }
    }
}
