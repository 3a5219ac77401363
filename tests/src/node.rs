//! A test node: a network namespace joined to this (the host's) namespace by a veth pair, so a
//! `skiff-node` inside it reaches a control plane listening on the host side, and a
//! `skiff-node` process running there. Everything is named uniquely and removed on drop.

use std::{
    net::Ipv4Addr,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU8, Ordering},
    time::Duration,
};

use skiff_net::{NetNs, Netlink, netns::DEFAULT_NETNS_DIR};

use crate::{bin, unique_name};

/// A node namespace and its link to the host.
#[derive(Debug)]
pub struct NodeNs {
    /// The namespace.
    pub ns: NetNs,
    /// Address of the host side (where the control plane listens).
    pub host_ip: Ipv4Addr,
    /// Address of the node side (the node's InternalIP).
    pub node_ip: Ipv4Addr,
    /// The host-side interface, for nodes linked straight to the host.
    host_if: Option<String>,
    /// The node's own end of its link (its uplink).
    pub uplink: String,
}

static NEXT: AtomicU8 = AtomicU8::new(1);

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

impl NodeNs {
    /// Creates the namespace and the link (10.200.<n>.1/30 on the host, .2/30 in the node).
    pub fn new() -> NodeNs {
        let n = (std::process::id() as u8)
            .wrapping_mul(7)
            .wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed));
        let host_ip = Ipv4Addr::new(10, 200, n, 1);
        let node_ip = Ipv4Addr::new(10, 200, n, 2);
        let ns = NetNs::create(Path::new(DEFAULT_NETNS_DIR), &unique_name("skiff-t-node"))
            .expect("node netns");
        let host_if = format!("skt{:x}{n:02x}", std::process::id() & 0xffff);
        let peer = format!("skp{:x}{n:02x}", std::process::id() & 0xffff);
        let node = NodeNs {
            ns,
            host_ip,
            node_ip,
            host_if: Some(host_if.clone()),
            uplink: peer.clone(),
        };
        rt().block_on(async {
            let host = Netlink::connect().expect("netlink");
            host.create_veth(&host_if, &peer).await.expect("veth");
            host.move_to(&peer, &node.ns).await.expect("move veth");
            host.add_address(&host_if, host_ip.into(), 30)
                .await
                .expect("host address");
            host.set_up(&host_if).await.expect("host up");
            let inner = Netlink::connect_in(&node.ns).expect("netlink in node");
            inner.set_up("lo").await.expect("lo");
            inner
                .add_address(&peer, node_ip.into(), 30)
                .await
                .expect("node address");
            inner.set_up(&peer).await.expect("node up");
        });
        node
    }
}

impl NodeNs {
    /// `program` to run inside the node's namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        enter_netns(
            &mut cmd,
            std::fs::File::open(self.ns.path()).expect("the node's namespace"),
        );
        cmd
    }

    /// Cuts the node off its network (`false`: its uplink down, as a pulled cable) or
    /// reconnects it.
    pub async fn set_connected(&self, connected: bool) {
        let inner = Netlink::connect_in(&self.ns).expect("netlink in node");
        if connected {
            inner.set_up(&self.uplink).await.expect("uplink up");
        } else {
            inner.set_down(&self.uplink).await.expect("uplink down");
        }
    }
}

impl Default for NodeNs {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for NodeNs {
    fn drop(&mut self) {
        if let Some(host_if) = &self.host_if {
            rt().block_on(async {
                if let Ok(h) = Netlink::connect() {
                    let _ = h.delete_link(host_if).await;
                }
            });
        }
        // Deleting the namespace deletes its end of each veth, and with it the other end.
        let _ = skiff_net::netns::remove_path(self.ns.path());
    }
}

/// A test LAN: a namespace holding a bridge that test nodes and the host attach to (one
/// 10.200.<k>.0/24 network), so nodes reach each other and the control plane directly, as
/// machines on one network do.
#[derive(Debug)]
pub struct Lan {
    ns: NetNs,
    /// The host's address on the LAN (where the control plane listens).
    pub host_ip: Ipv4Addr,
    subnet: u8,
    host_if: String,
    next: AtomicU8,
}

impl Lan {
    /// Creates the LAN and attaches the host to it.
    pub fn new() -> Lan {
        let k = (std::process::id() as u8)
            .wrapping_mul(13)
            .wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed));
        let ns = NetNs::create(Path::new(DEFAULT_NETNS_DIR), &unique_name("skiff-t-lan"))
            .expect("lan netns");
        let host_if = format!("skl{:x}{k:02x}", std::process::id() & 0xffff);
        let peer = format!("slp{:x}{k:02x}", std::process::id() & 0xffff);
        let lan = Lan {
            ns,
            host_ip: Ipv4Addr::new(10, 200, k, 1),
            subnet: k,
            host_if: host_if.clone(),
            next: AtomicU8::new(10),
        };
        rt().block_on(async {
            let inner = Netlink::connect_in(&lan.ns).expect("netlink in lan");
            inner.create_bridge("br0").await.expect("bridge");
            inner.set_up("br0").await.expect("bridge up");
            let host = Netlink::connect().expect("netlink");
            host.create_veth(&host_if, &peer).await.expect("veth");
            host.move_to(&peer, &lan.ns).await.expect("move veth");
            host.add_address(&host_if, lan.host_ip.into(), 24)
                .await
                .expect("host address");
            host.set_up(&host_if).await.expect("host up");
            inner.set_master(&peer, "br0").await.expect("attach");
            inner.set_up(&peer).await.expect("peer up");
        });
        lan
    }

    /// A node namespace on this LAN (10.200.<k>.10, .11, …).
    pub fn node(&self) -> NodeNs {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        let node_ip = Ipv4Addr::new(10, 200, self.subnet, i);
        let ns = NetNs::create(Path::new(DEFAULT_NETNS_DIR), &unique_name("skiff-t-node"))
            .expect("node netns");
        // Unique per process, LAN and node (several LANs may exist at once in one process).
        let (a, b) = (
            format!(
                "sna{:x}{:02x}{i:02x}",
                std::process::id() & 0xffff,
                self.subnet
            ),
            format!(
                "snb{:x}{:02x}{i:02x}",
                std::process::id() & 0xffff,
                self.subnet
            ),
        );
        rt().block_on(async {
            let host = Netlink::connect().expect("netlink");
            host.create_veth(&a, &b).await.expect("veth");
            host.move_to(&a, &ns).await.expect("to node");
            host.move_to(&b, &self.ns).await.expect("to lan");
            let lan = Netlink::connect_in(&self.ns).expect("netlink in lan");
            lan.set_master(&b, "br0").await.expect("attach");
            lan.set_up(&b).await.expect("up");
            let node = Netlink::connect_in(&ns).expect("netlink in node");
            node.set_up("lo").await.expect("lo");
            node.add_address(&a, node_ip.into(), 24)
                .await
                .expect("node address");
            node.set_up(&a).await.expect("node up");
        });
        NodeNs {
            ns,
            host_ip: self.host_ip,
            node_ip,
            host_if: None,
            uplink: a,
        }
    }
}

impl Default for Lan {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        rt().block_on(async {
            if let Ok(h) = Netlink::connect() {
                let _ = h.delete_link(&self.host_if).await;
            }
        });
        let _ = skiff_net::netns::remove_path(self.ns.path());
    }
}

/// Makes `cmd` run in the network namespace `ns` is open on.
fn enter_netns(cmd: &mut Command, ns: std::fs::File) {
    // SAFETY: the closure runs in the forked child before exec and only calls setns(2), which
    // is async-signal-safe; it owns the namespace's descriptor.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A `skiff-node` agent running in a [`NodeNs`], with its data and run directories. Dropping it
/// ends the agent (by PID), then runs `skiff-node reset` for what it left (containers, its
/// containerd and shims, mounts, pins).
#[derive(Debug)]
pub struct NodeAgent {
    child: Option<Child>,
    /// Node name.
    pub name: String,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// Its run directory (short: containerd's socket path is limited).
    pub run_dir: PathBuf,
    /// Its log file.
    pub log: PathBuf,
    binary: PathBuf,
    kubeconfig: PathBuf,
    images: Vec<PathBuf>,
    /// The node's namespace (its path), once started.
    netns: Option<PathBuf>,
    extra: Vec<String>,
}

impl NodeAgent {
    /// Starts `skiff-node` in `node` with `kubeconfig`, importing `images`.
    pub fn start(
        node: &NodeNs,
        kubeconfig: &Path,
        scratch: &Path,
        images: &[PathBuf],
    ) -> NodeAgent {
        Self::start_with(node, kubeconfig, scratch, images, &[])
    }

    /// [`NodeAgent::start`] with extra `skiff-node` arguments.
    pub fn start_with(
        node: &NodeNs,
        kubeconfig: &Path,
        scratch: &Path,
        images: &[PathBuf],
        extra: &[&str],
    ) -> NodeAgent {
        Self::start_binary(&bin("skiff-node"), node, kubeconfig, scratch, images, extra)
    }

    /// [`NodeAgent::start_with`] running the `skiff-node` at `binary` (a benchmark's release
    /// build).
    pub fn start_binary(
        binary: &Path,
        node: &NodeNs,
        kubeconfig: &Path,
        scratch: &Path,
        images: &[PathBuf],
        extra: &[&str],
    ) -> NodeAgent {
        let name = unique_name("node");
        let mut agent = NodeAgent {
            child: None,
            data_dir: scratch.join(format!("{name}-data")),
            run_dir: PathBuf::from(format!("/tmp/{}", unique_name("skn"))),
            log: scratch.join(format!("{name}.log")),
            name,
            binary: binary.to_path_buf(),
            kubeconfig: kubeconfig.to_path_buf(),
            images: images.to_vec(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            netns: None,
        };
        agent.spawn(node);
        agent
    }

    /// The agent's PID while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the agent with SIGKILL, as a crash would (its containers keep running).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the agent again with the same name, directories and arguments (its log grows).
    pub fn restart(&mut self, node: &NodeNs) {
        self.stop();
        self.spawn(node);
    }

    fn spawn(&mut self, node: &NodeNs) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("agent log");
        let mut cmd = Command::new(&self.binary);
        cmd.args(["--node-name", &self.name])
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--run-dir")
            .arg(&self.run_dir)
            .args(["--node-ip", &node.node_ip.to_string()])
            // Volume updates show within a test's patience.
            .args(["--volume-sync-period", "1s"])
            .env("RUST_LOG", "info,skiff_agent=debug")
            .stdout(Stdio::null())
            .stderr(log);
        cmd.args(&self.extra);
        for i in &self.images {
            cmd.arg("--import-image").arg(i);
        }
        self.netns = Some(node.ns.path().to_path_buf());
        enter_netns(
            &mut cmd,
            std::fs::File::open(node.ns.path()).expect("the node's namespace"),
        );
        self.child = Some(cmd.spawn().expect("start skiff-node"));
    }

    /// `skiff-node reset` for this agent's node and directories, run in the node's namespace.
    pub fn reset_command(&self) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.args(["--node-name", &self.name])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--run-dir")
            .arg(&self.run_dir)
            .arg("reset");
        if let Some(ns) = self
            .netns
            .as_ref()
            .and_then(|p| std::fs::File::open(p).ok())
        {
            enter_netns(&mut cmd, ns);
        }
        cmd
    }

    /// `skiff-node <args…>` for this agent's node (name, run directory) — the CLI beside it.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(&self.binary)
            .args(["--node-name", &self.name])
            .arg("--run-dir")
            .arg(&self.run_dir)
            .args(args)
            .output()
            .expect("run skiff-node")
    }

    /// The agent's recent policy flows (`skiff-node flows -o json --last 100000 <args…>`).
    pub fn flows(&self, args: &[&str]) -> Vec<serde_json::Value> {
        let mut all = vec!["flows", "-o", "json", "--last", "100000"];
        all.extend_from_slice(args);
        let out = self.cli(&all);
        assert!(
            out.status.success(),
            "skiff-node flows: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("a flow is one JSON object per line"))
            .collect()
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Ends the agent (SIGTERM, then SIGKILL after 10 s) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            crate::stop_child(&mut c, Duration::from_secs(10));
        }
    }
}

impl Drop for NodeAgent {
    fn drop(&mut self) {
        self.stop();
        // Whatever the agent left (a failed test may not have deleted its pods): containers,
        // its containerd and shims, mounts, pins — `skiff-node reset`, in the node's namespace
        // while it exists (its routes live there).
        let _ = self.reset_command().output();
    }
}

/// A control plane and `n` real nodes on a test LAN, each agent with the busybox test image.
#[derive(Debug)]
pub struct LanCluster {
    /// The node namespaces, in agent order.
    pub nodes: Vec<NodeNs>,
    /// Their agents.
    pub agents: Vec<NodeAgent>,
    /// The control plane (listening on the LAN).
    pub cp: crate::control::ControlPlane,
    lan: Lan,
}

impl LanCluster {
    /// A namespace on the cluster's LAN with no agent: a machine outside the cluster.
    pub fn outside(&self) -> NodeNs {
        self.lan.node()
    }

    /// Runs `body` on a control plane and `n` nodes, waiting first until every node is Ready.
    /// On failure it prints the pods, events and every agent's log; it cleans up either way.
    pub fn run(n: usize, body: impl FnOnce(&mut LanCluster)) {
        let lan = Lan::new();
        let nodes: Vec<NodeNs> = (0..n).map(|_| lan.node()).collect();
        let cp = crate::control::ControlPlane::start_on(lan.host_ip);
        let archive = cp.busybox_archive();
        let kubeconfig = cp.scratch().join("data/node.kubeconfig");
        let agents = nodes
            .iter()
            .map(|node| {
                // The uplink named: `xdp-uplink` (the NodePort fast path) and `from-netdev`.
                NodeAgent::start_with(
                    node,
                    &kubeconfig,
                    cp.scratch(),
                    std::slice::from_ref(&archive),
                    &["--uplink", &node.uplink],
                )
            })
            .collect();
        let mut cluster = LanCluster {
            nodes,
            agents,
            cp,
            lan,
        };
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            for a in &cluster.agents {
                cluster.cp.eventually(60, "every node Ready", || {
                    let out = cluster.cp.kubectl(&[
                        "get",
                        "node",
                        &a.name,
                        "-o",
                        "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
                    ]);
                    out.stdout == b"True"
                });
            }
            body(&mut cluster)
        }));
        if outcome.is_err() {
            let show = |args: &[&str]| {
                String::from_utf8_lossy(&cluster.cp.kubectl(args).stdout).into_owned()
            };
            eprintln!(
                "pods:\n{}\nevents:\n{}",
                show(&["get", "pods", "-o", "wide"]),
                show(&["get", "events"])
            );
            for a in &cluster.agents {
                eprintln!("agent {} log:\n{}", a.name, a.log());
            }
        }
        for a in &mut cluster.agents {
            a.stop();
        }
        cluster.agents.clear();
        drop(cluster.lan);
        if let Err(p) = outcome {
            std::panic::resume_unwind(p);
        }
    }
}
