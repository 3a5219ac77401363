//! The cluster's DNS records, as the Kubernetes DNS specification (and CoreDNS's `kubernetes`
//! plugin, which implements it) lays them out:
//!
//! - a Service with a ClusterIP: `A`/`AAAA` `<svc>.<ns>.svc.<zone>` → the ClusterIPs, `SRV`
//!   `_<port>._<proto>.<svc>.<ns>.svc.<zone>` per named port → that name and the Service port,
//!   `PTR` for each ClusterIP;
//! - a headless Service: `A` `<svc>.<ns>.svc.<zone>` → every ready endpoint address (the
//!   agent follows IPv4 EndpointSlices);
//!   each endpoint also under `<hostname>.<svc>.<ns>.svc.<zone>` (its `hostname`, set for pods
//!   whose `subdomain` is the Service — StatefulSet pods — else its address with dashes), which
//!   the `SRV` records point at with the endpoint's port; `PTR` for endpoints with a hostname;
//! - an ExternalName Service: `CNAME` `<svc>.<ns>.svc.<zone>` → the external name;
//! - pods: `<a-b-c-d>.<ns>.pod.<zone>` → `a.b.c.d`, from the name alone (CoreDNS's
//!   `pods insecure`, what kubeadm configures).
//!
//! The agent keeps each Service's records and replaces them when the Service or one of its
//! EndpointSlices changes ([`Zone::update`]), so a change costs that Service's records, and a
//! query is one hash lookup.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr},
    sync::{
        RwLock,
        atomic::{AtomicBool, Ordering},
    },
};

use hickory_server::proto::rr::{
    LowerName, Name, RData, Record, RecordType,
    rdata::{A, AAAA, CNAME, PTR, SOA, SRV},
};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use crate::services::tracker::ObjectKey;

/// Time to live of every answer (CoreDNS's default): Services change, and answers should follow
/// within seconds.
pub const TTL: u32 = 5;

/// What [`Zone::lookup`] found.
#[derive(Debug, PartialEq)]
pub enum Lookup {
    /// Not a name this zone answers for (forward it).
    Foreign,
    /// The zone has not been filled from the cluster yet (`SERVFAIL`: a client retries,
    /// where an `NXDOMAIN` would be cached).
    NotSynced,
    /// A reverse name the zone holds, without records of the asked type (`NOERROR`, no `SOA`:
    /// the name is outside the zone's own).
    Empty,
    /// Records of the asked type (or the `CNAME` the name is).
    Answer(Vec<Record>),
    /// The name exists with no records of the asked type (`NOERROR`, the zone's `SOA`).
    NoData(Record),
    /// No such name in the zone (`NXDOMAIN`, the zone's `SOA`).
    NxDomain(Record),
}

#[derive(Debug, Default)]
struct Index {
    /// The records each Service contributes.
    by_service: HashMap<ObjectKey, Vec<Record>>,
    /// Owner name → the Services with records there → their records.
    names: HashMap<LowerName, BTreeMap<ObjectKey, Vec<Record>>>,
    /// Names inside the zone between it and an owner name (`<ns>.svc.<zone>`, …), which exist
    /// without records: how many owner names lie below each.
    between: HashMap<LowerName, usize>,
    /// Bumped on every change: the `SOA` serial.
    serial: u32,
}

/// The records of one cluster domain (and the reverse names of its addresses).
#[derive(Debug)]
pub struct Zone {
    origin: Name,
    lower_origin: LowerName,
    /// `svc.<zone>` and `pod.<zone>`.
    svc: LowerName,
    pod: LowerName,
    index: RwLock<Index>,
    /// Filled from a complete list of Services and EndpointSlices, and still followed.
    synced: AtomicBool,
}

impl Zone {
    /// An empty zone for `domain` (`cluster.local`).
    pub fn new(domain: &str) -> Result<Zone, String> {
        let origin = Name::from_ascii(domain)
            .map_err(|e| format!("cluster domain {domain:?}: {e}"))?
            .to_lowercase();
        let mut origin = origin;
        origin.set_fqdn(true);
        let sub = |l: &str| -> Result<LowerName, String> {
            origin
                .prepend_label(l)
                .map(|n| LowerName::new(&n))
                .map_err(|e| format!("cluster domain {domain:?}: {e}"))
        };
        Ok(Zone {
            svc: sub("svc")?,
            pod: sub("pod")?,
            lower_origin: LowerName::new(&origin),
            origin,
            index: RwLock::new(Index::default()),
            synced: AtomicBool::new(false),
        })
    }

    /// Marks the zone as filled from the cluster (or, `false`, no longer followed).
    pub fn set_synced(&self, synced: bool) {
        self.synced.store(synced, Ordering::Release);
    }

    /// Replaces the records of the Service `key` (absent: deleted) given its EndpointSlices.
    pub fn update(&self, key: &ObjectKey, svc: Option<&Service>, slices: &[&EndpointSlice]) {
        let records = svc
            .map(|s| service_records(&self.origin, key, s, slices))
            .unwrap_or_default();
        let mut ix = self.index.write().unwrap_or_else(|p| p.into_inner());
        let old = ix.by_service.remove(key).unwrap_or_default();
        if old == records {
            if !records.is_empty() {
                ix.by_service.insert(key.clone(), records);
            }
            return;
        }
        for r in &old {
            let name = LowerName::new(&r.name);
            if let Some(owners) = ix.names.get_mut(&name) {
                owners.remove(key);
                if owners.is_empty() {
                    ix.names.remove(&name);
                    for n in self.ancestors(&name) {
                        if let Some(c) = ix.between.get_mut(&n) {
                            *c -= 1;
                            if *c == 0 {
                                ix.between.remove(&n);
                            }
                        }
                    }
                }
            }
        }
        for r in &records {
            let name = LowerName::new(&r.name);
            if !ix.names.contains_key(&name) {
                for n in self.ancestors(&name) {
                    *ix.between.entry(n).or_default() += 1;
                }
            }
            ix.names
                .entry(name)
                .or_default()
                .entry(key.clone())
                .or_default()
                .push(r.clone());
        }
        if !records.is_empty() {
            ix.by_service.insert(key.clone(), records);
        }
        ix.serial = ix.serial.wrapping_add(1);
    }

    /// The zone's `SOA` record (also what negative answers carry, its minimum the negative TTL).
    #[cfg(test)]
    pub fn soa(&self) -> Record {
        let serial = self.index.read().unwrap_or_else(|p| p.into_inner()).serial;
        self.soa_with(serial)
    }

    fn soa_with(&self, serial: u32) -> Record {
        let ns = self
            .origin
            .prepend_label("dns")
            .and_then(|n| n.prepend_label("ns"));
        let mbox = self.origin.prepend_label("hostmaster");
        let (Ok(ns), Ok(mbox)) = (ns, mbox) else {
            unreachable!("a valid zone name has room for two short labels")
        };
        Record::from_rdata(
            self.origin.clone(),
            TTL,
            RData::SOA(SOA::new(ns, mbox, serial, 7200, 1800, 86400, TTL)),
        )
    }

    /// Answers `name`/`qtype` from the zone.
    pub fn lookup(&self, name: &LowerName, qtype: RecordType) -> Lookup {
        let ours = self.lower_origin.zone_of(name);
        let ix = self.index.read().unwrap_or_else(|p| p.into_inner());
        if !self.synced.load(Ordering::Acquire) && (ours || ix.names.contains_key(name)) {
            return Lookup::NotSynced;
        }
        if let Some(owners) = ix.names.get(name) {
            let all = || owners.values().flatten();
            let mut out: Vec<Record> = all()
                .filter(|r| qtype == RecordType::ANY || r.record_type() == qtype)
                .cloned()
                .collect();
            if out.is_empty() {
                out.extend(
                    all()
                        .filter(|r| r.record_type() == RecordType::CNAME)
                        .cloned(),
                );
            }
            return match (out.is_empty(), ours) {
                (false, _) => Lookup::Answer(out),
                (true, true) => Lookup::NoData(self.soa_with(ix.serial)),
                (true, false) => Lookup::Empty,
            };
        }
        if !ours {
            // A reverse name of an address the zone does not hold is the upstream's.
            return Lookup::Foreign;
        }
        if *name == self.lower_origin {
            return match qtype {
                RecordType::SOA | RecordType::ANY => Lookup::Answer(vec![self.soa_with(ix.serial)]),
                _ => Lookup::NoData(self.soa_with(ix.serial)),
            };
        }
        if let Some(ip) = self.pod_address(name) {
            return match qtype {
                RecordType::A | RecordType::ANY => Lookup::Answer(vec![Record::from_rdata(
                    Name::from(name),
                    TTL,
                    RData::A(A(ip)),
                )]),
                _ => Lookup::NoData(self.soa_with(ix.serial)),
            };
        }
        // The names between the zone and the records (`svc.<zone>`, `<ns>.svc.<zone>`, …)
        // exist without records of their own.
        if *name == self.svc || *name == self.pod || ix.between.contains_key(name) {
            return Lookup::NoData(self.soa_with(ix.serial));
        }
        Lookup::NxDomain(self.soa_with(ix.serial))
    }

    /// The names strictly between `name` and the zone (none for names outside it).
    fn ancestors(&self, name: &LowerName) -> Vec<LowerName> {
        let mut out = Vec::new();
        if !self.lower_origin.zone_of(name) {
            return out;
        }
        let mut n = name.base_name();
        while n != self.lower_origin && n.num_labels() > self.lower_origin.num_labels() {
            let parent = n.base_name();
            out.push(n);
            n = parent;
        }
        out
    }

    /// `a-b-c-d.<ns>.pod.<zone>`'s address.
    fn pod_address(&self, name: &LowerName) -> Option<Ipv4Addr> {
        if name.num_labels() != self.pod.num_labels() + 2 || !self.pod.zone_of(name) {
            return None;
        }
        let n = Name::from(name);
        let first = n.iter().next()?;
        std::str::from_utf8(first)
            .ok()?
            .replace('-', ".")
            .parse()
            .ok()
    }
}

fn fqdn(labels: &[&str], origin: &Name) -> Option<Name> {
    let mut n = Name::from_labels(labels.iter().map(|l| l.as_bytes())).ok()?;
    n = n.append_domain(origin).ok()?;
    Some(n)
}

fn addr_record(name: &Name, ip: IpAddr) -> Record {
    let data = match ip {
        IpAddr::V4(v4) => RData::A(A(v4)),
        IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
    };
    Record::from_rdata(name.clone(), TTL, data)
}

fn ptr_record(ip: IpAddr, target: &Name) -> Record {
    Record::from_rdata(Name::from(ip), TTL, RData::PTR(PTR(target.clone())))
}

/// A named port: (name, protocol, number).
type NamedPort = (String, String, u16);

fn srv_name(port_name: &str, proto: &str, service: &Name) -> Option<Name> {
    let proto = format!("_{}", proto.to_ascii_lowercase());
    service
        .prepend_label(proto)
        .and_then(|n| n.prepend_label(format!("_{port_name}")))
        .ok()
}

/// One Service's records (sorted, so an unchanged Service compares equal).
fn service_records(
    origin: &Name,
    (ns, name): &ObjectKey,
    svc: &Service,
    slices: &[&EndpointSlice],
) -> Vec<Record> {
    let Some(spec) = svc.spec.as_ref() else {
        return Vec::new();
    };
    let Some(svc_name) = fqdn(&[name, ns, "svc"], origin) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if spec.type_.as_deref() == Some("ExternalName") {
        if let Some(target) = spec
            .external_name
            .as_deref()
            .and_then(|e| Name::from_ascii(e.trim_end_matches('.')).ok())
        {
            let mut target = target;
            target.set_fqdn(true);
            out.push(Record::from_rdata(
                svc_name,
                TTL,
                RData::CNAME(CNAME(target)),
            ));
        }
        return out;
    }
    let cluster_ips: Vec<IpAddr> = spec
        .cluster_ips
        .clone()
        .or_else(|| spec.cluster_ip.clone().map(|ip| vec![ip]))
        .unwrap_or_default()
        .iter()
        .filter_map(|ip| ip.parse().ok())
        .collect();
    if !cluster_ips.is_empty() {
        for ip in &cluster_ips {
            out.push(addr_record(&svc_name, *ip));
            out.push(ptr_record(*ip, &svc_name));
        }
        for p in spec.ports.iter().flatten() {
            let Some(pn) = p.name.as_deref().filter(|n| !n.is_empty()) else {
                continue;
            };
            let proto = p.protocol.as_deref().unwrap_or("TCP");
            if let Some(n) = srv_name(pn, proto, &svc_name) {
                let port = u16::try_from(p.port).unwrap_or(0);
                let srv = SRV::new(0, 100, port, svc_name.clone());
                out.push(Record::from_rdata(n, TTL, RData::SRV(srv)));
            }
        }
    } else {
        // Headless: the ready endpoints, each under its own name too.
        let mut seen = BTreeSet::new();
        let mut targets: Vec<(Name, Vec<NamedPort>)> = Vec::new();
        for slice in slices {
            let ports: Vec<NamedPort> = slice
                .ports
                .iter()
                .flatten()
                .filter_map(|p| {
                    let n = p.name.clone().filter(|n| !n.is_empty())?;
                    let proto = p.protocol.clone().unwrap_or_else(|| "TCP".into());
                    Some((n, proto, u16::try_from(p.port?).ok()?))
                })
                .collect();
            for ep in &slice.endpoints {
                let ready = ep.conditions.as_ref().and_then(|c| c.ready) != Some(false);
                if !ready {
                    continue;
                }
                for ip in ep.addresses.iter().filter_map(|a| a.parse::<IpAddr>().ok()) {
                    if !seen.insert(ip) {
                        continue;
                    }
                    out.push(addr_record(&svc_name, ip));
                    let host = ep.hostname.clone().filter(|h| !h.is_empty());
                    let label = host
                        .clone()
                        .unwrap_or_else(|| ip.to_string().replace(['.', ':'], "-"));
                    let Ok(ep_name) = svc_name.prepend_label(label.as_str()) else {
                        continue;
                    };
                    out.push(addr_record(&ep_name, ip));
                    if host.is_some() {
                        out.push(ptr_record(ip, &ep_name));
                    }
                    targets.push((ep_name, ports.clone()));
                }
            }
        }
        let weight = u16::try_from(100 / targets.len().max(1))
            .unwrap_or(1)
            .max(1);
        for (target, ports) in targets {
            for (pn, proto, port) in ports {
                if let Some(n) = srv_name(&pn, &proto, &svc_name) {
                    let srv = SRV::new(0, weight, port, target.clone());
                    out.push(Record::from_rdata(n, TTL, RData::SRV(srv)));
                }
            }
        }
    }
    out.sort_by_cached_key(|r| (r.name.to_ascii(), r.record_type(), r.data.to_string()));
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn svc(v: serde_json::Value) -> Service {
        serde_json::from_value(v).expect("service")
    }

    fn slice(v: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(v).expect("slice")
    }

    fn lower(n: &str) -> LowerName {
        LowerName::new(&Name::from_ascii(n).expect("name"))
    }

    fn key(ns: &str, n: &str) -> ObjectKey {
        (ns.into(), n.into())
    }

    fn answers(z: &Zone, n: &str, t: RecordType) -> Vec<String> {
        match z.lookup(&lower(n), t) {
            Lookup::Answer(rs) => {
                let mut v: Vec<String> = rs.iter().map(|r| r.data.to_string()).collect();
                v.sort();
                v
            }
            other => panic!("{n} {t}: {other:?}"),
        }
    }

    #[test]
    fn cluster_ip_service_has_a_srv_and_ptr() {
        let z = Zone::new("cluster.local").unwrap();
        // Before the zone is filled, names in it are not denied.
        assert_eq!(
            z.lookup(&lower("web.shop.svc.cluster.local."), RecordType::A),
            Lookup::NotSynced
        );
        assert_eq!(
            z.lookup(&lower("example.org."), RecordType::A),
            Lookup::Foreign
        );
        z.set_synced(true);
        let s = svc(json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.3.4", "clusterIPs": ["10.96.3.4"], "ports": [
                {"name": "http", "port": 80}, {"name": "dns", "port": 53, "protocol": "UDP"},
                {"port": 9000}]},
        }));
        z.update(&key("shop", "web"), Some(&s), &[]);
        assert_eq!(
            answers(&z, "web.shop.svc.cluster.local.", RecordType::A),
            ["10.96.3.4"]
        );
        // Case does not matter.
        assert_eq!(
            answers(&z, "WEB.Shop.svc.cluster.local.", RecordType::A),
            ["10.96.3.4"]
        );
        assert_eq!(
            answers(
                &z,
                "_http._tcp.web.shop.svc.cluster.local.",
                RecordType::SRV
            ),
            ["0 100 80 web.shop.svc.cluster.local."]
        );
        assert_eq!(
            answers(&z, "_dns._udp.web.shop.svc.cluster.local.", RecordType::SRV),
            ["0 100 53 web.shop.svc.cluster.local."]
        );
        assert_eq!(
            answers(&z, "4.3.96.10.in-addr.arpa.", RecordType::PTR),
            ["web.shop.svc.cluster.local."]
        );
        // The name exists; it has no AAAA.
        assert!(matches!(
            z.lookup(&lower("web.shop.svc.cluster.local."), RecordType::AAAA),
            Lookup::NoData(_)
        ));
        // Names between the zone and the record exist too.
        assert!(matches!(
            z.lookup(&lower("shop.svc.cluster.local."), RecordType::A),
            Lookup::NoData(_)
        ));
        assert!(matches!(
            z.lookup(&lower("nope.shop.svc.cluster.local."), RecordType::A),
            Lookup::NxDomain(_)
        ));
        // A reverse name without the asked type: no records, no SOA of ours.
        assert_eq!(
            z.lookup(&lower("4.3.96.10.in-addr.arpa."), RecordType::A),
            Lookup::Empty
        );
        assert_eq!(
            z.lookup(&lower("example.org."), RecordType::A),
            Lookup::Foreign
        );
        assert_eq!(
            z.lookup(&lower("9.9.9.9.in-addr.arpa."), RecordType::PTR),
            Lookup::Foreign
        );
        // Deleted: gone, reverse name included.
        z.update(&key("shop", "web"), None, &[]);
        assert!(matches!(
            z.lookup(&lower("web.shop.svc.cluster.local."), RecordType::A),
            Lookup::NxDomain(_)
        ));
        assert!(matches!(
            z.lookup(&lower("shop.svc.cluster.local."), RecordType::A),
            Lookup::NxDomain(_)
        ));
        assert_eq!(
            z.lookup(&lower("4.3.96.10.in-addr.arpa."), RecordType::PTR),
            Lookup::Foreign
        );
    }

    #[test]
    fn headless_service_answers_ready_endpoints_and_hostnames() {
        let z = Zone::new("cluster.local").unwrap();
        z.set_synced(true);
        let s = svc(json!({
            "metadata": {"name": "db", "namespace": "default"},
            "spec": {"clusterIP": "None", "clusterIPs": ["None"],
                "ports": [{"name": "pg", "port": 5432}]},
        }));
        let sl = slice(json!({
            "metadata": {"name": "db-abc", "namespace": "default",
                "labels": {"kubernetes.io/service-name": "db"}},
            "addressType": "IPv4",
            "ports": [{"name": "pg", "port": 5432, "protocol": "TCP"}],
            "endpoints": [
                {"addresses": ["10.244.1.5"], "hostname": "db-0", "conditions": {"ready": true}},
                {"addresses": ["10.244.2.6"], "conditions": {"ready": true}},
                {"addresses": ["10.244.2.7"], "hostname": "db-2", "conditions": {"ready": false}},
            ],
        }));
        z.update(&key("default", "db"), Some(&s), &[&sl]);
        assert_eq!(
            answers(&z, "db.default.svc.cluster.local.", RecordType::A),
            ["10.244.1.5", "10.244.2.6"]
        );
        assert_eq!(
            answers(&z, "db-0.db.default.svc.cluster.local.", RecordType::A),
            ["10.244.1.5"]
        );
        assert_eq!(
            answers(
                &z,
                "10-244-2-6.db.default.svc.cluster.local.",
                RecordType::A
            ),
            ["10.244.2.6"]
        );
        assert!(matches!(
            z.lookup(&lower("db-2.db.default.svc.cluster.local."), RecordType::A),
            Lookup::NxDomain(_)
        ));
        assert_eq!(
            answers(
                &z,
                "_pg._tcp.db.default.svc.cluster.local.",
                RecordType::SRV
            ),
            [
                "0 50 5432 10-244-2-6.db.default.svc.cluster.local.",
                "0 50 5432 db-0.db.default.svc.cluster.local."
            ]
        );
        assert_eq!(
            answers(&z, "5.1.244.10.in-addr.arpa.", RecordType::PTR),
            ["db-0.db.default.svc.cluster.local."]
        );
        // An endpoint turning ready appears; the serial moves.
        let before = z.soa();
        let mut sl2 = sl.clone();
        sl2.endpoints[2].conditions.as_mut().unwrap().ready = Some(true);
        z.update(&key("default", "db"), Some(&s), &[&sl2]);
        assert_eq!(
            answers(&z, "db-2.db.default.svc.cluster.local.", RecordType::A),
            ["10.244.2.7"]
        );
        assert_ne!(before, z.soa());
    }

    #[test]
    fn external_name_is_a_cname_and_pods_resolve_by_dashed_address() {
        let z = Zone::new("cluster.local").unwrap();
        z.set_synced(true);
        let s = svc(json!({
            "metadata": {"name": "ext", "namespace": "default"},
            "spec": {"type": "ExternalName", "externalName": "example.org"},
        }));
        z.update(&key("default", "ext"), Some(&s), &[]);
        // Any type asked of a CNAME answers the CNAME.
        assert_eq!(
            answers(&z, "ext.default.svc.cluster.local.", RecordType::A),
            ["example.org."]
        );
        assert_eq!(
            answers(&z, "10-244-0-9.team.pod.cluster.local.", RecordType::A),
            ["10.244.0.9"]
        );
        assert!(matches!(
            z.lookup(&lower("10-244-0-x.team.pod.cluster.local."), RecordType::A),
            Lookup::NxDomain(_)
        ));
        assert!(matches!(
            z.lookup(&lower("cluster.local."), RecordType::SOA),
            Lookup::Answer(_)
        ));
    }

    #[test]
    fn two_services_sharing_a_name_keep_their_own_records() {
        // A ClusterIP's PTR owned by two Services (one being replaced): removing one keeps the
        // other's.
        let z = Zone::new("cluster.local").unwrap();
        z.set_synced(true);
        let a = svc(json!({"metadata": {"name": "a", "namespace": "x"},
            "spec": {"clusterIP": "10.96.0.50"}}));
        let b = svc(json!({"metadata": {"name": "b", "namespace": "x"},
            "spec": {"clusterIP": "10.96.0.50"}}));
        z.update(&key("x", "a"), Some(&a), &[]);
        z.update(&key("x", "b"), Some(&b), &[]);
        assert_eq!(
            answers(&z, "50.0.96.10.in-addr.arpa.", RecordType::PTR).len(),
            2
        );
        z.update(&key("x", "a"), None, &[]);
        assert_eq!(
            answers(&z, "50.0.96.10.in-addr.arpa.", RecordType::PTR),
            ["b.x.svc.cluster.local."]
        );
    }
}
