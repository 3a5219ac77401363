//! What the service maps should hold, computed from Services and EndpointSlices the way
//! kube-proxy reads them (`pkg/proxy/servicechangetracker.go`, `endpointslicecache.go`,
//! `topology.go`): one frontend per (address, port, protocol) a Service exposes on this node,
//! each with its ready endpoints and, as a fallback, its serving-but-terminating ones.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use skiff_ebpf_common::lb::{
    SCOPE_EXTERNAL, SCOPE_INTERNAL, SVC_EXTERNAL_IP, SVC_LOCAL_ONLY, SVC_NODEPORT, SVC_TWO_SCOPES,
};

/// The label naming an EndpointSlice's Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// kube-proxy's default ClientIP affinity timeout (3 h).
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;

/// A frontend: where clients send packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FrontendKey {
    pub addr: Ipv4Addr,
    pub port: u16,
    /// IP protocol number.
    pub proto: u8,
    /// `SCOPE_EXTERNAL` or `SCOPE_INTERNAL`.
    pub scope: u8,
}

/// An endpoint address and port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Endpoint {
    pub addr: Ipv4Addr,
    pub port: u16,
    /// It runs on this node.
    pub local: bool,
}

/// What one frontend does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendSpec {
    /// `SVC_*` flags.
    pub flags: u16,
    /// ClientIP affinity in seconds, 0 for none.
    pub affinity_timeout: u32,
    /// Ready endpoints, sorted.
    pub ready: Vec<Endpoint>,
    /// Serving, terminating endpoints (used only when `ready` is empty), sorted.
    pub terminating: Vec<Endpoint>,
}

/// Who a frontend belongs to, for metrics and the CLI.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct FrontendOwner {
    pub namespace: String,
    pub name: String,
    /// The Service port's name (may be empty).
    pub port_name: String,
}

/// What a Service's `healthCheckNodePort` answers (externalTrafficPolicy=Local): how many of
/// its endpoints are ready on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub namespace: String,
    pub name: String,
    pub local_endpoints: usize,
}

/// The whole desired state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub frontends: BTreeMap<FrontendKey, FrontendSpec>,
    pub owners: BTreeMap<FrontendKey, FrontendOwner>,
    /// Health check node ports.
    pub health: BTreeMap<u16, HealthCheck>,
}

/// This node, as service translation needs it.
#[derive(Clone, Debug)]
pub struct NodeView {
    /// The node's name (EndpointSlice `nodeName`).
    pub name: String,
    /// The addresses NodePorts are served on.
    pub addresses: Vec<Ipv4Addr>,
    /// `xdp-uplink` may run the NodePort fast path (every uplink has native XDP).
    pub xdp_fast_path: bool,
}

fn proto_number(p: Option<&str>) -> Option<u8> {
    match p.unwrap_or("TCP") {
        "TCP" => Some(6),
        "UDP" => Some(17),
        // SCTP and others: not translated by this data path.
        _ => None,
    }
}

/// An endpoint of a slice with its conditions, as kube-proxy's `BaseEndpointInfo` keeps it.
struct SliceEndpoint {
    ep: Endpoint,
    ready: bool,
    serving: bool,
    terminating: bool,
    local: bool,
}

/// The Service an EndpointSlice belongs to, `(namespace, name)`, when the data path can use
/// the slice (IPv4 addresses, labelled with its Service).
pub fn slice_service(s: &EndpointSlice) -> Option<(String, String)> {
    if s.address_type != "IPv4" {
        return None;
    }
    let ns = s.metadata.namespace.as_ref()?;
    let svc = s.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    Some((ns.clone(), svc.clone()))
}

/// Computes the desired frontends from every Service and EndpointSlice at once: the reference
/// the incremental [`super::tracker::Tracker`] is tested against. Where two Services claim one
/// frontend (the same external IP and port), the first by namespace and name wins, as there.
#[cfg(test)]
pub fn desired<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    node: &NodeView,
) -> Desired {
    let mut by_service: BTreeMap<(String, String), Vec<&EndpointSlice>> = BTreeMap::new();
    for s in slices {
        if let Some(k) = slice_service(s) {
            by_service.entry(k).or_default().push(s);
        }
    }
    let mut services: Vec<&Service> = services.into_iter().collect();
    services.sort_by(|a, b| {
        (&a.metadata.namespace, &a.metadata.name).cmp(&(&b.metadata.namespace, &b.metadata.name))
    });
    let mut out = Desired::default();
    for svc in services {
        let k = (
            svc.metadata.namespace.clone().unwrap_or_default(),
            svc.metadata.name.clone().unwrap_or_default(),
        );
        let slices = by_service.get(&k).map(Vec::as_slice).unwrap_or_default();
        let part = service_desired(svc, slices, node);
        for (fk, spec) in part.frontends {
            if let std::collections::btree_map::Entry::Vacant(e) = out.frontends.entry(fk) {
                e.insert(spec);
                out.owners.insert(fk, part.owners[&fk].clone());
            }
        }
        for (port, hc) in part.health {
            out.health.entry(port).or_insert(hc);
        }
    }
    out
}

/// What one Service contributes, given the EndpointSlices labelled with its name.
pub fn service_desired(svc: &Service, slices: &[&EndpointSlice], node: &NodeView) -> Desired {
    let mut out = Desired::default();
    let (Some(ns), Some(name), Some(spec)) = (
        svc.metadata.namespace.as_ref(),
        svc.metadata.name.as_ref(),
        svc.spec.as_ref(),
    ) else {
        return out;
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return out;
    }
    // kube-proxy's ShouldSkipService: headless Services get nothing (no VIP, and no
    // external addresses either); a dual-stack Service is served by its IPv4 ClusterIP.
    let Some(cluster_ip) = spec
        .cluster_ips
        .iter()
        .flatten()
        .chain(spec.cluster_ip.iter())
        .find_map(|ip| ip.parse::<Ipv4Addr>().ok())
    else {
        return out;
    };
    let affinity = if spec.session_affinity.as_deref() == Some("ClientIP") {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .map_or(DEFAULT_AFFINITY_TIMEOUT, |t| t.clamp(1, 86_400) as u32)
    } else {
        0
    };
    let etp_local = spec.external_traffic_policy.as_deref() == Some("Local");
    let itp_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    let externals: Vec<Ipv4Addr> = spec
        .external_ips
        .iter()
        .flatten()
        .filter_map(|ip| ip.parse().ok())
        .chain(
            svc.status
                .as_ref()
                .and_then(|s| s.load_balancer.as_ref())
                .and_then(|lb| lb.ingress.as_ref())
                .into_iter()
                .flatten()
                // `ipMode: Proxy`: traffic must go through the load balancer.
                .filter(|i| i.ip_mode.as_deref() != Some("Proxy"))
                .filter_map(|i| i.ip.as_deref().and_then(|ip| ip.parse().ok())),
        )
        .collect();
    let node_ports = matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer"));
    if etp_local
        && let Some(hc) = spec
            .health_check_node_port
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
    {
        let local: BTreeSet<&str> = slices
            .iter()
            .flat_map(|s| s.endpoints.iter())
            .filter(|e| e.node_name.as_deref() == Some(node.name.as_str()))
            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
            .filter_map(|e| e.addresses.first().map(String::as_str))
            .collect();
        out.health.insert(
            hc,
            HealthCheck {
                namespace: ns.clone(),
                name: name.clone(),
                local_endpoints: local.len(),
            },
        );
    }
    for sp in spec.ports.iter().flatten() {
        let Some(proto) = proto_number(sp.protocol.as_deref()) else {
            continue;
        };
        let port_name = sp.name.clone().unwrap_or_default();
        let eps = endpoints_for(slices, &port_name, sp.protocol.as_deref(), node);
        let owner = FrontendOwner {
            namespace: ns.clone(),
            name: name.clone(),
            port_name,
        };
        let all = pick(&eps, false, 0, affinity);
        let local = |flags| pick(&eps, true, flags | SVC_LOCAL_ONLY, affinity);
        let mut add = |addr: Ipv4Addr, port: u16, scope: u8, spec: FrontendSpec| {
            let key = FrontendKey {
                addr,
                port,
                proto,
                scope,
            };
            out.owners.insert(key, owner.clone());
            out.frontends.insert(key, spec);
        };
        let Ok(port) = u16::try_from(sp.port) else {
            continue;
        };
        let spec = if itp_local { local(0) } else { all.clone() };
        add(cluster_ip, port, SCOPE_EXTERNAL, spec);
        // External addresses: externalTrafficPolicy=Local keeps only local endpoints for
        // traffic from outside, while pods still reach every endpoint (internal scope).
        let mut external = |addr: Ipv4Addr, port: u16, flag: u16| {
            if etp_local {
                add(addr, port, SCOPE_EXTERNAL, local(flag | SVC_TWO_SCOPES));
                let mut internal = all.clone();
                internal.flags |= flag;
                add(addr, port, SCOPE_INTERNAL, internal);
            } else {
                let mut s = all.clone();
                s.flags |= flag;
                add(addr, port, SCOPE_EXTERNAL, s);
            }
        };
        for addr in &externals {
            external(*addr, port, SVC_EXTERNAL_IP);
        }
        if node_ports && let Some(np) = sp.node_port.and_then(|p| u16::try_from(p).ok()) {
            for addr in &node.addresses {
                external(*addr, np, SVC_NODEPORT);
            }
        }
    }
    out
}

/// The endpoints of the slices for the Service port named `port_name`, deduplicated (an
/// address can sit in two slices while the controller moves it).
fn endpoints_for(
    slices: &[&EndpointSlice],
    port_name: &str,
    protocol: Option<&str>,
    node: &NodeView,
) -> Vec<SliceEndpoint> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for s in slices {
        let Some(port) = s.ports.iter().flatten().find_map(|p| {
            let same_name = p.name.as_deref().unwrap_or("") == port_name;
            let same_proto = p.protocol.as_deref().unwrap_or("TCP") == protocol.unwrap_or("TCP");
            (same_name && same_proto)
                .then_some(p.port)
                .flatten()
                .and_then(|p| u16::try_from(p).ok())
        }) else {
            continue;
        };
        for e in &s.endpoints {
            let Some(addr) = e.addresses.first().and_then(|a| a.parse::<Ipv4Addr>().ok()) else {
                continue;
            };
            let local = e.node_name.as_deref() == Some(node.name.as_str());
            let ep = Endpoint { addr, port, local };
            if !seen.insert((addr, port)) {
                continue;
            }
            let c = e.conditions.as_ref();
            // Unset conditions count as true, terminating as false (the API's documented
            // meaning, as kube-proxy reads it).
            let ready = c.and_then(|c| c.ready).unwrap_or(true);
            let serving = c.and_then(|c| c.serving).unwrap_or(true);
            let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
            out.push(SliceEndpoint {
                ep,
                ready,
                serving,
                terminating,
                local,
            });
        }
    }
    out
}

/// kube-proxy's choice for one traffic policy: the ready endpoints, or when there are none
/// the serving terminating ones.
fn pick(eps: &[SliceEndpoint], local_only: bool, flags: u16, affinity: u32) -> FrontendSpec {
    let usable = |e: &&SliceEndpoint| !local_only || e.local;
    let mut ready: Vec<Endpoint> = eps
        .iter()
        .filter(usable)
        .filter(|e| e.ready)
        .map(|e| e.ep)
        .collect();
    let mut terminating: Vec<Endpoint> = eps
        .iter()
        .filter(usable)
        .filter(|e| !e.ready && e.serving && e.terminating)
        .map(|e| e.ep)
        .collect();
    ready.sort();
    terminating.sort();
    FrontendSpec {
        flags,
        affinity_timeout: affinity,
        ready,
        terminating,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    /// The node the unit tests of the services module run as.
    pub(crate) fn node() -> NodeView {
        NodeView {
            name: "n1".into(),
            addresses: vec![Ipv4Addr::new(192, 168, 7, 1)],
            xdp_fast_path: false,
        }
    }

    fn svc(spec: serde_json::Value) -> Service {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": spec,
        }))
        .expect("service")
    }

    fn slice(name: &str, ports: serde_json::Value, endpoints: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "default",
                         "labels": {SERVICE_NAME_LABEL: "web"}},
            "addressType": "IPv4",
            "ports": ports,
            "endpoints": endpoints,
        }))
        .expect("slice")
    }

    fn ep(ip: [u8; 4], port: u16) -> Endpoint {
        Endpoint {
            addr: Ipv4Addr::from(ip),
            port,
            local: false,
        }
    }

    fn local_ep(ip: [u8; 4], port: u16) -> Endpoint {
        Endpoint {
            local: true,
            ..ep(ip, port)
        }
    }

    fn key(ip: [u8; 4], port: u16, proto: u8, scope: u8) -> FrontendKey {
        FrontendKey {
            addr: Ipv4Addr::from(ip),
            port,
            proto,
            scope,
        }
    }

    /// Several ports, named target ports resolved through the slice's port names, TCP and UDP,
    /// readiness and terminating conditions.
    #[test]
    fn cluster_ip_ports_map_to_slice_ports_by_name() {
        let s = svc(json!({
            "clusterIP": "10.96.0.50",
            "ports": [
                {"name": "http", "port": 80, "targetPort": "web"},
                {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353},
            ],
        }));
        let sl = slice(
            "web-1",
            json!([{"name": "http", "port": 8080}, {"name": "dns", "port": 5353, "protocol": "UDP"}]),
            json!([
                {"addresses": ["10.244.1.5"], "conditions": {"ready": true}, "nodeName": "n1"},
                {"addresses": ["10.244.2.6"], "nodeName": "n2"},
                {"addresses": ["10.244.2.7"], "conditions": {"ready": false, "serving": true, "terminating": true}},
                {"addresses": ["10.244.2.8"], "conditions": {"ready": false}},
            ]),
        );
        let d = desired([&s], [&sl], &node());
        let http = &d.frontends[&key([10, 96, 0, 50], 80, 6, SCOPE_EXTERNAL)];
        assert_eq!(
            http.ready,
            vec![local_ep([10, 244, 1, 5], 8080), ep([10, 244, 2, 6], 8080)]
        );
        assert_eq!(http.terminating, vec![ep([10, 244, 2, 7], 8080)]);
        let dns = &d.frontends[&key([10, 96, 0, 50], 53, 17, SCOPE_EXTERNAL)];
        assert_eq!(dns.ready.len(), 2);
        assert_eq!(dns.ready[0].port, 5353);
        assert_eq!(d.frontends.len(), 2);
        assert_eq!(d.owners[&key([10, 96, 0, 50], 53, 17, 0)].port_name, "dns");
    }

    #[test]
    fn headless_and_external_name_services_get_no_frontend() {
        let headless = svc(json!({"clusterIP": "None", "ports": [{"port": 80}]}));
        let ext = svc(json!({"type": "ExternalName", "externalName": "example.org"}));
        let d = desired([&headless, &ext], [], &node());
        assert!(d.frontends.is_empty());
    }

    #[test]
    fn a_service_without_endpoints_still_has_its_frontend() {
        let s = svc(json!({"clusterIP": "10.96.0.51", "ports": [{"port": 80}]}));
        let d = desired([&s], [], &node());
        let f = &d.frontends[&key([10, 96, 0, 51], 80, 6, 0)];
        assert!(
            f.ready.is_empty() && f.terminating.is_empty(),
            "rejects, not black-holes"
        );
    }

    #[test]
    fn node_ports_external_ips_affinity_and_traffic_policies() {
        let s = svc(json!({
            "type": "NodePort",
            "clusterIP": "10.96.0.52",
            "externalIPs": ["203.0.113.9"],
            "externalTrafficPolicy": "Local",
            "internalTrafficPolicy": "Local",
            "sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}},
            "ports": [{"port": 80, "nodePort": 30080}],
        }));
        let sl = slice(
            "web-1",
            json!([{"port": 8080}]),
            json!([
                {"addresses": ["10.244.1.5"], "nodeName": "n1"},
                {"addresses": ["10.244.2.6"], "nodeName": "n2"},
            ]),
        );
        let d = desired([&s], [&sl], &node());
        let local = vec![local_ep([10, 244, 1, 5], 8080)];
        let both = vec![local_ep([10, 244, 1, 5], 8080), ep([10, 244, 2, 6], 8080)];
        let cip = &d.frontends[&key([10, 96, 0, 52], 80, 6, SCOPE_EXTERNAL)];
        assert_eq!(
            (cip.ready.clone(), cip.affinity_timeout),
            (local.clone(), 60)
        );
        assert_eq!(cip.flags, SVC_LOCAL_ONLY, "internalTrafficPolicy=Local");
        let np = &d.frontends[&key([192, 168, 7, 1], 30080, 6, SCOPE_EXTERNAL)];
        assert_eq!(np.ready, local);
        assert_eq!(np.flags, SVC_NODEPORT | SVC_LOCAL_ONLY | SVC_TWO_SCOPES);
        let np_in = &d.frontends[&key([192, 168, 7, 1], 30080, 6, SCOPE_INTERNAL)];
        assert_eq!(
            np_in.ready, both,
            "pods reach every endpoint through a NodePort"
        );
        let ext = &d.frontends[&key([203, 0, 113, 9], 80, 6, SCOPE_EXTERNAL)];
        assert_eq!(ext.flags & SVC_EXTERNAL_IP, SVC_EXTERNAL_IP);
        assert_eq!(d.frontends.len(), 5);
    }

    #[test]
    fn an_address_in_two_slices_counts_once() {
        let s = svc(json!({"clusterIP": "10.96.0.53", "ports": [{"port": 80}]}));
        let a = slice(
            "a",
            json!([{"port": 8080}]),
            json!([{"addresses": ["10.244.1.5"]}]),
        );
        let b = slice(
            "b",
            json!([{"port": 8080}]),
            json!([{"addresses": ["10.244.1.5"]}]),
        );
        let d = desired([&s], [&a, &b], &node());
        assert_eq!(d.frontends[&key([10, 96, 0, 53], 80, 6, 0)].ready.len(), 1);
    }
}
