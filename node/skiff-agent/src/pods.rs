//! Pods bound to this node, run on containerd (the kubelet's pod workers, simplified).
//!
//! For each pod the API binds here (a watch with `spec.nodeName=<node>`): allocate an IP from
//! the node's pod CIDR, build the pod network, and run each container under a supervisor task
//! that restarts it as `restartPolicy` says, with upstream's back-off (10 s doubling to 5 min,
//! shown as `CrashLoopBackOff`), posting the pod's status (phase, conditions, container states,
//! pod IP) after every change. A pod being deleted has its containers stopped (SIGTERM, the
//! grace period, SIGKILL), its containers, network and IP removed, and only then its API object
//! deleted. Images come from containerd or are pulled per `imagePullPolicy`; a failed pull is
//! `ErrImagePull`, then `ImagePullBackOff`. Containers of an earlier run of the agent (found by
//! their labels when it starts) are adopted rather than started again.

use std::{
    collections::{HashMap, HashSet},
    net::Ipv4Addr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result};
use futures::StreamExt;
use k8s_openapi::{
    api::core::v1::{Container, Node, Pod},
    chrono::{SecondsFormat, Utc},
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, Preconditions},
    runtime::{WatchStreamExt, watcher},
};
use serde_json::{Value, json};
use skiff_net::{Netlink, ipam::Ipam, pod as podnet};
use skiff_runtime::{
    container::{self, ContainerConfig},
    image::ImageInfo,
    pull,
};
use tokio::task::JoinHandle;

use crate::{
    events::{Kind, Recorder},
    probes::{self, Verdict},
    volumes::{self, PodVolumes},
};

/// First back-off after a container exits (upstream's kubelet).
const BACKOFF_START: Duration = Duration::from_secs(10);
/// Longest back-off.
const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// A container that ran this long resets its back-off.
const BACKOFF_RESET: Duration = Duration::from_secs(600);

/// Container labels: how an agent finds the containers of an earlier run again.
const LABEL_POD_UID: &str = "io.kubernetes.pod.uid";
const LABEL_POD_NAME: &str = "io.kubernetes.pod.name";
const LABEL_POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";
const LABEL_CONTAINER: &str = "io.kubernetes.container.name";
const LABEL_ATTEMPT: &str = "skiff.dev/attempt";

/// Where things live on this node.
#[derive(Clone, Debug)]
pub struct PodConfig {
    /// Node name.
    pub node: String,
    /// The node's address (status.hostIP).
    pub node_ip: Ipv4Addr,
    /// Agent state (IPAM, logs).
    pub data_dir: PathBuf,
    /// Agent runtime state (pod netns, runc state).
    pub run_dir: PathBuf,
    /// Registries (`host:port`) reached over plain HTTP.
    pub insecure_registries: Vec<String>,
    /// How often configMap, secret, downwardAPI and projected volumes are brought up to date.
    pub volume_sync: Duration,
    /// The data path's programs for pod interfaces (none: pods get no service translation).
    pub datapath: Option<Arc<dyn PodDatapath>>,
    /// The cluster DNS address pods are pointed at (`--cluster-dns`).
    pub cluster_dns: Option<Ipv4Addr>,
    /// The agent's own DNS server, when it runs one (host-network pods use it).
    pub host_dns: Option<Ipv4Addr>,
}

/// Attaches the data path to a pod's network, and detaches it.
pub trait PodDatapath: Send + Sync + std::fmt::Debug {
    /// Attaches the pod programs to the pod's host-side interface and records the pod
    /// (`pod`) as an endpoint of this node (idempotent; replaces older programs and entries).
    fn attach(&self, net: &podnet::PodNetwork, pod: &Pod) -> Result<()>;
    /// Forgets the attachment of `host_if` and the endpoint at `ip` (the interface is gone or
    /// going).
    fn detach(&self, host_if: &str, ip: Option<Ipv4Addr>);
}

/// Normalises an image reference as Docker does (`busybox` → `docker.io/library/busybox:latest`).
pub fn normalize_image(name: &str) -> String {
    let (repo, tag) = match name.rsplit_once(':') {
        Some((r, t)) if !t.contains('/') => (r.to_string(), t.to_string()),
        _ => (name.to_string(), "latest".to_string()),
    };
    let first = repo.split('/').next().unwrap_or("");
    let has_registry =
        repo.contains('/') && (first.contains('.') || first.contains(':') || first == "localhost");
    let repo = if has_registry {
        repo
    } else if repo.contains('/') {
        format!("docker.io/{repo}")
    } else {
        format!("docker.io/library/{repo}")
    };
    format!("{repo}:{tag}")
}

#[derive(Clone, Debug, Default)]
struct ContainerStatus {
    id: String,
    restarts: u32,
    /// `running`, `waiting` or `terminated`, as a status JSON object.
    state: Value,
    last_state: Value,
    ready: bool,
    /// Running and past its startup probe.
    started: bool,
    image: String,
    image_id: String,
}

#[derive(Debug)]
struct PodState {
    namespace: String,
    name: String,
    ip: Option<Ipv4Addr>,
    started: String,
    containers: Vec<(String, ContainerStatus)>,
    init_containers: Vec<(String, ContainerStatus)>,
    restart_policy: String,
    qos_class: &'static str,
    /// Each pod condition's last status and when it took it.
    transitions: HashMap<String, (bool, String)>,
    /// The pod as last seen (for events).
    pod: Pod,
    workers: Vec<JoinHandle<()>>,
    stopping: bool,
}

/// Why a pod's container cannot be reached.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    /// This node runs no pod of that name.
    #[error("pod not found ({0:?})")]
    Pod(String),
    /// The pod has no running container of that name.
    #[error("container not found ({0:?})")]
    Container(String),
}

/// What a pod's containers run with.
#[derive(Clone, Debug)]
struct PodRun {
    uid: String,
    pod: Pod,
    netns: PathBuf,
    log_dir: PathBuf,
    volumes: PodVolumes,
}

/// Runs the pods of one node.
pub struct PodManager {
    client: Client,
    cfg: PodConfig,
    ch: containerd_client::tonic::transport::Channel,
    /// Images known to be in containerd, by normalised name.
    images: Mutex<HashMap<String, ImageInfo>>,
    ipam: Ipam,
    net: Netlink,
    pods: Mutex<HashMap<String, PodState>>,
    /// The node's allocatable CPU (cores), memory and ephemeral storage (bytes).
    allocatable: (f64, f64, f64),
    /// The lowest `oom_score_adj` containers may get (the agent's own).
    oom_floor: i32,
    /// This executable, the logging binary the shim runs with each container.
    log_driver: PathBuf,
    events: Recorder,
    /// Containers an earlier run of the agent left, by pod uid, as listed at start: what
    /// supervisors adopt (each takes its own out).
    leftovers: Mutex<HashMap<String, Vec<container::Listed>>>,
    /// Set when the agent stops: containers are left running for the next run, and a
    /// supervisor that loses containerd then does nothing to them.
    shutting_down: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for PodManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodManager")
            .field("node", &self.cfg.node)
            .finish()
    }
}

fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn short(uid: &str) -> &str {
    &uid[..uid.len().min(8)]
}

impl PodManager {
    /// Waits for the node's pod CIDR, then prepares the manager.
    pub async fn new(
        client: Client,
        cfg: PodConfig,
        ch: containerd_client::tonic::transport::Channel,
        images: Vec<ImageInfo>,
    ) -> Result<Arc<PodManager>> {
        let nodes: Api<Node> = Api::all(client.clone());
        let cidr = loop {
            let n = nodes.get(&cfg.node).await.context("read this node")?;
            if let Some(c) = n.spec.and_then(|s| s.pod_cidr).filter(|c| !c.is_empty()) {
                break c;
            }
            tracing::info!("waiting for the control plane to assign this node a pod CIDR");
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        let ipam = Ipam::open(&cfg.data_dir.join("ipam"), &cidr)?;
        std::fs::create_dir_all(cfg.run_dir.join("netns"))?;
        let images = images
            .into_iter()
            .map(|i| (normalize_image(&i.name), i))
            .collect();
        let m = crate::machine::Machine::read(&cfg.data_dir)?;
        #[allow(
            clippy::cast_precision_loss,
            reason = "machine sizes are far below 2^53"
        )]
        let allocatable = (m.cpus as f64, m.memory as f64, m.ephemeral_storage as f64);
        let events = Recorder::kubelet(client.clone(), cfg.node.clone());
        let mut leftovers: HashMap<String, Vec<container::Listed>> = HashMap::new();
        for l in container::list(&ch)
            .await
            .context("list the containers of earlier runs")?
        {
            if let Some(uid) = l.labels.get(LABEL_POD_UID).cloned() {
                leftovers.entry(uid).or_default().push(l);
            }
        }
        Ok(Arc::new(PodManager {
            shutting_down: std::sync::atomic::AtomicBool::new(false),
            leftovers: Mutex::new(leftovers),
            events,
            client,
            cfg,
            ch,
            images: Mutex::new(images),
            ipam,
            net: Netlink::connect()?,
            pods: Mutex::new(HashMap::new()),
            allocatable,
            oom_floor: crate::qos::own_oom_score_adj(),
            log_driver: std::env::current_exe()
                .context("this executable's path (the containers' logging binary)")?,
        }))
    }

    /// The agent is stopping: from now on supervisors leave their containers alone (they keep
    /// running under their shims and the next run adopts them). Call before containerd stops.
    pub fn shutdown(&self) {
        self.shutting_down
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The container's exit code. Losing containerd is not an exit: while the agent stops, the
    /// supervisor parks (the container runs on); otherwise the wait is retried a few times
    /// before the container counts as failed.
    async fn wait_exit(&self, id: &str) -> u32 {
        let mut tries = 0;
        loop {
            match container::wait(&self.ch, id).await {
                Ok(code) => return code,
                Err(_) if self.is_shutting_down() => std::future::pending::<()>().await,
                Err(e) if tries < 5 => {
                    tries += 1;
                    tracing::warn!(container = %id, error = format!("{e:#}"), "waiting for a container failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(_) => return 255,
            }
        }
    }

    /// The containerd id of `container` in pod `namespace/name` while it runs.
    pub fn running_container(
        &self,
        namespace: &str,
        name: &str,
        container: &str,
    ) -> Result<String, LookupError> {
        let pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
        let pod = pods
            .values()
            .find(|p| p.namespace == namespace && p.name == name && !p.stopping)
            .ok_or_else(|| LookupError::Pod(format!("{namespace}/{name}")))?;
        pod.containers
            .iter()
            .find(|(n, c)| n == container && !c.id.is_empty() && c.state.get("running").is_some())
            .map(|(_, c)| c.id.clone())
            .ok_or_else(|| LookupError::Container(container.to_string()))
    }

    /// The containerd connection.
    pub fn containerd(&self) -> &containerd_client::tonic::transport::Channel {
        &self.ch
    }

    /// Where exec sessions keep their FIFOs.
    pub fn exec_dir(&self) -> PathBuf {
        self.cfg.run_dir.join("exec")
    }

    fn netns_dir(&self) -> PathBuf {
        self.cfg.run_dir.join("netns")
    }

    fn log_dir(&self, pod: &Pod) -> PathBuf {
        self.cfg.data_dir.join("pods").join(format!(
            "{}_{}_{}",
            pod.namespace().unwrap_or_default(),
            pod.name_any(),
            pod.uid().unwrap_or_default()
        ))
    }

    /// Watches this node's pods until the process ends.
    pub async fn run(self: Arc<Self>) -> Result<()> {
        let api: Api<Pod> = Api::all(self.client.clone());
        let cfg = watcher::Config::default().fields(&format!("spec.nodeName={}", self.cfg.node));
        let mut events = watcher(api, cfg).default_backoff().boxed();
        // The pods of the current full list: after it, whatever this node holds for other
        // pods (deleted while the agent was down or the watch was broken) goes.
        let mut listed: HashSet<String> = HashSet::new();
        while let Some(ev) = events.next().await {
            let ev = match ev {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(error = %e, "pod watch error; retrying");
                    continue;
                }
            };
            match ev {
                watcher::Event::Apply(p) => self.clone().observe(p),
                watcher::Event::InitApply(p) => {
                    listed.extend(p.uid());
                    self.clone().observe(p);
                }
                watcher::Event::Delete(p) => {
                    // Force-deleted: stop what runs for it.
                    if let Some(uid) = p.uid() {
                        let me = self.clone();
                        tokio::spawn(async move { me.stop(&uid, 0, None).await });
                    }
                }
                watcher::Event::Init => listed.clear(),
                watcher::Event::InitDone => {
                    let gone: Vec<String> = {
                        let pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
                        pods.keys()
                            .filter(|u| !listed.contains(*u))
                            .cloned()
                            .collect()
                    };
                    for uid in gone {
                        let me = self.clone();
                        tokio::spawn(async move { me.stop(&uid, 0, None).await });
                    }
                    let (me, listed) = (self.clone(), listed.clone());
                    tokio::spawn(async move { me.collect_orphans(&listed).await });
                }
            }
        }
        Ok(())
    }

    fn observe(self: Arc<Self>, pod: Pod) {
        let Some(uid) = pod.uid() else { return };
        let deleting = pod.metadata.deletion_timestamp.is_some();
        let known = {
            let pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
            pods.get(&uid).map(|s| s.stopping)
        };
        match (known, deleting) {
            (None, false) => {
                let phase = pod
                    .status
                    .as_ref()
                    .and_then(|s| s.phase.clone())
                    .unwrap_or_default();
                if phase == "Succeeded" || phase == "Failed" {
                    return;
                }
                tokio::spawn(async move {
                    if let Err(e) = self.start(&pod).await {
                        tracing::warn!(pod = %pod.name_any(), error = format!("{e:#}"), "starting the pod failed");
                    }
                });
            }
            (Some(false), false) => {
                // Labels and annotations feed downward API volumes.
                if let Some(s) = self
                    .pods
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_mut(&uid)
                {
                    s.pod = pod;
                }
            }
            (_, true) if known != Some(true) => {
                let grace = pod.metadata.deletion_grace_period_seconds.unwrap_or(30);
                let ns = pod.namespace().unwrap_or_default();
                let name = pod.name_any();
                tokio::spawn(async move {
                    self.stop(&uid, grace, Some((ns, name))).await;
                });
            }
            _ => {}
        }
    }

    async fn start(self: &Arc<Self>, pod: &Pod) -> Result<()> {
        let uid = pod.uid().context("pod without uid")?;
        let spec = pod.spec.clone().context("pod without spec")?;
        let restart_policy = spec
            .restart_policy
            .clone()
            .unwrap_or_else(|| "Always".into());
        // What the API already shows (restart counts, the last termination) carries over: an
        // agent that restarts continues where the previous one left off.
        let previous = |name: &str, init: bool| {
            pod.status
                .as_ref()
                .and_then(|s| {
                    if init {
                        s.init_container_statuses.as_ref()
                    } else {
                        s.container_statuses.as_ref()
                    }
                })
                .and_then(|cs| cs.iter().find(|c| c.name == name))
                .and_then(|c| serde_json::to_value(c).ok())
                .unwrap_or_default()
        };
        let has_init = spec.init_containers.as_ref().is_some_and(|i| !i.is_empty());
        let statuses = |list: &[Container], init: bool| -> Vec<(String, ContainerStatus)> {
            list.iter()
                .map(|c| {
                    let prev = previous(&c.name, init);
                    let running = prev.pointer("/state/running").is_some();
                    // A finished init container stays finished.
                    let done =
                        init && prev.pointer("/state/terminated/exitCode") == Some(&json!(0));
                    (
                        c.name.clone(),
                        ContainerStatus {
                            image: c.image.clone().unwrap_or_default(),
                            restarts: prev["restartCount"]
                                .as_u64()
                                .and_then(|n| u32::try_from(n).ok())
                                .unwrap_or(0),
                            last_state: prev.get("lastState").cloned().unwrap_or_default(),
                            image_id: prev["imageID"].as_str().unwrap_or_default().to_string(),
                            state: if running || done {
                                prev["state"].clone()
                            } else if has_init {
                                json!({"waiting": {"reason": "PodInitializing"}})
                            } else {
                                json!({"waiting": {"reason": "ContainerCreating"}})
                            },
                            ready: done,
                            ..Default::default()
                        },
                    )
                })
                .collect()
        };
        let containers = statuses(&spec.containers, false);
        let init_containers = statuses(spec.init_containers.as_deref().unwrap_or(&[]), true);
        let started = pod
            .status
            .as_ref()
            .and_then(|s| s.start_time.as_ref())
            .map_or_else(now, |t| t.0.to_rfc3339_opts(SecondsFormat::Secs, true));
        {
            let mut pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
            if pods.contains_key(&uid) {
                return Ok(());
            }
            pods.insert(
                uid.clone(),
                PodState {
                    namespace: pod.namespace().unwrap_or_default(),
                    name: pod.name_any(),
                    ip: None,
                    started,
                    containers,
                    init_containers,
                    restart_policy,
                    qos_class: crate::qos::qos_class(pod),
                    transitions: pod
                        .status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .map(|cs| {
                            cs.iter()
                                .filter_map(|c| {
                                    let t = c.last_transition_time.as_ref()?;
                                    Some((
                                        c.type_.clone(),
                                        (
                                            c.status == "True",
                                            t.0.to_rfc3339_opts(SecondsFormat::Secs, true),
                                        ),
                                    ))
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                    pod: pod.clone(),
                    workers: Vec::new(),
                    stopping: false,
                },
            );
        }
        let ip = self.ipam.allocate(&uid)?;
        let net = match podnet::adopt(&self.net, &self.netns_dir(), &uid, ip).await {
            Some(net) => {
                tracing::info!(pod = %pod.name_any(), %ip, "kept the pod network of an earlier run");
                net
            }
            None => podnet::setup(&self.net, None, &self.netns_dir(), &uid, ip)
                .await
                .with_context(|| format!("pod network of {}", pod.name_any()))?,
        };
        if let Some(dp) = &self.cfg.datapath {
            dp.attach(&net, pod)
                .with_context(|| format!("data path on the network of {}", pod.name_any()))?;
        }
        {
            let mut pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(s) = pods.get_mut(&uid) {
                s.ip = Some(ip);
            }
        }
        self.post_status(&uid).await;
        let Some(volumes) = self.prepare_volumes(pod, &uid, ip).await else {
            return Ok(());
        };
        let run = PodRun {
            uid: uid.clone(),
            pod: pod.clone(),
            netns: net.netns.clone(),
            log_dir: self.log_dir(pod),
            volumes,
        };
        let h = tokio::spawn(self.clone().run_pod(run));
        self.add_worker(&uid, h);
        Ok(())
    }

    fn add_worker(&self, uid: &str, h: JoinHandle<()>) {
        let mut pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
        match pods.get_mut(uid) {
            Some(s) => s.workers.push(h),
            None => h.abort(),
        }
    }

    /// Runs the pod's init containers one after another, each to success (retried with
    /// back-off unless `restartPolicy` is `Never`, when a failure fails the pod), then its
    /// containers.
    async fn run_pod(self: Arc<Self>, run: PodRun) {
        let spec = run.pod.spec.clone().unwrap_or_default();
        for c in spec.init_containers.iter().flatten() {
            let done = {
                let pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
                pods.get(&run.uid)
                    .and_then(|s| s.init_containers.iter().find(|(n, _)| *n == c.name))
                    .is_some_and(|(_, st)| st.state["terminated"]["exitCode"] == 0)
            };
            if done {
                continue;
            }
            let code = self.clone().supervise(&run, c.clone(), true).await;
            if code != 0 {
                return;
            }
        }
        for c in &spec.containers {
            let (me, each, c) = (self.clone(), run.clone(), c.clone());
            let h = tokio::spawn(async move {
                me.supervise(&each, c, false).await;
            });
            self.add_worker(&run.uid, h);
        }
        // Projected data follows its sources, at the kubelet's sync period.
        let projected = spec.volumes.iter().flatten().any(|v| {
            v.config_map.is_some()
                || v.secret.is_some()
                || v.downward_api.is_some()
                || v.projected.is_some()
        });
        if projected {
            let root = volumes::pod_root(&self.cfg.data_dir, &run.uid);
            let mut tick = tokio::time::interval(self.cfg.volume_sync);
            tick.tick().await;
            loop {
                tick.tick().await;
                let pod = {
                    let pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
                    match pods.get(&run.uid) {
                        Some(s) if !s.stopping => s.pod.clone(),
                        _ => return,
                    }
                };
                let rt = self.runtime(&run.uid);
                for name in volumes::refresh(&self.client, &pod, &rt, &root).await {
                    tracing::info!(pod = %pod.name_any(), volume = %name, "updated a volume");
                }
            }
        }
    }

    fn runtime(&self, uid: &str) -> crate::env::Runtime {
        let pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
        crate::env::Runtime {
            pod_ip: pods
                .get(uid)
                .and_then(|s| s.ip)
                .map(|ip| ip.to_string())
                .unwrap_or_default(),
            host_ip: self.cfg.node_ip.to_string(),
            allocatable: self.allocatable,
            cluster_dns: self.cfg.cluster_dns.map(|ip| ip.to_string()),
            host_dns: self.cfg.host_dns.map(|ip| ip.to_string()),
        }
    }

    /// Prepares the pod's volumes, retrying with back-off while one cannot be set up (the
    /// containers wait in `ContainerCreating` with the reason); `None` if the pod went away
    /// meanwhile.
    async fn prepare_volumes(&self, pod: &Pod, uid: &str, ip: Ipv4Addr) -> Option<PodVolumes> {
        let root = volumes::pod_root(&self.cfg.data_dir, uid);
        let mut rt = self.runtime(uid);
        rt.pod_ip = ip.to_string();
        let mut backoff = Duration::from_millis(500);
        loop {
            let err = match volumes::prepare(&self.client, pod, &rt, &root).await {
                Ok(v) => return Some(v),
                Err(e) => e,
            };
            tracing::info!(pod = %pod.name_any(), error = %err, "volumes not ready");
            self.events
                .pod(pod, None, Kind::Warning, "FailedMount", &err);
            {
                let mut pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
                let s = pods.get_mut(uid).filter(|s| !s.stopping)?;
                for (_, c) in &mut s.containers {
                    c.state = json!({"waiting": {"reason": "ContainerCreating", "message": err}});
                }
            }
            self.post_status(uid).await;
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }

    fn set_container(&self, uid: &str, name: &str, f: impl FnOnce(&mut ContainerStatus)) {
        let mut pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = pods.get_mut(uid).and_then(|s| {
            s.containers
                .iter_mut()
                .chain(s.init_containers.iter_mut())
                .find(|(n, _)| n == name)
        }) {
            f(&mut c.1);
        }
    }

    /// Runs one container for as long as its pod lives, restarting it per `restartPolicy` (an
    /// init container only after a failure); returns its last exit code once it is not
    /// restarted.
    async fn supervise(self: Arc<Self>, run: &PodRun, c: Container, init: bool) -> u32 {
        let (uid, pod, netns, log_dir, volumes) = (
            run.uid.as_str(),
            run.pod.clone(),
            &run.netns,
            &run.log_dir,
            &run.volumes,
        );
        let policy = {
            let pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
            let p = pods
                .get(uid)
                .map(|s| s.restart_policy.clone())
                .unwrap_or_default();
            if init && p != "Never" {
                "OnFailure".to_string()
            } else {
                p
            }
        };
        let mut backoff = BACKOFF_START;
        // A container of an earlier run of the agent that still runs is adopted, not restarted.
        let (mut adopted, mut attempt) = self.adoptable(uid, &c.name).await;
        loop {
            let (id, image_id, launched) = if let Some(id) = adopted.take() {
                let image_id = {
                    let pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
                    pods.get(uid)
                        .and_then(|s| {
                            s.containers
                                .iter()
                                .chain(s.init_containers.iter())
                                .find(|(n, _)| *n == c.name)
                        })
                        .map(|(_, s)| s.image_id.clone())
                        .unwrap_or_default()
                };
                tracing::info!(pod = %pod.name_any(), container = %c.name, %id, "adopted a container of an earlier run");
                (id, image_id, Ok(false))
            } else {
                let image = match self.ensure_image(&pod, &c).await {
                    Ok(i) => i,
                    Err((reason, msg)) => {
                        self.set_container(uid, &c.name, |s| {
                            s.state = json!({"waiting": {"reason": reason, "message": msg}});
                        });
                        self.post_status(uid).await;
                        if reason == "ErrImagePull" {
                            // As the kubelet: the failure first, then the back-off before the
                            // next pull.
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            let msg = format!(
                                "Back-off pulling image {:?}",
                                c.image.clone().unwrap_or_default()
                            );
                            self.events
                                .pod(&pod, Some(&c.name), Kind::Normal, "BackOff", &msg);
                            self.set_container(uid, &c.name, |s| {
                                s.state = json!({"waiting": {"reason": "ImagePullBackOff", "message": msg}});
                            });
                            self.post_status(uid).await;
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                        continue;
                    }
                };
                let id = format!("{}-{}-{attempt}", short(uid), c.name);
                let labels = [
                    (LABEL_POD_UID, uid.to_string()),
                    (LABEL_POD_NAME, pod.name_any()),
                    (LABEL_POD_NAMESPACE, pod.namespace().unwrap_or_default()),
                    (LABEL_CONTAINER, c.name.clone()),
                    (LABEL_ATTEMPT, attempt.to_string()),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
                let mut args: Vec<String> = c.command.clone().unwrap_or_default();
                if args.is_empty() && c.args.is_some() {
                    args = image.config["Entrypoint"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(|x| x.as_str().map(str::to_string))
                                .collect()
                        })
                        .unwrap_or_default();
                }
                args.extend(c.args.clone().unwrap_or_default());
                let rt = self.runtime(uid);
                let built = match crate::env::build(&self.client, &pod, &c, &rt).await {
                    Ok(env) => volumes.mounts(&c).and_then(|m| {
                        crate::qos::resources(&pod, &c, self.allocatable.1, self.oom_floor)
                            .map(|r| (env, m, r))
                    }),
                    Err(e) => Err(e),
                };
                let (env, mounts, resources) = match built {
                    Ok(x) => x,
                    Err(msg) => {
                        self.set_container(uid, &c.name, |s| {
                        s.state = json!({"waiting": {"reason": "CreateContainerConfigError", "message": msg}});
                    });
                        self.post_status(uid).await;
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                        continue;
                    }
                };
                let cfg = ContainerConfig {
                    id: id.clone(),
                    args,
                    env,
                    cwd: c.working_dir.clone().unwrap_or_default(),
                    hostname: volumes::hostname(&pod),
                    netns: Some(netns.clone()),
                    log: log_dir.join(&c.name).join(format!("{attempt}.log")),
                    log_driver: self.log_driver.clone(),
                    runc_root: Some(self.cfg.run_dir.join("runc")),
                    mounts,
                    resources,
                    labels,
                };
                let launched = container::start(&self.ch, &cfg, &image).await.map(|_| true);
                (id, image.digest.clone(), launched)
            };
            let started = tokio::time::Instant::now();
            match launched {
                Ok(fresh) => {
                    if fresh {
                        for (reason, verb) in [("Created", "Created"), ("Started", "Started")] {
                            let msg = format!("{verb} container {}", c.name);
                            self.events
                                .pod(&pod, Some(&c.name), Kind::Normal, reason, &msg);
                        }
                    }
                    let past_startup = c.startup_probe.is_none();
                    let ready = past_startup && c.readiness_probe.is_none();
                    self.set_container(uid, &c.name, |s| {
                        s.id = id.clone();
                        if fresh || s.state.get("running").is_none() {
                            s.state = json!({"running": {"startedAt": now()}});
                        }
                        s.started = past_startup;
                        s.ready = ready;
                        s.image_id = image_id.clone();
                    });
                    self.post_status(uid).await;
                    if fresh
                        && let Some(h) = c.lifecycle.as_ref().and_then(|l| l.post_start.as_ref())
                        && let Some(t) = self.target(uid, &c, &id)
                        && let Err(e) = probes::hook(h, &t, Duration::from_secs(120)).await
                    {
                        let msg = format!("PostStartHook failed: {e}");
                        self.events.pod(
                            &pod,
                            Some(&c.name),
                            Kind::Warning,
                            "FailedPostStartHook",
                            &msg,
                        );
                        let _ = container::kill(&self.ch, &id, 9).await;
                    }
                    let prober = self.spawn_prober(uid, &pod, &c, &id);
                    let code = self.wait_exit(&id).await;
                    if let Some(p) = prober {
                        p.abort();
                    }
                    let reason = if container::oom_killed(&id) {
                        "OOMKilled"
                    } else if code == 0 {
                        "Completed"
                    } else {
                        "Error"
                    };
                    let finished_at = now();
                    self.set_container(uid, &c.name, |s| {
                        let st = s.state["running"]["startedAt"].clone();
                        s.state = json!({"terminated": {"exitCode": code, "reason": reason,
                            "startedAt": st, "finishedAt": finished_at,
                            "containerID": format!("containerd://{id}")}});
                        s.ready = false;
                        s.started = false;
                    });
                    self.remove_container(&id).await;
                    if started.elapsed() > BACKOFF_RESET {
                        backoff = BACKOFF_START;
                    }
                    let restart = match policy.as_str() {
                        "Never" => false,
                        "OnFailure" => code != 0,
                        _ => true,
                    };
                    if !restart {
                        self.post_status(uid).await;
                        return code;
                    }
                }
                Err(e) => {
                    self.remove_container(&id).await;
                    let msg = format!("{e:#}");
                    self.set_container(uid, &c.name, |s| {
                        s.state = json!({"terminated": {"exitCode": 128, "reason": "StartError", "message": msg}});
                    });
                    if policy == "Never" {
                        self.post_status(uid).await;
                        return 128;
                    }
                }
            }
            // Back off before the next start, shown as CrashLoopBackOff.
            self.events.pod(
                &pod,
                Some(&c.name),
                Kind::Warning,
                "BackOff",
                &format!(
                    "Back-off restarting failed container {} in pod {}",
                    c.name,
                    pod.name_any()
                ),
            );
            self.set_container(uid, &c.name, |s| {
                s.last_state = s.state.clone();
                s.restarts += 1;
                s.state = json!({"waiting": {"reason": "CrashLoopBackOff",
                    "message": format!("back-off {}s restarting failed container={}", backoff.as_secs(), c.name)}});
            });
            self.post_status(uid).await;
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
            attempt += 1;
        }
    }

    /// The image of container `c` per its pull policy: what containerd has (`IfNotPresent`,
    /// `Never`), else pulled from its registry with the pod's `imagePullSecrets`; `Err` is the
    /// waiting reason and message.
    async fn ensure_image(
        &self,
        pod: &Pod,
        c: &Container,
    ) -> Result<ImageInfo, (&'static str, String)> {
        let raw = c.image.clone().unwrap_or_default();
        let name = normalize_image(&raw);
        let policy = c.image_pull_policy.clone().unwrap_or_else(|| {
            if name.ends_with(":latest") {
                "Always"
            } else {
                "IfNotPresent"
            }
            .to_string()
        });
        if policy != "Always" {
            let known = self
                .images
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&name)
                .cloned();
            let present = match known {
                Some(i) => Some(i),
                None => skiff_runtime::image::local(&self.ch, &name)
                    .await
                    .ok()
                    .flatten(),
            };
            if let Some(i) = present {
                self.images
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(name, i.clone());
                let msg = format!("Container image {raw:?} already present on machine");
                self.events
                    .pod(pod, Some(&c.name), Kind::Normal, "Pulled", &msg);
                return Ok(i);
            }
            if policy == "Never" {
                let msg =
                    format!("Container image {raw:?} is not present with pull policy of Never");
                self.events
                    .pod(pod, Some(&c.name), Kind::Warning, "ErrImageNeverPull", &msg);
                return Err(("ErrImageNeverPull", msg));
            }
        }
        self.events.pod(
            pod,
            Some(&c.name),
            Kind::Normal,
            "Pulling",
            &format!("Pulling image {raw:?}"),
        );
        let auth = self.pull_auth(pod, &name).await;
        let t0 = std::time::Instant::now();
        match pull::pull(&self.ch, &name, &auth, &self.cfg.insecure_registries).await {
            Ok(i) => {
                self.images
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(name, i.clone());
                let msg = format!(
                    "Successfully pulled image {raw:?} in {:.3}s",
                    t0.elapsed().as_secs_f64()
                );
                self.events
                    .pod(pod, Some(&c.name), Kind::Normal, "Pulled", &msg);
                Ok(i)
            }
            Err(e) => {
                let msg = format!("failed to pull and unpack image {raw:?}: {e:#}");
                tracing::info!(pod = %pod.name_any(), error = %msg, "image pull failed");
                self.events.pod(
                    pod,
                    Some(&c.name),
                    Kind::Warning,
                    "Failed",
                    &format!("Failed to pull image {raw:?}: {msg}"),
                );
                Err(("ErrImagePull", msg))
            }
        }
    }

    /// Registry credentials for `image` from the pod's `imagePullSecrets`
    /// (`kubernetes.io/dockerconfigjson`, or the older `kubernetes.io/dockercfg`).
    async fn pull_auth(&self, pod: &Pod, image: &str) -> pull::RegistryAuth {
        let registry = pull::registry_of(image);
        let ns = pod.namespace().unwrap_or_default();
        let secrets: Api<k8s_openapi::api::core::v1::Secret> =
            Api::namespaced(self.client.clone(), &ns);
        let names = pod
            .spec
            .as_ref()
            .and_then(|s| s.image_pull_secrets.clone())
            .unwrap_or_default();
        for r in names {
            let Ok(Some(secret)) = secrets.get_opt(&r.name).await else {
                continue;
            };
            let data = secret.data.unwrap_or_default();
            let doc = if let Some(d) = data.get(".dockerconfigjson") {
                d.0.clone()
            } else if let Some(d) = data.get(".dockercfg") {
                let auths: Value = serde_json::from_slice(&d.0).unwrap_or_default();
                serde_json::to_vec(&json!({ "auths": auths })).unwrap_or_default()
            } else {
                continue;
            };
            if let Some(a) = pull::auth_from_docker_config(&doc, &registry) {
                return a;
            }
        }
        pull::RegistryAuth::Anonymous
    }

    /// The container of an earlier run for container `name` of pod `uid` (the newest attempt
    /// that has a task: running, or exited while no agent watched, so that its exit counts),
    /// and the attempt number to use next; other leftovers of it are removed.
    async fn adoptable(&self, uid: &str, name: &str) -> (Option<String>, u32) {
        let listed: Vec<container::Listed> = {
            let mut leftovers = self.leftovers.lock().unwrap_or_else(|p| p.into_inner());
            let Some(of_pod) = leftovers.get_mut(uid) else {
                return (None, 0);
            };
            let (mine, rest) = std::mem::take(of_pod)
                .into_iter()
                .partition(|l| l.labels.get(LABEL_CONTAINER).map(String::as_str) == Some(name));
            *of_pod = rest;
            mine
        };
        let mine: Vec<(u32, &container::Listed)> = listed
            .iter()
            .map(|l| {
                let a = l
                    .labels
                    .get(LABEL_ATTEMPT)
                    .and_then(|a| a.parse().ok())
                    .unwrap_or(0);
                (a, l)
            })
            .collect();
        let next = mine.iter().map(|(a, _)| a + 1).max().unwrap_or(0);
        let keep = mine
            .iter()
            .filter(|(_, l)| l.has_task)
            .max_by_key(|(a, _)| *a)
            .map(|(_, l)| l.id.clone());
        for (_, l) in &mine {
            if Some(&l.id) != keep.as_ref() {
                self.kill_container(&l.id, Duration::ZERO).await;
                let _ = container::remove(&self.ch, &l.id).await;
            }
        }
        (keep, next)
    }

    /// Removes whatever this node holds for pod `uid` without in-memory state (a pod deleted
    /// while the agent was down, or one it never started): containers, network, address,
    /// volumes.
    async fn cleanup_uid(&self, uid: &str) {
        if let Ok(listed) = container::list(&self.ch).await {
            for l in listed
                .iter()
                .filter(|l| l.labels.get(LABEL_POD_UID).map(String::as_str) == Some(uid))
            {
                self.kill_container(&l.id, Duration::ZERO).await;
                self.remove_container(&l.id).await;
            }
        }
        self.release(uid).await;
    }

    /// Removes a stopped container (task, record, snapshot).
    async fn remove_container(&self, id: &str) {
        if self.is_shutting_down() {
            // The next run adopts or collects it.
            return;
        }
        if let Err(e) = container::remove(&self.ch, id).await {
            tracing::warn!(container = %id, error = format!("{e:#}"), "removing a container failed");
        }
    }

    /// Releases what pod `uid` holds besides its containers: volumes, network, address.
    async fn release(&self, uid: &str) {
        volumes::teardown(&volumes::pod_root(&self.cfg.data_dir, uid));
        let ip = self.ipam.lookup(uid).ok().flatten();
        if let Some(dp) = &self.cfg.datapath {
            dp.detach(&podnet::host_if(uid), ip);
        }
        if let Err(e) = podnet::teardown(&self.net, &self.netns_dir(), uid).await {
            tracing::warn!(uid, error = %e, "pod network teardown failed");
        }
        if let Some(ip) = ip {
            let _ = self.ipam.release(ip);
        }
    }

    /// After the first full list of this node's pods: removes what earlier runs left for pods
    /// that no longer exist (containers, networks, addresses, volumes).
    async fn collect_orphans(&self, listed: &HashSet<String>) {
        let alive = |uid: &str| {
            listed.contains(uid)
                || self
                    .pods
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .contains_key(uid)
        };
        let mut orphans: HashSet<String> = HashSet::new();
        if let Ok(all) = container::list(&self.ch).await {
            orphans.extend(
                all.iter()
                    .filter_map(|l| l.labels.get(LABEL_POD_UID).cloned()),
            );
        }
        orphans.extend(podnet::existing(&self.netns_dir()));
        if let Ok(a) = self.ipam.allocations() {
            orphans.extend(a.into_iter().map(|(_, owner)| owner));
        }
        if let Ok(d) = std::fs::read_dir(self.cfg.data_dir.join("podstate")) {
            orphans.extend(
                d.filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned()),
            );
        }
        for uid in orphans.iter().filter(|u| !alive(u)) {
            tracing::info!(uid = %uid, "collecting what an earlier run left for a pod that is gone");
            self.cleanup_uid(uid).await;
        }
    }

    /// Where probes and hooks of container `c` (running as `id`) of pod `uid` go.
    fn target(&self, uid: &str, c: &Container, id: &str) -> Option<probes::Target> {
        let pod_ip = {
            let pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
            pods.get(uid).and_then(|s| s.ip)?
        };
        Some(probes::Target {
            pod_ip,
            container: c.clone(),
            container_id: id.to_string(),
            ch: self.ch.clone(),
            exec_dir: self.exec_dir(),
        })
    }

    /// Runs the `preStop` hook of container `c` (running as `id`) within `grace`; returns what
    /// is left of the grace period for SIGTERM.
    async fn pre_stop(
        &self,
        uid: &str,
        pod: &Pod,
        c: &Container,
        id: &str,
        grace: Duration,
    ) -> Duration {
        let Some(h) = c.lifecycle.as_ref().and_then(|l| l.pre_stop.as_ref()) else {
            return grace;
        };
        let Some(t) = self.target(uid, c, id) else {
            return grace;
        };
        let t0 = tokio::time::Instant::now();
        let failed = match tokio::time::timeout(grace, probes::hook(h, &t, grace)).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("PreStopHook failed: {e}")),
            Err(_) => Some(format!(
                "PreStopHook did not finish within the grace period ({}s)",
                grace.as_secs()
            )),
        };
        if let Some(msg) = failed {
            self.events
                .pod(pod, Some(&c.name), Kind::Warning, "FailedPreStopHook", &msg);
        }
        grace.saturating_sub(t0.elapsed())
    }

    /// Restarts a container whose startup or liveness probe failed: the `Killing` event, its
    /// `preStop` hook, SIGTERM, SIGKILL after `grace` seconds (the probe's, else the pod's).
    async fn restart_unhealthy(
        &self,
        uid: &str,
        pod: &Pod,
        c: &Container,
        id: &str,
        what: &str,
        grace: i64,
    ) {
        let msg = format!(
            "Container {} failed {what} probe, will be restarted",
            c.name
        );
        self.events
            .pod(pod, Some(&c.name), Kind::Normal, "Killing", &msg);
        let total = Duration::from_secs(u64::try_from(grace.max(0)).unwrap_or(0));
        let left = self.pre_stop(uid, pod, c, id, total).await;
        self.kill_container(id, left).await;
    }

    /// Starts the probes of container `c` (running as `id`), if it has any.
    fn spawn_prober(
        self: &Arc<Self>,
        uid: &str,
        pod: &Pod,
        c: &Container,
        id: &str,
    ) -> Option<JoinHandle<()>> {
        if c.startup_probe.is_none() && c.liveness_probe.is_none() && c.readiness_probe.is_none() {
            return None;
        }
        let target = self.target(uid, c, id)?;
        let grace = pod
            .spec
            .as_ref()
            .and_then(|s| s.termination_grace_period_seconds)
            .unwrap_or(30);
        let (me, uid, pod, c) = (self.clone(), uid.to_string(), pod.clone(), c.clone());
        Some(tokio::spawn(async move {
            me.probe(&uid, &pod, &c, &target, grace).await;
        }))
    }

    /// Runs a container's probes: the startup probe until it passes (a failure restarts the
    /// container), then liveness (a failure restarts it) and readiness (sets `ready`).
    async fn probe(&self, uid: &str, pod: &Pod, c: &Container, t: &probes::Target, grace: i64) {
        let unhealthy = |what: &str, e: &str| {
            self.events.pod(
                pod,
                Some(&c.name),
                Kind::Warning,
                "Unhealthy",
                &format!("{what} probe failed: {e}"),
            );
        };
        let restart = |what: &'static str, p: &k8s_openapi::api::core::v1::Probe| {
            self.restart_unhealthy(
                uid,
                pod,
                c,
                &t.container_id,
                what,
                p.termination_grace_period_seconds.unwrap_or(grace),
            )
        };
        if let Some(p) = &c.startup_probe {
            let v = probes::Runner::new(p)
                .next_change(t, |e| unhealthy("Startup", e))
                .await;
            if v != Verdict::Success {
                restart("startup", p).await;
                return;
            }
            let ready = c.readiness_probe.is_none();
            self.set_container(uid, &c.name, |s| {
                s.started = true;
                s.ready = ready;
            });
            self.post_status(uid).await;
        }
        let liveness = async {
            match &c.liveness_probe {
                Some(p) => {
                    let mut r = probes::Runner::new(p);
                    while r.next_change(t, |e| unhealthy("Liveness", e)).await == Verdict::Success {
                    }
                    restart("liveness", p).await;
                }
                None => std::future::pending().await,
            }
        };
        let readiness = async {
            match &c.readiness_probe {
                Some(p) => {
                    let mut r = probes::Runner::new(p);
                    loop {
                        let v = r.next_change(t, |e| unhealthy("Readiness", e)).await;
                        let ready = v == Verdict::Success;
                        self.set_container(uid, &c.name, |s| s.ready = ready);
                        self.post_status(uid).await;
                    }
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = liveness => {}
            () = readiness => {}
        }
    }

    /// Ends container `id`: SIGTERM, SIGKILL once `grace` has passed, then up to 5 s for it to
    /// go.
    async fn kill_container(&self, id: &str, grace: Duration) {
        let _ = container::kill(&self.ch, id, 15).await;
        if tokio::time::timeout(grace, self.wait_exit(id))
            .await
            .is_err()
            && !self.is_shutting_down()
        {
            let _ = container::kill(&self.ch, id, 9).await;
            let _ =
                tokio::time::timeout(Duration::from_secs(5), container::wait(&self.ch, id)).await;
        }
    }

    /// The pod's status from what this node knows.
    fn status(&self, uid: &str) -> Option<(String, String, Value)> {
        let mut pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
        let s = pods.get_mut(uid)?;
        let status_of = |(name, c): &(String, ContainerStatus)| {
            let mut v = json!({
                "name": name, "ready": c.ready, "restartCount": c.restarts,
                "image": c.image, "imageID": c.image_id, "state": c.state,
                "started": c.started && c.state.get("running").is_some(),
            });
            if !c.id.is_empty() {
                v["containerID"] = json!(format!("containerd://{}", c.id));
            }
            if !c.last_state.is_null() {
                v["lastState"] = c.last_state.clone();
            }
            v
        };
        let statuses: Vec<Value> = s.containers.iter().map(status_of).collect();
        let init_statuses: Vec<Value> = s.init_containers.iter().map(status_of).collect();
        let init_exit = |c: &ContainerStatus| c.state["terminated"]["exitCode"].as_i64();
        let initialized = s
            .init_containers
            .iter()
            .all(|(_, c)| init_exit(c) == Some(0));
        let init_failed = s.restart_policy == "Never"
            && s.init_containers
                .iter()
                .any(|(_, c)| init_exit(c).is_some_and(|e| e != 0));
        let all_ready = s.containers.iter().all(|(_, c)| c.ready);
        let terminated: Vec<i64> = s
            .containers
            .iter()
            .filter_map(|(_, c)| c.state["terminated"]["exitCode"].as_i64())
            .collect();
        let all_done = terminated.len() == s.containers.len()
            && (s.restart_policy == "Never"
                || (s.restart_policy == "OnFailure" && terminated.iter().all(|c| *c == 0)));
        let phase = if init_failed {
            "Failed"
        } else if !initialized {
            "Pending"
        } else if all_done {
            if terminated.iter().all(|c| *c == 0) {
                "Succeeded"
            } else {
                "Failed"
            }
        } else if s
            .containers
            .iter()
            .any(|(_, c)| c.state.get("running").is_some() || c.restarts > 0)
        {
            "Running"
        } else {
            "Pending"
        };
        let t = now();
        let wanted = [
            ("PodReadyToStartContainers", s.ip.is_some()),
            ("Initialized", initialized),
            ("Ready", all_ready && phase == "Running"),
            ("ContainersReady", all_ready),
            ("PodScheduled", true),
        ];
        // A condition's transition time moves only when its status does.
        let conditions: Vec<Value> = wanted
            .iter()
            .map(|(ty, ok)| {
                let since = match s.transitions.get(*ty) {
                    Some((was, at)) if was == ok => at.clone(),
                    _ => {
                        s.transitions.insert((*ty).to_string(), (*ok, t.clone()));
                        t.clone()
                    }
                };
                json!({"type": ty, "status": if *ok { "True" } else { "False" },
                       "lastProbeTime": null, "lastTransitionTime": since})
            })
            .collect();
        let mut st = json!({
            "phase": phase,
            "hostIP": self.cfg.node_ip.to_string(),
            "hostIPs": [{"ip": self.cfg.node_ip.to_string()}],
            "startTime": s.started,
            "conditions": conditions,
            "containerStatuses": statuses,
            "qosClass": s.qos_class,
        });
        if !init_statuses.is_empty() {
            st["initContainerStatuses"] = json!(init_statuses);
        }
        if let Some(ip) = s.ip {
            st["podIP"] = json!(ip.to_string());
            st["podIPs"] = json!([{"ip": ip.to_string()}]);
        }
        Some((s.namespace.clone(), s.name.clone(), st))
    }

    async fn post_status(&self, uid: &str) {
        let Some((ns, name, st)) = self.status(uid) else {
            return;
        };
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
        if let Err(e) = api
            .patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(&json!({"status": st})),
            )
            .await
        {
            tracing::debug!(pod = %name, error = %e, "posting pod status failed");
        }
    }

    /// Stops pod `uid`: SIGTERM, up to `grace` seconds, SIGKILL; removes its containers, network
    /// and IP; then deletes the API object (`api`: namespace and name) if asked.
    async fn stop(&self, uid: &str, grace: i64, api: Option<(String, String)>) {
        let taken = {
            let mut pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
            pods.get_mut(uid).map(|s| {
                s.stopping = true;
                let ids: Vec<String> = s
                    .containers
                    .iter()
                    .chain(s.init_containers.iter())
                    .map(|(_, c)| c.id.clone())
                    .filter(|i| !i.is_empty())
                    .collect();
                let running: Vec<(String, String)> = s
                    .containers
                    .iter()
                    .chain(s.init_containers.iter())
                    .filter(|(_, c)| c.state.get("running").is_some() && !c.id.is_empty())
                    .map(|(n, c)| (n.clone(), c.id.clone()))
                    .collect();
                (std::mem::take(&mut s.workers), ids, s.pod.clone(), running)
            })
        };
        let Some((workers, ids, pod, running)) = taken else {
            self.cleanup_uid(uid).await;
            if let Some((ns, name)) = api {
                self.delete_object(&ns, &name, uid).await;
            }
            return;
        };
        for w in &workers {
            w.abort();
        }
        for (n, _) in &running {
            self.events.pod(
                &pod,
                Some(n),
                Kind::Normal,
                "Killing",
                &format!("Stopping container {n}"),
            );
        }
        // preStop hooks of the running containers, together, within the grace period.
        let total = Duration::from_secs(u64::try_from(grace.max(0)).unwrap_or(0));
        let t0 = tokio::time::Instant::now();
        let spec = pod.spec.clone().unwrap_or_default();
        let hooks = running.iter().filter_map(|(name, id)| {
            let c = spec
                .containers
                .iter()
                .chain(spec.init_containers.iter().flatten())
                .find(|c| &c.name == name)?;
            Some(self.pre_stop(uid, &pod, c, id, total))
        });
        futures::future::join_all(hooks).await;
        // The rest of the grace period, for all of them at once.
        let left = total.saturating_sub(t0.elapsed());
        futures::future::join_all(ids.iter().map(|id| self.kill_container(id, left))).await;
        for id in &ids {
            self.remove_container(id).await;
        }
        self.release(uid).await;
        self.pods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(uid);
        if let Some((ns, name)) = api {
            self.delete_object(&ns, &name, uid).await;
        }
    }

    async fn delete_object(&self, ns: &str, name: &str, uid: &str) {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(uid.to_string()),
                resource_version: None,
            }),
            ..Default::default()
        };
        match api.delete(name, &dp).await {
            Ok(_) => tracing::info!(pod = %name, "pod stopped and deleted"),
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
            Err(e) => tracing::warn!(pod = %name, error = %e, "deleting the pod object failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_names_normalise_like_docker() {
        assert_eq!(
            normalize_image("busybox"),
            "docker.io/library/busybox:latest"
        );
        assert_eq!(
            normalize_image("busybox:1.36"),
            "docker.io/library/busybox:1.36"
        );
        assert_eq!(normalize_image("team/app"), "docker.io/team/app:latest");
        assert_eq!(
            normalize_image("localhost:5000/app:v1"),
            "localhost:5000/app:v1"
        );
        assert_eq!(
            normalize_image("skiff.test/busybox:1"),
            "skiff.test/busybox:1"
        );
    }
}
