//! Fair use of the prefetch: no conversation, and not the keyless kinds together, may keep the
//! other conversations' jobs from reaching the worker.
//!
//! The broker hands the worker at most `prefetch` unacked deliveries. A conversation's jobs run
//! one at a time, and the ones waiting in its lane stay unacked: a conversation with hundreds of
//! queued jobs, or a burst of request-review jobs behind `BLINGER_WORKER_KEYLESS_CONCURRENCY=1`,
//! would fill the prefetch, and no other conversation's job would arrive until it drained.
//!
//! The rule (`BLINGER_WORKER_FAIR_SHARE` = `share`, 50 by default, off when 0), decided when a
//! delivery arrives: once the worker holds `prefetch − share` deliveries or more, a job arriving
//! for a conversation that already holds `share` of them — or a keyless job while the keyless
//! kinds hold `share` — makes the conversation give up one job not yet started ([`who_yields`]),
//! which is *deferred*: sent round a delay tier that keeps it behind its conversation's chain
//! ([`crate::engine::order`]), and acked. That is the arriving job, unless it comes back from a
//! tier older than the youngest job waiting in its lane and of the same class (keyless or not):
//! then it takes that one's place. The jobs kept are older and go first; younger ones follow the deferred one. So other
//! conversations always have at least `share` of the prefetch, and a conversation alone on the
//! worker is not slowed until the worker is nearly full. Nothing is deferred while the
//! worker is paused (nothing flows then), or with a prefetch below [`MIN_PREFETCH`].
//!
//! Deferral puts jobs in the tiers in normal operation, not only after Blinger failures, so the
//! chains are kept in the store ([`crate::engine::order`]): a deferred job keeps its place across a
//! restart or a crash of the worker (before that, the reliability suite's crash scenario
//! counted hundreds of overtakings with the share on).
//!
//! Cost: a deferred job is one republish and comes back after its tier's delay, so a
//! conversation with a backlog far beyond the share goes round the tiers a few times (measured
//! in README "Delivery guarantees").

/// Smallest prefetch that is shared (a share of at least 2).
pub const MIN_PREFETCH: usize = 8;

/// The share of the prefetch one conversation (or the keyless kinds) may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FairShare {
    prefetch: usize,
    share: usize,
}

/// What the worker holds when a delivery arrives (not counting it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Held {
    /// All deliveries not yet acked or handed back.
    pub total: usize,
    /// Those of the arriving job's conversation.
    pub conversation: usize,
    /// Those of the keyless kinds (request-review, assign-agent).
    pub keyless: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Into its conversation's lane.
    Lane,
    /// Round a delay tier, following its conversation.
    Defer,
}

impl FairShare {
    /// `share` of `prefetch` (at most half of it); 0 is off.
    pub fn new(prefetch: u16, share: u16) -> FairShare {
        let prefetch = usize::from(prefetch);
        if prefetch < MIN_PREFETCH || share == 0 {
            return FairShare::off();
        }
        FairShare {
            prefetch,
            share: usize::from(share).min(prefetch / 2),
        }
    }

    /// Nothing is ever deferred.
    pub fn off() -> FairShare {
        FairShare {
            prefetch: usize::MAX,
            share: usize::MAX,
        }
    }

    /// The share (`usize::MAX` when nothing is deferred).
    pub fn share(&self) -> usize {
        self.share
    }

    /// Where an arriving job goes.
    pub fn admit(&self, held: Held, keyless: bool) -> Admit {
        let crowded = held.total.saturating_add(self.share) >= self.prefetch;
        let over = held.conversation >= self.share || (keyless && held.keyless >= self.share);
        if crowded && over {
            Admit::Defer
        } else {
            Admit::Lane
        }
    }
}

/// A job of a conversation: its chain sequence, and whether it is of a keyless kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member {
    pub seq: u64,
    pub keyless: bool,
}

/// Which job leaves when [`FairShare::admit`] says [`Admit::Defer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Yield {
    /// The arriving job goes round a tier.
    Arriving,
    /// The arriving job takes the place of the youngest job waiting in its lane, which goes
    /// round a tier instead.
    Youngest,
}

/// Which of its jobs a conversation over its share gives up: the youngest waiting in its lane
/// if that one is younger than the arriving job and of its class, else the arriving job. An
/// arriving job is not always the youngest: a deferred job coming back from its
/// tier is older than the jobs its conversation took in meanwhile, and those cannot be sent
/// before it. Deferring it again would make all of them follow it round the tier (each one a
/// republish, in turn), and a conversation with a long backlog would go round and round while
/// its lane sends almost nothing (about one job a second, seen in CI). The swap changes no
/// count: the youngest waiting job is taken only if it is of the same class (keyless or not)
/// as the arriving one.
pub fn who_yields(arriving: Member, youngest_waiting: Option<Member>) -> Yield {
    match youngest_waiting {
        Some(youngest) if youngest.seq > arriving.seq && youngest.keyless == arriving.keyless => {
            Yield::Youngest
        }
        _ => Yield::Arriving,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_conversation_alone_fills_the_worker_up_to_the_share_of_the_others() {
        let fair = FairShare::new(200, 50);
        assert_eq!(fair.share(), 50);
        let alone = |n| Held {
            total: n,
            conversation: n,
            keyless: 0,
        };
        assert_eq!(fair.admit(alone(149), false), Admit::Lane);
        assert_eq!(fair.admit(alone(150), false), Admit::Defer);
        // A small conversation is never deferred, however full the worker.
        let small = Held {
            total: 199,
            conversation: 49,
            keyless: 0,
        };
        assert_eq!(fair.admit(small, false), Admit::Lane);
    }

    #[test]
    fn the_keyless_kinds_share_one_share() {
        let fair = FairShare::new(200, 50);
        let held = Held {
            total: 160,
            conversation: 0,
            keyless: 50,
        };
        assert_eq!(fair.admit(held, true), Admit::Defer);
        assert_eq!(fair.admit(held, false), Admit::Lane);
        assert_eq!(
            fair.admit(
                Held {
                    keyless: 49,
                    ..held
                },
                true
            ),
            Admit::Lane
        );
    }

    #[test]
    fn a_small_prefetch_is_not_shared() {
        let fair = FairShare::new(7, 2);
        let full = Held {
            total: 6,
            conversation: 6,
            keyless: 6,
        };
        assert_eq!(fair.admit(full, true), Admit::Lane);
        assert_eq!(FairShare::new(8, 2).admit(full, true), Admit::Defer);
        assert_eq!(FairShare::new(200, 0).admit(full, true), Admit::Lane, "off");
        assert_eq!(FairShare::new(200, 150).share(), 100, "at most half");
    }

    #[test]
    fn the_conversations_youngest_job_yields() {
        let m = |seq, keyless| Member { seq, keyless };
        assert_eq!(who_yields(m(5, false), None), Yield::Arriving);
        assert_eq!(who_yields(m(5, false), Some(m(9, false))), Yield::Youngest);
        assert_eq!(who_yields(m(9, false), Some(m(5, false))), Yield::Arriving);
        // Another class: swapping would change the keyless count.
        assert_eq!(who_yields(m(5, true), Some(m(9, false))), Yield::Arriving);
        assert_eq!(who_yields(m(5, true), Some(m(9, true))), Yield::Youngest);
    }

    proptest! {
        /// A lane over its share that keeps its waiting jobs in sequence order and lets
        /// [`who_yields`] pick the job to defer: whatever comes back from the tiers, in whatever
        /// order, it keeps the oldest jobs it has seen, so its head is never a job that has to
        /// wait for one it sent away.
        #[test]
        fn a_lane_over_its_share_keeps_its_oldest_jobs(
            arrivals in proptest::collection::vec(0u64..1000, 1..300),
            keyless in any::<bool>(),
            capacity in 1usize..20,
        ) {
            let mut waiting: Vec<Member> = Vec::new();
            let mut deferred: Vec<Member> = Vec::new();
            for seq in arrivals {
                let arriving = Member { seq, keyless };
                if waiting.len() < capacity {
                    waiting.push(arriving);
                } else {
                    match who_yields(arriving, waiting.last().copied()) {
                        Yield::Arriving => deferred.push(arriving),
                        Yield::Youngest => {
                            deferred.push(waiting.pop().expect("over its share"));
                            waiting.push(arriving);
                        }
                    }
                }
                waiting.sort_by_key(|m| m.seq);
                prop_assert!(waiting.len() <= capacity);
                let youngest = waiting.last().expect("one at least").seq;
                for d in &deferred {
                    prop_assert!(d.seq >= youngest, "deferred {} while keeping {:?}", d.seq, waiting);
                }
            }
        }
    }

    proptest! {
        /// Deliveries arriving in any order: no conversation, nor the keyless kinds, ever holds
        /// more than `prefetch − share`, so the others always have `share` of the prefetch; and
        /// nothing is deferred while the worker has room for everybody.
        #[test]
        fn the_others_always_keep_their_share(
            prefetch in 8u16..400,
            share in 1u16..400,
            arrivals in proptest::collection::vec((0usize..4, any::<bool>()), 0..2000),
            finishes in proptest::collection::vec(any::<bool>(), 0..2000),
        ) {
            let fair = FairShare::new(prefetch, share);
            let prefetch = usize::from(prefetch);
            let mut by_conv = [0usize; 4];
            let mut keyless = 0usize;
            let mut held: Vec<(usize, bool)> = Vec::new();
            for (i, (conv, is_keyless)) in arrivals.into_iter().enumerate() {
                if held.len() == prefetch || finishes.get(i).copied().unwrap_or(false) {
                    // The broker sends nothing beyond the prefetch: one job finishes first.
                    if let Some((c, k)) = held.pop() {
                        by_conv[c] -= 1;
                        keyless -= usize::from(k);
                    }
                }
                let now = Held { total: held.len(), conversation: by_conv[conv], keyless };
                match fair.admit(now, is_keyless) {
                    Admit::Lane => {
                        held.push((conv, is_keyless));
                        by_conv[conv] += 1;
                        keyless += usize::from(is_keyless);
                    }
                    Admit::Defer => prop_assert!(now.total + fair.share() >= prefetch),
                }
                prop_assert!(by_conv.iter().all(|&n| n <= prefetch - fair.share()));
                prop_assert!(keyless <= prefetch - fair.share());
            }
        }
    }
}
