//! skiff's state store, in etcd's role.
//!
//! The contract Kubernetes relies on, and which this crate keeps:
//! - a global **revision** (becomes `resourceVersion`), bumped once per transaction that
//!   writes; per key a create revision, a mod revision and a version;
//! - **range** reads of one key or a key range at the latest or an older revision, with a limit
//!   (paging continues from the last key at the same revision, so pages are consistent);
//! - **transactions** that compare mod revisions (0 = absent) and then put, delete or get, which
//!   is how create-if-absent, update-if-unchanged and delete-if-unchanged are built;
//! - **watch** from a revision over a key range: every event once, in revision order, with the
//!   previous value; slow watchers catch up from disk and never block writers;
//! - **compaction** that forgets history below a revision; reads and watches that need it get
//!   [`StoreError::Compacted`] (the API answers 410 Gone).
//!
//! [`Mvcc`] is the durable single-replica state machine on redb. The Raft layer replicates the
//! [`Command`]s it applies.

pub mod client;
mod db;
pub mod error;
pub mod mvcc;
pub mod node;
pub mod raft;
pub mod snapshot;
pub mod tls;
pub mod types;
pub mod watch;

pub use error::StoreError;
pub use mvcc::{Mvcc, Writer};
pub use node::{Member, MemberChange, NodeConfig, StoreNode};
pub use types::*;
pub use watch::{WatchEvent, WatchStream};
