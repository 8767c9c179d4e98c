//! The cap on calls to Blinger.
//!
//! One token bucket shared by every job of the process: `rate` requests per second with a burst
//! of `burst`, times this replica's **share** of the deployment's limit. A single-queue worker
//! holds all of it. In partitioned mode the share comes from the membership
//! ([`crate::engine::membership`]): it starts at nothing and follows the replicas counted, so the
//! replicas together never exceed `rate` plus `burst` in any second.
//!
//! What it guarantees:
//! - In any window of `w` seconds, at most `cap + w × rate × share` requests start, where the
//!   share and the cap (`max(1, burst × share)`) are the largest in force during the window.
//! - A share that changes keeps the tokens the bucket holds, cut to the new cap; a share given
//!   after none starts empty. Waiting requests go first come first served, each only once a
//!   whole token is there, so none goes out at a rate that was taken away, and requests that
//!   waited through a change do not go out together.
//! - A 429 closes the bucket for everyone until its `Retry-After` has passed (a default second
//!   without one). One this replica got is also announced ([`Limiter::local_throttles`]) for the
//!   other replicas, and one they got is applied here ([`Limiter::throttle_from_peer`]).

use std::num::NonZeroU32;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::time::Instant;

/// Pause applied after a 429 that carries no usable `Retry-After`.
const DEFAULT_COOLDOWN: Duration = Duration::from_secs(1);
/// A local 429 is announced to the other replicas only when it extends the closure by more.
const ANNOUNCE_ABOVE: Duration = Duration::from_millis(100);

pub struct Limiter {
    rate: f64,
    burst: f64,
    bucket: Mutex<Bucket>,
    /// Woken when the share changes.
    changed: Notify,
    /// Waiting requests take their turn here, first come first served: only the first in line
    /// waits for the next token, and takes it only once it is there.
    turn: tokio::sync::Mutex<()>,
    queued: AtomicUsize,
    local: watch::Sender<Option<Instant>>,
}

#[derive(Debug)]
struct Bucket {
    share: f64,
    tokens: f64,
    at: Instant,
    closed_until: Option<Instant>,
}

impl Bucket {
    fn cap(&self, burst: f64) -> f64 {
        if self.share > 0.0 {
            (burst * self.share).max(1.0)
        } else {
            0.0
        }
    }

    fn refill(&mut self, now: Instant, rate: f64, burst: f64) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate * self.share).min(self.cap(burst));
        self.at = now;
    }

    fn closed(&mut self, now: Instant) -> Option<Instant> {
        match self.closed_until {
            Some(until) if until <= now => {
                self.closed_until = None;
                None
            }
            other => other,
        }
    }

    /// Extends the closure to `until`; by how much.
    fn close(&mut self, until: Instant, now: Instant) -> Duration {
        let current = self.closed(now).unwrap_or(now);
        if until > current {
            self.closed_until = Some(until);
            until - current
        } else {
            Duration::ZERO
        }
    }
}

/// Keeps the count of requests waiting their turn right when one leaves, however it leaves.
struct Queued<'a>(&'a AtomicUsize);

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Limiter {
    /// The whole of the limit, bucket full: a single-queue worker.
    pub fn new(rate_per_sec: NonZeroU32, burst: NonZeroU32) -> Self {
        let limiter = Self::shared(rate_per_sec, burst);
        {
            let mut bucket = limiter.bucket.lock().expect("limiter lock");
            bucket.share = 1.0;
            bucket.tokens = limiter.burst;
        }
        limiter
    }

    /// No share yet: a replica of a partitioned deployment, before the membership gives it one.
    pub fn shared(rate_per_sec: NonZeroU32, burst: NonZeroU32) -> Self {
        Limiter {
            rate: f64::from(rate_per_sec.get()),
            burst: f64::from(burst.get()),
            bucket: Mutex::new(Bucket {
                share: 0.0,
                tokens: 0.0,
                at: Instant::now(),
                closed_until: None,
            }),
            changed: Notify::new(),
            turn: tokio::sync::Mutex::new(()),
            queued: AtomicUsize::new(0),
            local: watch::Sender::new(None),
        }
    }

    /// This replica's fraction (0 to 1) of the deployment's limit from now on.
    pub fn set_share(&self, share: f64) {
        let share = share.clamp(0.0, 1.0);
        let mut bucket = self.bucket.lock().expect("limiter lock");
        if bucket.share == share {
            return;
        }
        let now = Instant::now();
        bucket.refill(now, self.rate, self.burst);
        bucket.share = share;
        let cap = bucket.cap(self.burst);
        bucket.tokens = bucket.tokens.min(cap);
        drop(bucket);
        self.changed.notify_waiters();
    }

    /// Waits until one more request may go out. A request goes out only when a whole token is
    /// in the bucket at that moment, so no window sees more than the capacity plus the rate,
    /// whatever the share did meanwhile.
    pub async fn acquire(&self) {
        if self.queued.load(Ordering::Acquire) == 0 && self.try_take().is_ok() {
            return;
        }
        self.queued.fetch_add(1, Ordering::AcqRel);
        let _queued = Queued(&self.queued);
        let _turn = self.turn.lock().await;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            match self.try_take() {
                Ok(()) => return,
                Err(Some(at)) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(at) => {}
                        _ = changed => {}
                    }
                }
                Err(None) => changed.await,
            }
        }
    }

    /// Takes a token if one is there; else when to look again (`None`: when the share changes).
    fn try_take(&self) -> Result<(), Option<Instant>> {
        let mut bucket = self.bucket.lock().expect("limiter lock");
        let now = Instant::now();
        bucket.refill(now, self.rate, self.burst);
        if let Some(until) = bucket.closed(now) {
            return Err(Some(until));
        }
        if bucket.share <= 0.0 {
            return Err(None);
        }
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(());
        }
        let missing = (1.0 - bucket.tokens) / (self.rate * bucket.share);
        Err(Some(now + Duration::from_secs_f64(missing)))
    }

    /// Blinger said 429 to this replica: hold every request back for `retry_after` (or a
    /// default second), and announce it when it extends the closure noticeably.
    pub fn throttle(&self, retry_after: Option<Duration>) {
        let now = Instant::now();
        let until = now + retry_after.unwrap_or(DEFAULT_COOLDOWN);
        let extended = self.bucket.lock().expect("limiter lock").close(until, now);
        if extended > ANNOUNCE_ABOVE {
            self.local.send_replace(Some(until));
        }
    }

    /// Another replica got a 429: hold every request back for `pause` from now.
    pub fn throttle_from_peer(&self, pause: Duration) {
        let now = Instant::now();
        self.bucket
            .lock()
            .expect("limiter lock")
            .close(now + pause, now);
    }

    /// The closures this replica's own 429s caused (the latest one), to pass on.
    pub fn local_throttles(&self) -> watch::Receiver<Option<Instant>> {
        self.local.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

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

    #[tokio::test(start_paused = true)]
    async fn a_429_is_announced_once_and_one_from_a_peer_is_applied_not_announced() {
        let limiter = Limiter::new(nz(1000), nz(10));
        let mut announced = limiter.local_throttles();
        limiter.throttle(Some(Duration::from_secs(2)));
        assert!(announced.has_changed().unwrap());
        announced.borrow_and_update();
        // Extends the closure by 50 ms only: not worth telling anyone.
        tokio::time::advance(Duration::from_millis(50)).await;
        limiter.throttle(Some(Duration::from_millis(2000)));
        assert!(!announced.has_changed().unwrap());
        limiter.throttle_from_peer(Duration::from_secs(30));
        assert!(!announced.has_changed().unwrap());
        let start = Instant::now();
        limiter.acquire().await;
        assert!(Instant::now() - start >= Duration::from_secs(30));
    }

    /// Requests started in each 1 s window while `acquire` is called as fast as it returns.
    async fn started_per_second(limiter: Arc<Limiter>, seconds: u64) -> Vec<usize> {
        let start = Instant::now();
        let mut at = Vec::new();
        let until = start + Duration::from_secs(seconds);
        let mut tasks = tokio::task::JoinSet::new();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for _ in 0..16 {
            let (limiter, tx) = (limiter.clone(), tx.clone());
            tasks.spawn(async move {
                loop {
                    tokio::select! {
                        _ = limiter.acquire() => {}
                        _ = tokio::time::sleep_until(until) => return,
                    }
                    if Instant::now() >= until || tx.send(Instant::now()).is_err() {
                        return;
                    }
                }
            });
        }
        drop(tx);
        while let Some(t) = rx.recv().await {
            at.push(t - start);
        }
        let mut per = vec![0; seconds as usize];
        for t in at {
            per[(t.as_secs() as usize).min(seconds as usize - 1)] += 1;
        }
        per
    }

    #[tokio::test(start_paused = true)]
    async fn a_share_is_the_rate_it_allows_and_starts_empty() {
        let limiter = Arc::new(Limiter::shared(nz(100), nz(20)));
        let counting = tokio::spawn(started_per_second(limiter.clone(), 6));
        // No share for the first second: nothing goes out.
        tokio::time::sleep(Duration::from_secs(1)).await;
        limiter.set_share(0.5);
        tokio::time::sleep(Duration::from_secs(2)).await;
        limiter.set_share(0.25);
        tokio::time::sleep(Duration::from_secs(2)).await;
        limiter.set_share(0.0);
        let per = counting.await.unwrap();
        assert_eq!(per[0], 0, "{per:?}");
        // Started empty: 50 a second, not 50 plus a burst of 10.
        assert!((49..=51).contains(&per[1]), "{per:?}");
        assert!((49..=51).contains(&per[2]), "{per:?}");
        // Cut to a quarter: the requests already waiting go at the new rate too.
        assert!((24..=26).contains(&per[3]), "{per:?}");
        assert!((24..=26).contains(&per[4]), "{per:?}");
        assert_eq!(per[5], 0, "{per:?}");
    }

    /// A replica handed every partition at once (a scale-down) gets its share in steps, a
    /// millisecond apart: 1/16, 2/16, ... 16/16. Requests waiting for it must go out at the
    /// rate, not together: when each waiting request was timed again at every step from the
    /// back of the queue, all 64 went out at the same instant once the debt was paid, and a
    /// 1-second window starting there held 64 + 100 (scenario 14 on RabbitMQ 4.0.5: 139 for a
    /// limit of 100 + burst 10).
    #[tokio::test(start_paused = true)]
    async fn requests_waiting_for_a_share_given_in_steps_go_out_at_the_rate() {
        let limiter = Arc::new(Limiter::shared(nz(100), nz(10)));
        let started = Arc::new(std::sync::Mutex::new(Vec::new()));
        let begin = Instant::now();
        let until = begin + Duration::from_secs(3);
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..64 {
            let (limiter, started) = (limiter.clone(), started.clone());
            tasks.spawn(async move {
                loop {
                    tokio::select! {
                        _ = limiter.acquire() => started.lock().unwrap().push(Instant::now() - begin),
                        _ = tokio::time::sleep_until(until) => return,
                    }
                }
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        for held in 1..=16 {
            limiter.set_share(f64::from(held) / 16.0);
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        while tasks.join_next().await.is_some() {}
        let mut at = started.lock().unwrap().clone();
        at.sort();
        let mut peak = 0;
        let mut first = 0;
        for last in 0..at.len() {
            while at[last] - at[first] >= Duration::from_secs(1) {
                first += 1;
            }
            peak = peak.max(last - first + 1);
        }
        assert!(
            peak <= 111,
            "at most the rate + the burst in any second: {peak}"
        );
        assert!(at.len() >= 280, "and the whole rate: {} in 2.9 s", at.len());
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_kept_over_a_share_change_are_cut_to_the_new_cap() {
        let limiter = Limiter::new(nz(10), nz(40));
        // Full bucket: 40 at once.
        for _ in 0..40 {
            tokio::time::timeout(Duration::from_millis(1), limiter.acquire())
                .await
                .expect("from the burst");
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
        // Refilled to 40; a quarter of the limit keeps 10 of them.
        limiter.set_share(0.25);
        let start = Instant::now();
        for _ in 0..11 {
            limiter.acquire().await;
        }
        let took = Instant::now() - start;
        assert!(
            took >= Duration::from_millis(390) && took <= Duration::from_millis(410),
            "10 from the bucket, the 11th after 1 / 2.5 s: {took:?}"
        );
    }
}
