//! The tailer of the delivered-records log (partitioned mode, docs/scale-out.md 4.5): reads the
//! stream `{queue}.log` into the local store, so that a job any replica delivered, or this one
//! before its volume was lost, is recognised here and acked without a call to Blinger.
//!
//! What it guarantees:
//! - **Nothing is consumed before the log is read.** At the start of every session the tailer
//!   publishes a marker into the log (confirmed) and reads until it finds it again; only then
//!   does [`Tailer::caught_up`] return, and only then does the worker subscribe to its
//!   partitions. Every record confirmed before the marker is in the store by then.
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

use std::sync::Arc;

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection};
use tokio::sync::watch;
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
    caught_up: watch::Receiver<bool>,
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
    /// Subscribes to `log` from the store's kept offset and publishes this session's marker.
    /// `alive` ends with the session.
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
        // After the subscription: the marker is the last entry this reading must reach.
        let (marker, properties) = delivered_log::marker();
        let confirm = channel
            .basic_publish(
                "".into(),
                log.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                b"",
                properties,
            )
            .await?
            .await?;
        judge(confirm).map_err(LogError::Marker)?;
        let (caught_up_tx, caught_up) = watch::channel(false);
        let reading = Reading {
            channel,
            store,
            key,
            metrics,
            marker,
            caught_up: caught_up_tx,
        };
        let task = tokio::spawn(reading.run(consumer, alive));
        Ok(Tailer { task, caught_up })
    }

    /// Returns once everything published to the log before this session's marker is in the
    /// store; the tailer's error if it stopped first.
    pub async fn caught_up(&mut self) -> Result<(), LogError> {
        loop {
            if *self.caught_up.borrow_and_update() {
                return Ok(());
            }
            if self.caught_up.changed().await.is_err() {
                return Err(self.failed().await);
            }
        }
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
    marker: Uuid,
    caught_up: watch::Sender<bool>,
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
        let mut found_marker = false;
        for delivery in batch {
            let delivery = delivery?;
            last_tag = Some(delivery.delivery_tag);
            last_offset = offset_of(&delivery.properties).or(last_offset);
            match delivered_log::decode(&delivery.properties, &delivery.data, &self.key) {
                Ok(Entry::Marker(id)) => found_marker |= id == self.marker,
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
        if found_marker {
            self.caught_up.send_replace(true);
        }
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
