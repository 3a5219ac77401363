//! Requests, responses and events of the store. These are also what the Raft log carries, so
//! they are serde types.

use serde::{Deserialize, Serialize};

/// A global revision. Revision 0 means "nothing yet"; the first write makes revision 1.
pub type Revision = u64;

/// Largest value accepted, as etcd's default request limit (1.5 MiB).
pub const MAX_VALUE_BYTES: usize = 3 * 512 * 1024;
/// Largest key accepted.
pub const MAX_KEY_BYTES: usize = 4096;

/// A key with its value and revisions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    /// The key.
    pub key: Vec<u8>,
    /// The value (empty in a delete event's `kv`).
    pub value: Vec<u8>,
    /// Revision of the write that created this key (since its last deletion).
    pub create_revision: Revision,
    /// Revision of the last write to this key.
    pub mod_revision: Revision,
    /// Number of writes since creation (1 after create).
    pub version: u64,
}

/// A condition of a [`Txn`]: the key's mod revision equals `mod_revision` (0 = absent).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compare {
    /// The key compared.
    pub key: Vec<u8>,
    /// Expected mod revision; 0 means the key must not exist.
    pub mod_revision: Revision,
}

/// One operation of a [`Txn`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Set `key` to `value`.
    Put {
        /// Key.
        key: Vec<u8>,
        /// Value.
        value: Vec<u8>,
    },
    /// Delete `key` if present.
    Delete {
        /// Key.
        key: Vec<u8>,
    },
    /// Delete every key starting with `prefix`.
    DeletePrefix {
        /// Prefix (must not be empty).
        prefix: Vec<u8>,
    },
    /// Read `key` (at the transaction's revision).
    Get {
        /// Key.
        key: Vec<u8>,
    },
}

/// If every compare holds, run `success`, else `failure`. All of it at one revision.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Txn {
    /// Conditions; all must hold.
    pub compare: Vec<Compare>,
    /// Operations when they hold.
    pub success: Vec<Op>,
    /// Operations when one does not.
    pub failure: Vec<Op>,
}

impl Txn {
    /// Create `key` with `value` if it does not exist; otherwise read it back.
    pub fn create(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Txn {
        let key = key.into();
        Txn {
            compare: vec![Compare {
                key: key.clone(),
                mod_revision: 0,
            }],
            success: vec![Op::Put {
                key: key.clone(),
                value: value.into(),
            }],
            failure: vec![Op::Get { key }],
        }
    }

    /// Set `key` to `value` if its mod revision is still `expected`; otherwise read it back.
    pub fn update(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>, expected: Revision) -> Txn {
        let key = key.into();
        Txn {
            compare: vec![Compare {
                key: key.clone(),
                mod_revision: expected,
            }],
            success: vec![Op::Put {
                key: key.clone(),
                value: value.into(),
            }],
            failure: vec![Op::Get { key }],
        }
    }

    /// Delete `key` if its mod revision is still `expected`; otherwise read it back.
    pub fn delete(key: impl Into<Vec<u8>>, expected: Revision) -> Txn {
        let key = key.into();
        Txn {
            compare: vec![Compare {
                key: key.clone(),
                mod_revision: expected,
            }],
            success: vec![Op::Delete { key: key.clone() }],
            failure: vec![Op::Get { key }],
        }
    }

    /// Unconditionally set `key`.
    pub fn put(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Txn {
        Txn {
            success: vec![Op::Put {
                key: key.into(),
                value: value.into(),
            }],
            ..Txn::default()
        }
    }
}

/// Result of one [`Op`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpResult {
    /// A put; `prev` is the value it replaced.
    Put {
        /// Previous value, if the key existed.
        prev: Option<KeyValue>,
    },
    /// A delete; what it removed.
    Delete {
        /// Removed keys with their last values.
        deleted: Vec<KeyValue>,
    },
    /// A get.
    Get {
        /// The key's value, if it exists.
        kv: Option<KeyValue>,
    },
}

/// Result of a [`Txn`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnResponse {
    /// Whether the compares held (so `success` ran).
    pub succeeded: bool,
    /// The store's revision after the transaction (unchanged if it wrote nothing).
    pub revision: Revision,
    /// One result per operation that ran.
    pub results: Vec<OpResult>,
}

/// What the replicated log carries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// A transaction.
    Txn(Txn),
    /// Forget history below `revision`.
    Compact {
        /// New compacted revision.
        revision: Revision,
    },
    /// Several commands proposed together by the leader (group commit): applied in order, each
    /// with its own result and revision, in one state-machine transaction.
    Batch(Vec<Command>),
}

impl Command {
    /// Approximate encoded size, to bound batches.
    pub fn approx_size(&self) -> usize {
        fn op(o: &Op) -> usize {
            match o {
                Op::Put { key, value } => key.len() + value.len() + 8,
                Op::Delete { key } | Op::Get { key } => key.len() + 8,
                Op::DeletePrefix { prefix } => prefix.len() + 8,
            }
        }
        match self {
            Command::Txn(t) => {
                t.compare.iter().map(|c| c.key.len() + 16).sum::<usize>()
                    + t.success.iter().map(op).sum::<usize>()
                    + t.failure.iter().map(op).sum::<usize>()
            }
            Command::Compact { .. } => 16,
            Command::Batch(cmds) => cmds.iter().map(Command::approx_size).sum(),
        }
    }
}

/// Result of a [`Command`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResponse {
    /// A transaction's result.
    Txn(TxnResponse),
    /// Compaction done.
    Compacted {
        /// The store's compacted revision now.
        revision: Revision,
    },
}

/// A range read: keys in `[start, end)` (or just `start` when `end` is empty) at `revision`
/// (0 = latest), at most `limit` of them (0 = no limit).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeRequest {
    /// First key.
    pub start: Vec<u8>,
    /// End (exclusive); empty for a single-key read.
    pub end: Vec<u8>,
    /// Revision to read at; 0 = latest.
    pub revision: Revision,
    /// Most keys to return; 0 = all.
    pub limit: usize,
}

impl RangeRequest {
    /// Every key starting with `prefix`.
    pub fn prefix(prefix: impl Into<Vec<u8>>) -> RangeRequest {
        let start = prefix.into();
        let end = prefix_end(&start);
        RangeRequest {
            start,
            end,
            ..RangeRequest::default()
        }
    }

    /// One key.
    pub fn key(key: impl Into<Vec<u8>>) -> RangeRequest {
        RangeRequest {
            start: key.into(),
            ..RangeRequest::default()
        }
    }

    /// Read at `revision`.
    pub fn at(mut self, revision: Revision) -> RangeRequest {
        self.revision = revision;
        self
    }

    /// At most `limit` keys.
    pub fn limit(mut self, limit: usize) -> RangeRequest {
        self.limit = limit;
        self
    }

    /// Whether `key` is in this range.
    pub fn contains(&self, key: &[u8]) -> bool {
        if self.end.is_empty() {
            key == self.start.as_slice()
        } else if self.end == [0] {
            key >= self.start.as_slice()
        } else {
            key >= self.start.as_slice() && key < self.end.as_slice()
        }
    }
}

/// The smallest key greater than every key starting with `prefix` (etcd's `GetPrefixRangeEnd`).
/// For a prefix of only 0xff bytes there is none; the range then runs to the end (`[0]`, which
/// [`RangeRequest::contains`] and the store treat as "no upper bound" via `end == [0]`).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Result of a [`RangeRequest`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeResponse {
    /// Keys in order.
    pub kvs: Vec<KeyValue>,
    /// More keys exist past the last one returned.
    pub more: bool,
    /// The revision read at (the current revision when the request said 0). Continue paging
    /// with this revision to get a consistent list.
    pub revision: Revision,
}

/// Kind of a watch event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    /// The key was created or updated.
    Put,
    /// The key was deleted.
    Delete,
}

/// One change, as a watcher sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Put or delete.
    pub kind: EventKind,
    /// The key after the change; for a delete, the key with `mod_revision` = the delete's
    /// revision and an empty value.
    pub kv: KeyValue,
    /// The value before the change, if the key existed.
    pub prev_kv: Option<KeyValue>,
}
