//! The incremental side of [`desired`](super::desired): the agent keeps every Service's
//! contribution and recomputes only the Services an event touched (kube-proxy's
//! `ServiceChangeTracker`/`EndpointsChangeTracker` do the same), so one endpoint change at
//! 10,000 Services costs one Service's work, not 10,000.
//!
//! A Service is dirty when it or one of the EndpointSlices labelled with its name (before or
//! after the event) changed; a re-list marks everything it added, changed or dropped.
//! [`Tracker::changes`] recomputes the dirty Services and returns the frontends whose winning
//! spec may differ, for [`Programmer::apply_changes`](super::programmer::Programmer::apply_changes).

use std::collections::{BTreeMap, BTreeSet, HashMap, btree_map::Entry};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use super::desired::{
    Desired, FrontendKey, FrontendOwner, FrontendSpec, HealthCheck, NodeView, service_desired,
    slice_service,
};

/// `(namespace, name)`.
pub type ObjectKey = (String, String);

fn key_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> ObjectKey {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// What changed since the last call to [`Tracker::changes`].
#[derive(Debug, Default)]
pub struct Changes {
    /// Frontends to write (`Some`) or remove (`None`), each at most once.
    pub frontends: Vec<(FrontendKey, Option<FrontendSpec>)>,
    /// The health check ports changed.
    pub health: bool,
    /// The Services recomputed (changed, or with a changed EndpointSlice).
    pub services: Vec<ObjectKey>,
}

/// Services, EndpointSlices and what each Service contributes to the maps.
#[derive(Debug)]
pub struct Tracker {
    node: NodeView,
    services: HashMap<ObjectKey, Service>,
    /// Slices by their Service, then by slice name.
    slices: HashMap<ObjectKey, BTreeMap<String, EndpointSlice>>,
    /// Which Service each slice was filed under (its label can change).
    slice_owner: HashMap<ObjectKey, ObjectKey>,
    /// Each Service's contribution, as last computed.
    parts: HashMap<ObjectKey, Desired>,
    /// The Services contributing each frontend; the first wins.
    claims: HashMap<FrontendKey, BTreeSet<ObjectKey>>,
    /// The Services with a health check port, and the port.
    health: BTreeMap<ObjectKey, (u16, HealthCheck)>,
    dirty: BTreeSet<ObjectKey>,
}

impl Tracker {
    pub fn new(node: NodeView) -> Tracker {
        Tracker {
            node,
            services: HashMap::new(),
            slices: HashMap::new(),
            slice_owner: HashMap::new(),
            parts: HashMap::new(),
            claims: HashMap::new(),
            health: BTreeMap::new(),
            dirty: BTreeSet::new(),
        }
    }

    /// A Service was added or changed.
    pub fn set_service(&mut self, svc: Service) {
        let k = key_of(&svc.metadata);
        self.dirty.insert(k.clone());
        self.services.insert(k, svc);
    }

    /// A Service was deleted.
    pub fn remove_service(&mut self, svc: &Service) {
        let k = key_of(&svc.metadata);
        if self.services.remove(&k).is_some() {
            self.dirty.insert(k);
        }
    }

    /// An EndpointSlice was added or changed.
    pub fn set_slice(&mut self, slice: EndpointSlice) {
        let k = key_of(&slice.metadata);
        self.unfile(&k);
        if let Some(owner) = self.file(k, slice) {
            self.dirty.insert(owner);
        }
    }

    /// Files a slice under the Service it names (none: not usable, not kept); that Service.
    fn file(&mut self, k: ObjectKey, slice: EndpointSlice) -> Option<ObjectKey> {
        let owner = slice_service(&slice)?;
        self.slices
            .entry(owner.clone())
            .or_default()
            .insert(k.1.clone(), slice);
        self.slice_owner.insert(k, owner.clone());
        Some(owner)
    }

    /// An EndpointSlice was deleted.
    pub fn remove_slice(&mut self, slice: &EndpointSlice) {
        self.unfile(&key_of(&slice.metadata));
    }

    /// Takes a slice out from under the Service it was filed under.
    fn unfile(&mut self, k: &ObjectKey) {
        let Some(owner) = self.slice_owner.remove(k) else {
            return;
        };
        if let Some(by_name) = self.slices.get_mut(&owner) {
            by_name.remove(&k.1);
            if by_name.is_empty() {
                self.slices.remove(&owner);
            }
        }
        self.dirty.insert(owner);
    }

    /// A re-list of Services: the set replaces the old one.
    pub fn replace_services(&mut self, all: impl IntoIterator<Item = Service>) {
        let mut old = std::mem::take(&mut self.services);
        for s in all {
            let k = key_of(&s.metadata);
            if old.remove(&k).as_ref() != Some(&s) {
                self.dirty.insert(k.clone());
            }
            self.services.insert(k, s);
        }
        // Services that went away.
        self.dirty.extend(old.into_keys());
    }

    /// A re-list of EndpointSlices: the set replaces the old one.
    pub fn replace_slices(&mut self, all: impl IntoIterator<Item = EndpointSlice>) {
        let mut old: HashMap<ObjectKey, EndpointSlice> = HashMap::new();
        for (owner, by_name) in self.slices.drain() {
            for (name, s) in by_name {
                old.insert((owner.0.clone(), name), s);
            }
        }
        self.slice_owner.clear();
        for s in all {
            let k = key_of(&s.metadata);
            let prev = old.remove(&k);
            let changed = prev.as_ref() != Some(&s);
            let owner = self.file(k, s);
            if changed {
                // Its Service before the change too (the label may have moved).
                self.dirty.extend(prev.as_ref().and_then(slice_service));
                self.dirty.extend(owner);
            }
        }
        // Slices that went away (or changed Service) dirty the Service they were filed under.
        self.dirty.extend(old.values().filter_map(slice_service));
    }

    /// Recomputes the dirty Services; the frontends and health ports that may have changed.
    pub fn changes(&mut self) -> Changes {
        let mut out = Changes::default();
        let mut touched: BTreeSet<FrontendKey> = BTreeSet::new();
        for k in std::mem::take(&mut self.dirty) {
            out.services.push(k.clone());
            let part = match self.services.get(&k) {
                Some(svc) => {
                    let slices: Vec<&EndpointSlice> = self
                        .slices
                        .get(&k)
                        .map(|m| m.values().collect())
                        .unwrap_or_default();
                    service_desired(svc, &slices, &self.node)
                }
                None => Desired::default(),
            };
            let old = self.parts.remove(&k).unwrap_or_default();
            if old == part {
                if !part.frontends.is_empty() || !part.health.is_empty() {
                    self.parts.insert(k, part);
                }
                continue;
            }
            for fk in old.frontends.keys() {
                if !part.frontends.contains_key(fk)
                    && let Some(c) = self.claims.get_mut(fk)
                {
                    c.remove(&k);
                    if c.is_empty() {
                        self.claims.remove(fk);
                    }
                }
            }
            for (fk, spec) in &part.frontends {
                if old.frontends.get(fk) != Some(spec) {
                    touched.insert(*fk);
                }
                self.claims.entry(*fk).or_default().insert(k.clone());
            }
            touched.extend(
                old.frontends
                    .keys()
                    .filter(|fk| !part.frontends.contains_key(fk)),
            );
            let health = part.health.iter().next().map(|(p, h)| (*p, h.clone()));
            if self.health.get(&k) != health.as_ref() {
                out.health = true;
                match health {
                    Some(h) => self.health.insert(k.clone(), h),
                    None => self.health.remove(&k),
                };
            }
            if !part.frontends.is_empty() || !part.health.is_empty() {
                self.parts.insert(k, part);
            }
        }
        for fk in touched {
            out.frontends
                .push((fk, self.winner(&fk).map(|(_, s)| s.clone())));
        }
        out
    }

    /// A Service and its EndpointSlices.
    pub fn service(&self, k: &ObjectKey) -> (Option<&Service>, Vec<&EndpointSlice>) {
        let slices = self
            .slices
            .get(k)
            .map(|m| m.values().collect())
            .unwrap_or_default();
        (self.services.get(k), slices)
    }

    /// The Service a frontend belongs to and its spec.
    fn winner(&self, fk: &FrontendKey) -> Option<(&FrontendOwner, &FrontendSpec)> {
        let k = self.claims.get(fk)?.first()?;
        let part = self.parts.get(k)?;
        Some((part.owners.get(fk)?, part.frontends.get(fk)?))
    }

    /// The spec a frontend should have now.
    pub fn spec(&self, fk: &FrontendKey) -> Option<&FrontendSpec> {
        self.winner(fk).map(|(_, s)| s)
    }

    /// Who owns a frontend, for metrics and the CLI.
    pub fn owner(&self, fk: &FrontendKey) -> Option<&FrontendOwner> {
        self.winner(fk).map(|(o, _)| o)
    }

    /// The health check ports to answer (a port claimed twice goes to the first Service).
    pub fn health(&self) -> BTreeMap<u16, HealthCheck> {
        let mut out = BTreeMap::new();
        for (port, hc) in self.health.values() {
            if let Entry::Vacant(e) = out.entry(*port) {
                e.insert(hc.clone());
            }
        }
        out
    }

    /// Everything, as [`super::desired::desired`] computes it from scratch (after
    /// [`Tracker::changes`] has taken the dirty Services in).
    #[cfg(test)]
    pub fn desired(&self) -> Desired {
        let mut out = Desired::default();
        for fk in self.claims.keys() {
            if let Some((o, s)) = self.winner(fk) {
                out.frontends.insert(*fk, s.clone());
                out.owners.insert(*fk, o.clone());
            }
        }
        out.health = self.health();
        out
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use proptest::prelude::*;
    use serde_json::json;

    use super::*;
    use crate::services::desired::{desired, tests::node};

    /// Service `i` in namespace `ns`: several shapes, and Services 1 and 2 share an external IP
    /// (a conflict the first by name wins).
    fn service(ns: &str, i: u8, shape: u8) -> Service {
        let mut spec = json!({
            "clusterIP": format!("10.96.{}.{i}", ns.len()),
            "ports": [{"name": "http", "port": 80}, {"name": "dns", "port": 53, "protocol": "UDP"}],
        });
        match shape % 4 {
            0 => {}
            1 => {
                spec["type"] = json!("NodePort");
                spec["externalTrafficPolicy"] = json!("Local");
                spec["healthCheckNodePort"] = json!(32000 + u16::from(i));
                spec["ports"][0]["nodePort"] = json!(30000 + u16::from(i));
            }
            2 => spec["externalIPs"] = json!(["203.0.113.1"]),
            _ => spec["clusterIP"] = json!("None"),
        }
        serde_json::from_value(json!({
            "metadata": {"name": format!("s{i}"), "namespace": ns},
            "spec": spec,
        }))
        .expect("service")
    }

    /// Slice `j` labelled for Service `owner` (none when `owner` is 9) with the endpoints in
    /// the bits of `eps`.
    fn slice(ns: &str, j: u8, owner: u8, eps: u8) -> EndpointSlice {
        let mut meta = json!({"name": format!("x{j}"), "namespace": ns});
        if owner != 9 {
            meta["labels"] = json!({SERVICE_NAME: format!("s{owner}")});
        }
        let endpoints: Vec<_> = (0..4u8)
            .filter(|b| eps & (1 << b) != 0)
            .map(|b| {
                json!({
                    "addresses": [format!("10.244.{}.{}", b % 2, 10 + b)],
                    "nodeName": if b % 2 == 0 { "n1" } else { "n2" },
                    "conditions": {"ready": eps & 0x10 == 0 || b != 0,
                                   "serving": true, "terminating": eps & 0x10 != 0 && b == 0},
                })
            })
            .collect();
        serde_json::from_value(json!({
            "metadata": meta,
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}, {"name": "dns", "port": 5353, "protocol": "UDP"}],
            "endpoints": endpoints,
        }))
        .expect("slice")
    }

    const SERVICE_NAME: &str = crate::services::desired::SERVICE_NAME_LABEL;

    #[derive(Clone, Debug)]
    enum Op {
        SetService(bool, u8, u8),
        RemoveService(bool, u8),
        SetSlice(bool, u8, u8, u8),
        RemoveSlice(bool, u8),
        /// A re-list after missed events: keep the objects whose index bit is set, and a
        /// slice and a Service changed while the watch was down.
        Relist(u16, Option<(bool, u8, u8, u8)>, Option<(bool, u8, u8)>),
        /// A pass: the changes are taken and applied.
        Pass,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (any::<bool>(), 0..4u8, 0..4u8).prop_map(|(a, i, s)| Op::SetService(a, i, s)),
            (any::<bool>(), 0..4u8).prop_map(|(a, i)| Op::RemoveService(a, i)),
            (
                any::<bool>(),
                0..3u8,
                prop_oneof![0..4u8, Just(9)],
                any::<u8>()
            )
                .prop_map(|(a, j, o, e)| Op::SetSlice(a, j, o, e)),
            (any::<bool>(), 0..3u8).prop_map(|(a, j)| Op::RemoveSlice(a, j)),
            (
                any::<u16>(),
                prop::option::of((
                    any::<bool>(),
                    0..3u8,
                    prop_oneof![0..4u8, Just(9)],
                    any::<u8>()
                )),
                prop::option::of((any::<bool>(), 0..4u8, 0..4u8)),
            )
                .prop_map(|(k, sl, sv)| Op::Relist(k, sl, sv)),
            Just(Op::Pass),
        ]
    }

    fn ns(a: bool) -> &'static str {
        if a { "a" } else { "bb" }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// Whatever the events, the frontends built up from the tracker's changes equal what
        /// `desired()` computes from scratch over the same objects.
        #[test]
        fn incremental_changes_equal_a_full_recompute(ops in prop::collection::vec(op(), 1..40)) {
            let mut t = Tracker::new(node());
            let mut services: BTreeMap<ObjectKey, Service> = BTreeMap::new();
            let mut slices: BTreeMap<ObjectKey, EndpointSlice> = BTreeMap::new();
            let mut programmed: BTreeMap<FrontendKey, FrontendSpec> = BTreeMap::new();
            let mut health = BTreeMap::new();
            for op in ops.into_iter().chain([Op::Pass]) {
                match op {
                    Op::SetService(a, i, shape) => {
                        let s = service(ns(a), i, shape);
                        services.insert(key_of(&s.metadata), s.clone());
                        t.set_service(s);
                    }
                    Op::RemoveService(a, i) => {
                        let s = service(ns(a), i, 0);
                        services.remove(&key_of(&s.metadata));
                        t.remove_service(&s);
                    }
                    Op::SetSlice(a, j, owner, eps) => {
                        let s = slice(ns(a), j, owner, eps);
                        slices.insert(key_of(&s.metadata), s.clone());
                        t.set_slice(s);
                    }
                    Op::RemoveSlice(a, j) => {
                        let s = slice(ns(a), j, 0, 0);
                        slices.remove(&key_of(&s.metadata));
                        t.remove_slice(&s);
                    }
                    Op::Relist(keep, missed_slice, missed_service) => {
                        let mut bit = 0;
                        services.retain(|_, _| { bit += 1; keep & (1 << (bit % 16)) != 0 });
                        slices.retain(|_, _| { bit += 1; keep & (1 << (bit % 16)) != 0 });
                        if let Some((a, j, owner, eps)) = missed_slice {
                            let s = slice(ns(a), j, owner, eps);
                            slices.insert(key_of(&s.metadata), s);
                        }
                        if let Some((a, i, shape)) = missed_service {
                            let s = service(ns(a), i, shape);
                            services.insert(key_of(&s.metadata), s);
                        }
                        t.replace_services(services.values().cloned());
                        t.replace_slices(slices.values().cloned());
                    }
                    Op::Pass => {
                        let c = t.changes();
                        for (k, s) in c.frontends {
                            match s {
                                Some(s) => programmed.insert(k, s),
                                None => programmed.remove(&k),
                            };
                        }
                        if c.health {
                            health = t.health();
                        }
                        let full = desired(services.values(), slices.values(), &node());
                        prop_assert_eq!(&programmed, &full.frontends);
                        prop_assert_eq!(&health, &full.health);
                        prop_assert_eq!(t.desired(), full);
                    }
                }
            }
        }
    }

    /// One endpoint change among many Services recomputes and reports that Service only.
    #[test]
    fn one_endpoint_change_touches_one_service() {
        let mut t = Tracker::new(node());
        // Slice `i` of Service `i` (9 would mean unlabelled).
        t.replace_services((10..210u8).map(|i| service("a", i, 0)));
        t.replace_slices((10..210u8).map(|i| slice("a", i, i, 0b1111)));
        assert_eq!(t.changes().frontends.len(), 400, "TCP and UDP per Service");
        assert!(t.changes().frontends.is_empty(), "nothing is dirty");
        t.set_slice(slice("a", 17, 17, 0b0111));
        let c = t.changes();
        let keys: Vec<_> = c.frontends.iter().map(|(k, _)| k.port).collect();
        assert_eq!(keys, vec![53, 80], "{c:?}");
        // The same objects again (a re-list after a reconnect) change nothing.
        t.replace_slices(
            (10..210u8).map(|i| slice("a", i, i, if i == 17 { 0b0111 } else { 0b1111 })),
        );
        assert!(t.changes().frontends.is_empty());
    }

    /// A slice relabelled to another Service leaves the first one and joins the second.
    #[test]
    fn a_relabelled_slice_moves_between_services() {
        let mut t = Tracker::new(node());
        t.set_service(service("a", 1, 0));
        t.set_service(service("a", 2, 0));
        t.set_slice(slice("a", 0, 1, 0b1));
        t.changes();
        t.set_slice(slice("a", 0, 2, 0b1));
        let c = t.changes();
        let ready = |ip: [u8; 4]| {
            c.frontends
                .iter()
                .find(|(k, _)| k.addr == Ipv4Addr::from(ip) && k.port == 80)
                .and_then(|(_, s)| s.as_ref())
                .map(|s| s.ready.len())
        };
        assert_eq!(ready([10, 96, 1, 1]), Some(0));
        assert_eq!(ready([10, 96, 1, 2]), Some(1));
    }
}
