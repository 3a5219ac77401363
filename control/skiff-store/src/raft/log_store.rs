//! The Raft log and vote on redb (`raft-log.redb`).

use std::{
    collections::BTreeMap,
    fmt::Debug,
    ops::{Bound, RangeBounds},
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

use super::{DurableWatch, NodeId, RaftStorageError, TypeConfig};
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
    /// The log's tail in memory, see [`Recent`].
    recent: Mutex<Recent>,
    next_seq: AtomicU64,
    /// The latest committed log id (encoded) not yet written: it rides along with the next
    /// transaction instead of costing an fsync of its own.
    committed: Mutex<Option<Vec<u8>>>,
    /// How far the state machine is durable; purges wait for it (see [`LogStore::purge_after`]).
    durable: std::sync::OnceLock<DurableWatch>,
}

/// Most entries kept in memory once durable.
const RECENT_ENTRIES: usize = 4096;
/// Most bytes (encoded) of entries kept in memory once durable.
const RECENT_BYTES: usize = 32 << 20;

/// The last entries appended, a contiguous run of the log's tail: every entry not yet durable
/// (so it is readable before its fsync), and the latest durable ones within
/// [`RECENT_ENTRIES`]/[`RECENT_BYTES`], so replication and apply read what was just appended
/// without a file read and a decode.
#[derive(Default)]
struct Recent {
    entries: BTreeMap<u64, Cached>,
    /// Encoded size of `entries`.
    bytes: usize,
}

struct Cached {
    /// The append that wrote it (an index is written again after a truncation).
    seq: u64,
    /// Encoded size.
    size: usize,
    /// Its append's transaction is committed.
    durable: bool,
    entry: Entry<TypeConfig>,
}

impl Recent {
    fn insert(&mut self, index: u64, cached: Cached) {
        self.bytes += cached.size;
        if let Some(old) = self.entries.insert(index, cached) {
            self.bytes -= old.size;
        }
    }

    /// Keeps only the entries whose index `keep` accepts.
    fn retain(&mut self, mut keep: impl FnMut(u64) -> bool) {
        let bytes = &mut self.bytes;
        self.entries.retain(|i, c| {
            let k = keep(*i);
            if !k {
                *bytes -= c.size;
            }
            k
        });
    }

    /// Marks the entries of append `seq` durable, then forgets the oldest durable entries
    /// over the limits.
    fn flushed(&mut self, seq: u64, indexes: impl Iterator<Item = u64>) {
        for i in indexes {
            if let Some(c) = self.entries.get_mut(&i)
                && c.seq == seq
            {
                c.durable = true;
            }
        }
        while self.entries.len() > RECENT_ENTRIES || self.bytes > RECENT_BYTES {
            match self.entries.first_entry() {
                Some(first) if first.get().durable => {
                    self.bytes -= first.remove().size;
                }
                _ => break,
            }
        }
    }
}

/// A write run inside the log writer's next transaction.
type OrderedOp = Box<dyn FnOnce(&redb::WriteTransaction) -> Result<(), StoreError> + Send>;

/// Told whether an append is durable.
type Flushed = Box<dyn FnOnce(Result<(), std::io::Error>) + Send>;

/// Work for the log-writer thread, done in queue order.
enum Job {
    Append {
        seq: u64,
        entries: Vec<(u64, Vec<u8>)>,
        flushed: Flushed,
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
        // Taken before draining the queue: the appends of the entries it names were queued
        // before it was saved, so they are in this batch or an earlier one.
        let committed = shared
            .committed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        batch.extend(jobs.try_iter());
        let written = (|| -> Result<(), StoreError> {
            let wtx = db.begin_write().op("begin write")?;
            if let Some(c) = &committed {
                put_committed(&wtx, c)?;
            }
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
                    flushed,
                } => {
                    if failure.is_none() {
                        shared
                            .recent
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .flushed(seq, entries.iter().map(|(i, _)| *i));
                    }
                    flushed(match &failure {
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
    // The queue is closed: the store is closing. Keep the latest committed log id.
    let committed = shared
        .committed
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    if let Some(c) = committed {
        let written = db.begin_write().op("begin write").and_then(|wtx| {
            put_committed(&wtx, &c)?;
            wtx.commit().op("commit log")
        });
        if let Err(e) = written {
            tracing::warn!(error = %e, "saving the committed log id at close");
        }
    }
}

/// Stores the (encoded) committed log id in `wtx`.
fn put_committed(wtx: &redb::WriteTransaction, committed: &[u8]) -> Result<(), StoreError> {
    wtx.open_table(STATE)
        .op("open state")?
        .insert(COMMITTED, committed)
        .op("write state")?;
    Ok(())
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
            recent: Mutex::new(Recent::default()),
            next_seq: AtomicU64::new(0),
            committed: Mutex::new(None),
            durable: std::sync::OnceLock::new(),
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

    /// Makes every purge wait until the state machine holds the purged entries durably, so
    /// the log never starts after what the state file holds (openraft 0.9 purges the log when
    /// it hands a received snapshot to the state machine, before the install is done). A
    /// purge fails if the state machine fails first. Set once, before Raft starts.
    pub fn purge_after(&self, durable: DurableWatch) {
        let _ = self.shared.durable.set(durable);
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

    /// Makes `entries` readable now and queues them for the log writer, which calls `flushed`
    /// after the fsync of the transaction that carried them.
    fn queue_append(
        &self,
        entries: impl IntoIterator<Item = Entry<TypeConfig>>,
        flushed: Flushed,
    ) -> Result<(), StoreError> {
        let entries: Vec<(Entry<TypeConfig>, Vec<u8>)> = entries
            .into_iter()
            .map(|e| enc(&e).map(|b| (e, b)))
            .collect::<Result<_, _>>()?;
        let seq = self.shared.next_seq.fetch_add(1, Ordering::Relaxed);
        let mut encoded = Vec::with_capacity(entries.len());
        {
            let mut recent = self.shared.recent.lock().unwrap_or_else(|p| p.into_inner());
            for (entry, b) in entries {
                let index = entry.log_id.index;
                let size = b.len();
                recent.insert(
                    index,
                    Cached {
                        seq,
                        size,
                        durable: false,
                        entry,
                    },
                );
                encoded.push((index, b));
            }
        }
        self.send(Job::Append {
            seq,
            entries: encoded,
            flushed,
        })
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
        let mut next = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = range.end_bound().cloned();
        let mut out = Vec::new();
        // The tail in memory answers from its first entry on; older entries come from the
        // file. The tail may lose old entries while the file is read, hence the loop.
        loop {
            let first = {
                let recent = self.shared.recent.lock().unwrap_or_else(|p| p.into_inner());
                let first = recent.entries.first_key_value().map(|(i, _)| *i);
                if first.is_some_and(|f| f <= next) {
                    out.extend(
                        recent
                            .entries
                            .range((Bound::Included(next), end))
                            .map(|(_, c)| c.entry.clone()),
                    );
                    return Ok(out);
                }
                first
            };
            let from = next;
            let upto = first.map_or(end, Bound::Excluded);
            let part: Vec<Entry<TypeConfig>> = self
                .blocking(move |db| {
                    let rtx = db.begin_read().op("begin read")?;
                    let log = rtx.open_table(LOG).op("open log")?;
                    let mut out = Vec::new();
                    for e in log
                        .range::<u64>((Bound::Included(from), upto))
                        .op("scan log")?
                    {
                        let (_, v) = e.op("scan log")?;
                        out.push(dec(v.value())?);
                    }
                    Ok(out)
                })
                .await
                .map_err(|e| io_err(StorageIOError::read_logs, e))?;
            out.extend(part.into_iter().filter(|e| range.contains(&e.log_id.index)));
            match first {
                Some(f) if range.contains(&f) => next = f,
                _ => return Ok(out),
            }
        }
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
            .recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entries
            .last_key_value()
            .map(|(_, c)| c.entry.log_id);
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

    /// Rides along with the next log transaction without waiting: it only lets a restarted
    /// node apply sooner, so losing the latest value is safe, and an fsync of its own would
    /// double the log's fsyncs (every commit advance saves it). Written at the latest when the
    /// store closes.
    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), RaftStorageError> {
        let bytes = enc(&committed).map_err(|e| io_err(StorageIOError::write, e))?;
        *self
            .shared
            .committed
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(bytes);
        Ok(())
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
        self.queue_append(
            entries,
            Box::new(move |result| callback.log_io_completed(result)),
        )
        .map_err(|e| io_err(StorageIOError::write_logs, e))
    }

    /// Removes entries at and after `log_id.index` (conflicting entries from an old leader).
    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), RaftStorageError> {
        self.shared
            .recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|i| i < log_id.index);
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
    /// Waits for the state machine to hold the entries durably (see [`LogStore::purge_after`]),
    /// then deletes them and records the purge, in order with appends.
    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), RaftStorageError> {
        if let Some(durable) = self.shared.durable.get() {
            durable
                .reached(log_id.index)
                .await
                .map_err(|e| io_err(StorageIOError::write_logs, e))?;
        }
        let purged = enc(&log_id).map_err(|e| io_err(StorageIOError::write_logs, e))?;
        self.shared
            .recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|i| i > log_id.index);
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

#[cfg(test)]
mod tests {
    use openraft::testing::{blank_ent, log_id};

    use super::*;

    #[tokio::test]
    async fn a_purge_waits_until_the_state_machine_holds_the_entries_durably() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut log = LogStore::open(&dir.path().join("raft-log.redb")).expect("open");
        append(&log, 1, 1..=20).await;
        let durable = super::super::DurablyApplied::new(Some(log_id(1, 1, 5)));
        log.purge_after(durable.watch());

        // Up to what the state file holds: at once.
        log.purge(log_id(1, 1, 4)).await.expect("purge");
        // Past it (a snapshot handed over, not yet installed): waits, and records nothing.
        let mut waiting = log.clone();
        let purge = tokio::spawn(async move { waiting.purge(log_id(1, 1, 15)).await });
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert!(!purge.is_finished(), "the purge waits for the install");
        let state = log.get_log_state().await.expect("state");
        assert_eq!(state.last_purged_log_id, Some(log_id(1, 1, 4)));
        assert_eq!(
            read(&mut log, 5..=5).await.len(),
            1,
            "entry 5 is still there"
        );

        durable.advance(Some(log_id(1, 1, 15)));
        purge.await.expect("join").expect("purge after the install");
        let state = log.get_log_state().await.expect("state");
        assert_eq!(state.last_purged_log_id, Some(log_id(1, 1, 15)));

        // A failed state machine fails a waiting purge instead of holding Raft forever.
        let mut waiting = log.clone();
        let purge = tokio::spawn(async move { waiting.purge(log_id(1, 1, 18)).await });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        durable.fail();
        let e = purge
            .await
            .expect("join")
            .expect_err("fails with the state machine");
        assert!(e.to_string().contains("state machine stopped"), "{e}");
        let state = log.get_log_state().await.expect("state");
        assert_eq!(state.last_purged_log_id, Some(log_id(1, 1, 15)));
    }

    #[tokio::test]
    async fn a_purge_fails_when_the_state_machine_is_gone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = LogStore::open(&dir.path().join("raft-log.redb")).expect("open");
        append(&log, 1, 1..=20).await;
        let durable = super::super::DurablyApplied::new(Some(log_id(1, 1, 5)));
        log.purge_after(durable.watch());
        let mut waiting = log.clone();
        let purge = tokio::spawn(async move { waiting.purge(log_id(1, 1, 15)).await });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        // The state machine's worker stopped without saying so (a panic, an error elsewhere).
        drop(durable);
        let e = purge
            .await
            .expect("join")
            .expect_err("fails without a state machine");
        assert!(e.to_string().contains("state machine stopped"), "{e}");
    }

    /// Appends blank entries `indexes` in `term` and waits until they are durable.
    async fn append(log: &LogStore, term: u64, indexes: std::ops::RangeInclusive<u64>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let entries = indexes.map(|i| blank_ent::<TypeConfig>(term, 1, i));
        log.queue_append(entries, Box::new(move |r| drop(tx.send(r))))
            .expect("queue append");
        rx.await
            .expect("writer answers")
            .expect("append is durable");
    }

    async fn read(
        log: &mut LogStore,
        range: impl RangeBounds<u64> + Clone + Debug + Send,
    ) -> Vec<(u64, u64)> {
        log.try_get_log_entries(range)
            .await
            .expect("read log")
            .into_iter()
            .map(|e| (e.log_id.index, e.log_id.leader_id.term))
            .collect()
    }

    fn expect(term: u64, indexes: impl Iterator<Item = u64>) -> Vec<(u64, u64)> {
        indexes.map(|i| (i, term)).collect()
    }

    #[tokio::test]
    async fn reads_join_the_file_and_the_tail_in_memory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("raft-log.redb");
        let mut log = LogStore::open(&path).expect("open");
        let last = RECENT_ENTRIES as u64 + 1000;
        for start in (1..=last).step_by(250) {
            append(&log, 1, start..=(start + 249).min(last)).await;
        }
        let first_in_memory = {
            let recent = log.shared.recent.lock().expect("lock");
            assert_eq!(
                recent.entries.len(),
                RECENT_ENTRIES,
                "durable tail is bounded"
            );
            *recent.entries.first_key_value().expect("tail").0
        };
        assert!(
            first_in_memory > 1,
            "the oldest entries are only in the file"
        );

        assert_eq!(read(&mut log, ..).await, expect(1, 1..=last));
        assert_eq!(read(&mut log, 1..4).await, expect(1, 1..4));
        let around = first_in_memory - 5..=first_in_memory + 5;
        assert_eq!(read(&mut log, around.clone()).await, expect(1, around));
        assert_eq!(read(&mut log, last - 3..).await, expect(1, last - 3..=last));
        assert_eq!(read(&mut log, last + 1..).await, Vec::new());

        // A new leader's entries replace the conflicting tail, in memory and in the file.
        log.truncate(log_id(1, 1, last - 10))
            .await
            .expect("truncate");
        append(&log, 2, last - 10..=last - 5).await;
        let mut want = expect(1, 1..last - 10);
        want.extend(expect(2, last - 10..=last - 5));
        assert_eq!(read(&mut log, ..).await, want);

        // Purged entries are gone from both.
        log.purge(log_id(1, 1, 100)).await.expect("purge");
        assert_eq!(read(&mut log, ..).await, want[100..].to_vec());

        // After a restart everything comes from the file.
        drop(log);
        let mut log = LogStore::open(&path).expect("reopen");
        assert_eq!(read(&mut log, ..).await, want[100..].to_vec());
        let state = log.get_log_state().await.expect("log state");
        assert_eq!(state.last_log_id, Some(log_id(2, 1, last - 5)));
        assert_eq!(state.last_purged_log_id, Some(log_id(1, 1, 100)));
    }

    #[tokio::test]
    async fn committed_rides_with_the_next_append_or_the_close() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("raft-log.redb");
        let mut log = LogStore::open(&path).expect("open");
        append(&log, 1, 1..=3).await;
        log.save_committed(Some(log_id(1, 1, 2)))
            .await
            .expect("save");
        append(&log, 1, 4..=4).await;
        // Read from the file by a second handle: the value is on disk, not only queued.
        let on_disk = {
            let rtx = log.db.begin_read().expect("read");
            let t = rtx.open_table(STATE).expect("state");
            let v = t.get(COMMITTED).expect("get").map(|v| v.value().to_vec());
            v.map(|b| dec::<Option<LogId<NodeId>>>(&b).expect("decode"))
        };
        assert_eq!(on_disk, Some(Some(log_id(1, 1, 2))));

        // With no append after it, closing the store writes it.
        log.save_committed(Some(log_id(1, 1, 4)))
            .await
            .expect("save");
        drop(log);
        let mut log = LogStore::open(&path).expect("reopen");
        assert_eq!(
            log.read_committed().await.expect("read"),
            Some(log_id(1, 1, 4))
        );
    }
}
