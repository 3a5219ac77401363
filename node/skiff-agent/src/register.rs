//! Joining the cluster: the Node object (created or brought up to date at start), its status
//! (capacity, addresses, node info, the Ready and pressure conditions), and the heartbeat: a
//! Lease in `kube-node-lease` renewed every 10 s, status re-posted when it changes and at least
//! every minute, as the kubelet does.

use std::{net::Ipv4Addr, path::PathBuf, time::Duration};

use anyhow::{Context, Result};
use k8s_openapi::{
    api::{coordination::v1::Lease, core::v1::Node},
    apimachinery::pkg::apis::meta::v1::MicroTime,
    chrono::{SecondsFormat, Utc},
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};

use crate::machine::{self, MAX_PODS, Machine, Pressure};

/// The kubelet version skiff-node reports.
pub const KUBELET_VERSION: &str = "v1.32.0-skiff";
/// How often the Lease is renewed (upstream: 10 s, a quarter of its 40 s duration).
pub const LEASE_RENEW: Duration = Duration::from_secs(10);
/// The Lease's duration.
pub const LEASE_SECONDS: i32 = 40;
/// How often status is posted when nothing changed.
pub const STATUS_EVERY: Duration = Duration::from_secs(60);

/// How this node presents itself.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Node name.
    pub name: String,
    /// The address other nodes and the control plane reach it at.
    pub internal_ip: Ipv4Addr,
    /// The agent's data directory (its filesystem is the node's ephemeral storage).
    pub data_dir: PathBuf,
    /// The agent's HTTPS port (logs, exec), published as the kubelet endpoint.
    pub port: u16,
    /// `containerd://<version>`, once known.
    pub runtime_version: String,
    /// Extra labels (`--node-labels`).
    pub labels: Vec<(String, String)>,
    /// Annotations (the serving certificate's fingerprint).
    pub annotations: Vec<(String, String)>,
}

fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn quantity_bytes(b: u64) -> String {
    format!("{}Ki", b / 1024)
}

/// The Node object registered at start (metadata and spec).
pub fn node_object(cfg: &NodeConfig) -> Value {
    let mut labels = json!({
        "kubernetes.io/hostname": cfg.name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": machine::go_arch(),
        "beta.kubernetes.io/os": "linux",
        "beta.kubernetes.io/arch": machine::go_arch(),
    });
    for (k, v) in &cfg.labels {
        labels[k] = json!(v);
    }
    let annotations: serde_json::Map<String, Value> = cfg
        .annotations
        .iter()
        .map(|(k, v)| (k.clone(), json!(v)))
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": cfg.name, "labels": labels, "annotations": annotations},
        "spec": {},
    })
}

fn condition(
    ty: &str,
    status: bool,
    reason: &str,
    message: &str,
    heartbeat: &str,
    transition: &str,
) -> Value {
    json!({
        "type": ty,
        "status": if status { "True" } else { "False" },
        "reason": reason,
        "message": message,
        "lastHeartbeatTime": heartbeat,
        "lastTransitionTime": transition,
    })
}

/// The status the node posts. `previous` carries transition times of unchanged conditions.
pub fn status(cfg: &NodeConfig, m: &Machine, p: Pressure, previous: Option<&Value>) -> Value {
    let heartbeat = now();
    let transition = |ty: &str, status: &str| -> String {
        previous
            .and_then(|s| s.get("conditions"))
            .and_then(Value::as_array)
            .and_then(|cs| cs.iter().find(|c| c["type"] == ty))
            .filter(|c| c["status"] == status)
            .and_then(|c| c["lastTransitionTime"].as_str())
            .map_or_else(|| heartbeat.clone(), str::to_string)
    };
    let tf = |b: bool| if b { "True" } else { "False" };
    let capacity = json!({
        "cpu": m.cpus.to_string(),
        "memory": quantity_bytes(m.memory),
        "pods": MAX_PODS.to_string(),
        "ephemeral-storage": quantity_bytes(m.ephemeral_storage),
    });
    json!({
        "capacity": capacity,
        "allocatable": capacity,
        "conditions": [
            condition("MemoryPressure", p.memory,
                if p.memory { "KubeletHasInsufficientMemory" } else { "KubeletHasSufficientMemory" },
                if p.memory { "memory available is below 100Mi" } else { "skiff-node has sufficient memory available" },
                &heartbeat, &transition("MemoryPressure", tf(p.memory))),
            condition("DiskPressure", p.disk,
                if p.disk { "KubeletHasDiskPressure" } else { "KubeletHasNoDiskPressure" },
                if p.disk { "less than 10% of the node's filesystem is available" } else { "skiff-node has no disk pressure" },
                &heartbeat, &transition("DiskPressure", tf(p.disk))),
            condition("PIDPressure", p.pids,
                if p.pids { "KubeletHasInsufficientPID" } else { "KubeletHasSufficientPID" },
                if p.pids { "more than 90% of pid_max is in use" } else { "skiff-node has sufficient PID available" },
                &heartbeat, &transition("PIDPressure", tf(p.pids))),
            condition("Ready", true, "KubeletReady", "skiff-node is posting ready status",
                &heartbeat, &transition("Ready", "True")),
        ],
        "addresses": [
            {"type": "InternalIP", "address": cfg.internal_ip.to_string()},
            {"type": "Hostname", "address": cfg.name},
        ],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": cfg.port}},
        "nodeInfo": {
            "machineID": m.machine_id,
            "systemUUID": m.machine_id,
            "bootID": m.boot_id,
            "kernelVersion": m.kernel,
            "osImage": m.os_image,
            "containerRuntimeVersion": cfg.runtime_version,
            "kubeletVersion": KUBELET_VERSION,
            "kubeProxyVersion": "",
            "operatingSystem": "linux",
            "architecture": m.arch,
        },
    })
}

/// Whether two statuses differ in more than heartbeat times.
fn changed(a: &Value, b: &Value) -> bool {
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(cs) = v.get_mut("conditions").and_then(Value::as_array_mut) {
            for c in cs.iter_mut().filter_map(Value::as_object_mut) {
                c.remove("lastHeartbeatTime");
            }
        }
        v
    };
    strip(a) != strip(b)
}

/// Creates the Node (or updates its labels if it exists) and posts its status. Returns the
/// status posted.
pub async fn register(client: &Client, cfg: &NodeConfig) -> Result<Value> {
    let api: Api<Node> = Api::all(client.clone());
    let desired: Node = serde_json::from_value(node_object(cfg)).context("node object")?;
    match api.create(&PostParams::default(), &desired).await {
        Ok(_) => tracing::info!(node = %cfg.name, "registered the node"),
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let obj = node_object(cfg);
            let patch = json!({"metadata": {
                "labels": obj["metadata"]["labels"],
                "annotations": obj["metadata"]["annotations"],
            }});
            api.patch(&cfg.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .context("update the node's labels")?;
            tracing::info!(node = %cfg.name, "the node was registered before; updated it");
        }
        Err(e) => return Err(e).context("register the node"),
    }
    let m = Machine::read(&cfg.data_dir)?;
    let previous = api
        .get_status(&cfg.name)
        .await
        .ok()
        .and_then(|n| n.status.and_then(|s| serde_json::to_value(s).ok()));
    let st = status(cfg, &m, machine::pressure(&cfg.data_dir), previous.as_ref());
    post_status(&api, &cfg.name, &st).await?;
    Ok(st)
}

async fn post_status(api: &Api<Node>, name: &str, st: &Value) -> Result<()> {
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(&json!({"status": st})),
    )
    .await
    .context("post the node's status")?;
    Ok(())
}

pub(crate) async fn renew_lease(client: &Client, name: &str) -> Result<()> {
    let api: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let now = MicroTime(Utc::now());
    let lease = json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": name},
        "spec": {"holderIdentity": name, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": now},
    });
    match api
        .patch(name, &PatchParams::default(), &Patch::Merge(&lease))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => {
            let l: Lease = serde_json::from_value(lease).context("lease")?;
            api.create(&PostParams::default(), &l)
                .await
                .context("create the node lease")?;
            Ok(())
        }
        Err(e) => Err(e).context("renew the node lease"),
    }
}

/// The heartbeat loop: renews the Lease every 10 s and re-posts status when it changed or a
/// minute passed. Errors are logged and retried on the next tick; it never returns.
pub async fn heartbeat(client: Client, cfg: NodeConfig, mut last: Value) {
    let api: Api<Node> = Api::all(client.clone());
    let mut tick = tokio::time::interval(LEASE_RENEW);
    let mut posted = tokio::time::Instant::now();
    loop {
        tick.tick().await;
        if let Err(e) = renew_lease(&client, &cfg.name).await {
            tracing::warn!(error = format!("{e:#}"), "lease renewal failed");
        }
        let m = match Machine::read(&cfg.data_dir) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = format!("{e:#}"), "reading machine facts failed");
                continue;
            }
        };
        let st = status(&cfg, &m, machine::pressure(&cfg.data_dir), Some(&last));
        if changed(&st, &last) || posted.elapsed() >= STATUS_EVERY {
            match post_status(&api, &cfg.name, &st).await {
                Ok(()) => {
                    last = st;
                    posted = tokio::time::Instant::now();
                }
                Err(e) => tracing::warn!(error = format!("{e:#}"), "posting node status failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> NodeConfig {
        NodeConfig {
            name: "n1".into(),
            internal_ip: Ipv4Addr::new(10, 0, 0, 5),
            data_dir: "/".into(),
            port: 10250,
            runtime_version: "containerd://1.6.20".into(),
            labels: vec![("node-role.kubernetes.io/worker".into(), String::new())],
            annotations: Vec::new(),
        }
    }

    #[test]
    fn status_is_a_valid_node_status_and_keeps_transition_times() {
        let m = Machine::read(std::path::Path::new("/")).unwrap();
        let first = status(&cfg(), &m, Pressure::default(), None);
        let node: Node =
            serde_json::from_value(json!({"metadata": {"name": "n1"}, "status": first.clone()}))
                .unwrap();
        let st = node.status.unwrap();
        assert_eq!(st.capacity.unwrap()["pods"].0, "110");
        assert_eq!(st.addresses.unwrap()[0].address, "10.0.0.5");
        std::thread::sleep(Duration::from_millis(1100));
        let second = status(&cfg(), &m, Pressure::default(), Some(&first));
        assert!(!changed(&first, &second), "only heartbeats moved");
        assert_eq!(
            second["conditions"][3]["lastTransitionTime"],
            first["conditions"][3]["lastTransitionTime"]
        );
        let pressured = status(
            &cfg(),
            &m,
            Pressure {
                memory: true,
                ..Default::default()
            },
            Some(&first),
        );
        assert!(changed(&first, &pressured));
        assert_eq!(pressured["conditions"][0]["status"], "True");
        assert_eq!(
            node_object(&cfg())["metadata"]["labels"]["node-role.kubernetes.io/worker"],
            ""
        );
    }
}
