//! Quality-of-service class and cgroup settings from requests and limits, computed as the
//! kubelet computes them: CPU shares from the request (2 without one), a CFS quota from the CPU
//! limit (100 ms period), the memory limit with swap off, and an `oom_score_adj` by class
//! (Guaranteed -997, BestEffort 1000, Burstable by the share of the node's memory requested),
//! raised to the agent's own score when that is higher (containerd's
//! `restrict_oom_score_adj`: lowering it needs a capability containers do not get).

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::{Container, Pod},
    apimachinery::pkg::api::resource::Quantity,
};
use skiff_runtime::container::Resources;

use crate::quantity;

const CFS_PERIOD_US: u64 = 100_000;
const MIN_SHARES: u64 = 2;
const MAX_SHARES: u64 = 262_144;
const MIN_QUOTA_US: i64 = 1_000;
const GUARANTEED_OOM_SCORE_ADJ: i32 = -997;
const BEST_EFFORT_OOM_SCORE_ADJ: i32 = 1000;

/// A container's CPU (cores) and memory (bytes) requests and limits; an unset request is the
/// limit, as the API's defaulting makes it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Amounts {
    cpu_request: Option<f64>,
    cpu_limit: Option<f64>,
    memory_request: Option<f64>,
    memory_limit: Option<f64>,
}

fn amounts(c: &Container) -> Result<Amounts, String> {
    let res = c.resources.clone().unwrap_or_default();
    let get = |m: &Option<BTreeMap<String, Quantity>>, k: &str| -> Result<Option<f64>, String> {
        Ok(m.as_ref()
            .and_then(|m| m.get(k))
            .map(|q| quantity::parse(&q.0))
            .transpose()?
            .filter(|v| *v != 0.0))
    };
    let cpu_limit = get(&res.limits, "cpu")?;
    let memory_limit = get(&res.limits, "memory")?;
    Ok(Amounts {
        cpu_request: get(&res.requests, "cpu")?.or(cpu_limit),
        cpu_limit,
        memory_request: get(&res.requests, "memory")?.or(memory_limit),
        memory_limit,
    })
}

fn all_containers(pod: &Pod) -> Vec<&Container> {
    pod.spec
        .as_ref()
        .map(|s| {
            s.containers
                .iter()
                .chain(s.init_containers.iter().flatten())
                .collect()
        })
        .unwrap_or_default()
}

/// The pod's QoS class: `Guaranteed`, `Burstable` or `BestEffort`.
pub fn qos_class(pod: &Pod) -> &'static str {
    let mut any = false;
    let mut guaranteed = true;
    for c in all_containers(pod) {
        let Ok(a) = amounts(c) else {
            guaranteed = false;
            any = true;
            continue;
        };
        any |= a.cpu_request.is_some()
            || a.cpu_limit.is_some()
            || a.memory_request.is_some()
            || a.memory_limit.is_some();
        guaranteed &= a.cpu_limit.is_some()
            && a.memory_limit.is_some()
            && a.cpu_request == a.cpu_limit
            && a.memory_request == a.memory_limit;
    }
    match (any, guaranteed) {
        (false, _) => "BestEffort",
        (true, true) => "Guaranteed",
        (true, false) => "Burstable",
    }
}

/// The cgroup settings of container `c` of `pod` on a node with `node_memory` bytes, for an
/// agent whose own `oom_score_adj` is `floor`.
pub fn resources(
    pod: &Pod,
    c: &Container,
    node_memory: f64,
    floor: i32,
) -> Result<Resources, String> {
    let a = amounts(c)?;
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "quantities are validated, positive and far below the integer limits"
    )]
    let (milli, limit_milli, memory_limit, memory_request) = (
        a.cpu_request.map(|v| (v * 1000.0).round() as u64),
        a.cpu_limit.map(|v| (v * 1000.0).round() as i64),
        a.memory_limit.map(|v| v.ceil() as i64),
        a.memory_request.unwrap_or(0.0),
    );
    let shares = milli
        .map_or(MIN_SHARES, |m| m * 1024 / 1000)
        .clamp(MIN_SHARES, MAX_SHARES);
    let quota = limit_milli.map(|m| (m * CFS_PERIOD_US as i64 / 1000).max(MIN_QUOTA_US));
    let adj = match qos_class(pod) {
        "Guaranteed" => GUARANTEED_OOM_SCORE_ADJ,
        "BestEffort" => BEST_EFFORT_OOM_SCORE_ADJ,
        _ => {
            #[allow(
                clippy::cast_possible_truncation,
                reason = "the score is between 0 and 1000"
            )]
            let score = (1000.0 - (1000.0 * memory_request) / node_memory.max(1.0)) as i32;
            score.clamp(
                1000 + GUARANTEED_OOM_SCORE_ADJ,
                BEST_EFFORT_OOM_SCORE_ADJ - 1,
            )
        }
    };
    Ok(Resources {
        memory_limit,
        cpu_shares: Some(shares),
        cpu_quota: quota,
        cpu_period: quota.map(|_| CFS_PERIOD_US),
        oom_score_adj: Some(adj.max(floor)),
    })
}

/// This process's `oom_score_adj` (containers may not go below it).
pub fn own_oom_score_adj() -> i32 {
    std::fs::read_to_string("/proc/self/oom_score_adj")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(containers: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p"}, "spec": {"containers": containers}
        }))
        .unwrap()
    }

    #[test]
    fn classes_as_upstream() {
        let none = pod(serde_json::json!([{"name": "a"}]));
        assert_eq!(qos_class(&none), "BestEffort");
        let limits_only = pod(serde_json::json!([{"name": "a",
            "resources": {"limits": {"cpu": "1", "memory": "1Gi"}}}]));
        assert_eq!(qos_class(&limits_only), "Guaranteed");
        let requests_below = pod(serde_json::json!([{"name": "a",
            "resources": {"limits": {"cpu": "1", "memory": "1Gi"}, "requests": {"cpu": "500m"}}}]));
        assert_eq!(qos_class(&requests_below), "Burstable");
        let one_unbounded = pod(serde_json::json!([
            {"name": "a", "resources": {"limits": {"cpu": "1", "memory": "1Gi"}}},
            {"name": "b"}]));
        assert_eq!(qos_class(&one_unbounded), "Burstable");
    }

    #[test]
    fn cgroup_settings_as_the_kubelet_sets_them() {
        let gib = 1024.0 * 1024.0 * 1024.0;
        let p = pod(serde_json::json!([{"name": "a", "resources": {
            "requests": {"cpu": "250m", "memory": "1Gi"}, "limits": {"cpu": "500m", "memory": "2Gi"}}}]));
        let c = &p.spec.as_ref().unwrap().containers[0];
        let r = resources(&p, c, 4.0 * gib, -999).unwrap();
        assert_eq!(r.cpu_shares, Some(256));
        assert_eq!(r.cpu_quota, Some(50_000));
        assert_eq!(r.cpu_period, Some(100_000));
        assert_eq!(r.memory_limit, Some(2 * 1024 * 1024 * 1024));
        assert_eq!(r.oom_score_adj, Some(750));
        // Guaranteed, but the agent's own score is the floor.
        let g = pod(
            serde_json::json!([{"name": "a", "resources": {"limits": {"cpu": "1m", "memory": "1Gi"}}}]),
        );
        let c = &g.spec.as_ref().unwrap().containers[0];
        let r = resources(&g, c, 4.0 * gib, 0).unwrap();
        assert_eq!(r.oom_score_adj, Some(0));
        assert_eq!(r.cpu_quota, Some(1_000), "the smallest quota is 1 ms");
        assert_eq!(r.cpu_shares, Some(2));
        let r = resources(&g, c, 4.0 * gib, -999).unwrap();
        assert_eq!(r.oom_score_adj, Some(-997));
        let b = pod(serde_json::json!([{"name": "a"}]));
        let c = &b.spec.as_ref().unwrap().containers[0];
        let r = resources(&b, c, 4.0 * gib, 0).unwrap();
        assert_eq!(
            (r.cpu_shares, r.cpu_quota, r.memory_limit, r.oom_score_adj),
            (Some(2), None, None, Some(1000))
        );
    }
}
