//! The idempotency store: which jobs Blinger has accepted, durably, keyed by the job's UUID.
//!
//! The worker acks a job only after its [`Delivered`] record is on disk, and consults the store
//! before every call, so a redelivered job (a crash or a lost connection between Blinger's answer
//! and the ack) is acked without calling Blinger again.
//!
//! Durability is a group commit: writers hand their record to one writer thread and wait; the
//! thread takes every record queued so far, inserts them, adds one time-index entry for the whole
//! batch, fsyncs once and answers them all. A burst of concurrent deliveries costs one fsync and
//! one index entry, not one each, and the runtime's threads never wait on sled's writes. Records
//! older than the retention are pruned through the time index, so the store stays bounded.
//!
//! A failed write (a full disk, an I/O error) leaves sled refusing every later write until the
//! database is opened again (its error is sticky). So after a failed flush the store is marked
//! broken: it answers errors (lookups included: nothing is decided on records that may not be
//! durable) and the writer thread reopens the database at the next use, at most once a second,
//! until it works. No runtime thread ever opens the database.
//! Records that were not durable are gone after the reopen; their jobs were never acked and are
//! recorded again by the pipeline's retry. A record is reported durable only if the flush that
//! followed it ran on the same opening of the database it was written to.
//!
//! The store also keeps the worker's chains ([`crate::engine::order`]): which jobs of a conversation
//! are out in the delay tiers, and the sequence of every job in the worker by job id, so that
//! their order survives a restart or a crash. A chain is written as a whole per conversation;
//! chains, sequences and records go through the same writer thread in the order they were
//! written, and what survives a crash is a prefix of them; a caller that needs them durable
//! (before a job goes to a tier) waits for a [`Store::flush`].
//!
//! sled is kept behind this module (it carries RustSec "unmaintained" advisories): swapping it
//! touches nothing else.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::engine::order::{SavedChain, SavedKnown, SavedMember};

/// What the store knows of a delivered job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivered {
    /// Unix milliseconds when Blinger's acceptance was recorded.
    pub delivered_at_ms: u64,
    pub kind: String,
    /// Blinger's id of what was created (the message, or the conversation for assign-agent).
    pub blinger_id: Option<String>,
    /// Blinger's message status (`delivered`), where it gave one.
    pub blinger_status: Option<String>,
    /// HTTP calls it took, across retries.
    pub attempts: u32,
    /// Hex SHA-256 of what was sent (kind, conversation, payload: [`crate::contract::job::Job::digest`]),
    /// so a different job under the same id is told apart from a redelivery. Absent in records
    /// written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

/// What went wrong with the store, with its cause. Clone: one failed batch answers every job
/// that waited on it, and a broken store answers every caller with why it broke (sled's errors
/// are not Clone, so they are shared).
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("store at {path}: {source}")]
    Open {
        path: String,
        source: Arc<sled::Error>,
    },
    /// Another process (a running worker) holds the store's directory lock.
    #[error("store at {path} is locked by another process")]
    Locked { path: String },
    #[error("store I/O: {0}")]
    Io(Arc<sled::Error>),
    #[error("store record is corrupt: {0}")]
    Corrupt(Arc<serde_json::Error>),
    #[error("store is closed")]
    Closed,
    /// The writer thread is gone (it panicked): nothing can be written any more.
    #[error("store writer stopped: {0}")]
    Writer(Arc<tokio::task::JoinError>),
    /// A write failed earlier and the store is being reopened; `0` is that failure.
    #[error("store unavailable after a failed write (reopening): {0}")]
    Unavailable(Box<StoreError>),
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Io(Arc::new(e))
    }
}

impl From<serde_json::Error> for StoreError {
    fn from(e: serde_json::Error) -> Self {
        StoreError::Corrupt(Arc::new(e))
    }
}

impl StoreError {
    /// `Open` for an I/O error met while opening the store at `dir`.
    pub fn opening(dir: &Path, source: std::io::Error) -> StoreError {
        StoreError::Open {
            path: dir.display().to_string(),
            source: Arc::new(sled::Error::Io(source)),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct StoreStats {
    pub records: usize,
    pub size_on_disk_bytes: u64,
}

/// Answered by the writer thread: the generation of the database it wrote and flushed, or why it
/// failed.
type FlushWaiter = oneshot::Sender<Result<u64, StoreError>>;

/// What the writer thread is asked to do.
enum Request {
    /// Insert this record, then answer once it is flushed.
    Record {
        id: [u8; 16],
        at_ms: u64,
        value: Vec<u8>,
        done: FlushWaiter,
    },
    /// Answer after a flush that starts after this request.
    Flush(FlushWaiter),
    /// Replace a conversation's chain (remove it when `members` is empty); answered by no one.
    Chain {
        conversation: String,
        members: Vec<u8>,
    },
    /// Keep (or, with `None`, forget) a job's sequence; answered by no one.
    Known {
        id: [u8; 16],
        entry: Option<Vec<u8>>,
    },
    /// The offset of the delivered-records log read up to; answered by no one.
    LogOffset(u64),
}

/// Page cache of the store. Lookups are by exact key and mostly for recent jobs.
/// 4 MiB rather than 16: a worker's RSS grows with its page cache (measured in
/// docs/performance.md), and a lookup that misses it reads from the OS page cache.
/// Bytes of a chain member in the `chains` tree: sequence, expected return (Unix ms), job id.
const CHAIN_MEMBER: usize = 8 + 8 + 16;

const CACHE_BYTES: u64 = 4 * 1024 * 1024;

/// Least time between two attempts to reopen a broken database.
const REOPEN_EVERY: Duration = Duration::from_secs(1);

/// Cheap to clone; all clones share one database and one writer thread.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    requests: mpsc::UnboundedSender<Request>,
    writer: std::thread::JoinHandle<()>,
}

/// One opening of the sled database.
struct Handles {
    /// Counts openings: a record is durable only if flushed by the opening it was written to.
    generation: u64,
    db: sled::Db,
    delivered: sled::Tree,
    /// The time index, so pruning reads only what is old. One entry per written batch: key
    /// `newest delivered_at (ms, big-endian) ++ unique id (big-endian)`, value the batch's uuids
    /// (16 bytes each). Stores written before batching hold one entry per record: key
    /// `delivered_at ++ uuid`, empty value; pruning reads both.
    by_time: sled::Tree,
    /// Chains: conversation id → its members out, 32 bytes each: sequence, then expected return
    /// (Unix ms), both big-endian, then the job id.
    chains: sled::Tree,
    /// Known sequences: job id → sequence, then when the job arrived (Unix ms), both
    /// big-endian, then the conversation id.
    known: sled::Tree,
    /// Partitioned mode's place in the delivered-records log: [`LOG_OFFSET`] → the offset of
    /// the last entry applied (big-endian).
    log: sled::Tree,
}

/// Key of the log offset in the `log` tree.
const LOG_OFFSET: &[u8] = b"offset";

/// What the store handles and the writer thread share.
struct Shared {
    dir: PathBuf,
    current: RwLock<Option<Arc<Handles>>>,
    /// A write failed: sled refuses writes until reopened.
    broken: AtomicBool,
    /// Why it broke (for errors while it stays broken).
    why: Mutex<Option<StoreError>>,
    reopening: Mutex<Option<Instant>>,
    generations: AtomicU64,
}

/// Whether another process holds the lock sled takes on `dir/db` (an exclusive `flock`). Asked
/// before sled opens, because sled reports a held lock only as the text of an I/O error. The
/// probe's lock is released at once, when its file closes; a process that takes the lock in
/// between gets sled's own error.
fn locked_by_another_process(dir: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let Ok(file) = std::fs::OpenOptions::new().read(true).open(dir.join("db")) else {
        return false;
    };
    // SAFETY: flock on a file descriptor this function owns, for the lifetime of `file`.
    let taken = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    taken != 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::WouldBlock
}

fn sled_open(dir: &Path) -> sled::Result<sled::Db> {
    sled::Config::new()
        .path(dir)
        .mode(sled::Mode::HighThroughput)
        // Durability comes from our group commit; the background flush only bounds how much
        // un-acked work a crash can lose.
        .flush_every_ms(Some(1000))
        // sled's default page cache is 1 GiB; records are small and hot ones are recent.
        .cache_capacity(CACHE_BYTES)
        .open()
}

/// Removes the `snap.*.generating` files of `dir`; returns how many there were.
///
/// sled 0.34 writes a snapshot at every open, to `snap.<lsn>.generating`, renamed to
/// `snap.<lsn>` once complete. An open that fails half-way (a full disk) leaves the
/// `.generating` file behind, and every later open reads it as the newest snapshot and fails
/// with `Corruption`: one start on a full disk would make the store unusable for good. Such a
/// file is never a complete snapshot (the rename comes after the write and fsync), so it can go.
fn remove_incomplete_snapshots(dir: &Path) -> usize {
    let mut removed = 0;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("snap.")
            && name.ends_with(".generating")
            && std::fs::remove_file(entry.path()).is_ok()
        {
            removed += 1;
        }
    }
    removed
}

fn open_handles(dir: &Path, generation: u64) -> Result<Handles, StoreError> {
    let open_err = |source| StoreError::Open {
        path: dir.display().to_string(),
        source: Arc::new(source),
    };
    if locked_by_another_process(dir) {
        return Err(StoreError::Locked {
            path: dir.display().to_string(),
        });
    }
    let db = match sled_open(dir) {
        // sled reports `Corruption` only after it took the directory's lock: nobody else is
        // writing a snapshot here.
        Err(sled::Error::Corruption { .. }) if remove_incomplete_snapshots(dir) > 0 => {
            tracing::warn!(
                path = %dir.display(),
                "removed an incomplete sled snapshot left by a failed open (full disk?)"
            );
            sled_open(dir)
        }
        other => other,
    }
    .map_err(open_err)?;
    let delivered = db.open_tree("delivered").map_err(open_err)?;
    let by_time = db.open_tree("delivered_by_time").map_err(open_err)?;
    let chains = db.open_tree("chains").map_err(open_err)?;
    let known = db.open_tree("chain_known").map_err(open_err)?;
    let log = db.open_tree("log").map_err(open_err)?;
    Ok(Handles {
        generation,
        db,
        delivered,
        by_time,
        chains,
        known,
        log,
    })
}

impl Shared {
    /// The current opening, reopening a broken database first (at most once per
    /// [`REOPEN_EVERY`]); an error while it stays broken. For the writer thread only.
    fn handles(&self) -> Result<Arc<Handles>, StoreError> {
        if self.broken.load(Ordering::SeqCst) {
            self.reopen()?;
        }
        self.current()
    }

    /// The current opening as it is, broken or not.
    fn current(&self) -> Result<Arc<Handles>, StoreError> {
        self.current
            .read()
            .expect("store lock")
            .clone()
            .ok_or(StoreError::Closed)
    }

    fn mark_broken(&self, why: StoreError) {
        *self.why.lock().expect("store lock") = Some(why);
        self.broken.store(true, Ordering::SeqCst);
    }

    fn unavailable(&self) -> StoreError {
        let why = self.why.lock().expect("store lock").clone();
        StoreError::Unavailable(Box::new(why.unwrap_or(StoreError::Closed)))
    }

    fn reopen(&self) -> Result<(), StoreError> {
        // One caller reopens; the others get an error at once rather than wait.
        let Ok(mut last) = self.reopening.try_lock() else {
            return Err(self.unavailable());
        };
        if !self.broken.load(Ordering::SeqCst) {
            return Ok(());
        }
        if last.is_some_and(|at| at.elapsed() < REOPEN_EVERY) {
            return Err(self.unavailable());
        }
        *last = Some(Instant::now());
        // Let go of the broken opening. Operations still running on it hold it for a moment;
        // sled releases its directory lock when the last of them is done.
        drop(self.current.write().expect("store lock").take());
        let generation = self.generations.fetch_add(1, Ordering::SeqCst) + 1;
        let mut result = Err(self.unavailable());
        for _ in 0..4 {
            match open_handles(&self.dir, generation) {
                Ok(handles) => {
                    result = Ok(handles);
                    break;
                }
                Err(e) => {
                    result = Err(e);
                    std::thread::sleep(Duration::from_millis(25));
                }
            }
        }
        let handles = result.map_err(|e| {
            *self.why.lock().expect("store lock") = Some(e.clone());
            StoreError::Unavailable(Box::new(e))
        })?;
        *self.current.write().expect("store lock") = Some(Arc::new(handles));
        self.broken.store(false, Ordering::SeqCst);
        tracing::warn!("store reopened after a failed write");
        Ok(())
    }
}

impl Store {
    /// Opens (creating if needed) the store in `dir` and starts its writer thread.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let handles = open_handles(dir, 0)?;
        let shared = Arc::new(Shared {
            dir: dir.to_owned(),
            current: RwLock::new(Some(Arc::new(handles))),
            broken: AtomicBool::new(false),
            why: Mutex::new(None),
            reopening: Mutex::new(None),
            generations: AtomicU64::new(0),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let for_writer = shared.clone();
        let writer = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer(&for_writer, rx))
            .map_err(|e| StoreError::opening(dir, e))?;
        Ok(Store {
            inner: Arc::new(Inner {
                shared,
                requests: tx,
                writer,
            }),
        })
    }

    /// The current opening; an error while the store is broken. Reopening is the writer
    /// thread's job, asked for here: it can take seconds (sled replays its log at open) and it
    /// sleeps between attempts, and callers of this run on the runtime's few threads.
    fn handles(&self) -> Result<Arc<Handles>, StoreError> {
        let shared = &self.inner.shared;
        if shared.broken.load(Ordering::SeqCst) {
            let (nudge, _) = oneshot::channel();
            let _ = self.inner.requests.send(Request::Flush(nudge));
            return Err(shared.unavailable());
        }
        shared.current()
    }

    /// The job's delivered record. An error while the store is broken: a record read then might
    /// not be durable.
    pub fn get(&self, id: &Uuid) -> Result<Option<Delivered>, StoreError> {
        let h = self.handles()?;
        match h.delivered.get(id.as_bytes())? {
            Some(raw) => Ok(Some(serde_json::from_slice(&raw)?)),
            None => Ok(None),
        }
    }

    /// Records a delivery and returns once it is durable on disk.
    pub async fn record(&self, id: &Uuid, record: &Delivered) -> Result<(), StoreError> {
        let value = serde_json::to_vec(record)?;
        let (done, answer) = oneshot::channel();
        self.inner
            .requests
            .send(Request::Record {
                id: *id.as_bytes(),
                at_ms: record.delivered_at_ms,
                value,
                done,
            })
            .map_err(|_| StoreError::Closed)?;
        wait(answer).await.map(drop)
    }

    /// Replaces `conversation`'s chain: its members out (see [`crate::engine::order`]). Durable with the
    /// next flush; writes of one caller land in the order they were made.
    pub fn write_chain(&self, conversation: &str, members: &[SavedMember]) {
        let members = members
            .iter()
            .flat_map(|m| {
                m.seq
                    .to_be_bytes()
                    .into_iter()
                    .chain(m.back_ms.to_be_bytes())
                    .chain(*m.id.as_bytes())
            })
            .collect();
        let _ = self.inner.requests.send(Request::Chain {
            conversation: conversation.to_owned(),
            members,
        });
    }

    /// Every chain written and not emptied since, as written by [`Store::write_chain`]. Entries
    /// that do not decode are skipped.
    pub fn chains(&self) -> Result<Vec<SavedChain>, StoreError> {
        let h = self.handles()?;
        let mut out = Vec::new();
        for entry in h.chains.iter() {
            let (key, value) = entry?;
            let Ok(conversation) = String::from_utf8(key.to_vec()) else {
                continue;
            };
            if value.len() % CHAIN_MEMBER != 0 {
                continue;
            }
            let members = value
                .chunks_exact(CHAIN_MEMBER)
                .map(|m| SavedMember {
                    seq: u64::from_be_bytes(m[..8].try_into().expect("8 bytes")),
                    back_ms: u64::from_be_bytes(m[8..16].try_into().expect("8 bytes")),
                    id: Uuid::from_bytes(m[16..].try_into().expect("16 bytes")),
                })
                .collect();
            out.push((conversation, members));
        }
        Ok(out)
    }

    /// Keeps job `id`'s sequence (see [`crate::engine::order`]), or forgets it with `None`.
    /// Durable with the next flush, in the order written.
    pub fn write_known(&self, id: &Uuid, known: Option<SavedKnown>) {
        let entry = known.map(|k| {
            let mut entry = Vec::with_capacity(16 + k.conversation.len());
            entry.extend_from_slice(&k.seq.to_be_bytes());
            entry.extend_from_slice(&k.at_ms.to_be_bytes());
            entry.extend_from_slice(k.conversation.as_bytes());
            entry
        });
        let _ = self.inner.requests.send(Request::Known {
            id: *id.as_bytes(),
            entry,
        });
    }

    /// Every sequence kept by [`Store::write_known`] and not forgotten since. Entries that
    /// do not decode are skipped.
    pub fn known(&self) -> Result<Vec<(Uuid, SavedKnown)>, StoreError> {
        let h = self.handles()?;
        let mut out = Vec::new();
        for entry in h.known.iter() {
            let (key, value) = entry?;
            let Ok(id) = <[u8; 16]>::try_from(&key[..]) else {
                continue;
            };
            let Some((head, conversation)) = value.split_at_checked(16) else {
                continue;
            };
            let Ok(conversation) = String::from_utf8(conversation.to_vec()) else {
                continue;
            };
            out.push((
                Uuid::from_bytes(id),
                SavedKnown {
                    conversation,
                    seq: u64::from_be_bytes(head[..8].try_into().expect("8 bytes")),
                    at_ms: u64::from_be_bytes(head[8..].try_into().expect("8 bytes")),
                },
            ));
        }
        Ok(out)
    }

    /// Where the delivered-records log was read up to: the offset of the last entry applied, or
    /// `None` for a store that never read it (start from the beginning).
    pub fn log_offset(&self) -> Result<Option<u64>, StoreError> {
        let h = self.handles()?;
        Ok(h.log
            .get(LOG_OFFSET)?
            .and_then(|raw| <[u8; 8]>::try_from(&raw[..]).ok())
            .map(u64::from_be_bytes))
    }

    /// Keeps where the log was read up to. Durable with the next flush, after everything written
    /// before it: a crash leaves an offset whose entries are all applied.
    pub fn write_log_offset(&self, offset: u64) {
        let _ = self.inner.requests.send(Request::LogOffset(offset));
    }

    /// Waits for a flush that starts after this call: everything written before is then durable.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.flush_generation().await.map(drop)
    }

    /// Waits for the writer thread to have flushed everything written before this call; an error
    /// if the flush failed, or if the database was reopened since `generation` (what was written
    /// to the earlier opening may be lost).
    async fn flushed_since(&self, generation: u64) -> Result<(), StoreError> {
        if self.flush_generation().await? != generation {
            return Err(self.inner.shared.unavailable());
        }
        Ok(())
    }

    async fn flush_generation(&self) -> Result<u64, StoreError> {
        let (done, answer) = oneshot::channel();
        self.inner
            .requests
            .send(Request::Flush(done))
            .map_err(|_| StoreError::Closed)?;
        wait(answer).await
    }

    /// Removes records delivered before `now - retention`. Returns how many were removed.
    pub fn prune(&self, retention: Duration) -> Result<usize, StoreError> {
        let h = self.handles()?;
        let cutoff = now_ms().saturating_sub(retention.as_millis() as u64);
        let mut removed = 0;
        for entry in h.by_time.range(..cutoff.to_be_bytes().to_vec()) {
            let (key, ids) = entry?;
            let ids: Vec<&[u8]> = if key.len() == 24 {
                // Written before batching: one record per entry, its uuid in the key.
                vec![&key[8..]]
            } else {
                ids.chunks_exact(16).collect()
            };
            for id in ids {
                // A newer record under the same id (a replayed, re-sent job) has its own entry.
                if let Some(raw) = h.delivered.get(id)? {
                    let record: Delivered = serde_json::from_slice(&raw)?;
                    if record.delivered_at_ms < cutoff {
                        h.delivered.remove(id)?;
                        removed += 1;
                    }
                }
            }
            h.by_time.remove(key)?;
        }
        Ok(removed)
    }

    /// Number of records and size on disk. Blocking and O(records): sled counts a tree by reading
    /// all of it, so async code calls this on a blocking thread (`spawn_blocking`; the ops port
    /// also counts one at a time and reuses a fresh count, see `ops_http`).
    pub fn stats(&self) -> Result<StoreStats, StoreError> {
        let h = self.handles()?;
        Ok(StoreStats {
            records: h.delivered.len(),
            size_on_disk_bytes: h.db.size_on_disk()?,
        })
    }

    /// Flushes and, if this is the last handle, closes the database and releases its lock
    /// before returning (a restarted worker, or an operator command, can open it at once).
    pub async fn close(self) -> Result<(), StoreError> {
        self.flush().await?;
        match Arc::try_unwrap(self.inner) {
            Ok(inner) => {
                let Inner {
                    shared,
                    requests,
                    writer,
                } = inner;
                // The writer thread ends once its queue is closed and empty.
                drop(requests);
                let _ = tokio::task::spawn_blocking(move || writer.join()).await;
                let handles = shared.current.write().expect("store lock").take();
                drop(shared);
                let Some(handles) = handles else {
                    return Ok(());
                };
                tokio::task::spawn_blocking(move || {
                    let result = handles.db.flush();
                    drop(handles);
                    result
                })
                .await
                .map_err(|e| StoreError::Writer(Arc::new(e)))??;
                Ok(())
            }
            // Someone still holds a handle; everything written is durable all the same.
            Err(_) => Ok(()),
        }
    }

    /// Whether the store is writable right now (for readiness): a tiny write and flush.
    pub async fn check_writable(&self) -> Result<(), StoreError> {
        let h = self.handles()?;
        if let Err(e) = h.db.insert("health", &now_ms().to_be_bytes()) {
            let e = StoreError::from(e);
            self.inner.shared.mark_broken(e.clone());
            return Err(e);
        }
        let generation = h.generation;
        drop(h);
        self.flushed_since(generation).await
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

async fn wait(answer: oneshot::Receiver<Result<u64, StoreError>>) -> Result<u64, StoreError> {
    answer.await.unwrap_or(Err(StoreError::Closed))
}

/// The group commit, on its own thread: take every request queued so far, insert their records
/// and one index entry for them, fsync once, and answer them all with the generation written to.
/// A failed write or flush marks the store broken (reopened at its next use) and fails the batch.
fn writer(shared: &Shared, mut requests: mpsc::UnboundedReceiver<Request>) {
    let mut batch = Vec::new();
    while let Some(first) = requests.blocking_recv() {
        batch.push(first);
        while let Ok(more) = requests.try_recv() {
            batch.push(more);
        }
        let result = write_batch(shared, &batch);
        for request in batch.drain(..) {
            if let Request::Record { done, .. } | Request::Flush(done) = request {
                let _ = done.send(result.clone());
            }
        }
    }
}

fn write_batch(shared: &Shared, batch: &[Request]) -> Result<u64, StoreError> {
    let h = shared.handles()?;
    let written = insert_batch(&h, batch).and_then(|()| h.db.flush().map(drop));
    match written {
        Ok(()) => Ok(h.generation),
        Err(e) => {
            let e = StoreError::from(e);
            shared.mark_broken(e.clone());
            Err(e)
        }
    }
}

fn insert_batch(h: &Handles, batch: &[Request]) -> sled::Result<()> {
    for request in batch {
        match request {
            Request::Chain {
                conversation,
                members,
            } if members.is_empty() => {
                h.chains.remove(conversation.as_bytes())?;
            }
            Request::Chain {
                conversation,
                members,
            } => {
                h.chains
                    .insert(conversation.as_bytes(), members.as_slice())?;
            }
            Request::Known { id, entry: None } => {
                h.known.remove(id)?;
            }
            Request::Known {
                id,
                entry: Some(entry),
            } => {
                h.known.insert(id, entry.as_slice())?;
            }
            Request::LogOffset(offset) => {
                h.log.insert(LOG_OFFSET, &offset.to_be_bytes())?;
            }
            Request::Record { .. } | Request::Flush(_) => {}
        }
    }
    let records = || {
        batch.iter().filter_map(|r| match r {
            Request::Record {
                id, at_ms, value, ..
            } => Some((id, *at_ms, value)),
            Request::Flush(_)
            | Request::Chain { .. }
            | Request::Known { .. }
            | Request::LogOffset(_) => None,
        })
    };
    let Some(newest) = records().map(|(_, at_ms, _)| at_ms).max() else {
        return Ok(());
    };
    // Index first: an index entry without its record is harmless (pruning skips it), a record
    // without an index entry would never be pruned. Keyed by the batch's newest time, so the
    // entry is pruned only once every record in it is old enough.
    let ids: Vec<u8> = records().flat_map(|(id, _, _)| *id).collect();
    h.by_time
        .insert(batch_key(newest, h.db.generate_id()?), ids)?;
    for (id, _, value) in records() {
        h.delivered.insert(id, value.as_slice())?;
    }
    Ok(())
}

fn batch_key(newest_ms: u64, unique: u64) -> [u8; 16] {
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&newest_ms.to_be_bytes());
    key[8..].copy_from_slice(&unique.to_be_bytes());
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a failed flush on a full disk looks like.
    fn simulated() -> StoreError {
        StoreError::from(sled::Error::Io(std::io::Error::from(
            std::io::ErrorKind::StorageFull,
        )))
    }

    fn record(at: u64) -> Delivered {
        Delivered {
            delivered_at_ms: at,
            kind: "send-text".into(),
            blinger_id: Some("m1".into()),
            blinger_status: Some("delivered".into()),
            attempts: 1,
            digest: None,
        }
    }

    #[tokio::test]
    async fn the_log_offset_is_kept_across_close_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(
            store.log_offset().unwrap(),
            None,
            "a new store reads from the start"
        );
        store.write_log_offset(41);
        store.write_log_offset(u64::MAX - 1);
        store.flush().await.unwrap();
        assert_eq!(store.log_offset().unwrap(), Some(u64::MAX - 1));
        store.close().await.unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(
            store.log_offset().unwrap(),
            Some(u64::MAX - 1),
            "the last one written"
        );
        store.close().await.unwrap();
    }

    #[tokio::test]
    async fn chains_and_handed_back_jobs_survive_close_and_reopen_in_the_order_written() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let member = |seq, back_ms| SavedMember {
            seq,
            back_ms,
            id: Uuid::from_u128(u128::from(seq) << 64 | u128::from(back_ms)),
        };
        store.write_chain("a", &[member(1, 100)]);
        store.write_chain("a", &[member(1, 100), member(7, 200)]);
        store.write_chain("b", &[member(3, 300)]);
        store.write_chain("b", &[]);
        store.write_chain("c/ü", &[member(u64::MAX, 0)]);
        let (kept, forgotten) = (Uuid::new_v4(), Uuid::new_v4());
        let known = SavedKnown {
            conversation: "c/ü".to_owned(),
            seq: 9,
            at_ms: 900,
        };
        store.write_known(&kept, Some(known.clone()));
        store.write_known(&forgotten, Some(known.clone()));
        store.write_known(&forgotten, None);
        store.flush().await.unwrap();
        store.close().await.unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut chains = store.chains().unwrap();
        chains.sort();
        assert_eq!(
            chains,
            vec![
                ("a".to_owned(), vec![member(1, 100), member(7, 200)]),
                ("c/ü".to_owned(), vec![member(u64::MAX, 0)]),
            ]
        );
        assert_eq!(store.known().unwrap(), vec![(kept, known)]);
    }

    #[tokio::test]
    async fn records_survive_close_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let id = Uuid::new_v4();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.get(&id).unwrap(), None);
        store.record(&id, &record(now_ms())).await.unwrap();
        assert!(Store::open(dir.path()).is_err(), "locked while open");
        store.close().await.unwrap();
        // close() released the lock: no waiting.
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(
            store.get(&id).unwrap().unwrap().blinger_id.as_deref(),
            Some("m1")
        );
    }

    #[tokio::test]
    async fn reopens_after_a_failed_write() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let before = Uuid::new_v4();
        store.record(&before, &record(now_ms())).await.unwrap();
        // What a failed flush (a full disk) does: sled refuses writes until reopened.
        store.inner.shared.mark_broken(simulated());
        // A lookup answers an error at once (it never reopens on the caller's thread) and asks
        // the writer thread to reopen.
        assert!(matches!(
            store.get(&before),
            Err(StoreError::Unavailable(why)) if matches!(
                *why,
                StoreError::Io(ref e)
                    if matches!(**e, sled::Error::Io(ref io) if io.kind() == std::io::ErrorKind::StorageFull)
            )
        ));
        let deadline = Instant::now() + Duration::from_secs(5);
        while store.get(&before).is_err() {
            assert!(Instant::now() < deadline, "not reopened");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // What was durable is still there.
        assert!(store.get(&before).unwrap().is_some());
        assert_eq!(store.inner.shared.generations.load(Ordering::SeqCst), 1);
        let after = Uuid::new_v4();
        store.record(&after, &record(now_ms())).await.unwrap();
        // While broken and within a second of the last attempt, writes answer errors too.
        store.inner.shared.mark_broken(simulated());
        *store.inner.shared.reopening.lock().unwrap() = Some(Instant::now());
        assert!(
            store
                .record(&Uuid::new_v4(), &record(now_ms()))
                .await
                .is_err()
        );
        assert!(store.get(&before).is_err());
        // Once the second is over, the next write reopens and succeeds.
        *store.inner.shared.reopening.lock().unwrap() = None;
        store
            .record(&Uuid::new_v4(), &record(now_ms()))
            .await
            .unwrap();
        store.close().await.unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert!(store.get(&before).unwrap().is_some());
        assert!(store.get(&after).unwrap().is_some());
    }

    #[tokio::test]
    async fn an_incomplete_snapshot_left_by_a_failed_open_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let id = Uuid::new_v4();
        let store = Store::open(dir.path()).unwrap();
        store.record(&id, &record(now_ms())).await.unwrap();
        store.close().await.unwrap();
        // What an open that failed on a full disk leaves behind: an empty snapshot in progress,
        // newer than the real one.
        std::fs::write(dir.path().join("snap.7FFFFFFFFFFFFFFF.generating"), b"").unwrap();
        assert!(matches!(
            sled_open(dir.path()),
            Err(sled::Error::Corruption { .. })
        ));
        let store = Store::open(dir.path()).unwrap();
        assert!(store.get(&id).unwrap().is_some());
        assert!(!dir.path().join("snap.7FFFFFFFFFFFFFFF.generating").exists());
    }

    #[tokio::test]
    async fn concurrent_records_share_flushes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let ids: Vec<Uuid> = (0..200).map(|_| Uuid::new_v4()).collect();
        let tasks: Vec<_> = ids
            .iter()
            .map(|id| {
                let store = store.clone();
                let id = *id;
                tokio::spawn(async move { store.record(&id, &record(now_ms())).await })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        for id in &ids {
            assert!(store.get(id).unwrap().is_some());
        }
        assert_eq!(store.stats().unwrap().records, 200);
    }

    #[tokio::test]
    async fn a_burst_of_records_shares_index_entries() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let tasks: Vec<_> = (0..200)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move { store.record(&Uuid::new_v4(), &record(now_ms())).await })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let h = store.handles().unwrap();
        let entries = h.by_time.len();
        assert!(entries < 200, "{entries} index entries for 200 records");
        let indexed: usize = h.by_time.iter().map(|e| e.unwrap().1.len() / 16).sum();
        assert_eq!(indexed, 200, "every record is in the index once");
    }

    #[tokio::test]
    async fn a_batch_is_pruned_only_once_its_newest_record_is_old() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let day = 24 * 3600 * 1000;
        let (old, fresh) = (Uuid::new_v4(), Uuid::new_v4());
        // Written as one batch, the way the writer thread does it.
        let h = store.handles().unwrap();
        let batch = [
            Request::Record {
                id: *old.as_bytes(),
                at_ms: now_ms() - 8 * day,
                value: serde_json::to_vec(&record(now_ms() - 8 * day)).unwrap(),
                done: oneshot::channel().0,
            },
            Request::Record {
                id: *fresh.as_bytes(),
                at_ms: now_ms() - day,
                value: serde_json::to_vec(&record(now_ms() - day)).unwrap(),
                done: oneshot::channel().0,
            },
        ];
        insert_batch(&h, &batch).unwrap();
        drop(h);
        let week = Duration::from_secs(7 * 24 * 3600);
        assert_eq!(
            store.prune(week).unwrap(),
            0,
            "the batch holds a fresh record"
        );
        assert!(store.get(&old).unwrap().is_some());
        assert_eq!(store.prune(Duration::from_secs(3600)).unwrap(), 2);
        assert!(store.get(&fresh).unwrap().is_none());
    }

    #[tokio::test]
    async fn prunes_index_entries_written_before_batching() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let day = 24 * 3600 * 1000;
        let id = Uuid::new_v4();
        let at = now_ms() - 8 * day;
        let h = store.handles().unwrap();
        // The earlier layout: one entry per record, `delivered_at ++ uuid`, empty value.
        let mut key = at.to_be_bytes().to_vec();
        key.extend_from_slice(id.as_bytes());
        h.by_time.insert(key, &[]).unwrap();
        h.delivered
            .insert(id.as_bytes(), serde_json::to_vec(&record(at)).unwrap())
            .unwrap();
        drop(h);
        assert_eq!(store.prune(Duration::from_secs(7 * 24 * 3600)).unwrap(), 1);
        assert!(store.get(&id).unwrap().is_none());
        assert_eq!(store.handles().unwrap().by_time.len(), 0);
    }

    #[tokio::test]
    async fn prunes_only_what_is_older_than_retention() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let old = Uuid::new_v4();
        let fresh = Uuid::new_v4();
        let day = 24 * 3600 * 1000;
        store
            .record(&old, &record(now_ms() - 8 * day))
            .await
            .unwrap();
        store.record(&fresh, &record(now_ms() - day)).await.unwrap();
        let removed = store.prune(Duration::from_secs(7 * 24 * 3600)).unwrap();
        assert_eq!(removed, 1);
        assert!(store.get(&old).unwrap().is_none());
        assert!(store.get(&fresh).unwrap().is_some());
        assert_eq!(store.prune(Duration::from_secs(7 * 24 * 3600)).unwrap(), 0);
    }
}
