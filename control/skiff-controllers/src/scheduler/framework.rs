//! The scheduling framework, after kube-scheduler's: per-pod facts computed once
//! ([`PodInfo`]), per-node aggregates kept incrementally ([`NodeInfo`]), and plugins at the
//! PreFilter, Filter and Score extension points. A cycle filters nodes (sampling like
//! `percentageOfNodesToScore` on large clusters), scores the feasible ones with weighted,
//! normalized plugin scores, and picks the best; when nothing fits it reports each node's
//! reason in upstream's words ("0/3 nodes are available: 1 Insufficient cpu, …").

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
};

use k8s_openapi::api::core::v1::{Node, Pod, Taint, Toleration};
use kube::ResourceExt;
use skiff_apimachinery::pod::{self, Resources};

use super::plugins::{self, AffinityTerm, SpreadConstraint};

/// Requests assumed for scoring when a container states none (`DefaultMilliCPURequest`,
/// `DefaultMemoryRequest`), so empty pods still spread.
pub const DEFAULT_MILLI_CPU: i64 = 100;
/// See [`DEFAULT_MILLI_CPU`].
pub const DEFAULT_MEMORY: i64 = 200 * 1024 * 1024;

/// A host port a pod asks for: (protocol, host IP, port).
pub type HostPort = (String, String, i32);

/// What the scheduler needs of a pod, computed once.
#[derive(Debug)]
pub struct PodInfo {
    /// The pod.
    pub pod: Arc<Pod>,
    /// `namespace/name`.
    pub key: String,
    /// Its uid.
    pub uid: String,
    /// Its namespace.
    pub namespace: String,
    /// `spec.priority`.
    pub priority: i32,
    /// Requests (containers, init containers, overhead).
    pub requests: Resources,
    /// CPU and memory with defaults for containers that state none, for scoring.
    pub non_zero: (i64, i64),
    /// Host ports.
    pub host_ports: Vec<HostPort>,
    /// Required pod affinity terms.
    pub required_affinity: Vec<AffinityTerm>,
    /// Required pod anti-affinity terms.
    pub required_anti_affinity: Vec<AffinityTerm>,
    /// Preferred pod affinity terms with weights.
    pub preferred_affinity: Vec<(i32, AffinityTerm)>,
    /// Preferred pod anti-affinity terms with weights.
    pub preferred_anti_affinity: Vec<(i32, AffinityTerm)>,
    /// Topology spread constraints.
    pub spread: Vec<SpreadConstraint>,
    /// Identifies pods alike for label selectors: same namespace, labels, and whether being
    /// deleted (selectors are evaluated once per such group, not once per pod).
    pub group: u64,
}

impl PodInfo {
    /// Computes the facts of `pod`.
    pub fn new(pod: Arc<Pod>) -> PodInfo {
        let spec = pod.spec.clone().unwrap_or_default();
        let requests = pod::requests(&pod);
        let mut non_zero = (0, 0);
        for c in &spec.containers {
            let r = c
                .resources
                .as_ref()
                .map(|r| {
                    let mut list = r.limits.clone().unwrap_or_default();
                    list.extend(r.requests.clone().unwrap_or_default());
                    Resources::from_list(&list)
                })
                .unwrap_or_default();
            let has = |k: &str| {
                c.resources.as_ref().is_some_and(|r| {
                    r.requests.as_ref().is_some_and(|m| m.contains_key(k))
                        || r.limits.as_ref().is_some_and(|m| m.contains_key(k))
                })
            };
            non_zero.0 += if has("cpu") {
                r.milli_cpu
            } else {
                DEFAULT_MILLI_CPU
            };
            non_zero.1 += if has("memory") {
                r.memory
            } else {
                DEFAULT_MEMORY
            };
        }
        let host_ports = spec
            .containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .filter(|p| p.host_port.is_some_and(|h| h > 0))
            .map(|p| {
                (
                    p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                    p.host_ip
                        .clone()
                        .filter(|i| !i.is_empty())
                        .unwrap_or_else(|| "0.0.0.0".into()),
                    p.host_port.unwrap_or(0),
                )
            })
            .collect();
        let namespace = pod.namespace().unwrap_or_default();
        let (
            required_affinity,
            required_anti_affinity,
            preferred_affinity,
            preferred_anti_affinity,
        ) = plugins::affinity_terms(&pod, &namespace);
        let spread = plugins::spread_constraints(&pod);
        let group = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            namespace.hash(&mut h);
            pod.labels().hash(&mut h);
            pod.metadata.deletion_timestamp.is_some().hash(&mut h);
            h.finish()
        };
        PodInfo {
            group,
            key: format!("{namespace}/{}", pod.name_any()),
            uid: pod.uid().unwrap_or_default(),
            namespace,
            priority: spec.priority.unwrap_or(0),
            requests,
            non_zero,
            host_ports,
            required_affinity,
            required_anti_affinity,
            preferred_affinity,
            preferred_anti_affinity,
            spread,
            pod,
        }
    }

    /// The pod's labels.
    pub fn labels(&self) -> &BTreeMap<String, String> {
        self.pod.labels()
    }

    /// Whether the pod has any inter-pod (anti-)affinity.
    pub fn has_affinity(&self) -> bool {
        !(self.required_affinity.is_empty()
            && self.required_anti_affinity.is_empty()
            && self.preferred_affinity.is_empty()
            && self.preferred_anti_affinity.is_empty())
    }
}

/// A node with the pods on it (bound or assumed) and their aggregates.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    /// The node.
    pub node: Arc<Node>,
    /// Its name.
    pub name: String,
    /// What it offers to pods.
    pub allocatable: Resources,
    /// How many pods it takes.
    pub allowed_pods: i64,
    /// The pods on it.
    pub pods: Vec<Arc<PodInfo>>,
    /// Their requests.
    pub requested: Resources,
    /// Their requests with defaults, for scoring.
    pub non_zero_requested: (i64, i64),
    /// Host ports in use.
    pub used_ports: HashSet<HostPort>,
    /// The pods on it with inter-pod (anti-)affinity terms.
    pub pods_with_affinity: Vec<Arc<PodInfo>>,
    /// Its pods by [`PodInfo::group`]: one of them, and how many.
    pub groups: HashMap<u64, (Arc<PodInfo>, usize)>,
}

impl NodeInfo {
    /// A node with no pods yet.
    pub fn new(node: Arc<Node>) -> NodeInfo {
        let alloc = node
            .status
            .as_ref()
            .and_then(|s| s.allocatable.clone().or_else(|| s.capacity.clone()))
            .unwrap_or_default();
        let allowed_pods = alloc
            .get("pods")
            .and_then(|q| skiff_apimachinery::quantity::parse(&q.0).ok())
            .unwrap_or(110.0) as i64;
        NodeInfo {
            name: node.name_any(),
            allocatable: Resources::from_list(&alloc),
            allowed_pods,
            node,
            pods: Vec::new(),
            requested: Resources::default(),
            non_zero_requested: (0, 0),
            used_ports: HashSet::new(),
            pods_with_affinity: Vec::new(),
            groups: HashMap::new(),
        }
    }

    /// Replaces the node object, keeping the pods.
    pub fn set_node(&mut self, node: Arc<Node>) {
        let fresh = NodeInfo::new(node);
        self.node = fresh.node;
        self.allocatable = fresh.allocatable;
        self.allowed_pods = fresh.allowed_pods;
    }

    /// Adds a pod.
    pub fn add_pod(&mut self, p: Arc<PodInfo>) {
        self.requested.add(&p.requests);
        self.non_zero_requested.0 += p.non_zero.0;
        self.non_zero_requested.1 += p.non_zero.1;
        for hp in &p.host_ports {
            self.used_ports.insert(hp.clone());
        }
        if p.has_affinity() {
            self.pods_with_affinity.push(p.clone());
        }
        self.groups
            .entry(p.group)
            .or_insert_with(|| (p.clone(), 0))
            .1 += 1;
        self.pods.push(p);
    }

    /// Removes the pod with `uid`; returns whether it was there.
    pub fn remove_pod(&mut self, uid: &str) -> bool {
        let Some(i) = self.pods.iter().position(|p| p.uid == uid) else {
            return false;
        };
        let p = self.pods.swap_remove(i);
        self.pods_with_affinity.retain(|o| o.uid != uid);
        if let Some(g) = self.groups.get_mut(&p.group) {
            g.1 -= 1;
            if g.1 == 0 {
                self.groups.remove(&p.group);
            } else if g.0.uid == uid {
                // The group's representative left: another member stands in.
                if let Some(other) = self.pods.iter().find(|o| o.group == p.group) {
                    g.0 = other.clone();
                }
            }
        }
        self.requested.sub(&p.requests);
        self.non_zero_requested.0 -= p.non_zero.0;
        self.non_zero_requested.1 -= p.non_zero.1;
        for hp in &p.host_ports {
            // Another pod may hold the same port (only possible when assumed twice).
            if !self.pods.iter().any(|o| o.host_ports.contains(hp)) {
                self.used_ports.remove(hp);
            }
        }
        true
    }

    /// The node's labels.
    pub fn labels(&self) -> &BTreeMap<String, String> {
        self.node.labels()
    }

    /// The node's taints.
    pub fn taints(&self) -> &[Taint] {
        self.node
            .spec
            .as_ref()
            .and_then(|s| s.taints.as_deref())
            .unwrap_or_default()
    }
}

/// Whether `tolerations` tolerate `taint` (`v1helper.TolerationsTolerateTaint`).
pub fn tolerates(tolerations: &[Toleration], taint: &Taint) -> bool {
    tolerations.iter().any(|tol| {
        let effect_ok = tol
            .effect
            .as_deref()
            .is_none_or(|e| e.is_empty() || e == taint.effect);
        let key = tol.key.as_deref().unwrap_or("");
        let op = tol.operator.as_deref().unwrap_or("Equal");
        let key_ok = if key.is_empty() {
            op == "Exists"
        } else {
            key == taint.key
        };
        let value_ok = match op {
            "Exists" => true,
            _ => tol.value.as_deref().unwrap_or("") == taint.value.as_deref().unwrap_or(""),
        };
        effect_ok && key_ok && value_ok
    })
}

/// Why a node was filtered out. `resolvable` says whether removing pods could help
/// (preemption tries only those nodes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    /// Upstream's reason text.
    pub reason: String,
    /// Whether evicting pods from the node could make room.
    pub resolvable: bool,
}

impl Reject {
    /// A reason preemption can address.
    pub fn resolvable(reason: impl Into<String>) -> Reject {
        Reject {
            reason: reason.into(),
            resolvable: true,
        }
    }

    /// A reason preemption cannot address (`UnschedulableAndUnresolvable`).
    pub fn unresolvable(reason: impl Into<String>) -> Reject {
        Reject {
            reason: reason.into(),
            resolvable: false,
        }
    }
}

/// What the PreFilter stage computed for one pod over the whole cluster.
#[derive(Debug, Default)]
pub struct CycleState {
    /// Inter-pod affinity counts.
    pub affinity: plugins::AffinityState,
    /// Topology spread counts.
    pub spread: plugins::SpreadState,
}

/// The nodes of the cluster with their pods, as the scheduler last saw them.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Nodes by name (sorted: the filter walk is deterministic).
    pub nodes: BTreeMap<String, NodeInfo>,
    /// Which node each placed pod (by uid) is on.
    pub pod_node: HashMap<String, String>,
    /// Where the next filter walk starts (rotates, as upstream's `nextStartNodeIndex`).
    pub next_start: usize,
    /// Namespace labels (for affinity terms with a namespaceSelector).
    pub namespace_labels: HashMap<String, BTreeMap<String, String>>,
    /// How many placed pods have inter-pod (anti-)affinity terms.
    pub affinity_pods: usize,
    /// Pending pods nominated to a node by preemption, by node: room held for them against
    /// pods of lower or equal priority.
    pub nominated: HashMap<String, Vec<Arc<PodInfo>>>,
}

impl Snapshot {
    /// Adds or updates a node.
    pub fn upsert_node(&mut self, node: Arc<Node>) {
        let name = node.name_any();
        match self.nodes.get_mut(&name) {
            Some(n) => n.set_node(node),
            None => {
                self.nodes.insert(name, NodeInfo::new(node));
            }
        }
    }

    /// Removes a node (its pods are forgotten with it).
    pub fn remove_node(&mut self, name: &str) {
        if let Some(n) = self.nodes.remove(name) {
            for p in n.pods {
                self.pod_node.remove(&p.uid);
            }
            self.affinity_pods -= n.pods_with_affinity.len();
        }
    }

    /// Places `p` on `node` (replacing an earlier placement of the same pod). A node not seen
    /// yet gets a placeholder (not Ready, nothing allocatable) until it is.
    pub fn place(&mut self, p: Arc<PodInfo>, node: &str) {
        self.unplace(&p.uid);
        let n = self.nodes.entry(node.to_string()).or_insert_with(|| {
            let mut placeholder = Node::default();
            placeholder.metadata.name = Some(node.to_string());
            NodeInfo::new(Arc::new(placeholder))
        });
        self.pod_node.insert(p.uid.clone(), node.to_string());
        if p.has_affinity() {
            self.affinity_pods += 1;
        }
        n.add_pod(p);
    }

    /// Removes the pod `uid` from wherever it is.
    pub fn unplace(&mut self, uid: &str) {
        if let Some(node) = self.pod_node.remove(uid)
            && let Some(n) = self.nodes.get_mut(&node)
        {
            let had_affinity = n.pods_with_affinity.iter().any(|p| p.uid == uid);
            if n.remove_pod(uid) && had_affinity {
                self.affinity_pods -= 1;
            }
        }
    }

    /// Records that `p` is nominated to `node` (replacing an earlier nomination).
    pub fn nominate(&mut self, p: Arc<PodInfo>, node: &str) {
        self.unnominate(&p.uid);
        self.nominated.entry(node.to_string()).or_default().push(p);
    }

    /// Forgets the nomination of the pod `uid`.
    pub fn unnominate(&mut self, uid: &str) {
        self.nominated.retain(|_, v| {
            v.retain(|p| p.uid != uid);
            !v.is_empty()
        });
    }

    /// Whether the pod `uid` is placed.
    pub fn is_placed(&self, uid: &str) -> bool {
        self.pod_node.contains_key(uid)
    }
}

/// The outcome of a cycle that found no node.
#[derive(Debug, Clone, Default)]
pub struct FitError {
    /// How many nodes there were.
    pub nodes: usize,
    /// Each node's rejection.
    pub rejects: HashMap<String, Reject>,
    /// A reason that applies to the pod as a whole (PreFilter).
    pub pod_reason: Option<String>,
}

impl FitError {
    /// Upstream's message: `0/3 nodes are available: 1 Insufficient cpu, 2 node(s) didn't
    /// match Pod's node affinity/selector.`
    pub fn message(&self) -> String {
        if let Some(r) = &self.pod_reason {
            return format!("0/{} nodes are available: {r}.", self.nodes);
        }
        if self.nodes == 0 {
            return "no nodes available to schedule pods".into();
        }
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for r in self.rejects.values() {
            *counts.entry(r.reason.as_str()).or_default() += 1;
        }
        let parts: Vec<String> = counts.iter().map(|(r, n)| format!("{n} {r}")).collect();
        format!(
            "0/{} nodes are available: {}.",
            self.nodes,
            parts.join(", ")
        )
    }
}

/// How many feasible nodes to look for among `total` (`numFeasibleNodesToFind` with the
/// adaptive `percentageOfNodesToScore`: 50% minus 1% per 125 nodes, at least 5%, at least 100).
pub fn feasible_to_find(total: usize) -> usize {
    if total < 100 {
        return total;
    }
    let pct = (50 - (total / 125) as i64).max(5) as usize;
    (total * pct / 100).max(100)
}

/// Score plugin weights (kube-scheduler's defaults).
const W_TAINT: i64 = 3;
const W_NODE_AFFINITY: i64 = 2;
const W_FIT: i64 = 1;
const W_BALANCED: i64 = 1;
const W_SPREAD: i64 = 2;
const W_INTER_POD: i64 = 2;

/// Runs the Filter plugins for `pod` on `node`.
pub fn filter(pod: &PodInfo, state: &CycleState, node: &NodeInfo) -> Result<(), Reject> {
    plugins::node_unschedulable(pod, node)?;
    plugins::node_name(pod, node)?;
    plugins::taint_toleration(pod, node)?;
    plugins::node_affinity(pod, node)?;
    plugins::node_ports(pod, node)?;
    plugins::node_resources_fit(pod, node)?;
    plugins::topology_spread_filter(&state.spread, node)?;
    plugins::inter_pod_affinity_filter(pod, &state.affinity, node)?;
    Ok(())
}

/// The PreFilter stage: cluster-wide counts the filters and scores need.
pub fn pre_filter(pod: &PodInfo, snap: &Snapshot) -> CycleState {
    CycleState {
        affinity: plugins::AffinityState::compute(pod, snap),
        spread: plugins::SpreadState::compute(pod, snap),
    }
}

/// Picks a node for `pod`, or says why none fits.
pub fn schedule(pod: &PodInfo, snap: &mut Snapshot) -> Result<String, FitError> {
    let total = snap.nodes.len();
    if total == 0 {
        return Err(FitError::default());
    }
    let state = pre_filter(pod, snap);
    let want = feasible_to_find(total);
    let start = snap.next_start % total;
    let mut feasible: Vec<&NodeInfo> = Vec::with_capacity(want.min(total));
    let mut rejects = HashMap::new();
    let mut visited = 0;
    for n in snap
        .nodes
        .values()
        .skip(start)
        .chain(snap.nodes.values().take(start))
    {
        visited += 1;
        // Room held for nominated pods of at least this priority counts as taken.
        let held: Vec<&Arc<PodInfo>> = snap
            .nominated
            .get(&n.name)
            .into_iter()
            .flatten()
            .filter(|o| o.uid != pod.uid && o.priority >= pod.priority)
            .collect();
        let verdict = if held.is_empty() {
            filter(pod, &state, n)
        } else {
            let mut view = n.clone();
            for o in held {
                view.add_pod(o.clone());
            }
            filter(pod, &state, &view)
        };
        match verdict {
            Ok(()) => {
                feasible.push(n);
                if feasible.len() >= want {
                    break;
                }
            }
            Err(r) => {
                rejects.insert(n.name.clone(), r);
            }
        }
    }
    let next = (start + visited) % total;
    if feasible.is_empty() {
        snap.next_start = next;
        return Err(FitError {
            nodes: total,
            rejects,
            pod_reason: None,
        });
    }
    let chosen = if feasible.len() == 1 {
        feasible[0].name.clone()
    } else {
        let scores = score(pod, &state, &feasible);
        let best = scores.iter().copied().max().unwrap_or(0);
        let i = scores.iter().position(|s| *s == best).unwrap_or(0);
        feasible[i].name.clone()
    };
    snap.next_start = next;
    Ok(chosen)
}

/// Weighted, normalized scores of `nodes` for `pod` (each plugin 0–100).
pub fn score(pod: &PodInfo, state: &CycleState, nodes: &[&NodeInfo]) -> Vec<i64> {
    let mut total = vec![0i64; nodes.len()];
    let mut add = |raw: Vec<i64>, weight: i64| {
        for (t, s) in total.iter_mut().zip(raw) {
            *t += s * weight;
        }
    };
    add(
        nodes
            .iter()
            .map(|n| plugins::least_allocated(pod, n))
            .collect(),
        W_FIT,
    );
    add(
        nodes
            .iter()
            .map(|n| plugins::balanced_allocation(pod, n))
            .collect(),
        W_BALANCED,
    );
    add(
        normalize(
            nodes
                .iter()
                .map(|n| plugins::intolerable_prefer_no_schedule(pod, n))
                .collect(),
            true,
        ),
        W_TAINT,
    );
    add(
        normalize(
            nodes
                .iter()
                .map(|n| plugins::preferred_node_affinity(pod, n))
                .collect(),
            false,
        ),
        W_NODE_AFFINITY,
    );
    if pod.has_affinity() || state.affinity.has_existing_preferences() {
        add(
            normalize_signed(
                nodes
                    .iter()
                    .map(|n| plugins::inter_pod_affinity_score(&state.affinity, n))
                    .collect(),
            ),
            W_INTER_POD,
        );
    }
    if state.spread.scoring() {
        add(
            normalize(
                nodes
                    .iter()
                    .map(|n| plugins::topology_spread_score(&state.spread, n))
                    .collect(),
                true,
            ),
            W_SPREAD,
        );
    }
    total
}

/// Scales raw scores to 0–100 by the largest (`DefaultNormalizeScore`); `reverse` makes the
/// smallest best.
pub fn normalize(raw: Vec<i64>, reverse: bool) -> Vec<i64> {
    let max = raw.iter().copied().max().unwrap_or(0);
    if max == 0 {
        return vec![if reverse { 100 } else { 0 }; raw.len()];
    }
    raw.into_iter()
        .map(|s| {
            let v = s * 100 / max;
            if reverse { 100 - v } else { v }
        })
        .collect()
}

/// Scales scores that may be negative to 0–100 between the smallest and largest.
pub fn normalize_signed(raw: Vec<i64>) -> Vec<i64> {
    let (min, max) = (
        raw.iter().copied().min().unwrap_or(0),
        raw.iter().copied().max().unwrap_or(0),
    );
    if max == min {
        return vec![0; raw.len()];
    }
    raw.into_iter()
        .map(|s| (s - min) * 100 / (max - min))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_follows_upstream() {
        assert_eq!(feasible_to_find(50), 50);
        assert_eq!(feasible_to_find(100), 100);
        assert_eq!(feasible_to_find(1000), 420); // 50 - 8 = 42%
        assert_eq!(feasible_to_find(5000), 500); // 50 - 40 = 10%
        assert_eq!(feasible_to_find(100_000), 5000); // floor of 5%
    }

    #[test]
    fn nominated_pods_hold_room_against_lower_priorities() {
        use serde_json::json;
        let pod = |name: &str, prio: i32| {
            Arc::new(PodInfo::new(Arc::new(
                serde_json::from_value(json!({"metadata": {"name": name, "namespace": "d", "uid": name},
                    "spec": {"priority": prio, "containers": [{"name": "c", "resources": {"requests": {"cpu": "1"}}}]}}))
                .unwrap(),
            )))
        };
        let mut snap = Snapshot::default();
        snap.upsert_node(Arc::new(
            serde_json::from_value(json!({"metadata": {"name": "n"},
                "status": {"allocatable": {"cpu": "1", "memory": "1Gi", "pods": "10"},
                    "conditions": [{"type": "Ready", "status": "True"}]}}))
            .unwrap(),
        ));
        snap.nominate(pod("vip", 100), "n");
        assert!(
            schedule(&pod("low", 1), &mut snap).is_err(),
            "the room is held"
        );
        assert_eq!(
            schedule(&pod("vip", 100), &mut snap).unwrap(),
            "n",
            "for the nominee"
        );
        assert_eq!(schedule(&pod("higher", 200), &mut snap).unwrap(), "n");
        snap.unnominate("vip");
        assert_eq!(schedule(&pod("low", 1), &mut snap).unwrap(), "n");
    }

    #[test]
    fn messages_count_reasons() {
        let e = FitError {
            nodes: 3,
            rejects: HashMap::from([
                ("a".to_string(), Reject::resolvable("Insufficient cpu")),
                (
                    "b".to_string(),
                    Reject::unresolvable("node(s) didn't match Pod's node affinity/selector"),
                ),
                (
                    "c".to_string(),
                    Reject::unresolvable("node(s) didn't match Pod's node affinity/selector"),
                ),
            ]),
            pod_reason: None,
        };
        assert_eq!(
            e.message(),
            "0/3 nodes are available: 1 Insufficient cpu, 2 node(s) didn't match Pod's node affinity/selector."
        );
    }
}
