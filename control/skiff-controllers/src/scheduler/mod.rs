//! The scheduler (kube-scheduler's role): binds each pending pod whose `schedulerName` is
//! `default-scheduler` to a node through `pods/binding`.
//!
//! - [`framework`]: pod and node facts, the filter/score cycle, node sampling.
//! - [`plugins`]: the filter and score plugins.
//! - [`preemption`]: evicting lower-priority pods for a pod that fits nowhere.
//! - [`queue`]: the priority queue with unschedulable pods and backoff.
//!
//! One cycle at a time picks a node against a snapshot kept current from the shared pod and
//! node informers; the pod is then *assumed* there (counted on the node) while the binding is
//! written in the background, as upstream's binding cycle. A pod that fits nowhere gets
//! `PodScheduled=False` (reason `Unschedulable`, upstream's message) and a `FailedScheduling`
//! event, and waits for a cluster change; a pod that can preempt gets its victims evicted and
//! `status.nominatedNodeName` set. Bound pods get a `Scheduled` event.

pub mod framework;
pub mod plugins;
pub mod preemption;
pub mod queue;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use framework::{PodInfo, Snapshot};
use k8s_openapi::{
    api::core::v1::{Binding, Namespace, Node, ObjectReference, Pod},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
    chrono::Utc,
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use queue::SchedulingQueue;
use serde_json::json;
use skiff_apimachinery::{
    events::{Kind, Recorder},
    pod as podfacts,
};

use crate::informer::{Change, Informer};

/// The scheduler's name (pods with another `schedulerName` are left alone).
pub const SCHEDULER_NAME: &str = "default-scheduler";

/// How long a binding written but not yet seen by the watch keeps its pod out of the queue.
const ASSUME_TTL: Duration = Duration::from_secs(30);

struct Scheduler {
    client: Client,
    snapshot: Mutex<Snapshot>,
    queue: SchedulingQueue,
    /// Pods waiting to be scheduled, by uid (the newest object seen).
    pending: Mutex<HashMap<String, Arc<Pod>>>,
    /// Pods bound (or being bound) by us that the watch has not shown bound yet.
    assumed: Mutex<HashMap<String, tokio::time::Instant>>,
    events: Recorder,
}

fn ours(p: &Pod) -> bool {
    p.spec
        .as_ref()
        .and_then(|s| s.scheduler_name.as_deref())
        .is_none_or(|s| s == SCHEDULER_NAME)
}

/// What of a node the scheduler reads: labels, taints, cordon, allocatable, Ready.
fn placement_view(n: &Node) -> impl PartialEq + '_ {
    let spec = n.spec.as_ref();
    let status = n.status.as_ref();
    (
        n.labels(),
        spec.and_then(|s| s.taints.as_ref()),
        spec.and_then(|s| s.unschedulable),
        status.and_then(|s| s.allocatable.as_ref()),
        status
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
            .map(|c| c.status.as_str()),
    )
}

fn priority(p: &Pod) -> i32 {
    p.spec.as_ref().and_then(|s| s.priority).unwrap_or(0)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Scheduler {
    /// Applies a pod change to the snapshot and the queue.
    fn on_pod(&self, change: &Change<Pod>) {
        match change {
            Change::Applied { new, .. } => {
                let uid = new.uid().unwrap_or_default();
                match podfacts::node_name(new) {
                    Some(node) => {
                        lock(&self.assumed).remove(&uid);
                        lock(&self.pending).remove(&uid);
                        self.queue.remove(&uid);
                        let mut snap = lock(&self.snapshot);
                        snap.unnominate(&uid);
                        if podfacts::is_terminal(new) {
                            if snap.is_placed(&uid) {
                                snap.unplace(&uid);
                                drop(snap);
                                self.queue.cluster_changed();
                            }
                            return;
                        }
                        // Re-read the pod only when it moved or what placement reads changed
                        // (status updates are frequent and change nothing here).
                        let current = snap
                            .nodes
                            .get(node)
                            .and_then(|n| n.pods.iter().find(|p| p.uid == uid))
                            .map(|p| p.pod.clone());
                        let stale = current.is_none_or(|p| {
                            p.labels() != new.labels()
                                || p.metadata.deletion_timestamp != new.metadata.deletion_timestamp
                        });
                        if stale {
                            snap.place(Arc::new(PodInfo::new(new.clone())), node);
                        }
                    }
                    None => {
                        if !ours(new) {
                            return;
                        }
                        if new.metadata.deletion_timestamp.is_some() {
                            lock(&self.pending).remove(&uid);
                            lock(&self.snapshot).unnominate(&uid);
                            self.queue.remove(&uid);
                            return;
                        }
                        match new
                            .status
                            .as_ref()
                            .and_then(|s| s.nominated_node_name.as_deref())
                        {
                            Some(node) if !node.is_empty() => lock(&self.snapshot)
                                .nominate(Arc::new(PodInfo::new(new.clone())), node),
                            _ => lock(&self.snapshot).unnominate(&uid),
                        }
                        {
                            let mut assumed = lock(&self.assumed);
                            if let Some(at) = assumed.get(&uid) {
                                if at.elapsed() < ASSUME_TTL {
                                    return;
                                }
                                assumed.remove(&uid);
                                lock(&self.snapshot).unplace(&uid);
                            }
                        }
                        // New to the scheduler, or changed in what scheduling reads. (`old` is
                        // the cache's previous state, which may already be this pod as its
                        // creator wrote it through, so it cannot tell a new pod.)
                        let before = lock(&self.pending).insert(uid.clone(), new.clone());
                        let changed =
                            before.is_none_or(|o| o.spec != new.spec || o.labels() != new.labels());
                        if changed {
                            self.queue.add(&uid, priority(new));
                        }
                    }
                }
            }
            Change::Deleted(p) => {
                let uid = p.uid().unwrap_or_default();
                lock(&self.pending).remove(&uid);
                lock(&self.assumed).remove(&uid);
                self.queue.remove(&uid);
                let mut snap = lock(&self.snapshot);
                snap.unnominate(&uid);
                if snap.is_placed(&uid) {
                    snap.unplace(&uid);
                    drop(snap);
                    self.queue.cluster_changed();
                }
            }
        }
    }

    fn on_node(&self, change: &Change<Node>) {
        let mut snap = lock(&self.snapshot);
        match change {
            Change::Applied { old, new } => {
                // Heartbeats rewrite node status often; only what placement reads is news.
                if old
                    .as_ref()
                    .is_some_and(|o| placement_view(o) == placement_view(new))
                {
                    return;
                }
                snap.upsert_node(new.clone());
            }
            Change::Deleted(n) => snap.remove_node(&n.name_any()),
        }
        drop(snap);
        self.queue.cluster_changed();
    }

    fn on_namespace(&self, change: &Change<Namespace>) {
        let mut snap = lock(&self.snapshot);
        match change {
            Change::Applied { new, .. } => {
                snap.namespace_labels
                    .insert(new.name_any(), new.labels().clone());
            }
            Change::Deleted(n) => {
                snap.namespace_labels.remove(&n.name_any());
            }
        }
    }

    /// One scheduling cycle for the pod `uid`.
    async fn schedule_one(self: &Arc<Self>, uid: String, cycle: u64) {
        let Some(pod) = lock(&self.pending).get(&uid).cloned() else {
            return;
        };
        let info = Arc::new(PodInfo::new(pod.clone()));
        let result = {
            let mut snap = lock(&self.snapshot);
            match framework::schedule(&info, &mut snap) {
                Ok(node) => {
                    snap.place(info.clone(), &node);
                    Ok(node)
                }
                Err(fit) => {
                    let preemption = if self.waiting_for_victims(&pod, &snap) {
                        None
                    } else {
                        preemption::find(&info, &snap, &fit)
                    };
                    Err((fit, preemption))
                }
            }
        };
        match result {
            Ok(node) => {
                lock(&self.assumed).insert(uid.clone(), tokio::time::Instant::now());
                lock(&self.pending).remove(&uid);
                let me = self.clone();
                tokio::spawn(async move { me.bind(info, node).await });
            }
            Err((fit, preemption)) => {
                let mut message = fit.message();
                if fit.nodes > 0 && fit.pod_reason.is_none() {
                    message.push(' ');
                    message.push_str(&preemption::message(&info, &fit));
                }
                if let Some(p) = &preemption {
                    // Hold the room at once; the status write follows.
                    lock(&self.snapshot).nominate(info.clone(), &p.node);
                    self.preempt(&pod, p).await;
                }
                self.queue.unschedulable(&uid, info.priority, cycle);
                self.record_failure(&pod, &message).await;
            }
        }
    }

    /// Whether the pod already preempted on its nominated node and victims are still going.
    fn waiting_for_victims(&self, pod: &Pod, snap: &Snapshot) -> bool {
        let Some(node) = pod
            .status
            .as_ref()
            .and_then(|s| s.nominated_node_name.as_deref())
        else {
            return false;
        };
        let prio = priority(pod);
        snap.nodes.get(node).is_some_and(|n| {
            n.pods
                .iter()
                .any(|p| p.priority < prio && p.pod.metadata.deletion_timestamp.is_some())
        })
    }

    async fn bind(self: Arc<Self>, info: Arc<PodInfo>, node: String) {
        let pod = &info.pod;
        let ns = pod.namespace().unwrap_or_default();
        let binding = Binding {
            metadata: ObjectMeta {
                name: Some(pod.name_any()),
                namespace: Some(ns.clone()),
                uid: pod.uid(),
                ..Default::default()
            },
            target: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Node".into()),
                name: Some(node.clone()),
                ..Default::default()
            },
        };
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
        let body = match serde_json::to_vec(&binding) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "encoding a binding");
                return;
            }
        };
        match api
            .create_subresource::<serde_json::Value>(
                "binding",
                &pod.name_any(),
                &PostParams::default(),
                body,
            )
            .await
        {
            Ok(_) => {
                tracing::debug!(pod = %info.key, node = %node, "bound");
                self.events.object(
                    &**pod,
                    Kind::Normal,
                    "Scheduled",
                    &format!("Successfully assigned {} to {node}", info.key),
                );
            }
            // Gone, or bound meanwhile: the watch tells the rest.
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {
                lock(&self.snapshot).unplace(&info.uid);
            }
            Err(e) => {
                tracing::warn!(pod = %info.key, node = %node, error = %e, "binding failed; retrying");
                lock(&self.snapshot).unplace(&info.uid);
                lock(&self.assumed).remove(&info.uid);
                lock(&self.pending).insert(info.uid.clone(), pod.clone());
                self.queue.retry(&info.uid, info.priority);
            }
        }
    }

    /// Evicts the victims and nominates the node.
    async fn preempt(&self, pod: &Pod, p: &preemption::Preemption) {
        let node = &p.node;
        tracing::info!(pod = %pod.name_any(), node = %node, victims = p.victims.len(), "preempting");
        for v in &p.victims {
            let ns = v.namespace.clone();
            let api: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
            let name = v.pod.name_any();
            let condition = json!({"status": {"conditions": [{
                "type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler",
                "message": format!("{SCHEDULER_NAME}: preempting to accommodate a higher priority pod"),
                "lastTransitionTime": Utc::now().to_rfc3339_opts(k8s_openapi::chrono::SecondsFormat::Secs, true),
            }]}});
            if let Err(e) = api
                .patch_status(
                    &name,
                    &PatchParams::default(),
                    &Patch::Strategic(&condition),
                )
                .await
            {
                tracing::debug!(pod = %name, error = %e, "marking a victim");
            }
            match api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => self.events.object(
                    &*v.pod,
                    Kind::Normal,
                    "Preempted",
                    &format!(
                        "Preempted by pod {} on node {node}",
                        pod.uid().unwrap_or_default()
                    ),
                ),
                Err(e) => tracing::warn!(pod = %name, error = %e, "evicting a victim failed"),
            }
        }
        let api: Api<Pod> =
            Api::namespaced(self.client.clone(), &pod.namespace().unwrap_or_default());
        let patch = json!({"status": {"nominatedNodeName": node}});
        if let Err(e) = api
            .patch_status(
                &pod.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            tracing::debug!(pod = %pod.name_any(), error = %e, "nominating a node");
        }
    }

    /// `PodScheduled=False` with the reason, and a `FailedScheduling` event.
    async fn record_failure(&self, pod: &Pod, message: &str) {
        tracing::debug!(pod = %pod.name_any(), %message, "unschedulable");
        self.events
            .object(pod, Kind::Warning, "FailedScheduling", message);
        let current = podfacts::condition(pod, "PodScheduled");
        if current.is_some_and(|c| c.status == "False" && c.message.as_deref() == Some(message)) {
            return;
        }
        let api: Api<Pod> =
            Api::namespaced(self.client.clone(), &pod.namespace().unwrap_or_default());
        let patch = json!({"status": {"conditions": [{
            "type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message,
            "lastProbeTime": null,
            "lastTransitionTime": Utc::now().to_rfc3339_opts(k8s_openapi::chrono::SecondsFormat::Secs, true),
        }]}});
        if let Err(e) = api
            .patch_status(
                &pod.name_any(),
                &PatchParams::default(),
                &Patch::Strategic(&patch),
            )
            .await
        {
            tracing::debug!(pod = %pod.name_any(), error = %e, "recording unschedulable");
        }
    }
}

/// Runs the scheduler until the process ends.
pub async fn run(
    client: Client,
    pods: Arc<Informer<Pod>>,
    nodes: Arc<Informer<Node>>,
    namespaces: Arc<Informer<Namespace>>,
) {
    let mut pod_changes = pods.subscribe();
    let mut node_changes = nodes.subscribe();
    let mut ns_changes = namespaces.subscribe();
    let s = Arc::new(Scheduler {
        events: Recorder::new(client.clone(), SCHEDULER_NAME, None),
        client,
        snapshot: Mutex::new(Snapshot::default()),
        queue: SchedulingQueue::default(),
        pending: Mutex::new(HashMap::new()),
        assumed: Mutex::new(HashMap::new()),
    });
    // Changes are applied as they come (node and namespace first on start, so the first
    // cycles see the whole cluster).
    let feed = {
        let s = s.clone();
        async move {
            loop {
                tokio::select! {
                    biased;
                    Some(c) = ns_changes.recv() => s.on_namespace(&c),
                    Some(c) = node_changes.recv() => s.on_node(&c),
                    Some(c) = pod_changes.recv() => s.on_pod(&c),
                    else => return,
                }
            }
        }
    };
    let cycles = {
        let s = s.clone();
        async move {
            nodes.synced().await;
            pods.synced().await;
            loop {
                let (uid, cycle) = s.queue.pop().await;
                s.schedule_one(uid, cycle).await;
                // Let the feed apply what the cycle's writes caused.
                tokio::task::yield_now().await;
            }
        }
    };
    tokio::join!(feed, cycles);
}
