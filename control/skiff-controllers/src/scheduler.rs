//! The scheduler: binds each pending pod (no `spec.nodeName`, `schedulerName` default) to a
//! node through `pods/binding`, as kube-scheduler does.
//!
//! Filters: the node is Ready and schedulable, has room under its `pods` capacity and its
//! allocatable CPU and memory for the pod's requests, matches the pod's `nodeSelector`, and has
//! no NoSchedule/NoExecute taint the pod does not tolerate. Score: fewest requested CPU and
//! memory relative to allocatable (least allocated), ties broken by name. A pod that fits
//! nowhere is retried when nodes or pods change, and at least every 10 s.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::{
    api::core::v1::{Binding, Node, Pod},
    apimachinery::pkg::api::resource::Quantity,
};
use kube::{
    Api, Client, ResourceExt,
    api::PostParams,
    runtime::{Controller, controller::Action, reflector::Store, watcher},
};
use serde_json::json;

/// The scheduler's name (pods with another `schedulerName` are left alone).
pub const SCHEDULER_NAME: &str = "default-scheduler";
/// Retry interval for pods that fit nowhere.
const RETRY: Duration = Duration::from_secs(10);

/// A quantity in base units (cores for CPU, bytes for memory), as far as scheduling needs.
pub fn parse_quantity(q: &str) -> f64 {
    let q = q.trim();
    let suffixes: [(&str, f64); 13] = [
        ("Ki", 1024.0),
        ("Mi", 1024f64.powi(2)),
        ("Gi", 1024f64.powi(3)),
        ("Ti", 1024f64.powi(4)),
        ("Pi", 1024f64.powi(5)),
        ("Ei", 1024f64.powi(6)),
        ("n", 1e-9),
        ("u", 1e-6),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
    ];
    for (s, mult) in suffixes {
        if let Some(n) = q.strip_suffix(s) {
            return n.parse::<f64>().unwrap_or(0.0) * mult;
        }
    }
    q.parse().unwrap_or(0.0)
}

fn requests(pod: &Pod) -> (f64, f64) {
    let mut cpu = 0.0;
    let mut mem = 0.0;
    for c in pod.spec.iter().flat_map(|s| &s.containers) {
        let req: BTreeMap<String, Quantity> = c
            .resources
            .as_ref()
            .and_then(|r| r.requests.clone().or_else(|| r.limits.clone()))
            .unwrap_or_default();
        cpu += req.get("cpu").map_or(0.0, |q| parse_quantity(&q.0));
        mem += req.get("memory").map_or(0.0, |q| parse_quantity(&q.0));
    }
    (cpu, mem)
}

fn ready(n: &Node) -> bool {
    n.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.status == "True")
}

fn tolerated(pod: &Pod, n: &Node) -> bool {
    let taints = n
        .spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default();
    let tolerations = pod
        .spec
        .as_ref()
        .and_then(|s| s.tolerations.clone())
        .unwrap_or_default();
    taints
        .iter()
        .filter(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
        .all(|t| {
            tolerations.iter().any(|tol| {
                let key_ok = tol
                    .key
                    .as_deref()
                    .is_none_or(|k| k.is_empty() || k == t.key);
                let op = tol.operator.as_deref().unwrap_or("Equal");
                let value_ok = op == "Exists"
                    || tol.value.as_deref().unwrap_or("") == t.value.as_deref().unwrap_or("");
                let effect_ok = tol
                    .effect
                    .as_deref()
                    .is_none_or(|e| e.is_empty() || e == t.effect);
                key_ok && value_ok && effect_ok
            })
        })
}

/// The node a pod is on, or was just bound to (`assumed`: bindings the watch may not show yet,
/// as kube-scheduler's assume cache).
fn node_of<'a>(p: &'a Pod, assumed: &'a HashMap<String, String>) -> Option<&'a str> {
    p.spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .filter(|n| !n.is_empty())
        .or_else(|| {
            p.metadata
                .uid
                .as_ref()
                .and_then(|u| assumed.get(u))
                .map(String::as_str)
        })
}

/// Picks a node for `pod` among `nodes`, given the pods already placed.
pub fn choose(
    pod: &Pod,
    nodes: &[Arc<Node>],
    placed: &[Arc<Pod>],
    assumed: &HashMap<String, String>,
) -> Option<String> {
    let (want_cpu, want_mem) = requests(pod);
    let selector = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_selector.clone())
        .unwrap_or_default();
    let mut best: Option<(f64, String)> = None;
    for n in nodes {
        let name = n.name_any();
        if !ready(n) || n.spec.as_ref().and_then(|s| s.unschedulable) == Some(true) {
            continue;
        }
        let labels = n.labels();
        if !selector.iter().all(|(k, v)| labels.get(k) == Some(v)) || !tolerated(pod, n) {
            continue;
        }
        let alloc = n
            .status
            .as_ref()
            .and_then(|s| s.allocatable.clone())
            .unwrap_or_default();
        let cap = |k: &str| alloc.get(k).map_or(0.0, |q| parse_quantity(&q.0));
        let on_node: Vec<&Arc<Pod>> = placed
            .iter()
            .filter(|p| node_of(p, assumed) == Some(name.as_str()))
            .filter(|p| {
                !matches!(
                    p.status.as_ref().and_then(|s| s.phase.as_deref()),
                    Some("Succeeded" | "Failed")
                )
            })
            .collect();
        if on_node.len() as f64 >= cap("pods") {
            continue;
        }
        let (used_cpu, used_mem) = on_node
            .iter()
            .map(|p| requests(p))
            .fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
        let (cpu, mem) = (cap("cpu"), cap("memory"));
        if used_cpu + want_cpu > cpu || used_mem + want_mem > mem {
            continue;
        }
        let score = ((used_cpu + want_cpu) / cpu.max(1e-9) + (used_mem + want_mem) / mem.max(1.0))
            / 2.0
            + on_node.len() as f64 * 1e-6;
        if best
            .as_ref()
            .is_none_or(|(s, b)| score < *s || (score == *s && name < *b))
        {
            best = Some((score, name));
        }
    }
    best.map(|(_, n)| n)
}

struct Ctx {
    client: Client,
    nodes: Store<Node>,
    pods: Store<Pod>,
    /// Pod uid → node, for bindings made but not yet seen by the watch.
    assumed: Mutex<HashMap<String, String>>,
    lock: tokio::sync::Mutex<()>,
}

/// A reconcile failure (retried).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Error(#[from] kube::Error);

async fn reconcile(pod: Arc<Pod>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let spec = pod.spec.as_ref();
    let bound = spec
        .and_then(|s| s.node_name.as_deref())
        .is_some_and(|n| !n.is_empty());
    let ours = spec
        .and_then(|s| s.scheduler_name.as_deref())
        .is_none_or(|s| s == SCHEDULER_NAME);
    if bound || !ours || pod.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    // One decision at a time, so two pods never both take a node's last slot.
    let _guard = ctx.lock.lock().await;
    let nodes = ctx.nodes.state();
    let pods = ctx.pods.state();
    let assumed = {
        let mut a = ctx.assumed.lock().unwrap_or_else(|p| p.into_inner());
        // Forget what the watch now shows bound, or what is gone.
        a.retain(|uid, _| {
            pods.iter().any(|p| {
                p.metadata.uid.as_deref() == Some(uid.as_str())
                    && p.spec
                        .as_ref()
                        .and_then(|s| s.node_name.as_deref())
                        .is_none_or(str::is_empty)
            })
        });
        a.clone()
    };
    if pod
        .metadata
        .uid
        .as_ref()
        .is_some_and(|u| assumed.contains_key(u))
    {
        return Ok(Action::await_change());
    }
    let Some(node) = choose(&pod, &nodes, &pods, &assumed) else {
        tracing::debug!(pod = %pod.name_any(), "no node fits; retrying");
        return Ok(Action::requeue(RETRY));
    };
    let ns = pod.namespace().unwrap_or_default();
    let binding: Binding = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Binding",
        "metadata": {"name": pod.name_any(), "namespace": ns},
        "target": {"apiVersion": "v1", "kind": "Node", "name": node},
    }))
    .map_err(|e| Error(kube::Error::SerdeError(e)))?;
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let body = serde_json::to_vec(&binding).map_err(|e| Error(kube::Error::SerdeError(e)))?;
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
            tracing::info!(pod = %pod.name_any(), namespace = %ns, node = %node, "scheduled");
            if let Some(uid) = pod.metadata.uid.clone() {
                ctx.assumed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(uid, node);
            }
        }
        Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => {}
        Err(e) => return Err(e.into()),
    }
    Ok(Action::await_change())
}

fn error_policy(pod: Arc<Pod>, e: &Error, _: Arc<Ctx>) -> Action {
    tracing::warn!(pod = %pod.name_any(), error = %e, "scheduling failed; retrying");
    Action::requeue(crate::backoff(1))
}

/// Runs the scheduler until the process ends.
pub async fn run(client: Client) -> anyhow::Result<()> {
    let node_ctl = Controller::new(Api::<Node>::all(client.clone()), watcher::Config::default());
    let nodes = node_ctl.store();
    let pod_ctl = Controller::new(Api::<Pod>::all(client.clone()), watcher::Config::default());
    let pods = pod_ctl.store();
    let ctx = Arc::new(Ctx {
        client,
        nodes,
        pods,
        assumed: Mutex::new(HashMap::new()),
        lock: tokio::sync::Mutex::new(()),
    });
    // Node changes (a node becoming Ready) wake every pending pod.
    let (tx, rx) = futures::channel::mpsc::unbounded::<()>();
    let node_task = tokio::spawn(
        node_ctl
            .run(
                |_n: Arc<Node>, _c: Arc<()>| async { Ok::<_, Error>(Action::await_change()) },
                |_n, _e, _c| Action::await_change(),
                Arc::new(()),
            )
            .for_each(move |_| {
                let _ = tx.unbounded_send(());
                async {}
            }),
    );
    let pods_run = pod_ctl
        .reconcile_all_on(rx)
        .run(reconcile, error_policy, ctx)
        .for_each(|r| {
            if let Err(e) = r {
                tracing::debug!(error = %e, "scheduler controller event");
            }
            async {}
        });
    pods_run.await;
    node_task.abort();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, ready: bool, cpu: &str, pods: &str) -> Arc<Node> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": name, "labels": {"disk": "ssd"}},
                "status": {"allocatable": {"cpu": cpu, "memory": "4Gi", "pods": pods},
                    "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}
            }))
            .unwrap(),
        )
    }

    fn pod(cpu: &str, node: Option<&str>) -> Arc<Pod> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": "p"},
                "spec": {"nodeName": node, "containers": [{"name": "c", "resources": {"requests": {"cpu": cpu}}}]}
            }))
            .unwrap(),
        )
    }

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("500m"), 0.5);
        assert_eq!(parse_quantity("2"), 2.0);
        assert_eq!(parse_quantity("1Gi"), 1073741824.0);
        assert_eq!(parse_quantity("100M"), 1e8);
    }

    #[test]
    fn filters_and_least_allocated() {
        let nodes = vec![
            node("a", true, "2", "110"),
            node("b", true, "2", "110"),
            node("c", false, "8", "110"),
        ];
        let placed = vec![pod("1", Some("a"))];
        let none = HashMap::new();
        assert_eq!(
            choose(&pod("500m", None), &nodes, &placed, &none).as_deref(),
            Some("b")
        );
        assert_eq!(
            choose(&pod("3", None), &nodes, &placed, &none),
            None,
            "fits nowhere"
        );
        let full = vec![node("a", true, "2", "1")];
        assert_eq!(
            choose(&pod("0", None), &full, &placed, &none),
            None,
            "pod capacity"
        );
        // A binding the watch has not shown yet still counts.
        let mut pending: Pod = (*pod("1", None)).clone();
        pending.metadata.uid = Some("u1".into());
        let assumed = HashMap::from([("u1".to_string(), "b".to_string())]);
        assert_eq!(
            choose(
                &pod("500m", None),
                &nodes,
                &[placed[0].clone(), Arc::new(pending)],
                &assumed
            )
            .as_deref(),
            Some("a"),
            "a and b are equally loaded; a wins the tie by name"
        );
        let mut sel: Pod = (*pod("0", None)).clone();
        sel.spec.as_mut().unwrap().node_selector =
            Some([("disk".to_string(), "hdd".to_string())].into());
        assert_eq!(choose(&sel, &nodes, &[], &HashMap::new()), None);
    }

    #[test]
    fn taints_need_tolerations() {
        let mut n = (*node("a", true, "2", "110")).clone();
        n.spec = Some(
            serde_json::from_value(
                json!({"taints": [{"key": "k", "value": "v", "effect": "NoSchedule"}]}),
            )
            .unwrap(),
        );
        let nodes = vec![Arc::new(n)];
        assert_eq!(choose(&pod("0", None), &nodes, &[], &HashMap::new()), None);
        let mut p: Pod = (*pod("0", None)).clone();
        p.spec.as_mut().unwrap().tolerations = Some(
            serde_json::from_value(
                json!([{"key": "k", "operator": "Equal", "value": "v", "effect": "NoSchedule"}]),
            )
            .unwrap(),
        );
        assert_eq!(
            choose(&p, &nodes, &[], &HashMap::new()).as_deref(),
            Some("a")
        );
    }
}
