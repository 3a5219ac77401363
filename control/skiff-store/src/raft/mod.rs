//! Replication of the store's [`Command`]s with openraft.
//!
//! - [`LogStore`]: the Raft log and vote in their own redb file. The vote and every appended
//!   batch are fsynced before openraft is told they are saved; a batch of entries shares one
//!   fsync (group commit).
//! - [`StateMachine`]: applies committed commands to [`crate::Mvcc`]. Applying does not fsync
//!   (the log already holds the entries durably); the state file is synced every
//!   [`state_machine::SYNC_EVERY`] entries, on membership changes and before every snapshot, so
//!   the log is never purged past what the state file holds durably. Snapshots are files in
//!   `<data dir>/snapshots`, written, sent and installed as streams ([`crate::snapshot`]).

pub mod log_store;
pub mod network;
pub mod state_machine;

use serde::{Deserialize, Serialize};

pub use log_store::LogStore;
pub use state_machine::StateMachine;

use crate::{Command, CommandResponse, StoreError};

/// Node ids are small integers given on the command line.
pub type NodeId = u64;

/// What a committed entry produced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Applied {
    /// A command's result.
    Done(CommandResponse),
    /// The command was refused (invalid, too large, compacted…); nothing was written. The
    /// decision is deterministic, so every replica refuses it the same way.
    Rejected(String),
    /// A blank or membership entry (no client result).
    Internal,
    /// Results of a [`Command::Batch`], one per command, in order.
    Batch(Vec<Applied>),
}

openraft::declare_raft_types!(
    /// openraft types of the skiff store.
    pub TypeConfig:
        D = Command,
        R = Applied,
        NodeId = NodeId,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = tokio::fs::File,
        AsyncRuntime = openraft::TokioRuntime,
);

/// openraft's storage error for this config.
pub type RaftStorageError = openraft::StorageError<NodeId>;

/// What the state file holds durably: the last applied log id an fsync has covered. The state
/// machine advances it; the log store's purges wait for it ([`DurableWatch`]), because
/// openraft 0.9 purges the log as soon as it hands a received snapshot to the state machine,
/// before the install is durable: a crash in between must not leave a log that starts after
/// the state ends. Clones (the state machine's) share one value; once the last is dropped (the
/// state machine's worker stopped, however), waiting purges fail.
#[derive(Clone, Debug)]
pub struct DurablyApplied {
    tx: std::sync::Arc<tokio::sync::watch::Sender<Durable>>,
}

/// Watches a [`DurablyApplied`] without keeping it alive.
#[derive(Clone, Debug)]
pub struct DurableWatch {
    rx: tokio::sync::watch::Receiver<Durable>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Durable {
    Applied(Option<openraft::LogId<NodeId>>),
    /// The state machine failed (its worker stops): nothing will become durable any more.
    Failed,
}

impl DurablyApplied {
    /// Starts at `applied`, which must be on disk.
    pub fn new(applied: Option<openraft::LogId<NodeId>>) -> DurablyApplied {
        DurablyApplied {
            tx: std::sync::Arc::new(tokio::sync::watch::channel(Durable::Applied(applied)).0),
        }
    }

    /// The state file now holds `applied` durably (never moves back).
    pub fn advance(&self, applied: Option<openraft::LogId<NodeId>>) {
        self.tx.send_if_modified(|d| match d {
            Durable::Applied(old) if *old < applied => {
                *d = Durable::Applied(applied);
                true
            }
            _ => false,
        });
    }

    /// The state machine has failed.
    pub fn fail(&self) {
        self.tx.send_replace(Durable::Failed);
    }

    /// A watcher for the log store.
    pub fn watch(&self) -> DurableWatch {
        DurableWatch {
            rx: self.tx.subscribe(),
        }
    }
}

impl DurableWatch {
    /// Waits until entry `index` is applied durably; an error if the state machine fails or
    /// stops first.
    pub async fn reached(&self, index: u64) -> Result<(), StoreError> {
        let mut rx = self.rx.clone();
        let outcome = rx
            .wait_for(|d| match d {
                Durable::Applied(a) => a.is_some_and(|a| a.index >= index),
                Durable::Failed => true,
            })
            .await
            .map(|d| *d);
        match outcome {
            Ok(Durable::Applied(_)) => Ok(()),
            _ => Err(StoreError::Unavailable(format!(
                "the state machine stopped before entry {index} was durable"
            ))),
        }
    }
}
