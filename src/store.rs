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
//! sled is kept behind this module (it carries RustSec "unmaintained" advisories): swapping it
//! touches nothing else.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct StoreStats {
    pub records: usize,
    pub size_on_disk_bytes: u64,
}

type FlushWaiter = oneshot::Sender<Result<(), String>>;

/// Page cache of the store. Lookups are by exact key and mostly for recent jobs.
const CACHE_BYTES: u64 = 16 * 1024 * 1024;

/// Cheap to clone; all clones share one database and one flusher.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    db: sled::Db,
    delivered: sled::Tree,
    /// Key: delivered_at (ms, big-endian) ++ uuid. Lets pruning read only what is old.
    by_time: sled::Tree,
    flush_requests: mpsc::UnboundedSender<FlushWaiter>,
    flusher: tokio::task::JoinHandle<()>,
}

impl Store {
    /// Opens (creating if needed) the store in `dir` and starts its flusher on the current runtime.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let open_err = |source| StoreError::Open {
            path: dir.display().to_string(),
            source,
        };
        let db = sled::Config::new()
            .path(dir)
            .mode(sled::Mode::HighThroughput)
            // Durability comes from our group commit; the background flush only bounds how much
            // un-acked work a crash can lose.
            .flush_every_ms(Some(1000))
            // sled's default page cache is 1 GiB; records are small and hot ones are recent.
            .cache_capacity(CACHE_BYTES)
            .open()
            .map_err(open_err)?;
        let delivered = db.open_tree("delivered").map_err(open_err)?;
        let by_time = db.open_tree("delivered_by_time").map_err(open_err)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let flusher = tokio::spawn(flusher(db.clone(), rx));
        Ok(Store {
            inner: Arc::new(Inner {
                db,
                delivered,
                by_time,
                flush_requests: tx,
                flusher,
            }),
        })
    }

    pub fn get(&self, id: &Uuid) -> Result<Option<Delivered>, StoreError> {
        match self.inner.delivered.get(id.as_bytes())? {
            Some(raw) => Ok(Some(serde_json::from_slice(&raw)?)),
            None => Ok(None),
        }
    }

    /// Records a delivery and returns once it is durable on disk.
    pub async fn record(&self, id: &Uuid, record: &Delivered) -> Result<(), StoreError> {
        let value = serde_json::to_vec(record)?;
        // Index first: an index entry without its record is harmless (pruning skips it), a record
        // without an index entry would never be pruned.
        self.inner
            .by_time
            .insert(time_key(record.delivered_at_ms, id), &[])?;
        self.inner.delivered.insert(id.as_bytes(), value)?;
        self.flush().await
    }

    /// Waits for a flush that starts after this call: everything written before is then durable.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .flush_requests
            .send(tx)
            .map_err(|_| StoreError::Closed)?;
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(message)) => Err(StoreError::Io(sled::Error::Io(std::io::Error::other(
                message,
            )))),
            Err(_) => Err(StoreError::Closed),
        }
    }

    /// Removes records delivered before `now - retention`. Returns how many were removed.
    pub fn prune(&self, retention: Duration) -> Result<usize, StoreError> {
        let cutoff = now_ms().saturating_sub(retention.as_millis() as u64);
        let mut removed = 0;
        for entry in self.inner.by_time.range(..cutoff.to_be_bytes().to_vec()) {
            let (key, _) = entry?;
            if let Ok(id) = <[u8; 16]>::try_from(&key[8..]) {
                // A newer record under the same id (a replayed, re-sent job) has its own entry.
                if let Some(raw) = self.inner.delivered.get(id)? {
                    let record: Delivered = serde_json::from_slice(&raw)?;
                    if record.delivered_at_ms < cutoff {
                        self.inner.delivered.remove(id)?;
                        removed += 1;
                    }
                }
            }
            self.inner.by_time.remove(key)?;
        }
        Ok(removed)
    }

    pub fn stats(&self) -> Result<StoreStats, StoreError> {
        Ok(StoreStats {
            records: self.inner.delivered.len(),
            size_on_disk_bytes: self.inner.db.size_on_disk()?,
        })
    }

    /// Flushes and, if this is the last handle, closes the database and releases its lock
    /// before returning (a restarted worker, or an operator command, can open it at once).
    pub async fn close(self) -> Result<(), StoreError> {
        self.flush().await?;
        match Arc::try_unwrap(self.inner) {
            Ok(inner) => {
                let Inner {
                    db,
                    delivered,
                    by_time,
                    flush_requests,
                    flusher,
                } = inner;
                drop((delivered, by_time, flush_requests));
                let _ = flusher.await;
                tokio::task::spawn_blocking(move || {
                    let result = db.flush();
                    drop(db);
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
        self.inner.db.insert("health", &now_ms().to_be_bytes())?;
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

/// The group commit: take every waiter queued so far, fsync once, answer them all.
async fn flusher(db: sled::Db, mut requests: mpsc::UnboundedReceiver<FlushWaiter>) {
    let mut batch = Vec::new();
    while let Some(first) = requests.recv().await {
        batch.push(first);
        while let Ok(more) = requests.try_recv() {
            batch.push(more);
        }
        let db = db.clone();
        let result = tokio::task::spawn_blocking(move || db.flush())
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map(|_| ()).map_err(|e| e.to_string()));
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
