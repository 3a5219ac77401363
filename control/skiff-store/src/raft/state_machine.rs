//! The Raft state machine: committed [`Command`]s applied to [`Mvcc`].

use std::{
    io::Cursor,
    sync::{Arc, Mutex},
};

use openraft::{
    AnyError, Entry, EntryPayload, LogId, RaftSnapshotBuilder, Snapshot, SnapshotMeta,
    StorageIOError, StoredMembership, storage::RaftStateMachine,
};
use redb::Durability;

use super::{Applied, NodeId, RaftStorageError, TypeConfig};
use crate::{Command, CommandResponse, Mvcc, StoreError};

/// Entries applied without fsync before the state file is synced. Bounded so a crash replays at
/// most this many entries from the log, and so redb can reuse freed pages.
pub const SYNC_EVERY: u64 = 1024;

const APPLIED: &str = "raft.applied";
const MEMBERSHIP: &str = "raft.membership";

type Node = openraft::BasicNode;
/// The applied log id and membership, as stored in the state file.
type AppliedState = (Option<LogId<NodeId>>, StoredMembership<NodeId, Node>);

#[derive(Clone, Debug)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, Node>,
    data: Vec<u8>,
}

/// The state machine. Clones share the store and the current snapshot.
#[derive(Clone, Debug)]
pub struct StateMachine {
    mvcc: Mvcc,
    snapshot: Arc<Mutex<Option<StoredSnapshot>>>,
    unsynced: Arc<Mutex<u64>>,
    snapshots_built: Arc<Mutex<u64>>,
}

fn enc<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    postcard::to_allocvec(v).map_err(|e| StoreError::Invalid(format!("encode: {e}")))
}

fn dec<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T, StoreError> {
    postcard::from_bytes(b).map_err(|e| StoreError::Invalid(format!("decode: {e}")))
}

fn sm_err(e: StoreError) -> RaftStorageError {
    StorageIOError::write_state_machine(AnyError::new(&e)).into()
}

/// Client-caused refusals, decided the same way on every replica.
fn rejected(e: &StoreError) -> bool {
    matches!(
        e,
        StoreError::Invalid(_)
            | StoreError::ValueTooLarge { .. }
            | StoreError::FutureRevision { .. }
            | StoreError::Compacted { .. }
    )
}

impl StateMachine {
    /// Wraps `mvcc` (which holds the applied log id and membership in its meta table).
    pub fn new(mvcc: Mvcc) -> StateMachine {
        StateMachine {
            mvcc,
            snapshot: Arc::new(Mutex::new(None)),
            unsynced: Arc::new(Mutex::new(0)),
            snapshots_built: Arc::new(Mutex::new(0)),
        }
    }

    /// The store this state machine applies to (for reads and watches).
    pub fn mvcc(&self) -> &Mvcc {
        &self.mvcc
    }

    fn read_applied(&self) -> Result<AppliedState, StoreError> {
        let applied = match self.mvcc.meta(APPLIED)? {
            Some(b) => dec(&b)?,
            None => None,
        };
        let membership = match self.mvcc.meta(MEMBERSHIP)? {
            Some(b) => dec(&b)?,
            None => StoredMembership::default(),
        };
        Ok((applied, membership))
    }
}

/// Applies one command; client-caused refusals become [`Applied::Rejected`], storage failures
/// are errors (they stop the member).
fn apply_command(w: &mut crate::Writer<'_>, cmd: Command) -> Result<Applied, StoreError> {
    Ok(match cmd {
        Command::Txn(txn) => match w.txn(&txn) {
            Ok(r) => Applied::Done(CommandResponse::Txn(r)),
            Err(e) if rejected(&e) => Applied::Rejected(e.to_string()),
            Err(e) => return Err(e),
        },
        Command::Compact { revision } => match w.compact(revision) {
            Ok(()) => Applied::Done(CommandResponse::Compacted { revision }),
            Err(e) if rejected(&e) => Applied::Rejected(e.to_string()),
            Err(e) => return Err(e),
        },
        Command::Batch(cmds) => Applied::Batch(
            cmds.into_iter()
                .map(|c| apply_command(w, c))
                .collect::<Result<_, _>>()?,
        ),
    })
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> Result<AppliedState, RaftStorageError> {
        self.read_applied()
            .map_err(|e| StorageIOError::read_state_machine(AnyError::new(&e)).into())
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Applied>, RaftStorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let has_membership = entries
            .iter()
            .any(|e| matches!(e.payload, EntryPayload::Membership(_)));
        let durability = {
            let mut unsynced = self.unsynced.lock().unwrap_or_else(|p| p.into_inner());
            *unsynced += entries.len() as u64;
            if has_membership || *unsynced >= SYNC_EVERY {
                *unsynced = 0;
                Durability::Immediate
            } else {
                Durability::None
            }
        };
        let mvcc = self.mvcc.clone();
        tokio::task::spawn_blocking(move || {
            mvcc.write(durability, |w| {
                let mut out = Vec::with_capacity(entries.len());
                let mut last = None;
                // Only a batch with a membership entry changes the stored membership.
                let mut membership = None;
                for entry in entries {
                    last = Some(entry.log_id);
                    out.push(match entry.payload {
                        EntryPayload::Blank => Applied::Internal,
                        EntryPayload::Membership(m) => {
                            membership = Some(StoredMembership::new(Some(entry.log_id), m));
                            Applied::Internal
                        }
                        EntryPayload::Normal(cmd) => apply_command(w, cmd)?,
                    });
                }
                w.put_meta(APPLIED, &enc(&last)?)?;
                if let Some(m) = membership {
                    w.put_meta(MEMBERSHIP, &enc(&m)?)?;
                }
                Ok(out)
            })
        })
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
        .map_err(sm_err)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, RaftStorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Node>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), RaftStorageError> {
        let data = snapshot.into_inner();
        let extra = [
            (APPLIED, enc(&meta.last_log_id).map_err(sm_err)?),
            (MEMBERSHIP, enc(&meta.last_membership).map_err(sm_err)?),
        ];
        let mvcc = self.mvcc.clone();
        let bytes = data.clone();
        tokio::task::spawn_blocking(move || mvcc.import(&bytes, &extra))
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
            .map_err(|e| {
                StorageIOError::write_snapshot(Some(meta.signature()), AnyError::new(&e))
            })?;
        *self.snapshot.lock().unwrap_or_else(|p| p.into_inner()) = Some(StoredSnapshot {
            meta: meta.clone(),
            data,
        });
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, RaftStorageError> {
        Ok(self
            .snapshot
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .map(|s| Snapshot {
                meta: s.meta,
                snapshot: Box::new(Cursor::new(s.data)),
            }))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    /// Syncs the state file first, so the log is never purged past what is on disk, then copies
    /// the store in one read transaction.
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, RaftStorageError> {
        let mvcc = self.mvcc.clone();
        let export = tokio::task::spawn_blocking(move || {
            mvcc.write(Durability::Immediate, |_| Ok(()))?;
            mvcc.export()
        })
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
        .map_err(|e| StorageIOError::read_state_machine(AnyError::new(&e)))?;
        let last_log_id: Option<LogId<NodeId>> = match export.meta.get(APPLIED) {
            Some(b) => dec(b).map_err(sm_err)?,
            None => None,
        };
        let last_membership: StoredMembership<NodeId, Node> = match export.meta.get(MEMBERSHIP) {
            Some(b) => dec(b).map_err(sm_err)?,
            None => StoredMembership::default(),
        };
        let n = {
            let mut n = self
                .snapshots_built
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            *n += 1;
            *n
        };
        let snapshot_id = match last_log_id {
            Some(l) => format!("{}-{}-{n}", l.leader_id, l.index),
            None => format!("empty-{n}"),
        };
        let meta = SnapshotMeta {
            last_log_id,
            last_membership,
            snapshot_id,
        };
        *self.snapshot.lock().unwrap_or_else(|p| p.into_inner()) = Some(StoredSnapshot {
            meta: meta.clone(),
            data: export.bytes.clone(),
        });
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(export.bytes)),
        })
    }
}
