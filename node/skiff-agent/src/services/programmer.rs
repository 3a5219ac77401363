//! Brings the service maps from what they hold to what is desired with the fewest writes: a
//! frontend whose spec did not change is not touched, a changed one gets only its changed
//! backends and slots written (kube-proxy's iptables mode rewrites whole tables instead).
//!
//! Write order keeps every packet's view consistent: new backends before the slots naming them,
//! slots before the frontend entry that counts them; when shrinking, the frontend entry first,
//! then the slots past its new count, then the backends no slot names any more.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;

use skiff_datapath::{DatapathError, lb::LbTable};
use skiff_ebpf_common::lb::{
    BE_LOCAL, BE_TERMINATING, Backend, SERVICE_IDS, ServiceKey, ServiceValue,
};

use super::desired::{Endpoint, FrontendKey, FrontendSpec};

/// What is in the maps for one frontend.
#[derive(Clone, Debug)]
struct Programmed {
    service_id: u32,
    /// `None` when a write failed: the next pass rewrites everything.
    spec: Option<FrontendSpec>,
    /// Backend ids by slot (slot `i + 1`), ready then terminating.
    ids: Vec<u32>,
    /// How many slots may exist in the map (more than `ids` after a failed write).
    slots: usize,
    /// Every backend id this frontend owns in the map, with its endpoint and terminating flag
    /// (more than `ids` after a failed write).
    endpoints: HashMap<u32, (Endpoint, bool)>,
}

/// Ids handed out in increasing order, wrapping, skipping ids in use: a freed id is not reused
/// until the counter comes round, so stale references (affinity, counters) rarely meet a new
/// owner.
#[derive(Debug)]
struct IdPool {
    used: BTreeSet<u32>,
    next: u32,
    max: u32,
}

impl IdPool {
    fn new(max: u32) -> IdPool {
        IdPool {
            used: BTreeSet::new(),
            next: 1,
            max,
        }
    }

    fn take(&mut self) -> Option<u32> {
        if self.used.len() as u64 >= u64::from(self.max - 1) {
            return None;
        }
        loop {
            let id = self.next;
            self.next = if self.next + 1 >= self.max {
                1
            } else {
                self.next + 1
            };
            if self.used.insert(id) {
                return Some(id);
            }
        }
    }

    fn mark(&mut self, id: u32) {
        self.used.insert(id);
        if id >= self.next && id + 1 < self.max {
            self.next = id + 1;
        }
    }

    fn free(&mut self, id: u32) {
        self.used.remove(&id);
    }
}

/// Most backends one frontend may have (slot numbers are 16-bit).
pub const MAX_BACKENDS: usize = 16_384;

/// The result of one pass.
#[derive(Debug, Default)]
pub struct Report {
    /// Frontends written (added or changed).
    pub written: usize,
    /// Frontends removed.
    pub removed: usize,
    /// Frontends that could not be written, with why.
    pub errors: Vec<(FrontendKey, DatapathError)>,
}

/// The agent's record of the service maps, and the writer that keeps them as desired.
#[derive(Debug)]
pub struct Programmer {
    current: BTreeMap<FrontendKey, Programmed>,
    service_ids: IdPool,
    backend_ids: IdPool,
}

fn skey(k: &FrontendKey, slot: u16) -> ServiceKey {
    ServiceKey::new(
        u32::from_ne_bytes(k.addr.octets()),
        k.port.to_be(),
        k.proto,
        k.scope,
        slot,
    )
}

fn backend_value(ep: &Endpoint, proto: u8, terminating: bool) -> Backend {
    Backend {
        address: u32::from_ne_bytes(ep.addr.octets()),
        port: ep.port.to_be(),
        proto,
        flags: if terminating { BE_TERMINATING } else { 0 } | if ep.local { BE_LOCAL } else { 0 },
    }
}

impl Default for Programmer {
    fn default() -> Self {
        Programmer::new()
    }
}

impl Programmer {
    /// A programmer for empty maps.
    pub fn new() -> Programmer {
        Programmer {
            current: BTreeMap::new(),
            service_ids: IdPool::new(SERVICE_IDS),
            backend_ids: IdPool::new(u32::MAX),
        }
    }

    /// A programmer for maps a previous run left (read back from them): frontends keep their
    /// ids and are not rewritten unless they changed, so a restart disturbs no flow. Entries
    /// that are inconsistent (slots without a frontend, backends no slot names) are removed.
    pub fn adopt(
        services: &[(ServiceKey, ServiceValue)],
        backends: &[(u32, Backend)],
        table: &mut dyn LbTable,
    ) -> Programmer {
        let mut p = Programmer::new();
        let backends: HashMap<u32, Backend> = backends.iter().copied().collect();
        let mut slots: BTreeMap<(FrontendKey, u16), u32> = BTreeMap::new();
        let mut fronts: BTreeMap<FrontendKey, ServiceValue> = BTreeMap::new();
        for (k, v) in services {
            let fk = FrontendKey {
                addr: Ipv4Addr::from(k.address.to_ne_bytes()),
                port: u16::from_be(k.port),
                proto: k.proto,
                scope: k.scope,
            };
            if k.slot == 0 {
                fronts.insert(fk, *v);
            } else {
                slots.insert((fk, k.slot), v.backend_id);
            }
        }
        let mut referenced = BTreeSet::new();
        for (fk, v) in &fronts {
            let total = v.count as usize + v.terminating as usize;
            let mut ids = Vec::with_capacity(total);
            let mut endpoints = HashMap::new();
            let mut ready = Vec::new();
            let mut terminating = Vec::new();
            let mut complete = true;
            for slot in 1..=total as u16 {
                match slots
                    .get(&(*fk, slot))
                    .and_then(|id| backends.get(id).map(|b| (*id, b)))
                {
                    Some((id, b)) => {
                        let ep = Endpoint {
                            addr: Ipv4Addr::from(b.address.to_ne_bytes()),
                            port: u16::from_be(b.port),
                            local: b.flags & BE_LOCAL != 0,
                        };
                        let term = usize::from(slot) > v.count as usize;
                        if term {
                            terminating.push(ep);
                        } else {
                            ready.push(ep);
                        }
                        ids.push(id);
                        endpoints.insert(id, (ep, b.flags & BE_TERMINATING != 0));
                        referenced.insert(id);
                        p.backend_ids.mark(id);
                    }
                    None => complete = false,
                }
            }
            p.service_ids.mark(v.service_id);
            p.current.insert(
                *fk,
                Programmed {
                    service_id: v.service_id,
                    spec: complete.then_some(FrontendSpec {
                        flags: v.flags,
                        affinity_timeout: v.affinity_timeout,
                        ready,
                        terminating,
                    }),
                    slots: total,
                    ids,
                    endpoints,
                },
            );
        }
        // Leftovers: slots past a frontend's count or without a frontend, unnamed backends.
        for (fk, slot) in slots.keys() {
            let keep = fronts
                .get(fk)
                .is_some_and(|v| usize::from(*slot) <= v.count as usize + v.terminating as usize);
            if !keep {
                let _ = table.remove_service(&skey(fk, *slot));
            }
        }
        for id in backends.keys() {
            if !referenced.contains(id) {
                let _ = table.remove_backend(*id);
            }
        }
        p
    }

    /// Number of frontends programmed.
    pub fn frontends(&self) -> usize {
        self.current.len()
    }

    /// Number of backends programmed.
    pub fn backends(&self) -> usize {
        self.backend_ids.used.len()
    }

    /// The service id of one frontend.
    pub fn service_id(&self, k: &FrontendKey) -> Option<u32> {
        self.current.get(k).map(|p| p.service_id)
    }

    /// The service id of each frontend.
    pub fn service_ids(&self) -> impl Iterator<Item = (&FrontendKey, u32)> {
        self.current.iter().map(|(k, p)| (k, p.service_id))
    }

    /// Makes the maps hold `desired` (every frontend not in it is removed).
    pub fn apply(
        &mut self,
        desired: &BTreeMap<FrontendKey, FrontendSpec>,
        table: &mut dyn LbTable,
    ) -> Report {
        let gone: Vec<FrontendKey> = self
            .current
            .keys()
            .filter(|k| !desired.contains_key(k))
            .copied()
            .collect();
        let changes = desired
            .iter()
            .map(|(k, s)| (*k, Some(s)))
            .chain(gone.into_iter().map(|k| (k, None)));
        self.apply_changes(changes, table)
    }

    /// Writes (`Some`) or removes (`None`) the given frontends, leaving every other one as it
    /// is: the incremental pass, fed by [`super::tracker::Tracker::changes`].
    pub fn apply_changes<'a>(
        &mut self,
        changes: impl IntoIterator<Item = (FrontendKey, Option<&'a FrontendSpec>)>,
        table: &mut dyn LbTable,
    ) -> Report {
        let mut report = Report::default();
        let mut writes = Vec::new();
        let mut gone = Vec::new();
        for (k, spec) in changes {
            match spec {
                Some(spec) => writes.push((k, spec)),
                None => gone.push(k),
            }
        }
        // Internal-scope entries before the external ones that point pods at them; writes
        // before removals, so an external entry stops naming its internal scope before that
        // goes.
        writes.sort_by_key(|(k, _)| std::cmp::Reverse(k.scope));
        for (k, spec) in writes {
            let k = &k;
            if self.current.get(k).and_then(|p| p.spec.as_ref()) == Some(spec) {
                continue;
            }
            if spec.ready.len() + spec.terminating.len() > MAX_BACKENDS {
                report.errors.push((
                    *k,
                    DatapathError::MapFull {
                        map: "backend slots (more than 16384 endpoints)",
                    },
                ));
                continue;
            }
            match self.write(k, spec, table) {
                Ok(()) => report.written += 1,
                Err(e) => report.errors.push((*k, e)),
            }
        }
        for k in gone {
            match self.remove(&k, table) {
                Ok(()) => report.removed += 1,
                Err(e) => report.errors.push((k, e)),
            }
        }
        report
    }

    fn remove(&mut self, k: &FrontendKey, table: &mut dyn LbTable) -> Result<(), DatapathError> {
        let Some(p) = self.current.get_mut(k) else {
            return Ok(());
        };
        // Dirty until every entry is gone: a failure half-way leaves a record that the next
        // pass rewrites in full if the frontend is wanted again.
        let had_affinity = p.spec.take().is_none_or(|s| s.affinity_timeout != 0);
        table.remove_service(&skey(k, 0))?;
        for slot in 1..=p.slots as u16 {
            table.remove_service(&skey(k, slot))?;
        }
        for id in p.endpoints.keys() {
            table.remove_backend(*id)?;
        }
        if had_affinity {
            let _ = table.prune_affinity(p.service_id, &|_| false);
        }
        let p = self.current.remove(k).expect("present");
        for id in p.endpoints.into_keys() {
            self.backend_ids.free(id);
        }
        self.service_ids.free(p.service_id);
        Ok(())
    }

    fn write(
        &mut self,
        k: &FrontendKey,
        spec: &FrontendSpec,
        table: &mut dyn LbTable,
    ) -> Result<(), DatapathError> {
        let full = || DatapathError::MapFull {
            map: skiff_ebpf_common::map_names::SERVICES,
        };
        if !self.current.contains_key(k) {
            let id = self.service_ids.take().ok_or_else(full)?;
            if let Err(e) = table.reset_stats(id) {
                self.service_ids.free(id);
                return Err(e);
            }
            self.current.insert(
                *k,
                Programmed {
                    service_id: id,
                    spec: None,
                    ids: Vec::new(),
                    slots: 0,
                    endpoints: HashMap::new(),
                },
            );
        }
        let p = self.current.get_mut(k).expect("inserted above");
        // Until this write completes the record is "dirty" (spec None): a failed pass leaves it
        // so, and the next one rewrites every entry and cleans up whatever this one added.
        let old_spec = p.spec.take();
        let dirty = old_spec.is_none();
        // Keep the id of every endpoint that stays, so established flows and affinity entries
        // keep naming it.
        let by_endpoint: HashMap<Endpoint, u32> =
            p.endpoints.iter().map(|(id, (ep, _))| (*ep, *id)).collect();
        let wanted = spec
            .ready
            .iter()
            .map(|e| (*e, false))
            .chain(spec.terminating.iter().map(|e| (*e, true)));
        let mut ids = Vec::with_capacity(spec.ready.len() + spec.terminating.len());
        let mut endpoints = HashMap::with_capacity(ids.capacity());
        for (ep, term) in wanted {
            let id = match by_endpoint.get(&ep) {
                Some(id) => *id,
                None => self.backend_ids.take().ok_or_else(full)?,
            };
            ids.push(id);
            endpoints.insert(id, (ep, term));
        }
        let old_endpoints = p.endpoints.clone();
        p.endpoints
            .extend(endpoints.iter().map(|(id, v)| (*id, *v)));
        p.slots = p.slots.max(ids.len());

        for id in &ids {
            let (ep, term) = endpoints[id];
            if dirty || old_endpoints.get(id) != Some(&(ep, term)) {
                table.set_backend(*id, backend_value(&ep, k.proto, term))?;
            }
        }
        for (i, id) in ids.iter().enumerate() {
            if dirty || p.ids.get(i) != Some(id) {
                let v = ServiceValue {
                    backend_id: *id,
                    ..ServiceValue::default()
                };
                table.set_service(skey(k, i as u16 + 1), v)?;
            }
        }
        let front = ServiceValue {
            backend_id: 0,
            service_id: p.service_id,
            affinity_timeout: spec.affinity_timeout,
            count: spec.ready.len() as u16,
            terminating: spec.terminating.len() as u16,
            flags: spec.flags,
            pad: 0,
        };
        table.set_service(skey(k, 0), front)?;
        for slot in ids.len() + 1..=p.slots {
            table.remove_service(&skey(k, slot as u16))?;
        }
        p.slots = ids.len();
        let stale: Vec<u32> = p
            .endpoints
            .keys()
            .filter(|id| !endpoints.contains_key(id))
            .copied()
            .collect();
        for id in stale {
            table.remove_backend(id)?;
            p.endpoints.remove(&id);
            self.backend_ids.free(id);
        }
        if spec.affinity_timeout != 0 || old_spec.is_some_and(|s| s.affinity_timeout != 0) {
            table.prune_affinity(p.service_id, &|id| endpoints.contains_key(&id))?;
        }
        p.ids = ids;
        p.spec = Some(spec.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use skiff_ebpf_common::lb::SCOPE_EXTERNAL;

    /// A table that keeps the maps in memory and records every write.
    #[derive(Default)]
    struct Fake {
        services: BTreeMap<ServiceKey, ServiceValue>,
        backends: BTreeMap<u32, Backend>,
        writes: Vec<String>,
        fail_backends_after: Option<usize>,
    }

    impl LbTable for Fake {
        fn set_service(
            &mut self,
            key: ServiceKey,
            value: ServiceValue,
        ) -> Result<(), DatapathError> {
            self.writes.push(format!("svc {}", key.slot));
            self.services.insert(key, value);
            Ok(())
        }
        fn remove_service(&mut self, key: &ServiceKey) -> Result<(), DatapathError> {
            self.writes.push(format!("-svc {}", key.slot));
            self.services.remove(key);
            Ok(())
        }
        fn set_backend(&mut self, id: u32, backend: Backend) -> Result<(), DatapathError> {
            if self
                .fail_backends_after
                .is_some_and(|n| self.backends.len() >= n)
            {
                return Err(DatapathError::MapFull { map: "skiff_lb_be" });
            }
            self.writes.push(format!("be {id}"));
            self.backends.insert(id, backend);
            Ok(())
        }
        fn remove_backend(&mut self, id: u32) -> Result<(), DatapathError> {
            self.writes.push(format!("-be {id}"));
            self.backends.remove(&id);
            Ok(())
        }
        fn prune_affinity(&mut self, _: u32, _: &dyn Fn(u32) -> bool) -> Result<(), DatapathError> {
            Ok(())
        }
        fn reset_stats(&mut self, _: u32) -> Result<(), DatapathError> {
            Ok(())
        }
    }

    fn key(port: u16) -> FrontendKey {
        FrontendKey {
            addr: Ipv4Addr::new(10, 96, 0, 1),
            port,
            proto: 6,
            scope: SCOPE_EXTERNAL,
        }
    }

    fn ep(last: u8) -> Endpoint {
        Endpoint {
            addr: Ipv4Addr::new(10, 244, 0, last),
            port: 8080,
            local: last.is_multiple_of(2),
        }
    }

    fn spec(ready: &[u8]) -> FrontendSpec {
        FrontendSpec {
            flags: 0,
            affinity_timeout: 0,
            ready: ready.iter().map(|l| ep(*l)).collect(),
            terminating: Vec::new(),
        }
    }

    fn resolved(t: &Fake, k: &FrontendKey) -> Vec<Ipv4Addr> {
        let front = t.services[&skey(k, 0)];
        (1..=front.count + front.terminating)
            .map(|s| {
                let id = t.services[&skey(k, s)].backend_id;
                Ipv4Addr::from(t.backends[&id].address.to_ne_bytes())
            })
            .collect()
    }

    #[test]
    fn one_endpoint_change_writes_only_what_changed() {
        let mut t = Fake::default();
        let mut p = Programmer::new();
        let mut want: BTreeMap<_, _> = (0..100)
            .map(|i| (key(1000 + i), spec(&[1, 2, 3])))
            .collect();
        let r = p.apply(&want, &mut t);
        assert_eq!((r.written, r.errors.len()), (100, 0));
        t.writes.clear();
        // Nothing changed: nothing written.
        p.apply(&want, &mut t);
        assert!(t.writes.is_empty(), "{:?}", t.writes);
        // One endpoint added to one service: one backend, one slot, the frontend.
        want.insert(key(1050), spec(&[1, 2, 3, 4]));
        p.apply(&want, &mut t);
        assert_eq!(t.writes.len(), 3, "{:?}", t.writes);
        assert_eq!(resolved(&t, &key(1050)).len(), 4);
    }

    #[test]
    fn shrinking_updates_the_count_before_removing_slots_and_backends() {
        let mut t = Fake::default();
        let mut p = Programmer::new();
        let mut want = BTreeMap::from([(key(80), spec(&[1, 2, 3]))]);
        p.apply(&want, &mut t);
        t.writes.clear();
        want.insert(key(80), spec(&[1]));
        p.apply(&want, &mut t);
        let front = t
            .writes
            .iter()
            .position(|w| w == "svc 0")
            .expect("frontend written");
        let first_removal = t
            .writes
            .iter()
            .position(|w| w.starts_with('-'))
            .expect("removals");
        assert!(front < first_removal, "{:?}", t.writes);
        assert_eq!(resolved(&t, &key(80)), vec![Ipv4Addr::new(10, 244, 0, 1)]);
        assert_eq!(t.backends.len(), 1);
        assert_eq!(t.services.len(), 2);
    }

    #[test]
    fn staying_endpoints_keep_their_backend_id() {
        let mut t = Fake::default();
        let mut p = Programmer::new();
        p.apply(&BTreeMap::from([(key(80), spec(&[1, 2]))]), &mut t);
        let id_of_2 = t.services[&skey(&key(80), 2)].backend_id;
        p.apply(&BTreeMap::from([(key(80), spec(&[2, 3]))]), &mut t);
        assert_eq!(t.services[&skey(&key(80), 1)].backend_id, id_of_2);
    }

    #[test]
    fn removed_services_leave_nothing_behind() {
        let mut t = Fake::default();
        let mut p = Programmer::new();
        p.apply(
            &BTreeMap::from([(key(80), spec(&[1, 2])), (key(81), spec(&[]))]),
            &mut t,
        );
        let r = p.apply(&BTreeMap::new(), &mut t);
        assert_eq!(r.removed, 2);
        assert!(t.services.is_empty() && t.backends.is_empty());
    }

    #[test]
    fn adoption_after_a_restart_rewrites_nothing_that_is_unchanged() {
        let mut t = Fake::default();
        let mut p = Programmer::new();
        let want = BTreeMap::from([
            (key(80), spec(&[1, 2])),
            (
                key(81),
                FrontendSpec {
                    terminating: vec![ep(9)],
                    ..spec(&[3])
                },
            ),
        ]);
        p.apply(&want, &mut t);
        // A stray backend and a stray slot, as a crash mid-write could leave.
        t.backends.insert(9999, Backend::default());
        t.services
            .insert(skey(&key(80), 7), ServiceValue::default());
        let services: Vec<_> = t.services.iter().map(|(k, v)| (*k, *v)).collect();
        let backends: Vec<_> = t.backends.iter().map(|(k, v)| (*k, *v)).collect();
        t.writes.clear();
        let mut again = Programmer::adopt(&services, &backends, &mut t);
        assert!(!t.backends.contains_key(&9999) && !t.services.contains_key(&skey(&key(80), 7)));
        t.writes.clear();
        let r = again.apply(&want, &mut t);
        assert_eq!(r.written, 0);
        assert!(t.writes.is_empty(), "{:?}", t.writes);
    }

    #[test]
    fn a_full_map_is_reported_and_retried() {
        let mut t = Fake {
            fail_backends_after: Some(2),
            ..Fake::default()
        };
        let mut p = Programmer::new();
        let want = BTreeMap::from([(key(80), spec(&[1, 2, 3]))]);
        let r = p.apply(&want, &mut t);
        assert_eq!(r.errors.len(), 1);
        assert!(matches!(r.errors[0].1, DatapathError::MapFull { .. }));
        t.fail_backends_after = None;
        let r = p.apply(&want, &mut t);
        assert_eq!((r.written, r.errors.len()), (1, 0));
        assert_eq!(resolved(&t, &key(80)).len(), 3);
    }
}
