//! The partition layout a deployment was installed with, kept on the broker and checked at
//! every session: a replica never routes or consumes with another partition count or hash than
//! the others.
//!
//! Changing P, or the hash, moves conversations to other partitions: jobs already waiting in the
//! old partition would be overtaken by younger ones in the new, and two replicas would own one
//! conversation at once. So the first worker that declares a partitioned topology writes one
//! record (`{"partitions": P, "hash": "blinger-p1"}`) into the stream `{queue}.topology`, and
//! every session of every replica reads the stream's *first* record and refuses to go on unless it
//! matches. Two workers starting at once both write; both then read the same first record, so
//! they agree. A stream keeps its records (no age limit) and is replicated like a quorum queue.
//!
//! In single-queue mode the check is the other way round: a worker with P = 0 refuses to start
//! on a deployment whose router input exists, since its jobs would be routed past it.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection};

use super::topology::{Partitioned, Topology, ready_count};
use super::{AmqpError, publish_confirmed};
use crate::engine::partition::HASH_VERSION;

/// The layout record.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Layout {
    pub partitions: u16,
    pub hash: String,
}

impl Layout {
    pub fn of(partitioned: &Partitioned) -> Layout {
        Layout {
            partitions: partitioned.count,
            hash: HASH_VERSION.to_owned(),
        }
    }
}

/// Why a worker may not use the topology it found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error(
        "the queues of {queue} are partitioned ({input} exists): set BLINGER_WORKER_PARTITIONS \
         to the deployment's partition count (docs/deploy.md, \"Partitions\")"
    )]
    Partitioned { queue: String, input: String },
    #[error(
        "BLINGER_WORKER_PARTITIONS={ours} with hash {our_hash}, but {queue} was installed with \
         {theirs} partitions and hash {their_hash} (the first record of {stream}); changing either \
         moves conversations between partitions and needs the repartition procedure \
         (docs/deploy.md, \"Partitions\")"
    )]
    Mismatch {
        queue: String,
        stream: String,
        ours: u16,
        our_hash: String,
        theirs: u16,
        their_hash: String,
    },
    #[error(
        "the first record of {stream} is not a partition layout; it was not written by blinger-worker"
    )]
    Unreadable { stream: String },
    #[error("no layout record could be read back from {stream} within {secs} s")]
    NotReadBack { stream: String, secs: u64 },
}

/// How long to wait for the first record of a stream that may be empty.
const EMPTY_AFTER: Duration = Duration::from_millis(1500);
/// How long to wait for a record just written to come back.
const READ_BACK: Duration = Duration::from_secs(10);

/// Checks (and on a new install, writes) the layout of `topology` on `connection`.
pub async fn check(connection: &Connection, topology: &Topology) -> Result<(), AmqpError> {
    match &topology.partitioned {
        None => check_single(connection, topology).await,
        Some(partitioned) => check_partitioned(connection, topology, partitioned).await,
    }
}

async fn check_single(connection: &Connection, topology: &Topology) -> Result<(), AmqpError> {
    let input = format!("{}.in", topology.queue);
    let probe = connection.create_channel().await?;
    let found = ready_count(&probe, &input).await;
    let _ = probe.close(200, "checked".into()).await;
    match found {
        Ok(None) => Ok(()),
        Ok(Some(_)) => Err(LayoutError::Partitioned {
            queue: topology.queue.clone(),
            input,
        }
        .into()),
        Err(e) => Err(e.into()),
    }
}

async fn check_partitioned(
    connection: &Connection,
    topology: &Topology,
    partitioned: &Partitioned,
) -> Result<(), AmqpError> {
    let ours = Layout::of(partitioned);
    let stream = &partitioned.layout;
    let channel = connection.create_channel().await?;
    // A stream consumer over AMQP 0.9.1 needs a prefetch and manual acks.
    channel.basic_qos(8, BasicQosOptions::default()).await?;
    let mut args = FieldTable::default();
    args.insert(
        "x-stream-offset".into(),
        AMQPValue::LongString(LongString::from("first")),
    );
    let mut reader = channel
        .basic_consume(
            stream.as_str().into(),
            "blinger-worker-layout".into(),
            BasicConsumeOptions::default(),
            args,
        )
        .await?;
    let first = match tokio::time::timeout(EMPTY_AFTER, reader.next()).await {
        Ok(Some(delivery)) => delivery?,
        Ok(None) => {
            return Err(LayoutError::NotReadBack {
                stream: stream.clone(),
                secs: 0,
            }
            .into());
        }
        Err(_) => {
            // A new install: write ours; the first record, whoever wrote it, decides.
            let writer = connection.create_channel().await?;
            writer
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            publish_confirmed(
                &writer,
                "",
                stream,
                &serde_json::to_vec(&ours).expect("serializable"),
                BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_content_type("application/json".into()),
            )
            .await?;
            let _ = writer.close(200, "written".into()).await;
            match tokio::time::timeout(READ_BACK, reader.next()).await {
                Ok(Some(delivery)) => delivery?,
                _ => {
                    return Err(LayoutError::NotReadBack {
                        stream: stream.clone(),
                        secs: READ_BACK.as_secs(),
                    }
                    .into());
                }
            }
        }
    };
    let _ = channel.close(200, "checked".into()).await;
    judge(&ours, &first.data, &topology.queue, stream).map_err(AmqpError::from)
}

/// Whether the first record `found` allows a worker of layout `ours`.
fn judge(ours: &Layout, found: &[u8], queue: &str, stream: &str) -> Result<(), LayoutError> {
    let theirs: Layout = serde_json::from_slice(found).map_err(|_| LayoutError::Unreadable {
        stream: stream.to_owned(),
    })?;
    if &theirs == ours {
        return Ok(());
    }
    Err(LayoutError::Mismatch {
        queue: queue.to_owned(),
        stream: stream.to_owned(),
        ours: ours.partitions,
        our_hash: ours.hash.clone(),
        theirs: theirs.partitions,
        their_hash: theirs.hash,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_same_count_and_hash_pass() {
        let ours = Layout::of(&Partitioned::new("q", 16));
        assert_eq!(ours.hash, "blinger-p1");
        let record = |p: u16, h: &str| format!(r#"{{"partitions":{p},"hash":"{h}"}}"#);
        assert_eq!(
            judge(&ours, record(16, "blinger-p1").as_bytes(), "q", "s"),
            Ok(())
        );
        let err = judge(&ours, record(8, "blinger-p1").as_bytes(), "q", "q.topology").unwrap_err();
        assert!(matches!(
            err,
            LayoutError::Mismatch {
                theirs: 8,
                ours: 16,
                ..
            }
        ));
        assert!(err.to_string().contains("repartition procedure"), "{err}");
        assert!(judge(&ours, record(16, "blinger-p2").as_bytes(), "q", "s").is_err());
        assert_eq!(
            judge(&ours, b"hello", "q", "s"),
            Err(LayoutError::Unreadable { stream: "s".into() })
        );
    }
}
