//! The rules against upstream's documented semantics, case by case (the shapes of upstream's
//! netpol e2e scenarios), and the port-range decomposition against brute force.

use super::*;
use proptest::prelude::*;
use serde_json::json;

fn policy(ns: &str, name: &str, spec: serde_json::Value) -> NetworkPolicy {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }))
    .expect("policy")
}

fn subject(ns: &str, labels: &[(&str, &str)], ns_labels: &[(&str, &str)]) -> Subject {
    let m = |l: &[(&str, &str)]| {
        l.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    Subject {
        namespace: ns.into(),
        labels: m(labels),
        namespace_labels: m(ns_labels),
    }
}

/// Pods of the test world: x/a, x/b, y/a, z/c (namespace labels `ns=<name>`), as identities 1–4.
struct World {
    subjects: Vec<(u32, Subject)>,
}

impl World {
    fn new() -> World {
        let s = |id, ns: &str, app: &str| (id, subject(ns, &[("app", app)], &[("ns", ns)]));
        World {
            subjects: vec![
                s(1, "x", "a"),
                s(2, "x", "b"),
                s(3, "y", "a"),
                s(4, "z", "c"),
            ],
        }
    }

    fn universe(&self) -> Universe<'_> {
        Universe {
            identities: self.subjects.iter().map(|(id, s)| (*id, s)).collect(),
            ..Default::default()
        }
    }

    fn subject(&self, id: u32) -> &Subject {
        &self
            .subjects
            .iter()
            .find(|(i, _)| *i == id)
            .expect("subject")
            .1
    }
}

/// The identities allowed in direction `d` to/from endpoint `id` on TCP `port`.
fn allowed(w: &World, policies: &[NetworkPolicy], id: u32, d: Direction, port: u16) -> Vec<u32> {
    let ep = compute(policies, w.subject(id));
    let dir = ep.direction(d);
    let keys = entries(dir, d, &w.universe());
    w.subjects
        .iter()
        .map(|(i, _)| *i)
        .filter(|peer| allows(dir, &keys, &[*peer], PROTO_TCP, port).is_some())
        .collect()
}

#[test]
fn without_a_policy_nothing_is_isolated() {
    let w = World::new();
    assert_eq!(allowed(&w, &[], 1, Direction::Ingress, 80), [1, 2, 3, 4]);
    assert_eq!(allowed(&w, &[], 1, Direction::Egress, 80), [1, 2, 3, 4]);
}

#[test]
fn default_deny_ingress_isolates_only_its_namespace_and_direction() {
    let w = World::new();
    let p = [policy(
        "x",
        "deny",
        json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
    )];
    assert!(allowed(&w, &p, 1, Direction::Ingress, 80).is_empty());
    assert!(allowed(&w, &p, 2, Direction::Ingress, 80).is_empty());
    // Egress untouched; other namespaces untouched.
    assert_eq!(allowed(&w, &p, 1, Direction::Egress, 80), [1, 2, 3, 4]);
    assert_eq!(allowed(&w, &p, 3, Direction::Ingress, 80), [1, 2, 3, 4]);
    let ep = compute(&p, w.subject(1));
    assert_eq!(
        ep.ingress.isolating,
        [("x".to_string(), "deny".to_string())]
    );
}

#[test]
fn default_deny_egress_and_policy_types_inference() {
    let w = World::new();
    let deny = [policy(
        "x",
        "deny",
        json!({"podSelector": {}, "policyTypes": ["Egress"]}),
    )];
    assert!(allowed(&w, &deny, 1, Direction::Egress, 80).is_empty());
    assert_eq!(allowed(&w, &deny, 1, Direction::Ingress, 80), [1, 2, 3, 4]);
    // No policyTypes, an egress section: both directions.
    let both = [policy(
        "x",
        "both",
        json!({"podSelector": {}, "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "b"}}}]}]}),
    )];
    assert_eq!(policy_types(&both[0]), (true, true));
    assert!(allowed(&w, &both, 1, Direction::Ingress, 80).is_empty());
    assert_eq!(allowed(&w, &both, 1, Direction::Egress, 80), [2]);
    // No policyTypes, no egress section: ingress only.
    let ing = policy("x", "i", json!({"podSelector": {}}));
    assert_eq!(policy_types(&ing), (true, false));
}

#[test]
fn allow_from_the_same_namespace_and_from_a_namespace_by_label() {
    let w = World::new();
    let same = [policy(
        "x",
        "same-ns",
        json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}]}]}),
    )];
    assert_eq!(allowed(&w, &same, 1, Direction::Ingress, 80), [1, 2]);
    let by_label = [policy(
        "x",
        "from-y",
        json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]}),
    )];
    assert_eq!(allowed(&w, &by_label, 1, Direction::Ingress, 80), [3]);
    // An empty namespaceSelector: every namespace.
    let all_ns = [policy(
        "x",
        "any-ns",
        json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {}}]}]}),
    )];
    assert_eq!(
        allowed(&w, &all_ns, 1, Direction::Ingress, 80),
        [1, 2, 3, 4]
    );
}

#[test]
fn pod_and_namespace_selectors_in_one_peer_intersect_in_two_peers_add_up() {
    let w = World::new();
    let one_peer = [policy(
        "x",
        "and",
        json!({"podSelector": {}, "ingress": [{"from": [{
            "namespaceSelector": {"matchExpressions": [{"key": "ns", "operator": "In", "values": ["y", "z"]}]},
            "podSelector": {"matchLabels": {"app": "a"}}}]}]}),
    )];
    assert_eq!(allowed(&w, &one_peer, 1, Direction::Ingress, 80), [3]);
    let two_peers = [policy(
        "x",
        "or",
        json!({"podSelector": {}, "ingress": [{"from": [
            {"namespaceSelector": {"matchExpressions": [{"key": "ns", "operator": "In", "values": ["y", "z"]}]}},
            {"podSelector": {"matchLabels": {"app": "a"}}}]}]}),
    )];
    // y and z entirely, plus app=a in the policy's own namespace.
    assert_eq!(
        allowed(&w, &two_peers, 1, Direction::Ingress, 80),
        [1, 3, 4]
    );
}

#[test]
fn policies_add_up_and_select_only_their_pods() {
    let w = World::new();
    let p = [
        policy(
            "x",
            "a-from-b",
            json!({"podSelector": {"matchLabels": {"app": "a"}},
                   "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "b"}}}]}]}),
        ),
        policy(
            "x",
            "a-from-y",
            json!({"podSelector": {"matchLabels": {"app": "a"}},
                   "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]}),
        ),
    ];
    assert_eq!(allowed(&w, &p, 1, Direction::Ingress, 80), [2, 3]);
    // x/b is selected by neither.
    assert_eq!(allowed(&w, &p, 2, Direction::Ingress, 80), [1, 2, 3, 4]);
    // Attribution: the first policy by name that allows.
    let ep = compute(&p, w.subject(1));
    let keys = entries(&ep.ingress, Direction::Ingress, &w.universe());
    assert_eq!(
        allows(&ep.ingress, &keys, &[3], PROTO_TCP, 80),
        Some(("x".into(), "a-from-y".into()))
    );
}

#[test]
fn ports_numbers_ranges_names_and_protocols() {
    let w = World::new();
    let p = [policy(
        "x",
        "ports",
        json!({"podSelector": {}, "ingress": [{"ports": [
            {"port": 80},
            {"port": 8000, "endPort": 8099},
            {"protocol": "UDP", "port": 53},
            {"port": "metrics"},
        ]}]}),
    )];
    let ep = compute(&p, w.subject(1));
    let mut u = w.universe();
    u.own_ports
        .insert("metrics".into(), BTreeSet::from([(PROTO_TCP, 9100)]));
    let keys = entries(&ep.ingress, Direction::Ingress, &u);
    let ok = |proto, port| allows(&ep.ingress, &keys, &[4], proto, port).is_some();
    assert!(ok(PROTO_TCP, 80));
    assert!(!ok(PROTO_TCP, 81));
    assert!(!ok(PROTO_TCP, 7999));
    assert!(ok(PROTO_TCP, 8000) && ok(PROTO_TCP, 8050) && ok(PROTO_TCP, 8099));
    assert!(!ok(PROTO_TCP, 8100));
    assert!(ok(PROTO_UDP, 53) && !ok(PROTO_TCP, 53));
    assert!(ok(PROTO_TCP, 9100) && !ok(PROTO_TCP, 9101));
    // Every port of a protocol.
    let all_udp = [policy(
        "x",
        "udp",
        json!({"podSelector": {}, "ingress": [{"ports": [{"protocol": "UDP"}]}]}),
    )];
    let ep = compute(&all_udp, w.subject(1));
    let keys = entries(&ep.ingress, Direction::Ingress, &w.universe());
    assert!(allows(&ep.ingress, &keys, &[4], PROTO_UDP, 5353).is_some());
    assert!(allows(&ep.ingress, &keys, &[4], PROTO_TCP, 5353).is_none());
}

#[test]
fn egress_named_ports_resolve_on_the_peer() {
    let w = World::new();
    let p = [policy(
        "x",
        "to-http",
        json!({"podSelector": {}, "policyTypes": ["Egress"],
               "egress": [{"to": [{"namespaceSelector": {}}], "ports": [{"port": "http"}]}]}),
    )];
    let ep = compute(&p, w.subject(1));
    let mut u = w.universe();
    u.peer_ports.insert(
        3,
        BTreeMap::from([("http".into(), BTreeSet::from([(PROTO_TCP, 8080)]))]),
    );
    u.peer_ports.insert(
        4,
        BTreeMap::from([("http".into(), BTreeSet::from([(PROTO_TCP, 80)]))]),
    );
    let keys = entries(&ep.egress, Direction::Egress, &u);
    let ok = |id, port| allows(&ep.egress, &keys, &[id], PROTO_TCP, port).is_some();
    assert!(ok(3, 8080) && !ok(3, 80));
    assert!(ok(4, 80) && !ok(4, 8080));
    // A peer without the name: nothing.
    assert!(!ok(2, 80) && !ok(2, 8080));
}

#[test]
fn ip_blocks_with_exceptions_and_egress_to_a_cidr() {
    let w = World::new();
    let p = [policy(
        "x",
        "cidr",
        json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [
            {"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}], "ports": [{"port": 443}]},
            {"to": [{"ipBlock": {"cidr": "10.1.2.0/24"}}]},
        ]}),
    )];
    let ep = compute(&p, w.subject(1));
    // The node tracks every CIDR and exception of the policies, each with an identity; a peer
    // address takes the identity of the longest prefix holding it.
    let prefixes: BTreeMap<Prefix, u32> = [
        ("10.0.0.0/8", 100),
        ("10.1.0.0/16", 101),
        ("10.1.2.0/24", 102),
    ]
    .into_iter()
    .map(|(p, id)| (Prefix::parse(p).unwrap(), id))
    .collect();
    let lpm = |ip: &str| -> Vec<u32> {
        let ip: Ipv4Addr = ip.parse().unwrap();
        prefixes
            .iter()
            .filter(|(p, _)| p.contains(ip))
            .max_by_key(|(p, _)| p.len)
            .map(|(_, id)| vec![*id])
            .unwrap_or_default()
    };
    let u = Universe {
        prefixes: prefixes.clone(),
        ..w.universe()
    };
    let keys = entries(&ep.egress, Direction::Egress, &u);
    let ok = |ip: &str, port| allows(&ep.egress, &keys, &lpm(ip), PROTO_TCP, port).is_some();
    assert!(ok("10.9.9.9", 443));
    assert!(!ok("10.9.9.9", 80));
    // In the exception: not by the first rule…
    assert!(!ok("10.1.9.9", 443));
    // … but the second rule's block is inside the exception and allows every port.
    assert!(ok("10.1.2.3", 443) && ok("10.1.2.3", 22));
    // Outside every block.
    assert!(!ok("192.0.2.1", 443));
}

#[test]
fn invalid_peers_and_ports_match_nothing() {
    let w = World::new();
    let p = [policy(
        "x",
        "bad",
        json!({"podSelector": {}, "ingress": [
            {"from": [{"ipBlock": {"cidr": "not-a-cidr"}}]},
            {"ports": [{"protocol": "ICMP", "port": 1}]},
        ]}),
    )];
    assert!(allowed(&w, &p, 1, Direction::Ingress, 1).is_empty());
}

#[test]
fn prefixes_parse_and_cover() {
    let p = Prefix::parse("10.1.2.3/16").unwrap();
    assert_eq!(p.to_string(), "10.1.0.0/16");
    assert!(p.covers(&Prefix::parse("10.1.7.0/24").unwrap()));
    assert!(!p.covers(&Prefix::parse("10.0.0.0/8").unwrap()));
    assert!(
        Prefix::parse("0.0.0.0/0")
            .unwrap()
            .contains("203.0.113.9".parse().unwrap())
    );
    assert_eq!(
        Prefix::parse("10.0.0.1"),
        Some(Prefix::new("10.0.0.1".parse().unwrap(), 32))
    );
    assert!(Prefix::parse("10.0.0.0/33").is_none());
}

#[test]
fn port_blocks_examples() {
    assert_eq!(port_blocks(80, 80), [(80, 16)]);
    assert_eq!(port_blocks(8000, 8007), [(8000, 13)]);
    assert_eq!(port_blocks(1, 65535).len(), 16);
    assert_eq!(port_blocks(0, 65535), [(0, 0)]);
}

proptest! {
    /// The blocks cover exactly `from..=to`: every port inside matches one block, none outside.
    #[test]
    fn port_blocks_cover_exactly_the_range(a in 0u16.., b in 0u16.., probe in 0u16..) {
        let (from, to) = (a.min(b), a.max(b));
        let blocks = port_blocks(from, to);
        prop_assert!(blocks.len() <= 32);
        let hits = |port: u16| blocks.iter().filter(|(p, bits)| {
            let mask = if *bits == 0 { 0 } else { u16::MAX << (16 - bits) };
            port & mask == *p
        }).count();
        for port in [from, to, probe, from.saturating_sub(1), to.saturating_add(1)] {
            let inside = (from..=to).contains(&port);
            prop_assert_eq!(hits(port), usize::from(inside), "port {} of {}..={}", port, from, to);
        }
    }
}
