//! Store errors. Client-caused ones (compacted, too large, invalid) are distinct variants so the
//! API server maps each to its HTTP status; storage failures keep the operation and redb's error.

use std::path::PathBuf;

use crate::types::Revision;

/// An error from the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The requested revision was compacted away (the API answers 410 Gone).
    #[error("required revision {requested} has been compacted (compacted revision {compacted})")]
    Compacted {
        /// Revision asked for.
        requested: Revision,
        /// The store's compacted revision.
        compacted: Revision,
    },
    /// The requested revision does not exist yet.
    #[error("required revision {requested} is a future revision (current revision {current})")]
    FutureRevision {
        /// Revision asked for.
        requested: Revision,
        /// The store's current revision.
        current: Revision,
    },
    /// A value is larger than [`crate::MAX_VALUE_BYTES`].
    #[error("value for key {key:?} is {size} bytes, over the limit of {limit} bytes")]
    ValueTooLarge {
        /// The key (lossy UTF-8).
        key: String,
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The request is malformed (empty or oversized key, duplicate key in a transaction…).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The file exists but is not a readable redb database, or its content is damaged.
    /// It is reported, never recreated: it may hold the only copy of the cluster's state.
    #[error("store file {path} is corrupt or not a database: {detail}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What was found.
        detail: String,
    },
    /// The file is a redb database written by something else, or by a future format.
    #[error("store file {path} is not a skiff store (format {found:?}, expected {expected})")]
    Foreign {
        /// The file.
        path: PathBuf,
        /// The format marker found, if any.
        found: Option<u64>,
        /// The format this build writes.
        expected: u64,
    },
    /// A storage operation failed (I/O, disk full, fsync). The write it belonged to was not
    /// applied.
    #[error("store {op}: {source}")]
    Storage {
        /// The operation.
        op: &'static str,
        /// redb's error.
        #[source]
        source: Box<redb::Error>,
    },
    /// No leader or quorum could be reached in time, or a forwarded write had an ambiguous
    /// outcome. The API answers 5xx with a retry hint; the client must re-read before retrying
    /// a non-idempotent write.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Filesystem work around the database file failed.
    #[error("store {op} {path}: {source}")]
    Io {
        /// The operation.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl StoreError {
    /// Wraps an OS error with the operation that failed and the file it was on.
    pub(crate) fn io(
        op: &'static str,
        path: &std::path::Path,
    ) -> impl Fn(std::io::Error) -> StoreError + use<> {
        let path = path.to_path_buf();
        move |source| StoreError::Io {
            op,
            path: path.clone(),
            source,
        }
    }

    /// Wraps a redb error with the operation that failed.
    pub(crate) fn storage(op: &'static str) -> impl FnOnce(redb::Error) -> StoreError {
        move |e| StoreError::Storage {
            op,
            source: Box::new(e),
        }
    }
}

/// Shorthand: converts any redb error type into a [`StoreError::Storage`] naming `op`.
pub(crate) trait RedbContext<T> {
    fn op(self, op: &'static str) -> Result<T, StoreError>;
}

impl<T, E: Into<redb::Error>> RedbContext<T> for Result<T, E> {
    fn op(self, op: &'static str) -> Result<T, StoreError> {
        self.map_err(|e| StoreError::storage(op)(e.into()))
    }
}
