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

use crate::{Command, CommandResponse};

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
