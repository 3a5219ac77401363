//! The simulated runtime (a product feature for scale testing, the kwok role): one process
//! registers many Nodes, keeps their Leases fresh, and drives the pods bound to them through the
//! phases a real node would report — without containers, networks or images.
//!
//! Pods become `Running` and `Ready` after a configurable start delay, with an address from the
//! node's pod CIDR (or, for nodes the cluster CIDR had no room for, from a fake per-node range
//! in 10.128.0.0/9 that is never routed), container statuses as the real agent writes them
//! (`containerID` `simulated://…`). Per-pod annotations script the rest:
//! `skiff.dev/simulate-exit-after` (a duration, e.g. `30s`: the containers terminate then, with
//! `skiff.dev/simulate-exit-code`, default 0, and the pod completes per its `restartPolicy`) and
//! `skiff.dev/simulate-restart-every` (a duration: the containers "restart" that often, counted
//! in `restartCount`). A readiness probe's `initialDelaySeconds` delays `Ready`. Deleted pods go
//! at once (their grace period has nothing to wait for).

use std::{
    collections::{HashMap, HashSet},
    net::Ipv4Addr,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result};
use futures::StreamExt;
use k8s_openapi::{
    api::core::v1::{Node, Pod},
    chrono::{SecondsFormat, Utc},
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions},
    runtime::{WatchStreamExt, watcher},
};
use serde_json::{Value, json};
use tokio::sync::Semaphore;

/// Label on simulated nodes.
pub const SIMULATED_LABEL: &str = "skiff.dev/simulated";
const EXIT_AFTER: &str = "skiff.dev/simulate-exit-after";
const EXIT_CODE: &str = "skiff.dev/simulate-exit-code";
const RESTART_EVERY: &str = "skiff.dev/simulate-restart-every";
/// API calls in flight at once.
const CONCURRENCY: usize = 32;

/// What to simulate.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// How many nodes.
    pub nodes: usize,
    /// Node names are `<prefix>-<index>`.
    pub prefix: String,
    /// From binding to `Running`.
    pub start_delay: Duration,
    /// Each node's capacity: CPUs.
    pub cpus: u32,
    /// Each node's capacity: memory in GiB.
    pub memory_gib: u32,
    /// Each node's capacity: pods.
    pub max_pods: u32,
}

fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// Parses `500ms`, `30s`, `5m`, `1h`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = n.parse().ok()?;
    Some(match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => return None,
    })
}

/// Node `i`'s name.
pub fn node_name(prefix: &str, i: usize) -> String {
    format!("{prefix}-{i}")
}

/// The fake InternalIP of simulated node `i` (in 100.64.0.0/10, shared address space; never
/// contacted).
fn node_ip(i: usize) -> Ipv4Addr {
    let i = u32::try_from(i).unwrap_or(0);
    Ipv4Addr::from(0x6440_0001 + i)
}

/// Pod addresses of one node.
#[derive(Debug, Default)]
struct NodeIps {
    /// The /24 base: the node's pod CIDR or its fake range.
    base: u32,
    used: HashSet<u32>,
}

impl NodeIps {
    fn allocate(&mut self) -> Option<Ipv4Addr> {
        (2..255)
            .map(|h| self.base + h)
            .find(|ip| self.used.insert(*ip))
            .map(Ipv4Addr::from)
    }

    fn release(&mut self, ip: Ipv4Addr) {
        self.used.remove(&u32::from(ip));
    }
}

/// What stays the same in a simulated pod's status.
struct Placement {
    node_ip: Ipv4Addr,
    ip: Ipv4Addr,
    started: String,
}

impl Placement {
    /// The status of `pod` with every container in `state` (a `running`/`terminated` object).
    fn status(&self, pod: &Pod, phase: &str, ready: bool, state: &Value, restarts: u32) -> Value {
        let (node_ip, ip, started) = (self.node_ip, self.ip, &self.started);
        let uid = pod.uid().unwrap_or_default();
        let t = now();
        let spec = pod.spec.clone().unwrap_or_default();
        let containers: Vec<Value> = spec
            .containers
            .iter()
            .map(|c| {
                let image = c.image.clone().unwrap_or_default();
                json!({
                    "name": c.name, "image": image,
                    "imageID": format!("simulated://{image}"),
                    "containerID": format!("simulated://{uid}-{}", c.name),
                    "ready": ready, "started": state.get("running").is_some(),
                    "restartCount": restarts, "state": state,
                })
            })
            .collect();
        let cond = |ty: &str, ok: bool| json!({"type": ty, "status": if ok { "True" } else { "False" }, "lastProbeTime": null, "lastTransitionTime": t});
        json!({
            "phase": phase,
            "hostIP": node_ip.to_string(), "hostIPs": [{"ip": node_ip.to_string()}],
            "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}],
            "startTime": started,
            "qosClass": crate::qos::qos_class(pod),
            "conditions": [
                cond("PodReadyToStartContainers", true),
                cond("Initialized", true),
                cond("Ready", ready),
                cond("ContainersReady", ready),
                cond("PodScheduled", true),
            ],
            "containerStatuses": containers,
        })
    }
}

struct Sim {
    client: Client,
    cfg: SimConfig,
    /// Node name → index.
    nodes: HashMap<String, usize>,
    ips: Mutex<HashMap<String, NodeIps>>,
    /// Pods being driven (uid), so an update does not start a second driver.
    driven: Mutex<HashMap<String, tokio::task::JoinHandle<()>>>,
    calls: Semaphore,
}

/// Registers the nodes and drives their pods until the process ends.
pub async fn run(client: Client, cfg: SimConfig) -> Result<()> {
    let nodes: HashMap<String, usize> = (0..cfg.nodes)
        .map(|i| (node_name(&cfg.prefix, i), i))
        .collect();
    let sim = Arc::new(Sim {
        client,
        nodes,
        ips: Mutex::new(HashMap::new()),
        driven: Mutex::new(HashMap::new()),
        calls: Semaphore::new(CONCURRENCY),
        cfg,
    });
    sim.register_all().await?;
    tracing::info!(nodes = sim.cfg.nodes, prefix = %sim.cfg.prefix, "simulated nodes registered");
    let leases = tokio::spawn(sim.clone().leases());
    let pods = sim.clone().pods().await;
    leases.abort();
    pods
}

impl Sim {
    fn node_status(&self, i: usize) -> Value {
        let t = now();
        let capacity = json!({
            "cpu": self.cfg.cpus.to_string(),
            "memory": format!("{}Gi", self.cfg.memory_gib),
            "pods": self.cfg.max_pods.to_string(),
            "ephemeral-storage": "100Gi",
        });
        let cond = |ty: &str, status: &str, reason: &str| {
            json!({"type": ty, "status": status, "reason": reason, "message": "simulated",
                   "lastHeartbeatTime": t, "lastTransitionTime": t})
        };
        json!({
            "capacity": capacity,
            "allocatable": capacity,
            "conditions": [
                cond("MemoryPressure", "False", "KubeletHasSufficientMemory"),
                cond("DiskPressure", "False", "KubeletHasNoDiskPressure"),
                cond("PIDPressure", "False", "KubeletHasSufficientPID"),
                cond("Ready", "True", "KubeletReady"),
            ],
            "addresses": [
                {"type": "InternalIP", "address": node_ip(i).to_string()},
                {"type": "Hostname", "address": node_name(&self.cfg.prefix, i)},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
            "nodeInfo": {
                "machineID": format!("simulated-{i}"), "systemUUID": format!("simulated-{i}"),
                "bootID": "simulated", "kernelVersion": "simulated", "osImage": "skiff simulated node",
                "containerRuntimeVersion": "simulated://skiff",
                "kubeletVersion": crate::register::KUBELET_VERSION, "kubeProxyVersion": "",
                "operatingSystem": "linux", "architecture": crate::machine::go_arch(),
            },
        })
    }

    async fn register(&self, name: &str, i: usize) -> Result<()> {
        let _permit = self.calls.acquire().await?;
        let api: Api<Node> = Api::all(self.client.clone());
        let node: Node = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {
                "kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                "kubernetes.io/arch": crate::machine::go_arch(), SIMULATED_LABEL: "true",
            }},
            "spec": {},
        }))?;
        match api.create(&PostParams::default(), &node).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e).with_context(|| format!("register node {name}")),
        }
        api.patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(&json!({"status": self.node_status(i)})),
        )
        .await
        .with_context(|| format!("post the status of node {name}"))?;
        crate::register::renew_lease(&self.client, name).await
    }

    async fn register_all(self: &Arc<Self>) -> Result<()> {
        let mut set = tokio::task::JoinSet::new();
        for (name, i) in self.nodes.clone() {
            let me = self.clone();
            set.spawn(async move { me.register(&name, i).await });
        }
        while let Some(r) = set.join_next().await {
            r.context("a registration task")??;
        }
        Ok(())
    }

    /// Renews every node's Lease once per lease period, spread evenly over it.
    async fn leases(self: Arc<Self>) {
        let names: Vec<String> = self.nodes.keys().cloned().collect();
        let step = crate::register::LEASE_RENEW / u32::try_from(names.len().max(1)).unwrap_or(1);
        let mut tick = tokio::time::interval(step.max(Duration::from_millis(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for name in names.iter().cycle() {
            tick.tick().await;
            let (me, name) = (self.clone(), name.clone());
            tokio::spawn(async move {
                let Ok(_permit) = me.calls.acquire().await else {
                    return;
                };
                if let Err(e) = crate::register::renew_lease(&me.client, &name).await {
                    tracing::debug!(node = %name, error = format!("{e:#}"), "lease renewal failed");
                }
            });
        }
    }

    /// The /24 the pods of node `name` (index `i`) take addresses from.
    async fn range_of(&self, name: &str, i: usize) -> u32 {
        let api: Api<Node> = Api::all(self.client.clone());
        let cidr = api
            .get(name)
            .await
            .ok()
            .and_then(|n| n.spec.and_then(|s| s.pod_cidr))
            .and_then(|c| c.split('/').next().and_then(|a| a.parse::<Ipv4Addr>().ok()));
        match cidr {
            Some(a) => u32::from(a) & 0xffff_ff00,
            None => 0x0a80_0000 + (u32::try_from(i).unwrap_or(0) << 8),
        }
    }

    async fn allocate(&self, node: &str) -> Option<Ipv4Addr> {
        let i = *self.nodes.get(node)?;
        let known = self
            .ips
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(node);
        if !known {
            let base = self.range_of(node, i).await;
            self.ips
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(node.to_string())
                .or_insert_with(|| NodeIps {
                    base,
                    used: HashSet::new(),
                });
        }
        self.ips
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(node)
            .and_then(NodeIps::allocate)
    }

    fn release(&self, node: &str, ip: Option<Ipv4Addr>) {
        if let Some(ip) = ip
            && let Some(n) = self
                .ips
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_mut(node)
        {
            n.release(ip);
        }
    }

    fn pod_ip(pod: &Pod) -> Option<Ipv4Addr> {
        pod.status
            .as_ref()
            .and_then(|s| s.pod_ip.as_ref())
            .and_then(|ip| ip.parse().ok())
    }

    async fn pods(self: Arc<Self>) -> Result<()> {
        let api: Api<Pod> = Api::all(self.client.clone());
        let mut events = watcher(api, watcher::Config::default())
            .default_backoff()
            .boxed();
        while let Some(ev) = events.next().await {
            let ev = match ev {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(error = %e, "pod watch error; retrying");
                    continue;
                }
            };
            match ev {
                watcher::Event::Apply(p) | watcher::Event::InitApply(p) => self.observe(p),
                watcher::Event::Delete(p) => {
                    if let Some(node) = p.spec.as_ref().and_then(|s| s.node_name.clone()) {
                        self.release(&node, Self::pod_ip(&p));
                    }
                    if let Some(h) = p.uid().and_then(|u| {
                        self.driven
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .remove(&u)
                    }) {
                        h.abort();
                    }
                }
                watcher::Event::Init | watcher::Event::InitDone => {}
            }
        }
        Ok(())
    }

    fn observe(self: &Arc<Self>, pod: Pod) {
        let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) else {
            return;
        };
        if !self.nodes.contains_key(&node) {
            return;
        }
        let Some(uid) = pod.uid() else { return };
        if pod.metadata.deletion_timestamp.is_some() {
            let me = self.clone();
            tokio::spawn(async move { me.finish_delete(&pod, &uid).await });
            return;
        }
        let phase = pod.status.as_ref().and_then(|s| s.phase.clone());
        if matches!(phase.as_deref(), Some("Succeeded" | "Failed")) {
            return;
        }
        let mut driven = self.driven.lock().unwrap_or_else(|p| p.into_inner());
        if driven.contains_key(&uid) {
            return;
        }
        let me = self.clone();
        driven.insert(
            uid,
            tokio::spawn(async move {
                if let Err(e) = me.drive(pod, node).await {
                    tracing::debug!(error = format!("{e:#}"), "driving a simulated pod failed");
                }
            }),
        );
    }

    async fn finish_delete(&self, pod: &Pod, uid: &str) {
        if let Some(h) = self
            .driven
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(uid)
        {
            h.abort();
        }
        let Ok(_permit) = self.calls.acquire().await else {
            return;
        };
        let api: Api<Pod> =
            Api::namespaced(self.client.clone(), &pod.namespace().unwrap_or_default());
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(uid.to_string()),
                resource_version: None,
            }),
            ..Default::default()
        };
        let _ = api.delete(&pod.name_any(), &dp).await;
    }

    async fn patch_status(&self, pod: &Pod, status: Value) -> Result<()> {
        let _permit = self.calls.acquire().await?;
        let api: Api<Pod> =
            Api::namespaced(self.client.clone(), &pod.namespace().unwrap_or_default());
        api.patch_status(
            &pod.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&json!({"status": status})),
        )
        .await
        .with_context(|| format!("post the status of pod {}", pod.name_any()))?;
        Ok(())
    }

    async fn drive(&self, pod: Pod, node: String) -> Result<()> {
        let i = self.nodes.get(&node).copied().unwrap_or(0);
        let node_ip = node_ip(i);
        let ip = match Self::pod_ip(&pod) {
            Some(ip) => ip,
            None => self
                .allocate(&node)
                .await
                .with_context(|| format!("node {node} has no free simulated pod address"))?,
        };
        let started = pod
            .status
            .as_ref()
            .and_then(|s| s.start_time.as_ref())
            .map_or_else(now, |t| t.0.to_rfc3339_opts(SecondsFormat::Secs, true));
        let at = Placement {
            node_ip,
            ip,
            started,
        };
        let already_running =
            pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
        if !already_running {
            tokio::time::sleep(self.cfg.start_delay).await;
        }
        let annotations = pod.annotations();
        let duration = |k: &str| annotations.get(k).and_then(|v| parse_duration(v));
        let spec = pod.spec.clone().unwrap_or_default();
        let ready_delay = spec
            .containers
            .iter()
            .filter_map(|c| c.readiness_probe.as_ref()?.initial_delay_seconds)
            .max()
            .map_or(Duration::ZERO, |s| {
                Duration::from_secs(u64::try_from(s).unwrap_or(0))
            });
        let running = json!({"running": {"startedAt": now()}});
        let mut restarts: u32 = pod
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|cs| cs.first())
            .and_then(|c| u32::try_from(c.restart_count).ok())
            .unwrap_or(0);
        let ready_now = ready_delay.is_zero() || already_running;
        self.patch_status(
            &pod,
            at.status(&pod, "Running", ready_now, &running, restarts),
        )
        .await?;
        if !ready_now {
            tokio::time::sleep(ready_delay).await;
            self.patch_status(&pod, at.status(&pod, "Running", true, &running, restarts))
                .await?;
        }
        let exit_after = duration(EXIT_AFTER);
        let restart_every = duration(RESTART_EVERY);
        match (exit_after, restart_every) {
            (Some(after), _) => {
                tokio::time::sleep(after).await;
                let code: i32 = annotations
                    .get(EXIT_CODE)
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(0);
                let policy = spec.restart_policy.as_deref().unwrap_or("Always");
                let done = policy == "Never" || (policy == "OnFailure" && code == 0);
                let terminated = json!({"terminated": {
                    "exitCode": code, "reason": if code == 0 { "Completed" } else { "Error" },
                    "startedAt": running["running"]["startedAt"], "finishedAt": now()}});
                if done {
                    let phase = if code == 0 { "Succeeded" } else { "Failed" };
                    self.patch_status(&pod, at.status(&pod, phase, false, &terminated, restarts))
                        .await?;
                    self.release(&node, Some(ip));
                } else {
                    // Restarted as a real node would, then it runs on.
                    restarts += 1;
                    let again = json!({"running": {"startedAt": now()}});
                    self.patch_status(&pod, at.status(&pod, "Running", true, &again, restarts))
                        .await?;
                }
            }
            (None, Some(every)) => loop {
                tokio::time::sleep(every).await;
                restarts += 1;
                let again = json!({"running": {"startedAt": now()}});
                self.patch_status(&pod, at.status(&pod, "Running", true, &again, restarts))
                    .await?;
            },
            (None, None) => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("x"), None);
        assert_eq!(parse_duration("5"), None);
    }

    #[test]
    fn addresses_stay_in_the_node_range() {
        let mut ips = NodeIps {
            base: u32::from(Ipv4Addr::new(10, 244, 3, 0)),
            used: HashSet::new(),
        };
        let a = ips.allocate().unwrap();
        assert_eq!(a, Ipv4Addr::new(10, 244, 3, 2));
        let b = ips.allocate().unwrap();
        assert_ne!(a, b);
        ips.release(a);
        assert_eq!(ips.allocate().unwrap(), a);
        assert_eq!(node_ip(0), Ipv4Addr::new(100, 64, 0, 1));
    }
}
