//! Watch: from now, from the past, across slow consumers, compaction and progress.

use std::time::Duration;

use futures::StreamExt;
use skiff_store::{EventKind, Mvcc, RangeRequest, StoreError, Txn, WatchEvent, WatchStream};

fn open() -> (tempfile::TempDir, Mvcc) {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = Mvcc::open(&dir.path().join("store.redb")).expect("open");
    (dir, m)
}

/// Collects events until `count` have arrived (ignoring progress), with a deadline.
async fn collect(w: &mut WatchStream, count: usize) -> Vec<skiff_store::Event> {
    let mut out = Vec::new();
    while out.len() < count {
        let next = tokio::time::timeout(Duration::from_secs(20), w.next())
            .await
            .expect("events arrive")
            .expect("stream open")
            .expect("no error");
        if let WatchEvent::Events(evs) = next {
            out.extend(evs);
        }
    }
    out
}

#[tokio::test]
async fn watch_from_now_sees_later_writes_in_order_with_prev_values() {
    let (_d, m) = open();
    m.txn(&Txn::put("/w/a", "0")).expect("put");
    let mut w = m.watch(RangeRequest::prefix("/w/"), 0, None);
    m.txn(&Txn::put("/w/a", "1")).expect("put");
    m.txn(&Txn::put("/other", "x")).expect("put"); // outside the range
    m.txn(&Txn::delete("/w/a", 2)).expect("delete");
    let evs = collect(&mut w, 2).await;
    assert_eq!(evs[0].kind, EventKind::Put);
    assert_eq!(evs[0].kv.value, b"1");
    assert_eq!(evs[0].prev_kv.as_ref().expect("prev").value, b"0");
    assert_eq!(evs[1].kind, EventKind::Delete);
    assert_eq!(evs[1].kv.mod_revision, 4);
    assert_eq!(evs[1].prev_kv.as_ref().expect("prev").value, b"1");
}

#[tokio::test]
async fn watch_from_a_past_revision_replays_then_follows() {
    let (_d, m) = open();
    for i in 0..100 {
        m.txn(&Txn::put(format!("/w/{i}"), "v")).expect("put");
    }
    let mut w = m.watch(RangeRequest::prefix("/w/"), 51, None);
    for i in 100..110 {
        m.txn(&Txn::put(format!("/w/{i}"), "v")).expect("put");
    }
    let evs = collect(&mut w, 60).await;
    let revs: Vec<u64> = evs.iter().map(|e| e.kv.mod_revision).collect();
    assert_eq!(
        revs,
        (51..=110).collect::<Vec<_>>(),
        "each event once, in order"
    );
}

/// A consumer that does not read while thousands of writes happen: writers are not blocked,
/// and the watcher later delivers every event exactly once (it falls back to disk replay).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_watcher_gets_every_event_once_without_blocking_writers() {
    let (_d, m) = open();
    let mut w = m.watch(RangeRequest::prefix("/w/"), 0, None);
    let writer = m.clone();
    let n = 3000u64;
    tokio::task::spawn_blocking(move || {
        for i in 0..n {
            writer
                .write(redb::Durability::None, |wr| {
                    wr.txn(&Txn::put(format!("/w/{}", i % 50), format!("{i}")))
                })
                .expect("write");
        }
    })
    .await
    .expect("writer finished while the watcher was not being read");
    let evs = collect(&mut w, n as usize).await;
    let revs: Vec<u64> = evs.iter().map(|e| e.kv.mod_revision).collect();
    assert_eq!(revs, (1..=n).collect::<Vec<_>>());
    for (i, e) in evs.iter().enumerate() {
        assert_eq!(e.kv.value, format!("{i}").into_bytes());
    }
}

#[tokio::test]
async fn watch_from_a_compacted_revision_fails() {
    let (_d, m) = open();
    for i in 0..10 {
        m.txn(&Txn::put("/w/a", format!("{i}"))).expect("put");
    }
    m.compact(5).expect("compact");
    let mut w = m.watch(RangeRequest::prefix("/w/"), 5, None);
    let first = tokio::time::timeout(Duration::from_secs(5), w.next())
        .await
        .expect("answer")
        .expect("item");
    assert!(
        matches!(
            first,
            Err(StoreError::Compacted {
                requested: 5,
                compacted: 5
            })
        ),
        "{first:?}"
    );
    // From just after the compacted revision is fine.
    let mut w = m.watch(RangeRequest::prefix("/w/"), 6, None);
    assert_eq!(collect(&mut w, 5).await.len(), 5);
}

#[tokio::test]
async fn idle_watch_sends_progress_at_the_current_revision() {
    let (_d, m) = open();
    m.txn(&Txn::put("/other", "x")).expect("put");
    let mut w = m.watch(
        RangeRequest::prefix("/w/"),
        0,
        Some(Duration::from_millis(50)),
    );
    m.txn(&Txn::put("/other", "y")).expect("put"); // revision 2, not in range
    loop {
        let item = tokio::time::timeout(Duration::from_secs(5), w.next())
            .await
            .expect("progress arrives")
            .expect("open")
            .expect("ok");
        match item {
            WatchEvent::Progress(2) => break,
            WatchEvent::Progress(rev) => assert!(rev <= 2, "{rev}"),
            WatchEvent::Events(e) => panic!("no events expected: {e:?}"),
        }
    }
}
