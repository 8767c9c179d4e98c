//! `blinger-worker store`: what the idempotency store knows, how big it is, and pruning it.
//!
//! The store is the worker's proof that a job was delivered (a redelivered job with a record is
//! acked without calling Blinger again), so these commands only read it, except `prune`, which
//! removes what the worker itself would remove after the retention.
//!
//! sled allows one process per data directory and locks it: while a worker runs on the
//! directory these commands cannot open it, and say so plainly instead of showing sled's
//! internals. They never create a store: a mistyped `--data-dir` is reported, not filled with a
//! fresh empty database.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Subcommand};
use serde::Serialize;
use uuid::Uuid;

use super::{clip, escape_json, human_bytes};
use crate::config::parse_duration;
use crate::store::{Delivered, Store, StoreError};

/// Inspect or prune the idempotency store (the worker must not be running on the same directory).
#[derive(Debug, Clone, Args)]
#[command(after_help = "\
Examples:
  blinger-worker store get 554f11c1-ec1e-4fdb-9953-bfad33013f58
  blinger-worker store stats --json
  blinger-worker store prune --older-than 3d
  BLINGER_WORKER_DATA_DIR=/var/lib/blinger-worker blinger-worker store stats")]
pub struct StoreArgs {
    /// Directory of the store (the worker's data dir).
    #[arg(
        long,
        env = "BLINGER_WORKER_DATA_DIR",
        default_value = "./data",
        global = true
    )]
    pub data_dir: PathBuf,

    /// Where a running worker answers (its metrics port): while it holds the store's lock, `get`
    /// and `stats` ask it instead (`GET /store/{id}`, `GET /store/stats`).
    #[arg(
        long,
        env = "BLINGER_WORKER_METRICS_ADDR",
        default_value = "127.0.0.1:9464",
        global = true
    )]
    pub worker_addr: String,

    #[command(subcommand)]
    pub command: StoreCommand,
}

#[derive(Debug, Clone, Subcommand)]
pub enum StoreCommand {
    /// Print what the store knows of a job id, as JSON (exit 1 when it is not recorded).
    #[command(after_help = "\
Example:
  blinger-worker store get 554f11c1-ec1e-4fdb-9953-bfad33013f58

A job is recorded once Blinger accepted it; records older than the retention are pruned.")]
    Get {
        /// The job id (UUID).
        id: String,
    },
    /// Number of records and size on disk.
    #[command(after_help = "\
Example:
  blinger-worker store stats --json")]
    Stats {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Remove records older than the given age.
    #[command(after_help = "\
Examples:
  blinger-worker store prune                   # the worker's retention (BLINGER_WORKER_RETENTION, 7d)
  blinger-worker store prune --older-than 2d

A pruned job id is no longer recognised as delivered: a copy published again after that would be
sent again. Prune no shorter than the longest time a duplicate can still arrive.")]
    Prune {
        /// Age beyond which records are removed.
        #[arg(
            long,
            env = "BLINGER_WORKER_RETENTION",
            default_value = "7d",
            value_parser = parse_duration
        )]
        older_than: Duration,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum StoreCmdError {
    #[error("no store at {0} (BLINGER_WORKER_DATA_DIR / --data-dir)")]
    Missing(String),
    #[error(
        "the store at {0} is locked by another process: is a worker running on this data dir? \
         Stop it, or run the command on a copy of the directory"
    )]
    Locked(String),
    #[error(transparent)]
    Store(StoreError),
    #[error("{0:?} is not a UUID")]
    BadId(String),
    #[error("not delivered: no record of {0} (never delivered, or pruned after the retention)")]
    NotDelivered(Uuid),
    #[error("writing output: {0}")]
    Output(std::io::Error),
    /// The running worker's ops port, asked instead of the locked store, did not answer usably.
    #[error("the running worker at {host}: {problem}")]
    Worker { host: String, problem: WorkerAnswer },
}

/// What went wrong asking the running worker's ops port.
#[derive(Debug, thiserror::Error)]
pub enum WorkerAnswer {
    #[error("reading its answer: {0}")]
    Read(reqwest::Error),
    #[error("its record is not readable: {0}")]
    Record(serde_json::Error),
    #[error("it answered {status}: {body}")]
    Status { status: u16, body: String },
}

impl From<StoreError> for StoreCmdError {
    fn from(e: StoreError) -> Self {
        StoreCmdError::Store(e)
    }
}

/// A record as printed: the stored fields plus the id and a readable time.
#[derive(Debug, Serialize)]
pub struct RecordView {
    pub id: Uuid,
    /// RFC 3339, UTC.
    pub delivered_at: Option<String>,
    #[serde(flatten)]
    pub record: Delivered,
}

#[derive(Debug, Serialize)]
struct StatsView {
    data_dir: String,
    records: usize,
    size_on_disk_bytes: u64,
}

pub async fn run(args: &StoreArgs) -> Result<(), StoreCmdError> {
    let store = match open_existing(&args.data_dir) {
        Err(StoreCmdError::Locked(dir)) => return ask_running_worker(args, dir).await,
        other => other?,
    };
    let result = match &args.command {
        StoreCommand::Get { id } => {
            let id = Uuid::try_parse(id.trim()).map_err(|_| StoreCmdError::BadId(id.clone()))?;
            let record = store.get(&id)?.ok_or(StoreCmdError::NotDelivered(id))?;
            let view = RecordView {
                id,
                delivered_at: rfc3339_ms(record.delivered_at_ms),
                record,
            };
            print_json(&view)
        }
        StoreCommand::Stats { json } => {
            let stats = store.stats()?;
            if *json {
                print_json(&StatsView {
                    data_dir: args.data_dir.display().to_string(),
                    records: stats.records,
                    size_on_disk_bytes: stats.size_on_disk_bytes,
                })
            } else {
                print_text(&format!(
                    "data dir:      {}\nrecords:       {}\nsize on disk:  {} ({} bytes)\n",
                    args.data_dir.display(),
                    stats.records,
                    human_bytes(stats.size_on_disk_bytes),
                    stats.size_on_disk_bytes
                ))
            }
        }
        StoreCommand::Prune { older_than } => {
            let removed = store.prune(*older_than)?;
            store.flush().await?;
            print_text(&format!(
                "pruned {removed} record(s) older than {}\n",
                humantime::format_duration(*older_than)
            ))
        }
    };
    // Release the lock before exiting, whatever the command did, so a worker started right
    // after finds the directory free.
    store.close().await?;
    result
}

/// The store is locked by a running worker: read through its ops port. Pruning needs the lock
/// (the running worker prunes hourly by itself).
async fn ask_running_worker(args: &StoreArgs, dir: String) -> Result<(), StoreCmdError> {
    let host = args.worker_addr.replacen("0.0.0.0", "127.0.0.1", 1);
    let path = match &args.command {
        StoreCommand::Get { id } => {
            let id = Uuid::try_parse(id.trim()).map_err(|_| StoreCmdError::BadId(id.clone()))?;
            format!("/store/{id}")
        }
        StoreCommand::Stats { .. } => "/store/stats".to_owned(),
        StoreCommand::Prune { .. } => return Err(StoreCmdError::Locked(dir)),
    };
    let answer = reqwest::get(format!("http://{host}{path}"))
        .await
        .map_err(|_| StoreCmdError::Locked(dir.clone()))?;
    let status = answer.status();
    let body = answer
        .text()
        .await
        .map_err(|e| worker_error(&host, WorkerAnswer::Read(e)))?;
    match (&args.command, status.as_u16()) {
        (StoreCommand::Get { id }, 404) => Err(StoreCmdError::NotDelivered(
            Uuid::try_parse(id.trim()).map_err(|_| StoreCmdError::BadId(id.clone()))?,
        )),
        (StoreCommand::Get { id }, 200) => {
            let id = Uuid::try_parse(id.trim()).map_err(|_| StoreCmdError::BadId(id.clone()))?;
            let record: Delivered = serde_json::from_str(&body)
                .map_err(|e| worker_error(&host, WorkerAnswer::Record(e)))?;
            print_json(&RecordView {
                id,
                delivered_at: rfc3339_ms(record.delivered_at_ms),
                record,
            })
        }
        (StoreCommand::Stats { .. }, 200) => print_text(&format!("{}\n", escape_json(&body))),
        (_, code) => Err(worker_error(
            &host,
            WorkerAnswer::Status {
                status: code,
                body: clip(body.trim(), 200),
            },
        )),
    }
}

fn worker_error(host: &str, problem: WorkerAnswer) -> StoreCmdError {
    StoreCmdError::Worker {
        host: host.to_owned(),
        problem,
    }
}

/// Opens the store only if it exists, translating sled's lock error into what it means here.
pub fn open_existing(dir: &Path) -> Result<Store, StoreCmdError> {
    if !dir.join("db").exists() && !dir.join("conf").exists() {
        return Err(StoreCmdError::Missing(dir.display().to_string()));
    }
    Store::open(dir).map_err(|e| match e {
        StoreError::Locked { .. } => StoreCmdError::Locked(dir.display().to_string()),
        other => StoreCmdError::Store(other),
    })
}

use crate::contract::rfc3339_ms;

fn print_json<T: Serialize>(value: &T) -> Result<(), StoreCmdError> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| StoreCmdError::Output(std::io::Error::other(e)))?;
    // A record holds what Blinger answered: no terminal control of it gets through.
    print_text(&format!("{}\n", escape_json(&text)))
}

fn print_text(text: &str) -> Result<(), StoreCmdError> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(StoreCmdError::Output)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn refuses_a_missing_dir_and_names_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            open_existing(&dir.path().join("nope")),
            Err(StoreCmdError::Missing(_))
        ));
        let held = Store::open(dir.path()).unwrap();
        let err = match open_existing(dir.path()) {
            Err(e) => e,
            Ok(_) => panic!("a second open of a locked store succeeded"),
        };
        assert!(matches!(err, StoreCmdError::Locked(_)), "{err}");
        assert!(err.to_string().contains("worker running"));
        drop(held);
    }

    #[test]
    fn formats_times() {
        assert_eq!(
            rfc3339_ms(1_700_000_000_123).as_deref(),
            Some("2023-11-14T22:13:20.123Z")
        );
    }
}
