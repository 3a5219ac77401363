//! NetworkPolicy semantics (networking.k8s.io/v1) for one endpoint, as the API documents them and
//! upstream's netpol e2e checks them:
//!
//! - a policy applies to the pods its `podSelector` selects in its own namespace — never to pods
//!   of other namespaces;
//! - `policyTypes`, when unset or empty, is `Ingress` plus `Egress` if the policy has an
//!   `egress` section;
//! - a pod selected by any policy for a direction is isolated in that direction: only what some
//!   rule of those policies allows gets through (policies add up, none subtracts);
//! - a rule with no peers (`from`/`to` absent or empty) allows every peer, one with no ports
//!   every port and protocol;
//! - a peer with a `podSelector` alone selects pods in the policy's namespace, with a
//!   `namespaceSelector` alone every pod of the namespaces it selects, with both the pods the
//!   first selects in the namespaces the second selects; `ipBlock` selects addresses in its
//!   CIDR outside its `except` prefixes (pod addresses included, as upstream's e2e expects);
//! - a port is a protocol (TCP when unset) with a number, a range up to `endPort`, a name
//!   (resolved on the pod that owns the port: the endpoint itself for ingress, the peer for
//!   egress), or none (every port of the protocol).
//!
//! [`compute`] gives an endpoint's rules; [`entries`] resolves them against the identities and
//! CIDRs the node knows into the keys the data path looks up (peer identity, protocol, port
//! prefix), each with the policy that allowed it for attribution.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use k8s_openapi::{
    api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort},
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};
use skiff_apimachinery::labels;

/// IP protocol numbers.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_SCTP: u8 = 132;

/// The identity that stands for any peer in [`Entry::identity`] (the data path's).
pub use skiff_ebpf_common::policy::IDENTITY_ANY as ANY_IDENTITY;

/// Which way a connection goes, seen from the endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    /// Connections to the endpoint.
    Ingress,
    /// Connections from the endpoint.
    Egress,
}

/// A policy, by namespace and name.
pub type PolicyRef = (String, String);

/// A pod as policy sees it: its namespace, its labels and its namespace's labels.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Subject {
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub namespace_labels: BTreeMap<String, String>,
}

/// An IPv4 prefix (address bits past `len` are zero).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Prefix {
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl Prefix {
    /// `a.b.c.d/n` (a bare address is a /32); host bits are cleared, as upstream's validation
    /// would require them to be.
    pub fn parse(s: &str) -> Option<Prefix> {
        let (a, l) = s.split_once('/').unwrap_or((s, "32"));
        let addr: Ipv4Addr = a.parse().ok()?;
        let len: u8 = l.parse().ok().filter(|l| *l <= 32)?;
        Some(Prefix::new(addr, len))
    }

    pub fn new(addr: Ipv4Addr, len: u8) -> Prefix {
        let len = len.min(32);
        let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
        Prefix {
            addr: Ipv4Addr::from(u32::from(addr) & mask),
            len,
        }
    }

    /// Whether `other` lies wholly inside this prefix.
    pub fn covers(&self, other: &Prefix) -> bool {
        other.len >= self.len && Prefix::new(other.addr, self.len) == *self
    }

    /// Whether `ip` is in this prefix.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        self.covers(&Prefix::new(ip, 32))
    }
}

impl std::fmt::Display for Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// The namespaces a pod peer is looked for in.
#[derive(Clone, Debug, PartialEq)]
pub enum Namespaces {
    /// The policy's own.
    Named(String),
    /// Those whose labels the selector matches.
    Selected(LabelSelector),
}

/// Who a rule lets in (ingress) or out to (egress).
#[derive(Clone, Debug, PartialEq)]
pub enum Peer {
    /// Pods in `namespaces` matching `pods` (`None`: every pod there).
    Pods {
        namespaces: Namespaces,
        pods: Option<LabelSelector>,
    },
    /// Addresses in `cidr` outside every `except` prefix.
    Block { cidr: Prefix, except: Vec<Prefix> },
    /// A peer the API should have refused (no selector, a bad CIDR): matches nothing.
    Invalid,
}

impl Peer {
    /// Whether this peer selects the pod `s` (by labels; blocks select addresses).
    pub fn selects(&self, s: &Subject) -> bool {
        match self {
            Peer::Pods { namespaces, pods } => {
                let ns_ok = match namespaces {
                    Namespaces::Named(n) => *n == s.namespace,
                    Namespaces::Selected(sel) => labels::matches(sel, &s.namespace_labels),
                };
                ns_ok && pods.as_ref().is_none_or(|p| labels::matches(p, &s.labels))
            }
            Peer::Block { .. } | Peer::Invalid => false,
        }
    }

    /// Whether this peer selects every address of `p` (a prefix the node tracks: all of it
    /// is in the block and none of it in an exception).
    pub fn selects_prefix(&self, p: &Prefix) -> bool {
        match self {
            Peer::Block { cidr, except } => cidr.covers(p) && !except.iter().any(|e| e.covers(p)),
            _ => false,
        }
    }
}

/// A port match of a rule.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum PortMatch {
    /// Every port of the protocol.
    All { proto: u8 },
    /// Ports `from..=to`.
    Range { proto: u8, from: u16, to: u16 },
    /// A named container port of the pod that owns the port.
    Named { proto: u8, name: String },
    /// A port the API should have refused: matches nothing.
    Invalid,
}

/// One `ingress`/`egress` rule of one policy.
#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    pub policy: PolicyRef,
    /// `None`: every peer.
    pub peers: Option<Vec<Peer>>,
    /// `None`: every port and protocol.
    pub ports: Option<Vec<PortMatch>>,
}

/// An endpoint's policy in one direction.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DirectionPolicy {
    /// The policies selecting the endpoint for this direction; empty: not isolated (everything
    /// allowed).
    pub isolating: Vec<PolicyRef>,
    /// What those policies allow.
    pub rules: Vec<Rule>,
}

impl DirectionPolicy {
    pub fn isolated(&self) -> bool {
        !self.isolating.is_empty()
    }
}

/// An endpoint's policy.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EndpointPolicy {
    pub ingress: DirectionPolicy,
    pub egress: DirectionPolicy,
}

impl EndpointPolicy {
    pub fn direction(&self, d: Direction) -> &DirectionPolicy {
        match d {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }
}

/// The directions a policy affects: (ingress, egress).
pub fn policy_types(p: &NetworkPolicy) -> (bool, bool) {
    let spec = p.spec.as_ref();
    match spec
        .and_then(|s| s.policy_types.as_ref())
        .filter(|t| !t.is_empty())
    {
        Some(types) => (
            types.iter().any(|t| t == "Ingress"),
            types.iter().any(|t| t == "Egress"),
        ),
        None => (true, spec.and_then(|s| s.egress.as_ref()).is_some()),
    }
}

/// The IP protocol a Kubernetes `protocol` names (absent: TCP); `None` for others.
pub fn proto(p: Option<&str>) -> Option<u8> {
    match p.unwrap_or("TCP") {
        "TCP" => Some(PROTO_TCP),
        "UDP" => Some(PROTO_UDP),
        "SCTP" => Some(PROTO_SCTP),
        _ => None,
    }
}

fn port_match(p: &NetworkPolicyPort) -> PortMatch {
    let Some(proto) = proto(p.protocol.as_deref()) else {
        return PortMatch::Invalid;
    };
    match &p.port {
        None => PortMatch::All { proto },
        Some(IntOrString::Int(n)) => {
            let (Ok(from), Ok(to)) = (u16::try_from(*n), u16::try_from(p.end_port.unwrap_or(*n)))
            else {
                return PortMatch::Invalid;
            };
            if from == 0 || to < from {
                return PortMatch::Invalid;
            }
            PortMatch::Range { proto, from, to }
        }
        Some(IntOrString::String(name)) => match name.parse::<u16>() {
            // A number written as a string is that number, as upstream's IntOrString.
            Ok(n) if n > 0 => PortMatch::Range {
                proto,
                from: n,
                to: n,
            },
            _ => PortMatch::Named {
                proto,
                name: name.clone(),
            },
        },
    }
}

fn peer(p: &NetworkPolicyPeer, policy_ns: &str) -> Peer {
    if let Some(b) = &p.ip_block {
        let Some(cidr) = Prefix::parse(&b.cidr) else {
            return Peer::Invalid;
        };
        let except: Option<Vec<Prefix>> = b
            .except
            .iter()
            .flatten()
            .map(|e| Prefix::parse(e))
            .collect();
        return match except {
            Some(except) => Peer::Block { cidr, except },
            None => Peer::Invalid,
        };
    }
    match (&p.namespace_selector, &p.pod_selector) {
        (None, None) => Peer::Invalid,
        (ns, pods) => Peer::Pods {
            namespaces: match ns {
                Some(sel) => Namespaces::Selected(sel.clone()),
                None => Namespaces::Named(policy_ns.to_string()),
            },
            pods: pods.clone(),
        },
    }
}

/// `None` for an absent or empty list (everything), else each item converted.
fn all_or<T, U>(items: Option<&Vec<T>>, f: impl Fn(&T) -> U) -> Option<Vec<U>> {
    items
        .filter(|v| !v.is_empty())
        .map(|v| v.iter().map(f).collect())
}

/// The policy of the pod `endpoint` under `policies` (any namespaces; only its own apply).
pub fn compute<'a>(
    policies: impl IntoIterator<Item = &'a NetworkPolicy>,
    endpoint: &Subject,
) -> EndpointPolicy {
    let mut selecting: Vec<&NetworkPolicy> = policies
        .into_iter()
        .filter(|p| p.metadata.namespace.as_deref() == Some(endpoint.namespace.as_str()))
        .filter(|p| {
            p.spec
                .as_ref()
                .is_some_and(|s| labels::matches(&s.pod_selector, &endpoint.labels))
        })
        .collect();
    selecting.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let mut out = EndpointPolicy::default();
    for p in selecting {
        let Some(spec) = p.spec.as_ref() else {
            continue;
        };
        let ns = endpoint.namespace.as_str();
        let key: PolicyRef = (ns.to_string(), p.metadata.name.clone().unwrap_or_default());
        let (ingress, egress) = policy_types(p);
        if ingress {
            out.ingress.isolating.push(key.clone());
            for r in spec.ingress.iter().flatten() {
                out.ingress.rules.push(Rule {
                    policy: key.clone(),
                    peers: all_or(r.from.as_ref(), |x| peer(x, ns)),
                    ports: all_or(r.ports.as_ref(), port_match),
                });
            }
        }
        if egress {
            out.egress.isolating.push(key.clone());
            for r in spec.egress.iter().flatten() {
                out.egress.rules.push(Rule {
                    policy: key.clone(),
                    peers: all_or(r.to.as_ref(), |x| peer(x, ns)),
                    ports: all_or(r.ports.as_ref(), port_match),
                });
            }
        }
    }
    out
}

/// A key the data path looks up for a new connection: the peer's identity (or
/// [`ANY_IDENTITY`]), the protocol (0: any) and the first `port_bits` bits of the port (the
/// rest zero). The map is a longest-prefix-match trie over (identity, protocol, port), so a
/// port range is a few prefixes and "every port" is a shorter key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Entry {
    pub identity: u32,
    pub proto: u8,
    pub port: u16,
    pub port_bits: u8,
}

impl Entry {
    /// Whether a connection from/to `identity` with `proto`/`port` matches this key.
    pub fn matches(&self, identity: u32, proto: u8, port: u16) -> bool {
        if self.identity != identity {
            return false;
        }
        if self.proto == 0 {
            return true;
        }
        let mask = if self.port_bits == 0 {
            0
        } else {
            u16::MAX << (16 - self.port_bits)
        };
        self.proto == proto && (port & mask) == self.port
    }
}

/// The largest aligned blocks covering `from..=to` exactly: (first port, prefix bits).
pub fn port_blocks(from: u16, to: u16) -> Vec<(u16, u8)> {
    let mut out = Vec::new();
    let (mut lo, hi) = (u32::from(from), u32::from(to));
    while lo <= hi {
        // The largest block starting at `lo` that is aligned and stays within `hi`.
        let mut size = if lo == 0 {
            1 << 16
        } else {
            1u32 << lo.trailing_zeros()
        };
        while lo + size - 1 > hi {
            size >>= 1;
        }
        let bits = 16 - size.trailing_zeros() as u8;
        out.push((lo as u16, bits));
        lo += size;
    }
    out
}

/// What the node knows to resolve rules with.
#[derive(Debug, Default)]
pub struct Universe<'a> {
    /// Pod identities and the pod they stand for.
    pub identities: BTreeMap<u32, &'a Subject>,
    /// The prefixes the node tracks for `ipBlock`s and their (node-local) identities.
    pub prefixes: BTreeMap<Prefix, u32>,
    /// Named container ports: of the endpoint itself (ingress)…
    pub own_ports: BTreeMap<String, BTreeSet<(u8, u16)>>,
    /// … and of each peer identity's pods (egress).
    pub peer_ports: BTreeMap<u32, BTreeMap<String, BTreeSet<(u8, u16)>>>,
}

fn port_entries(
    identity: u32,
    m: &PortMatch,
    named: Option<&BTreeMap<String, BTreeSet<(u8, u16)>>>,
) -> Vec<Entry> {
    let entry = |proto, port, port_bits| Entry {
        identity,
        proto,
        port,
        port_bits,
    };
    match m {
        PortMatch::All { proto } => vec![entry(*proto, 0, 0)],
        PortMatch::Range { proto, from, to } => port_blocks(*from, *to)
            .into_iter()
            .map(|(p, bits)| entry(*proto, p, bits))
            .collect(),
        PortMatch::Named { proto, name } => named
            .and_then(|n| n.get(name))
            .into_iter()
            .flatten()
            .filter(|(p, _)| p == proto)
            .map(|(p, port)| entry(*p, *port, 16))
            .collect(),
        PortMatch::Invalid => Vec::new(),
    }
}

/// The data-path keys of `dir` in direction `d`, each with the first policy (by namespace and
/// name) that allows it. Empty when isolated and nothing is allowed; callers check
/// [`DirectionPolicy::isolated`] first (not isolated: everything is allowed, no keys needed).
pub fn entries(
    dir: &DirectionPolicy,
    d: Direction,
    u: &Universe<'_>,
) -> BTreeMap<Entry, PolicyRef> {
    let mut out: BTreeMap<Entry, PolicyRef> = BTreeMap::new();
    for rule in &dir.rules {
        let ids: BTreeSet<u32> = match &rule.peers {
            None => BTreeSet::from([ANY_IDENTITY]),
            Some(peers) => {
                let mut ids = BTreeSet::new();
                for p in peers {
                    ids.extend(
                        u.identities
                            .iter()
                            .filter(|(_, s)| p.selects(s))
                            .map(|(id, _)| *id),
                    );
                    ids.extend(
                        u.prefixes
                            .iter()
                            .filter(|(pre, _)| p.selects_prefix(pre))
                            .map(|(_, id)| *id),
                    );
                }
                ids
            }
        };
        for id in ids {
            let named = match d {
                Direction::Ingress => Some(&u.own_ports),
                Direction::Egress => u.peer_ports.get(&id),
            };
            let keys = match &rule.ports {
                None => vec![Entry {
                    identity: id,
                    proto: 0,
                    port: 0,
                    port_bits: 0,
                }],
                Some(ports) => ports
                    .iter()
                    .flat_map(|m| port_entries(id, m, named))
                    .collect(),
            };
            for k in keys {
                out.entry(k).or_insert_with(|| rule.policy.clone());
            }
        }
    }
    out
}

/// Whether a new connection with a peer of `identities` (its pod identity and the prefixes'
/// identities its address falls in), `proto` and `port` is allowed: the reference the data
/// path's lookups must agree with.
pub fn allows(
    dir: &DirectionPolicy,
    keys: &BTreeMap<Entry, PolicyRef>,
    identities: &[u32],
    proto: u8,
    port: u16,
) -> Option<PolicyRef> {
    if !dir.isolated() {
        return Some((String::new(), String::new()));
    }
    identities
        .iter()
        .chain(std::iter::once(&ANY_IDENTITY))
        .find_map(|id| {
            keys.iter()
                .find(|(k, _)| k.matches(*id, proto, port))
                .map(|(_, p)| p.clone())
        })
}

#[cfg(test)]
mod tests;
