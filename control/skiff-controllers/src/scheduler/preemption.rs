//! DefaultPreemption (the PostFilter stage): when a pod fits nowhere, find a node where
//! evicting pods of lower priority makes room, evicting as few and as unimportant as possible.
//! On each node whose rejection eviction could address, all lower-priority pods are set
//! aside, the pod must then fit, and the set-aside pods are taken back, most important first,
//! while it still fits; the rest are the victims. The node whose victims have the lowest
//! highest priority wins, then the lowest priority sum, then the fewest victims.
//! (PodDisruptionBudgets are not considered yet.)

use std::sync::Arc;

use super::framework::{self, FitError, PodInfo, Snapshot};

/// A node and the pods to evict from it.
#[derive(Debug, Clone)]
pub struct Preemption {
    /// The node the pod is nominated to.
    pub node: String,
    /// The pods to evict.
    pub victims: Vec<Arc<PodInfo>>,
}

/// Whether the pod may preempt at all (`preemptionPolicy: Never` may not).
pub fn may_preempt(pod: &PodInfo) -> bool {
    pod.pod
        .spec
        .as_ref()
        .and_then(|s| s.preemption_policy.as_deref())
        != Some("Never")
}

/// Finds the best node to preempt on, if any.
pub fn find(pod: &PodInfo, snap: &Snapshot, fit: &FitError) -> Option<Preemption> {
    if !may_preempt(pod) {
        return None;
    }
    let state = framework::pre_filter(pod, snap);
    let mut best: Option<((i32, i64, usize), Preemption)> = None;
    for (name, reject) in &fit.rejects {
        if !reject.resolvable {
            continue;
        }
        let Some(node) = snap.nodes.get(name) else {
            continue;
        };
        let mut n = node.clone();
        let mut lower: Vec<Arc<PodInfo>> = n
            .pods
            .iter()
            .filter(|p| p.priority < pod.priority)
            .cloned()
            .collect();
        if lower.is_empty() {
            continue;
        }
        for p in &lower {
            n.remove_pod(&p.uid);
        }
        if framework::filter(pod, &state, &n).is_err() {
            continue;
        }
        // Most important first get their place back.
        lower.sort_by_key(|p| std::cmp::Reverse(p.priority));
        let mut victims = Vec::new();
        for p in lower {
            n.add_pod(p.clone());
            if framework::filter(pod, &state, &n).is_err() {
                n.remove_pod(&p.uid);
                victims.push(p);
            }
        }
        if victims.is_empty() {
            continue;
        }
        let rank = (
            victims.iter().map(|v| v.priority).max().unwrap_or(0),
            victims.iter().map(|v| i64::from(v.priority)).sum(),
            victims.len(),
        );
        if best
            .as_ref()
            .is_none_or(|(r, b)| rank < *r || (rank == *r && *name < b.node))
        {
            best = Some((
                rank,
                Preemption {
                    node: name.clone(),
                    victims,
                },
            ));
        }
    }
    best.map(|(_, p)| p)
}

/// The preemption part of a failure message, as upstream words it.
pub fn message(pod: &PodInfo, fit: &FitError) -> String {
    if !may_preempt(pod) {
        return "preemption: not eligible due to preemptionPolicy=Never.".into();
    }
    let mut helpless = 0;
    let mut no_victims = 0;
    for r in fit.rejects.values() {
        if r.resolvable {
            no_victims += 1;
        } else {
            helpless += 1;
        }
    }
    let mut parts = Vec::new();
    if no_victims > 0 {
        parts.push(format!(
            "{no_victims} No preemption victims found for incoming pod"
        ));
    }
    if helpless > 0 {
        parts.push(format!(
            "{helpless} Preemption is not helpful for scheduling"
        ));
    }
    format!(
        "preemption: 0/{} nodes are available: {}.",
        fit.nodes,
        parts.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(name: &str, priority: i32, cpu: &str) -> Arc<PodInfo> {
        Arc::new(PodInfo::new(Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "default", "uid": name},
                "spec": {"priority": priority, "containers": [{"name": "c", "resources": {"requests": {"cpu": cpu}}}]}
            }))
            .unwrap(),
        )))
    }

    #[test]
    fn evicts_the_fewest_least_important_pods() {
        let mut snap = Snapshot::default();
        for name in ["a", "b"] {
            snap.upsert_node(Arc::new(
                serde_json::from_value(json!({
                    "metadata": {"name": name},
                    "status": {"allocatable": {"cpu": "2", "memory": "4Gi", "pods": "110"},
                        "conditions": [{"type": "Ready", "status": "True"}]}
                }))
                .unwrap(),
            ));
        }
        snap.place(pod("a-low", 10, "1"), "a");
        snap.place(pod("a-mid", 50, "1"), "a");
        snap.place(pod("b-low1", 10, "500m"), "b");
        snap.place(pod("b-low2", 10, "500m"), "b");
        snap.place(pod("b-high", 1000, "1"), "b");
        let p = pod("urgent", 100, "1");
        let fit = framework::schedule(&p, &mut snap).unwrap_err();
        let got = find(&p, &snap, &fit).expect("a node to preempt on");
        // a: one victim of priority 10 (a-mid is kept); b: two of priority 10.
        assert_eq!(got.node, "a");
        let names: Vec<&str> = got.victims.iter().map(|v| v.uid.as_str()).collect();
        assert_eq!(names, ["a-low"]);
        // Nothing of lower priority to evict: no preemption.
        let meek = pod("meek", 5, "1");
        let fit = framework::schedule(&meek, &mut snap).unwrap_err();
        assert!(find(&meek, &snap, &fit).is_none());
        assert_eq!(
            message(&meek, &fit),
            "preemption: 0/2 nodes are available: 2 No preemption victims found for incoming pod."
        );
    }
}
