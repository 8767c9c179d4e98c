//! Shutdown: SIGTERM or SIGINT cancels one token that every part of the worker watches.
//!
//! The first signal starts the graceful path (stop consuming, finish or hand back, flush the
//! store, exit 0). A second signal exits at once: the operator has decided, and nothing is lost
//! because every unacked job is redelivered by the broker.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// The longest a graceful shutdown takes, from the signal to the exit, so the pod's
/// `terminationGracePeriodSeconds` can be set above it (the chart derives it the same way):
/// deliveries already on the wire (≤ 0.5 s), the `grace` for received jobs, then jobs mid-call
/// get their answer (`request_timeout` + 1 s, the session still open so their acks go out), the
/// acks flushed (≤ 5 s), the session closed (≤ 5 s), stragglers (≤ 1 s), the store flushed; 2.5 s
/// of margin for the store and the runtime.
pub fn budget(grace: Duration, request_timeout: Duration) -> Duration {
    grace + request_timeout + Duration::from_secs(15)
}

/// A token cancelled by the first SIGTERM/SIGINT.
pub fn on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        signal().await;
        info!("shutdown signal received; finishing jobs in flight");
        cancel.cancel();
        signal().await;
        warn!("second signal; exiting now (unacked jobs return to the broker)");
        std::process::exit(130);
    });
    token
}

async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_budget_is_what_the_chart_gives() {
        // Chart defaults: shutdownGraceSeconds 25, requestTimeout 10s; the chart's
        // terminationGracePeriodSeconds is grace + request timeout + 15 = 50 (.ci/deploy_checks.py).
        assert_eq!(
            budget(Duration::from_secs(25), Duration::from_secs(10)),
            Duration::from_secs(50)
        );
    }
}
