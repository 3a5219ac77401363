//! The agent's policy loop: follows pods, namespaces, nodes, NetworkPolicies and security
//! identities; allocates the identities of this node's pods; and brings the node's policy maps
//! and its endpoints' isolation flags to what [`super::desired`] computes. Each pass
//! recomputes everything and writes only what differs.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result};
use futures::StreamExt;
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod},
    networking::v1::NetworkPolicy,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    runtime::{WatchStreamExt, reflector},
};
use skiff_apimachinery::identity::{
    IdentityLabels, SecurityIdentity, allocate, namespace_labels, pod_live,
};
use skiff_datapath::{PinDir, endpoints::EndpointMap, policy::PolicyMaps};
use skiff_ebpf_common::policy::{EP_AUDIT, EP_EGRESS_ISOLATED, EP_ID_SHIFT, EP_INGRESS_ISOLATED};
use tokio::sync::{Notify, watch};

use super::{
    desired::{Desired, NamedPorts, PodFacts, View, audited, desired},
    flows::{NamedPod, Names},
    gate::Gate,
    rules,
};

/// A kind followed through a reflector, driven by its own task (which ends with the returned
/// guard): its store, and `changed` notified on every event.
fn follow<K>(
    client: &Client,
    changed: &Arc<Notify>,
) -> (reflector::Store<K>, tokio::task::JoinHandle<()>)
where
    K: Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let changed = changed.clone();
    let task = tokio::spawn(
        crate::services::stream::<K>(client)
            .reflect(writer)
            .for_each(move |_| {
                changed.notify_one();
                std::future::ready(())
            }),
    );
    (reader, task)
}

/// How often the maps are brought up to date without a change.
const RESYNC: Duration = Duration::from_secs(5);

/// Aborts the reflector tasks when the loop ends.
struct Tasks(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

fn named_ports(pod: &Pod) -> NamedPorts {
    let mut out = NamedPorts::new();
    for c in pod.spec.iter().flat_map(|s| &s.containers) {
        for p in c.ports.iter().flatten() {
            let Some(name) = p.name.clone().filter(|n| !n.is_empty()) else {
                continue;
            };
            let Some(proto) = rules::proto(p.protocol.as_deref()) else {
                continue;
            };
            if let Ok(port) = u16::try_from(p.container_port) {
                out.entry(name).or_default().insert((proto, port));
            }
        }
    }
    out
}

fn pod_ip(pod: &Pod) -> Option<Ipv4Addr> {
    if !pod_live(pod) {
        return None;
    }
    pod.status.as_ref()?.pod_ip.as_deref()?.parse().ok()
}

fn node_ips(n: &Node) -> Vec<Ipv4Addr> {
    n.status
        .iter()
        .flat_map(|s| s.addresses.iter().flatten())
        .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
        .filter_map(|a| a.address.parse().ok())
        .collect()
}

/// `namespace:key=value,…` of an identity's pod labels.
fn describe(l: &IdentityLabels) -> String {
    let labels: Vec<String> = l
        .pod_labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    format!("{}:{}", l.namespace, labels.join(","))
}

/// What flows and `bpf policy get` need to name the pass's maps.
fn names(view: &View<'_>, want: &Desired) -> Names {
    let mut out = Names {
        endpoints: want.endpoints.clone(),
        policies: want.policies.clone(),
        next_policy_number: want.next_number,
        ..Names::default()
    };
    for (id, l) in &view.identities {
        out.identities.insert(*id, describe(l));
    }
    for (p, id) in &want.cidr {
        out.identities.insert(*id, p.to_string());
    }
    for facts in &view.pods {
        out.pods.insert(
            facts.ip,
            NamedPod {
                namespace: facts.labels.namespace.clone(),
                name: facts.name.clone(),
                identity: want.ipcache.get(&facts.ip).copied(),
            },
        );
    }
    out
}

/// Keeps the policy maps of `node` (whose pins are in `pins`) in sync until dropped;
/// publishes on `published` what names each pass's entries.
pub async fn run(
    client: Client,
    node: String,
    pins: PinDir,
    published: watch::Sender<Arc<Names>>,
    gate: Arc<Gate>,
) -> Result<()> {
    let mut maps = PolicyMaps::open(&pins).context("open the policy maps")?;
    let mut endpoints = EndpointMap::open(&pins).context("open the endpoint map")?;
    let identities_api: Api<SecurityIdentity> = Api::all(client.clone());
    let changed = Arc::new(Notify::new());
    let (pods, t1) = follow::<Pod>(&client, &changed);
    let (namespaces, t2) = follow::<Namespace>(&client, &changed);
    let (policies, t3) = follow::<NetworkPolicy>(&client, &changed);
    let (identities, t4) = follow::<SecurityIdentity>(&client, &changed);
    let (nodes, t5) = follow::<Node>(&client, &changed);
    let _tasks = Tasks(vec![t1, t2, t3, t4, t5]);
    for (what, ready) in [
        ("pods", pods.wait_until_ready().await),
        ("namespaces", namespaces.wait_until_ready().await),
        ("network policies", policies.wait_until_ready().await),
        ("security identities", identities.wait_until_ready().await),
        ("nodes", nodes.wait_until_ready().await),
    ] {
        ready.with_context(|| format!("{what} never listed"))?;
    }
    gate.open(policies.clone(), namespaces.clone());
    // Closed again when this loop ends (its stores stop with it).
    struct Closing(Arc<Gate>);
    impl Drop for Closing {
        fn drop(&mut self) {
            self.0.close();
        }
    }
    let _closing = Closing(gate.clone());
    // Endpoint numbers of this node's pods, by uid (stable while the pod lives).
    let mut numbers: BTreeMap<String, u16> = BTreeMap::new();
    // Policy numbers of the last pass, and the next never given (numbers are not reused, so
    // an event still in the ring names the policy it was decided by).
    let mut policy_numbers: BTreeMap<_, _> = published
        .borrow()
        .policies
        .iter()
        .map(|(n, p)| (p.clone(), *n))
        .collect();
    let mut next_policy_number = published.borrow().next_policy_number.max(1);
    loop {
        let all_namespaces = namespaces.state();
        let ns_labels = namespace_labels(all_namespaces.iter().map(|n| &**n));
        let audited: BTreeSet<String> = all_namespaces
            .iter()
            .filter(|n| audited(n))
            .map(|n| n.name_any())
            .collect();
        let mut known: Vec<SecurityIdentity> =
            identities.state().iter().map(|i| (**i).clone()).collect();
        let mut facts = Vec::new();
        let mut live = BTreeSet::new();
        for p in pods.state() {
            let Some(ip) = pod_ip(&p) else { continue };
            let labels = IdentityLabels::of_pod(&p, &ns_labels);
            let local = p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node.as_str());
            let endpoint = if local {
                let uid = p.uid().unwrap_or_default();
                live.insert(uid.clone());
                if !known.iter().any(|i| i.labels == labels) {
                    match allocate(&identities_api, &known, &labels).await {
                        // Known for the rest of the pass (pods sharing the labels).
                        Ok(id) => known.push(SecurityIdentity::new(id, labels.clone())),
                        Err(e) => tracing::warn!(
                            pod = %p.name_any(),
                            error = format!("{e:#}"),
                            "no security identity yet"
                        ),
                    }
                }
                let used: BTreeSet<u16> = numbers.values().copied().collect();
                let n = *numbers
                    .entry(uid)
                    .or_insert_with(|| (1..=u16::MAX).find(|n| !used.contains(n)).unwrap_or(0));
                Some(n)
            } else {
                None
            };
            facts.push(PodFacts {
                name: p.name_any(),
                ip,
                labels,
                ports: named_ports(&p),
                endpoint,
            });
        }
        numbers.retain(|uid, _| live.contains(uid));
        let policy_objs: Vec<NetworkPolicy> =
            policies.state().iter().map(|p| (**p).clone()).collect();
        let (mut mine, mut others) = (Vec::new(), Vec::new());
        for n in nodes.state() {
            if n.name_any() == node {
                mine.extend(node_ips(&n));
            } else {
                others.extend(node_ips(&n));
            }
        }
        let view = View {
            pods: facts,
            policies: policy_objs.iter().collect(),
            identities: identities
                .state()
                .iter()
                .filter_map(|i| Some((i.id()?, i.labels.clone())))
                .collect(),
            audited,
            node_ips: mine,
            other_node_ips: others,
            numbers: std::mem::take(&mut policy_numbers),
            next_number: next_policy_number,
        };
        let want = desired(&view);
        policy_numbers = want.policies.iter().map(|(n, p)| (p.clone(), *n)).collect();
        next_policy_number = want.next_number;
        if let Err(e) = apply(&want, &mut maps, &mut endpoints) {
            tracing::error!(
                error = format!("{e:#}"),
                "policy maps not brought up to date; retrying"
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        published.send_replace(Arc::new(names(&view, &want)));
        // Wait for the next change (events that arrived meanwhile left one permit: they all
        // join the next pass), or the resync period (endpoints attached since get their
        // number and keys).
        tokio::select! {
            () = changed.notified() => {}
            () = tokio::time::sleep(RESYNC) => {}
        }
    }
}

/// Writes what differs between the maps and `want`.
pub fn apply(want: &Desired, maps: &mut PolicyMaps, endpoints: &mut EndpointMap) -> Result<()> {
    let have: BTreeMap<(Ipv4Addr, u32), u32> = maps.identities()?.into_iter().collect();
    for (ip, id) in &want.ipcache {
        if have.get(&(*ip, 32)) != Some(id) {
            maps.set_identity(*ip, 32, *id)?;
        }
    }
    for (ip, len) in have.keys() {
        if *len != 32 || !want.ipcache.contains_key(ip) {
            maps.remove_identity(*ip, *len)?;
        }
    }
    let have: BTreeMap<(Ipv4Addr, u32), u32> = maps.cidrs()?.into_iter().collect();
    for (p, id) in &want.cidr {
        if have.get(&(p.addr, u32::from(p.len))) != Some(id) {
            maps.set_cidr(p.addr, u32::from(p.len), *id)?;
        }
    }
    for (ip, len) in have.keys() {
        let still = want
            .cidr
            .keys()
            .any(|p| p.addr == *ip && u32::from(p.len) == *len);
        if !still {
            maps.remove_cidr(*ip, *len)?;
        }
    }
    // Keys before flags: an endpoint becomes isolated with its allowances in place.
    let have: BTreeMap<(u32, skiff_ebpf_common::policy::PolicyKey), u32> =
        maps.allows()?.into_iter().collect();
    for ((len, key), n) in &want.policy {
        if have.get(&(*len, *key)) != Some(n) {
            maps.allow(*len, *key, *n)?;
        }
    }
    const POLICY_BITS: u32 =
        EP_INGRESS_ISOLATED | EP_EGRESS_ISOLATED | EP_AUDIT | (0xffff << EP_ID_SHIFT);
    for (ip, mut info) in endpoints.list()? {
        // A pod not known yet (or no longer) keeps the isolation its attachment gave it (see
        // `gate`), under no endpoint number: a number is only ever the loop's current one.
        let flags = match want.flags.get(&ip) {
            Some(&f) => f,
            None => info.flags & (EP_INGRESS_ISOLATED | EP_EGRESS_ISOLATED | EP_AUDIT),
        };
        if info.flags & POLICY_BITS != flags {
            info.flags = (info.flags & !POLICY_BITS) | flags;
            // A pod removed since the listing stays removed.
            endpoints.update_existing(ip, info)?;
        }
    }
    for (len, key) in have.keys() {
        if !want.policy.contains_key(&(*len, *key)) {
            maps.remove_allow(*len, *key)?;
        }
    }
    Ok(())
}
