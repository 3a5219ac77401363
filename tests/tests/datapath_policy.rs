//! BPF_PROG_RUN tests of NetworkPolicy enforcement: frames through the real `from-pod` and
//! `to-pod` programs with real (pinned) identity, policy and endpoint maps; each test checks the
//! verdict, the drop counters and the flow events.

use std::net::Ipv4Addr;

use skiff_datapath::{
    LoadedProgram, ProgramKind,
    endpoints::EndpointMap,
    metrics::{self, Verdict},
    policy::{Flows, PolicyMaps},
};
use skiff_ebpf_common::{
    DropReason, Hook,
    endpoint::EndpointInfo,
    policy::{
        DIR_EGRESS, DIR_INGRESS, EP_AUDIT, EP_EGRESS_ISOLATED, EP_ID_SHIFT, EP_INGRESS_ISOLATED,
        IDENTITY_ANY, IDENTITY_CIDR_FIRST, IDENTITY_HOST, PolicyKey, VERDICT_ALLOWED,
        VERDICT_AUDIT, VERDICT_DROPPED,
    },
};
use skiff_tests::{
    TestPins,
    packets::{self, SYN, SYN_ACK},
    privileged,
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
const TCP: u8 = 6;

/// The pod under test (endpoint 1) and a peer pod elsewhere (identity 300).
const POD: [u8; 4] = [10, 244, 1, 10];
const PEER: [u8; 4] = [10, 244, 2, 6];
const PEER_ID: u32 = 300;

struct Node {
    _pins: TestPins,
    from_pod: LoadedProgram,
    to_pod: LoadedProgram,
    maps: PolicyMaps,
    endpoints: EndpointMap,
    flows: Flows,
    pins_dir: skiff_datapath::PinDir,
}

impl Node {
    fn new() -> Node {
        let pins = TestPins::new();
        let from_pod = LoadedProgram::load(ProgramKind::FromPod, pins.dir()).expect("from-pod");
        let to_pod = LoadedProgram::load(ProgramKind::ToPod, pins.dir()).expect("to-pod");
        let mut maps = PolicyMaps::open(pins.dir()).expect("policy maps");
        maps.set_identity(PEER.into(), 32, PEER_ID)
            .expect("ipcache");
        Node {
            endpoints: EndpointMap::open(pins.dir()).expect("endpoints"),
            flows: Flows::open(pins.dir()).expect("flows"),
            pins_dir: pins.dir().clone(),
            _pins: pins,
            from_pod,
            to_pod,
            maps,
        }
    }

    /// The pod under test with isolation `flags` (endpoint number 1).
    fn pod(&mut self, flags: u32) {
        self.endpoints
            .set(
                POD.into(),
                EndpointInfo {
                    // Not delivered to: the tests send to it through `to-pod`, and from it.
                    ifindex: 0,
                    flags: flags | (1 << EP_ID_SHIFT),
                    mac: [2, 0, 0, 0, 0, 1],
                    node_mac: [2, 0, 0, 0, 0, 2],
                },
            )
            .expect("endpoint");
    }

    fn allow(&mut self, dir: u8, identity: u32, proto: u8, port: u16, bits: u8, policy: u32) {
        let (len, key) = PolicyKey::new(1, dir, identity, proto, port, bits);
        self.maps.allow(len, key, policy).expect("allow");
    }

    /// A SYN from the pod to `dst:dport` through `from-pod`: its verdict.
    fn connect(&self, dst: [u8; 4], sport: u16, dport: u16) -> u32 {
        let f = packets::tcp(POD, dst, sport, dport, SYN, 1, 0, b"");
        self.from_pod.test_run(&f).expect("run").verdict
    }

    /// A SYN from `src:sport` to the pod through `to-pod`: its verdict.
    fn accept(&self, src: [u8; 4], sport: u16, dport: u16) -> u32 {
        let f = packets::tcp(src, POD, sport, dport, SYN, 1, 0, b"");
        self.to_pod.test_run(&f).expect("run").verdict
    }

    fn denied(&self, hook: Hook) -> u64 {
        let rows = metrics::read(&self.pins_dir).expect("metrics");
        metrics::packets(&rows, hook, Verdict::Dropped(DropReason::PolicyDenied))
    }
}

#[test]
fn egress_allows_by_identity_port_and_range_and_denies_the_rest() {
    if !privileged("egress_allows_by_identity_port_and_range_and_denies_the_rest") {
        return;
    }
    let mut node = Node::new();
    // Not isolated: everything passes, nothing is logged.
    node.pod(0);
    assert_eq!(node.connect(PEER, 40000, 80), TC_ACT_OK);
    assert!(node.flows.drain().is_empty());

    node.pod(EP_EGRESS_ISOLATED);
    node.allow(DIR_EGRESS, PEER_ID, TCP, 80, 16, 7);
    node.allow(DIR_EGRESS, PEER_ID, TCP, 8000, 13, 8); // 8000–8007
    assert_eq!(node.connect(PEER, 40001, 80), TC_ACT_OK);
    assert_eq!(node.connect(PEER, 40002, 81), TC_ACT_SHOT);
    assert_eq!(node.connect(PEER, 40003, 8005), TC_ACT_OK);
    assert_eq!(node.connect(PEER, 40004, 8008), TC_ACT_SHOT);
    // Another peer (not in the ipcache: the world) gets nothing.
    assert_eq!(node.connect([192, 0, 2, 1], 40005, 80), TC_ACT_SHOT);
    assert_eq!(node.denied(Hook::FromPod), 3);

    // Every decision is logged once, with the deciding policy.
    let ev = node.flows.drain();
    let got: Vec<(u16, u8, u32)> = ev.iter().map(|e| (e.dport, e.verdict, e.policy)).collect();
    assert_eq!(
        got,
        [
            (80, VERDICT_ALLOWED, 7),
            (81, VERDICT_DROPPED, 0),
            (8005, VERDICT_ALLOWED, 8),
            (8008, VERDICT_DROPPED, 0),
            (80, VERDICT_DROPPED, 0),
        ]
    );
    assert!(
        ev.iter()
            .all(|e| e.endpoint == 1 && e.direction == DIR_EGRESS)
    );
    assert_eq!(ev[0].peer_identity, PEER_ID);
    assert_eq!(ev[0].hook, Hook::FromPod as u8);

    // Later packets of an allowed connection are not decided again.
    let data = packets::tcp(POD, PEER, 40001, 80, packets::ACK, 2, 1, b"x");
    assert_eq!(
        node.from_pod.test_run(&data).expect("run").verdict,
        TC_ACT_OK
    );
    assert!(node.flows.drain().is_empty());
}

#[test]
fn ingress_denies_new_connections_but_not_replies_and_lets_the_node_in() {
    if !privileged("ingress_denies_new_connections_but_not_replies_and_lets_the_node_in") {
        return;
    }
    let mut node = Node::new();
    node.pod(EP_INGRESS_ISOLATED | EP_EGRESS_ISOLATED);
    node.allow(DIR_EGRESS, PEER_ID, TCP, 80, 16, 7);
    node.allow(DIR_INGRESS, IDENTITY_ANY, TCP, 8080, 16, 9);
    // A new connection in: only to 8080.
    assert_eq!(node.accept(PEER, 50000, 9000), TC_ACT_SHOT);
    assert_eq!(node.accept(PEER, 50001, 8080), TC_ACT_OK);
    // The pod's own connection out, then the reply in: allowed as part of it.
    assert_eq!(node.connect(PEER, 40001, 80), TC_ACT_OK);
    let reply = packets::tcp(PEER, POD, 80, 40001, SYN_ACK, 9, 2, b"");
    assert_eq!(
        node.to_pod.test_run(&reply).expect("run").verdict,
        TC_ACT_OK
    );
    // The node itself (kubelet probes) is always let in.
    let node_ip: Ipv4Addr = [10, 0, 0, 1].into();
    node.maps
        .set_identity(node_ip, 32, IDENTITY_HOST)
        .expect("host");
    assert_eq!(node.accept(node_ip.octets(), 50002, 9000), TC_ACT_OK);
    assert_eq!(node.denied(Hook::ToPod), 1);
    let dropped: Vec<_> = node
        .flows
        .drain()
        .into_iter()
        .filter(|e| e.verdict == VERDICT_DROPPED)
        .collect();
    assert_eq!(dropped.len(), 1);
    assert_eq!(
        (dropped[0].direction, dropped[0].dport),
        (DIR_INGRESS, 9000)
    );
}

#[test]
fn ip_blocks_decide_by_the_longest_prefix_and_audit_mode_only_logs() {
    if !privileged("ip_blocks_decide_by_the_longest_prefix_and_audit_mode_only_logs") {
        return;
    }
    let mut node = Node::new();
    node.pod(EP_EGRESS_ISOLATED);
    // ipBlock 203.0.113.0/24 except 203.0.113.128/25, port 443.
    let (block, except) = (IDENTITY_CIDR_FIRST, IDENTITY_CIDR_FIRST + 1);
    node.maps
        .set_cidr([203, 0, 113, 0].into(), 24, block)
        .expect("cidr");
    node.maps
        .set_cidr([203, 0, 113, 128].into(), 25, except)
        .expect("except");
    node.allow(DIR_EGRESS, block, TCP, 443, 16, 5);
    assert_eq!(node.connect([203, 0, 113, 9], 40001, 443), TC_ACT_OK);
    assert_eq!(node.connect([203, 0, 113, 200], 40002, 443), TC_ACT_SHOT);
    assert_eq!(node.connect([203, 0, 113, 9], 40003, 80), TC_ACT_SHOT);
    let ev = node.flows.drain();
    assert_eq!(
        (ev[0].verdict, ev[0].peer_identity),
        (VERDICT_ALLOWED, block)
    );

    // Audit: would-be drops pass and are logged as such.
    node.pod(EP_EGRESS_ISOLATED | EP_AUDIT);
    assert_eq!(node.connect([198, 51, 100, 1], 40004, 22), TC_ACT_OK);
    let ev = node.flows.drain();
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].verdict, VERDICT_AUDIT);
}

#[test]
fn a_service_reply_reaches_an_isolated_client_on_the_same_node() {
    if !privileged("a_service_reply_reaches_an_isolated_client_on_the_same_node") {
        return;
    }
    use skiff_datapath::lb::LbMaps;
    use skiff_ebpf_common::lb::{Backend, SCOPE_EXTERNAL, ServiceKey, ServiceValue};
    const VIP: [u8; 4] = [10, 96, 0, 20];
    const BACKEND: [u8; 4] = [10, 244, 1, 5];
    let mut node = Node::new();
    // The client is isolated both ways and may open connections to the backend's identity.
    node.pod(EP_INGRESS_ISOLATED | EP_EGRESS_ISOLATED);
    node.maps
        .set_identity(BACKEND.into(), 32, PEER_ID)
        .expect("ipcache");
    node.allow(DIR_EGRESS, PEER_ID, TCP, 8080, 16, 7);
    // The backend is a pod of this node too (not isolated), behind VIP:80.
    node.endpoints
        .set(
            BACKEND.into(),
            EndpointInfo {
                ifindex: 0,
                flags: 0,
                mac: [2, 0, 0, 0, 0, 5],
                node_mac: [2, 0, 0, 0, 0, 2],
            },
        )
        .expect("backend endpoint");
    let mut lb = LbMaps::open(&node.pins_dir).expect("service maps");
    let key = |slot| {
        ServiceKey::new(
            u32::from_ne_bytes(VIP),
            80u16.to_be(),
            TCP,
            SCOPE_EXTERNAL,
            slot,
        )
    };
    let backend = Backend {
        address: u32::from_ne_bytes(BACKEND),
        port: 8080u16.to_be(),
        proto: TCP,
        flags: 0,
    };
    lb.set_backend(1, backend).expect("backend");
    let slot = ServiceValue {
        backend_id: 1,
        ..ServiceValue::default()
    };
    lb.set_service(key(1), slot).expect("slot");
    let frontend = ServiceValue {
        service_id: 1,
        count: 1,
        ..ServiceValue::default()
    };
    lb.set_service(key(0), frontend).expect("frontend");

    // Out through the Service: allowed (to the backend), delivered to it.
    let syn = packets::tcp(POD, VIP, 40000, 80, SYN, 1, 0, b"");
    assert_eq!(
        node.from_pod.test_run(&syn).expect("run").verdict,
        TC_ACT_REDIRECT
    );
    // The backend's reply leaves its interface; its source becomes the Service again and it
    // is delivered to the client: part of the client's connection, not a new one.
    let reply = packets::tcp(BACKEND, POD, 8080, 40000, SYN_ACK, 9, 2, b"");
    assert_eq!(
        node.from_pod.test_run(&reply).expect("run").verdict,
        TC_ACT_REDIRECT
    );
    assert_eq!(node.denied(Hook::FromPod), 0);
    let dropped = node
        .flows
        .drain()
        .into_iter()
        .filter(|e| e.verdict == VERDICT_DROPPED)
        .count();
    assert_eq!(dropped, 0);
}

#[test]
fn icmp_and_sctp_meet_policy_too() {
    if !privileged("icmp_and_sctp_meet_policy_too") {
        return;
    }
    const ICMP: u8 = 1;
    const SCTP: u8 = 132;
    let mut node = Node::new();
    node.pod(EP_INGRESS_ISOLATED | EP_EGRESS_ISOLATED);
    // TCP port rules: no ICMP, no SCTP.
    node.allow(DIR_INGRESS, PEER_ID, TCP, 80, 16, 7);
    node.allow(DIR_EGRESS, PEER_ID, TCP, 80, 16, 7);
    let ping_in = packets::icmp_echo(PEER, POD, 77, 1, false);
    let ping_out = packets::icmp_echo(POD, PEER, 78, 1, false);
    let run = |prog: &LoadedProgram, f: &[u8]| prog.test_run(f).expect("run").verdict;
    assert_eq!(run(&node.to_pod, &ping_in), TC_ACT_SHOT);
    assert_eq!(run(&node.from_pod, &ping_out), TC_ACT_SHOT);
    let sctp_in = packets::sctp(PEER, POD, 5000, 3868);
    assert_eq!(run(&node.to_pod, &sctp_in), TC_ACT_SHOT);
    let ev = node.flows.drain();
    let got: Vec<(u8, u8, u8)> = ev
        .iter()
        .map(|e| (e.proto, e.direction, e.verdict))
        .collect();
    assert_eq!(
        got,
        [
            (ICMP, DIR_INGRESS, VERDICT_DROPPED),
            (ICMP, DIR_EGRESS, VERDICT_DROPPED),
            (SCTP, DIR_INGRESS, VERDICT_DROPPED),
        ]
    );
    assert_eq!(ev[2].dport, 3868);

    // A rule with no ports allows every protocol of that peer: the ping passes, and the
    // reply to it (the identifier names the exchange) is not a new flow.
    node.allow(DIR_INGRESS, PEER_ID, 0, 0, 0, 9);
    assert_eq!(run(&node.to_pod, &ping_in), TC_ACT_OK);
    let pong = packets::icmp_echo(POD, PEER, 77, 1, true);
    assert_eq!(run(&node.from_pod, &pong), TC_ACT_OK);
    // An SCTP rule by port.
    node.allow(DIR_EGRESS, PEER_ID, SCTP, 3868, 16, 8);
    let sctp_out = packets::sctp(POD, PEER, 5001, 3868);
    assert_eq!(run(&node.from_pod, &sctp_out), TC_ACT_OK);
    let sctp_other = packets::sctp(POD, PEER, 5002, 3869);
    assert_eq!(run(&node.from_pod, &sctp_other), TC_ACT_SHOT);
    let got: Vec<(u8, u8, u32)> = node
        .flows
        .drain()
        .iter()
        .map(|e| (e.proto, e.verdict, e.policy))
        .collect();
    assert_eq!(
        got,
        [
            (ICMP, VERDICT_ALLOWED, 9),
            (SCTP, VERDICT_ALLOWED, 8),
            (SCTP, VERDICT_DROPPED, 0),
        ]
    );
    // A later fragment without its allowed first fragment: dropped.
    let mut fragment = packets::udp(PEER, POD, 5003, 9999, b"rest of a datagram");
    packets::fragment(&mut fragment, 4242, 1);
    assert_eq!(run(&node.to_pod, &fragment), TC_ACT_SHOT);
    assert!(node.flows.drain().is_empty());
    // ICMP to a pod that is not isolated passes unlogged.
    node.pod(0);
    assert_eq!(run(&node.to_pod, &ping_in), TC_ACT_OK);
    assert!(node.flows.drain().is_empty());
}

#[test]
fn fragments_follow_their_first_fragment_and_icmp_errors_their_connection() {
    if !privileged("fragments_follow_their_first_fragment_and_icmp_errors_their_connection") {
        return;
    }
    const UDP: u8 = 17;
    let mut node = Node::new();
    node.pod(EP_INGRESS_ISOLATED | EP_EGRESS_ISOLATED);
    node.allow(DIR_INGRESS, PEER_ID, UDP, 53, 16, 7);
    node.allow(DIR_EGRESS, PEER_ID, TCP, 80, 16, 8);
    let run = |prog: &LoadedProgram, f: &[u8]| prog.test_run(f).expect("run").verdict;
    // A datagram in two fragments: the first (its UDP length is the whole datagram's, past
    // this packet) is judged and allowed; the later one follows it; one of another datagram
    // does not.
    let mut first = packets::udp(PEER, POD, 5000, 53, &[7; 64]);
    packets::fragment(&mut first, 77, 0);
    let udp_len = packets::ETH_LEN + 20 + 4;
    first[udp_len..udp_len + 2].copy_from_slice(&1500u16.to_be_bytes());
    assert_eq!(run(&node.to_pod, &first), TC_ACT_OK, "first fragment");
    let mut later = packets::udp(PEER, POD, 0, 0, &[7; 64]);
    packets::fragment(&mut later, 77, 9);
    assert_eq!(run(&node.to_pod, &later), TC_ACT_OK, "its later fragment");
    let mut stray = later.clone();
    packets::fragment(&mut stray, 78, 9);
    assert_eq!(run(&node.to_pod, &stray), TC_ACT_SHOT, "another datagram's");
    // A first fragment policy refuses (another port): its later fragments are refused too.
    let mut refused = packets::udp(PEER, POD, 5000, 54, &[7; 64]);
    packets::fragment(&mut refused, 79, 0);
    assert_eq!(run(&node.to_pod, &refused), TC_ACT_SHOT);
    let mut refused_later = later.clone();
    packets::fragment(&mut refused_later, 79, 9);
    assert_eq!(run(&node.to_pod, &refused_later), TC_ACT_SHOT);

    // The pod's connection out, then a router's "host unreachable" about it: related, in.
    assert_eq!(node.connect(PEER, 40000, 80), TC_ACT_OK);
    let sent = packets::tcp(POD, PEER, 40000, 80, SYN, 1, 0, b"");
    let quoted = &sent[packets::ETH_LEN..packets::ETH_LEN + 28];
    let router = [192, 0, 2, 1];
    let error = packets::icmp_unreachable(router, POD, quoted);
    assert_eq!(run(&node.to_pod, &error), TC_ACT_OK, "about its connection");
    // One quoting a connection the pod never had: judged as new ICMP, refused.
    let other = packets::tcp(POD, PEER, 40001, 80, SYN, 1, 0, b"");
    let error =
        packets::icmp_unreachable(router, POD, &other[packets::ETH_LEN..packets::ETH_LEN + 28]);
    assert_eq!(
        run(&node.to_pod, &error),
        TC_ACT_SHOT,
        "about no connection"
    );
    // Out the other way: the pod reporting an error about a connection it accepted.
    let accepted = packets::udp(PEER, POD, 5001, 53, b"q");
    assert_eq!(run(&node.to_pod, &accepted), TC_ACT_OK);
    let error = packets::icmp_unreachable(
        POD,
        PEER,
        &accepted[packets::ETH_LEN..packets::ETH_LEN + 28],
    );
    assert_eq!(
        run(&node.from_pod, &error),
        TC_ACT_OK,
        "the pod's error about it"
    );
}

#[test]
fn a_pod_cannot_send_with_another_source_address() {
    if !privileged("a_pod_cannot_send_with_another_source_address") {
        return;
    }
    let mut node = Node::new();
    node.pod(0);
    // BPF_PROG_RUN runs TC programs as if on the loopback interface (index 1): record it as
    // the pod's interface.
    node.endpoints.set_iface(1, POD.into()).expect("iface");
    assert_eq!(node.connect(PEER, 40000, 80), TC_ACT_OK, "its own address");
    let spoofed = packets::tcp(PEER, [10, 244, 1, 11], 40000, 80, SYN, 1, 0, b"");
    assert_eq!(
        node.from_pod.test_run(&spoofed).expect("run").verdict,
        TC_ACT_SHOT,
        "another's"
    );
    let rows = metrics::read(&node.pins_dir).expect("metrics");
    assert_eq!(
        metrics::packets(
            &rows,
            Hook::FromPod,
            Verdict::Dropped(DropReason::SourceNotPod)
        ),
        1
    );
}

#[test]
fn a_services_rejection_reaches_an_ingress_isolated_client() {
    if !privileged("a_services_rejection_reaches_an_ingress_isolated_client") {
        return;
    }
    use skiff_datapath::lb::LbMaps;
    use skiff_ebpf_common::lb::{SCOPE_EXTERNAL, ServiceKey, ServiceValue};
    const VIP: [u8; 4] = [10, 96, 0, 30];
    const UDP: u8 = 17;
    let mut node = Node::new();
    // The client may receive nothing new; its Services have no endpoint.
    node.pod(EP_INGRESS_ISOLATED);
    let mut lb = LbMaps::open(&node.pins_dir).expect("service maps");
    for (id, port, proto) in [(1u32, 80u16, TCP), (2, 53, UDP)] {
        let key = ServiceKey::new(
            u32::from_ne_bytes(VIP),
            port.to_be(),
            proto,
            SCOPE_EXTERNAL,
            0,
        );
        let frontend = ServiceValue {
            service_id: id,
            count: 0,
            ..ServiceValue::default()
        };
        lb.set_service(key, frontend).expect("frontend");
    }
    // The rejections (RST; ICMP port unreachable quoting the query) come back through
    // `to-pod` and are let in: answers to the client's own attempts.
    let syn = packets::tcp(POD, VIP, 40000, 80, SYN, 1, 0, b"");
    let query = packets::udp(POD, VIP, 40001, 53, b"q");
    for (what, frame) in [("RST", syn), ("ICMP port unreachable", query)] {
        let out = node.from_pod.test_run(&frame).expect("run");
        assert_eq!(out.verdict, TC_ACT_REDIRECT, "{what} sent back");
        let back = node.to_pod.test_run(&out.packet).expect("run");
        assert_eq!(back.verdict, TC_ACT_OK, "{what} let in");
    }
    assert_eq!(node.denied(Hook::ToPod), 0);
    // Unasked, the same messages are refused.
    let stray_rst = packets::tcp(VIP, POD, 80, 40002, packets::ACK, 1, 1, b"");
    assert_eq!(
        node.to_pod.test_run(&stray_rst).expect("run").verdict,
        TC_ACT_SHOT
    );
}
