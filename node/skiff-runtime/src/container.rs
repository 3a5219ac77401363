//! Containers and their tasks through containerd's native API: a writable overlayfs snapshot on
//! top of the image's layers, an OCI runtime spec built with `oci-spec`, a runc v2 task whose
//! output goes to a file, wait, kill and delete.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use containerd_client::{
    services::v1::{
        Container, CreateContainerRequest, CreateTaskRequest, DeleteContainerRequest,
        DeleteTaskRequest, KillRequest, ListContainersRequest, ListTasksRequest, StartRequest,
        WaitRequest,
        container::Runtime,
        containers_client::ContainersClient,
        snapshots::{
            MountsRequest, PrepareSnapshotRequest, RemoveSnapshotRequest,
            snapshots_client::SnapshotsClient,
        },
        tasks_client::TasksClient,
    },
    tonic::{Code, Request, transport::Channel},
    with_namespace,
};
use oci_spec::runtime::Spec;
use serde_json::{Value, json};

use crate::{
    containerd::NAMESPACE,
    image::{ImageInfo, SNAPSHOTTER},
};

/// What to run.
#[derive(Clone, Debug, Default)]
pub struct ContainerConfig {
    /// Unique container id (also the snapshot key and task id).
    pub id: String,
    /// `command` + `args` resolved against the image's Entrypoint/Cmd by the caller; empty means
    /// the image's own.
    pub args: Vec<String>,
    /// Extra environment (`KEY=VALUE`), after the image's.
    pub env: Vec<String>,
    /// Working directory; empty means the image's or `/`.
    pub cwd: String,
    /// Hostname inside the container.
    pub hostname: String,
    /// The network namespace to join (the pod's); `None` gives the container its own.
    pub netns: Option<PathBuf>,
    /// Where stdout and stderr go, as CRI-format records written by `log_driver`.
    pub log: PathBuf,
    /// The logging binary the shim runs for the container (see [`crate::crilog`]). Required:
    /// the 1.6 shim's own `file://` logging, with both streams in one file, was seen to drop a
    /// stream's last line.
    pub log_driver: PathBuf,
    /// runc's state directory (`--root`); `None` uses the shim's default
    /// (`/run/containerd/runc/<namespace>`), shared with every containerd on the machine.
    pub runc_root: Option<PathBuf>,
    /// Bind mounts (volumes, `/etc/hosts` and the like), in order.
    pub mounts: Vec<Mount>,
    /// cgroup limits and the OOM score.
    pub resources: Resources,
    /// Labels on the container record (how an agent finds its containers again).
    pub labels: std::collections::HashMap<String, String>,
}

/// A container containerd knows, with its labels and whether it has a task.
#[derive(Clone, Debug)]
pub struct Listed {
    /// Container id.
    pub id: String,
    /// Its labels.
    pub labels: std::collections::HashMap<String, String>,
    /// It has a task (running, or exited and not yet deleted: its exit status can be had).
    pub has_task: bool,
}

/// Every container in skiff's containerd namespace.
pub async fn list(ch: &Channel) -> Result<Vec<Listed>> {
    let containers = ContainersClient::new(ch.clone())
        .list(with_namespace!(ListContainersRequest::default(), NAMESPACE))
        .await
        .context("list containers")?
        .into_inner()
        .containers;
    let tasks = TasksClient::new(ch.clone())
        .list(with_namespace!(ListTasksRequest::default(), NAMESPACE))
        .await
        .context("list tasks")?
        .into_inner()
        .tasks;
    Ok(containers
        .into_iter()
        .map(|c| Listed {
            has_task: tasks.iter().any(|t| t.container_id == c.id || t.id == c.id),
            id: c.id,
            labels: c.labels,
        })
        .collect())
}

/// A container's cgroup settings (what the kubelet derives from requests and limits).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Resources {
    /// Memory limit in bytes, swap included (no swap); `None` is unlimited.
    pub memory_limit: Option<i64>,
    /// Relative CPU weight (cgroup v1 shares; runc maps them to a v2 weight).
    pub cpu_shares: Option<u64>,
    /// CPU time per period in microseconds; `None` is unlimited.
    pub cpu_quota: Option<i64>,
    /// The quota's period in microseconds.
    pub cpu_period: Option<u64>,
    /// The processes' `oom_score_adj`.
    pub oom_score_adj: Option<i32>,
}

/// A bind mount into the container.
#[derive(Clone, Debug, PartialEq)]
pub struct Mount {
    /// Path on the host (a directory or a file).
    pub source: PathBuf,
    /// Absolute path in the container.
    pub destination: String,
    /// Mounted read-only.
    pub readonly: bool,
}

/// The runtime spec for `cfg` running `image`.
pub fn spec(cfg: &ContainerConfig, image: &ImageInfo) -> Result<Value> {
    let mut s = serde_json::to_value(Spec::default()).context("default runtime spec")?;
    let ic = &image.config;
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let args = if cfg.args.is_empty() {
        let mut a = strings(&ic["Entrypoint"]);
        a.extend(strings(&ic["Cmd"]));
        a
    } else {
        cfg.args.clone()
    };
    let mut env = strings(&ic["Env"]);
    env.extend(cfg.env.iter().cloned());
    let cwd = if !cfg.cwd.is_empty() {
        cfg.cwd.clone()
    } else {
        ic["WorkingDir"]
            .as_str()
            .filter(|w| !w.is_empty())
            .unwrap_or("/")
            .to_string()
    };
    s["process"]["args"] = json!(args);
    s["process"]["env"] = json!(env);
    s["process"]["cwd"] = json!(cwd);
    s["process"]["terminal"] = json!(false);
    s["root"] = json!({"path": "rootfs", "readonly": false});
    s["hostname"] = json!(if cfg.hostname.is_empty() {
        &cfg.id
    } else {
        &cfg.hostname
    });
    s["linux"]["cgroupsPath"] = json!(cgroup_path(&cfg.id));
    let r = &cfg.resources;
    let mut res = serde_json::Map::new();
    if let Some(l) = r.memory_limit {
        res.insert("memory".into(), json!({"limit": l, "swap": l}));
    }
    let mut cpu = serde_json::Map::new();
    if let Some(sh) = r.cpu_shares {
        cpu.insert("shares".into(), json!(sh));
    }
    if let Some(q) = r.cpu_quota {
        cpu.insert("quota".into(), json!(q));
        cpu.insert("period".into(), json!(r.cpu_period.unwrap_or(100_000)));
    }
    if !cpu.is_empty() {
        res.insert("cpu".into(), Value::Object(cpu));
    }
    if !res.is_empty() {
        let existing = s["linux"]["resources"].as_object_mut();
        match existing {
            Some(e) => e.extend(res),
            None => s["linux"]["resources"] = Value::Object(res),
        }
    }
    if let Some(adj) = r.oom_score_adj {
        s["process"]["oomScoreAdj"] = json!(adj);
    }
    if let Some(list) = s["mounts"].as_array_mut() {
        for m in &cfg.mounts {
            // A later mount of the same destination replaces a default one (e.g. /dev/shm).
            list.retain(|x| x["destination"] != m.destination.as_str());
            list.push(json!({
                "destination": m.destination,
                "type": "bind",
                "source": m.source.display().to_string(),
                "options": ["rbind", "rprivate", if m.readonly { "ro" } else { "rw" }],
            }));
        }
    }
    if let Some(ns) = &cfg.netns
        && let Some(list) = s["linux"]["namespaces"].as_array_mut()
    {
        for n in list.iter_mut() {
            if n["type"] == "network" {
                n["path"] = json!(ns.display().to_string());
            }
        }
    }
    // Validate by round trip through the typed spec.
    let typed: Spec = serde_json::from_value(s).context("runtime spec")?;
    serde_json::to_value(typed).context("runtime spec")
}

/// Creates the container (snapshot, record) and starts its task.
pub async fn start(ch: &Channel, cfg: &ContainerConfig, image: &ImageInfo) -> Result<u32> {
    let spec = spec(cfg, image)?;
    // Under a lease until the container record references the snapshot: containerd's garbage
    // collector may otherwise remove the fresh snapshot in between.
    let lease = crate::containerd::create_lease(ch).await?;
    let created = create(ch, cfg, image, spec, &lease).await;
    crate::containerd::delete_lease(ch, &lease).await;
    created?;
    start_task(ch, cfg).await
}

async fn create(
    ch: &Channel,
    cfg: &ContainerConfig,
    image: &ImageInfo,
    spec: Value,
    lease: &str,
) -> Result<()> {
    use crate::containerd::req;
    SnapshotsClient::new(ch.clone())
        .prepare(req(
            PrepareSnapshotRequest {
                snapshotter: SNAPSHOTTER.into(),
                key: cfg.id.clone(),
                parent: image.chain_id.clone(),
                ..Default::default()
            },
            lease,
        ))
        .await
        .with_context(|| format!("prepare the snapshot of container {}", cfg.id))?;
    let container = Container {
        id: cfg.id.clone(),
        image: image.name.clone(),
        runtime: Some(Runtime {
            name: "io.containerd.runc.v2".into(),
            options: None,
        }),
        spec: Some(prost_types::Any {
            type_url: "types.containerd.io/opencontainers/runtime-spec/1/Spec".into(),
            value: serde_json::to_vec(&spec)?,
        }),
        snapshotter: SNAPSHOTTER.into(),
        snapshot_key: cfg.id.clone(),
        labels: cfg.labels.clone(),
        ..Default::default()
    };
    ContainersClient::new(ch.clone())
        .create(req(
            CreateContainerRequest {
                container: Some(container),
            },
            lease,
        ))
        .await
        .with_context(|| format!("create container {}", cfg.id))?;
    Ok(())
}

async fn start_task(ch: &Channel, cfg: &ContainerConfig) -> Result<u32> {
    let mounts = SnapshotsClient::new(ch.clone())
        .mounts(with_namespace!(
            MountsRequest {
                snapshotter: SNAPSHOTTER.into(),
                key: cfg.id.clone(),
            },
            NAMESPACE
        ))
        .await
        .with_context(|| format!("mounts of container {}", cfg.id))?
        .into_inner()
        .mounts;
    if let Some(d) = cfg.log.parent() {
        std::fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
    }
    if !cfg.log_driver.is_absolute() {
        bail!(
            "container {}: the logging binary must be given by an absolute path, not {:?}",
            cfg.id,
            cfg.log_driver
        );
    }
    let log_uri = crate::crilog::binary_uri(&cfg.log_driver, &cfg.log);
    let mut tasks = TasksClient::new(ch.clone());
    tasks
        .create(with_namespace!(
            CreateTaskRequest {
                container_id: cfg.id.clone(),
                rootfs: mounts,
                // The runc shim writes the log itself, or runs the logging binary (one URI takes
                // both streams), so output survives agent restarts. Both fields must be set:
                // the 1.6 shim crashes copying a stream whose URI is empty.
                stdout: log_uri.clone(),
                stderr: log_uri,
                options: cfg.runc_root.as_deref().map(runc_options),
                ..Default::default()
            },
            NAMESPACE
        ))
        .await
        .with_context(|| format!("create the task of container {}", cfg.id))?;
    let pid = tasks
        .start(with_namespace!(
            StartRequest {
                container_id: cfg.id.clone(),
                ..Default::default()
            },
            NAMESPACE
        ))
        .await
        .with_context(|| format!("start container {}", cfg.id))?
        .into_inner()
        .pid;
    Ok(pid)
}

/// The runc shim's `containerd.runc.v1.Options` with only `root` (field 7) set, encoded by hand:
/// the client crate does not ship the runc options types.
fn runc_options(root: &Path) -> prost_types::Any {
    let path = root.display().to_string().into_bytes();
    let mut value = vec![(7 << 3) | 2];
    let mut len = path.len();
    loop {
        let byte = (len & 0x7f) as u8;
        len >>= 7;
        if len == 0 {
            value.push(byte);
            break;
        }
        value.push(byte | 0x80);
    }
    value.extend(path);
    prost_types::Any {
        type_url: "containerd.runc.v1.Options".into(),
        value,
    }
}

/// Waits for the container's task to exit; returns its exit status.
pub async fn wait(ch: &Channel, id: &str) -> Result<u32> {
    wait_process(ch, id, "").await
}

/// Waits for process `exec_id` of container `id` (`""`: its task) to exit; returns its exit
/// status (128 + signal when killed).
pub(crate) async fn wait_process(ch: &Channel, id: &str, exec_id: &str) -> Result<u32> {
    let r = TasksClient::new(ch.clone())
        .wait(with_namespace!(
            WaitRequest {
                container_id: id.into(),
                exec_id: exec_id.into(),
            },
            NAMESPACE
        ))
        .await
        .with_context(|| format!("wait for process {exec_id:?} of container {id}"))?
        .into_inner();
    Ok(r.exit_status)
}

/// Sends `signal` to the container's processes.
pub async fn kill(ch: &Channel, id: &str, signal: u32) -> Result<()> {
    signal_process(ch, id, "", signal).await
}

/// Sends `signal` to process `exec_id` of container `id` (`""`: all of the task's
/// processes); a process that is gone already is fine.
pub(crate) async fn signal_process(
    ch: &Channel,
    id: &str,
    exec_id: &str,
    signal: u32,
) -> Result<()> {
    match TasksClient::new(ch.clone())
        .kill(with_namespace!(
            KillRequest {
                container_id: id.into(),
                exec_id: exec_id.into(),
                signal,
                all: exec_id.is_empty(),
            },
            NAMESPACE
        ))
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if e.code() == Code::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("signal process {exec_id:?} of container {id}")),
    }
}

/// Removes the container's task (it must have exited), record and snapshot; absent parts are
/// fine, so this is also the cleanup after a failed start.
pub async fn remove(ch: &Channel, id: &str) -> Result<()> {
    match TasksClient::new(ch.clone())
        .delete(with_namespace!(
            DeleteTaskRequest {
                container_id: id.into(),
            },
            NAMESPACE
        ))
        .await
    {
        Ok(_) => {}
        Err(e) if e.code() == Code::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("delete the task of container {id}")),
    }
    match ContainersClient::new(ch.clone())
        .delete(with_namespace!(
            DeleteContainerRequest { id: id.into() },
            NAMESPACE
        ))
        .await
    {
        Ok(_) => {}
        Err(e) if e.code() == Code::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("delete container {id}")),
    }
    match SnapshotsClient::new(ch.clone())
        .remove(with_namespace!(
            RemoveSnapshotRequest {
                snapshotter: SNAPSHOTTER.into(),
                key: id.into(),
            },
            NAMESPACE
        ))
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if e.code() == Code::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("remove the snapshot of container {id}")),
    }
}

/// The container's cgroup, relative to each hierarchy's root.
pub fn cgroup_path(id: &str) -> String {
    format!("/skiff/{id}")
}

/// Whether the kernel's OOM killer killed a process of the container (read before the
/// container is removed, which removes its cgroup): `memory.events` on cgroup v2,
/// `memory.oom_control` on v1.
pub fn oom_killed(id: &str) -> bool {
    let path = cgroup_path(id);
    let read = |p: String| std::fs::read_to_string(p).unwrap_or_default();
    let count = |text: String| {
        text.lines()
            .filter_map(|l| l.strip_prefix("oom_kill "))
            .filter_map(|n| n.trim().parse::<u64>().ok())
            .sum::<u64>()
    };
    count(read(format!("/sys/fs/cgroup{path}/memory.events")))
        + count(read(format!(
            "/sys/fs/cgroup/memory{path}/memory.oom_control"
        )))
        > 0
}

/// Where a container's log goes under `dir`.
pub fn log_path(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.log"))
}
