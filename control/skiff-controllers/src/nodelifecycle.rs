//! Node lifecycle (`pkg/controller/nodelifecycle` and the taint-eviction controller).
//!
//! Every 5 s each node's health is judged by when its agent was last heard from (its Lease
//! renewal or its Ready heartbeat, timed by this controller's own clock when it saw them change,
//! so clock skew does not matter). Silent for more than 40 s (`--node-monitor-grace-period`):
//! its Ready, MemoryPressure, DiskPressure and PIDPressure conditions become `Unknown`
//! ("Kubelet stopped posting node status.") and its pods are marked not Ready (so Services stop
//! sending them traffic). Nodes are tainted from their Ready condition:
//! `node.kubernetes.io/unreachable` (Unknown) or `node.kubernetes.io/not-ready` (False), both
//! `NoSchedule` and `NoExecute`; the taints go when the node is Ready again.
//!
//! Pods on a node with a `NoExecute` taint they do not tolerate are deleted at once; those that
//! tolerate it for `tolerationSeconds` (the API gives every pod 300 s for these two taints) are
//! deleted when that has passed since the taint was added (`TaintManagerEviction` event and a
//! `DisruptionTarget` condition), so their controllers replace them elsewhere.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use k8s_openapi::{
    api::{
        coordination::v1::Lease,
        core::v1::{Node, NodeCondition, Pod, Taint},
    },
    apimachinery::pkg::apis::meta::v1::Time,
    chrono::{DateTime, SecondsFormat, SubsecRound, Utc},
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use serde_json::json;
use skiff_apimachinery::{
    events::{Kind, Recorder},
    pod as podfacts,
};
use tokio::time::Instant;

use crate::informer::Informer;

/// How long a node may be silent before it is unhealthy.
pub const GRACE: Duration = Duration::from_secs(40);
/// How often nodes are looked at.
pub const PERIOD: Duration = Duration::from_secs(5);
/// Taint of a node whose agent is not heard from.
pub const UNREACHABLE: &str = "node.kubernetes.io/unreachable";
/// Taint of a node that reports itself not Ready.
pub const NOT_READY: &str = "node.kubernetes.io/not-ready";

/// What was last heard from a node, and when (by this controller's clock).
#[derive(Debug, Clone)]
struct Heard {
    stamp: String,
    at: Instant,
}

/// The taints a node should carry for its Ready condition (keeping each one's `timeAdded`).
pub fn wanted_taints(node: &Node, now: DateTime<Utc>) -> Vec<Taint> {
    let current = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default();
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
        .map(|c| c.status.clone())
        .unwrap_or_else(|| "Unknown".into());
    let mut out: Vec<Taint> = current
        .iter()
        .filter(|t| t.key != UNREACHABLE && t.key != NOT_READY)
        .cloned()
        .collect();
    let key = match ready.as_str() {
        "True" => None,
        "False" => Some(NOT_READY),
        _ => Some(UNREACHABLE),
    };
    if let Some(key) = key {
        for effect in ["NoSchedule", "NoExecute"] {
            let kept = current
                .iter()
                .find(|t| t.key == key && t.effect == effect)
                .cloned();
            out.push(kept.unwrap_or_else(|| Taint {
                key: key.into(),
                effect: effect.into(),
                // Whole seconds, as the API stores them (so the next pass sees no change).
                time_added: (effect == "NoExecute").then_some(Time(now.trunc_subsecs(0))),
                value: None,
            }));
        }
    }
    out
}

/// When `pod` must leave a node with `taints` (`None`: it may stay): at once for an untolerated
/// `NoExecute` taint, else when the shortest `tolerationSeconds` runs out.
pub fn eviction_time(pod: &Pod, taints: &[Taint], now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let tolerations = pod
        .spec
        .as_ref()
        .and_then(|s| s.tolerations.clone())
        .unwrap_or_default();
    let mut when: Option<DateTime<Utc>> = None;
    for t in taints.iter().filter(|t| t.effect == "NoExecute") {
        let matching: Vec<_> = tolerations
            .iter()
            .filter(|tol| crate::scheduler::framework::tolerates(std::slice::from_ref(tol), t))
            .collect();
        if matching.is_empty() {
            return Some(now);
        }
        // Forever if any matching toleration has no limit; else the shortest.
        if matching.iter().any(|tol| tol.toleration_seconds.is_none()) {
            continue;
        }
        let secs = matching
            .iter()
            .filter_map(|tol| tol.toleration_seconds)
            .min()
            .unwrap_or(0)
            .max(0);
        let added = t.time_added.as_ref().map_or(now, |a| a.0);
        let at = added + k8s_openapi::chrono::Duration::seconds(secs);
        when = Some(when.map_or(at, |w| w.min(at)));
    }
    when
}

struct Ctx {
    client: Client,
    nodes: Arc<Informer<Node>>,
    leases: Arc<Informer<Lease>>,
    pods: Arc<Informer<Pod>>,
    heard: Mutex<HashMap<String, Heard>>,
    events: Recorder,
}

impl Ctx {
    /// Whether `node` has been silent past the grace period.
    fn silent(&self, node: &Node) -> bool {
        let name = node.name_any();
        let lease = self
            .leases
            .cache()
            .get("kube-node-lease", &name)
            .and_then(|l| {
                l.spec
                    .as_ref()?
                    .renew_time
                    .as_ref()
                    .map(|t| t.0.to_rfc3339())
            });
        let heartbeat = node
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
            .and_then(|c| c.last_heartbeat_time.as_ref().map(|t| t.0.to_rfc3339()));
        let stamp = format!(
            "{}|{}",
            lease.unwrap_or_default(),
            heartbeat.unwrap_or_default()
        );
        let mut heard = self.heard.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        // A node first seen (also after a restart of this controller) gets the whole grace
        // period from now.
        let h = heard.entry(name).or_insert_with(|| Heard {
            stamp: stamp.clone(),
            at: now,
        });
        if h.stamp != stamp {
            h.stamp = stamp;
            h.at = now;
        }
        now.duration_since(h.at) > GRACE
    }

    async fn mark_unknown(&self, node: &Node) -> anyhow::Result<()> {
        let now = Utc::now();
        let mut status = node.status.clone().unwrap_or_default();
        let conds = status.conditions.get_or_insert_with(Vec::new);
        let mut changed = false;
        for type_ in ["Ready", "MemoryPressure", "DiskPressure", "PIDPressure"] {
            match conds.iter_mut().find(|c| c.type_ == type_) {
                Some(c) if c.status == "Unknown" => {}
                Some(c) => {
                    c.status = "Unknown".into();
                    c.reason = Some("NodeStatusUnknown".into());
                    c.message = Some("Kubelet stopped posting node status.".into());
                    c.last_transition_time = Some(Time(now));
                    changed = true;
                }
                None => {
                    conds.push(NodeCondition {
                        type_: type_.into(),
                        status: "Unknown".into(),
                        reason: Some("NodeStatusNeverUpdated".into()),
                        message: Some("Kubelet never posted node status.".into()),
                        last_transition_time: Some(Time(now)),
                        last_heartbeat_time: None,
                    });
                    changed = true;
                }
            }
        }
        if !changed {
            return Ok(());
        }
        tracing::info!(node = %node.name_any(), "node stopped posting status; marking it Unknown");
        let mut updated = node.clone();
        updated.status = Some(status);
        let api: Api<Node> = Api::all(self.client.clone());
        let out = api
            .replace_status(
                &node.name_any(),
                &PostParams::default(),
                serde_json::to_vec(&updated)?,
            )
            .await?;
        self.nodes.cache().observe(out);
        self.events.object(
            node,
            Kind::Normal,
            "NodeNotReady",
            &format!("Node {} status is now: NodeNotReady", node.name_any()),
        );
        Ok(())
    }

    /// Marks the pods on a silent node not Ready (so Services stop sending them traffic); run
    /// on every pass while the node is silent, so a failed write is retried.
    async fn mark_pods_not_ready(&self, node: &str) {
        let now = Utc::now();
        for pod in self.pods.cache().list() {
            if podfacts::node_name(&pod) != Some(node) || !podfacts::is_ready(&pod) {
                continue;
            }
            let patch = json!({"status": {"conditions": [{"type": "Ready", "status": "False",
                "lastTransitionTime": now.to_rfc3339_opts(SecondsFormat::Secs, true)}]}});
            let api: Api<Pod> =
                Api::namespaced(self.client.clone(), &pod.namespace().unwrap_or_default());
            match api
                .patch_status(
                    &pod.name_any(),
                    &PatchParams::default(),
                    &Patch::Strategic(&patch),
                )
                .await
            {
                Ok(out) => self.pods.cache().observe(out),
                Err(e) => {
                    tracing::debug!(pod = %pod.name_any(), error = %e, "marking a pod not ready; retrying next pass")
                }
            }
        }
    }

    async fn sync_taints(&self, node: &Node) -> anyhow::Result<()> {
        let want = wanted_taints(node, Utc::now());
        let have = node
            .spec
            .as_ref()
            .and_then(|s| s.taints.clone())
            .unwrap_or_default();
        if want == have {
            return Ok(());
        }
        let patch = json!({"metadata": {"resourceVersion": node.resource_version()}, "spec": {"taints": want}});
        let api: Api<Node> = Api::all(self.client.clone());
        let out = api
            .patch(
                &node.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await?;
        self.nodes.cache().observe(out);
        Ok(())
    }

    async fn evict(&self) -> anyhow::Result<()> {
        let now = Utc::now();
        let taints: HashMap<String, Vec<Taint>> = self
            .nodes
            .cache()
            .list()
            .into_iter()
            .filter_map(|n| {
                let t: Vec<Taint> = n
                    .spec
                    .as_ref()?
                    .taints
                    .clone()?
                    .into_iter()
                    .filter(|t| t.effect == "NoExecute")
                    .collect();
                (!t.is_empty()).then(|| (n.name_any(), t))
            })
            .collect();
        if taints.is_empty() {
            return Ok(());
        }
        for pod in self.pods.cache().list() {
            let Some(node) = podfacts::node_name(&pod) else {
                continue;
            };
            let Some(t) = taints.get(node) else { continue };
            if pod.metadata.deletion_timestamp.is_some() || podfacts::is_terminal(&pod) {
                continue;
            }
            let Some(at) = eviction_time(&pod, t, now) else {
                continue;
            };
            if at > now {
                continue;
            }
            let api: Api<Pod> =
                Api::namespaced(self.client.clone(), &pod.namespace().unwrap_or_default());
            let condition = json!({"status": {"conditions": [{"type": "DisruptionTarget", "status": "True",
                "reason": "DeletionByTaintManager", "message": "Taint manager: deleting due to NoExecute taint",
                "lastTransitionTime": now.to_rfc3339_opts(SecondsFormat::Secs, true)}]}});
            let _ = api
                .patch_status(
                    &pod.name_any(),
                    &PatchParams::default(),
                    &Patch::Strategic(&condition),
                )
                .await;
            match api.delete(&pod.name_any(), &DeleteParams::default()).await {
                Ok(either) => {
                    tracing::info!(pod = %pod.name_any(), node, "evicted for a NoExecute taint");
                    self.events.object(
                        &*pod,
                        Kind::Normal,
                        "TaintManagerEviction",
                        &format!(
                            "Marking for deletion Pod {}/{}",
                            pod.namespace().unwrap_or_default(),
                            pod.name_any()
                        ),
                    );
                    if let Some(p) = either.left() {
                        self.pods.cache().observe(p);
                    }
                }
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => tracing::warn!(pod = %pod.name_any(), error = %e, "eviction failed"),
            }
        }
        Ok(())
    }

    async fn pass(&self) {
        for node in self.nodes.cache().list() {
            if self.silent(&node) {
                if let Err(e) = self.mark_unknown(&node).await {
                    tracing::warn!(node = %node.name_any(), error = format!("{e:#}"), "marking a node Unknown failed");
                    continue;
                }
                self.mark_pods_not_ready(&node.name_any()).await;
            }
            let fresh = self.nodes.cache().get("", &node.name_any()).unwrap_or(node);
            if let Err(e) = self.sync_taints(&fresh).await {
                tracing::debug!(node = %fresh.name_any(), error = format!("{e:#}"), "tainting failed; retrying next pass");
            }
        }
        if let Err(e) = self.evict().await {
            tracing::warn!(error = format!("{e:#}"), "taint eviction pass failed");
        }
    }
}

/// Runs the node lifecycle and taint eviction controllers until the process ends.
pub async fn run(
    client: Client,
    nodes: Arc<Informer<Node>>,
    leases: Arc<Informer<Lease>>,
    pods: Arc<Informer<Pod>>,
) {
    nodes.synced().await;
    leases.synced().await;
    pods.synced().await;
    let ctx = Ctx {
        events: Recorder::new(client.clone(), "node-controller", None),
        client,
        nodes,
        leases,
        pods,
        heard: Mutex::new(HashMap::new()),
    };
    let mut tick = tokio::time::interval(PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        ctx.pass().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(ready: &str, taints: serde_json::Value) -> Node {
        serde_json::from_value(
            json!({"metadata": {"name": "n"}, "spec": {"taints": taints},
            "status": {"conditions": [{"type": "Ready", "status": ready}]}}),
        )
        .unwrap()
    }

    #[test]
    fn taints_follow_the_ready_condition() {
        let now = Utc::now();
        let t = wanted_taints(
            &node("Unknown", json!([{"key": "keep", "effect": "NoSchedule"}])),
            now,
        );
        let keys: Vec<(&str, &str)> = t
            .iter()
            .map(|t| (t.key.as_str(), t.effect.as_str()))
            .collect();
        assert_eq!(
            keys,
            [
                ("keep", "NoSchedule"),
                (UNREACHABLE, "NoSchedule"),
                (UNREACHABLE, "NoExecute")
            ]
        );
        // The time a taint was added is kept.
        let earlier = wanted_taints(
            &node("Unknown", serde_json::to_value(&t).unwrap()),
            now + k8s_openapi::chrono::Duration::seconds(30),
        );
        assert_eq!(earlier, t);
        let f = wanted_taints(&node("False", json!([])), now);
        assert!(f.iter().all(|t| t.key == NOT_READY) && f.len() == 2);
        assert!(
            wanted_taints(&node("True", serde_json::to_value(&t).unwrap()), now)
                .iter()
                .all(|t| t.key == "keep")
        );
    }

    #[test]
    fn evictions_wait_for_toleration_seconds() {
        let now = Utc::now().trunc_subsecs(0);
        let taints = wanted_taints(&node("Unknown", json!([])), now);
        let pod = |tol: serde_json::Value| -> Pod {
            serde_json::from_value(json!({"spec": {"containers": [], "tolerations": tol}})).unwrap()
        };
        assert_eq!(
            eviction_time(&pod(json!([])), &taints, now),
            Some(now),
            "no toleration: at once"
        );
        let timed = pod(
            json!([{"key": UNREACHABLE, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}]),
        );
        assert_eq!(
            eviction_time(&timed, &taints, now),
            Some(now + k8s_openapi::chrono::Duration::seconds(300))
        );
        let forever = pod(json!([{"operator": "Exists"}]));
        assert_eq!(eviction_time(&forever, &taints, now), None);
    }
}
