//! The global cap on calls to Blinger.
//!
//! One token bucket (the `governor` crate) shared by every job: `rate` requests per second with a
//! burst of `burst`. A 429 from Blinger closes the bucket for everyone until its `Retry-After` has
//! passed, so one rate-limited answer slows every request, not only the one that got it.

use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::time::Instant;

/// Pause applied after a 429 that carries no usable `Retry-After`.
const DEFAULT_COOLDOWN: Duration = Duration::from_secs(1);

pub struct Limiter {
    bucket: DefaultDirectRateLimiter,
    closed_until: Mutex<Option<Instant>>,
}

impl Limiter {
    pub fn new(rate_per_sec: NonZeroU32, burst: NonZeroU32) -> Self {
        Limiter {
            bucket: RateLimiter::direct(Quota::per_second(rate_per_sec).allow_burst(burst)),
            closed_until: Mutex::new(None),
        }
    }

    /// Waits until one more request may go out.
    pub async fn acquire(&self) {
        loop {
            if let Some(until) = self.closed_until() {
                tokio::time::sleep_until(until).await;
            }
            self.bucket.until_ready().await;
            // A 429 may have arrived while we waited for the bucket: honour it before sending.
            match self.closed_until() {
                Some(until) if until > Instant::now() => continue,
                _ => return,
            }
        }
    }

    /// Blinger said 429: hold every request back for `retry_after` (or a default second).
    pub fn throttle(&self, retry_after: Option<Duration>) {
        let until = Instant::now() + retry_after.unwrap_or(DEFAULT_COOLDOWN);
        let mut closed = self.closed_until.lock().expect("limiter lock");
        if closed.is_none_or(|current| current < until) {
            *closed = Some(until);
        }
    }

    fn closed_until(&self) -> Option<Instant> {
        let mut closed = self.closed_until.lock().expect("limiter lock");
        match *closed {
            Some(until) if until <= Instant::now() => {
                *closed = None;
                None
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nz(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_holds_back_everyone() {
        let limiter = Limiter::new(nz(1000), nz(10));
        limiter.acquire().await;
        limiter.throttle(Some(Duration::from_secs(3)));
        let start = Instant::now();
        limiter.acquire().await;
        assert!(Instant::now() - start >= Duration::from_secs(3));
        // A shorter Retry-After never shortens a longer pause already in force.
        limiter.throttle(Some(Duration::from_secs(10)));
        limiter.throttle(Some(Duration::from_secs(1)));
        let start = Instant::now();
        limiter.acquire().await;
        assert!(Instant::now() - start >= Duration::from_secs(10));
    }
}
