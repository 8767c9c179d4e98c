//! Shutdown: SIGTERM or SIGINT cancels one token that every part of the worker watches.
//!
//! The first signal starts the graceful path (stop consuming, finish or hand back, flush the
//! store, exit 0). A second signal exits at once: the operator has decided, and nothing is lost
//! because every unacked job is redelivered by the broker.

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

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
