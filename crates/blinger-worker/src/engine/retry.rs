//! Retry policy: how long to wait before the next call, and when to stop waiting in-process.
//!
//! A transiently failing job is first retried in-process with exponential backoff and jitter (the
//! `backoff` crate, kept behind this module so it can be swapped: it carries a RustSec
//! "unmaintained" advisory). When the in-process budget is spent, or Blinger asks for a wait longer
//! than is sensible to hold a message for, the job is parked in a durable delay tier; after the
//! last tier it is given up (dead-lettered as `retries-exhausted`).

use std::time::Duration;

use backoff::ExponentialBackoff;
use backoff::backoff::Backoff as _;

/// What to do after a transient failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Sleep this long, then call again in-process.
    Wait(Duration),
    /// Republish to delay tier `tier` (index into the tiers) and ack the original.
    Park { tier: usize },
    /// No tier left: dead-letter.
    GiveUp,
}

#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub initial_interval: Duration,
    pub max_interval: Duration,
    pub multiplier: f64,
    pub randomization_factor: f64,
    /// Calls per round (the first call included) before parking.
    pub max_in_process_attempts: u32,
    /// A `Retry-After` above this is not waited for in-process: the job is parked instead, so it
    /// does not hold a prefetch slot and its conversation's lane for minutes.
    pub max_in_process_wait: Duration,
    /// Delay of each durable tier, in order.
    pub tiers: Vec<Duration>,
}

impl RetryPolicy {
    pub fn new(max_in_process_attempts: u32, tiers: Vec<Duration>) -> Self {
        RetryPolicy {
            initial_interval: Duration::from_millis(250),
            max_interval: Duration::from_secs(5),
            multiplier: 2.0,
            randomization_factor: 0.5,
            max_in_process_attempts,
            max_in_process_wait: Duration::from_secs(30),
            tiers,
        }
    }

    /// A fresh in-process round for one job. `retries` is how many times the job has already been
    /// parked (from its `x-blinger-retries` header).
    pub fn round(&self, retries: u32) -> Round<'_> {
        let backoff = ExponentialBackoff {
            current_interval: self.initial_interval,
            initial_interval: self.initial_interval,
            randomization_factor: self.randomization_factor,
            multiplier: self.multiplier,
            max_interval: self.max_interval,
            max_elapsed_time: None,
            ..ExponentialBackoff::default()
        };
        Round {
            policy: self,
            backoff,
            failures: 0,
            retries,
        }
    }

    /// The tier to park in after `retries` earlier parks, honouring a long `Retry-After` by
    /// skipping to the first tier at least that long.
    pub fn tier_for(&self, retries: u32, retry_after: Option<Duration>) -> Option<usize> {
        let first = retries as usize;
        if first >= self.tiers.len() {
            return None;
        }
        let wanted = retry_after.unwrap_or_default();
        Some(
            (first..self.tiers.len())
                .find(|&i| self.tiers[i] >= wanted)
                .unwrap_or(self.tiers.len() - 1),
        )
    }
}

/// The retry state of one job within one delivery.
pub struct Round<'a> {
    policy: &'a RetryPolicy,
    backoff: ExponentialBackoff,
    failures: u32,
    retries: u32,
}

impl Round<'_> {
    /// Decides after a transient failure. `retry_after` is Blinger's `Retry-After`, if any.
    pub fn after_failure(&mut self, retry_after: Option<Duration>) -> Next {
        self.failures += 1;
        let delay = self
            .backoff
            .next_backoff()
            .unwrap_or(self.policy.max_interval);
        let delay = delay.max(retry_after.unwrap_or_default());
        if self.failures < self.policy.max_in_process_attempts
            && delay <= self.policy.max_in_process_wait
        {
            return Next::Wait(delay);
        }
        match self.park_tier(retry_after) {
            Some(tier) => Next::Park { tier },
            None => Next::GiveUp,
        }
    }

    /// The tier to park in now, without waiting in-process (e.g. when shutting down during a
    /// backoff); `None` when no tier is left (give up).
    pub fn park_tier(&self, retry_after: Option<Duration>) -> Option<usize> {
        self.policy.tier_for(self.retries, retry_after)
    }
}

/// A plain exponential wait: `first`, then times `factor` after each wait, never above `cap`.
/// Every loop that waits and tries again uses it — reconnects, an unreadable or unwritable store,
/// a republish, a refused probe — so each has its numbers in one line. Only the retry round of a
/// Blinger call adds jitter ([`RetryPolicy::round`]): many jobs retry at once there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    first: Duration,
    next: Duration,
    cap: Duration,
    factor: u32,
}

impl Backoff {
    /// Doubling from `first` up to `cap`.
    pub const fn new(first: Duration, cap: Duration) -> Backoff {
        Backoff {
            first,
            next: first,
            cap,
            factor: 2,
        }
    }

    pub const fn with_factor(self, factor: u32) -> Backoff {
        Backoff { factor, ..self }
    }

    /// The wait to take now; the one after it is longer (up to the cap).
    pub fn next_wait(&mut self) -> Duration {
        let wait = self.next;
        self.next = self.next.saturating_mul(self.factor).min(self.cap);
        wait
    }

    /// The wait [`Backoff::next_wait`] would return, without moving on.
    pub fn peek(&self) -> Duration {
        self.next
    }

    /// Starts over from the first wait.
    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

/// Queue name of a delay tier: `blinger.outbound.retry.30s`.
pub fn tier_queue_name(work_queue: &str, delay: Duration) -> String {
    format!(
        "{work_queue}.retry.{}",
        humantime::format_duration(delay)
            .to_string()
            .replace(' ', "")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn backoff_grows_by_its_factor_up_to_the_cap_and_starts_over() {
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(5));
        let waits: Vec<_> = (0..6).map(|_| b.next_wait().as_millis()).collect();
        assert_eq!(waits, [500, 1000, 2000, 4000, 5000, 5000]);
        b.reset();
        assert_eq!(b.peek(), Duration::from_millis(500));
        let mut b = Backoff::new(Duration::from_millis(200), Duration::MAX).with_factor(4);
        let waits: Vec<_> = (0..3).map(|_| b.next_wait().as_millis()).collect();
        assert_eq!(waits, [200, 800, 3200]);
    }

    proptest! {
        #[test]
        fn backoff_never_shrinks_and_never_passes_its_cap(
            first in 0u64..10_000, cap in 0u64..100_000, factor in 1u32..10, n in 1usize..50,
        ) {
            let cap = Duration::from_millis(cap.max(first));
            let mut b = Backoff::new(Duration::from_millis(first), cap).with_factor(factor);
            let mut last = Duration::ZERO;
            for _ in 0..n {
                let w = b.next_wait();
                prop_assert!(w >= last && w <= cap);
                last = w;
            }
        }
    }

    fn policy() -> RetryPolicy {
        RetryPolicy::new(
            4,
            vec![
                Duration::from_secs(5),
                Duration::from_secs(30),
                Duration::from_secs(120),
            ],
        )
    }

    #[test]
    fn waits_then_parks_then_gives_up() {
        let p = policy();
        let mut round = p.round(0);
        for _ in 0..3 {
            assert!(matches!(round.after_failure(None), Next::Wait(_)));
        }
        assert_eq!(round.after_failure(None), Next::Park { tier: 0 });
        let mut round = p.round(2);
        for _ in 0..3 {
            round.after_failure(None);
        }
        assert_eq!(round.after_failure(None), Next::Park { tier: 2 });
        let mut round = p.round(3);
        for _ in 0..3 {
            round.after_failure(None);
        }
        assert_eq!(round.after_failure(None), Next::GiveUp);
    }

    #[test]
    fn honours_retry_after() {
        let p = policy();
        let mut round = p.round(0);
        assert_eq!(
            round.after_failure(Some(Duration::from_secs(20))),
            Next::Wait(Duration::from_secs(20))
        );
        // Too long to hold the message: park in the first tier at least that long.
        assert_eq!(
            round.after_failure(Some(Duration::from_secs(100))),
            Next::Park { tier: 2 }
        );
        assert_eq!(p.tier_for(1, Some(Duration::from_secs(9999))), Some(2));
    }

    #[test]
    fn names_tiers() {
        assert_eq!(
            tier_queue_name("blinger.outbound", Duration::from_secs(120)),
            "blinger.outbound.retry.2m"
        );
        assert_eq!(
            tier_queue_name("q", Duration::from_millis(1500)),
            "q.retry.1s500ms"
        );
    }

    proptest! {
        #[test]
        fn delays_are_bounded_and_rounds_end(
            attempts in 1u32..10,
            retries in 0u32..6,
            retry_after in proptest::option::of(0u64..200),
        ) {
            let p = RetryPolicy::new(attempts, vec![Duration::from_secs(5), Duration::from_secs(60)]);
            let mut round = p.round(retries);
            let retry_after = retry_after.map(Duration::from_secs);
            let mut waits = 0;
            loop {
                match round.after_failure(retry_after) {
                    Next::Wait(d) => {
                        waits += 1;
                        prop_assert!(d <= p.max_in_process_wait);
                        prop_assert!(d >= retry_after.unwrap_or_default());
                        prop_assert!(waits < attempts);
                    }
                    Next::Park { tier } => {
                        prop_assert!(tier >= retries as usize && tier < p.tiers.len());
                        break;
                    }
                    Next::GiveUp => {
                        prop_assert!(retries as usize >= p.tiers.len());
                        break;
                    }
                }
            }
        }
    }
}
