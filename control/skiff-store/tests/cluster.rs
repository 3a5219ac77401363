//! Members on loopback in one process: replication, forwarding, linearizable reads from
//! followers, losing the leader, restart recovery, and a watch that spans a leader change.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use futures::StreamExt;
use skiff_store::{NodeConfig, RangeRequest, StoreNode, Txn, WatchEvent};

fn free_ports(n: usize) -> Vec<SocketAddr> {
    let listeners: Vec<_> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("addr"))
        .collect()
}

fn config(dir: &std::path::Path, id: u64, addrs: &[SocketAddr]) -> NodeConfig {
    let mut cfg = NodeConfig::single(dir.join(format!("m{id}")));
    cfg.id = id;
    cfg.peer_listen = addrs[(id - 1) as usize];
    cfg.members = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| (i as u64 + 1, a.to_string()))
        .collect::<BTreeMap<_, _>>();
    cfg
}

async fn wait_leader(nodes: &[&StoreNode]) -> u64 {
    for _ in 0..200 {
        let mut seen = Vec::new();
        for n in nodes {
            seen.push(n.leader().await);
        }
        if let Some(Some(l)) = seen.first()
            && seen.iter().all(|s| *s == Some(*l))
            && nodes.iter().any(|n| n.id() == *l)
        {
            return *l;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no agreed leader");
}

/// Starts members 1..=3 (configured by `cfg`) and returns them with the agreed leader.
async fn start_three(cfg: impl Fn(u64) -> NodeConfig) -> (Vec<StoreNode>, u64) {
    let mut nodes = Vec::new();
    for id in 1..=3 {
        nodes.push(StoreNode::start(cfg(id)).await.expect("start"));
    }
    let leader = wait_leader(&nodes.iter().collect::<Vec<_>>()).await;
    (nodes, leader)
}

/// Shuts every member down.
async fn stop_all(nodes: Vec<StoreNode>) {
    for n in nodes {
        n.shutdown().await;
    }
}

async fn all_keys(node: &StoreNode) -> BTreeMap<String, String> {
    node.range(RangeRequest::prefix("/c/"))
        .await
        .expect("linearizable read")
        .kvs
        .into_iter()
        .map(|kv| {
            (
                String::from_utf8(kv.key).expect("utf-8"),
                String::from_utf8(kv.value).expect("utf-8"),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_member_restarts_with_every_acknowledged_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = StoreNode::start(NodeConfig::single(dir.path()))
        .await
        .expect("start");
    let mut acked = BTreeMap::new();
    for i in 0..200 {
        let (k, v) = (format!("/c/{i}"), format!("v{i}"));
        node.txn(Txn::put(k.clone(), v.clone()))
            .await
            .expect("write");
        acked.insert(k, v);
    }
    let rev = node.mvcc().revision();
    node.shutdown().await;
    drop(node);
    let node = StoreNode::start(NodeConfig::single(dir.path()))
        .await
        .expect("restart");
    assert_eq!(all_keys(&node).await, acked);
    assert_eq!(node.mvcc().revision(), rev);
    node.txn(Txn::put("/c/after", "x"))
        .await
        .expect("writes after restart");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_keep_every_acknowledged_write_across_leader_loss() {
    let dir = tempfile::tempdir().expect("tempdir");
    let addrs = free_ports(3);
    let (mut nodes, leader) = start_three(|id| config(dir.path(), id, &addrs)).await;
    let follower = nodes
        .iter()
        .find(|n| n.id() != leader)
        .expect("a follower")
        .clone();
    let watcher_node = nodes
        .iter()
        .find(|n| n.id() != leader && n.id() != follower.id())
        .expect("another follower")
        .clone();
    let mut watch = watcher_node.watch(RangeRequest::prefix("/c/"), 1, None);

    // Writes through a follower are forwarded to the leader.
    let mut acked = BTreeMap::new();
    for i in 0..150 {
        let (k, v) = (format!("/c/{i:03}"), format!("a{i}"));
        follower
            .txn(Txn::put(k.clone(), v.clone()))
            .await
            .expect("forwarded write");
        acked.insert(k, v);
    }
    // A follower's linearizable read sees every acknowledged write at once.
    for n in &nodes {
        assert_eq!(all_keys(n).await, acked, "member {}", n.id());
    }

    // Lose the leader.
    let old = nodes.iter().position(|n| n.id() == leader).expect("leader");
    let old_leader = nodes.remove(old);
    old_leader.shutdown().await;
    drop(old_leader);
    let new_leader = wait_leader(&nodes.iter().collect::<Vec<_>>()).await;
    assert_ne!(new_leader, leader);
    for i in 150..250 {
        let (k, v) = (format!("/c/{i:03}"), format!("b{i}"));
        nodes[i % 2]
            .txn(Txn::put(k.clone(), v.clone()))
            .await
            .expect("write after failover");
        acked.insert(k, v);
    }
    for n in &nodes {
        assert_eq!(all_keys(n).await, acked, "member {} after failover", n.id());
    }

    // The watch on a surviving follower saw every revision once, in order, across the change.
    let last = watcher_node.mvcc().revision();
    let mut revs = Vec::new();
    while revs.last().is_none_or(|r| *r < last) {
        match tokio::time::timeout(Duration::from_secs(10), watch.next()).await {
            Ok(Some(Ok(WatchEvent::Events(evs)))) => {
                revs.extend(evs.iter().map(|e| e.kv.mod_revision))
            }
            Ok(Some(Ok(WatchEvent::Progress(_)))) => {}
            other => panic!("watch: {other:?} after {revs:?}"),
        }
    }
    assert_eq!(revs, (1..=last).collect::<Vec<_>>());

    // The old leader restarts from its files and catches up.
    let back = StoreNode::start(config(dir.path(), leader, &addrs))
        .await
        .expect("restart");
    assert_eq!(all_keys(&back).await, acked, "restarted member");
    back.shutdown().await;
    stop_all(nodes).await;
}

/// Add a learner through a follower (forwarded), promote it, remove an original member, and
/// keep writing and reading throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_can_be_added_promoted_and_removed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let addrs = free_ports(4);
    let (nodes, leader) = start_three(|id| config(dir.path(), id, &addrs[..3])).await;
    let follower = nodes
        .iter()
        .find(|n| n.id() != leader)
        .expect("follower")
        .clone();
    for i in 0..20 {
        follower
            .txn(Txn::put(format!("/c/{i:03}"), "x"))
            .await
            .expect("write");
    }

    // Member 4 starts empty and waits to be added.
    let mut cfg4 = config(dir.path(), 4, &addrs);
    cfg4.join = true;
    let n4 = StoreNode::start(cfg4).await.expect("start joiner");
    let members = follower
        .change_members(skiff_store::MemberChange::AddLearner {
            id: 4,
            addr: addrs[3].to_string(),
        })
        .await
        .expect("add learner");
    assert!(members.iter().any(|m| m.id == 4 && !m.voter), "{members:?}");
    let members = follower
        .change_members(skiff_store::MemberChange::Promote { ids: vec![4] })
        .await
        .expect("promote");
    assert!(members.iter().any(|m| m.id == 4 && m.voter), "{members:?}");
    assert_eq!(all_keys(&n4).await.len(), 20, "the new member has the data");

    // Remove an original member (the leader itself) and keep going.
    let members = follower
        .change_members(skiff_store::MemberChange::Remove { ids: vec![leader] })
        .await
        .expect("remove");
    let mut ids: Vec<u64> = members.iter().map(|m| m.id).collect();
    ids.sort();
    let mut want: Vec<u64> = [1, 2, 3, 4].into_iter().filter(|i| *i != leader).collect();
    want.sort();
    assert_eq!(ids, want);
    n4.txn(Txn::put("/c/after", "y"))
        .await
        .expect("write after removal");
    assert_eq!(all_keys(&follower).await.len(), 21);
    n4.shutdown().await;
    stop_all(nodes).await;
}

/// A member that was down while the leader snapshotted and purged its log catches up by
/// installing the snapshot (several MiB: sent in more than one chunk), then follows the log
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_behind_the_purged_log_catches_up_by_snapshot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let addrs = free_ports(3);
    let cfg = |id| {
        let mut c = config(dir.path(), id, &addrs);
        c.snapshot_every = 50;
        c
    };
    let (mut nodes, leader) = start_three(cfg).await;
    let down = nodes
        .iter()
        .position(|n| n.id() != leader)
        .expect("a follower");
    let down_id = nodes[down].id();
    let gone = nodes.remove(down);
    gone.shutdown().await;
    drop(gone);

    // Enough writes for several snapshots; the log before them is purged. 12 KiB values: the
    // snapshot sent is over 6 MiB (at least 350 of the 400 writes, each in `current` and
    // `history`): more than two of openraft's 3 MiB chunks.
    let mut acked = BTreeMap::new();
    for i in 0..400 {
        let (k, v) = (
            format!("/c/{i:03}"),
            format!("s{i}{}", "x".repeat(12 << 10)),
        );
        nodes[i % 2]
            .txn(Txn::put(k.clone(), v.clone()))
            .await
            .expect("write");
        acked.insert(k, v);
    }
    let lead = nodes.iter().find(|n| n.id() == leader).expect("leader");
    let purged = lead.raft().metrics().borrow().purged;
    assert!(
        purged.is_some_and(|p| p.index > 50),
        "the leader purged its log (purged: {purged:?})"
    );

    let back = StoreNode::start(cfg(down_id)).await.expect("restart");
    assert_eq!(all_keys(&back).await, acked, "caught up through a snapshot");
    let snap = back.raft().metrics().borrow().snapshot;
    assert!(snap.is_some(), "the returning member installed a snapshot");
    // Its own copy, or a newer snapshot it built since (it applies on after the install): a
    // `.snap` file holding at least what was sent. A build may be replacing it as we look.
    let snapshots = dir.path().join(format!("m{down_id}/snapshots"));
    let sizes = || -> Vec<(std::path::PathBuf, u64)> {
        std::fs::read_dir(&snapshots)
            .expect("snapshot directory")
            .filter_map(|e| {
                let path = e.ok()?.path();
                let size = std::fs::metadata(&path).ok()?.len();
                path.extension()
                    .is_some_and(|x| x == "snap")
                    .then_some((path, size))
            })
            .collect()
    };
    let mut kept = sizes();
    for _ in 0..50 {
        if kept.iter().any(|(_, size)| *size > 6 << 20) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        kept = sizes();
    }
    assert!(
        kept.iter().any(|(_, size)| *size > 6 << 20),
        "the member keeps a snapshot file: {kept:?}"
    );
    back.txn(Txn::put("/c/zzz", "after"))
        .await
        .expect("write after catch-up");
    assert_eq!(all_keys(&back).await.len(), acked.len() + 1);
    back.shutdown().await;
    stop_all(nodes).await;
}

/// A snapshot that arrives damaged is refused to the sender (503: its transport backs off)
/// instead of being handed to the state machine, whose failure would stop the member; its
/// chunks are refused at once for a while after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_snapshot_transfer_is_refused_and_the_member_keeps_running() {
    use openraft::{SnapshotMeta, raft::InstallSnapshotRequest};
    use skiff_store::raft::TypeConfig;

    let dir = tempfile::tempdir().expect("tempdir");
    let addrs = free_ports(1);
    let mut cfg = NodeConfig::single(dir.path().join("m1"));
    cfg.peer_listen = addrs[0];
    let node = StoreNode::start(cfg).await.expect("start");
    wait_leader(&[&node]).await;
    node.txn(Txn::put("/c/kept", "yes")).await.expect("write");

    // A stream with the right layout, cut short inside its first record.
    let mut data = b"SKIFFSNP".to_vec();
    data.extend_from_slice(&1u32.to_le_bytes());
    data.extend_from_slice(&[200, 0, 0, 0]);
    data.extend_from_slice(&[7; 20]);
    let vote = node.raft().metrics().borrow().vote;
    let http = reqwest::Client::new();
    let mut statuses = Vec::new();
    for (offset, chunk, done) in [
        (0, &data[..10], false),
        (10, &data[10..], true),
        // The sender tries again from the start.
        (0, &data[..10], false),
    ] {
        let req = InstallSnapshotRequest::<TypeConfig> {
            vote,
            meta: SnapshotMeta {
                last_log_id: Some(openraft::LogId::new(
                    openraft::CommittedLeaderId::new(vote.leader_id().term, 1),
                    1_000_000,
                )),
                last_membership: Default::default(),
                snapshot_id: "snap-7".into(),
            },
            offset,
            data: chunk.to_vec(),
            done,
        };
        let resp = http
            .post(format!("http://{}/raft/snapshot", addrs[0]))
            .body(postcard::to_allocvec(&req).expect("encode"))
            .send()
            .await
            .expect("send");
        statuses.push((
            resp.status().as_u16(),
            resp.text().await.unwrap_or_default(),
        ));
    }
    assert_eq!(statuses[0].0, 200, "a chunk is taken: {statuses:?}");
    assert_eq!(
        statuses[1].0, 503,
        "the finished stream is refused: {statuses:?}"
    );
    assert!(
        statuses[1].1.contains("snapshot snap-7: cut short"),
        "{statuses:?}"
    );
    assert_eq!(
        statuses[2].0, 503,
        "its chunks are refused at once: {statuses:?}"
    );
    assert!(statuses[2].1.contains("arrived damaged"), "{statuses:?}");

    // Still up, still the same data, still taking writes.
    let kvs = node
        .range(RangeRequest::prefix("/c/"))
        .await
        .expect("read")
        .kvs;
    assert_eq!(kvs.len(), 1);
    node.txn(Txn::put("/c/after", "yes"))
        .await
        .expect("write after the refused snapshot");
    node.shutdown().await;
}
