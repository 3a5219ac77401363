//! Real packets through a veth between two test-owned network namespaces, with skiff's
//! programs attached on the node side. Checks delivery, drops by reason, and what `bpftool`
//! shows while the programs are loaded.

use std::process::Command;

use skiff_datapath::{
    LoadedProgram, ProgramKind,
    metrics::{self, Verdict},
};
use skiff_ebpf_common::{DropReason, Hook};
use skiff_tests::{
    TestPins, Topology, packets, privileged,
    topology::{NODE_IF, NODE_IP, PEER_IP},
};

const PORT: u16 = 7000;
const GOOD: usize = 20;

/// Frames that must be dropped, sent raw from the peer to the node's MAC.
fn malformed(node_mac: [u8; 6]) -> Vec<(Vec<u8>, DropReason)> {
    let udp = packets::udp_to(node_mac, PEER_IP, NODE_IP, 5555, PORT, b"bad");
    let mut bad_ihl = udp.clone();
    packets::set_ihl(&mut bad_ihl, 3);
    let mut cut_ip = udp.clone();
    cut_ip.truncate(packets::ETH_LEN + 12);
    let mut bad_udp_len = udp.clone();
    bad_udp_len[packets::L4 + 4..packets::L4 + 6].copy_from_slice(&2u16.to_be_bytes());
    vec![
        (bad_ihl, DropReason::MalformedIpv4),
        (cut_ip, DropReason::MalformedIpv4),
        (bad_udp_len, DropReason::MalformedL4),
    ]
}

fn run_through_veth(kind: ProgramKind, hook: Hook) {
    let topo = Topology::new();
    let pins = TestPins::new();
    let mut prog = LoadedProgram::load(kind, pins.dir()).expect("load");
    topo.node
        .run(|| prog.attach(NODE_IF))
        .expect("enter node netns")
        .expect("attach");

    // Valid traffic is delivered.
    let server = topo.bind_udp_on_node(PORT);
    topo.send_udp_from_peer(PORT, GOOD, b"hello");
    let mut buf = [0u8; 64];
    for i in 0..GOOD {
        let (n, from) = server
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("datagram {i} of {GOOD} not delivered: {e}"));
        assert_eq!(&buf[..n], b"hello");
        assert_eq!(from.ip(), std::net::IpAddr::from(PEER_IP));
    }

    // Malformed frames are dropped by the program, each counted under its reason.
    let bad = malformed(topo.node_mac);
    for (frame, _) in &bad {
        for _ in 0..3 {
            topo.send_raw_from_peer(frame);
        }
    }
    let rows = metrics::read(pins.dir()).expect("read metrics");
    for r in DropReason::ALL {
        let want = 3 * bad.iter().filter(|(_, reason)| *reason == r).count() as u64;
        assert_eq!(
            metrics::packets(&rows, hook, Verdict::Dropped(r)),
            want,
            "{kind:?} drops for {r:?}: {rows:?}"
        );
    }
    let forwarded = metrics::packets(&rows, hook, Verdict::Forwarded);
    // The datagrams plus ARP; never fewer than what was delivered.
    assert!(
        forwarded >= GOOD as u64,
        "{kind:?} forwarded {forwarded}: {rows:?}"
    );

    // The bad frames never reached the socket.
    server
        .set_read_timeout(Some(std::time::Duration::from_millis(200)))
        .expect("timeout");
    assert!(
        server.recv_from(&mut buf).is_err(),
        "a malformed frame was delivered"
    );

    // bpftool sees the loaded program, and decodes the pinned map with field names (BTF).
    let progs = bpftool(&["prog", "show"]);
    let name = kind.program_name();
    assert!(
        progs
            .as_array()
            .expect("array")
            .iter()
            .any(|p| p["name"] == name),
        "bpftool prog show does not list {name}"
    );
    let path = pins.dir().map_path(skiff_ebpf_common::map_names::METRICS);
    let dump = bpftool(&["map", "dump", "pinned", path.to_str().expect("utf-8")]);
    let text = dump.to_string();
    for field in ["\"reason\"", "\"hook\"", "\"packets\"", "\"bytes\""] {
        assert!(text.contains(field), "bpftool dump lacks {field}: {text}");
    }
}

fn bpftool(args: &[&str]) -> serde_json::Value {
    let out = Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .expect("bpftool is installed by cargo xtask setup");
    assert!(
        out.status.success(),
        "bpftool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("bpftool -j prints JSON")
}

#[test]
fn xdp_on_veth_passes_traffic_and_drops_malformed() {
    if !privileged("xdp_on_veth_passes_traffic_and_drops_malformed") {
        return;
    }
    run_through_veth(ProgramKind::XdpUplink, Hook::XdpUplink);
}

#[test]
fn tc_on_veth_passes_traffic_and_drops_malformed() {
    if !privileged("tc_on_veth_passes_traffic_and_drops_malformed") {
        return;
    }
    run_through_veth(ProgramKind::FromPod, Hook::FromPod);
}

/// The topology fixture leaves nothing behind.
#[test]
fn topology_cleans_up() {
    if !privileged("topology_cleans_up") {
        return;
    }
    let topo = Topology::new();
    let (node, peer) = (topo.node.path().to_owned(), topo.peer.path().to_owned());
    assert!(node.exists() && peer.exists());
    drop(topo);
    assert!(!node.exists() && !peer.exists());
}
