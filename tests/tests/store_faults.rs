//! Three `skiff-control` processes, each in its own network namespace on a test LAN, talking
//! to each other over mutual TLS (certificates from `skiff-control peer-certs`), under
//! concurrent load while members are killed with SIGKILL and restarted and the leader is cut
//! off the network (its link down) and reconnected. A client without a member certificate,
//! or with one from another CA, is refused by the peer listener. Afterwards: the recorded client history
//! (≥ 1000 operations) is linearizable per key, no acknowledged write is lost, and a watcher
//! that reconnects to another member when its member fails saw every revision exactly once,
//! in order.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures::StreamExt;
use skiff_store::{RangeRequest, StoreError, Txn, WatchEvent, client::StoreClient};
use skiff_tests::{
    bin,
    linearizability::{self, Input, Operation, Output},
    node::{Lan, NodeNs},
    privileged,
};

const KEYS: usize = 8;
const CLIENTS: usize = 8;
/// Each client's operations at least; clients go on until the faults are over.
const OPS_PER_CLIENT: usize = 200;
/// A client's pause between operations (keeps the history checkable while faults go on).
const PACE: Duration = Duration::from_millis(10);

struct Member {
    id: u64,
    peer: SocketAddr,
    client: SocketAddr,
    dir: PathBuf,
    /// Where the peer certificates are.
    certs: PathBuf,
    node: NodeNs,
    child: Option<Child>,
}

impl Member {
    fn start(&mut self, peers: &str) {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.join("log"))
            .expect("log file");
        let child = self
            .node
            .command(bin("skiff-control"))
            .arg("--data-dir")
            .arg(&self.dir)
            .args(["--node-id", &self.id.to_string()])
            .args(["--peer-listen", &self.peer.to_string()])
            .args(["--client-listen", &self.client.to_string()])
            .args(["--peers", peers])
            .arg("--peer-cert-file")
            .arg(self.certs.join(format!("member-{}.crt", self.id)))
            .arg("--peer-key-file")
            .arg(self.certs.join(format!("member-{}.key", self.id)))
            .arg("--peer-trusted-ca-file")
            .arg(self.certs.join("peer-ca.crt"))
            .arg("--store-only")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start skiff-control");
        self.child = Some(child);
    }

    /// SIGKILL: no shutdown path runs.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().expect("kill -9");
            c.wait().expect("reap");
        }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn leader(clients: &[StoreClient]) -> Option<u64> {
    for c in clients {
        if let Ok(s) = c.status().await
            && s.leader.is_some()
        {
            return s.leader;
        }
    }
    None
}

async fn wait_ready(clients: &[StoreClient]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut ok = true;
        for c in clients {
            ok &= c.status().await.is_ok_and(|s| s.leader.is_some());
        }
        if ok {
            return;
        }
        assert!(Instant::now() < deadline, "members did not become ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn key(i: usize) -> String {
    format!("/lin/k{i}")
}

#[test]
fn killed_and_partitioned_members_lose_no_acknowledged_write_and_history_is_linearizable() {
    if !privileged("killed_and_partitioned_members_lose_no_acknowledged_write") {
        return;
    }
    let lan = Lan::new();
    let root = tempfile::tempdir().expect("tempdir");
    let certs = root.path().join("certs");
    let members: Vec<Member> = (0..3)
        .map(|i| {
            let node = lan.node();
            Member {
                id: i as u64 + 1,
                peer: SocketAddr::from((node.node_ip, 2380)),
                client: SocketAddr::from((node.node_ip, 2379)),
                dir: root.path().join(format!("m{}", i + 1)),
                certs: certs.clone(),
                node,
                child: None,
            }
        })
        .collect();
    let peer_certs = |dir: &std::path::Path| {
        let mut cmd = std::process::Command::new(bin("skiff-control"));
        cmd.arg("peer-certs").arg("--out").arg(dir);
        for m in &members {
            cmd.args(["--member", &format!("{}={}", m.id, m.peer.ip())]);
        }
        let out = cmd.output().expect("skiff-control peer-certs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    peer_certs(&certs);
    // Certificates for the same members from another CA: not trusted.
    let strangers = root.path().join("strangers");
    peer_certs(&strangers);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(members, strangers));
    drop(rt);
    drop(lan);
}

async fn run(mut members: Vec<Member>, strangers: PathBuf) {
    let peers = members
        .iter()
        .map(|m| format!("{}={}", m.id, m.peer))
        .collect::<Vec<_>>()
        .join(",");
    for m in &mut members {
        std::fs::create_dir_all(&m.dir).expect("dir");
        m.start(&peers);
    }
    let clients: Vec<StoreClient> = members.iter().map(|m| StoreClient::new(m.client)).collect();
    wait_ready(&clients).await;
    // The peer listener refuses whoever is not a member: no certificate, or another CA's.
    let target = format!("https://{}/raft/vote", members[0].peer);
    let ca = members[0].certs.join("peer-ca.crt");
    let stranger_crt = strangers.join("member-2.crt");
    let stranger_key = strangers.join("member-2.key");
    let curl = |extra: &[&std::ffi::OsStr]| {
        std::process::Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "5",
            ])
            .arg("--cacert")
            .arg(&ca)
            .args(extra)
            .args(["-X", "POST", &target])
            .output()
            .expect("curl")
    };
    let cases: Vec<(&str, Vec<&std::ffi::OsStr>)> = vec![
        ("no certificate", vec![]),
        (
            "another CA's certificate",
            vec![
                std::ffi::OsStr::new("--cert"),
                stranger_crt.as_os_str(),
                std::ffi::OsStr::new("--key"),
                stranger_key.as_os_str(),
            ],
        ),
    ];
    for (what, extra) in cases {
        let out = curl(&extra);
        assert!(
            !out.status.success(),
            "{what}: the peer listener answered {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    // A member's certificate is let in (the request itself is not a valid vote).
    let own_crt = members[0].certs.join("member-2.crt");
    let own_key = members[0].certs.join("member-2.key");
    let out = curl(&[
        std::ffi::OsStr::new("--cert"),
        own_crt.as_os_str(),
        std::ffi::OsStr::new("--key"),
        own_key.as_os_str(),
    ]);
    assert!(
        out.status.success(),
        "a member's certificate refused: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let t0 = Instant::now();
    let now = move || t0.elapsed().as_nanos() as u64;
    let history: Arc<Mutex<Vec<(usize, Operation)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let faults_over = Arc::new(AtomicBool::new(false));
    let next_value = Arc::new(AtomicU64::new(1));

    // A watcher that resumes on another member from its next revision when its stream fails.
    let seen: Arc<Mutex<Vec<u64>>> = Arc::default();
    let watcher = {
        let (clients, seen, stop) = (clients.clone(), seen.clone(), stop.clone());
        tokio::spawn(async move {
            let mut member = 0usize;
            let mut next = 1u64;
            while !stop.load(Ordering::Relaxed) {
                let Ok(mut w) = clients[member]
                    .watch(RangeRequest::prefix("/lin/"), next)
                    .await
                else {
                    member = (member + 1) % clients.len();
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                while let Some(item) = w.next().await {
                    match item {
                        Ok(WatchEvent::Events(evs)) => {
                            let mut s = seen.lock().expect("lock");
                            for e in evs {
                                s.push(e.kv.mod_revision);
                                next = e.kv.mod_revision + 1;
                            }
                        }
                        Ok(WatchEvent::Progress(_)) => {}
                        Err(_) => break,
                    }
                }
                member = (member + 1) % clients.len();
            }
        })
    };

    let mut workers = Vec::new();
    for c in 0..CLIENTS {
        let (clients, history, faults_over, next_value) = (
            clients.clone(),
            history.clone(),
            faults_over.clone(),
            next_value.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ (c as u64 + 1);
            let mut rand = move |n: u64| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng % n
            };
            // Last (value, mod revision) this client read per key, for compare-and-swap.
            let mut known: BTreeMap<usize, Option<(u64, u64)>> = BTreeMap::new();
            let mut done = 0;
            while done < OPS_PER_CLIENT || !faults_over.load(Ordering::Relaxed) {
                done += 1;
                tokio::time::sleep(PACE).await;
                let k = rand(KEYS as u64) as usize;
                let member = &clients[rand(clients.len() as u64) as usize];
                let call = now();
                let op = match rand(10) {
                    0..=3 => {
                        let v = next_value.fetch_add(1, Ordering::Relaxed);
                        let r = member.txn(&Txn::put(key(k), v.to_string())).await;
                        Some((Input::Put(v), r.map(|_| Output::Ok)))
                    }
                    4..=6 => match member.range(RangeRequest::key(key(k))).await {
                        Ok(resp) => {
                            let kv = resp.kvs.first();
                            let val = kv.map(|kv| {
                                String::from_utf8_lossy(&kv.value)
                                    .parse::<u64>()
                                    .expect("u64")
                            });
                            known.insert(k, kv.map(|kv| (val.expect("set"), kv.mod_revision)));
                            Some((Input::Get, Ok(Output::Value(val))))
                        }
                        Err(_) => None, // a read with no answer constrains nothing
                    },
                    _ => {
                        let v = next_value.fetch_add(1, Ordering::Relaxed);
                        let expect = known.get(&k).copied().flatten();
                        let txn = match expect {
                            Some((_, rev)) => Txn::update(key(k), v.to_string(), rev),
                            None => Txn::create(key(k), v.to_string()),
                        };
                        let r = member.txn(&txn).await;
                        Some((
                            Input::Cas {
                                expect: expect.map(|e| e.0),
                                new: v,
                            },
                            r.map(|r| Output::Cas(r.succeeded)),
                        ))
                    }
                };
                let Some((input, result)) = op else { continue };
                let (output, ret) = match result {
                    Ok(o) => (o, Some(now())),
                    Err(StoreError::Unavailable(_)) => (Output::Unknown, None),
                    Err(e) => panic!("unexpected store error: {e}"),
                };
                history.lock().expect("lock").push((
                    k,
                    Operation {
                        input,
                        output,
                        call,
                        ret,
                    },
                ));
            }
        }));
    }

    // Faults: kill -9 the leader, restart it; then kill -9 a follower, restart it; then cut the
    // leader off the network (its link down) while the others elect a new one, and reconnect
    // it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let l = leader(&clients).await.expect("a leader");
    members[(l - 1) as usize].kill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    members[(l - 1) as usize].start(&peers);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let l2 = leader(&clients).await.expect("a leader after failover");
    let f = (1..=3).find(|i| *i != l2).expect("a follower");
    members[(f - 1) as usize].kill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    members[(f - 1) as usize].start(&peers);
    tokio::time::sleep(Duration::from_secs(2)).await;
    wait_ready(&clients).await;
    let l3 = leader(&clients)
        .await
        .expect("a leader before the partition");
    let cut = &members[(l3 - 1) as usize];
    cut.node.set_connected(false).await;
    let others: Vec<StoreClient> = (1..=3u64)
        .filter(|i| *i != l3)
        .map(|i| clients[(i - 1) as usize].clone())
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while leader(&others).await.is_none_or(|l| l == l3) {
        assert!(
            Instant::now() < deadline,
            "no new leader behind the partition"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    cut.node.set_connected(true).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    faults_over.store(true, Ordering::Relaxed);

    for w in workers {
        w.await.expect("client task");
    }
    wait_ready(&clients).await;

    // Final reads of every key on every member, recorded like any other read.
    for k in 0..KEYS {
        for c in &clients {
            let call = now();
            let resp = c
                .range(RangeRequest::key(key(k)))
                .await
                .expect("final read");
            let val = resp.kvs.first().map(|kv| {
                String::from_utf8_lossy(&kv.value)
                    .parse::<u64>()
                    .expect("u64")
            });
            history.lock().expect("lock").push((
                k,
                Operation {
                    input: Input::Get,
                    output: Output::Value(val),
                    call,
                    ret: Some(now()),
                },
            ));
        }
    }

    let history = history.lock().expect("lock").clone();
    assert!(
        history.len() >= 1000,
        "only {} operations recorded",
        history.len()
    );
    let unknown = history.iter().filter(|(_, o)| o.ret.is_none()).count();
    eprintln!(
        "{} operations, {unknown} with unknown outcome",
        history.len()
    );
    for k in 0..KEYS {
        let ops: Vec<Operation> = history
            .iter()
            .filter(|(key, _)| *key == k)
            .map(|(_, o)| *o)
            .collect();
        assert!(
            linearizability::check(&ops),
            "history of {} is not linearizable",
            key(k)
        );
    }

    // The watcher saw every revision once, in order, across the kills.
    let last = clients[0].status().await.expect("status").revision;
    let deadline = Instant::now() + Duration::from_secs(20);
    while seen.lock().expect("lock").last().is_none_or(|r| *r < last) {
        assert!(
            Instant::now() < deadline,
            "watcher stuck at {:?}",
            seen.lock().expect("lock").last()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    watcher.abort();
    let seen = seen.lock().expect("lock").clone();
    assert_eq!(
        seen,
        (1..=seen.len() as u64).collect::<Vec<_>>(),
        "gaps or repeats"
    );
}
