//! The Raft log and vote on redb (`raft-log.redb`).

use std::{fmt::Debug, ops::RangeBounds, path::Path, sync::Arc};

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

/// The Raft log store. Cheap to clone (clones share the file).
#[derive(Clone, Debug)]
pub struct LogStore {
    db: Arc<Database>,
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
        Ok(LogStore { db: Arc::new(db) })
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
        self.blocking(move |db| {
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
        .map_err(|e| io_err(StorageIOError::read_logs, e))
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
        Ok(LogState {
            last_purged_log_id: purged,
            last_log_id: last.or(purged),
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

    /// Saved without fsync: it only lets a restarted node apply sooner; losing it is safe.
    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), RaftStorageError> {
        let bytes = enc(&committed).map_err(|e| io_err(StorageIOError::write, e))?;
        self.state_put(COMMITTED, bytes, Durability::None)
            .await
            .map_err(|e| io_err(StorageIOError::write, e))
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, RaftStorageError> {
        Ok(self
            .state_get::<Option<LogId<NodeId>>>(COMMITTED)
            .await
            .map_err(|e| io_err(StorageIOError::read, e))?
            .flatten())
    }

    /// All entries of a call go into one transaction and one fsync (group commit); openraft is
    /// told they are saved only after that fsync.
    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), RaftStorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let encoded: Vec<(u64, Vec<u8>)> = entries
            .into_iter()
            .map(|e| enc(&e).map(|b| (e.log_id.index, b)))
            .collect::<Result<_, _>>()
            .map_err(|e| io_err(StorageIOError::write_logs, e))?;
        let res = self
            .blocking(move |db| {
                let wtx = db.begin_write().op("begin write")?;
                {
                    let mut log = wtx.open_table(LOG).op("open log")?;
                    for (i, b) in &encoded {
                        log.insert(*i, b.as_slice()).op("append log")?;
                    }
                }
                // Immediate durability: fsync before commit() returns.
                wtx.commit().op("commit log")
            })
            .await;
        match res {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(io_err(StorageIOError::write_logs, e))
            }
        }
    }

    /// Removes entries at and after `log_id.index` (conflicting entries from an old leader).
    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), RaftStorageError> {
        self.blocking(move |db| {
            let wtx = db.begin_write().op("begin write")?;
            wtx.open_table(LOG)
                .op("open log")?
                .retain_in(log_id.index.., |_, _| false)
                .op("truncate log")?;
            wtx.commit().op("commit")
        })
        .await
        .map_err(|e| io_err(StorageIOError::write_logs, e))
    }

    /// Removes entries up to and including `log_id` (they are in a snapshot).
    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), RaftStorageError> {
        let purged = enc(&log_id).map_err(|e| io_err(StorageIOError::write_logs, e))?;
        self.blocking(move |db| {
            let wtx = db.begin_write().op("begin write")?;
            wtx.open_table(STATE)
                .op("open state")?
                .insert(PURGED, purged.as_slice())
                .op("write state")?;
            wtx.open_table(LOG)
                .op("open log")?
                .retain_in(..=log_id.index, |_, _| false)
                .op("purge log")?;
            wtx.commit().op("commit")
        })
        .await
        .map_err(|e| io_err(StorageIOError::write_logs, e))
    }
}
