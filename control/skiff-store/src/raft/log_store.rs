//! The Raft log and vote on redb (`raft-log.redb`).

use std::{
    collections::BTreeMap,
    fmt::Debug,
    ops::RangeBounds,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
};

use openraft::{
    AnyError, Entry, LogId, LogState, RaftLogReader, StorageIOError, Vote,
    storage::{LogFlushed, RaftLogStorage},
};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use super::{NodeId, RaftStorageError, TypeConfig};
use crate::{StoreError, error::RedbContext};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("state");

/// Format of the log file written by this build.
pub const LOG_FORMAT: u64 = 1;

const FORMAT_KEY: &str = "format";
const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const PURGED: &str = "last_purged";

/// The Raft log store. Cheap to clone (clones share the file and the writer).
///
/// Appends are group-committed: [`RaftLogStorage::append`] makes the entries readable at once
/// (an in-memory map of entries not yet on disk) and queues them for the log-writer thread,
/// which writes everything queued so far in one transaction with one fsync, then tells openraft
/// each batch is durable through its callback. So concurrent client writes share fsyncs without
/// holding up the Raft core.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
    shared: Arc<Shared>,
    /// The writer thread; dropping the last clone stops it and waits for it, so the file is
    /// closed when the store is.
    jobs: Arc<WriterHandle>,
}

struct WriterHandle {
    tx: Mutex<Option<mpsc::Sender<Job>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Drop for WriterHandle {
    fn drop(&mut self) {
        // Closing the queue ends the writer's loop after the work already queued.
        drop(self.tx.lock().unwrap_or_else(|p| p.into_inner()).take());
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }
}

impl Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore").finish_non_exhaustive()
    }
}

struct Shared {
    /// Entries appended but not yet durable: index → (append sequence, entry).
    pending: Mutex<BTreeMap<u64, (u64, Entry<TypeConfig>)>>,
    next_seq: AtomicU64,
}

/// A write run inside the log writer's next transaction.
type OrderedOp = Box<dyn FnOnce(&redb::WriteTransaction) -> Result<(), StoreError> + Send>;

/// Work for the log-writer thread, done in queue order.
enum Job {
    Append {
        seq: u64,
        entries: Vec<(u64, Vec<u8>)>,
        callback: LogFlushed<TypeConfig>,
    },
    /// A write that must be ordered with appends (truncate, purge); `done` gets the result.
    Ordered {
        op: OrderedOp,
        done: tokio::sync::oneshot::Sender<Result<(), String>>,
    },
}

/// The log-writer thread: drains the queue, one transaction and one fsync per drain.
fn writer(db: Arc<Database>, shared: Arc<Shared>, jobs: mpsc::Receiver<Job>) {
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        batch.extend(jobs.try_iter());
        let written = (|| -> Result<(), StoreError> {
            let wtx = db.begin_write().op("begin write")?;
            for job in &mut batch {
                match job {
                    Job::Append { entries, .. } => {
                        let mut log = wtx.open_table(LOG).op("open log")?;
                        for (i, b) in entries.iter() {
                            log.insert(*i, b.as_slice()).op("append log")?;
                        }
                    }
                    Job::Ordered { op, .. } => {
                        let op = std::mem::replace(op, Box::new(|_| Ok(())));
                        op(&wtx)?;
                    }
                }
            }
            // Immediate durability: fsync before commit() returns.
            wtx.commit().op("commit log")
        })();
        let failure = written.as_ref().err().map(|e| e.to_string());
        for job in batch {
            match job {
                Job::Append {
                    seq,
                    entries,
                    callback,
                } => {
                    if failure.is_none() {
                        let mut pending = shared.pending.lock().unwrap_or_else(|p| p.into_inner());
                        for (i, _) in &entries {
                            if pending.get(i).is_some_and(|(s, _)| *s == seq) {
                                pending.remove(i);
                            }
                        }
                    }
                    callback.log_io_completed(match &failure {
                        None => Ok(()),
                        Some(m) => Err(std::io::Error::other(m.clone())),
                    });
                }
                Job::Ordered { done, .. } => {
                    let _ = done.send(match &failure {
                        None => Ok(()),
                        Some(m) => Err(m.clone()),
                    });
                }
            }
        }
    }
}

fn io_err(make: fn(AnyError) -> StorageIOError<NodeId>, e: StoreError) -> RaftStorageError {
    make(AnyError::new(&e)).into()
}

fn enc<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    postcard::to_allocvec(v).map_err(|e| StoreError::Invalid(format!("encode: {e}")))
}

fn dec<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T, StoreError> {
    postcard::from_bytes(b).map_err(|e| StoreError::Invalid(format!("decode: {e}")))
}

impl LogStore {
    /// Opens or creates the log file; damaged or foreign files are errors, never replaced.
    pub fn open(path: &Path) -> Result<LogStore, StoreError> {
        let db = crate::db::open_or_create(path, STATE, FORMAT_KEY, LOG_FORMAT, |wtx| {
            wtx.open_table(LOG).op("create log")?;
            Ok(())
        })?;
        let db = Arc::new(db);
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared {
            pending: Mutex::new(BTreeMap::new()),
            next_seq: AtomicU64::new(0),
        });
        let (wdb, wshared) = (db.clone(), shared.clone());
        let thread = std::thread::Builder::new()
            .name("raft-log-writer".into())
            .spawn(move || writer(wdb, wshared, rx))
            .map_err(|e| StoreError::Io {
                op: "start log writer",
                path: path.to_path_buf(),
                source: e,
            })?;
        Ok(LogStore {
            db,
            shared,
            jobs: Arc::new(WriterHandle {
                tx: Mutex::new(Some(tx)),
                thread: Mutex::new(Some(thread)),
            }),
        })
    }

    /// Dead once nothing (store clone, writer thread, blocking read) holds the file open.
    pub fn liveness(&self) -> std::sync::Weak<Database> {
        Arc::downgrade(&self.db)
    }

    /// Queues an ordered write behind every append queued so far and waits for it to be
    /// durable.
    async fn ordered(
        &self,
        op: impl FnOnce(&redb::WriteTransaction) -> Result<(), StoreError> + Send + 'static,
    ) -> Result<(), StoreError> {
        let (done, rx) = tokio::sync::oneshot::channel();
        self.send(Job::Ordered {
            op: Box::new(op),
            done,
        })?;
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(m)) => Err(StoreError::Unavailable(format!("log write failed: {m}"))),
            Err(_) => Err(StoreError::Unavailable("log writer stopped".into())),
        }
    }

    fn send(&self, job: Job) -> Result<(), StoreError> {
        self.jobs
            .tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .ok_or_else(|| StoreError::Unavailable("log writer stopped".into()))?
            .send(job)
            .map_err(|_| StoreError::Unavailable("log writer stopped".into()))
    }

    /// Runs a blocking redb operation off the async runtime's worker threads.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
    }

    async fn state_get<T: serde::de::DeserializeOwned + Send + 'static>(
        &self,
        key: &'static str,
    ) -> Result<Option<T>, StoreError> {
        self.blocking(move |db| {
            let rtx = db.begin_read().op("begin read")?;
            let t = rtx.open_table(STATE).op("open state")?;
            match t.get(key).op("read state")? {
                Some(v) => Ok(Some(dec(v.value())?)),
                None => Ok(None),
            }
        })
        .await
    }

    async fn state_put(
        &self,
        key: &'static str,
        value: Vec<u8>,
        durability: Durability,
    ) -> Result<(), StoreError> {
        self.blocking(move |db| {
            let mut wtx = db.begin_write().op("begin write")?;
            wtx.set_durability(durability)
                .map_err(|e| StoreError::Invalid(e.to_string()))?;
            wtx.open_table(STATE)
                .op("open state")?
                .insert(key, value.as_slice())
                .op("write state")?;
            wtx.commit().op("commit")
        })
        .await
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, RaftStorageError> {
        let (start, end) = (range.start_bound().cloned(), range.end_bound().cloned());
        let on_disk: Vec<Entry<TypeConfig>> = self
            .blocking(move |db| {
                let rtx = db.begin_read().op("begin read")?;
                let log = rtx.open_table(LOG).op("open log")?;
                let mut out = Vec::new();
                for e in log.range::<u64>((start, end)).op("scan log")? {
                    let (_, v) = e.op("scan log")?;
                    out.push(dec(v.value())?);
                }
                Ok(out)
            })
            .await
            .map_err(|e| io_err(StorageIOError::read_logs, e))?;
        // Entries not yet durable are readable too, and newer than what is on disk.
        let mut merged: BTreeMap<u64, Entry<TypeConfig>> =
            on_disk.into_iter().map(|e| (e.log_id.index, e)).collect();
        let pending = self
            .shared
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for (i, (_, e)) in pending.range((start, end)) {
            merged.insert(*i, e.clone());
        }
        Ok(merged.into_values().collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, RaftStorageError> {
        let purged: Option<LogId<NodeId>> = self
            .state_get(PURGED)
            .await
            .map_err(|e| io_err(StorageIOError::read_logs, e))?;
        let last = self
            .blocking(|db| {
                let rtx = db.begin_read().op("begin read")?;
                let log = rtx.open_table(LOG).op("open log")?;
                match log.last().op("read log")? {
                    Some((_, v)) => Ok(Some(dec::<Entry<TypeConfig>>(v.value())?.log_id)),
                    None => Ok(None),
                }
            })
            .await
            .map_err(|e| io_err(StorageIOError::read_logs, e))?;
        let pending_last = self
            .shared
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last_key_value()
            .map(|(_, (_, e))| e.log_id);
        Ok(LogState {
            last_purged_log_id: purged,
            last_log_id: pending_last.max(last).or(purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    /// The vote is fsynced before returning: a node must never vote twice in a term.
    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), RaftStorageError> {
        let bytes = enc(vote).map_err(|e| io_err(StorageIOError::write_vote, e))?;
        self.state_put(VOTE, bytes, Durability::Immediate)
            .await
            .map_err(|e| io_err(StorageIOError::write_vote, e))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, RaftStorageError> {
        self.state_get(VOTE)
            .await
            .map_err(|e| io_err(StorageIOError::read_vote, e))
    }

    /// Queued behind the appends without waiting: it only lets a restarted node apply sooner,
    /// so it rides along with the next fsync and losing the latest value is safe. (Waiting here
    /// would hold the Raft core behind every fsync.)
    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), RaftStorageError> {
        let bytes = enc(&committed).map_err(|e| io_err(StorageIOError::write, e))?;
        let (done, _ignored) = tokio::sync::oneshot::channel();
        self.send(Job::Ordered {
            op: Box::new(move |wtx| {
                wtx.open_table(STATE)
                    .op("open state")?
                    .insert(COMMITTED, bytes.as_slice())
                    .op("write state")?;
                Ok(())
            }),
            done,
        })
        .map_err(|e| io_err(StorageIOError::write, e))
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, RaftStorageError> {
        Ok(self
            .state_get::<Option<LogId<NodeId>>>(COMMITTED)
            .await
            .map_err(|e| io_err(StorageIOError::read, e))?
            .flatten())
    }

    /// Makes the entries readable now and queues them for the log writer; openraft learns they
    /// are durable through `callback`, after the fsync of the batch that carried them.
    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), RaftStorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let seq = self.shared.next_seq.fetch_add(1, Ordering::Relaxed);
        let mut encoded = Vec::new();
        {
            let mut pending = self
                .shared
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            for e in entries {
                let b = enc(&e).map_err(|e| io_err(StorageIOError::write_logs, e))?;
                encoded.push((e.log_id.index, b));
                pending.insert(e.log_id.index, (seq, e));
            }
        }
        self.send(Job::Append {
            seq,
            entries: encoded,
            callback,
        })
        .map_err(|e| io_err(StorageIOError::write_logs, e))
    }

    /// Removes entries at and after `log_id.index` (conflicting entries from an old leader).
    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), RaftStorageError> {
        self.shared
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|i, _| *i < log_id.index);
        self.ordered(move |wtx| {
            wtx.open_table(LOG)
                .op("open log")?
                .retain_in(log_id.index.., |_, _| false)
                .op("truncate log")
        })
        .await
        .map_err(|e| io_err(StorageIOError::write_logs, e))
    }

    /// Removes entries up to and including `log_id` (they are in a snapshot).
    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), RaftStorageError> {
        let purged = enc(&log_id).map_err(|e| io_err(StorageIOError::write_logs, e))?;
        self.ordered(move |wtx| {
            wtx.open_table(STATE)
                .op("open state")?
                .insert(PURGED, purged.as_slice())
                .op("write state")?;
            wtx.open_table(LOG)
                .op("open log")?
                .retain_in(..=log_id.index, |_, _| false)
                .op("purge log")
        })
        .await
        .map_err(|e| io_err(StorageIOError::write_logs, e))
    }
}
