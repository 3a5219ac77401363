//! openraft's storage conformance suite, run against skiff's redb log store and state machine
//! (every test gets fresh files in its own temporary directory).

use openraft::testing::{StoreBuilder, Suite};
use skiff_store::{
    Mvcc,
    raft::{LogStore, RaftStorageError, StateMachine, TypeConfig},
};

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), RaftStorageError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = LogStore::open(&dir.path().join("raft-log.redb")).expect("open log");
        let mvcc = Mvcc::open(&dir.path().join("state.redb")).expect("open state");
        let sm = StateMachine::open(mvcc, &dir.path().join("snapshots")).expect("open snapshots");
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() {
    Suite::test_all(Builder).expect("openraft storage suite");
}
