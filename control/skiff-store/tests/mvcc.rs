//! MVCC semantics the API server relies on (etcd's contract), on a real redb file.

use skiff_store::{Compare, MAX_VALUE_BYTES, Mvcc, Op, OpResult, RangeRequest, StoreError, Txn};

fn open() -> (tempfile::TempDir, Mvcc) {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = Mvcc::open(&dir.path().join("store.redb")).expect("open");
    (dir, m)
}

fn get(m: &Mvcc, key: &str) -> Option<skiff_store::KeyValue> {
    m.range(&RangeRequest::key(key)).expect("range").kvs.pop()
}

#[test]
fn create_update_delete_follow_compare_and_swap() {
    let (_d, m) = open();
    let r = m
        .txn(&Txn::create("/registry/pods/default/a", "v1"))
        .expect("create");
    assert!(r.succeeded);
    assert_eq!(r.revision, 1);
    let kv = get(&m, "/registry/pods/default/a").expect("exists");
    assert_eq!((kv.create_revision, kv.mod_revision, kv.version), (1, 1, 1));

    // Creating again fails and returns the existing object (409 AlreadyExists upstream).
    let r = m
        .txn(&Txn::create("/registry/pods/default/a", "v9"))
        .expect("txn");
    assert!(!r.succeeded);
    assert_eq!(r.revision, 1, "a failed txn does not bump the revision");
    match &r.results[0] {
        OpResult::Get { kv: Some(kv) } => assert_eq!(kv.value, b"v1"),
        other => panic!("{other:?}"),
    }

    // Update with the right revision succeeds; with a stale one it fails (409 Conflict).
    let r = m
        .txn(&Txn::update("/registry/pods/default/a", "v2", 1))
        .expect("txn");
    assert!(r.succeeded);
    assert_eq!(r.revision, 2);
    let kv = get(&m, "/registry/pods/default/a").expect("exists");
    assert_eq!((kv.create_revision, kv.mod_revision, kv.version), (1, 2, 2));
    assert_eq!(kv.value, b"v2");
    let r = m
        .txn(&Txn::update("/registry/pods/default/a", "v3", 1))
        .expect("txn");
    assert!(!r.succeeded);
    assert_eq!(
        get(&m, "/registry/pods/default/a").expect("exists").value,
        b"v2"
    );

    // Delete with a stale revision fails; with the current one succeeds.
    assert!(
        !m.txn(&Txn::delete("/registry/pods/default/a", 1))
            .expect("txn")
            .succeeded
    );
    let r = m
        .txn(&Txn::delete("/registry/pods/default/a", 2))
        .expect("txn");
    assert!(r.succeeded);
    assert_eq!(r.revision, 3);
    assert!(get(&m, "/registry/pods/default/a").is_none());

    // Re-creating starts a new life: create revision and version reset.
    m.txn(&Txn::create("/registry/pods/default/a", "again"))
        .expect("txn");
    let kv = get(&m, "/registry/pods/default/a").expect("exists");
    assert_eq!((kv.create_revision, kv.mod_revision, kv.version), (4, 4, 1));
}

#[test]
fn prefix_ranges_page_consistently_at_one_revision() {
    let (_d, m) = open();
    for i in 0..10 {
        m.txn(&Txn::put(
            format!("/registry/pods/ns/p{i:02}"),
            format!("{i}"),
        ))
        .expect("put");
    }
    m.txn(&Txn::put("/registry/pods/other", "x")).expect("put");
    m.txn(&Txn::put("/registry/services/ns/s", "x"))
        .expect("put");

    let first = m
        .range(&RangeRequest::prefix("/registry/pods/ns/").limit(4))
        .expect("range");
    assert_eq!(first.kvs.len(), 4);
    assert!(first.more);
    let at = first.revision;

    // Writes between pages must not show up in later pages of the same list.
    m.txn(&Txn::put("/registry/pods/ns/p05", "changed"))
        .expect("put");
    m.txn(&Txn::put("/registry/pods/ns/p99", "new"))
        .expect("put");

    let mut all = first.kvs.clone();
    let mut last = all.last().expect("page").key.clone();
    loop {
        let mut start = last.clone();
        start.push(0); // the key right after `last`
        let page = m
            .range(
                &RangeRequest {
                    start,
                    end: skiff_store::prefix_end(b"/registry/pods/ns/"),
                    ..RangeRequest::default()
                }
                .at(at)
                .limit(4),
            )
            .expect("page");
        assert_eq!(page.revision, at);
        all.extend(page.kvs.iter().cloned());
        if !page.more {
            break;
        }
        last = page.kvs.last().expect("non-empty page").key.clone();
    }
    let keys: Vec<String> = all
        .iter()
        .map(|kv| String::from_utf8_lossy(&kv.key).into())
        .collect();
    let want: Vec<String> = (0..10)
        .map(|i| format!("/registry/pods/ns/p{i:02}"))
        .collect();
    assert_eq!(keys, want);
    assert_eq!(all[5].value, b"5", "old value at the list's revision");
}

#[test]
fn old_revisions_read_until_compacted_then_fail() {
    let (_d, m) = open();
    m.txn(&Txn::put("/k", "1")).expect("put"); // rev 1
    m.txn(&Txn::put("/k", "2")).expect("put"); // rev 2
    m.txn(&Txn::delete("/k", 2)).expect("del"); // rev 3
    m.txn(&Txn::put("/k", "4")).expect("put"); // rev 4
    let at = |rev| m.range(&RangeRequest::key("/k").at(rev));
    assert_eq!(at(1).expect("r1").kvs[0].value, b"1");
    assert_eq!(at(2).expect("r2").kvs[0].value, b"2");
    assert!(at(3).expect("r3").kvs.is_empty());
    assert_eq!(at(4).expect("r4").kvs[0].value, b"4");
    assert!(matches!(
        at(5),
        Err(StoreError::FutureRevision {
            requested: 5,
            current: 4
        })
    ));

    m.compact(2).expect("compact");
    assert!(matches!(
        at(1),
        Err(StoreError::Compacted {
            requested: 1,
            compacted: 2
        })
    ));
    assert_eq!(
        at(2).expect("r2 is the compacted revision").kvs[0].value,
        b"2"
    );
    assert!(at(3).expect("r3").kvs.is_empty());
    assert_eq!(at(4).expect("r4").kvs[0].value, b"4");
}

#[test]
fn oversized_and_invalid_requests_are_rejected_without_writing() {
    let (_d, m) = open();
    m.txn(&Txn::put("/k", "v")).expect("put");
    let big = vec![b'x'; MAX_VALUE_BYTES + 1];
    let err = m.txn(&Txn::put("/big", big)).expect_err("too large");
    assert!(matches!(err, StoreError::ValueTooLarge { size, .. } if size == MAX_VALUE_BYTES + 1));
    let dup = Txn {
        success: vec![
            Op::Put {
                key: b"/a".to_vec(),
                value: b"1".to_vec(),
            },
            Op::Delete {
                key: b"/a".to_vec(),
            },
        ],
        ..Txn::default()
    };
    assert!(matches!(m.txn(&dup), Err(StoreError::Invalid(_))));
    assert!(matches!(
        m.txn(&Txn::put("", "v")),
        Err(StoreError::Invalid(_))
    ));
    let compare_only = Txn {
        compare: vec![Compare {
            key: b"/k".to_vec(),
            mod_revision: 1,
        }],
        ..Txn::default()
    };
    assert!(m.txn(&compare_only).expect("txn").succeeded);
    assert_eq!(m.revision(), 1, "nothing above was written");
    assert!(get(&m, "/big").is_none());
    // A value at exactly the limit is fine.
    m.txn(&Txn::put("/max", vec![b'y'; MAX_VALUE_BYTES]))
        .expect("at the limit");
}

#[test]
fn delete_prefix_removes_only_that_prefix() {
    let (_d, m) = open();
    for k in ["/ns/a/1", "/ns/a/2", "/ns/ab/1", "/ns/b/1"] {
        m.txn(&Txn::put(k, "v")).expect("put");
    }
    let r = m
        .txn(&Txn {
            success: vec![Op::DeletePrefix {
                prefix: b"/ns/a/".to_vec(),
            }],
            ..Txn::default()
        })
        .expect("txn");
    match &r.results[0] {
        OpResult::Delete { deleted } => assert_eq!(deleted.len(), 2),
        other => panic!("{other:?}"),
    }
    let left: Vec<_> = m
        .range(&RangeRequest::prefix("/ns/"))
        .expect("range")
        .kvs
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    assert_eq!(left, vec![b"/ns/ab/1".to_vec(), b"/ns/b/1".to_vec()]);
    assert_eq!(r.revision, 5, "one revision for the whole transaction");
}

#[test]
fn acknowledged_writes_survive_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store.redb");
    {
        let m = Mvcc::open(&path).expect("open");
        for i in 0..50 {
            m.txn(&Txn::put(format!("/k/{i}"), format!("{i}")))
                .expect("put");
        }
        m.compact(10).expect("compact");
    }
    let m = Mvcc::open(&path).expect("reopen");
    assert_eq!(m.revision(), 50);
    assert_eq!(m.compacted().expect("compacted"), 10);
    assert_eq!(
        m.range(&RangeRequest::prefix("/k/"))
            .expect("range")
            .kvs
            .len(),
        50
    );
    assert_eq!(get(&m, "/k/49").expect("kept").value, b"49");
}

#[test]
fn corrupt_or_foreign_files_are_reported_not_replaced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let garbage = dir.path().join("garbage.redb");
    std::fs::write(&garbage, vec![0x5a; 8192]).expect("write");
    match Mvcc::open(&garbage) {
        Err(e @ StoreError::Corrupt { .. }) => {
            assert!(
                e.to_string().contains(garbage.to_str().expect("utf-8")),
                "{e}"
            );
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert_eq!(
        std::fs::read(&garbage).expect("read"),
        vec![0x5a; 8192],
        "file untouched"
    );

    // A valid redb database that skiff did not write.
    let foreign = dir.path().join("foreign.redb");
    {
        let db = redb::Database::create(&foreign).expect("create");
        let w = db.begin_write().expect("w");
        {
            let def: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("other");
            w.open_table(def)
                .expect("t")
                .insert("x", 1)
                .expect("insert");
        }
        w.commit().expect("commit");
    }
    assert!(matches!(
        Mvcc::open(&foreign),
        Err(StoreError::Foreign { found: None, .. })
    ));
}

#[test]
fn a_second_open_of_the_same_file_is_refused() {
    let (dir, _m) = open();
    let err = Mvcc::open(&dir.path().join("store.redb")).expect_err("already open");
    assert!(err.to_string().contains("already open"), "{err}");
}

/// A damaged record is an error naming the file, for reads, lists and writes alike; it is never
/// skipped (a list silently missing an object would be worse than a failed list).
#[test]
fn damaged_records_are_reported_not_skipped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store.redb");
    {
        let m = Mvcc::open(&path).expect("open");
        for k in ["/d/a", "/d/b", "/d/c"] {
            m.txn(&Txn::put(k, "v")).expect("put");
        }
    }
    {
        // Truncate /d/b's record in the `current` table behind the store's back.
        let db = redb::Database::open(&path).expect("open raw");
        let w = db.begin_write().expect("w");
        {
            let def: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("current");
            w.open_table(def)
                .expect("t")
                .insert(b"/d/b".as_slice(), [1u8, 2, 3].as_slice())
                .expect("insert");
        }
        w.commit().expect("commit");
    }
    let m = Mvcc::open(&path).expect("reopen");
    let is_corrupt = |r: Result<_, StoreError>| match r {
        Err(StoreError::Corrupt { path: p, .. }) => p == path,
        _ => false,
    };
    assert!(
        is_corrupt(m.range(&RangeRequest::prefix("/d/")).map(|_| ())),
        "list"
    );
    assert!(
        is_corrupt(m.range(&RangeRequest::key("/d/b")).map(|_| ())),
        "get"
    );
    assert!(
        is_corrupt(m.txn(&Txn::update("/d/b", "w", 2)).map(|_| ())),
        "cas"
    );
    let delete_all = Txn {
        success: vec![Op::DeletePrefix {
            prefix: b"/d/".to_vec(),
        }],
        ..Txn::default()
    };
    assert!(is_corrupt(m.txn(&delete_all).map(|_| ())), "prefix delete");
    assert_eq!(
        m.range(&RangeRequest::key("/d/a"))
            .expect("intact key")
            .kvs
            .len(),
        1
    );
}
