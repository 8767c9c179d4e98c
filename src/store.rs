//! The idempotency store: which jobs Blinger has accepted, durably, keyed by the job's UUID.
//!
//! The worker acks a job only after its [`Delivered`] record is on disk, and consults the store
//! before every call, so a redelivered job (a crash or a lost connection between Blinger's answer
//! and the ack) is acked without calling Blinger again.
//!
//! Durability is a group commit: writers insert their record, then wait for the next flush; one
//! flusher task fsyncs for all of them at once, so a burst of concurrent deliveries costs one
//! fsync, not one each. Records older than the retention are pruned through a time index, so the
//! store stays bounded.
//!
//! A failed write (a full disk, an I/O error) leaves sled refusing every later write until the
//! database is opened again (its error is sticky). So after a failed flush the store is marked
//! broken: it answers errors (lookups included: nothing is decided on records that may not be
//! durable) and reopens the database at the next use, at most once a second, until it works.
//! Records that were not durable are gone after the reopen; their jobs were never acked and are
//! recorded again by the pipeline's retry. A record is reported durable only if the flush that
//! followed it ran on the same opening of the database it was written to.
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
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store at {path}: {source}")]
    Open { path: String, source: sled::Error },
    #[error("store I/O: {0}")]
    Io(#[from] sled::Error),
    #[error("store record is corrupt: {0}")]
    Corrupt(#[from] serde_json::Error),
    #[error("store is closed")]
    Closed,
    #[error("store unavailable after a failed write (reopening): {0}")]
    Unavailable(String),
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct StoreStats {
    pub records: usize,
    pub size_on_disk_bytes: u64,
}

/// Answered by the flusher: the generation of the database it flushed, or why it failed.
type FlushWaiter = oneshot::Sender<Result<u64, String>>;

/// Page cache of the store. Lookups are by exact key and mostly for recent jobs.
/// 4 MiB rather than 16: a worker's RSS grows with its page cache (measured in
/// docs/performance.md), and a lookup that misses it reads from the OS page cache.
const CACHE_BYTES: u64 = 4 * 1024 * 1024;

/// Least time between two attempts to reopen a broken database.
const REOPEN_EVERY: Duration = Duration::from_secs(1);

/// Cheap to clone; all clones share one database and one flusher.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    flush_requests: mpsc::UnboundedSender<FlushWaiter>,
    flusher: tokio::task::JoinHandle<()>,
}

/// One opening of the sled database.
struct Handles {
    /// Counts openings: a record is durable only if flushed by the opening it was written to.
    generation: u64,
    db: sled::Db,
    delivered: sled::Tree,
    /// Key: delivered_at (ms, big-endian) ++ uuid. Lets pruning read only what is old.
    by_time: sled::Tree,
}

/// What the store handles and the flusher share.
struct Shared {
    dir: PathBuf,
    current: RwLock<Option<Arc<Handles>>>,
    /// A write failed: sled refuses writes until reopened.
    broken: AtomicBool,
    /// Why it broke (for errors while it stays broken).
    why: Mutex<String>,
    reopening: Mutex<Option<Instant>>,
    generations: AtomicU64,
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
        source,
    };
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
    Ok(Handles {
        generation,
        db,
        delivered,
        by_time,
    })
}

impl Shared {
    /// The current opening, reopening a broken database first (at most once per
    /// [`REOPEN_EVERY`]); an error while it stays broken.
    fn handles(&self) -> Result<Arc<Handles>, StoreError> {
        if self.broken.load(Ordering::SeqCst) {
            self.reopen()?;
        }
        self.current
            .read()
            .expect("store lock")
            .clone()
            .ok_or(StoreError::Closed)
    }

    fn mark_broken(&self, why: &str) {
        *self.why.lock().expect("store lock") = why.to_owned();
        self.broken.store(true, Ordering::SeqCst);
    }

    fn unavailable(&self) -> StoreError {
        StoreError::Unavailable(self.why.lock().expect("store lock").clone())
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
            let why = format!("reopening failed: {e}");
            *self.why.lock().expect("store lock") = why.clone();
            StoreError::Unavailable(why)
        })?;
        *self.current.write().expect("store lock") = Some(Arc::new(handles));
        self.broken.store(false, Ordering::SeqCst);
        tracing::warn!("store reopened after a failed write");
        Ok(())
    }
}

impl Store {
    /// Opens (creating if needed) the store in `dir` and starts its flusher on the current runtime.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let handles = open_handles(dir, 0)?;
        let shared = Arc::new(Shared {
            dir: dir.to_owned(),
            current: RwLock::new(Some(Arc::new(handles))),
            broken: AtomicBool::new(false),
            why: Mutex::new(String::new()),
            reopening: Mutex::new(None),
            generations: AtomicU64::new(0),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let flusher = tokio::spawn(flusher(shared.clone(), rx));
        Ok(Store {
            inner: Arc::new(Inner {
                shared,
                flush_requests: tx,
                flusher,
            }),
        })
    }

    fn handles(&self) -> Result<Arc<Handles>, StoreError> {
        self.inner.shared.handles()
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
        let h = self.handles()?;
        // Index first: an index entry without its record is harmless (pruning skips it), a record
        // without an index entry would never be pruned.
        let written = h
            .by_time
            .insert(time_key(record.delivered_at_ms, id), &[])
            .and_then(|_| h.delivered.insert(id.as_bytes(), value));
        let generation = h.generation;
        drop(h);
        if let Err(e) = written {
            self.inner.shared.mark_broken(&e.to_string());
            return Err(e.into());
        }
        let flushed = self.flush_generation().await?;
        if flushed != generation {
            // The database was reopened in between: the write went to the old opening.
            return Err(self.inner.shared.unavailable());
        }
        Ok(())
    }

    /// Waits for a flush that starts after this call: everything written before is then durable.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.flush_generation().await.map(drop)
    }

    async fn flush_generation(&self) -> Result<u64, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .flush_requests
            .send(tx)
            .map_err(|_| StoreError::Closed)?;
        match rx.await {
            Ok(Ok(generation)) => Ok(generation),
            Ok(Err(message)) => Err(StoreError::Io(sled::Error::Io(std::io::Error::other(
                message,
            )))),
            Err(_) => Err(StoreError::Closed),
        }
    }

    /// Removes records delivered before `now - retention`. Returns how many were removed.
    pub fn prune(&self, retention: Duration) -> Result<usize, StoreError> {
        let h = self.handles()?;
        let cutoff = now_ms().saturating_sub(retention.as_millis() as u64);
        let mut removed = 0;
        for entry in h.by_time.range(..cutoff.to_be_bytes().to_vec()) {
            let (key, _) = entry?;
            if let Ok(id) = <[u8; 16]>::try_from(&key[8..]) {
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
                    flush_requests,
                    flusher,
                } = inner;
                drop(flush_requests);
                let _ = flusher.await;
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
                .map_err(|e| StoreError::Io(sled::Error::Io(std::io::Error::other(e))))??;
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
            self.inner.shared.mark_broken(&e.to_string());
            return Err(e.into());
        }
        drop(h);
        self.flush().await
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn time_key(at_ms: u64, id: &Uuid) -> [u8; 24] {
    let mut key = [0u8; 24];
    key[..8].copy_from_slice(&at_ms.to_be_bytes());
    key[8..].copy_from_slice(id.as_bytes());
    key
}

/// The group commit: take every waiter queued so far, fsync once, answer them all with the
/// generation flushed. A failed flush marks the store broken (reopened at its next use).
async fn flusher(shared: Arc<Shared>, mut requests: mpsc::UnboundedReceiver<FlushWaiter>) {
    let mut batch = Vec::new();
    while let Some(first) = requests.recv().await {
        batch.push(first);
        while let Ok(more) = requests.try_recv() {
            batch.push(more);
        }
        let shared_for_flush = shared.clone();
        let result = tokio::task::spawn_blocking(move || {
            let h = shared_for_flush.handles().map_err(|e| e.to_string())?;
            match h.db.flush() {
                Ok(_) => Ok(h.generation),
                Err(e) => {
                    shared_for_flush.mark_broken(&e.to_string());
                    Err(e.to_string())
                }
            }
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
        for waiter in batch.drain(..) {
            let _ = waiter.send(result.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(at: u64) -> Delivered {
        Delivered {
            delivered_at_ms: at,
            kind: "send-text".into(),
            blinger_id: Some("m1".into()),
            blinger_status: Some("delivered".into()),
            attempts: 1,
        }
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
        store.inner.shared.mark_broken("simulated failure");
        // The next use reopens the database; what was durable is still there.
        assert!(store.get(&before).unwrap().is_some());
        assert_eq!(store.inner.shared.generations.load(Ordering::SeqCst), 1);
        let after = Uuid::new_v4();
        store.record(&after, &record(now_ms())).await.unwrap();
        // While broken and within a second of the last attempt, it answers errors.
        store.inner.shared.mark_broken("simulated failure");
        *store.inner.shared.reopening.lock().unwrap() = Some(Instant::now());
        assert!(matches!(
            store.get(&before),
            Err(StoreError::Unavailable(why)) if why.contains("simulated")
        ));
        *store.inner.shared.reopening.lock().unwrap() = None;
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
