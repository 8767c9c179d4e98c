//! The tailer of the delivered-records log (partitioned mode, docs/scale-out.md 4.5): reads the
//! stream `{queue}.log` into the local store, so that a job any replica delivered, or this one
//! before its volume was lost, is recognised here and acked without a call to Blinger.
//!
//! What it guarantees:
//! - **Nothing is consumed before the log is read.** At the start of every session the tailer
//!   publishes a marker into the log (confirmed) and reads until it finds it again; only then
//!   does [`Tailer::caught_up`] return, and only then does the worker subscribe to its
//!   partitions. Every record confirmed before the marker is in the store by then.
//! - **Nothing is sent from a partition taken over before the log is read again.** The same
//!   read-back, [`Barrier::pass`], can be asked for at any time: a partition consumer that the
//!   broker activates in the middle of a session (the previous consumer died or left) passes one
//!   before any of its jobs is looked up, so a record the previous owner confirmed before it went
//!   is in the store, however far the live reading lags behind the log.
//! - **A crash leaves a consistent prefix.** Records of a batch are written (group-committed,
//!   durable) before the batch's offset is kept, and the offset before the batch is acked; a
//!   restart reads on from the kept offset, and applying a record twice is harmless.
//! - **Only sealed records count** ([`delivered_log::decode`]); everything else is skipped and
//!   counted in `blinger_worker_log_records_rejected_total`. A record the store already holds is
//!   not written again (a replica reads its own records back).
//!
//! The stream is read over AMQP 0.9.1: a prefetch is required, each delivery carries its offset
//! in `x-stream-offset`, acks only grant credit. The consumer must be connected to a node with a
//! replica of the stream (docs/scale-out.md 2).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};
use uuid::Uuid;

use super::confirms::{ConfirmError, judge};
use crate::contract::delivered_log::{self, Entry};
use crate::contract::trail::TrailKey;
use crate::runtime::telemetry::Metrics;
use crate::store::{Delivered, Store, StoreError};

/// Unacked log entries at once, and the most applied in one store batch.
pub const PREFETCH: u16 = 2000;

/// Why the tailer stopped; each ends the session, which starts over from the kept offset.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("RabbitMQ channel of the log tailer: {0}")]
    Channel(#[from] lapin::Error),
    #[error("the catch-up marker was not taken by the log ({0})")]
    Marker(ConfirmError),
    #[error("store, applying the log: {0}")]
    Store(#[from] StoreError),
    #[error("the consumer of the delivered-records log was cancelled or closed")]
    ConsumerEnded,
}

/// A running tailer.
pub struct Tailer {
    task: tokio::task::JoinHandle<Result<(), LogError>>,
    barrier: Barrier,
}

/// Each marker published and not read back yet, with the one waiting for it.
type Waiters = HashMap<Uuid, oneshot::Sender<()>>;

/// Read-backs of the log: a marker published now, and a wait until the reading has applied it.
/// Cheap to clone; every clone ends with the tailer's session.
#[derive(Clone)]
pub struct Barrier {
    channel: lapin::Channel,
    log: String,
    /// Markers published and not yet read back, each with the one waiting for it; `None` once
    /// the reading has ended, so that no wait can begin that nothing would end.
    waiting: Arc<Mutex<Option<Waiters>>>,
}

impl Barrier {
    /// Returns once every entry the log confirmed before this call is in the store: publishes a
    /// marker (confirmed) and waits until the reading has applied the batch that holds it. An
    /// error when the marker is refused or the reading ends first (the session is over then).
    pub async fn pass(&self) -> Result<(), LogError> {
        let (marker, properties) = delivered_log::marker();
        let (read_back, reached) = oneshot::channel();
        // Registered before the publish: the reading may find the marker before the confirm.
        match self.waiting.lock().expect("barrier lock").as_mut() {
            Some(waiting) => waiting.insert(marker, read_back),
            None => return Err(LogError::ConsumerEnded),
        };
        if let Err(e) = self.publish(properties).await {
            if let Some(waiting) = self.waiting.lock().expect("barrier lock").as_mut() {
                waiting.remove(&marker);
            }
            return Err(e);
        }
        reached.await.map_err(|_| LogError::ConsumerEnded)
    }

    async fn publish(&self, properties: BasicProperties) -> Result<(), LogError> {
        let confirm = self
            .channel
            .basic_publish(
                "".into(),
                self.log.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                b"",
                properties,
            )
            .await?
            .await?;
        judge(confirm).map_err(LogError::Marker)
    }

    /// The reading applied a batch holding `markers`: their waiters may go on.
    fn reached(&self, markers: &[Uuid]) {
        let mut waiting = self.waiting.lock().expect("barrier lock");
        let Some(waiting) = waiting.as_mut() else {
            return;
        };
        for marker in markers {
            if let Some(read_back) = waiting.remove(marker) {
                let _ = read_back.send(());
            }
        }
    }

    /// The reading ended: every wait ends with an error, and no new one begins.
    fn abandon(&self) {
        *self.waiting.lock().expect("barrier lock") = None;
    }
}

/// Where a new reading of the log starts: after the last entry applied, or at the beginning.
pub fn start_offset(kept: Option<u64>) -> AMQPValue {
    match kept {
        Some(offset) => {
            AMQPValue::LongLongInt(i64::try_from(offset.saturating_add(1)).unwrap_or(i64::MAX))
        }
        None => AMQPValue::LongString(LongString::from(b"first".to_vec())),
    }
}

/// The offset of a delivery of a stream.
fn offset_of(properties: &BasicProperties) -> Option<u64> {
    match properties
        .headers()
        .as_ref()?
        .inner()
        .get("x-stream-offset")?
    {
        AMQPValue::LongLongInt(v) => u64::try_from(*v).ok(),
        AMQPValue::LongInt(v) => u64::try_from(*v).ok(),
        _ => None,
    }
}

impl Tailer {
    /// Subscribes to `log` from the store's kept offset. `alive` ends with the session.
    pub async fn start(
        connection: &Connection,
        log: &str,
        store: Store,
        key: TrailKey,
        metrics: Arc<Metrics>,
        alive: CancellationToken,
    ) -> Result<Tailer, LogError> {
        let channel = connection.create_channel().await?;
        channel
            .basic_qos(PREFETCH, BasicQosOptions::default())
            .await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let mut args = FieldTable::default();
        args.insert("x-stream-offset".into(), start_offset(store.log_offset()?));
        let tag = format!("blinger-log-{}", Uuid::new_v4().simple());
        let consumer = channel
            .basic_consume(
                log.into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                args,
            )
            .await?;
        let barrier = Barrier {
            channel: channel.clone(),
            log: log.to_owned(),
            waiting: Arc::new(Mutex::new(Some(HashMap::new()))),
        };
        let reading = Reading {
            channel,
            store,
            key,
            metrics,
            barrier: barrier.clone(),
        };
        let task = tokio::spawn(reading.run(consumer, alive));
        Ok(Tailer { task, barrier })
    }

    /// Returns once everything published to the log before this call is in the store (the
    /// session's catch-up: its marker is published after the subscription); the tailer's error
    /// if it stopped first.
    pub async fn caught_up(&mut self) -> Result<(), LogError> {
        let barrier = self.barrier.clone();
        tokio::select! {
            passed = barrier.pass() => match passed {
                Ok(()) => Ok(()),
                // The reading ended: its own error says why.
                Err(LogError::ConsumerEnded) => Err(self.failed().await),
                Err(e) => Err(e),
            },
            failed = self.failed() => Err(failed),
        }
    }

    /// Read-backs of this tailer's log, for partitions taken over during the session.
    pub fn barrier(&self) -> Barrier {
        self.barrier.clone()
    }

    /// Waits until the tailer fails; never returns while it reads.
    pub async fn failed(&mut self) -> LogError {
        match (&mut self.task).await {
            Ok(Err(e)) => e,
            Ok(Ok(())) => std::future::pending().await,
            Err(_) => LogError::ConsumerEnded,
        }
    }
}

struct Reading {
    channel: lapin::Channel,
    store: Store,
    key: TrailKey,
    metrics: Arc<Metrics>,
    barrier: Barrier,
}

impl Reading {
    async fn run(
        self,
        consumer: lapin::Consumer,
        alive: CancellationToken,
    ) -> Result<(), LogError> {
        let mut batches = consumer.ready_chunks(usize::from(PREFETCH));
        let ended = loop {
            let batch = tokio::select! {
                biased;
                _ = alive.cancelled() => break Ok(()),
                batch = batches.next() => batch,
            };
            let Some(batch) = batch else {
                break Err(LogError::ConsumerEnded);
            };
            if let Err(e) = self.apply(batch).await {
                break Err(e);
            }
        };
        self.barrier.abandon();
        let _ = self.channel.close(200, "log tailer stopped".into()).await;
        ended
    }

    /// Applies one batch of entries: records the store lacks, durably; then the offset; then
    /// the ack (credit for the next entries).
    async fn apply(
        &self,
        batch: Vec<lapin::Result<lapin::message::Delivery>>,
    ) -> Result<(), LogError> {
        let mut last_tag = None;
        let mut last_offset = None;
        let mut records: Vec<(Uuid, Delivered)> = Vec::new();
        let mut markers = Vec::new();
        for delivery in batch {
            let delivery = delivery?;
            last_tag = Some(delivery.delivery_tag);
            last_offset = offset_of(&delivery.properties).or(last_offset);
            match delivered_log::decode(&delivery.properties, &delivery.data, &self.key) {
                Ok(Entry::Marker(id)) => markers.push(id),
                Ok(Entry::Delivered { id, record }) => records.push((id, record)),
                Err(why) => {
                    self.metrics.log_records_rejected.inc();
                    debug!(offset = ?offset_of(&delivery.properties), %why, "log entry not applied");
                }
            }
        }
        let mut fresh = Vec::with_capacity(records.len());
        for (id, record) in records {
            if self.store.get(&id)?.is_none() {
                fresh.push((id, record));
            }
        }
        let written = futures_util::future::join_all(
            fresh
                .iter()
                .map(|(id, record)| self.store.record(id, record)),
        )
        .await;
        if let Some(e) = written.into_iter().find_map(Result::err) {
            warn!(error = %e, "cannot write records read from the log; reading again from the kept offset");
            return Err(e.into());
        }
        self.metrics.log_records_applied.inc_by(fresh.len() as u64);
        if let Some(offset) = last_offset {
            self.store.write_log_offset(offset);
        }
        if let Some(tag) = last_tag {
            self.channel
                .basic_ack(tag, BasicAckOptions { multiple: true })
                .await?;
        }
        // After the batch is durable: every entry before each of its markers is in the store.
        self.barrier.reached(&markers);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reading_starts_after_the_last_entry_applied_or_at_the_beginning() {
        assert_eq!(
            start_offset(None),
            AMQPValue::LongString(LongString::from(b"first".to_vec()))
        );
        assert_eq!(start_offset(Some(0)), AMQPValue::LongLongInt(1));
        assert_eq!(start_offset(Some(41)), AMQPValue::LongLongInt(42));
        assert_eq!(
            start_offset(Some(u64::MAX)),
            AMQPValue::LongLongInt(i64::MAX)
        );
    }
}
