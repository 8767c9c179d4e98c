//! Pausing on 401/403: the token is wrong, not the jobs.
//!
//! While paused, no job calls Blinger except the one *probe*, and none is dead-lettered or
//! handed back for it: the jobs the broker already gave this worker stay unacknowledged in memory
//! (handing them back would count toward a quorum queue's delivery limit on RabbitMQ 3.10) and
//! the prefetch limit stops the broker from giving more. The probe is retried with growing
//! delays (1 s doubling to 60 s, kept across probers), re-reading the token file each time; the
//! first answer that is not 401/403 resumes everyone.
//!
//! The state machine ([`PauseGate`]), and what it guarantees (tests below, in paused time):
//! - while paused and any job is waiting, exactly one probe is in flight or scheduled: a job
//!   that holds the probe and leaves for any reason (expired, handed back, dead-lettered, its
//!   future dropped) releases it, and a waiting job takes it over at once;
//! - a probe that got 401/403 again steps down to another waiting job ([`Probe::rotate`]), so
//!   the probes go round the held jobs, which are of different conversations: one job that
//!   Blinger forbids cannot keep the worker paused while the others would be accepted;
//! - on resume every waiter passes and the probing job steps down: it goes on with its own
//!   retry round like any job;
//! - [`PauseGate::stuck_for`] tells how long the gate has been paused with jobs waiting and no
//!   probe: never more than an instant, unless this module is wrong; `/healthz` fails past a
//!   bound, so a stuck worker is restarted rather than left.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::engine::retry::Backoff;
use crate::runtime::telemetry::Health;

/// First wait of a probe after a pause; doubled after every refused probe, up to [`MAX_DELAY`].
const FIRST_DELAY: Duration = Duration::from_secs(1);
const MAX_DELAY: Duration = Duration::from_secs(60);
const PROBE_WAIT: Backoff = Backoff::new(FIRST_DELAY, MAX_DELAY);

#[derive(Debug, Clone, PartialEq, Eq)]
struct State {
    paused: bool,
    /// The ticket of the job holding the probe, if any.
    probe: Option<u64>,
    /// Jobs waiting in [`PauseGate::admit`].
    waiting: usize,
    /// The job that stepped down last: it takes the probe again only if nobody else waits.
    rotated_from: Option<u64>,
    /// Wait before the next probe: [`FIRST_DELAY`], longer after every refused probe.
    probe_wait: Backoff,
    /// Since when the gate is paused with jobs waiting and no probe (should never last).
    unprobed_since: Option<Instant>,
}

pub struct PauseGate {
    state: watch::Sender<State>,
    tickets: AtomicU64,
    /// Calls begun, ever: each call's sequence number.
    calls: AtomicU64,
    /// The highest sequence number of an accepted call: evidence that the token works for the
    /// calls begun up to it (see [`PauseGate::accepted_since`]).
    accepted: AtomicU64,
    health: Arc<Health>,
}

/// What [`PauseGate::admit`] lets a job do.
pub enum Pass<'a> {
    /// Not paused: call Blinger.
    Open,
    /// Paused, and this job probes: wait [`Probe::delay`], then call.
    Probe(Probe<'a>),
    /// `stop` fired while waiting.
    Stopped,
}

/// Held by the one job that probes. Dropping it lets a waiting job take over at once.
pub struct Probe<'a> {
    gate: &'a PauseGate,
    ticket: u64,
    delay: Duration,
}

/// One job's place at the gate: a ticket, so the gate tells its probers apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket(u64);

impl PauseGate {
    pub fn new(health: Arc<Health>) -> Self {
        PauseGate {
            state: watch::Sender::new(State {
                paused: false,
                probe: None,
                waiting: 0,
                rotated_from: None,
                probe_wait: PROBE_WAIT,
                unprobed_since: None,
            }),
            tickets: AtomicU64::new(1),
            calls: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            health,
        }
    }

    /// A ticket for one job.
    pub fn ticket(&self) -> Ticket {
        Ticket(self.tickets.fetch_add(1, Ordering::Relaxed))
    }

    pub fn is_paused(&self) -> bool {
        self.state.borrow().paused
    }

    /// Pauses; returns true for the call that changed the state (which logs the alert).
    pub fn pause(&self) -> bool {
        let changed = self.modify(|s| {
            if s.paused {
                return false;
            }
            s.paused = true;
            s.probe_wait.reset();
            s.rotated_from = None;
            s.refresh(Instant::now());
            true
        });
        if changed {
            self.health.set_paused(true);
        }
        changed
    }

    /// Resumes; returns true for the call that changed the state.
    pub fn resume(&self) -> bool {
        let changed = self.modify(|s| {
            if !s.paused {
                return false;
            }
            s.paused = false;
            s.unprobed_since = None;
            true
        });
        if changed {
            self.health.set_paused(false);
        }
        changed
    }

    /// A call begins: its sequence number, for [`PauseGate::record_accepted`].
    pub fn begin_call(&self) -> u64 {
        self.calls.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// The call with sequence number `call` was accepted.
    pub fn record_accepted(&self, call: u64) {
        self.accepted.fetch_max(call, Ordering::SeqCst);
    }

    /// Whether a call begun after call `call` was accepted: a job refused with 403 in call `call`
    /// that is refused again after this holds is forbidden (the token works for others); a call
    /// that began before the 403 proves nothing (the token may have changed since).
    pub fn accepted_since(&self, call: u64) -> bool {
        self.accepted.load(Ordering::SeqCst) > call
    }

    /// Waits until the gate lets `ticket`'s job call Blinger: open, or paused with the probe free
    /// (then this job probes). Returns [`Pass::Stopped`] if `stop` fires first.
    pub async fn admit(&self, ticket: Ticket, stop: &CancellationToken) -> Pass<'_> {
        if !self.is_paused() {
            return Pass::Open;
        }
        let mut rx = self.state.subscribe();
        self.modify(|s| {
            s.waiting += 1;
            s.refresh(Instant::now());
            true
        });
        let _waiting = Waiting(self);
        loop {
            let mut claimed = None;
            self.modify(|s| {
                if !s.paused {
                    return false;
                }
                let others_wait = s.waiting > 1;
                if s.probe.is_none() && !(others_wait && s.rotated_from == Some(ticket.0)) {
                    s.probe = Some(ticket.0);
                    s.rotated_from = None;
                    s.refresh(Instant::now());
                    claimed = Some(s.probe_wait.peek());
                    return true;
                }
                false
            });
            if !self.is_paused() {
                return Pass::Open;
            }
            if let Some(delay) = claimed {
                return Pass::Probe(Probe {
                    gate: self,
                    ticket: ticket.0,
                    delay,
                });
            }
            tokio::select! {
                biased;
                _ = stop.cancelled() => return Pass::Stopped,
                changed = rx.changed() => if changed.is_err() { return Pass::Stopped },
            }
        }
    }

    /// How long the gate has been paused with jobs waiting and no probe, if it is.
    pub fn stuck_for(&self, now: Instant) -> Option<Duration> {
        self.state
            .borrow()
            .unprobed_since
            .map(|since| now.saturating_duration_since(since))
    }

    /// Changes the state (`f` says whether it did), and keeps `/healthz`'s view in step.
    fn modify(&self, f: impl FnOnce(&mut State) -> bool) -> bool {
        let changed = self.state.send_if_modified(f);
        if changed {
            self.health
                .set_unprobed_since(self.state.borrow().unprobed_since);
        }
        changed
    }

    fn release(&self, ticket: u64, rotate: bool) {
        self.modify(|s| {
            if s.probe != Some(ticket) {
                return false;
            }
            s.probe = None;
            if rotate {
                s.rotated_from = Some(ticket);
                s.probe_wait.next_wait();
            }
            s.refresh(Instant::now());
            true
        });
    }
}

impl State {
    fn refresh(&mut self, now: Instant) {
        let unprobed = self.paused && self.probe.is_none() && self.waiting > 0;
        match (unprobed, self.unprobed_since) {
            (true, None) => self.unprobed_since = Some(now),
            (false, _) => self.unprobed_since = None,
            (true, Some(_)) => {}
        }
    }
}

/// Counts a job out of the waiters, however it leaves `admit`.
struct Waiting<'a>(&'a PauseGate);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.modify(|s| {
            s.waiting -= 1;
            s.refresh(Instant::now());
            true
        });
    }
}

impl Probe<'_> {
    /// How long to wait before this probe's call.
    pub fn delay(&self) -> Duration {
        self.delay
    }

    /// The probe was refused again (401/403): hand it to another waiting job, with a longer
    /// delay. This job waits again (and probes again if nobody else waits).
    pub fn rotate(self) {
        self.gate.release(self.ticket, true);
        std::mem::forget(self);
    }
}

impl Drop for Probe<'_> {
    fn drop(&mut self) {
        self.gate.release(self.ticket, false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::telemetry::Metrics;

    fn gate() -> Arc<PauseGate> {
        Arc::new(PauseGate::new(Health::new(Metrics::new())))
    }

    /// A job waiting at the gate in its own task: what it was let do, with its ticket.
    fn waiter(
        gate: &Arc<PauseGate>,
        stop: &CancellationToken,
    ) -> (
        Ticket,
        tokio::sync::mpsc::UnboundedReceiver<&'static str>,
        tokio::task::JoinHandle<()>,
    ) {
        let gate = gate.clone();
        let stop = stop.clone();
        let ticket = gate.ticket();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match gate.admit(ticket, &stop).await {
                    Pass::Open => {
                        let _ = tx.send("open");
                        return;
                    }
                    Pass::Stopped => {
                        let _ = tx.send("stopped");
                        return;
                    }
                    Pass::Probe(probe) => {
                        let _ = tx.send("probe");
                        // Hold the probe until the test says what its call got.
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                        drop(probe);
                    }
                }
            }
        });
        (ticket, rx, task)
    }

    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[test]
    fn only_a_call_begun_after_a_refusal_is_evidence() {
        let g = gate();
        let before = g.begin_call();
        let refused = g.begin_call();
        // The call begun before the 403 answers late: it proves nothing about the token now.
        g.record_accepted(before);
        assert!(!g.accepted_since(refused));
        let after = g.begin_call();
        g.record_accepted(after);
        assert!(g.accepted_since(refused));
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_gate_admits_everyone() {
        let g = gate();
        let stop = CancellationToken::new();
        assert!(matches!(g.admit(g.ticket(), &stop).await, Pass::Open));
    }

    #[tokio::test(start_paused = true)]
    async fn exactly_one_waiter_probes_and_resume_opens_for_all() {
        let g = gate();
        let stop = CancellationToken::new();
        assert!(g.pause());
        assert!(!g.pause());
        let mut waiters: Vec<_> = (0..5).map(|_| waiter(&g, &stop)).collect();
        settle().await;
        let probing: Vec<usize> = waiters
            .iter_mut()
            .enumerate()
            .filter_map(|(i, (_, rx, _))| (rx.try_recv().ok() == Some("probe")).then_some(i))
            .collect();
        assert_eq!(probing.len(), 1, "exactly one probe");
        assert_eq!(g.stuck_for(Instant::now()), None);
        assert!(g.resume());
        settle().await;
        for (i, (_, rx, task)) in waiters.iter_mut().enumerate() {
            if i != probing[0] {
                assert_eq!(rx.try_recv().ok(), Some("open"));
                assert!(task.is_finished());
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn when_the_probing_job_leaves_another_takes_over_at_once() {
        let g = gate();
        let stop = CancellationToken::new();
        g.pause();
        let mut a = waiter(&g, &stop);
        settle().await;
        assert_eq!(a.1.try_recv().ok(), Some("probe"));
        let mut others: Vec<_> = (0..3).map(|_| waiter(&g, &stop)).collect();
        settle().await;
        // The probing job expires (or is handed back): its future is dropped.
        a.2.abort();
        settle().await;
        let probing = others
            .iter_mut()
            .filter(|(_, rx, _)| !rx.is_empty())
            .map(|(_, rx, _)| rx.try_recv().unwrap())
            .collect::<Vec<_>>();
        assert_eq!(probing, ["probe"], "one other job took over");
        assert_eq!(g.stuck_for(Instant::now()), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_probe_goes_round_the_waiting_jobs_with_growing_delays() {
        let g = gate();
        let stop = CancellationToken::new();
        g.pause();
        let (ta, tb) = (g.ticket(), g.ticket());
        let p = match g.admit(ta, &stop).await {
            Pass::Probe(p) => p,
            _ => panic!("a probes"),
        };
        assert_eq!(p.delay(), Duration::from_secs(1));
        // b waits while a probes.
        let gb = g.clone();
        let stop_b = stop.clone();
        let b = tokio::spawn(async move {
            match gb.admit(tb, &stop_b).await {
                Pass::Probe(p) => p.delay(),
                _ => Duration::ZERO,
            }
        });
        settle().await;
        // a refused again: b probes next, after a longer wait; a waits meanwhile.
        p.rotate();
        assert_eq!(b.await.unwrap(), Duration::from_secs(2));
        // Alone, a job that stepped down probes again.
        let p = match g.admit(ta, &stop).await {
            Pass::Probe(p) => p,
            _ => panic!("a probes again"),
        };
        assert_eq!(p.delay(), Duration::from_secs(2));
        p.rotate();
        let mut delays = Vec::new();
        for _ in 0..8 {
            match g.admit(ta, &stop).await {
                Pass::Probe(p) => {
                    delays.push(p.delay().as_secs());
                    p.rotate();
                }
                _ => panic!("probes"),
            }
        }
        assert_eq!(delays, [4, 8, 16, 32, 60, 60, 60, 60]);
        // A new pause starts again from 1 s.
        g.resume();
        g.pause();
        match g.admit(ta, &stop).await {
            Pass::Probe(p) => assert_eq!(p.delay(), Duration::from_secs(1)),
            _ => panic!("probes"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn stop_releases_waiters_but_an_open_gate_stays_open() {
        let g = gate();
        let stop = CancellationToken::new();
        stop.cancel();
        // Shutting down while not paused: jobs in flight still go through.
        assert!(matches!(g.admit(g.ticket(), &stop).await, Pass::Open));
        g.pause();
        let holder = match g.admit(g.ticket(), &stop).await {
            Pass::Probe(p) => p,
            _ => panic!("the first job probes"),
        };
        assert!(matches!(g.admit(g.ticket(), &stop).await, Pass::Stopped));
        drop(holder);
    }

    #[tokio::test(start_paused = true)]
    async fn stuck_means_paused_with_waiters_and_no_probe() {
        let t0 = Instant::now();
        let mut s = State {
            paused: true,
            probe: None,
            waiting: 0,
            rotated_from: None,
            probe_wait: PROBE_WAIT,
            unprobed_since: None,
        };
        // Paused with nobody waiting: nothing to probe with; the next job probes.
        s.refresh(t0);
        assert_eq!(s.unprobed_since, None);
        s.waiting = 2;
        s.refresh(t0);
        assert_eq!(s.unprobed_since, Some(t0));
        // Still so later: the first moment is kept.
        s.refresh(t0 + Duration::from_secs(5));
        assert_eq!(s.unprobed_since, Some(t0));
        s.probe = Some(1);
        s.refresh(t0 + Duration::from_secs(6));
        assert_eq!(s.unprobed_since, None);
        // And `/healthz` fails only past the bound.
        let health = Health::new(Metrics::new());
        health.set_unprobed_since(Some(t0));
        assert_eq!(health.not_live_reason(t0 + Duration::from_secs(119)), None);
        assert!(
            health
                .not_live_reason(t0 + Duration::from_secs(121))
                .is_some()
        );
    }
}
