//! Pod networking over netlink in a throwaway "node" namespace: two pods get addresses from the
//! node's pod CIDR, reach each other over TCP through the node's routes, and teardown leaves no
//! namespace, interface or route behind.

use std::{
    collections::HashSet,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    time::Duration,
};

use skiff_net::{NetNs, Netlink, ipam::Ipam, netns::DEFAULT_NETNS_DIR, pod};
use skiff_tests::{privileged, unique_name};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pods_on_a_node_reach_each_other_and_leave_nothing_behind() {
    if !privileged("two_pods_on_a_node_reach_each_other_and_leave_nothing_behind") {
        return;
    }
    let scratch = tempfile::tempdir().expect("tempdir");
    let pods_dir = scratch.path().join("netns");
    std::fs::create_dir_all(&pods_dir).expect("netns dir");
    let node_ns = NetNs::create(
        std::path::Path::new(DEFAULT_NETNS_DIR),
        &unique_name("skiff-t-podnode"),
    )
    .expect("node netns");
    let node = Netlink::connect_in(&node_ns).expect("netlink in the node");
    node.set_up("lo").await.expect("lo up");
    let ipam = Ipam::open(&scratch.path().join("ipam"), "10.244.7.0/24").expect("ipam");
    let uids = [unique_name("uid-a"), unique_name("uid-b")];

    let outcome = async {
        let mut nets = Vec::new();
        for uid in &uids {
            let ip = ipam.allocate(uid).expect("allocate");
            let net = pod::setup(&node, Some(&node_ns), &pods_dir, uid, ip)
                .await
                .expect("pod network");
            nets.push(net);
        }
        assert_eq!(nets[0].ip, Ipv4Addr::new(10, 244, 7, 2));
        assert_eq!(nets[1].ip, Ipv4Addr::new(10, 244, 7, 3));
        // Setting up again (an agent retrying) rebuilds the same network.
        let again = pod::setup(&node, Some(&node_ns), &pods_dir, &uids[1], nets[1].ip)
            .await
            .expect("idempotent setup");
        assert_eq!(again.host_if, nets[1].host_if);

        let ns_a = NetNs::open(&nets[0].netns).expect("pod a netns");
        let ns_b = NetNs::open(&nets[1].netns).expect("pod b netns");
        let b = SocketAddrV4::new(nets[1].ip, 8080);
        let listener = ns_b
            .run(move || TcpListener::bind(b))
            .expect("enter pod b")
            .expect("listen in pod b");
        let server = std::thread::spawn(move || {
            let (mut s, peer) = listener.accept().expect("accept");
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).expect("read");
            s.write_all(b"pong").expect("write");
            (buf, peer)
        });
        let reply = ns_a
            .run(move || -> std::io::Result<[u8; 4]> {
                let mut c = TcpStream::connect_timeout(&b.into(), Duration::from_secs(5))?;
                c.write_all(b"ping")?;
                let mut buf = [0u8; 4];
                c.read_exact(&mut buf)?;
                Ok(buf)
            })
            .expect("enter pod a")
            .expect("pod a reaches pod b");
        let (got, peer) = server.join().expect("server");
        assert_eq!((&got, &reply), (b"ping", b"pong"));
        assert_eq!(
            peer.ip().to_string(),
            nets[0].ip.to_string(),
            "no NAT between pods"
        );

        for (uid, net) in uids.iter().zip(&nets) {
            pod::teardown(&node, &pods_dir, uid)
                .await
                .expect("teardown");
            ipam.release(net.ip).expect("release");
            assert!(node.link(&net.host_if).await.expect("link").is_none());
        }
        assert!(pod::existing(&pods_dir).is_empty());
        assert!(ipam.allocations().expect("allocations").is_empty());
    };
    let result = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(outcome)).await;
    for uid in &uids {
        let _ = pod::teardown(&node, &pods_dir, uid).await;
    }
    let _ = ipam.collect(&HashSet::new());
    drop(node);
    let _ = node_ns.delete();
    // The namespace directory was made a mount point of its own (as `ip netns` does).
    let _ = nix::mount::umount2(&pods_dir, nix::mount::MntFlags::MNT_DETACH);
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
}
