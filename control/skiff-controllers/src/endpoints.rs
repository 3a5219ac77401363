//! The EndpointSlice and Endpoints controllers (`pkg/controller/endpointslice`,
//! `pkg/controller/endpoint`): for every Service with a selector, the pods it selects as
//! endpoints.
//!
//! EndpointSlices (`discovery.k8s.io/v1`, what skiff's data path reads): one endpoint per pod
//! with an IP, with `ready` (Ready and not terminating, or any pod when
//! `publishNotReadyAddresses`), `serving` (Ready, even while terminating) and `terminating`;
//! `nodeName`, `zone`, `targetRef`, and `hostname` for pods whose `subdomain` is the Service.
//! Ports are the Service's with named target ports resolved per pod, so pods resolving them
//! differently land in different slices. At most 100 endpoints per slice; slices are labelled
//! `kubernetes.io/service-name` and `endpointslice.kubernetes.io/managed-by`, owned by the
//! Service, and rewritten only when their content changes.
//!
//! Endpoints (`v1`, the legacy form): `subsets` with ready `addresses` and `notReadyAddresses`
//! (terminating pods left out unless `publishNotReadyAddresses`), at most 1000 addresses
//! (then `endpoints.kubernetes.io/over-capacity: truncated`).

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::{
    api::{
        core::v1::{
            EndpointAddress, EndpointPort, EndpointSubset, Endpoints, Node, ObjectReference, Pod,
            Service,
        },
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort as SlicePort, EndpointSlice},
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, PostParams},
};
use skiff_apimachinery::pod as podfacts;

use crate::{
    Key,
    informer::{Change, Informer},
    owners,
    queue::Queue,
};

/// Most endpoints per slice (`--max-endpoints-per-slice`, default 100).
pub const MAX_PER_SLICE: usize = 100;
/// Most addresses in an Endpoints object.
pub const MAX_ENDPOINTS: usize = 1000;
/// The label naming a slice's Service.
pub const SERVICE_NAME: &str = "kubernetes.io/service-name";
/// The label naming a slice's manager.
pub const MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
/// This controller's value of [`MANAGED_BY`].
pub const CONTROLLER: &str = "endpointslice-controller.k8s.io";

struct Ctx {
    client: Client,
    services: Arc<Informer<Service>>,
    pods: Arc<Informer<Pod>>,
    slices: Arc<Informer<EndpointSlice>>,
    endpoints: Arc<Informer<Endpoints>>,
    nodes: Arc<Informer<Node>>,
}

/// Endpoints grouped by their resolved port set (keyed by [`ports_key`]), with their pods.
type Groups = BTreeMap<String, (Vec<SlicePort>, Vec<(Arc<Pod>, Endpoint)>)>;

/// A port set's identity, whatever defaults the stored form spells out.
fn ports_key(ports: &[SlicePort]) -> String {
    ports
        .iter()
        .map(|p| {
            format!(
                "{}/{}/{}/{}",
                p.name.as_deref().unwrap_or(""),
                p.port.unwrap_or(0),
                p.protocol.as_deref().unwrap_or("TCP"),
                p.app_protocol.as_deref().unwrap_or("")
            )
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// A pod's resolved ports for the Service, in Service port order.
fn resolve_ports(svc: &Service, pod: &Pod) -> Option<Vec<SlicePort>> {
    let spec = svc.spec.as_ref()?;
    let mut out = Vec::new();
    for p in spec.ports.iter().flatten() {
        let proto = p.protocol.clone().unwrap_or_else(|| "TCP".into());
        let port = match &p.target_port {
            None => p.port,
            Some(IntOrString::Int(n)) => *n,
            Some(IntOrString::String(name)) => {
                // A named port: the container port of that name and protocol; a pod without it
                // is left out of this port (upstream skips the pod for the port).
                let found = pod.spec.as_ref().and_then(|s| {
                    s.containers
                        .iter()
                        .flat_map(|c| c.ports.iter().flatten())
                        .find(|cp| {
                            cp.name.as_deref() == Some(name.as_str())
                                && cp.protocol.as_deref().unwrap_or("TCP") == proto
                        })
                        .map(|cp| cp.container_port)
                });
                found?
            }
        };
        out.push(SlicePort {
            name: Some(p.name.clone().unwrap_or_default()),
            port: Some(port),
            protocol: Some(proto),
            app_protocol: p.app_protocol.clone(),
        });
    }
    Some(out)
}

/// The endpoint for `pod` in `svc`'s slices.
fn endpoint_for(svc: &Service, pod: &Pod, zone: Option<String>) -> Option<Endpoint> {
    let ip = pod
        .status
        .as_ref()?
        .pod_ip
        .clone()
        .filter(|i| !i.is_empty())?;
    let publish = svc
        .spec
        .as_ref()
        .and_then(|s| s.publish_not_ready_addresses)
        == Some(true);
    let terminating = podfacts::is_terminating(pod);
    let ready = podfacts::is_ready(pod);
    let spec = pod.spec.as_ref();
    let hostname = spec
        .filter(|s| s.subdomain.as_deref() == Some(svc.name_any().as_str()))
        .and_then(|s| s.hostname.clone());
    Some(Endpoint {
        addresses: vec![ip],
        conditions: Some(EndpointConditions {
            ready: Some(publish || (ready && !terminating)),
            serving: Some(publish || ready),
            terminating: Some(terminating),
        }),
        hostname,
        node_name: podfacts::node_name(pod).map(str::to_string),
        zone,
        target_ref: Some(ObjectReference {
            kind: Some("Pod".into()),
            namespace: pod.namespace(),
            name: Some(pod.name_any()),
            uid: pod.uid(),
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// The pods `svc` selects, with their endpoints grouped by resolved ports (sorted by pod
/// name within a group).
fn desired(ctx: &Ctx, svc: &Service) -> Groups {
    let ns = svc.namespace().unwrap_or_default();
    let selector = svc
        .spec
        .as_ref()
        .and_then(|s| s.selector.clone())
        .unwrap_or_default();
    let mut groups: Groups = BTreeMap::new();
    let mut pods: Vec<Arc<Pod>> = ctx
        .pods
        .cache()
        .list_namespace(&ns)
        .into_iter()
        .filter(|p| !podfacts::is_terminal(p))
        .filter(|p| selector.iter().all(|(k, v)| p.labels().get(k) == Some(v)))
        .collect();
    pods.sort_by_key(|p| p.name_any());
    for pod in pods {
        let Some(ports) = resolve_ports(svc, &pod) else {
            continue;
        };
        let zone = podfacts::node_name(&pod)
            .and_then(|n| ctx.nodes.cache().get("", n))
            .and_then(|n| n.labels().get("topology.kubernetes.io/zone").cloned());
        let Some(ep) = endpoint_for(svc, &pod, zone) else {
            continue;
        };
        let key = ports_key(&ports);
        groups
            .entry(key)
            .or_insert_with(|| (ports, Vec::new()))
            .1
            .push((pod, ep));
    }
    groups
}

async fn sync_slices(ctx: &Ctx, svc: &Service, groups: &Groups) -> anyhow::Result<()> {
    let ns = svc.namespace().unwrap_or_default();
    let name = svc.name_any();
    let api: Api<EndpointSlice> = Api::namespaced(ctx.client.clone(), &ns);
    let mut existing: Vec<Arc<EndpointSlice>> = ctx
        .slices
        .cache()
        .list_namespace(&ns)
        .into_iter()
        .filter(|s| {
            s.labels().get(SERVICE_NAME) == Some(&name)
                && s.labels().get(MANAGED_BY).map(String::as_str) == Some(CONTROLLER)
        })
        .collect();
    existing.sort_by_key(|s| s.name_any());
    // Existing slices by their port set, reused in name order.
    let mut by_ports: HashMap<String, Vec<Arc<EndpointSlice>>> = HashMap::new();
    for s in existing {
        let key = ports_key(s.ports.as_deref().unwrap_or_default());
        by_ports.entry(key).or_default().push(s);
    }
    let mut labels = svc.labels().clone();
    labels.remove("service.kubernetes.io/headless");
    labels.insert(SERVICE_NAME.into(), name.clone());
    labels.insert(MANAGED_BY.into(), CONTROLLER.into());
    if svc.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()) == Some("None") {
        labels.insert("service.kubernetes.io/headless".into(), String::new());
    }
    // A Service with no endpoints still gets one empty slice (upstream's placeholder).
    let mut wanted: Vec<(String, Vec<SlicePort>, Vec<Endpoint>)> = Vec::new();
    for (key, (ports, eps)) in groups {
        for chunk in eps.chunks(MAX_PER_SLICE) {
            wanted.push((
                key.clone(),
                ports.clone(),
                chunk.iter().map(|(_, e)| e.clone()).collect(),
            ));
        }
    }
    if wanted.is_empty() {
        wanted.push((ports_key(&[]), Vec::new(), Vec::new()));
    }
    for (key, ports, endpoints) in wanted {
        let reuse = by_ports
            .get_mut(&key)
            .and_then(|v| (!v.is_empty()).then(|| v.remove(0)));
        match reuse {
            Some(cur) => {
                let same = cur.endpoints == endpoints && cur.labels() == &labels;
                if same {
                    continue;
                }
                let mut next = (*cur).clone();
                next.endpoints = endpoints;
                next.metadata.labels = Some(labels.clone());
                let out = api
                    .replace(&cur.name_any(), &PostParams::default(), &next)
                    .await?;
                ctx.slices.cache().observe(out);
            }
            None => {
                let slice = EndpointSlice {
                    metadata: ObjectMeta {
                        generate_name: Some(format!("{name}-")),
                        namespace: Some(ns.clone()),
                        labels: Some(labels.clone()),
                        owner_references: Some(vec![owners::controller_reference(svc)]),
                        ..Default::default()
                    },
                    address_type: "IPv4".into(),
                    endpoints,
                    ports: Some(ports),
                };
                let out = api.create(&PostParams::default(), &slice).await?;
                ctx.slices.cache().observe(out);
            }
        }
    }
    for s in by_ports.into_values().flatten() {
        match api.delete(&s.name_any(), &DeleteParams::default()).await {
            Ok(_) => ctx.slices.cache().observe_deleted(&s),
            Err(kube::Error::Api(e)) if e.code == 404 => ctx.slices.cache().observe_deleted(&s),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

async fn sync_endpoints(ctx: &Ctx, svc: &Service, groups: &Groups) -> anyhow::Result<()> {
    let ns = svc.namespace().unwrap_or_default();
    let name = svc.name_any();
    let publish = svc
        .spec
        .as_ref()
        .and_then(|s| s.publish_not_ready_addresses)
        == Some(true);
    let mut subsets = Vec::new();
    let mut total = 0;
    let mut truncated = false;
    for (ports, eps) in groups.values() {
        let (mut ready, mut not_ready) = (Vec::new(), Vec::new());
        for (pod, ep) in eps {
            let c = ep.conditions.clone().unwrap_or_default();
            if c.terminating == Some(true) && !publish {
                continue;
            }
            if total >= MAX_ENDPOINTS {
                truncated = true;
                break;
            }
            total += 1;
            let addr = EndpointAddress {
                ip: ep.addresses[0].clone(),
                hostname: ep.hostname.clone(),
                node_name: ep.node_name.clone(),
                target_ref: Some(ObjectReference {
                    kind: Some("Pod".into()),
                    namespace: pod.namespace(),
                    name: Some(pod.name_any()),
                    uid: pod.uid(),
                    ..Default::default()
                }),
            };
            if c.ready == Some(true) {
                ready.push(addr);
            } else {
                not_ready.push(addr);
            }
        }
        if ready.is_empty() && not_ready.is_empty() {
            continue;
        }
        subsets.push(EndpointSubset {
            addresses: (!ready.is_empty()).then_some(ready),
            not_ready_addresses: (!not_ready.is_empty()).then_some(not_ready),
            ports: Some(
                ports
                    .iter()
                    .map(|p| EndpointPort {
                        name: p.name.clone().filter(|n| !n.is_empty()),
                        port: p.port.unwrap_or(0),
                        protocol: p.protocol.clone(),
                        app_protocol: p.app_protocol.clone(),
                    })
                    .collect(),
            ),
        });
    }
    let mut labels = svc.labels().clone();
    labels.insert(
        "endpointslice.kubernetes.io/skip-mirror".into(),
        "true".into(),
    );
    let mut annotations = BTreeMap::new();
    if truncated {
        annotations.insert(
            "endpoints.kubernetes.io/over-capacity".to_string(),
            "truncated".to_string(),
        );
    }
    let subsets = (!subsets.is_empty()).then_some(subsets);
    let api: Api<Endpoints> = Api::namespaced(ctx.client.clone(), &ns);
    match ctx.endpoints.cache().get(&ns, &name) {
        Some(cur) => {
            if cur.subsets == subsets
                && cur.labels() == &labels
                && cur.annotations() == &annotations
            {
                return Ok(());
            }
            let mut next = (*cur).clone();
            next.subsets = subsets;
            next.metadata.labels = Some(labels);
            next.metadata.annotations = (!annotations.is_empty()).then_some(annotations);
            let out = api.replace(&name, &PostParams::default(), &next).await?;
            ctx.endpoints.cache().observe(out);
        }
        None => {
            let ep = Endpoints {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    namespace: Some(ns.clone()),
                    labels: Some(labels),
                    annotations: (!annotations.is_empty()).then_some(annotations),
                    ..Default::default()
                },
                subsets,
            };
            match api.create(&PostParams::default(), &ep).await {
                Ok(out) => ctx.endpoints.cache().observe(out),
                // Created meanwhile (the cache lags): the next pass updates it.
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    anyhow::bail!("endpoints {ns}/{name} exist already; retrying")
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

async fn reconcile(key: Key, ctx: Arc<Ctx>) -> anyhow::Result<Option<Duration>> {
    let Some(svc) = ctx.services.cache().get(&key.namespace, &key.name) else {
        // The Service is gone: its slices go with it (owner references); the legacy Endpoints
        // object has no owner and is deleted here, as upstream does.
        if let Some(ep) = ctx.endpoints.cache().get(&key.namespace, &key.name) {
            let api: Api<Endpoints> = Api::namespaced(ctx.client.clone(), &key.namespace);
            match api.delete(&key.name, &DeleteParams::default()).await {
                Ok(_) => ctx.endpoints.cache().observe_deleted(&ep),
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
        return Ok(None);
    };
    let spec = svc.spec.clone().unwrap_or_default();
    // Without a selector the endpoints are the user's; ExternalName has none.
    if spec.selector.as_ref().is_none_or(BTreeMap::is_empty)
        || spec.type_.as_deref() == Some("ExternalName")
    {
        return Ok(None);
    }
    if svc.metadata.deletion_timestamp.is_some() {
        return Ok(None);
    }
    let groups = desired(&ctx, &svc);
    sync_slices(&ctx, &svc, &groups).await?;
    sync_endpoints(&ctx, &svc, &groups).await?;
    Ok(None)
}

/// The Services in `pod`'s namespace whose selector matches it.
fn services_for(pod: &Pod, services: &Informer<Service>) -> Vec<Key> {
    let ns = pod.namespace().unwrap_or_default();
    services
        .cache()
        .list_namespace(&ns)
        .into_iter()
        .filter(|s| {
            s.spec
                .as_ref()
                .and_then(|sp| sp.selector.as_ref())
                .is_some_and(|sel| {
                    !sel.is_empty() && sel.iter().all(|(k, v)| pod.labels().get(k) == Some(v))
                })
        })
        .map(|s| Key::of(&*s))
        .collect()
}

/// Runs the EndpointSlice and Endpoints controllers until the process ends.
pub async fn run(
    client: Client,
    services: Arc<Informer<Service>>,
    pods: Arc<Informer<Pod>>,
    slices: Arc<Informer<EndpointSlice>>,
    endpoints: Arc<Informer<Endpoints>>,
    nodes: Arc<Informer<Node>>,
) {
    let queue: Arc<Queue<Key>> = Queue::new();
    let mut svc_changes = services.subscribe();
    let mut pod_changes = pods.subscribe();
    let mut slice_changes = slices.subscribe();
    services.synced().await;
    pods.synced().await;
    slices.synced().await;
    endpoints.synced().await;
    let ctx = Arc::new(Ctx {
        client,
        services: services.clone(),
        pods,
        slices,
        endpoints,
        nodes,
    });
    let q = queue.clone();
    let feed = async move {
        loop {
            tokio::select! {
                Some(c) = svc_changes.recv() => q.add(Key::of(&**c.object())),
                Some(c) = pod_changes.recv() => {
                    let mut keys = services_for(c.object(), &services);
                    if let Change::Applied { old: Some(old), .. } = &*c {
                        keys.extend(services_for(old, &services));
                    }
                    for k in keys {
                        q.add(k);
                    }
                }
                // A slice changed or deleted by someone else is put right.
                Some(c) = slice_changes.recv() => {
                    if let Some(name) = c.object().labels().get(SERVICE_NAME) {
                        q.add(Key::new(&c.object().namespace().unwrap_or_default(), name));
                    }
                }
                else => return,
            }
        }
    };
    let work = queue.run("endpointslice", 5, move |key| reconcile(key, ctx.clone()));
    tokio::join!(feed, work);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn named_ports_resolve_per_pod_and_conditions_follow_readiness() {
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"selector": {"app": "web"}, "ports": [
                {"name": "http", "port": 80, "targetPort": "http"},
                {"name": "metrics", "port": 9090, "targetPort": 9100}]}
        }))
        .unwrap();
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "web-1", "namespace": "default", "uid": "u1", "deletionTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"nodeName": "n1", "hostname": "web-1", "subdomain": "web",
                "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"podIP": "10.244.0.5", "conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .unwrap();
        let ports = resolve_ports(&svc, &pod).unwrap();
        assert_eq!(ports[0].port, Some(8080));
        assert_eq!(ports[1].port, Some(9100));
        let ep = endpoint_for(&svc, &pod, Some("z1".into())).unwrap();
        let c = ep.conditions.unwrap();
        // Terminating but still Ready: serving, not ready.
        assert_eq!(
            (c.ready, c.serving, c.terminating),
            (Some(false), Some(true), Some(true))
        );
        assert_eq!(ep.hostname.as_deref(), Some("web-1"));
        assert_eq!(ep.zone.as_deref(), Some("z1"));
        // A pod without the named port is not an endpoint of that Service.
        let bare: Pod = serde_json::from_value(
            json!({"metadata": {"name": "x"}, "spec": {"containers": [{"name": "c"}]}}),
        )
        .unwrap();
        assert!(resolve_ports(&svc, &bare).is_none());
    }
}
