//! A full disk surfaces as an error to the writer, and loses no acknowledged write: a store on a
//! tiny tmpfs is written until it fails, then the tmpfs is grown and the store restarted.

use std::{collections::BTreeMap, path::Path, time::Duration};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use skiff_store::{NodeConfig, RangeRequest, StoreError, StoreNode, Txn};
use skiff_tests::privileged;

/// A tmpfs mounted on a temporary directory, unmounted on drop.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn new(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().expect("tempdir");
        mount(
            Some("tmpfs"),
            dir.path(),
            Some("tmpfs"),
            MsFlags::empty(),
            Some(format!("size={size}").as_str()),
        )
        .expect("mount tmpfs");
        Tmpfs(dir)
    }

    fn path(&self) -> &Path {
        self.0.path()
    }

    fn grow(&self, size: &str) {
        mount(
            None::<&str>,
            self.path(),
            Some("tmpfs"),
            MsFlags::MS_REMOUNT,
            Some(format!("size={size}").as_str()),
        )
        .expect("remount tmpfs");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if let Err(e) = umount2(self.path(), MntFlags::MNT_DETACH) {
            eprintln!("cleanup: unmount {}: {e}", self.path().display());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_is_an_error_and_loses_no_acknowledged_write() {
    if !privileged("disk_full_is_an_error_and_loses_no_acknowledged_write") {
        return;
    }
    let fs = Tmpfs::new("4m");
    let node = StoreNode::start(NodeConfig::single(fs.path()))
        .await
        .expect("start");
    let mut acked = BTreeMap::new();
    let value = vec![b'x'; 16 * 1024];
    let mut failure = None;
    for i in 0..2000 {
        let key = format!("/full/{i:05}");
        match tokio::time::timeout(
            Duration::from_secs(30),
            node.txn(Txn::put(key.clone(), value.clone())),
        )
        .await
        .expect("a write on a full disk must fail, not hang")
        {
            Ok(_) => {
                acked.insert(key, ());
            }
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    let failure = failure.expect("4 MiB cannot hold 2000 values of 16 KiB");
    eprintln!("after {} acknowledged writes: {failure}", acked.len());
    assert!(
        matches!(
            failure,
            StoreError::Unavailable(_) | StoreError::Storage { .. }
        ),
        "{failure:?}"
    );
    assert!(!acked.is_empty(), "some writes fit before the disk filled");
    node.shutdown().await;
    drop(node);

    // With room again, the store restarts and holds every acknowledged write.
    fs.grow("64m");
    let node = StoreNode::start(NodeConfig::single(fs.path()))
        .await
        .expect("restart");
    let kvs = node
        .range(RangeRequest::prefix("/full/"))
        .await
        .expect("read")
        .kvs;
    let found: BTreeMap<String, ()> = kvs
        .into_iter()
        .map(|kv| (String::from_utf8(kv.key).expect("utf-8"), ()))
        .collect();
    for k in acked.keys() {
        assert!(found.contains_key(k), "acknowledged write {k} lost");
    }
    node.txn(Txn::put("/full/after", "ok"))
        .await
        .expect("writes work again");
    node.shutdown().await;
}
