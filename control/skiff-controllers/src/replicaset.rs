//! The ReplicaSet controller (`pkg/controller/replicaset`): keeps `spec.replicas` active pods
//! from the template, claiming pods by selector and controller reference; creates in
//! slow-start batches (1, 2, 4, … up to 500 per pass) so a failing template fails fast; deletes
//! the least valuable pods first (unscheduled, pending, not ready, lowest deletion cost,
//! shortest ready, most restarts, newest); maintains `replicas`, `fullyLabeledReplicas`,
//! `readyReplicas`, `availableReplicas`, `observedGeneration` and the `ReplicaFailure`
//! condition. Events: `SuccessfulCreate`, `SuccessfulDelete`, `FailedCreate`.

use std::{collections::HashMap, sync::Arc, time::Duration};

use futures::future::join_all;
use k8s_openapi::{
    api::{
        apps::v1::{ReplicaSet, ReplicaSetCondition, ReplicaSetStatus},
        core::v1::{Pod, PodTemplateSpec},
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
    chrono::Utc,
};
use kube::{Client, ResourceExt};
use skiff_apimachinery::{
    events::Recorder,
    labels,
    pod::{self, controller_ref},
};

use crate::{
    Key,
    informer::{Change, Informer},
    owners,
    queue::Queue,
};

/// Most pods created or deleted in one pass (`burstReplicas`).
const BURST: usize = 500;

struct Ctx {
    client: Client,
    sets: Arc<Informer<ReplicaSet>>,
    pods: Arc<Informer<Pod>>,
    events: Recorder,
}

/// A pod for `template`, controlled by `owner` (`controller.GetPodFromTemplate`).
pub fn pod_from_template(
    template: &PodTemplateSpec,
    owner: k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference,
    namespace: &str,
    generate_name: String,
) -> Pod {
    let meta = template.metadata.clone().unwrap_or_default();
    Pod {
        metadata: ObjectMeta {
            generate_name: Some(generate_name),
            namespace: Some(namespace.to_string()),
            labels: meta.labels,
            annotations: meta.annotations,
            finalizers: meta.finalizers,
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        spec: template.spec.clone(),
        status: None,
    }
}

/// Orders pods so the first are the ones to delete first (`controller.ActivePodsWithRanks`).
/// `colocated` counts, per node, the pods of the same set there.
pub fn deletion_order(pods: &mut [Arc<Pod>], colocated: &HashMap<String, usize>) {
    let phase_rank = |p: &Pod| match pod::phase(p) {
        "Pending" => 0,
        "Unknown" => 1,
        "Running" => 2,
        _ => 3,
    };
    let cost = |p: &Pod| -> i64 {
        p.annotations()
            .get("controller.kubernetes.io/pod-deletion-cost")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let ready_since = |p: &Pod| {
        pod::condition(p, "Ready")
            .filter(|c| c.status == "True")
            .and_then(|c| c.last_transition_time.as_ref().map(|t| t.0))
    };
    pods.sort_by(|a, b| {
        let (an, bn) = (pod::node_name(a), pod::node_name(b));
        an.is_some()
            .cmp(&bn.is_some())
            .then(phase_rank(a).cmp(&phase_rank(b)))
            .then(pod::is_ready(a).cmp(&pod::is_ready(b)))
            .then(cost(a).cmp(&cost(b)))
            // More pods of the set on the same node: delete there first.
            .then_with(|| {
                let rank = |n: Option<&str>| n.and_then(|n| colocated.get(n)).copied().unwrap_or(0);
                rank(bn).cmp(&rank(an))
            })
            // Ready for less time first (None sorts before Some: not ready).
            .then_with(|| ready_since(b).cmp(&ready_since(a)))
            .then(pod::restarts(b).cmp(&pod::restarts(a)))
            .then_with(|| b.creation_timestamp().cmp(&a.creation_timestamp()))
    });
}

/// The status `pods` (the set's active pods) give.
pub fn status_of(
    rs: &ReplicaSet,
    pods: &[Arc<Pod>],
    failure: Option<(String, String)>,
) -> ReplicaSetStatus {
    let now = Utc::now();
    let min_ready = rs
        .spec
        .as_ref()
        .and_then(|s| s.min_ready_seconds)
        .unwrap_or(0);
    let template_labels = rs
        .spec
        .as_ref()
        .and_then(|s| s.template.as_ref())
        .and_then(|t| t.metadata.as_ref())
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    let old = rs.status.clone().unwrap_or_default();
    let mut conditions: Vec<ReplicaSetCondition> = old
        .conditions
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|c| c.type_ != "ReplicaFailure")
        .collect();
    if let Some((reason, message)) = failure {
        let prev = old
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == "ReplicaFailure");
        conditions.push(ReplicaSetCondition {
            type_: "ReplicaFailure".into(),
            status: "True".into(),
            last_transition_time: prev
                .and_then(|c| c.last_transition_time.clone())
                .or(Some(Time(now))),
            reason: Some(reason),
            message: Some(message),
        });
    }
    ReplicaSetStatus {
        replicas: pods.len() as i32,
        fully_labeled_replicas: Some(
            pods.iter()
                .filter(|p| {
                    template_labels
                        .iter()
                        .all(|(k, v)| p.labels().get(k) == Some(v))
                })
                .count() as i32,
        ),
        ready_replicas: Some(pods.iter().filter(|p| pod::is_ready(p)).count() as i32),
        available_replicas: Some(
            pods.iter()
                .filter(|p| pod::is_available(p, min_ready, now))
                .count() as i32,
        ),
        observed_generation: rs.metadata.generation,
        conditions: (!conditions.is_empty()).then_some(conditions),
    }
}

async fn reconcile(key: Key, ctx: Arc<Ctx>) -> anyhow::Result<Option<Duration>> {
    let Some(rs) = ctx.sets.cache().get(&key.namespace, &key.name) else {
        return Ok(None);
    };
    let spec = rs.spec.clone().unwrap_or_default();
    let active: Vec<Arc<Pod>> = ctx
        .pods
        .cache()
        .list_namespace(&key.namespace)
        .into_iter()
        .filter(|p| pod::is_active(p))
        .collect();
    let mut owned =
        owners::claim(&ctx.client, ctx.pods.cache(), &*rs, &spec.selector, active).await?;
    let want = spec.replicas.unwrap_or(1).max(0) as usize;
    let mut failure = None;
    if rs.metadata.deletion_timestamp.is_none() {
        if owned.len() < want {
            let (created, err) = create_pods(&ctx, &rs, (want - owned.len()).min(BURST)).await;
            owned.extend(created);
            if let Some(e) = err {
                failure = Some(("FailedCreate".to_string(), e));
            }
        } else if owned.len() > want {
            let colocated = owned.iter().filter_map(|p| pod::node_name(p)).fold(
                HashMap::<String, usize>::new(),
                |mut m, n| {
                    *m.entry(n.to_string()).or_default() += 1;
                    m
                },
            );
            deletion_order(&mut owned, &colocated);
            let excess = (owned.len() - want).min(BURST);
            let doomed: Vec<Arc<Pod>> = owned.drain(..excess).collect();
            if let Some(e) = delete_pods(&ctx, &rs, &doomed).await {
                failure = Some(("FailedDelete".to_string(), e));
            }
        }
    }
    let status = status_of(&rs, &owned, failure.clone());
    if rs.status.as_ref() != Some(&status) {
        let mut updated = (*rs).clone();
        updated.status = Some(status.clone());
        owners::replace_status(&ctx.client, ctx.sets.cache(), &updated).await?;
    }
    if let Some((_, e)) = failure {
        anyhow::bail!("{e}");
    }
    // Ready pods become available after minReadySeconds: look again then.
    let min_ready = spec.min_ready_seconds.unwrap_or(0);
    if min_ready > 0 && status.ready_replicas != status.available_replicas {
        return Ok(Some(Duration::from_secs(min_ready as u64)));
    }
    Ok(None)
}

/// Creates up to `n` pods in slow-start batches; returns those created and the first error.
async fn create_pods(ctx: &Ctx, rs: &ReplicaSet, n: usize) -> (Vec<Arc<Pod>>, Option<String>) {
    let ns = rs.namespace().unwrap_or_default();
    let Some(template) = rs.spec.as_ref().and_then(|s| s.template.clone()) else {
        return (
            Vec::new(),
            Some("the ReplicaSet has no pod template".into()),
        );
    };
    let owner = owners::controller_reference(rs);
    let (mut created, mut batch, mut left) = (Vec::new(), 1usize, n);
    while left > 0 {
        let size = batch.min(left);
        let results =
            join_all((0..size).map(|_| {
                let pod =
                    pod_from_template(&template, owner.clone(), &ns, format!("{}-", rs.name_any()));
                async move {
                    owners::create_pod(&ctx.client, ctx.pods.cache(), &ctx.events, rs, &pod).await
                }
            }))
            .await;
        let mut error = None;
        for r in results {
            match r {
                Ok(p) => created.push(p),
                Err(e) => {
                    error.get_or_insert(e.to_string());
                }
            }
        }
        if let Some(e) = error {
            return (created, Some(e));
        }
        left -= size;
        batch *= 2;
    }
    (created, None)
}

/// Deletes `pods`; returns the first error.
async fn delete_pods(ctx: &Ctx, rs: &ReplicaSet, pods: &[Arc<Pod>]) -> Option<String> {
    let results = join_all(
        pods.iter()
            .map(|p| owners::delete_pod(&ctx.client, ctx.pods.cache(), &ctx.events, rs, p)),
    )
    .await;
    results
        .into_iter()
        .find_map(|r| r.err())
        .map(|e| e.to_string())
}

/// The sets a pod change concerns: its controller (before and after), or, for an orphan,
/// every set in its namespace whose selector matches it (to adopt it).
fn sets_for(change: &Change<Pod>, sets: &Informer<ReplicaSet>) -> Vec<Key> {
    let mut keys = Vec::new();
    let mut add = |p: &Pod| {
        let ns = p.namespace().unwrap_or_default();
        match controller_ref(&p.metadata) {
            Some(r) if r.kind == "ReplicaSet" => keys.push(Key::new(&ns, &r.name)),
            Some(_) => {}
            None if pod::is_active(p) => {
                for rs in sets.cache().list_namespace(&ns) {
                    let sel = rs.spec.as_ref().map(|s| &s.selector);
                    if sel.is_some_and(|s| !labels::is_empty(s) && labels::matches(s, p.labels())) {
                        keys.push(Key::of(&*rs));
                    }
                }
            }
            None => {}
        }
    };
    match change {
        Change::Applied { old, new } => {
            add(new);
            if let Some(old) = old
                && (controller_ref(&old.metadata) != controller_ref(&new.metadata)
                    || old.labels() != new.labels())
            {
                add(old);
            }
        }
        Change::Deleted(p) => add(p),
    }
    keys.sort();
    keys.dedup();
    keys
}

/// Runs the ReplicaSet controller until the process ends.
pub async fn run(client: Client, sets: Arc<Informer<ReplicaSet>>, pods: Arc<Informer<Pod>>) {
    let queue: Arc<Queue<Key>> = Queue::new();
    let mut set_changes = sets.subscribe();
    let mut pod_changes = pods.subscribe();
    sets.synced().await;
    pods.synced().await;
    let ctx = Arc::new(Ctx {
        events: Recorder::new(client.clone(), "replicaset-controller", None),
        client,
        sets: sets.clone(),
        pods,
    });
    let q = queue.clone();
    let feed = async move {
        loop {
            tokio::select! {
                Some(c) = set_changes.recv() => q.add(Key::of(&**c.object())),
                Some(c) = pod_changes.recv() => {
                    for k in sets_for(&c, &sets) {
                        q.add(k);
                    }
                }
                else => return,
            }
        }
    };
    let work = queue.run("replicaset", 5, move |key| reconcile(key, ctx.clone()));
    tokio::join!(feed, work);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(name: &str, node: Option<&str>, phase: &str, ready: bool) -> Arc<Pod> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": name, "creationTimestamp": "2026-01-01T00:00:00Z"},
                "spec": {"nodeName": node, "containers": []},
                "status": {"phase": phase, "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]}
            }))
            .unwrap(),
        )
    }

    #[test]
    fn deletes_unscheduled_then_pending_then_unready_first() {
        let mut pods = vec![
            pod("ready", Some("n1"), "Running", true),
            pod("unready", Some("n1"), "Running", false),
            pod("pending", Some("n1"), "Pending", false),
            pod("unscheduled", None, "Pending", false),
        ];
        deletion_order(&mut pods, &HashMap::new());
        let names: Vec<String> = pods.iter().map(|p| p.name_any()).collect();
        assert_eq!(names, ["unscheduled", "pending", "unready", "ready"]);
    }

    #[test]
    fn deletion_cost_then_colocation_break_ties() {
        let mut cheap = (*pod("cheap", Some("n2"), "Running", true)).clone();
        cheap.metadata.annotations = Some(
            [(
                "controller.kubernetes.io/pod-deletion-cost".to_string(),
                "-5".to_string(),
            )]
            .into(),
        );
        let mut pods = vec![
            pod("alone", Some("n2"), "Running", true),
            Arc::new(cheap),
            pod("crowded", Some("n1"), "Running", true),
        ];
        let colocated = HashMap::from([("n1".to_string(), 3), ("n2".to_string(), 2)]);
        deletion_order(&mut pods, &colocated);
        let names: Vec<String> = pods.iter().map(|p| p.name_any()).collect();
        assert_eq!(names, ["cheap", "crowded", "alone"]);
    }

    #[test]
    fn status_counts_labels_readiness_and_failure() {
        let rs: ReplicaSet = serde_json::from_value(json!({
            "metadata": {"name": "web", "generation": 3},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
                "template": {"metadata": {"labels": {"app": "web", "tier": "fe"}}}}
        }))
        .unwrap();
        let mut labelled = (*pod("a", Some("n1"), "Running", true)).clone();
        labelled.metadata.labels =
            Some([("app".into(), "web".into()), ("tier".into(), "fe".into())].into());
        let pods = vec![Arc::new(labelled), pod("b", Some("n1"), "Pending", false)];
        let s = status_of(&rs, &pods, Some(("FailedCreate".into(), "quota".into())));
        assert_eq!(s.replicas, 2);
        assert_eq!(s.fully_labeled_replicas, Some(1));
        assert_eq!(s.ready_replicas, Some(1));
        assert_eq!(s.available_replicas, Some(1));
        assert_eq!(s.observed_generation, Some(3));
        let c = &s.conditions.unwrap()[0];
        assert_eq!(
            (c.type_.as_str(), c.reason.as_deref()),
            ("ReplicaFailure", Some("FailedCreate"))
        );
    }
}
