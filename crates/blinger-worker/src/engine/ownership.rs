//! When a partition's jobs may go to the pipeline (partitioned mode, docs/scale-out.md 4.6).
//!
//! Each partition queue has a single active consumer: the broker hands a partition to one
//! consumer at a time, and gives it the jobs the previous one held, in order, when that one died
//! or left. AMQP 0.9.1 says nothing when a waiting consumer becomes the active one; its first
//! delivery is the only sign. That delivery may be a job the previous owner had already sent and
//! recorded in the delivered-records log a moment before it went, and this replica's reading of
//! the log may not have got that far yet.
//!
//! So a partition's first delivery of a session **closes its gate**: the delivery and every later
//! one of that partition are held, in delivery order, while the worker reads the log back to a
//! marker published after the activation ([`crate::broker::log::Barrier`]). Then the gate opens:
//! the held deliveries go to the pipeline in the order they came, and later ones go straight
//! through. Other partitions are not held up.
//!
//! Pure bookkeeping, no I/O: [`Gates`] says what to do with each delivery; the worker does it.

use std::mem;

/// What to do with one delivery of a partition.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit<D> {
    /// The partition's gate is open: to the pipeline now.
    Submit(D),
    /// The partition's first delivery of the session: held; start its barrier and call
    /// [`Gates::passed`] when the barrier is passed.
    Activated,
    /// The partition's barrier is still being passed: held behind the deliveries before it.
    Held,
}

#[derive(Debug)]
enum Gate<D> {
    /// No delivery yet in this session.
    Idle,
    /// Activated; the barrier is being passed. The held deliveries, in delivery order.
    Barrier(Vec<D>),
    Open,
}

/// The gates of one session's partition consumers, indexed by consumer.
#[derive(Debug)]
pub struct Gates<D> {
    gates: Vec<Gate<D>>,
}

impl<D> Gates<D> {
    /// `n` consumers. `guarded`: whether their first deliveries wait for a barrier
    /// (partitioned mode); unguarded gates are open from the start.
    pub fn new(n: usize, guarded: bool) -> Gates<D> {
        Gates {
            gates: (0..n)
                .map(|_| if guarded { Gate::Idle } else { Gate::Open })
                .collect(),
        }
    }

    /// A delivery of consumer `i`.
    pub fn deliver(&mut self, i: usize, delivery: D) -> Admit<D> {
        match &mut self.gates[i] {
            Gate::Open => Admit::Submit(delivery),
            Gate::Barrier(held) => {
                held.push(delivery);
                Admit::Held
            }
            gate @ Gate::Idle => {
                *gate = Gate::Barrier(vec![delivery]);
                Admit::Activated
            }
        }
    }

    /// Consumer `i`'s barrier is passed: its gate opens; the held deliveries, in the order they
    /// came, to be submitted before any later one.
    pub fn passed(&mut self, i: usize) -> Vec<D> {
        match mem::replace(&mut self.gates[i], Gate::Open) {
            Gate::Barrier(held) => held,
            Gate::Idle | Gate::Open => Vec::new(),
        }
    }

    /// Whether consumer `i` submits straight away.
    pub fn is_open(&self, i: usize) -> bool {
        matches!(self.gates[i], Gate::Open)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_first_delivery_waits_for_the_barrier_and_later_ones_queue_behind_it() {
        let mut gates = Gates::new(2, true);
        assert_eq!(gates.deliver(0, "a1"), Admit::Activated);
        assert_eq!(gates.deliver(0, "a2"), Admit::Held);
        // Another partition is not held up by this one's barrier.
        assert_eq!(gates.deliver(1, "b1"), Admit::Activated);
        assert_eq!(gates.passed(1), vec!["b1"]);
        assert_eq!(gates.deliver(1, "b2"), Admit::Submit("b2"));
        assert!(!gates.is_open(0));
        assert_eq!(gates.passed(0), vec!["a1", "a2"]);
        assert!(gates.is_open(0));
        assert_eq!(gates.deliver(0, "a3"), Admit::Submit("a3"));
    }

    #[test]
    fn single_queue_mode_has_no_barrier() {
        let mut gates = Gates::new(1, false);
        assert!(gates.is_open(0));
        assert_eq!(gates.deliver(0, 1), Admit::Submit(1));
    }

    #[derive(Debug, Clone)]
    enum Step {
        Deliver(usize),
        Pass(usize),
    }

    fn steps() -> impl Strategy<Value = Vec<Step>> {
        prop::collection::vec(
            prop_oneof![
                3 => (0..4usize).prop_map(Step::Deliver),
                1 => (0..4usize).prop_map(Step::Pass),
            ],
            0..64,
        )
    }

    proptest! {
        /// Whatever the interleaving of deliveries and barriers: per consumer, what reaches the
        /// pipeline is exactly its deliveries in the order they came (a prefix of them, the rest
        /// still held), and nothing of a consumer reaches it before its barrier is passed.
        #[test]
        fn the_pipeline_sees_each_partitions_deliveries_in_order_and_only_after_its_barrier(
            steps in steps()
        ) {
            let mut gates = Gates::new(4, true);
            let mut delivered: Vec<Vec<u32>> = vec![Vec::new(); 4];
            let mut submitted: Vec<Vec<u32>> = vec![Vec::new(); 4];
            let mut barrier_asked = [false; 4];
            let mut passed = [false; 4];
            let mut next = 0u32;
            for step in steps {
                match step {
                    Step::Deliver(i) => {
                        next += 1;
                        delivered[i].push(next);
                        match gates.deliver(i, next) {
                            Admit::Submit(d) => {
                                prop_assert!(passed[i]);
                                submitted[i].push(d);
                            }
                            Admit::Activated => {
                                prop_assert!(!barrier_asked[i], "one barrier per session");
                                barrier_asked[i] = true;
                            }
                            Admit::Held => prop_assert!(barrier_asked[i] && !passed[i]),
                        }
                    }
                    // The worker only reports a barrier it started.
                    Step::Pass(i) if barrier_asked[i] && !passed[i] => {
                        passed[i] = true;
                        submitted[i].extend(gates.passed(i));
                        prop_assert!(gates.is_open(i));
                    }
                    Step::Pass(_) => {}
                }
            }
            for i in 0..4 {
                prop_assert!(delivered[i].starts_with(&submitted[i]));
                if passed[i] {
                    prop_assert_eq!(&submitted[i], &delivered[i]);
                } else {
                    prop_assert!(submitted[i].is_empty());
                }
            }
        }
    }
}
