//! What the pipeline does after a call Blinger did not accept: one pure function of the failure
//! and two facts about the job, so the whole policy reads as one table and is tested without a
//! broker or Blinger. The pipeline ([`super::pipeline`]) carries the step out.
//!
//! | failure                                   | step                                   |
//! |-------------------------------------------|----------------------------------------|
//! | permanent (4xx but 401/403/408/429, ...)  | dead-letter `rejected`                 |
//! | 403 again after other jobs were accepted  | dead-letter `rejected` (forbidden)     |
//! | 401 / 403                                 | pause, hand the probe on, wait         |
//! | no answer while this job probes a pause   | call again, still probing              |
//! | transient (5xx, 408, 429, no answer)      | the retry round: wait, park or give up |
//!
//! Besides the step: any answer that is not 401/403 shows the token works (a pause ends, the
//! probe steps down), and a 429 throttles every request ([`super::ratelimit`]).

use crate::blinger::failure::{Class, Failure};
use crate::contract::reason::DeadReason;

/// What the pipeline knows about the job besides the failure.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Facts {
    /// The job holds the pause's probe.
    pub probing: bool,
    /// Blinger refused this job with a 403 before, and accepted other jobs since.
    pub refused_while_others_accepted: bool,
}

/// The next step for the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Dead-letter it with `reason`; `forbidden`: a 403 for this job alone, not a token problem.
    DeadLetter { reason: DeadReason, forbidden: bool },
    /// The token is refused: pause (if not yet), hand the probe to another job, wait.
    Pause,
    /// A probe got no answer, which says nothing about the token: call again.
    ProbeAgain,
    /// Transient: the retry round decides ([`super::retry::Round::after_failure`]).
    Retry,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub step: Step,
    /// Blinger answered with something other than 401/403: the token works.
    pub token_works: bool,
    /// A 429: hold back every request for its `Retry-After`.
    pub throttle: bool,
}

pub fn decide(failure: &Failure, facts: Facts) -> Decision {
    let token_works = failure.class != Class::Auth && failure.status.is_some();
    let step = match failure.class {
        Class::Permanent => Step::DeadLetter {
            reason: DeadReason::Rejected,
            forbidden: false,
        },
        Class::Auth if failure.status == Some(403) && facts.refused_while_others_accepted => {
            Step::DeadLetter {
                reason: DeadReason::Rejected,
                forbidden: true,
            }
        }
        Class::Auth => Step::Pause,
        // A probe that got an answer stepped down (`token_works`); one without goes on.
        Class::Transient if facts.probing && !token_works => Step::ProbeAgain,
        Class::Transient => Step::Retry,
    };
    Decision {
        step,
        token_works,
        throttle: failure.class == Class::Transient && failure.status == Some(429),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn failure(status: Option<u16>) -> Failure {
        match status {
            Some(s) => Failure::from_status(s, None, format!("HTTP {s}")),
            None => Failure::transport("timed out".into(), true),
        }
    }

    fn facts(probing: bool, refused: bool) -> Facts {
        Facts {
            probing,
            refused_while_others_accepted: refused,
        }
    }

    #[test]
    fn the_table() {
        let step = |status, probing, refused| decide(&failure(status), facts(probing, refused));
        let rejected = Step::DeadLetter {
            reason: DeadReason::Rejected,
            forbidden: false,
        };
        assert_eq!(step(Some(422), false, false).step, rejected);
        assert_eq!(step(Some(404), true, true).step, rejected);
        assert_eq!(step(Some(401), false, false).step, Step::Pause);
        assert_eq!(step(Some(401), true, true).step, Step::Pause);
        assert_eq!(step(Some(403), true, false).step, Step::Pause);
        assert_eq!(
            step(Some(403), false, true).step,
            Step::DeadLetter {
                reason: DeadReason::Rejected,
                forbidden: true
            }
        );
        assert_eq!(step(Some(503), false, false).step, Step::Retry);
        // A 503 while probing is an answer that is not 401/403: the probe steps down.
        let d = step(Some(503), true, false);
        assert_eq!((d.step, d.token_works), (Step::Retry, true));
        let d = step(None, true, false);
        assert_eq!((d.step, d.token_works), (Step::ProbeAgain, false));
        assert_eq!(step(None, false, false).step, Step::Retry);
        assert!(step(Some(429), false, false).throttle);
    }

    proptest! {
        /// The promises behind the table, for every status: a refused token never loses a job
        /// (only a 403 that other jobs did not get dead-letters); a permanent answer is never
        /// retried; only an answer that is not 401/403 ends a pause; a probe goes on only while
        /// it gets no answer.
        #[test]
        fn every_status_gets_the_step_it_promises(
            status in prop::option::of(100u16..600),
            probing: bool,
            refused: bool,
        ) {
            let f = failure(status);
            let d = decide(&f, facts(probing, refused));
            match f.class {
                Class::Auth => {
                    let forbidden = status == Some(403) && refused;
                    prop_assert_eq!(d.step == Step::Pause, !forbidden);
                    prop_assert!(!d.token_works);
                }
                Class::Permanent => {
                    let rejected = Step::DeadLetter { reason: DeadReason::Rejected, forbidden: false };
                    prop_assert_eq!(d.step, rejected);
                }
                Class::Transient => {
                    let retried = matches!(d.step, Step::Retry | Step::ProbeAgain);
                    prop_assert!(retried);
                }
            }
            prop_assert_eq!(d.token_works, f.class != Class::Auth && status.is_some());
            prop_assert_eq!(d.step == Step::ProbeAgain, probing && f.class == Class::Transient && status.is_none());
            prop_assert_eq!(d.throttle, status == Some(429) && f.class == Class::Transient);
        }
    }
}
