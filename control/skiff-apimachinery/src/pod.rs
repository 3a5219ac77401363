//! Pod facts controllers and the scheduler share, as `k8s.io/kubernetes/pkg/api/v1/pod` and
//! `resourcehelper` define them.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::{Container, Pod, PodCondition},
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
    chrono::{DateTime, Utc},
};

use crate::quantity;

/// The pod's condition of `type_`, if reported.
pub fn condition<'a>(pod: &'a Pod, type_: &str) -> Option<&'a PodCondition> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_)
}

/// `status.phase`, or `Pending` when not reported yet.
pub fn phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending")
}

/// Whether the pod is Ready.
pub fn is_ready(pod: &Pod) -> bool {
    condition(pod, "Ready").is_some_and(|c| c.status == "True")
}

/// Whether the pod has been Ready for at least `min_ready_seconds` at `now`.
pub fn is_available(pod: &Pod, min_ready_seconds: i32, now: DateTime<Utc>) -> bool {
    let Some(c) = condition(pod, "Ready").filter(|c| c.status == "True") else {
        return false;
    };
    if min_ready_seconds <= 0 {
        return true;
    }
    c.last_transition_time.as_ref().is_some_and(|t| {
        t.0 + k8s_openapi::chrono::Duration::seconds(min_ready_seconds.into()) <= now
    })
}

/// Whether the pod has finished (Succeeded or Failed).
pub fn is_terminal(pod: &Pod) -> bool {
    matches!(phase(pod), "Succeeded" | "Failed")
}

/// Whether the pod is being deleted.
pub fn is_terminating(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_some()
}

/// Whether the pod counts toward its controller's replicas: neither finished nor being
/// deleted (`controller.FilterActivePods`).
pub fn is_active(pod: &Pod) -> bool {
    !is_terminal(pod) && !is_terminating(pod)
}

/// The node the pod is bound to.
pub fn node_name(pod: &Pod) -> Option<&str> {
    pod.spec
        .as_ref()?
        .node_name
        .as_deref()
        .filter(|n| !n.is_empty())
}

/// The owner reference with `controller: true`, if any.
pub fn controller_ref(meta: &ObjectMeta) -> Option<&OwnerReference> {
    meta.owner_references
        .as_ref()?
        .iter()
        .find(|o| o.controller == Some(true))
}

/// The restart count summed over the pod's containers.
pub fn restarts(pod: &Pod) -> i32 {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .map_or(0, |cs| cs.iter().map(|c| c.restart_count).sum())
}

/// Resource amounts in the scheduler's units: milli-CPU, bytes, and any other resource in
/// its own base units.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Resources {
    /// CPU in millicores.
    pub milli_cpu: i64,
    /// Memory in bytes.
    pub memory: i64,
    /// Ephemeral storage in bytes.
    pub ephemeral_storage: i64,
    /// Extended resources (`example.com/gpu`), in units.
    pub scalar: BTreeMap<String, i64>,
}

impl Resources {
    /// Adds `other`.
    pub fn add(&mut self, other: &Resources) {
        self.milli_cpu += other.milli_cpu;
        self.memory += other.memory;
        self.ephemeral_storage += other.ephemeral_storage;
        for (k, v) in &other.scalar {
            *self.scalar.entry(k.clone()).or_default() += v;
        }
    }

    /// Subtracts `other`.
    pub fn sub(&mut self, other: &Resources) {
        self.milli_cpu -= other.milli_cpu;
        self.memory -= other.memory;
        self.ephemeral_storage -= other.ephemeral_storage;
        for (k, v) in &other.scalar {
            *self.scalar.entry(k.clone()).or_default() -= v;
        }
    }

    /// Each resource the larger of `self` and `other`.
    pub fn max(&mut self, other: &Resources) {
        self.milli_cpu = self.milli_cpu.max(other.milli_cpu);
        self.memory = self.memory.max(other.memory);
        self.ephemeral_storage = self.ephemeral_storage.max(other.ephemeral_storage);
        for (k, v) in &other.scalar {
            let e = self.scalar.entry(k.clone()).or_default();
            *e = (*e).max(*v);
        }
    }

    /// Reads a resource list (`cpu`, `memory`, `ephemeral-storage`, `pods` is skipped, the rest
    /// are extended resources). Unparsable quantities count as zero.
    pub fn from_list(
        list: &BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
    ) -> Resources {
        let mut r = Resources::default();
        for (k, q) in list {
            let v = quantity::parse(&q.0).unwrap_or(0.0);
            match k.as_str() {
                "cpu" => r.milli_cpu = (v * 1000.0).ceil() as i64,
                "memory" => r.memory = v.ceil() as i64,
                "ephemeral-storage" => r.ephemeral_storage = v.ceil() as i64,
                "pods" => {}
                _ => {
                    r.scalar.insert(k.clone(), v.ceil() as i64);
                }
            }
        }
        r
    }
}

/// A container's requests, each resource falling back to its limit (the API defaults requests
/// to limits).
fn container_requests(c: &Container) -> Resources {
    let Some(res) = c.resources.as_ref() else {
        return Resources::default();
    };
    let mut list = res.limits.clone().unwrap_or_default();
    list.extend(res.requests.clone().unwrap_or_default());
    Resources::from_list(&list)
}

/// What the pod requests (`resourcehelper.PodRequests`): the sum over its containers, at least
/// the largest init container (restartable sidecars add to both), plus the pod overhead.
pub fn requests(pod: &Pod) -> Resources {
    let Some(spec) = pod.spec.as_ref() else {
        return Resources::default();
    };
    let mut sum = Resources::default();
    for c in &spec.containers {
        sum.add(&container_requests(c));
    }
    let mut init_max = Resources::default();
    let mut sidecars = Resources::default();
    for c in spec.init_containers.iter().flatten() {
        let r = container_requests(c);
        if c.restart_policy.as_deref() == Some("Always") {
            sidecars.add(&r);
            sum.add(&r);
        } else {
            let mut with_sidecars = r;
            with_sidecars.add(&sidecars);
            init_max.max(&with_sidecars);
        }
    }
    sum.max(&init_max);
    if let Some(o) = spec.overhead.as_ref() {
        sum.add(&Resources::from_list(o));
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn requests_take_the_larger_of_containers_and_init() {
        let pod: Pod = serde_json::from_value(json!({
            "spec": {
                "containers": [
                    {"name": "a", "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}},
                    {"name": "b", "resources": {"limits": {"cpu": "200m"}}},
                ],
                "initContainers": [{"name": "i", "resources": {"requests": {"cpu": "1", "memory": "1Mi"}}}],
                "overhead": {"cpu": "10m"}
            }
        }))
        .unwrap();
        let r = requests(&pod);
        assert_eq!(r.milli_cpu, 1010);
        assert_eq!(r.memory, 64 * 1024 * 1024);
    }

    #[test]
    fn availability_waits_min_ready_seconds() {
        let now = Utc::now();
        let pod: Pod = serde_json::from_value(json!({
            "status": {"conditions": [{"type": "Ready", "status": "True",
                "lastTransitionTime": (now - k8s_openapi::chrono::Duration::seconds(5)).to_rfc3339()}]}
        }))
        .unwrap();
        assert!(is_ready(&pod));
        assert!(is_available(&pod, 0, now));
        assert!(is_available(&pod, 5, now));
        assert!(!is_available(&pod, 10, now));
    }
}
