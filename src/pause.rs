//! Pausing on 401/403: the token is wrong, not the jobs.
//!
//! While paused, no job calls Blinger and none is dead-lettered or handed back: the jobs the
//! broker already gave this worker stay unacknowledged in memory (handing them back would count
//! toward a quorum queue's delivery limit on RabbitMQ 3.10) and the prefetch limit stops the broker
//! from giving more. One of the refused jobs becomes the probe: it is retried with growing delays,
//! re-reading the token file each time, and the first answer that is not 401/403 resumes everyone.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::telemetry::Health;

pub struct PauseGate {
    paused: watch::Sender<bool>,
    probing: AtomicBool,
    health: Arc<Health>,
}

/// Held by the one job that probes; dropping it lets another job take over the probing.
pub struct Probe<'a> {
    gate: &'a PauseGate,
    next_delay: Duration,
}

impl PauseGate {
    pub fn new(health: Arc<Health>) -> Self {
        PauseGate {
            paused: watch::Sender::new(false),
            probing: AtomicBool::new(false),
            health,
        }
    }

    pub fn is_paused(&self) -> bool {
        *self.paused.borrow()
    }

    /// Pauses; returns true for the call that changed the state (which logs the alert).
    pub fn pause(&self) -> bool {
        let changed = self
            .paused
            .send_if_modified(|p| !std::mem::replace(p, true));
        if changed {
            self.health.set_paused(true);
        }
        changed
    }

    /// Resumes; returns true for the call that changed the state.
    pub fn resume(&self) -> bool {
        let changed = self
            .paused
            .send_if_modified(|p| std::mem::replace(p, false));
        if changed {
            self.health.set_paused(false);
        }
        changed
    }

    /// Waits until not paused. Returns false if `stop` fires first.
    pub async fn wait_open(&self, stop: &CancellationToken) -> bool {
        if !self.is_paused() {
            return true;
        }
        let mut rx = self.paused.subscribe();
        tokio::select! {
            biased;
            _ = stop.cancelled() => false,
            result = rx.wait_for(|paused| !paused) => result.is_ok(),
        }
    }

    /// Claims the probe, unless another job holds it.
    pub fn try_probe(&self) -> Option<Probe<'_>> {
        self.probing
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .ok()
            .map(|_| Probe {
                gate: self,
                next_delay: Duration::from_secs(1),
            })
    }
}

impl Probe<'_> {
    /// The wait before the next probe: 1 s, doubling up to a minute.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next_delay;
        self.next_delay = (self.next_delay * 2).min(Duration::from_secs(60));
        delay
    }
}

impl Drop for Probe<'_> {
    fn drop(&mut self) {
        self.gate.probing.store(false, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::Metrics;

    #[tokio::test]
    async fn one_prober_and_waiters_resume_together() {
        let gate = Arc::new(PauseGate::new(Health::new(Metrics::new())));
        assert!(gate.pause());
        assert!(!gate.pause());
        let probe = gate.try_probe().unwrap();
        assert!(gate.try_probe().is_none());
        let stop = CancellationToken::new();
        let waiter = {
            let gate = gate.clone();
            let stop = stop.clone();
            tokio::spawn(async move { gate.wait_open(&stop).await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        assert!(gate.resume());
        assert!(waiter.await.unwrap());
        drop(probe);
        assert!(gate.try_probe().is_some());
    }

    #[tokio::test]
    async fn stop_releases_waiters_but_an_open_gate_stays_open() {
        let gate = PauseGate::new(Health::new(Metrics::new()));
        let stop = CancellationToken::new();
        stop.cancel();
        // Shutting down while not paused: jobs in flight still go through.
        assert!(gate.wait_open(&stop).await);
        gate.pause();
        assert!(!gate.wait_open(&stop).await);
    }
}
