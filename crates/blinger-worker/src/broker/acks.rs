//! Batched acknowledgements of one consuming channel.
//!
//! Acking every job with its own `basic.ack` costs a frame, a lapin promise, a wake-up of lapin's
//! I/O thread and a broker operation per job. Jobs of one channel finish out of order
//! (per-conversation lanes, retries, parking), so the batcher acks, a few milliseconds after the
//! first job of a batch finished, every finished delivery tag below the oldest unfinished one
//! with one `basic.ack multiple=true`; a finished tag stuck behind an older unfinished one is
//! acked on its own after [`HOLD`].
//!
//! Guarantees:
//! - a tag is acked only after [`Acks::done`] was called for it (the pipeline calls it once the
//!   delivered record is durable or the republish confirmed), and at most once;
//! - a `multiple` ack never covers a tag that is still outstanding (received, not finished).
//!   A tag handed back with a nack stays outstanding until the nack is on the wire, and only then
//!   is [`Acks::forget`]-ed, so no `multiple` ack can overtake a nack.
//!
//! On shutdown, [`Acks::flush`] acks everything finished before the channel closes. A lost
//! channel loses the pending acks with it: the broker redelivers those jobs and the store makes
//! them duplicates (never a second call).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::Duration;

use lapin::Channel;
use lapin::options::BasicAckOptions;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long finished jobs gather before one `basic.ack` covers them.
const WINDOW: Duration = Duration::from_millis(5);

/// How long a finished tag may wait behind an older unfinished one before it is acked alone.
const HOLD: Duration = Duration::from_millis(100);

/// Shared by the consumer (which registers deliveries), the jobs (which finish them) and the
/// flusher task of one channel.
pub struct Acks {
    channel: Channel,
    state: Mutex<Tags>,
    wake: Notify,
}

/// Delivery tags of one channel, by state. Pure bookkeeping: no I/O, so it is tested alone.
#[derive(Debug, Default)]
struct Tags {
    /// Received and not finished.
    outstanding: BTreeSet<u64>,
    /// Finished and not acked yet, with when they finished.
    done: BTreeMap<u64, Instant>,
}

/// The acks one flush sends.
#[derive(Debug, Default, PartialEq, Eq)]
struct Batch {
    /// `basic.ack multiple=true` up to this tag.
    multiple: Option<u64>,
    /// `basic.ack` of single tags.
    single: Vec<u64>,
}

impl Tags {
    /// Takes the acks due at `now`: the finished tags below the oldest outstanding one, and
    /// those held longer than `hold` (all of them if `all`).
    fn take(&mut self, now: Instant, hold: Duration, all: bool) -> Batch {
        let mut batch = Batch::default();
        let oldest = self.outstanding.first().copied().unwrap_or(u64::MAX);
        let above = self.done.split_off(&oldest);
        let below = std::mem::replace(&mut self.done, above);
        match below.len() {
            0 => {}
            // One tag: a plain ack says the same and cannot cover anything else.
            1 => batch.single.extend(below.keys()),
            _ => batch.multiple = below.keys().next_back().copied(),
        }
        self.done.retain(|&tag, finished| {
            let due = all || now.duration_since(*finished) >= hold;
            if due {
                batch.single.push(tag);
            }
            !due
        });
        batch
    }
}

impl Acks {
    pub fn new(channel: Channel) -> Acks {
        Acks {
            channel,
            state: Mutex::new(Tags::default()),
            wake: Notify::new(),
        }
    }

    /// A delivery arrived: it must not be covered by a `multiple` ack until it finishes.
    pub fn received(&self, tag: u64) {
        self.tags().outstanding.insert(tag);
    }

    /// The job is finished and may be acked.
    pub fn done(&self, tag: u64) {
        let first = {
            let mut tags = self.tags();
            tags.outstanding.remove(&tag);
            tags.done.insert(tag, Instant::now());
            tags.done.len() == 1
        };
        if first {
            self.wake.notify_one();
        }
    }

    /// The delivery was settled another way (a nack that is already on the wire).
    pub fn forget(&self, tag: u64) {
        self.tags().outstanding.remove(&tag);
    }

    /// Finished tags not yet acked.
    pub fn pending(&self) -> usize {
        self.tags().done.len()
    }

    /// Sends the acks that are due; with `all`, every finished tag.
    pub async fn flush(&self, all: bool) -> Result<(), lapin::Error> {
        let batch = self.tags().take(Instant::now(), HOLD, all);
        if let Some(tag) = batch.multiple {
            self.channel
                .basic_ack(tag, BasicAckOptions { multiple: true })
                .await?;
        }
        for tag in batch.single {
            self.channel
                .basic_ack(tag, BasicAckOptions::default())
                .await?;
        }
        Ok(())
    }

    /// The flusher: runs until `alive` is cancelled (the channel is closing or lost).
    pub async fn run(&self, alive: CancellationToken) {
        loop {
            if self.pending() == 0 {
                tokio::select! {
                    biased;
                    _ = alive.cancelled() => return,
                    _ = self.wake.notified() => {}
                }
            }
            tokio::select! {
                biased;
                _ = alive.cancelled() => return,
                _ = tokio::time::sleep(WINDOW) => {}
            }
            // lapin does not always fail operations on a connection that died under them.
            let flushed = tokio::select! {
                biased;
                _ = alive.cancelled() => return,
                flushed = self.flush(false) => flushed,
            };
            if let Err(e) = flushed {
                // The channel is gone: the broker redelivers, the store makes those duplicates.
                tracing::debug!(error = %e, "acks not sent");
                alive.cancelled().await;
                return;
            }
        }
    }

    fn tags(&self) -> std::sync::MutexGuard<'_, Tags> {
        self.state.lock().expect("acks lock")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t0() -> Instant {
        Instant::now()
    }

    #[test]
    fn acks_the_finished_prefix_in_one_frame() {
        let now = t0();
        let mut tags = Tags::default();
        tags.outstanding.extend([4, 6]);
        tags.done.extend([(1, now), (2, now), (3, now), (5, now)]);
        let batch = tags.take(now, HOLD, false);
        assert_eq!(
            batch,
            Batch {
                multiple: Some(3),
                single: vec![]
            }
        );
        // 5 waits behind 4, then goes alone once held long enough.
        assert_eq!(tags.take(now + HOLD, HOLD, false).single, vec![5]);
        assert!(tags.done.is_empty());
    }

    #[test]
    fn everything_finished_goes_when_all() {
        let now = t0();
        let mut tags = Tags::default();
        tags.outstanding.insert(2);
        tags.done.extend([(1, now), (3, now), (4, now)]);
        let batch = tags.take(now, HOLD, true);
        assert_eq!(batch.single, vec![1, 3, 4]);
        assert_eq!(batch.multiple, None);
    }

    proptest! {
        /// Whatever the order jobs finish in: every finished tag is acked exactly once, and no
        /// `multiple` ack covers a tag still outstanding.
        #[test]
        fn never_acks_an_unfinished_tag_and_acks_each_once(
            n in 1u64..60,
            order in proptest::collection::vec(any::<u64>(), 60),
            flush_every in 1usize..8,
            unfinished in proptest::collection::btree_set(0u64..60, 0..5),
        ) {
            let start = t0();
            let mut tags = Tags::default();
            tags.outstanding.extend(1..=n);
            let mut finishing: Vec<u64> = (1..=n).filter(|t| !unfinished.contains(t)).collect();
            // A permutation driven by `order`.
            for i in (1..finishing.len()).rev() {
                let j = (order[i % order.len()] % (i as u64 + 1)) as usize;
                finishing.swap(i, j);
            }
            let mut acked: Vec<u64> = Vec::new();
            let mut clock = start;
            let check = |tags: &mut Tags, batch: Batch, acked: &mut Vec<u64>| {
                if let Some(upto) = batch.multiple {
                    for t in tags.outstanding.iter() {
                        prop_assert!(*t > upto, "multiple ack {upto} covers outstanding {t}");
                    }
                    // What the broker acks: every unacked tag up to `upto`.
                    for t in 1..=upto {
                        if !acked.contains(&t) && !tags.outstanding.contains(&t) {
                            acked.push(t);
                        }
                    }
                }
                for t in batch.single {
                    prop_assert!(!acked.contains(&t), "tag {t} acked twice");
                    acked.push(t);
                }
                Ok(())
            };
            for (i, tag) in finishing.iter().enumerate() {
                tags.outstanding.remove(tag);
                tags.done.insert(*tag, clock);
                clock += Duration::from_millis(30);
                if i % flush_every == 0 {
                    let batch = tags.take(clock, HOLD, false);
                    check(&mut tags, batch, &mut acked)?;
                }
            }
            let batch = tags.take(clock, HOLD, true);
            check(&mut tags, batch, &mut acked)?;
            acked.sort_unstable();
            prop_assert_eq!(acked, finishing.iter().copied().collect::<BTreeSet<_>>().into_iter().collect::<Vec<_>>());
        }
    }
}
