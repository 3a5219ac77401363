//! BPF_PROG_RUN tests of service load balancing: frames built in the test run through the real
//! `from-pod` and `to-pod` programs with real (pinned) maps; each test checks the verdict, the
//! rewritten frame (addresses, ports, checksums) and the maps.

use std::collections::BTreeSet;

use skiff_datapath::{
    LoadedProgram, ProgramKind,
    endpoints::EndpointMap,
    lb::{LbMaps, ct_entries},
    metrics::{self, Verdict},
};
use skiff_ebpf_common::{
    DropReason, Hook,
    ct::{CT_CLOSING, CT_FIN, CT_REPLY},
    endpoint::EndpointInfo,
    lb::{
        BE_LOCAL, BE_TERMINATING, Backend, CFG_XDP_FAST_PATH, HAIRPIN_ADDR, LbConfig, NAT_PORT_MAX,
        NAT_PORT_MIN, SCOPE_EXTERNAL, SVC_NODEPORT, ServiceKey, ServiceValue,
    },
};
use skiff_tests::{
    TestPins,
    node::NodeNs,
    packets::{self, ACK, FIN_ACK, SYN, decode},
    privileged,
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_REDIRECT: u32 = 7;
const TCP: u8 = 6;
const UDP: u8 = 17;

const VIP: [u8; 4] = [10, 96, 0, 20];
const CLIENT: [u8; 4] = [10, 244, 1, 10];
const BACKENDS: [[u8; 4]; 2] = [[10, 244, 1, 5], [10, 244, 2, 6]];

/// The two TC programs of one node, sharing its pinned maps.
struct Node {
    _pins: TestPins,
    from_pod: LoadedProgram,
    to_pod: LoadedProgram,
    maps: LbMaps,
    pins_dir: skiff_datapath::PinDir,
}

impl Node {
    fn new() -> Node {
        let pins = TestPins::new();
        let from_pod =
            LoadedProgram::load(ProgramKind::FromPod, pins.dir()).expect("load from-pod");
        let to_pod = LoadedProgram::load(ProgramKind::ToPod, pins.dir()).expect("load to-pod");
        let maps = LbMaps::open(pins.dir()).expect("open service maps");
        let pins_dir = pins.dir().clone();
        Node {
            _pins: pins,
            from_pod,
            to_pod,
            maps,
            pins_dir,
        }
    }

    /// Programs frontend `(addr, port, proto)` (service id `id`, `SVC_*` `flags`) with
    /// `backends` (address, port, `BE_*` flags), ready ones first, then those with
    /// `BE_TERMINATING`.
    fn frontend(
        &mut self,
        id: u32,
        (addr, port, proto): ([u8; 4], u16, u8),
        flags: u16,
        backends: &[([u8; 4], u16, u8)],
        affinity_timeout: u32,
    ) {
        let key = |slot| {
            ServiceKey::new(
                u32::from_ne_bytes(addr),
                port.to_be(),
                proto,
                SCOPE_EXTERNAL,
                slot,
            )
        };
        let terminating = backends
            .iter()
            .filter(|b| b.2 & BE_TERMINATING != 0)
            .count() as u16;
        for (i, (baddr, bport, bflags)) in backends.iter().enumerate() {
            let be_id = id * 100 + i as u32 + 1;
            self.maps
                .set_backend(
                    be_id,
                    Backend {
                        address: u32::from_ne_bytes(*baddr),
                        port: bport.to_be(),
                        proto,
                        flags: *bflags,
                    },
                )
                .expect("backend");
            self.maps
                .set_service(
                    key(i as u16 + 1),
                    ServiceValue {
                        backend_id: be_id,
                        ..ServiceValue::default()
                    },
                )
                .expect("slot");
        }
        self.maps
            .set_service(
                key(0),
                ServiceValue {
                    service_id: id,
                    affinity_timeout,
                    count: backends.len() as u16 - terminating,
                    terminating,
                    flags,
                    ..ServiceValue::default()
                },
            )
            .expect("frontend");
    }

    /// A ClusterIP frontend `vip:port/proto` with `backends` (address, port, terminating).
    fn service(
        &mut self,
        id: u32,
        vip: [u8; 4],
        port: u16,
        proto: u8,
        backends: &[([u8; 4], u16, bool)],
        affinity_timeout: u32,
    ) {
        let backends: Vec<([u8; 4], u16, u8)> = backends
            .iter()
            .map(|(a, p, t)| (*a, *p, if *t { BE_TERMINATING } else { 0 }))
            .collect();
        self.frontend(id, (vip, port, proto), 0, &backends, affinity_timeout);
    }

    fn pins_dir(&self) -> &skiff_datapath::PinDir {
        &self.pins_dir
    }

    fn drops(&self, hook: Hook, reason: DropReason) -> u64 {
        let rows = metrics::read(&self.pins_dir).expect("metrics");
        metrics::packets(&rows, hook, Verdict::Dropped(reason))
    }
}

fn syn(sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
    packets::tcp(CLIENT, dst, sport, dport, SYN, 1000, 0, b"")
}

#[test]
fn new_connection_is_dnated_to_a_backend_with_valid_checksums() {
    if !privileged("new_connection_is_dnated_to_a_backend_with_valid_checksums") {
        return;
    }
    let mut node = Node::new();
    node.service(
        1,
        VIP,
        80,
        TCP,
        &[(BACKENDS[0], 8080, false), (BACKENDS[1], 8080, false)],
        0,
    );

    let out = node.from_pod.test_run(&syn(40000, VIP, 80)).expect("run");
    assert_eq!(out.verdict, TC_ACT_OK);
    let d = decode(&out.packet);
    assert!(
        BACKENDS.contains(&d.dst),
        "sent to a backend, got {:?}",
        d.dst
    );
    assert_eq!((d.src, d.sport, d.dport), (CLIENT, 40000, 8080));
    assert!(d.ip_checksum_ok, "IPv4 checksum after DNAT");
    assert!(d.l4_checksum_ok, "TCP checksum after DNAT");

    // Both directions are tracked.
    let ct = ct_entries(&node.pins_dir).expect("ct");
    assert_eq!(ct.len(), 2, "{ct:?}");
    let reply = ct
        .iter()
        .find(|(_, e)| e.flags & CT_REPLY != 0)
        .expect("reply entry");
    assert_eq!(reply.0.saddr, u32::from_ne_bytes(d.dst));
    assert_eq!(reply.1.from_addr, u32::from_ne_bytes(VIP));

    // UDP, with a payload and a real checksum.
    node.service(2, VIP, 53, UDP, &[(BACKENDS[1], 5353, false)], 0);
    let q = packets::udp(CLIENT, VIP, 41000, 53, b"a query");
    let out = node.from_pod.test_run(&q).expect("run");
    let d = decode(&out.packet);
    assert_eq!((d.dst, d.dport), (BACKENDS[1], 5353));
    assert!(
        d.ip_checksum_ok && d.l4_checksum_ok,
        "UDP checksums after DNAT"
    );
    assert_eq!(d.payload, b"a query");
    assert!(node.maps.stats(1).expect("stats").packets >= 1);

    // bpftool reads the pinned maps with their field names (BTF).
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(node.pins_dir.map_path("skiff_lb_svc"))
        .output()
        .expect("bpftool");
    let dump: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    // `-j` keeps the raw bytes in `key`/`value` and the BTF-decoded fields in `formatted`.
    let first = &dump[0]["formatted"];
    for field in ["address", "port", "slot", "proto", "scope"] {
        assert!(!first["key"][field].is_null(), "key field {field}: {first}");
    }
    for field in ["backend_id", "service_id", "count", "terminating", "flags"] {
        assert!(
            !first["value"][field].is_null(),
            "value field {field}: {first}"
        );
    }
}

#[test]
fn replies_get_the_frontend_back_as_source() {
    if !privileged("replies_get_the_frontend_back_as_source") {
        return;
    }
    let mut node = Node::new();
    node.service(1, VIP, 80, TCP, &[(BACKENDS[1], 8080, false)], 0);
    node.from_pod.test_run(&syn(40001, VIP, 80)).expect("run");

    // A reply from a backend on another node meets to-pod on the client's veth.
    let synack = packets::tcp(
        BACKENDS[1],
        CLIENT,
        8080,
        40001,
        packets::Flags {
            syn: true,
            ack: true,
            ..Default::default()
        },
        5000,
        1001,
        b"",
    );
    let out = node.to_pod.test_run(&synack).expect("run");
    assert_eq!(out.verdict, TC_ACT_OK);
    let d = decode(&out.packet);
    assert_eq!((d.src, d.sport, d.dst, d.dport), (VIP, 80, CLIENT, 40001));
    assert!(
        d.ip_checksum_ok && d.l4_checksum_ok,
        "checksums after reverse NAT"
    );

    // A reply from a local backend meets from-pod on the backend's veth first: same result.
    let out = node.from_pod.test_run(&synack).expect("run");
    let d = decode(&out.packet);
    assert_eq!((d.src, d.sport), (VIP, 80));
    assert!(d.ip_checksum_ok && d.l4_checksum_ok);

    // Traffic that is no reply passes untouched.
    let other = packets::tcp(BACKENDS[0], CLIENT, 8080, 40001, ACK, 1, 1, b"x");
    let out = node.to_pod.test_run(&other).expect("run");
    assert_eq!(out.packet, other);
}

#[test]
fn established_flows_keep_their_backend_and_new_ones_spread() {
    if !privileged("established_flows_keep_their_backend_and_new_ones_spread") {
        return;
    }
    let mut node = Node::new();
    node.service(
        1,
        VIP,
        80,
        TCP,
        &[(BACKENDS[0], 8080, false), (BACKENDS[1], 8080, false)],
        0,
    );
    let first = decode(
        &node
            .from_pod
            .test_run(&syn(40002, VIP, 80))
            .expect("run")
            .packet,
    )
    .dst;
    let data = packets::tcp(
        CLIENT,
        VIP,
        40002,
        80,
        ACK,
        1001,
        1,
        b"GET / HTTP/1.0\r\n\r\n",
    );
    for _ in 0..20 {
        let d = decode(&node.from_pod.test_run(&data).expect("run").packet);
        assert_eq!(d.dst, first, "an established flow stays on its backend");
        assert!(d.l4_checksum_ok, "checksum with payload");
    }
    let mut seen = BTreeSet::new();
    for sport in 41000..41040 {
        seen.insert(
            decode(
                &node
                    .from_pod
                    .test_run(&syn(sport, VIP, 80))
                    .expect("run")
                    .packet,
            )
            .dst,
        );
    }
    assert_eq!(
        seen.len(),
        2,
        "40 new connections use both backends: {seen:?}"
    );

    // A FIN from the client half-closes: the backend may still send, the flow stays tracked.
    let flags_of = |node: &Node, fwd: bool| {
        let ct = ct_entries(&node.pins_dir).expect("ct");
        ct.iter()
            .find(|(k, _)| {
                if fwd {
                    k.sport == 40002u16.to_be() && k.daddr == u32::from_ne_bytes(VIP)
                } else {
                    k.dport == 40002u16.to_be() && k.saddr == u32::from_ne_bytes(first)
                }
            })
            .map(|(_, e)| e.flags)
            .expect("entry")
    };
    let fin = packets::tcp(CLIENT, VIP, 40002, 80, FIN_ACK, 1020, 1, b"");
    node.from_pod.test_run(&fin).expect("run");
    assert_eq!(
        flags_of(&node, true) & CT_CLOSING,
        0,
        "half-closed, not closing"
    );
    assert_ne!(flags_of(&node, true) & CT_FIN, 0);
    let late = packets::tcp(first, CLIENT, 8080, 40002, ACK, 1, 1021, b"more data");
    let d = decode(&node.to_pod.test_run(&late).expect("run").packet);
    assert_eq!(
        (d.src, d.sport),
        (VIP, 80),
        "the backend's data still translated"
    );
    // The backend's FIN closes both directions; a new SYN on the tuple then starts over.
    let fin_back = packets::tcp(first, CLIENT, 8080, 40002, FIN_ACK, 10, 1021, b"");
    node.to_pod.test_run(&fin_back).expect("run");
    assert_ne!(
        flags_of(&node, true) & CT_CLOSING,
        0,
        "closing after both FINs"
    );
    assert_ne!(flags_of(&node, false) & CT_CLOSING, 0);
    let again = node.from_pod.test_run(&syn(40002, VIP, 80)).expect("run");
    assert_eq!(again.verdict, TC_ACT_OK);
    assert_eq!(
        flags_of(&node, true) & CT_CLOSING,
        0,
        "a fresh forward entry"
    );

    // A removed backend: a tracked UDP flow to it chooses again.
    node.service(2, VIP, 53, UDP, &[(BACKENDS[0], 53, false)], 0);
    let q = packets::udp(CLIENT, VIP, 45000, 53, b"q");
    assert_eq!(
        decode(&node.from_pod.test_run(&q).expect("run").packet).dst,
        BACKENDS[0]
    );
    // (The helper reuses the id for the new endpoint: the entry's backend id now names another
    // address, as a removed id would name none.)
    node.service(2, VIP, 53, UDP, &[(BACKENDS[1], 53, false)], 0);
    assert_eq!(
        decode(&node.from_pod.test_run(&q).expect("run").packet).dst,
        BACKENDS[1],
        "a UDP flow follows its Service off a removed backend"
    );
}

#[test]
fn client_ip_affinity_sticks_to_one_backend() {
    if !privileged("client_ip_affinity_sticks_to_one_backend") {
        return;
    }
    let mut node = Node::new();
    node.service(
        3,
        VIP,
        80,
        TCP,
        &[(BACKENDS[0], 8080, false), (BACKENDS[1], 8080, false)],
        10800,
    );
    let mut seen = BTreeSet::new();
    for sport in 42000..42030 {
        seen.insert(
            decode(
                &node
                    .from_pod
                    .test_run(&syn(sport, VIP, 80))
                    .expect("run")
                    .packet,
            )
            .dst,
        );
    }
    assert_eq!(
        seen.len(),
        1,
        "30 connections from one client, one backend: {seen:?}"
    );
    let aff = node.maps.affinity().expect("affinity");
    assert_eq!(aff.len(), 1);
    assert_eq!(aff[0].0.client, u32::from_ne_bytes(CLIENT));

    // Without affinity the same client spreads.
    node.service(
        4,
        VIP,
        81,
        TCP,
        &[(BACKENDS[0], 8080, false), (BACKENDS[1], 8080, false)],
        0,
    );
    let mut seen = BTreeSet::new();
    for sport in 43000..43030 {
        seen.insert(
            decode(
                &node
                    .from_pod
                    .test_run(&syn(sport, VIP, 81))
                    .expect("run")
                    .packet,
            )
            .dst,
        );
    }
    assert_eq!(seen.len(), 2);
}

#[test]
fn no_endpoint_rejects_tcp_with_rst_and_udp_with_icmp() {
    if !privileged("no_endpoint_rejects_tcp_with_rst_and_udp_with_icmp") {
        return;
    }
    let mut node = Node::new();
    node.service(5, VIP, 80, TCP, &[], 0);
    node.service(6, VIP, 53, UDP, &[], 0);

    let out = node.from_pod.test_run(&syn(40003, VIP, 80)).expect("run");
    assert_eq!(out.verdict, TC_ACT_REDIRECT, "sent back to the pod");
    let d = decode(&out.packet);
    assert_eq!((d.src, d.sport, d.dst, d.dport), (VIP, 80, CLIENT, 40003));
    assert_eq!(d.tcp_flags, (false, true, false, true), "RST|ACK");
    assert_eq!(d.ack, 1001, "acknowledges the SYN");
    assert_eq!((d.src_mac, d.dst_mac), (packets::DST_MAC, packets::SRC_MAC));
    assert!(d.ip_checksum_ok && d.l4_checksum_ok, "RST checksums");

    let q = packets::udp(CLIENT, VIP, 41001, 53, b"query");
    let out = node.from_pod.test_run(&q).expect("run");
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    let d = decode(&out.packet);
    assert_eq!((d.src, d.dst, d.proto), (VIP, CLIENT, 1));
    assert_eq!(
        d.icmp,
        Some(packets::Icmp {
            icmp_type: 3,
            code: 3,
            quoted_src: CLIENT,
            quoted_dst: VIP,
            quoted_proto: UDP,
            quoted_sport: 41001,
            quoted_dport: 53,
        }),
        "port unreachable quoting the query"
    );
    assert!(d.ip_checksum_ok && d.l4_checksum_ok, "ICMP checksums");

    assert_eq!(node.drops(Hook::FromPod, DropReason::ServiceNoBackend), 2);
    assert!(
        ct_entries(&node.pins_dir).expect("ct").is_empty(),
        "nothing tracked"
    );
}

#[test]
fn terminating_endpoints_are_a_fallback_only() {
    if !privileged("terminating_endpoints_are_a_fallback_only") {
        return;
    }
    let mut node = Node::new();
    // One ready, one terminating: new connections go to the ready one.
    node.service(
        7,
        VIP,
        80,
        TCP,
        &[(BACKENDS[0], 8080, false), (BACKENDS[1], 8080, true)],
        0,
    );
    for sport in 44000..44020 {
        let d = decode(
            &node
                .from_pod
                .test_run(&syn(sport, VIP, 80))
                .expect("run")
                .packet,
        );
        assert_eq!(d.dst, BACKENDS[0]);
    }
    // Only terminating left: they still serve rather than the service going dark.
    node.maps
        .remove_service(&ServiceKey::new(
            u32::from_ne_bytes(VIP),
            80u16.to_be(),
            TCP,
            SCOPE_EXTERNAL,
            2,
        ))
        .expect("remove");
    node.service(7, VIP, 80, TCP, &[(BACKENDS[1], 8080, true)], 0);
    let d = decode(
        &node
            .from_pod
            .test_run(&syn(44100, VIP, 80))
            .expect("run")
            .packet,
    );
    assert_eq!(d.dst, BACKENDS[1]);
}

#[test]
fn a_pod_reaches_itself_through_its_service() {
    if !privileged("a_pod_reaches_itself_through_its_service") {
        return;
    }
    let mut node = Node::new();
    node.service(8, VIP, 80, TCP, &[(CLIENT, 8080, false)], 0);
    let out = node.from_pod.test_run(&syn(40004, VIP, 80)).expect("run");
    assert_eq!(
        out.verdict, TC_ACT_REDIRECT,
        "hairpin goes straight back to the pod"
    );
    let d = decode(&out.packet);
    assert_eq!((d.src, d.dst, d.dport), (HAIRPIN_ADDR, CLIENT, 8080));
    assert!(d.ip_checksum_ok && d.l4_checksum_ok);

    // The pod answers the hairpin address; it sees the reply come from the service.
    let synack = packets::tcp(
        CLIENT,
        HAIRPIN_ADDR,
        8080,
        40004,
        packets::Flags {
            syn: true,
            ack: true,
            ..Default::default()
        },
        7,
        1001,
        b"",
    );
    let out = node.from_pod.test_run(&synack).expect("run");
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    let d = decode(&out.packet);
    assert_eq!((d.src, d.sport, d.dst, d.dport), (VIP, 80, CLIENT, 40004));
    assert!(d.ip_checksum_ok && d.l4_checksum_ok);
}

/// A packet for a pod of this node — translated to a local backend, or addressed to the pod
/// directly, from a pod or from another node — is handed straight to that pod's interface
/// (`bpf_redirect_peer`) with the frame a router would send it: the pod's MAC as destination,
/// its gateway's as source, TTL one less, checksums right.
#[test]
fn packets_for_pods_of_this_node_are_delivered_straight_to_them() {
    if !privileged("packets_for_pods_of_this_node_are_delivered_straight_to_them") {
        return;
    }
    const POD_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x05];
    const GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];
    let mut node = Node::new();
    let netdev =
        LoadedProgram::load(ProgramKind::FromNetdev, node.pins_dir()).expect("load from-netdev");
    let mut endpoints = EndpointMap::open(node.pins_dir()).expect("endpoint map");
    endpoints
        .set(
            BACKENDS[0].into(),
            EndpointInfo {
                ifindex: 4242,
                flags: 0,
                mac: POD_MAC,
                node_mac: GW_MAC,
            },
        )
        .expect("endpoint");
    assert_eq!(endpoints.list().expect("list").len(), 1);
    node.service(1, VIP, 80, TCP, &[(BACKENDS[0], 8080, false)], 0);
    let delivered = |out: &skiff_datapath::program::RunOutcome, dst: [u8; 4]| {
        assert_eq!(out.verdict, TC_ACT_REDIRECT, "redirected to the pod");
        let d = decode(&out.packet);
        assert_eq!(
            (d.dst, d.dst_mac, d.src_mac, d.ttl),
            (dst, POD_MAC, GW_MAC, 63)
        );
        assert!(d.ip_checksum_ok && d.l4_checksum_ok);
    };

    // Through the Service, to a backend on this node.
    delivered(
        &node.from_pod.test_run(&syn(41000, VIP, 80)).expect("run"),
        BACKENDS[0],
    );
    // Pod to pod, no Service.
    delivered(
        &node
            .from_pod
            .test_run(&syn(41001, BACKENDS[0], 8080))
            .expect("run"),
        BACKENDS[0],
    );
    // From a pod on another node, arriving on the uplink.
    let remote = packets::tcp(BACKENDS[1], BACKENDS[0], 41002, 8080, SYN, 1, 0, b"");
    delivered(&netdev.test_run(&remote).expect("run"), BACKENDS[0]);

    // A pod elsewhere, and a spent TTL: left to the kernel, unchanged.
    let elsewhere = syn(41003, BACKENDS[1], 8080);
    let out = node.from_pod.test_run(&elsewhere).expect("run");
    assert_eq!((out.verdict, out.packet), (TC_ACT_OK, elsewhere));
    let mut spent = syn(41004, BACKENDS[0], 8080);
    packets::set_ttl(&mut spent, 1);
    let out = node.from_pod.test_run(&spent).expect("run");
    assert_eq!((out.verdict, out.packet), (TC_ACT_OK, spent));

    let rows = metrics::read(node.pins_dir()).expect("metrics");
    assert_eq!(
        (
            metrics::packets(&rows, Hook::FromPod, Verdict::Redirected),
            metrics::packets(&rows, Hook::FromNetdev, Verdict::Redirected),
        ),
        (2, 1),
        "counted as redirected"
    );

    // A deleted pod is no longer delivered to.
    endpoints.remove(BACKENDS[0].into()).expect("remove");
    let out = node
        .from_pod
        .test_run(&syn(41005, BACKENDS[0], 8080))
        .expect("run");
    assert_eq!(out.verdict, TC_ACT_OK);
}

#[test]
fn traffic_to_no_frontend_passes_untouched() {
    if !privileged("traffic_to_no_frontend_passes_untouched") {
        return;
    }
    let mut node = Node::new();
    node.service(9, VIP, 80, TCP, &[(BACKENDS[0], 8080, false)], 0);
    for frame in [
        syn(40005, VIP, 81),
        syn(40005, BACKENDS[1], 80),
        packets::udp(CLIENT, VIP, 1, 80, b"udp is another frontend"),
    ] {
        let out = node.from_pod.test_run(&frame).expect("run");
        assert_eq!((out.verdict, out.packet), (TC_ACT_OK, frame));
    }
    assert!(ct_entries(&node.pins_dir).expect("ct").is_empty());
}

/// NodePort from outside the cluster, on the uplink (`from-netdev`): a backend on this node is
/// only destination-translated; one on another node is also source-translated to the node's
/// address, and its reply, arriving on the uplink, is turned back into frontend → client.
#[test]
fn node_port_from_outside_translates_both_ways() {
    if !privileged("node_port_from_outside_translates_both_ways") {
        return;
    }
    const NODE: [u8; 4] = [192, 168, 77, 1];
    const OUTSIDE: [u8; 4] = [203, 0, 113, 9];
    let mut node = Node::new();
    let netdev =
        LoadedProgram::load(ProgramKind::FromNetdev, node.pins_dir()).expect("load from-netdev");
    node.maps
        .set_config(LbConfig {
            node_addr: u32::from_ne_bytes(NODE),
            flags: 0,
        })
        .expect("config");
    let np = |id, backend: [u8; 4], local: bool, node: &mut Node| {
        let flags = if local { BE_LOCAL } else { 0 };
        node.frontend(
            id,
            (NODE, 30080, TCP),
            SVC_NODEPORT,
            &[(backend, 8080, flags)],
            0,
        );
    };

    // A local backend: only the destination changes.
    np(901, BACKENDS[0], true, &mut node);
    let syn = packets::tcp(OUTSIDE, NODE, 40000, 30080, SYN, 1, 0, b"");
    let out = netdev.test_run(&syn).expect("run");
    assert_eq!(out.verdict, TC_ACT_OK);
    let d = decode(&out.packet);
    assert_eq!(
        (d.src, d.sport, d.dst, d.dport),
        (OUTSIDE, 40000, BACKENDS[0], 8080)
    );
    assert!(d.ip_checksum_ok && d.l4_checksum_ok);
    // Its reply leaves the backend pod: from-pod restores the NodePort as the source.
    let reply = packets::tcp(BACKENDS[0], OUTSIDE, 8080, 40000, ACK, 1, 2, b"hi");
    let d = decode(&node.from_pod.test_run(&reply).expect("run").packet);
    assert_eq!(
        (d.src, d.sport, d.dst, d.dport),
        (NODE, 30080, OUTSIDE, 40000)
    );
    assert!(d.ip_checksum_ok && d.l4_checksum_ok);

    // A backend on another node: source-translated to the node, reply translated back.
    np(902, BACKENDS[1], false, &mut node);
    let syn = packets::tcp(OUTSIDE, NODE, 40001, 30080, SYN, 1, 0, b"");
    let d = decode(&netdev.test_run(&syn).expect("run").packet);
    assert_eq!((d.src, d.dst, d.dport), (NODE, BACKENDS[1], 8080));
    let nat_port = d.sport;
    assert!(
        (NAT_PORT_MIN..=NAT_PORT_MAX).contains(&nat_port),
        "a NAT port above the node's own ephemeral range: {nat_port}"
    );
    assert!(d.ip_checksum_ok && d.l4_checksum_ok);
    let reply = packets::tcp(BACKENDS[1], NODE, 8080, nat_port, ACK, 1, 2, b"hi");
    let d = decode(&netdev.test_run(&reply).expect("run").packet);
    assert_eq!(
        (d.src, d.sport, d.dst, d.dport),
        (NODE, 30080, OUTSIDE, 40001)
    );
    assert!(d.ip_checksum_ok && d.l4_checksum_ok);

    // ClusterIPs are not served to the outside.
    node.service(1, VIP, 80, TCP, &[(BACKENDS[0], 8080, false)], 0);
    let to_vip = packets::tcp(OUTSIDE, VIP, 40002, 80, SYN, 1, 0, b"");
    let out = netdev.test_run(&to_vip).expect("run");
    assert_eq!((out.verdict, out.packet), (TC_ACT_OK, to_vip));
}

/// The NodePort fast path at XDP on the uplink (`xdp-uplink`), in a node namespace with a
/// real uplink, routes and neighbours: a new connection to a backend on another node is
/// translated (DNAT, SNAT to the node) and sent straight back out (`XDP_TX`) with the next
/// hop's MAC and TTL − 1; its reply is translated back and sent to the client the same way;
/// what XDP cannot finish — a local backend, no endpoint, an unresolved next hop — passes on
/// untouched and without state, and `from-netdev` at TC takes it from there.
#[test]
fn node_port_to_a_remote_backend_is_forwarded_at_xdp() {
    if !privileged("node_port_to_a_remote_backend_is_forwarded_at_xdp") {
        return;
    }
    let uplink = NodeNs::new();
    let (node_ip, gw) = (uplink.node_ip.octets(), uplink.host_ip);
    uplink
        .ns
        .run(|| xdp_fast_path(node_ip, gw))
        .expect("in the node namespace");
}

fn xdp_fast_path(node_ip: [u8; 4], gw: std::net::Ipv4Addr) {
    const XDP_PASS: u32 = 2;
    const XDP_TX: u32 = 3;
    const OUTSIDE: [u8; 4] = [203, 0, 113, 9];
    const GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
    const UNRESOLVED: [u8; 4] = [10, 244, 3, 7];
    let (ifname, ifindex) = nix::net::if_::if_nameindex()
        .expect("interfaces")
        .iter()
        .map(|i| (i.name().to_string_lossy().into_owned(), i.index()))
        .find(|(n, _)| n != "lo")
        .expect("the uplink");
    // A node forwards (the agent turns this on with its first pod); the FIB lookup of a
    // program refuses to route on an interface that does not.
    std::fs::write("/proc/sys/net/ipv4/conf/all/forwarding", "1").expect("forwarding");
    std::fs::write(format!("/proc/sys/net/ipv4/conf/{ifname}/forwarding"), "1")
        .expect("forwarding on the uplink");
    let up_mac = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(async {
            let nl = skiff_net::Netlink::connect().expect("netlink");
            nl.add_neighbour(&ifname, gw, GW_MAC).await.expect("neigh");
            for (dest, prefix, via) in [
                ([10, 244, 2, 0], 24, gw),
                ([0, 0, 0, 0], 0, gw),
                // A next hop without a neighbour entry yet.
                ([10, 244, 3, 0], 24, [10, 9, 9, 9].into()),
            ] {
                nl.add_route(dest.into(), prefix, &ifname, Some(via))
                    .await
                    .expect("route");
            }
            nl.mac(&ifname).await.expect("mac")
        });

    let mut node = Node::new();
    let xdp = LoadedProgram::load(ProgramKind::XdpUplink, node.pins_dir()).expect("load xdp");
    let netdev =
        LoadedProgram::load(ProgramKind::FromNetdev, node.pins_dir()).expect("load from-netdev");
    node.maps
        .set_config(LbConfig {
            node_addr: u32::from_ne_bytes(node_ip),
            flags: CFG_XDP_FAST_PATH,
        })
        .expect("config");
    let node_port = |node: &mut Node, port: u16, backends: &[([u8; 4], bool)]| {
        let backends: Vec<([u8; 4], u16, u8)> = backends
            .iter()
            .map(|(a, local)| (*a, 8080, if *local { BE_LOCAL } else { 0 }))
            .collect();
        node.frontend(
            u32::from(port),
            (node_ip, port, TCP),
            SVC_NODEPORT,
            &backends,
            0,
        );
    };
    let run = |frame: &[u8]| xdp.test_run_xdp(frame, ifindex).expect("run");

    // A backend on another node: translated and sent back out of the uplink.
    node_port(&mut node, 30081, &[(BACKENDS[1], false)]);
    let syn = packets::tcp(OUTSIDE, node_ip, 40000, 30081, SYN, 1, 0, b"");
    let out = run(&syn);
    assert_eq!(out.verdict, XDP_TX);
    let d = decode(&out.packet);
    assert_eq!((d.src, d.dst, d.dport), (node_ip, BACKENDS[1], 8080));
    assert!((NAT_PORT_MIN..=NAT_PORT_MAX).contains(&d.sport));
    assert_eq!((d.dst_mac, d.src_mac, d.ttl), (GW_MAC, up_mac, 63));
    assert!(d.ip_checksum_ok && d.l4_checksum_ok);
    let nat_port = d.sport;
    assert_eq!(ct_entries(node.pins_dir()).expect("ct").len(), 2);
    // The backend's reply, back on the uplink: to the client, from the NodePort.
    let reply = packets::tcp(BACKENDS[1], node_ip, 8080, nat_port, ACK, 7, 2, b"hi");
    let out = run(&reply);
    assert_eq!(out.verdict, XDP_TX);
    let d = decode(&out.packet);
    assert_eq!(
        (d.src, d.sport, d.dst, d.dport),
        (node_ip, 30081, OUTSIDE, 40000)
    );
    assert_eq!((d.dst_mac, d.ttl), (GW_MAC, 63));
    assert!(d.ip_checksum_ok && d.l4_checksum_ok);
    // The client's next segment follows the tracked flow.
    let ack = packets::tcp(OUTSIDE, node_ip, 40000, 30081, ACK, 2, 9, b"more");
    let d = decode(&run(&ack).packet);
    assert_eq!((d.sport, d.dst), (nat_port, BACKENDS[1]));
    assert!(d.ip_checksum_ok && d.l4_checksum_ok);
    let rows = metrics::read(node.pins_dir()).expect("metrics");
    assert_eq!(
        metrics::packets(&rows, Hook::XdpUplink, Verdict::Redirected),
        3
    );

    // Left to TC, untouched and without state: a local backend, no endpoint, a next hop
    // that is not resolved yet.
    node_port(&mut node, 30082, &[(BACKENDS[0], true)]);
    node_port(&mut node, 30083, &[]);
    node_port(&mut node, 30084, &[(UNRESOLVED, false)]);
    for port in [30082, 30083, 30084] {
        let syn = packets::tcp(OUTSIDE, node_ip, 40001, port, SYN, 1, 0, b"");
        let out = run(&syn);
        assert_eq!((out.verdict, &out.packet), (XDP_PASS, &syn), "port {port}");
    }
    assert_eq!(ct_entries(node.pins_dir()).expect("ct").len(), 2);
    // TC resolves the next hop itself.
    let syn = packets::tcp(OUTSIDE, node_ip, 40001, 30084, SYN, 1, 0, b"");
    let out = netdev.test_run(&syn).expect("run");
    assert_eq!(out.verdict, TC_ACT_REDIRECT, "bpf_redirect_neigh");
    let d = decode(&out.packet);
    assert_eq!((d.src, d.dst, d.ttl), (node_ip, UNRESOLVED, 63));
    assert!(d.ip_checksum_ok && d.l4_checksum_ok);

    // Without the agent's go-ahead (an uplink in generic XDP), the fast path stays off.
    node.maps
        .set_config(LbConfig {
            node_addr: u32::from_ne_bytes(node_ip),
            flags: 0,
        })
        .expect("config");
    let syn = packets::tcp(OUTSIDE, node_ip, 40009, 30081, SYN, 1, 0, b"");
    let out = run(&syn);
    assert_eq!((out.verdict, &out.packet), (XDP_PASS, &syn));
}
