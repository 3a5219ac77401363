//! The DaemonSet controller (`pkg/controller/daemon`): one pod per eligible node — a node whose
//! labels match the template's node selector and required node affinity, and whose
//! `NoSchedule`/`NoExecute` taints the pod tolerates (DaemonSet pods tolerate the not-ready,
//! unreachable, pressure and unschedulable taints by default, as upstream adds). Pods are
//! pinned to their node with a required node affinity on `metadata.name` and placed by the
//! scheduler. Nodes added later get their pod; nodes that stop being eligible lose it.
//!
//! Updates: `RollingUpdate` replaces pods made from an older template on at most
//! `maxUnavailable` nodes at a time (with `maxSurge`, the new pod starts first and the old one
//! goes once the new is available); `OnDelete` replaces them only when deleted. Templates are
//! kept as ControllerRevisions (`kubectl rollout history/undo ds`). Status fields are those
//! `kubectl rollout status` reads: `desiredNumberScheduled`, `currentNumberScheduled`,
//! `updatedNumberScheduled`, `numberReady`, `numberAvailable`, `numberUnavailable`,
//! `numberMisscheduled`, `observedGeneration`.

use std::{collections::HashMap, sync::Arc, time::Duration};

use k8s_openapi::{
    api::{
        apps::v1::{ControllerRevision, DaemonSet, DaemonSetStatus},
        core::v1::{
            Affinity, Node, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm,
            Pod, PodTemplateSpec, Toleration,
        },
    },
    chrono::Utc,
};
use kube::{Client, ResourceExt};
use skiff_apimachinery::{events::Recorder, pod as podfacts};

use crate::{
    Key,
    deployment::util::scaled_value,
    history::{self, REVISION_HASH},
    informer::Informer,
    owners,
    queue::Queue,
    replicaset::pod_from_template,
    scheduler::{framework::NodeInfo, plugins},
};

struct Ctx {
    client: Client,
    sets: Arc<Informer<DaemonSet>>,
    pods: Arc<Informer<Pod>>,
    nodes: Arc<Informer<Node>>,
    revisions: Arc<Informer<ControllerRevision>>,
    events: Recorder,
}

/// The tolerations every DaemonSet pod gets (`AddOrUpdateDaemonPodTolerations`).
pub fn daemon_tolerations(template: &PodTemplateSpec) -> Vec<Toleration> {
    let mut t = template
        .spec
        .as_ref()
        .and_then(|s| s.tolerations.clone())
        .unwrap_or_default();
    let host_network = template.spec.as_ref().and_then(|s| s.host_network) == Some(true);
    let mut add = |key: &str, effect: &str| {
        if !t
            .iter()
            .any(|x| x.key.as_deref() == Some(key) && x.effect.as_deref() == Some(effect))
        {
            t.push(Toleration {
                key: Some(key.into()),
                operator: Some("Exists".into()),
                effect: Some(effect.into()),
                ..Default::default()
            });
        }
    };
    add("node.kubernetes.io/not-ready", "NoExecute");
    add("node.kubernetes.io/unreachable", "NoExecute");
    add("node.kubernetes.io/disk-pressure", "NoSchedule");
    add("node.kubernetes.io/memory-pressure", "NoSchedule");
    add("node.kubernetes.io/pid-pressure", "NoSchedule");
    add("node.kubernetes.io/unschedulable", "NoSchedule");
    if host_network {
        add("node.kubernetes.io/network-unavailable", "NoSchedule");
    }
    t
}

/// Whether a pod of `template` should run on `node` (`NodeShouldRunDaemonPod`).
pub fn should_run(template: &PodTemplateSpec, node: &Arc<Node>) -> bool {
    fits(template, node, &["NoSchedule", "NoExecute"])
}

/// Whether a pod of `template` already on `node` may stay: a new `NoSchedule` taint keeps new
/// pods off but does not evict (`shouldContinueRunning`).
pub fn may_stay(template: &PodTemplateSpec, node: &Arc<Node>) -> bool {
    fits(template, node, &["NoExecute"])
}

fn fits(template: &PodTemplateSpec, node: &Arc<Node>, effects: &[&str]) -> bool {
    let pod = Pod {
        metadata: template.metadata.clone().unwrap_or_default(),
        spec: template.spec.clone().map(|mut s| {
            s.tolerations = Some(daemon_tolerations(template));
            s
        }),
        status: None,
    };
    let info = NodeInfo::new(node.clone());
    let tolerations = pod
        .spec
        .as_ref()
        .and_then(|s| s.tolerations.clone())
        .unwrap_or_default();
    plugins::matches_node_selector_and_affinity(&pod, &info)
        && info
            .taints()
            .iter()
            .filter(|t| effects.contains(&t.effect.as_str()))
            .all(|t| crate::scheduler::framework::tolerates(&tolerations, t))
}

/// The pod for `node`: the template pinned to the node by a required node affinity on its name
/// (replacing the template's required terms, keeping its preferences).
fn pod_for(ds: &DaemonSet, template: &PodTemplateSpec, hash: &str, node: &str) -> Pod {
    let mut t = template.clone();
    let meta = t.metadata.get_or_insert_with(Default::default);
    let labels = meta.labels.get_or_insert_with(Default::default);
    labels.insert(REVISION_HASH.into(), hash.into());
    labels.insert(
        "pod-template-generation".into(),
        ds.metadata.generation.unwrap_or(1).to_string(),
    );
    if let Some(spec) = t.spec.as_mut() {
        spec.tolerations = Some(daemon_tolerations(template));
        let affinity = spec.affinity.get_or_insert_with(Affinity::default);
        let na = affinity
            .node_affinity
            .get_or_insert_with(NodeAffinity::default);
        na.required_during_scheduling_ignored_during_execution = Some(NodeSelector {
            node_selector_terms: vec![NodeSelectorTerm {
                match_fields: Some(vec![NodeSelectorRequirement {
                    key: "metadata.name".into(),
                    operator: "In".into(),
                    values: Some(vec![node.into()]),
                }]),
                ..Default::default()
            }],
        });
    }
    pod_from_template(
        &t,
        owners::controller_reference(ds),
        &ds.namespace().unwrap_or_default(),
        format!("{}-", ds.name_any()),
    )
}

async fn reconcile(key: Key, ctx: Arc<Ctx>) -> anyhow::Result<Option<Duration>> {
    let Some(ds) = ctx.sets.cache().get(&key.namespace, &key.name) else {
        return Ok(None);
    };
    let spec = ds.spec.clone().unwrap_or_default();
    let template = spec.template.clone();
    let candidates = ctx.pods.cache().list_namespace(&key.namespace);
    let pods = owners::claim(
        &ctx.client,
        ctx.pods.cache(),
        &*ds,
        &spec.selector,
        candidates,
    )
    .await?;
    if ds.metadata.deletion_timestamp.is_some() {
        return Ok(None);
    }
    let collisions = ds.status.as_ref().and_then(|s| s.collision_count);
    let (rev, old_revs) =
        history::current(&ctx.client, &*ds, &template, collisions, &ctx.revisions).await?;
    let hash = history::hash_of(&ds.name_any(), &rev);
    let now = Utc::now();
    let min_ready = spec.min_ready_seconds.unwrap_or(0);
    let mut by_node: HashMap<String, Vec<Arc<Pod>>> = HashMap::new();
    for p in pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
    {
        // A pod is on the node it is bound to, or pinned to by its affinity (not yet bound).
        let node = podfacts::node_name(p)
            .map(str::to_string)
            .or_else(|| pinned_node(p));
        if let Some(n) = node {
            by_node.entry(n).or_default().push(p.clone());
        }
    }
    let nodes = ctx.nodes.cache().list();
    let (mut create, mut delete): (Vec<String>, Vec<Arc<Pod>>) = (Vec::new(), Vec::new());
    let mut status = DaemonSetStatus {
        observed_generation: ds.metadata.generation,
        collision_count: collisions,
        ..Default::default()
    };
    let rolling = spec
        .update_strategy
        .as_ref()
        .and_then(|u| u.type_.as_deref())
        != Some("OnDelete");
    let desired_nodes = nodes.iter().filter(|n| should_run(&template, n)).count() as i32;
    let ru = spec
        .update_strategy
        .as_ref()
        .and_then(|u| u.rolling_update.as_ref());
    let max_surge = scaled_value(
        ru.and_then(|r| r.max_surge.as_ref()),
        desired_nodes,
        true,
        "0",
    );
    let mut max_unavailable = scaled_value(
        ru.and_then(|r| r.max_unavailable.as_ref()),
        desired_nodes,
        true,
        "1",
    );
    if max_surge == 0 && max_unavailable == 0 {
        max_unavailable = 1;
    }
    // (node, old pod) candidates for replacement, unavailable ones first.
    let mut replaceable: Vec<(bool, Arc<Pod>)> = Vec::new();
    let mut unavailable = 0;
    for node in &nodes {
        let name = node.name_any();
        let run = should_run(&template, node);
        let mut here = by_node.remove(&name).unwrap_or_default();
        // Failed pods are removed (and recreated).
        let (failed, live): (Vec<_>, Vec<_>) =
            here.drain(..).partition(|p| podfacts::phase(p) == "Failed");
        delete.extend(failed);
        if !run {
            if !live.is_empty() {
                status.number_misscheduled += 1;
                if !may_stay(&template, node) {
                    delete.extend(live);
                }
            }
            continue;
        }
        status.desired_number_scheduled += 1;
        let (new, old): (Vec<_>, Vec<_>) = live
            .into_iter()
            .partition(|p| p.labels().get(REVISION_HASH) == Some(&hash));
        if new.is_empty() && old.is_empty() {
            create.push(name);
            unavailable += 1;
            continue;
        }
        status.current_number_scheduled += 1;
        // More than one of the same kind: keep the oldest.
        let mut keep = new.first().cloned().or_else(|| old.first().cloned());
        for extra in new.iter().skip(1) {
            delete.push(extra.clone());
        }
        if !new.is_empty() {
            status.updated_number_scheduled =
                Some(status.updated_number_scheduled.unwrap_or(0) + 1);
            let new_available = podfacts::is_available(&new[0], min_ready, now);
            // With a surge, the old pod goes once the new one is available.
            if new_available {
                delete.extend(old.iter().cloned());
            } else if !old.is_empty() {
                keep = old.first().cloned();
            }
        } else if rolling {
            let available = old
                .iter()
                .any(|p| podfacts::is_available(p, min_ready, now));
            replaceable.push((available, old[0].clone()));
            if max_surge > 0 {
                create.push(name.clone());
            }
        }
        if let Some(k) = keep {
            if podfacts::is_ready(&k) {
                status.number_ready += 1;
            }
            if podfacts::is_available(&k, min_ready, now) {
                status.number_available = Some(status.number_available.unwrap_or(0) + 1);
            } else {
                unavailable += 1;
            }
        }
    }
    // Pods pinned to nodes that no longer exist.
    for (_, ps) in by_node {
        delete.extend(ps);
    }
    // Rolling update without surge: replace old pods within the unavailability budget.
    if rolling && max_surge == 0 {
        replaceable.sort_by_key(|(available, _)| *available);
        let mut budget = max_unavailable - unavailable;
        for (available, p) in replaceable {
            if available && budget <= 0 {
                break;
            }
            if available {
                budget -= 1;
            }
            delete.push(p);
        }
    }
    status.number_unavailable =
        Some((status.desired_number_scheduled - status.number_available.unwrap_or(0)).max(0));
    for f in [
        &mut status.number_unavailable,
        &mut status.number_available,
        &mut status.updated_number_scheduled,
    ] {
        if *f == Some(0) {
            *f = None;
        }
    }
    for p in &delete {
        owners::delete_pod(&ctx.client, ctx.pods.cache(), &ctx.events, &*ds, p).await?;
    }
    for node in &create {
        let pod = pod_for(&ds, &template, &hash, node);
        owners::create_pod(&ctx.client, ctx.pods.cache(), &ctx.events, &*ds, &pod).await?;
    }
    let in_use: Vec<String> = pods
        .iter()
        .filter_map(|p| p.labels().get(REVISION_HASH).cloned())
        .collect();
    history::prune(
        &ctx.client,
        &ds.name_any(),
        &old_revs,
        &in_use,
        spec.revision_history_limit.unwrap_or(10),
        &ctx.revisions,
    )
    .await?;
    if ds.status.as_ref() != Some(&status) {
        let mut updated = (*ds).clone();
        updated.status = Some(status.clone());
        owners::replace_status(&ctx.client, ctx.sets.cache(), &updated).await?;
    }
    // Ready pods become available after minReadySeconds.
    if min_ready > 0 && status.number_ready > status.number_available.unwrap_or(0) {
        return Ok(Some(Duration::from_secs(min_ready as u64)));
    }
    Ok(None)
}

/// The node a pending DaemonSet pod is pinned to.
fn pinned_node(p: &Pod) -> Option<String> {
    p.spec
        .as_ref()?
        .affinity
        .as_ref()?
        .node_affinity
        .as_ref()?
        .required_during_scheduling_ignored_during_execution
        .as_ref()?
        .node_selector_terms
        .iter()
        .flat_map(|t| t.match_fields.iter().flatten())
        .find(|f| f.key == "metadata.name" && f.operator == "In")
        .and_then(|f| f.values.as_ref()?.first().cloned())
}

/// Runs the DaemonSet controller until the process ends.
pub async fn run(
    client: Client,
    sets: Arc<Informer<DaemonSet>>,
    pods: Arc<Informer<Pod>>,
    nodes: Arc<Informer<Node>>,
    revisions: Arc<Informer<ControllerRevision>>,
) {
    let queue: Arc<Queue<Key>> = Queue::new();
    let mut set_changes = sets.subscribe();
    let mut pod_changes = pods.subscribe();
    let mut node_changes = nodes.subscribe();
    sets.synced().await;
    pods.synced().await;
    nodes.synced().await;
    revisions.synced().await;
    let ctx = Arc::new(Ctx {
        events: Recorder::new(client.clone(), "daemonset-controller", None),
        client,
        sets: sets.clone(),
        pods,
        nodes,
        revisions,
    });
    let q = queue.clone();
    let feed = async move {
        loop {
            tokio::select! {
                Some(c) = set_changes.recv() => q.add(Key::of(&**c.object())),
                Some(c) = pod_changes.recv() => {
                    if let Some(k) = owners::owner_key(&**c.object(), "DaemonSet") {
                        q.add(k);
                    }
                }
                // A node added, relabelled or tainted concerns every DaemonSet.
                Some(_) = node_changes.recv() => {
                    for ds in sets.cache().list() {
                        q.add(Key::of(&*ds));
                    }
                }
                else => return,
            }
        }
    };
    let work = queue.run("daemonset", 3, move |key| reconcile(key, ctx.clone()));
    tokio::join!(feed, work);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn eligibility_follows_selectors_and_taints() {
        let template: PodTemplateSpec = serde_json::from_value(json!({
            "spec": {"nodeSelector": {"role": "edge"}, "containers": [{"name": "c"}]}
        }))
        .unwrap();
        let node = |labels: serde_json::Value, taints: serde_json::Value| -> Arc<Node> {
            Arc::new(serde_json::from_value(json!({"metadata": {"name": "n", "labels": labels}, "spec": {"taints": taints}})).unwrap())
        };
        assert!(should_run(
            &template,
            &node(json!({"role": "edge"}), json!([]))
        ));
        assert!(!should_run(
            &template,
            &node(json!({"role": "core"}), json!([]))
        ));
        // Not-ready and cordoned nodes still run DaemonSet pods; other taints need tolerations.
        assert!(should_run(
            &template,
            &node(
                json!({"role": "edge"}),
                json!([
            {"key": "node.kubernetes.io/not-ready", "effect": "NoExecute"},
            {"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}])
            )
        ));
        let tainted = node(
            json!({"role": "edge"}),
            json!([{"key": "gpu", "effect": "NoSchedule"}]),
        );
        assert!(!should_run(&template, &tainted));
        assert!(may_stay(&template, &tainted), "NoSchedule does not evict");
        assert!(!may_stay(
            &template,
            &node(
                json!({"role": "edge"}),
                json!([{"key": "gpu", "effect": "NoExecute"}])
            )
        ));
    }
}
