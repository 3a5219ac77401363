//! Raft snapshots as files: built by streaming the store, kept across restarts, installed
//! whole or not at all.

use openraft::{
    CommittedLeaderId, Entry, EntryPayload, LogId, RaftSnapshotBuilder, Snapshot,
    storage::RaftStateMachine,
};
use skiff_store::{
    Command, Mvcc, RangeRequest, StoreError, Txn,
    raft::{StateMachine, TypeConfig},
};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

fn open(dir: &std::path::Path) -> StateMachine {
    let mvcc = Mvcc::open(&dir.join("state.redb")).expect("open state");
    StateMachine::open(mvcc, &dir.join("snapshots")).expect("open snapshots")
}

fn put(index: u64, key: &str, value: Vec<u8>) -> Entry<TypeConfig> {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(Command::Txn(Txn::put(key, value))),
    }
}

/// Every key and value, in order.
fn contents(sm: &StateMachine) -> Vec<(Vec<u8>, Vec<u8>)> {
    sm.mvcc()
        .range(&RangeRequest::prefix("/"))
        .expect("range")
        .kvs
        .into_iter()
        .map(|kv| (kv.key, kv.value))
        .collect()
}

/// Reopens the state machine in `dir` (a restart) and returns it with its current snapshot.
async fn reopened(dir: &std::path::Path) -> (StateMachine, Snapshot<TypeConfig>) {
    let mut sm = open(dir);
    let current = sm
        .get_current_snapshot()
        .await
        .expect("current")
        .expect("a snapshot after restart");
    (sm, current)
}

fn files(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir.join("snapshots"))
        .expect("list snapshots")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn a_snapshot_is_a_file_that_outlives_a_restart_and_installs_elsewhere() {
    let leader_dir = tempfile::tempdir().expect("tempdir");
    let mut leader = open(leader_dir.path());
    // 300 values of 4 KiB: a snapshot of over a megabyte.
    let entries: Vec<_> = (1..=300)
        .map(|i| put(i, &format!("/k/{i:04}"), vec![i as u8; 4096]))
        .collect();
    leader.apply(entries).await.expect("apply");
    let built = leader.build_snapshot().await.expect("build");
    assert_eq!(built.meta.last_log_id.map(|l| l.index), Some(300));
    let on_disk = files(leader_dir.path());
    assert_eq!(
        on_disk.len(),
        1,
        "one snapshot file, nothing temporary: {on_disk:?}"
    );
    assert!(on_disk[0].ends_with(".snap"), "{on_disk:?}");
    let size = std::fs::metadata(leader_dir.path().join("snapshots").join(&on_disk[0]))
        .expect("stat")
        .len();
    assert!(
        size > 300 * 4096,
        "the snapshot holds the values ({size} bytes)"
    );
    let want = contents(&leader);
    drop(leader);

    // After a restart the same snapshot is current, and it can be sent.
    let (_leader, current) = reopened(leader_dir.path()).await;
    assert_eq!(current.meta, built.meta);

    // A follower receives it in chunks, the way openraft's chunked transport writes them: at
    // their offsets, the first ones twice (a transfer that restarted from offset 0), then a
    // shutdown.
    let follower_dir = tempfile::tempdir().expect("tempdir");
    let mut follower = open(follower_dir.path());
    let mut receiving = follower.begin_receiving_snapshot().await.expect("begin");
    let mut sending = current.snapshot;
    let end = sending.seek(std::io::SeekFrom::End(0)).await.expect("size");
    let chunk = 256 << 10;
    let mut send = async |from: u64, to: u64| {
        let mut offset = from;
        while offset < to {
            let mut buf = vec![0u8; chunk.min((to - offset) as usize)];
            sending
                .seek(std::io::SeekFrom::Start(offset))
                .await
                .expect("seek");
            sending.read_exact(&mut buf).await.expect("read chunk");
            receiving
                .seek(std::io::SeekFrom::Start(offset))
                .await
                .expect("seek");
            receiving.write_all(&buf).await.expect("write chunk");
            offset += buf.len() as u64;
        }
    };
    send(0, end / 2).await;
    send(0, end).await;
    receiving.shutdown().await.expect("shutdown");
    follower
        .install_snapshot(&current.meta, receiving)
        .await
        .expect("install");
    assert_eq!(contents(&follower), want);
    let (applied, _) = follower.applied_state().await.expect("applied");
    assert_eq!(applied, built.meta.last_log_id);
    // The follower keeps its own copy, current across its restart too.
    assert_eq!(files(follower_dir.path()).len(), 1);
    drop(follower);
    let (_follower, kept) = reopened(follower_dir.path()).await;
    assert_eq!(kept.meta, built.meta);
}

#[tokio::test]
async fn a_cut_or_damaged_snapshot_installs_nothing() {
    let leader_dir = tempfile::tempdir().expect("tempdir");
    let mut leader = open(leader_dir.path());
    leader
        .apply((1..=20).map(|i| put(i, &format!("/new/{i}"), vec![7; 100])))
        .await
        .expect("apply");
    let built = leader.build_snapshot().await.expect("build");
    let mut whole = Vec::new();
    let mut sending = built.snapshot;
    sending.read_to_end(&mut whole).await.expect("read");

    let follower_dir = tempfile::tempdir().expect("tempdir");
    let mut follower = open(follower_dir.path());
    follower
        .apply([put(1, "/old/a", b"kept".to_vec())])
        .await
        .expect("apply");
    let before = contents(&follower);

    let mut flipped = whole.clone();
    let at = flipped.len() / 2;
    flipped[at] ^= 0xff;
    for (what, bytes) in [
        ("cut short", &whole[..whole.len() - 3]),
        ("cut in half", &whole[..whole.len() / 2]),
        ("damaged", &flipped[..]),
    ] {
        let mut receiving = follower.begin_receiving_snapshot().await.expect("begin");
        receiving.write_all(bytes).await.expect("write");
        receiving.flush().await.expect("flush");
        let e = follower
            .install_snapshot(&built.meta, receiving)
            .await
            .expect_err(what);
        assert!(e.to_string().contains("snapshot"), "{what}: {e}");
        assert_eq!(
            contents(&follower),
            before,
            "{what}: the store is as before"
        );
    }
    assert_eq!(
        files(follower_dir.path()),
        Vec::<String>::new(),
        "nothing kept, nothing temporary left"
    );
    assert!(
        follower
            .get_current_snapshot()
            .await
            .expect("current")
            .is_none(),
        "no snapshot became current"
    );
}

#[tokio::test]
async fn a_damaged_snapshot_file_is_reported_with_its_path_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sm = open(dir.path());
    sm.apply((1..=50).map(|i| put(i, &format!("/k/{i}"), vec![9; 1000])))
        .await
        .expect("apply");
    sm.build_snapshot().await.expect("build");
    drop(sm);
    let snap = dir
        .path()
        .join("snapshots")
        .join(files(dir.path()).pop().expect("a snapshot file"));
    let whole = std::fs::read(&snap).expect("read");

    // A changed byte in the middle of a value, then a file that is not a snapshot at all.
    let mut flipped = whole.clone();
    let at = flipped.len() / 2;
    flipped[at] ^= 0x01;
    for bytes in [flipped, b"not a snapshot at all".to_vec()] {
        std::fs::write(&snap, &bytes).expect("write");
        let mvcc = Mvcc::open(&dir.path().join("state.redb")).expect("open state");
        match StateMachine::open(mvcc, &dir.path().join("snapshots")) {
            Err(StoreError::Corrupt { path, .. }) => assert_eq!(path, snap),
            other => panic!("expected a corrupt-file error, got {other:?}"),
        }
        assert!(snap.exists(), "the damaged file is left for the operator");
    }
    std::fs::write(&snap, &whole).expect("write");
    let mvcc = Mvcc::open(&dir.path().join("state.redb")).expect("open state");
    StateMachine::open(mvcc, &dir.path().join("snapshots")).expect("the intact file opens");
}
