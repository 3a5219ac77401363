//! Pure helpers of the Deployment controller (`pkg/controller/deployment/util`): template
//! hashes, revisions and their annotations, surge/unavailable fenceposts, conditions, and the
//! proportional share of a scaling event.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        apps::v1::{Deployment, DeploymentCondition, DeploymentStatus, ReplicaSet},
        core::v1::PodTemplateSpec,
    },
    apimachinery::pkg::{apis::meta::v1::Time, util::intstr::IntOrString},
    chrono::Utc,
};
use kube::ResourceExt;

/// The revision of a ReplicaSet (and of the Deployment, its newest).
pub const REVISION: &str = "deployment.kubernetes.io/revision";
/// Earlier revisions a ReplicaSet had (when a rollback made an old template new again).
pub const REVISION_HISTORY: &str = "deployment.kubernetes.io/revision-history";
/// The Deployment's replicas when the ReplicaSet was last scaled.
pub const DESIRED_REPLICAS: &str = "deployment.kubernetes.io/desired-replicas";
/// The Deployment's replicas plus its surge when the ReplicaSet was last scaled.
pub const MAX_REPLICAS: &str = "deployment.kubernetes.io/max-replicas";
/// The label telling apart the pods of a Deployment's ReplicaSets.
pub const POD_TEMPLATE_HASH: &str = "pod-template-hash";

/// Annotations of the Deployment not copied to its ReplicaSets.
const NOT_COPIED: [&str; 6] = [
    "kubectl.kubernetes.io/last-applied-configuration",
    REVISION,
    REVISION_HISTORY,
    DESIRED_REPLICAS,
    MAX_REPLICAS,
    "deprecated.deployment.rollback.to",
];

/// `rand.SafeEncodeString`'s alphabet (no vowels, no look-alikes).
const SAFE: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

/// The template's hash, as the `pod-template-hash` label and the ReplicaSet name suffix: FNV-1a
/// (32 bit) of the template (canonical JSON) and the collision count, its decimal digits
/// mapped onto the safe alphabet as upstream's `ComputeHash` does.
pub fn template_hash(template: &PodTemplateSpec, collision_count: Option<i32>) -> String {
    let mut h: u32 = 0x811c_9dc5;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            h ^= u32::from(*b);
            h = h.wrapping_mul(0x0100_0193);
        }
    };
    feed(&serde_json::to_vec(template).unwrap_or_default());
    if let Some(c) = collision_count {
        feed(&c.to_le_bytes());
    }
    h.to_string()
        .bytes()
        .map(|b| SAFE[b as usize % SAFE.len()] as char)
        .collect()
}

/// The template without the `pod-template-hash` label.
fn without_hash(t: &PodTemplateSpec) -> PodTemplateSpec {
    let mut t = t.clone();
    if let Some(l) = t.metadata.as_mut().and_then(|m| m.labels.as_mut()) {
        l.remove(POD_TEMPLATE_HASH);
        if l.is_empty() {
            t.metadata.as_mut().expect("labels live in metadata").labels = None;
        }
    }
    t
}

/// Whether two templates are the same but for the `pod-template-hash` label.
pub fn equal_ignore_hash(a: &PodTemplateSpec, b: &PodTemplateSpec) -> bool {
    without_hash(a) == without_hash(b)
}

/// A ReplicaSet's revision (0 when not annotated).
pub fn revision(rs: &ReplicaSet) -> i64 {
    rs.annotations()
        .get(REVISION)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The highest revision among `sets`.
pub fn max_revision<'a>(sets: impl IntoIterator<Item = &'a ReplicaSet>) -> i64 {
    sets.into_iter().map(revision).max().unwrap_or(0)
}

/// `replicas` scaled by an int-or-percent; percentages round up or down.
pub fn scaled_value(v: Option<&IntOrString>, total: i32, round_up: bool, default: &str) -> i32 {
    let v = v.cloned().unwrap_or(IntOrString::String(default.into()));
    match v {
        IntOrString::Int(n) => n,
        IntOrString::String(s) => {
            let pct: f64 = s.trim_end_matches('%').parse().unwrap_or(0.0);
            let x = pct * f64::from(total) / 100.0;
            (if round_up { x.ceil() } else { x.floor() }) as i32
        }
    }
}

/// `(maxSurge, maxUnavailable)` for `d` (`ResolveFenceposts`): percentages of the replicas,
/// surge rounded up and unavailability down; both zero becomes an unavailability of one. A
/// Recreate Deployment has neither.
pub fn fenceposts(d: &Deployment) -> (i32, i32) {
    let spec = d.spec.as_ref();
    let replicas = spec.and_then(|s| s.replicas).unwrap_or(1);
    let strategy = spec.and_then(|s| s.strategy.as_ref());
    if strategy.and_then(|s| s.type_.as_deref()) == Some("Recreate") {
        return (0, 0);
    }
    let ru = strategy.and_then(|s| s.rolling_update.as_ref());
    let surge = scaled_value(ru.and_then(|r| r.max_surge.as_ref()), replicas, true, "25%");
    let unavailable = scaled_value(
        ru.and_then(|r| r.max_unavailable.as_ref()),
        replicas,
        false,
        "25%",
    );
    if surge == 0 && unavailable == 0 {
        (0, 1)
    } else {
        (surge, unavailable)
    }
}

/// `spec.replicas` of `d` (defaulted to 1).
pub fn replicas(d: &Deployment) -> i32 {
    d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1)
}

/// `spec.replicas` of `rs`.
pub fn rs_replicas(rs: &ReplicaSet) -> i32 {
    rs.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0)
}

/// The annotations `d` gives its new ReplicaSet at `new_revision` (`SetNewReplicaSetAnnotations`);
/// `None` when `current` already has them.
pub fn new_rs_annotations(
    d: &Deployment,
    current: &BTreeMap<String, String>,
    new_revision: i64,
) -> Option<BTreeMap<String, String>> {
    let mut a = current.clone();
    for (k, v) in d.annotations() {
        if !NOT_COPIED.contains(&k.as_str()) {
            a.insert(k.clone(), v.clone());
        }
    }
    let old: i64 = current
        .get(REVISION)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if old < new_revision {
        if old > 0 {
            let history = match current.get(REVISION_HISTORY) {
                Some(h) if !h.is_empty() => format!("{h},{old}"),
                _ => old.to_string(),
            };
            a.insert(REVISION_HISTORY.into(), history);
        }
        a.insert(REVISION.into(), new_revision.to_string());
    }
    (a != *current).then_some(a)
}

/// The replica annotations for a ReplicaSet of `d` (`desired-replicas`, `max-replicas`).
pub fn replicas_annotations(d: &Deployment) -> [(String, String); 2] {
    let (surge, _) = fenceposts(d);
    let r = replicas(d);
    [
        (DESIRED_REPLICAS.into(), r.to_string()),
        (MAX_REPLICAS.into(), (r + surge).to_string()),
    ]
}

/// `d`'s condition of `type_`.
pub fn condition<'a>(s: &'a DeploymentStatus, type_: &str) -> Option<&'a DeploymentCondition> {
    s.conditions.as_ref()?.iter().find(|c| c.type_ == type_)
}

/// A condition stamped now.
pub fn new_condition(
    type_: &str,
    status: &str,
    reason: &str,
    message: String,
) -> DeploymentCondition {
    let now = Time(Utc::now());
    DeploymentCondition {
        type_: type_.into(),
        status: status.into(),
        reason: Some(reason.into()),
        message: Some(message),
        last_update_time: Some(now.clone()),
        last_transition_time: Some(now),
    }
}

/// Sets `c` (`SetDeploymentCondition`): nothing changes when the status and reason are the
/// same; the transition time stays when only the reason changes.
pub fn set_condition(s: &mut DeploymentStatus, mut c: DeploymentCondition) {
    if let Some(cur) = condition(s, &c.type_) {
        if cur.status == c.status && cur.reason == c.reason {
            return;
        }
        if cur.status == c.status {
            c.last_transition_time = cur.last_transition_time.clone();
        }
    }
    remove_condition(s, &c.type_);
    s.conditions.get_or_insert_with(Vec::new).push(c);
}

/// Removes the condition of `type_`.
pub fn remove_condition(s: &mut DeploymentStatus, type_: &str) {
    if let Some(cs) = s.conditions.as_mut() {
        cs.retain(|c| c.type_ != type_);
        if cs.is_empty() {
            s.conditions = None;
        }
    }
}

/// Whether the rollout is done (`DeploymentComplete`).
pub fn complete(d: &Deployment, s: &DeploymentStatus) -> bool {
    let r = replicas(d);
    s.updated_replicas == Some(r)
        && s.replicas == Some(r)
        && s.available_replicas == Some(r)
        && s.observed_generation >= d.metadata.generation
}

/// Whether `new` shows progress over `d`'s recorded status (`DeploymentProgressing`).
pub fn progressing(d: &Deployment, new: &DeploymentStatus) -> bool {
    let old = d.status.clone().unwrap_or_default();
    let n = |v: Option<i32>| v.unwrap_or(0);
    n(new.updated_replicas) > n(old.updated_replicas)
        || n(new.ready_replicas) > n(old.ready_replicas)
        || n(new.available_replicas) > n(old.available_replicas)
        || n(old.replicas) - n(old.updated_replicas) > n(new.replicas) - n(new.updated_replicas)
}

/// The change a scaling event brings to `rs` (`GetReplicaSetProportion`): its share of
/// `to_add` by its size against the Deployment's last known maximum, within what is left.
pub fn proportion(d: &Deployment, rs: &ReplicaSet, to_add: i32, added: i32) -> i32 {
    if rs_replicas(rs) == 0 || to_add == 0 || to_add == added {
        return 0;
    }
    let fraction = fraction(d, rs);
    let allowed = to_add - added;
    if to_add > 0 {
        fraction.min(allowed)
    } else {
        fraction.max(allowed)
    }
}

fn fraction(d: &Deployment, rs: &ReplicaSet) -> i32 {
    let r = replicas(d);
    if r == 0 {
        return -rs_replicas(rs);
    }
    let (surge, _) = fenceposts(d);
    let max = r + surge;
    let annotated: i32 = rs
        .annotations()
        .get(MAX_REPLICAS)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| d.status.as_ref().and_then(|s| s.replicas).unwrap_or(0));
    if annotated == 0 {
        return 0;
    }
    let size = (f64::from(rs_replicas(rs)) * f64::from(max) / f64::from(annotated)).round() as i32;
    size - rs_replicas(rs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn deployment(v: serde_json::Value) -> Deployment {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn fenceposts_round_surge_up_and_unavailable_down() {
        let d = deployment(json!({"spec": {"replicas": 10, "selector": {}, "template": {}}}));
        assert_eq!(fenceposts(&d), (3, 2));
        let d = deployment(
            json!({"spec": {"replicas": 3, "selector": {}, "template": {},
            "strategy": {"rollingUpdate": {"maxSurge": 0, "maxUnavailable": "10%"}}}}),
        );
        assert_eq!(fenceposts(&d), (0, 1), "both zero: one may be unavailable");
        let d = deployment(
            json!({"spec": {"replicas": 3, "selector": {}, "template": {},
            "strategy": {"type": "Recreate"}}}),
        );
        assert_eq!(fenceposts(&d), (0, 0));
    }

    #[test]
    fn hashes_ignore_their_own_label_and_change_with_the_template() {
        let t: PodTemplateSpec =
            serde_json::from_value(json!({"metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "c", "image": "nginx:1"}]}}))
            .unwrap();
        let h = template_hash(&t, None);
        assert!(h.bytes().all(|b| SAFE.contains(&b)), "{h}");
        assert_eq!(h, template_hash(&t, None), "stable");
        assert_ne!(h, template_hash(&t, Some(1)), "collision count");
        let mut labelled = t.clone();
        labelled
            .metadata
            .as_mut()
            .unwrap()
            .labels
            .as_mut()
            .unwrap()
            .insert(POD_TEMPLATE_HASH.into(), h.clone());
        assert!(equal_ignore_hash(&t, &labelled));
        let mut other = t.clone();
        other.spec.as_mut().unwrap().containers[0].image = Some("nginx:2".into());
        assert!(!equal_ignore_hash(&t, &other));
        assert_ne!(template_hash(&other, None), h);
    }

    #[test]
    fn revision_annotations_keep_history() {
        let d = deployment(json!({"metadata": {"annotations": {
            "team": "a", "kubectl.kubernetes.io/last-applied-configuration": "{}", REVISION: "9"}}}));
        let a = new_rs_annotations(&d, &BTreeMap::new(), 1).unwrap();
        assert_eq!(a.get(REVISION).map(String::as_str), Some("1"));
        assert_eq!(a.get("team").map(String::as_str), Some("a"));
        assert!(!a.contains_key("kubectl.kubernetes.io/last-applied-configuration"));
        assert!(new_rs_annotations(&d, &a, 1).is_none(), "unchanged");
        let back = new_rs_annotations(&d, &a, 3).unwrap();
        assert_eq!(back.get(REVISION).map(String::as_str), Some("3"));
        assert_eq!(back.get(REVISION_HISTORY).map(String::as_str), Some("1"));
        let again = new_rs_annotations(&d, &back, 5).unwrap();
        assert_eq!(again.get(REVISION_HISTORY).map(String::as_str), Some("1,3"));
    }

    #[test]
    fn conditions_keep_transition_time_while_status_holds() {
        let mut s = DeploymentStatus::default();
        let mut first = new_condition("Progressing", "True", "NewReplicaSetCreated", "a".into());
        first.last_transition_time = Some(Time(
            Utc::now() - k8s_openapi::chrono::Duration::seconds(60),
        ));
        let t0 = first.last_transition_time.clone();
        set_condition(&mut s, first);
        set_condition(
            &mut s,
            new_condition("Progressing", "True", "ReplicaSetUpdated", "b".into()),
        );
        let c = condition(&s, "Progressing").unwrap();
        assert_eq!(c.reason.as_deref(), Some("ReplicaSetUpdated"));
        assert_eq!(c.last_transition_time, t0);
        set_condition(
            &mut s,
            new_condition(
                "Progressing",
                "False",
                "ProgressDeadlineExceeded",
                "c".into(),
            ),
        );
        assert_ne!(
            condition(&s, "Progressing").unwrap().last_transition_time,
            t0
        );
        assert_eq!(s.conditions.as_ref().unwrap().len(), 1);
    }

    #[test]
    fn scaling_is_shared_by_size() {
        let d = deployment(
            json!({"spec": {"replicas": 20, "selector": {}, "template": {},
            "strategy": {"rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}}}),
        );
        let rs = |n: i32| -> ReplicaSet {
            serde_json::from_value(json!({"metadata": {"annotations": {MAX_REPLICAS: "10"}},
                "spec": {"replicas": n, "selector": {}}}))
            .unwrap()
        };
        // 10 → 20: a set of 6 doubles, one of 4 too, within what is left to add.
        assert_eq!(proportion(&d, &rs(6), 10, 0), 6);
        assert_eq!(proportion(&d, &rs(4), 10, 6), 4);
        assert_eq!(proportion(&d, &rs(4), 10, 8), 2);
    }
}
