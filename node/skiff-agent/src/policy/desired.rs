//! What a node's policy maps should hold, from what the agent follows: every pod (address,
//! labels, named ports, node), namespace labels, NetworkPolicies and security identities.
//!
//! - `ipcache`: each pod whose identity exists → that identity (/32); this node's addresses →
//!   host, other nodes' → remote node;
//! - `cidr`: every CIDR and exception of the policies selecting a pod of this node → a
//!   node-local identity (in prefix order, from `IDENTITY_CIDR_FIRST`);
//! - `policy`: each local pod's allow keys (per [`super::rules`]), by its endpoint number;
//! - `flags`: each local pod's isolation (and audit, when its namespace carries
//!   [`AUDIT_ANNOTATION`]) with its endpoint number;
//! - policy numbers: each policy that allows something, numbered for attribution.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use k8s_openapi::api::networking::v1::NetworkPolicy;
use skiff_apimachinery::identity::IdentityLabels;
use skiff_ebpf_common::policy::{
    EP_AUDIT, EP_EGRESS_ISOLATED, EP_ID_SHIFT, EP_INGRESS_ISOLATED, IDENTITY_CIDR_FIRST,
    IDENTITY_HOST, IDENTITY_REMOTE_NODE, PolicyKey,
};

use super::{
    map_key,
    rules::{self, Direction, Peer, PolicyRef, Prefix, Subject, Universe},
};

/// A namespace annotation turning on audit mode: would-be drops are logged, not dropped.
pub const AUDIT_ANNOTATION: &str = "policy.skiff.dev/audit";

/// Named container ports: name → (protocol, port).
pub type NamedPorts = BTreeMap<String, BTreeSet<(u8, u16)>>;

/// A pod as policy needs it.
#[derive(Clone, Debug, PartialEq)]
pub struct PodFacts {
    pub name: String,
    pub ip: Ipv4Addr,
    pub labels: IdentityLabels,
    pub ports: NamedPorts,
    /// Its endpoint number when it runs on this node.
    pub endpoint: Option<u16>,
}

/// What the agent knows of the cluster.
#[derive(Debug, Default)]
pub struct View<'a> {
    pub pods: Vec<PodFacts>,
    pub policies: Vec<&'a NetworkPolicy>,
    /// Identities by number.
    pub identities: BTreeMap<u32, IdentityLabels>,
    /// Namespaces in audit mode.
    pub audited: BTreeSet<String>,
    /// This node's addresses, and the other nodes'.
    pub node_ips: Vec<Ipv4Addr>,
    pub other_node_ips: Vec<Ipv4Addr>,
    /// The numbers policies had in the last pass (kept, so a flow event decided before this
    /// pass still names its policy).
    pub numbers: BTreeMap<PolicyRef, u32>,
    /// The first number never given to a policy (numbers are not reused).
    pub next_number: u32,
}

/// A local pod's endpoint, for naming what the data path reports.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EndpointPolicies {
    pub namespace: String,
    pub pod: String,
    pub ip: Option<Ipv4Addr>,
    /// The policies isolating it, per direction (empty: not isolated).
    pub ingress: Vec<PolicyRef>,
    pub egress: Vec<PolicyRef>,
}

/// The maps' contents.
#[derive(Debug, Default, PartialEq)]
pub struct Desired {
    /// Address → identity (all /32).
    pub ipcache: BTreeMap<Ipv4Addr, u32>,
    pub cidr: BTreeMap<Prefix, u32>,
    /// (prefix length, key) → policy number.
    pub policy: BTreeMap<(u32, PolicyKey), u32>,
    /// Local pod address → `skiff_endpoints` flags.
    pub flags: BTreeMap<Ipv4Addr, u32>,
    /// Policy number → policy.
    pub policies: BTreeMap<u32, PolicyRef>,
    /// Endpoint number → its pod and isolating policies.
    pub endpoints: BTreeMap<u16, EndpointPolicies>,
    /// The first policy number not given yet, for the next pass.
    pub next_number: u32,
}

/// What the rules select on, for a pod with identity labels `l`.
pub fn subject(l: &IdentityLabels) -> Subject {
    Subject {
        namespace: l.namespace.clone(),
        labels: l.pod_labels.clone(),
        namespace_labels: l.namespace_labels.clone(),
    }
}

/// Whether namespace `ns` is in audit mode ([`AUDIT_ANNOTATION`]).
pub fn audited(ns: &k8s_openapi::api::core::v1::Namespace) -> bool {
    ns.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(AUDIT_ANNOTATION))
        .is_some_and(|v| v == "true")
}

/// The isolation and audit bits of `skiff_endpoints` flags for an endpoint with `pol`.
pub fn isolation_flags(pol: &rules::EndpointPolicy, audited: bool) -> u32 {
    let mut flags = 0;
    if pol.ingress.isolated() {
        flags |= EP_INGRESS_ISOLATED;
    }
    if pol.egress.isolated() {
        flags |= EP_EGRESS_ISOLATED;
    }
    if audited {
        flags |= EP_AUDIT;
    }
    flags
}

fn sorted(refs: &[PolicyRef]) -> Vec<PolicyRef> {
    let set: BTreeSet<&PolicyRef> = refs.iter().collect();
    set.into_iter().cloned().collect()
}

/// Computes the maps' contents from `view`.
pub fn desired(view: &View<'_>) -> Desired {
    let mut out = Desired::default();
    // Identities of pods by their labels (several numbers for one set are all valid: the
    // smallest is used for addresses, all match selectors).
    let mut by_labels: BTreeMap<&IdentityLabels, u32> = BTreeMap::new();
    for (id, l) in &view.identities {
        by_labels.entry(l).or_insert(*id);
    }
    for p in &view.pods {
        if let Some(id) = by_labels.get(&p.labels) {
            out.ipcache.insert(p.ip, *id);
        }
    }
    for ip in &view.other_node_ips {
        out.ipcache.insert(*ip, IDENTITY_REMOTE_NODE);
    }
    for ip in &view.node_ips {
        out.ipcache.insert(*ip, IDENTITY_HOST);
    }

    let subjects: Vec<(u32, Subject)> = view
        .identities
        .iter()
        .map(|(id, l)| (*id, subject(l)))
        .collect();
    let local: Vec<(&PodFacts, u16, rules::EndpointPolicy)> = view
        .pods
        .iter()
        .filter_map(|p| {
            let ep = p.endpoint?;
            let pol = rules::compute(view.policies.iter().copied(), &subject(&p.labels));
            Some((p, ep, pol))
        })
        .collect();

    // Every prefix of the rules that apply here, numbered in order.
    let mut prefixes = BTreeSet::new();
    for (_, _, pol) in &local {
        for r in pol.ingress.rules.iter().chain(&pol.egress.rules) {
            for peer in r.peers.iter().flatten() {
                if let Peer::Block { cidr, except } = peer {
                    prefixes.insert(*cidr);
                    prefixes.extend(except.iter().copied());
                }
            }
        }
    }
    out.cidr = prefixes.into_iter().zip(IDENTITY_CIDR_FIRST..).collect();

    // Named ports of each identity's pods (egress resolves names on the peer).
    let mut peer_ports: BTreeMap<u32, NamedPorts> = BTreeMap::new();
    for p in &view.pods {
        let Some(id) = by_labels.get(&p.labels) else {
            continue;
        };
        let ports = peer_ports.entry(*id).or_default();
        for (name, set) in &p.ports {
            ports
                .entry(name.clone())
                .or_default()
                .extend(set.iter().copied());
        }
    }
    // Identities sharing labels share ports.
    for (id, l) in &view.identities {
        if let Some(first) = by_labels.get(l).filter(|f| **f != *id)
            && let Some(ports) = peer_ports.get(first).cloned()
        {
            peer_ports.insert(*id, ports);
        }
    }

    let mut numbers: BTreeMap<PolicyRef, u32> = BTreeMap::new();
    let mut next = (view.numbers.values().max().copied().unwrap_or(0) + 1).max(view.next_number);
    // One universe for every local pod; only its own named ports change.
    let mut universe = Universe {
        identities: subjects.iter().map(|(id, s)| (*id, s)).collect(),
        prefixes: out.cidr.clone(),
        own_ports: NamedPorts::new(),
        peer_ports,
    };
    for (pod, ep, pol) in &local {
        out.endpoints.insert(
            *ep,
            EndpointPolicies {
                namespace: pod.labels.namespace.clone(),
                pod: pod.name.clone(),
                ip: Some(pod.ip),
                ingress: sorted(&pol.ingress.isolating),
                egress: sorted(&pol.egress.isolating),
            },
        );
        let flags = (u32::from(*ep) << EP_ID_SHIFT)
            | isolation_flags(pol, view.audited.contains(&pod.labels.namespace));
        out.flags.insert(pod.ip, flags);
        universe.own_ports.clone_from(&pod.ports);
        for d in [Direction::Ingress, Direction::Egress] {
            let dir = pol.direction(d);
            if !dir.isolated() {
                continue;
            }
            for (entry, policy) in rules::entries(dir, d, &universe) {
                let n = *numbers.entry(policy.clone()).or_insert_with(|| {
                    view.numbers.get(&policy).copied().unwrap_or_else(|| {
                        next += 1;
                        next - 1
                    })
                });
                out.policy.entry(map_key(*ep, d, &entry)).or_insert(n);
            }
        }
    }
    out.policies = numbers.into_iter().map(|(p, n)| (n, p)).collect();
    out.next_number = next;
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use skiff_ebpf_common::policy::{DIR_EGRESS, DIR_INGRESS, PREFIX_PORT_BASE};

    fn labels(ns: &str, app: &str) -> IdentityLabels {
        IdentityLabels::of(
            ns,
            &BTreeMap::from([("app".to_string(), app.to_string())]),
            &BTreeMap::from([("kubernetes.io/metadata.name".to_string(), ns.to_string())]),
        )
    }

    fn pod(
        ip: [u8; 4],
        l: IdentityLabels,
        endpoint: Option<u16>,
        ports: &[(&str, u16)],
    ) -> PodFacts {
        PodFacts {
            name: format!("pod-{}", ip[3]),
            ip: ip.into(),
            labels: l,
            ports: ports
                .iter()
                .map(|(n, p)| (n.to_string(), BTreeSet::from([(6u8, *p)])))
                .collect(),
            endpoint,
        }
    }

    #[test]
    fn local_pods_get_flags_keys_and_numbered_policies() {
        let p: NetworkPolicy = serde_json::from_value(json!({
            "metadata": {"name": "web-in", "namespace": "shop"},
            "spec": {"podSelector": {"matchLabels": {"app": "web"}},
                     "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                                  "ports": [{"port": "http"}]},
                                 {"from": [{"ipBlock": {"cidr": "192.0.2.0/24", "except": ["192.0.2.128/25"]}}]}]},
        }))
        .unwrap();
        let view = View {
            pods: vec![
                pod(
                    [10, 244, 0, 5],
                    labels("shop", "web"),
                    Some(3),
                    &[("http", 8080)],
                ),
                pod([10, 244, 1, 6], labels("shop", "client"), None, &[]),
                pod([10, 244, 0, 7], labels("shop", "db"), Some(4), &[]),
                // A pod whose identity is not allocated yet: no ipcache entry.
                pod([10, 244, 1, 9], labels("shop", "new"), None, &[]),
            ],
            policies: vec![&p],
            identities: BTreeMap::from([
                (300, labels("shop", "web")),
                (301, labels("shop", "client")),
                (302, labels("shop", "db")),
            ]),
            audited: BTreeSet::from(["shop".to_string()]),
            node_ips: vec![[10, 0, 0, 1].into()],
            other_node_ips: vec![[10, 0, 0, 2].into()],
            numbers: BTreeMap::new(),
            next_number: 0,
        };
        let d = desired(&view);
        assert_eq!(d.ipcache.len(), 5);
        assert_eq!(d.ipcache[&Ipv4Addr::new(10, 244, 1, 6)], 301);
        assert_eq!(d.ipcache[&Ipv4Addr::new(10, 0, 0, 1)], IDENTITY_HOST);
        assert_eq!(d.ipcache[&Ipv4Addr::new(10, 0, 0, 2)], IDENTITY_REMOTE_NODE);
        // web is isolated for ingress only; db not at all; both audited.
        assert_eq!(
            d.flags[&Ipv4Addr::new(10, 244, 0, 5)],
            (3 << EP_ID_SHIFT) | EP_INGRESS_ISOLATED | EP_AUDIT
        );
        assert_eq!(
            d.flags[&Ipv4Addr::new(10, 244, 0, 7)],
            (4 << EP_ID_SHIFT) | EP_AUDIT
        );
        // The block and its exception, numbered.
        assert_eq!(d.cidr.len(), 2);
        assert_eq!(
            d.cidr.values().copied().collect::<Vec<_>>(),
            [IDENTITY_CIDR_FIRST, IDENTITY_CIDR_FIRST + 1]
        );
        // Keys: client → web's own port named http (8080), and the block (not the exception).
        let keys: Vec<(u16, u8, u32, u16, u32)> = d
            .policy
            .keys()
            .map(|(len, k)| {
                (
                    u16::from_be(k.endpoint),
                    k.direction,
                    u32::from_be(k.identity),
                    u16::from_be(k.port),
                    *len,
                )
            })
            .collect();
        assert_eq!(
            keys,
            [
                (3, DIR_INGRESS, IDENTITY_CIDR_FIRST, 0, 64),
                (3, DIR_INGRESS, 301, 8080, PREFIX_PORT_BASE + 16),
            ]
        );
        assert!(keys.iter().all(|k| k.1 != DIR_EGRESS));
        assert_eq!(
            d.policies,
            BTreeMap::from([(1, ("shop".to_string(), "web-in".to_string()))])
        );
        assert!(d.policy.values().all(|n| *n == 1));
    }

    #[test]
    fn policy_numbers_stay_across_passes_and_endpoints_name_their_isolation() {
        let policy = |name: &str, app: &str| -> NetworkPolicy {
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "shop"},
                "spec": {"podSelector": {"matchLabels": {"app": "web"}},
                         "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": app}}}]}]},
            }))
            .unwrap()
        };
        let (a, b) = (policy("from-a", "a"), policy("from-b", "b"));
        fn view<'a>(
            policies: Vec<&'a NetworkPolicy>,
            numbers: BTreeMap<PolicyRef, u32>,
            next_number: u32,
        ) -> View<'a> {
            View {
                pods: vec![
                    pod([10, 244, 0, 5], labels("shop", "web"), Some(3), &[]),
                    pod([10, 244, 1, 6], labels("shop", "a"), None, &[]),
                    pod([10, 244, 1, 7], labels("shop", "b"), None, &[]),
                ],
                policies,
                identities: BTreeMap::from([
                    (300, labels("shop", "web")),
                    (301, labels("shop", "a")),
                    (302, labels("shop", "b")),
                ]),
                numbers,
                next_number,
                ..View::default()
            }
        }
        let first = desired(&view(vec![&b], BTreeMap::new(), 0));
        let b_ref = ("shop".to_string(), "from-b".to_string());
        assert_eq!(first.policies, BTreeMap::from([(1, b_ref.clone())]));
        // from-a sorts first but comes later: from-b keeps its number.
        let numbers = BTreeMap::from([(b_ref.clone(), 1)]);
        let second = desired(&view(vec![&a, &b], numbers, first.next_number));
        assert_eq!(
            second.policies,
            BTreeMap::from([
                (1, b_ref.clone()),
                (2, ("shop".to_string(), "from-a".to_string()))
            ])
        );
        assert_eq!(second.next_number, 3);
        // from-a (number 2) goes away; a later policy does not get its number.
        let c = policy("from-c", "a");
        let third = desired(&view(vec![&b, &c], BTreeMap::from([(b_ref.clone(), 1)]), 3));
        assert_eq!(third.policies.keys().copied().collect::<Vec<_>>(), [1, 3]);
        let ep = &second.endpoints[&3];
        assert_eq!((ep.namespace.as_str(), ep.pod.as_str()), ("shop", "pod-5"));
        assert_eq!(ep.ingress.len(), 2);
        assert!(ep.egress.is_empty());
    }
}
