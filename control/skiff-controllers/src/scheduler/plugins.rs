//! The scheduler's plugins, each as upstream's of the same name: NodeUnschedulable, NodeName,
//! TaintToleration, NodeAffinity (nodeSelector, required and preferred terms), NodePorts,
//! NodeResourcesFit (with LeastAllocated scoring), NodeResourcesBalancedAllocation,
//! PodTopologySpread (with the system default constraints) and InterPodAffinity. Reasons are
//! upstream's texts, so `kubectl describe pod` reads the same.

use std::collections::{BTreeMap, HashMap, HashSet};

use k8s_openapi::{
    api::core::v1::{
        NodeSelectorRequirement, NodeSelectorTerm, Pod, PodAffinityTerm, Taint, Toleration,
    },
    apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement},
};
use kube::ResourceExt;
use skiff_apimachinery::{labels, pod::controller_ref};

use super::framework::{NodeInfo, PodInfo, Reject, Snapshot, tolerates};

const ZONE: &str = "topology.kubernetes.io/zone";
const HOSTNAME: &str = "kubernetes.io/hostname";

fn tolerations(pod: &PodInfo) -> &[Toleration] {
    pod.pod
        .spec
        .as_ref()
        .and_then(|s| s.tolerations.as_deref())
        .unwrap_or_default()
}

fn node_ready(n: &NodeInfo) -> bool {
    n.node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.status == "True")
}

/// NodeUnschedulable: cordoned nodes take only pods tolerating
/// `node.kubernetes.io/unschedulable`. Nodes that are not Ready count as tainted
/// `node.kubernetes.io/not-ready:NoSchedule` (what the node lifecycle controller sets).
pub fn node_unschedulable(pod: &PodInfo, n: &NodeInfo) -> Result<(), Reject> {
    let implicit = |key: &str| Taint {
        key: key.into(),
        effect: "NoSchedule".into(),
        ..Default::default()
    };
    if n.node.spec.as_ref().and_then(|s| s.unschedulable) == Some(true)
        && !tolerates(
            tolerations(pod),
            &implicit("node.kubernetes.io/unschedulable"),
        )
    {
        return Err(Reject::unresolvable("node(s) were unschedulable"));
    }
    if !node_ready(n) && !tolerates(tolerations(pod), &implicit("node.kubernetes.io/not-ready")) {
        return Err(Reject::unresolvable(
            "node(s) had untolerated taint {node.kubernetes.io/not-ready: }",
        ));
    }
    Ok(())
}

/// NodeName: a pod naming a node fits only there.
pub fn node_name(pod: &PodInfo, n: &NodeInfo) -> Result<(), Reject> {
    match pod.pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) {
        Some(want) if !want.is_empty() && want != n.name => Err(Reject::unresolvable(
            "node(s) didn't match the requested node name",
        )),
        _ => Ok(()),
    }
}

/// TaintToleration (filter): every NoSchedule and NoExecute taint must be tolerated.
pub fn taint_toleration(pod: &PodInfo, n: &NodeInfo) -> Result<(), Reject> {
    let tols = tolerations(pod);
    match n
        .taints()
        .iter()
        .filter(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
        .find(|t| !tolerates(tols, t))
    {
        Some(t) => Err(Reject::unresolvable(format!(
            "node(s) had untolerated taint {{{}: {}}}",
            t.key,
            t.value.as_deref().unwrap_or("")
        ))),
        None => Ok(()),
    }
}

/// TaintToleration (score): how many PreferNoSchedule taints the pod does not tolerate
/// (fewer is better).
pub fn intolerable_prefer_no_schedule(pod: &PodInfo, n: &NodeInfo) -> i64 {
    let tols: Vec<Toleration> = tolerations(pod)
        .iter()
        .filter(|t| {
            t.effect
                .as_deref()
                .is_none_or(|e| e.is_empty() || e == "PreferNoSchedule")
        })
        .cloned()
        .collect();
    n.taints()
        .iter()
        .filter(|t| t.effect == "PreferNoSchedule" && !tolerates(&tols, t))
        .count() as i64
}

fn requirement_matches(r: &NodeSelectorRequirement, value: Option<&String>) -> bool {
    let values = r.values.as_deref().unwrap_or_default();
    let num = |s: &str| s.parse::<i64>().ok();
    match r.operator.as_str() {
        "In" => value.is_some_and(|v| values.contains(v)),
        "NotIn" => value.is_none_or(|v| !values.contains(v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" => {
            matches!((value.and_then(|v| num(v)), values.first().and_then(|v| num(v))), (Some(a), Some(b)) if a > b)
        }
        "Lt" => {
            matches!((value.and_then(|v| num(v)), values.first().and_then(|v| num(v))), (Some(a), Some(b)) if a < b)
        }
        _ => false,
    }
}

/// Whether node `n` satisfies a node selector term (all its expressions and fields).
pub fn term_matches(t: &NodeSelectorTerm, n: &NodeInfo) -> bool {
    let exprs = t.match_expressions.as_deref().unwrap_or_default();
    let fields = t.match_fields.as_deref().unwrap_or_default();
    if exprs.is_empty() && fields.is_empty() {
        return false;
    }
    exprs
        .iter()
        .all(|r| requirement_matches(r, n.labels().get(&r.key)))
        && fields
            .iter()
            .all(|r| r.key == "metadata.name" && requirement_matches(r, Some(&n.name)))
}

/// Whether `n` satisfies the pod's nodeSelector and required node affinity.
pub fn matches_node_selector_and_affinity(pod: &Pod, n: &NodeInfo) -> bool {
    let Some(spec) = pod.spec.as_ref() else {
        return true;
    };
    if let Some(sel) = spec.node_selector.as_ref()
        && !sel.iter().all(|(k, v)| n.labels().get(k) == Some(v))
    {
        return false;
    }
    let required = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|na| {
            na.required_during_scheduling_ignored_during_execution
                .as_ref()
        });
    match required {
        Some(r) => r.node_selector_terms.iter().any(|t| term_matches(t, n)),
        None => true,
    }
}

/// NodeAffinity (filter).
pub fn node_affinity(pod: &PodInfo, n: &NodeInfo) -> Result<(), Reject> {
    if matches_node_selector_and_affinity(&pod.pod, n) {
        Ok(())
    } else {
        Err(Reject::unresolvable(
            "node(s) didn't match Pod's node affinity/selector",
        ))
    }
}

/// NodeAffinity (score): the weights of the preferred terms the node matches.
pub fn preferred_node_affinity(pod: &PodInfo, n: &NodeInfo) -> i64 {
    pod.pod
        .spec
        .as_ref()
        .and_then(|s| s.affinity.as_ref())
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|na| {
            na.preferred_during_scheduling_ignored_during_execution
                .as_ref()
        })
        .map_or(0, |terms| {
            terms
                .iter()
                .filter(|t| term_matches(&t.preference, n))
                .map(|t| i64::from(t.weight))
                .sum()
        })
}

/// NodePorts: a host port (protocol, port) may be used once per host IP, and a wildcard IP
/// conflicts with every IP.
pub fn node_ports(pod: &PodInfo, n: &NodeInfo) -> Result<(), Reject> {
    let conflict = pod.host_ports.iter().any(|(proto, ip, port)| {
        n.used_ports.iter().any(|(p2, ip2, port2)| {
            proto == p2 && port == port2 && (ip == ip2 || ip == "0.0.0.0" || ip2 == "0.0.0.0")
        })
    });
    if conflict {
        Err(Reject::resolvable(
            "node(s) didn't have free ports for the requested pod ports",
        ))
    } else {
        Ok(())
    }
}

/// NodeResourcesFit (filter): pod count, CPU, memory, ephemeral storage and extended
/// resources against what the node has left.
pub fn node_resources_fit(pod: &PodInfo, n: &NodeInfo) -> Result<(), Reject> {
    if n.pods.len() as i64 + 1 > n.allowed_pods {
        return Err(Reject::resolvable("Too many pods"));
    }
    let (want, have, used) = (&pod.requests, &n.allocatable, &n.requested);
    if want.milli_cpu > 0 && used.milli_cpu + want.milli_cpu > have.milli_cpu {
        return Err(Reject::resolvable("Insufficient cpu"));
    }
    if want.memory > 0 && used.memory + want.memory > have.memory {
        return Err(Reject::resolvable("Insufficient memory"));
    }
    if want.ephemeral_storage > 0
        && have.ephemeral_storage > 0
        && used.ephemeral_storage + want.ephemeral_storage > have.ephemeral_storage
    {
        return Err(Reject::resolvable("Insufficient ephemeral-storage"));
    }
    for (k, v) in &want.scalar {
        if *v <= 0 {
            continue;
        }
        let cap = have.scalar.get(k).copied().unwrap_or(0);
        if used.scalar.get(k).copied().unwrap_or(0) + v > cap {
            return Err(Reject::resolvable(format!("Insufficient {k}")));
        }
    }
    Ok(())
}

/// NodeResourcesFit (score, LeastAllocated): the share of CPU and memory left free after
/// placing the pod, 0–100.
pub fn least_allocated(pod: &PodInfo, n: &NodeInfo) -> i64 {
    let part = |cap: i64, used: i64| -> i64 {
        if cap <= 0 || used > cap {
            0
        } else {
            (cap - used) * 100 / cap
        }
    };
    let cpu = part(
        n.allocatable.milli_cpu,
        n.non_zero_requested.0 + pod.non_zero.0,
    );
    let mem = part(
        n.allocatable.memory,
        n.non_zero_requested.1 + pod.non_zero.1,
    );
    (cpu + mem) / 2
}

/// NodeResourcesBalancedAllocation: nodes whose CPU and memory would be used in equal shares
/// score higher (100 minus the spread of the shares, in percent).
pub fn balanced_allocation(pod: &PodInfo, n: &NodeInfo) -> i64 {
    let frac = |cap: i64, used: i64| -> f64 {
        if cap <= 0 {
            1.0
        } else {
            (used as f64 / cap as f64).min(1.0)
        }
    };
    let cpu = frac(
        n.allocatable.milli_cpu,
        n.non_zero_requested.0 + pod.non_zero.0,
    );
    let mem = frac(
        n.allocatable.memory,
        n.non_zero_requested.1 + pod.non_zero.1,
    );
    let std = (cpu - mem).abs() / 2.0;
    ((1.0 - std) * 100.0) as i64
}

/// Which namespaces a pod affinity term looks at.
#[derive(Debug, Clone, PartialEq)]
pub enum Namespaces {
    /// These (the pod's own when the term names none).
    Listed(HashSet<String>),
    /// Those whose labels match (an empty selector: all), plus the listed ones.
    Selected(LabelSelector, HashSet<String>),
}

/// A pod (anti-)affinity term.
#[derive(Debug, Clone, PartialEq)]
pub struct AffinityTerm {
    /// Which pods it is about.
    pub selector: LabelSelector,
    /// In which namespaces.
    pub namespaces: Namespaces,
    /// The node label whose value makes a domain.
    pub topology_key: String,
}

impl AffinityTerm {
    fn new(t: &PodAffinityTerm, own_namespace: &str, pod: &Pod) -> AffinityTerm {
        let mut selector = t.label_selector.clone().unwrap_or_default();
        // matchLabelKeys / mismatchLabelKeys: the pod's own values join the selector.
        for key in t.match_label_keys.iter().flatten() {
            if let Some(v) = pod.labels().get(key) {
                selector
                    .match_expressions
                    .get_or_insert_with(Vec::new)
                    .push(LabelSelectorRequirement {
                        key: key.clone(),
                        operator: "In".into(),
                        values: Some(vec![v.clone()]),
                    });
            }
        }
        for key in t.mismatch_label_keys.iter().flatten() {
            if let Some(v) = pod.labels().get(key) {
                selector
                    .match_expressions
                    .get_or_insert_with(Vec::new)
                    .push(LabelSelectorRequirement {
                        key: key.clone(),
                        operator: "NotIn".into(),
                        values: Some(vec![v.clone()]),
                    });
            }
        }
        let listed: HashSet<String> = t.namespaces.iter().flatten().cloned().collect();
        let namespaces = match &t.namespace_selector {
            Some(sel) => Namespaces::Selected(sel.clone(), listed),
            None if listed.is_empty() => Namespaces::Listed([own_namespace.to_string()].into()),
            None => Namespaces::Listed(listed),
        };
        AffinityTerm {
            // A term without a selector matches no pod.
            selector: if t.label_selector.is_none() {
                LabelSelector {
                    match_expressions: Some(vec![LabelSelectorRequirement {
                        key: "skiff.dev/never".into(),
                        operator: "In".into(),
                        values: Some(vec!["never".into()]),
                    }]),
                    ..Default::default()
                }
            } else {
                selector
            },
            namespaces,
            topology_key: t.topology_key.clone(),
        }
    }

    /// Whether the term is about `p`.
    pub fn matches(
        &self,
        p: &PodInfo,
        ns_labels: &HashMap<String, BTreeMap<String, String>>,
    ) -> bool {
        let ns_ok = match &self.namespaces {
            Namespaces::Listed(l) => l.contains(&p.namespace),
            Namespaces::Selected(sel, l) => {
                l.contains(&p.namespace)
                    || labels::matches(sel, ns_labels.get(&p.namespace).unwrap_or(&BTreeMap::new()))
            }
        };
        ns_ok && labels::matches(&self.selector, p.labels())
    }
}

type Terms = (
    Vec<AffinityTerm>,
    Vec<AffinityTerm>,
    Vec<(i32, AffinityTerm)>,
    Vec<(i32, AffinityTerm)>,
);

/// The pod's (anti-)affinity terms: required affinity, required anti-affinity, preferred
/// affinity, preferred anti-affinity.
pub fn affinity_terms(pod: &Pod, ns: &str) -> Terms {
    let aff = pod.spec.as_ref().and_then(|s| s.affinity.as_ref());
    let pa = aff.and_then(|a| a.pod_affinity.as_ref());
    let paa = aff.and_then(|a| a.pod_anti_affinity.as_ref());
    let req = |v: Option<&Vec<PodAffinityTerm>>| -> Vec<AffinityTerm> {
        v.into_iter()
            .flatten()
            .map(|t| AffinityTerm::new(t, ns, pod))
            .collect()
    };
    let pref = |v: Option<&Vec<k8s_openapi::api::core::v1::WeightedPodAffinityTerm>>| {
        v.into_iter()
            .flatten()
            .map(|w| (w.weight, AffinityTerm::new(&w.pod_affinity_term, ns, pod)))
            .collect::<Vec<_>>()
    };
    (
        req(pa.and_then(|a| {
            a.required_during_scheduling_ignored_during_execution
                .as_ref()
        })),
        req(paa.and_then(|a| {
            a.required_during_scheduling_ignored_during_execution
                .as_ref()
        })),
        pref(pa.and_then(|a| {
            a.preferred_during_scheduling_ignored_during_execution
                .as_ref()
        })),
        pref(paa.and_then(|a| {
            a.preferred_during_scheduling_ignored_during_execution
                .as_ref()
        })),
    )
}

/// A (topology key, value) pair.
type Domain = (String, String);

/// InterPodAffinity's PreFilter results for one pod.
#[derive(Debug, Default)]
pub struct AffinityState {
    /// Domains with pods matching all the pod's required affinity terms, per term key.
    affinity: HashMap<Domain, i64>,
    /// Whether the pod matches its own required affinity terms (the first of a group).
    self_match: bool,
    /// Domains with pods matching one of the pod's required anti-affinity terms.
    anti: HashMap<Domain, i64>,
    /// Domains where an existing pod's required anti-affinity rejects this pod.
    existing_anti: HashMap<Domain, i64>,
    /// Preferred (anti-)affinity scores by domain, both directions.
    scores: HashMap<Domain, i64>,
    /// Whether existing pods have preferences about this pod.
    existing_preferences: bool,
}

fn domain_of(n: &NodeInfo, key: &str) -> Option<Domain> {
    n.labels().get(key).map(|v| (key.to_string(), v.clone()))
}

impl AffinityState {
    /// Counts, over every placed pod, what the pod's terms and the placed pods' terms say.
    pub fn compute(pod: &PodInfo, snap: &Snapshot) -> AffinityState {
        let mut s = AffinityState::default();
        let ns_labels = &snap.namespace_labels;
        if snap.affinity_pods == 0 && !pod.has_affinity() {
            return s;
        }
        s.self_match = !pod.required_affinity.is_empty()
            && pod
                .required_affinity
                .iter()
                .all(|t| t.matches(pod, ns_labels));
        for n in snap.nodes.values() {
            // The pod's own terms against every placed pod.
            if pod.has_affinity() {
                for p in &n.pods {
                    if !pod.required_affinity.is_empty()
                        && pod
                            .required_affinity
                            .iter()
                            .all(|t| t.matches(p, ns_labels))
                    {
                        for t in &pod.required_affinity {
                            if let Some(d) = domain_of(n, &t.topology_key) {
                                *s.affinity.entry(d).or_default() += 1;
                            }
                        }
                    }
                    for t in &pod.required_anti_affinity {
                        if t.matches(p, ns_labels)
                            && let Some(d) = domain_of(n, &t.topology_key)
                        {
                            *s.anti.entry(d).or_default() += 1;
                        }
                    }
                    for (w, t) in &pod.preferred_affinity {
                        if t.matches(p, ns_labels)
                            && let Some(d) = domain_of(n, &t.topology_key)
                        {
                            *s.scores.entry(d).or_default() += i64::from(*w);
                        }
                    }
                    for (w, t) in &pod.preferred_anti_affinity {
                        if t.matches(p, ns_labels)
                            && let Some(d) = domain_of(n, &t.topology_key)
                        {
                            *s.scores.entry(d).or_default() -= i64::from(*w);
                        }
                    }
                }
            }
            // Placed pods' terms against this pod.
            for p in &n.pods_with_affinity {
                for t in &p.required_anti_affinity {
                    if t.matches(pod, ns_labels)
                        && let Some(d) = domain_of(n, &t.topology_key)
                    {
                        *s.existing_anti.entry(d).or_default() += 1;
                    }
                }
                // Symmetry: their required affinity to this pod counts as a preference
                // (hardPodAffinityWeight 1), their preferences as theirs.
                for t in &p.required_affinity {
                    if t.matches(pod, ns_labels)
                        && let Some(d) = domain_of(n, &t.topology_key)
                    {
                        *s.scores.entry(d).or_default() += 1;
                        s.existing_preferences = true;
                    }
                }
                for (w, t) in &p.preferred_affinity {
                    if t.matches(pod, ns_labels)
                        && let Some(d) = domain_of(n, &t.topology_key)
                    {
                        *s.scores.entry(d).or_default() += i64::from(*w);
                        s.existing_preferences = true;
                    }
                }
                for (w, t) in &p.preferred_anti_affinity {
                    if t.matches(pod, ns_labels)
                        && let Some(d) = domain_of(n, &t.topology_key)
                    {
                        *s.scores.entry(d).or_default() -= i64::from(*w);
                        s.existing_preferences = true;
                    }
                }
            }
        }
        s
    }

    /// Whether placed pods have preferences about the pod (scoring is needed).
    pub fn has_existing_preferences(&self) -> bool {
        self.existing_preferences
    }
}

/// InterPodAffinity (filter): the pod's required affinity, then its anti-affinity, then the
/// placed pods' anti-affinity (upstream's order, which decides the reason reported). None of
/// these is offered to preemption: its counts are not redone without the victims.
pub fn inter_pod_affinity_filter(
    pod: &PodInfo,
    s: &AffinityState,
    n: &NodeInfo,
) -> Result<(), Reject> {
    if !pod.required_affinity.is_empty() {
        let mut all = true;
        for t in &pod.required_affinity {
            match domain_of(n, &t.topology_key) {
                Some(d) if s.affinity.get(&d).copied().unwrap_or(0) > 0 => {}
                Some(_) => all = false,
                None => {
                    return Err(Reject::unresolvable(
                        "node(s) didn't match pod affinity rules",
                    ));
                }
            }
        }
        // The first pod of a group that selects itself may go anywhere.
        if !(all || (s.affinity.is_empty() && s.self_match)) {
            return Err(Reject::unresolvable(
                "node(s) didn't match pod affinity rules",
            ));
        }
    }
    for t in &pod.required_anti_affinity {
        if let Some(d) = domain_of(n, &t.topology_key)
            && s.anti.get(&d).copied().unwrap_or(0) > 0
        {
            return Err(Reject::unresolvable(
                "node(s) didn't match pod anti-affinity rules",
            ));
        }
    }
    if s.existing_anti
        .keys()
        .any(|(k, v)| n.labels().get(k) == Some(v))
    {
        return Err(Reject::unresolvable(
            "node(s) didn't satisfy existing pods anti-affinity rules",
        ));
    }
    Ok(())
}

/// InterPodAffinity (score): the preference sum of the node's domains.
pub fn inter_pod_affinity_score(s: &AffinityState, n: &NodeInfo) -> i64 {
    s.scores
        .iter()
        .filter(|((k, v), _)| n.labels().get(k) == Some(v))
        .map(|(_, w)| *w)
        .sum()
}

/// A topology spread constraint.
#[derive(Debug, Clone, PartialEq)]
pub struct SpreadConstraint {
    /// Most allowed difference between domains.
    pub max_skew: i32,
    /// The node label whose value makes a domain.
    pub topology_key: String,
    /// `DoNotSchedule` (a filter) or `ScheduleAnyway` (a score).
    pub hard: bool,
    /// Which pods count.
    pub selector: LabelSelector,
    /// Fewer eligible domains than this count as a global minimum of zero.
    pub min_domains: Option<i32>,
    /// Whether only nodes matching the pod's node affinity count (`Honor`, the default).
    pub honor_affinity: bool,
    /// Whether only nodes whose taints the pod tolerates count (`Ignore` by default).
    pub honor_taints: bool,
}

/// The pod's constraints, or the system defaults (hostname skew 3, zone skew 5, both
/// `ScheduleAnyway`) for a controlled pod that states none; the defaults select the pods
/// with the same labels (upstream takes the selectors of the pod's Services and controllers).
pub fn spread_constraints(pod: &Pod) -> Vec<SpreadConstraint> {
    let stated = pod
        .spec
        .as_ref()
        .and_then(|s| s.topology_spread_constraints.clone())
        .unwrap_or_default();
    if stated.is_empty() {
        if controller_ref(&pod.metadata).is_none() || pod.labels().is_empty() {
            return Vec::new();
        }
        let selector = LabelSelector {
            match_labels: Some(pod.labels().clone()),
            ..Default::default()
        };
        return [(HOSTNAME, 3), (ZONE, 5)]
            .into_iter()
            .map(|(key, skew)| SpreadConstraint {
                max_skew: skew,
                topology_key: key.into(),
                hard: false,
                selector: selector.clone(),
                min_domains: None,
                honor_affinity: true,
                honor_taints: false,
            })
            .collect();
    }
    stated
        .into_iter()
        .map(|c| {
            let mut selector = c.label_selector.clone().unwrap_or_default();
            for key in c.match_label_keys.iter().flatten() {
                if let Some(v) = pod.labels().get(key) {
                    selector
                        .match_expressions
                        .get_or_insert_with(Vec::new)
                        .push(LabelSelectorRequirement {
                            key: key.clone(),
                            operator: "In".into(),
                            values: Some(vec![v.clone()]),
                        });
                }
            }
            SpreadConstraint {
                max_skew: c.max_skew,
                topology_key: c.topology_key,
                hard: c.when_unsatisfiable == "DoNotSchedule",
                selector,
                min_domains: c.min_domains,
                honor_affinity: c.node_affinity_policy.as_deref() != Some("Ignore"),
                honor_taints: c.node_taints_policy.as_deref() == Some("Honor"),
            }
        })
        .collect()
}

/// PodTopologySpread's PreFilter results: per constraint, matching pods per domain.
#[derive(Debug, Default)]
pub struct SpreadState {
    /// Per constraint: the matching pods per domain, whether the pod matches its own
    /// selector, and the global minimum a hard constraint's skew is measured from.
    constraints: Vec<(SpreadConstraint, HashMap<String, i64>, bool, i64)>,
}

impl SpreadState {
    /// Counts matching pods per domain among the eligible nodes.
    pub fn compute(pod: &PodInfo, snap: &Snapshot) -> SpreadState {
        let mut out = SpreadState::default();
        if pod.spread.is_empty() {
            return out;
        }
        for c in &pod.spread {
            let mut counts: HashMap<String, i64> = HashMap::new();
            let mut seen: HashMap<u64, bool> = HashMap::new();
            for n in snap.nodes.values() {
                let Some(v) = n.labels().get(&c.topology_key) else {
                    continue;
                };
                if c.honor_affinity && !matches_node_selector_and_affinity(&pod.pod, n) {
                    continue;
                }
                if c.honor_taints && taint_toleration(pod, n).is_err() {
                    continue;
                }
                // Pods alike are judged once per cycle.
                let mut matching = 0i64;
                for (group, (rep, count)) in &n.groups {
                    let hit = *seen.entry(*group).or_insert_with(|| {
                        rep.namespace == pod.namespace
                            && rep.pod.metadata.deletion_timestamp.is_none()
                            && labels::matches(&c.selector, rep.labels())
                    });
                    if hit {
                        matching += *count as i64;
                    }
                }
                *counts.entry(v.clone()).or_default() += matching;
            }
            let self_match = labels::matches(&c.selector, pod.labels());
            // Fewer eligible domains than minDomains count as a global minimum of zero.
            let min = if c.min_domains.is_some_and(|m| (counts.len() as i32) < m) {
                0
            } else {
                counts.values().copied().min().unwrap_or(0)
            };
            out.constraints.push((c.clone(), counts, self_match, min));
        }
        out
    }

    /// Whether any constraint scores.
    pub fn scoring(&self) -> bool {
        self.constraints.iter().any(|(c, ..)| !c.hard)
    }
}

/// PodTopologySpread (filter): placing the pod must keep each hard constraint's skew.
pub fn topology_spread_filter(s: &SpreadState, n: &NodeInfo) -> Result<(), Reject> {
    for (c, counts, self_match, min) in s.constraints.iter().filter(|(c, ..)| c.hard) {
        let Some(v) = n.labels().get(&c.topology_key) else {
            return Err(Reject::unresolvable(
                "node(s) didn't match pod topology spread constraints (missing required label)",
            ));
        };
        let here = counts.get(v).copied().unwrap_or(0) + i64::from(*self_match);
        if here - min > i64::from(c.max_skew) {
            // Not resolvable here: preemption does not recount the domains without its
            // victims, so evicting could not be shown to help.
            return Err(Reject::unresolvable(
                "node(s) didn't match pod topology spread constraints",
            ));
        }
    }
    Ok(())
}

/// PodTopologySpread (score): matching pods in the node's domains, weighted by how many
/// domains each constraint has (fewer is better).
pub fn topology_spread_score(s: &SpreadState, n: &NodeInfo) -> i64 {
    let mut total = 0.0;
    for (c, counts, ..) in s.constraints.iter().filter(|(c, ..)| !c.hard) {
        let weight = ((counts.len() + 2) as f64).ln();
        let here = n
            .labels()
            .get(&c.topology_key)
            .and_then(|v| counts.get(v))
            .copied()
            .unwrap_or(0);
        total += (here as f64 + f64::from(c.max_skew - 1)) * weight;
    }
    (total * 100.0) as i64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::framework::{self, PodInfo};
    use k8s_openapi::api::core::v1::Node;
    use serde_json::{Value, json};
    use std::sync::Arc;

    fn node(name: &str, labels: Value, extra: Value) -> Arc<Node> {
        let mut v = json!({
            "metadata": {"name": name, "labels": labels},
            "status": {"allocatable": {"cpu": "2", "memory": "4Gi", "pods": "110"},
                "conditions": [{"type": "Ready", "status": "True"}]}
        });
        if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
            for (k, x) in e {
                o.insert(k.clone(), x.clone());
            }
        }
        Arc::new(serde_json::from_value(v).unwrap())
    }

    fn pod(name: &str, v: Value) -> Arc<PodInfo> {
        let mut base = json!({"metadata": {"name": name, "namespace": "default", "uid": name},
            "spec": {"containers": [{"name": "c"}]}});
        merge(&mut base, v);
        Arc::new(PodInfo::new(Arc::new(
            serde_json::from_value(base).unwrap(),
        )))
    }

    fn merge(a: &mut Value, b: Value) {
        match (a, b) {
            (Value::Object(a), Value::Object(b)) => {
                for (k, v) in b {
                    merge(a.entry(k).or_insert(Value::Null), v);
                }
            }
            (a, b) => *a = b,
        }
    }

    fn snapshot(nodes: Vec<Arc<Node>>) -> Snapshot {
        let mut s = Snapshot::default();
        for n in nodes {
            s.upsert_node(n);
        }
        s
    }

    fn fits(p: &PodInfo, s: &Snapshot) -> Vec<String> {
        let state = framework::pre_filter(p, s);
        s.nodes
            .values()
            .filter(|n| framework::filter(p, &state, n).is_ok())
            .map(|n| n.name.clone())
            .collect()
    }

    #[test]
    fn node_affinity_selector_and_fields() {
        let s = snapshot(vec![
            node("a", json!({"zone": "z1", "gen": "3"}), json!({})),
            node("b", json!({"zone": "z2", "gen": "5"}), json!({})),
        ]);
        let p = pod(
            "p",
            json!({"spec": {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{"key": "gen", "operator": "Gt", "values": ["4"]}]},
                                  {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["a"]}]}]}}}}}),
        );
        assert_eq!(fits(&p, &s), ["a", "b"]);
        let p = pod("p", json!({"spec": {"nodeSelector": {"zone": "z2"}}}));
        assert_eq!(fits(&p, &s), ["b"]);
        let p = pod(
            "p",
            json!({"spec": {"affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 10, "preference": {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["z2"]}]}}]}}}}),
        );
        let nodes: Vec<&NodeInfo> = s.nodes.values().collect();
        assert_eq!(preferred_node_affinity(&p, nodes[0]), 0);
        assert_eq!(preferred_node_affinity(&p, nodes[1]), 10);
    }

    #[test]
    fn taints_cordons_and_not_ready() {
        let s = snapshot(vec![
            node(
                "tainted",
                json!({}),
                json!({"spec": {"taints": [{"key": "gpu", "value": "yes", "effect": "NoSchedule"}]}}),
            ),
            node(
                "cordoned",
                json!({}),
                json!({"spec": {"unschedulable": true}}),
            ),
            node(
                "down",
                json!({}),
                json!({"status": {"allocatable": {"cpu": "2", "memory": "4Gi", "pods": "110"},
                "conditions": [{"type": "Ready", "status": "False"}]}}),
            ),
        ]);
        let plain = pod("p", json!({}));
        assert!(fits(&plain, &s).is_empty());
        let tolerant = pod(
            "p",
            json!({"spec": {"tolerations": [{"key": "gpu", "operator": "Exists"},
            {"key": "node.kubernetes.io/unschedulable", "operator": "Exists", "effect": "NoSchedule"}]}}),
        );
        assert_eq!(fits(&tolerant, &s), ["cordoned", "tainted"]);
        let state = framework::pre_filter(&plain, &s);
        let why = framework::filter(&plain, &state, &s.nodes["tainted"]).unwrap_err();
        assert_eq!(why.reason, "node(s) had untolerated taint {gpu: yes}");
    }

    #[test]
    fn resources_ports_and_pod_count() {
        let mut s = snapshot(vec![
            node("a", json!({}), json!({})),
            node("b", json!({}), json!({})),
        ]);
        s.place(pod("big", json!({"spec": {"containers": [{"name": "c", "resources": {"requests": {"cpu": "1500m"}},
            "ports": [{"containerPort": 80, "hostPort": 8080}]}]}})), "a");
        let p = pod(
            "p",
            json!({"spec": {"containers": [{"name": "c", "resources": {"requests": {"cpu": "1"}}}]}}),
        );
        assert_eq!(fits(&p, &s), ["b"]);
        let port = pod(
            "q",
            json!({"spec": {"containers": [{"name": "c", "ports": [{"containerPort": 80, "hostPort": 8080}]}]}}),
        );
        assert_eq!(fits(&port, &s), ["b"]);
        let e = framework::schedule(&p, &mut snapshot(vec![])).unwrap_err();
        assert_eq!(e.message(), "no nodes available to schedule pods");
        // Least allocated prefers the emptier node.
        let small = pod("s", json!({}));
        assert_eq!(framework::schedule(&small, &mut s).unwrap(), "b");
    }

    #[test]
    fn pod_anti_affinity_spreads_and_affinity_gathers() {
        let mut s = snapshot(vec![
            node(
                "a",
                json!({"kubernetes.io/hostname": "a", "zone": "z1"}),
                json!({}),
            ),
            node(
                "b",
                json!({"kubernetes.io/hostname": "b", "zone": "z1"}),
                json!({}),
            ),
            node(
                "c",
                json!({"kubernetes.io/hostname": "c", "zone": "z2"}),
                json!({}),
            ),
        ]);
        s.place(
            pod("db-0", json!({"metadata": {"labels": {"app": "db"}}})),
            "a",
        );
        let anti = json!({"metadata": {"labels": {"app": "db"}}, "spec": {"affinity": {"podAntiAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": [{"topologyKey": "zone", "labelSelector": {"matchLabels": {"app": "db"}}}]}}}});
        assert_eq!(fits(&pod("db-1", anti.clone()), &s), ["c"]);
        let aff = json!({"metadata": {"labels": {"app": "web"}}, "spec": {"affinity": {"podAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": [{"topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": {"app": "db"}}}]}}}});
        assert_eq!(fits(&pod("web", aff), &s), ["a"]);
        // An existing pod's anti-affinity keeps matching pods away from its domain.
        s.place(pod("db-1", anti), "c");
        let other_db = pod("db-2", json!({"metadata": {"labels": {"app": "db"}}}));
        assert_eq!(
            fits(&other_db, &s),
            ["a", "b"],
            "db-1 repels app=db from z2"
        );
        let unrelated = pod("x", json!({"metadata": {"labels": {"app": "x"}}}));
        assert_eq!(fits(&unrelated, &s), ["a", "b", "c"]);
        // The first pod of a self-affine group may go anywhere.
        let first = pod(
            "g",
            json!({"metadata": {"labels": {"grp": "1"}}, "spec": {"affinity": {"podAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": [{"topologyKey": "zone", "labelSelector": {"matchLabels": {"grp": "1"}}}]}}}}),
        );
        assert_eq!(fits(&first, &s), ["a", "b", "c"]);
    }

    #[test]
    fn topology_spread_keeps_the_skew() {
        let mut s = snapshot(vec![
            node("a", json!({"zone": "z1"}), json!({})),
            node("b", json!({"zone": "z2"}), json!({})),
            node("nolabel", json!({}), json!({})),
        ]);
        s.place(
            pod("w0", json!({"metadata": {"labels": {"app": "w"}}})),
            "a",
        );
        let spread = json!({"metadata": {"labels": {"app": "w"}}, "spec": {"topologySpreadConstraints": [
            {"maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": "DoNotSchedule", "labelSelector": {"matchLabels": {"app": "w"}}}]}});
        assert_eq!(fits(&pod("w1", spread.clone()), &s), ["b"]);
        s.place(pod("w1", spread.clone()), "b");
        assert_eq!(fits(&pod("w2", spread), &s), ["a", "b"]);
    }
}
