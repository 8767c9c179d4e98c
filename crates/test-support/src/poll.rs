//! Waiting for a condition in tests: poll it until it holds or a deadline passes. Never a
//! fixed sleep standing for "long enough". On tokio's clock, so paused-time tests can use them.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// Polls `check` every 50 ms until it holds or `timeout` passes; returns the time it took.
pub async fn until<F, Fut>(timeout: Duration, check: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    until_every(timeout, Duration::from_millis(50), check).await
}

/// Polls `check` every 25 ms until it holds or `timeout` passes.
pub async fn eventually(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    until_every(timeout, Duration::from_millis(25), || {
        let holds = check();
        async move { holds }
    })
    .await
    .is_some()
}

async fn until_every<F, Fut>(timeout: Duration, every: Duration, mut check: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        if check().await {
            return Some(started.elapsed());
        }
        if started.elapsed() >= timeout {
            return None;
        }
        tokio::time::sleep(every).await;
    }
}
