//! `up` and `down`: a local cluster on this machine.
//!
//! `up --nodes N` (default 1) runs the control plane — one `skiff-control` with its data in
//! `target/local-cluster/control` — and N node agents. Each node is a network namespace
//! (`skiff-local-<i>`) whose `eth0` is a veth to a bridge in the LAN namespace
//! (`skiff-local-lan`); the host is on that LAN as 10.213.0.1/24 (interface `skiff-lan0`,
//! where the API server listens), node `i` is 10.213.0.(10 + i). Every agent runs its own
//! containerd (state under `target/local-cluster/nodes/skiff-<i>`, runtime state under
//! `/run/skiff-local/skiff-<i>`), imports the demo image and runs the eBPF data path with
//! `eth0` as its uplink, so pods on different nodes reach each other and Services are routed
//! by eBPF across nodes, as on machines sharing a network.
//!
//! Every process is recorded by PID (`*.pid` next to its log) and ended by that PID;
//! `down` then runs `skiff-node reset` for each node (containers, containerd and shims,
//! mounts, routes, pins) and removes the namespaces and the host's veth. `down --purge` also
//! removes the data. Network set-up uses iproute2's `ip`, as a developer would by hand.

use std::{
    fs,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::util::{root, step};

/// The host's address on the local cluster's LAN; the API server listens here.
const HOST_IP: &str = "10.213.0.1";
const LAN_PREFIX: &str = "10.213.0";
const API_PORT: u16 = 6443;
/// Store ports, away from etcd's 2379/2380 (Debian's etcd-server, installed for the store
/// benchmark, may be running).
const PEER: &str = "127.0.0.1:7380";
const CLIENT: &str = "127.0.0.1:7379";
const LAN_NS: &str = "skiff-local-lan";
const HOST_IF: &str = "skiff-lan0";
/// Most nodes `up` runs (addresses .11 to .19, interface names).
pub const MAX_NODES: usize = 9;

fn dir() -> PathBuf {
    root().join("target/local-cluster")
}

fn node_name(i: usize) -> String {
    format!("skiff-{i}")
}

fn node_ns(i: usize) -> String {
    format!("skiff-local-{i}")
}

fn node_ip(i: usize) -> String {
    format!("{LAN_PREFIX}.{}", 10 + i)
}

fn run_dir(node: &str) -> PathBuf {
    PathBuf::from("/run/skiff-local").join(node)
}

fn data_dir(node: &str) -> PathBuf {
    dir().join("nodes").join(node)
}

/// A process `up` started: its PID file and what its command line must contain.
struct Proc {
    pid_file: PathBuf,
    marker: String,
}

impl Proc {
    fn control() -> Proc {
        Proc {
            pid_file: dir().join("control.pid"),
            marker: dir().join("control").display().to_string(),
        }
    }

    fn node(name: &str) -> Proc {
        Proc {
            pid_file: dir().join("nodes").join(format!("{name}.pid")),
            marker: data_dir(name).display().to_string(),
        }
    }

    /// The PID in the pid file, if that process is still the one we started.
    fn running(&self) -> Option<i32> {
        let pid: i32 = fs::read_to_string(&self.pid_file)
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        String::from_utf8_lossy(&cmdline)
            .contains(&self.marker)
            .then_some(pid)
    }

    /// SIGTERM, then waits up to `grace` (SIGKILL after it).
    fn stop(&self, what: &str, grace: Duration) -> Result<()> {
        let Some(pid) = self.running() else {
            let _ = fs::remove_file(&self.pid_file);
            return Ok(());
        };
        step(&format!("stop {what} (pid {pid})"));
        // SAFETY: kill(2) with a PID we started (checked against its command line).
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + grace;
        while Path::new(&format!("/proc/{pid}")).exists() {
            if Instant::now() > deadline {
                eprintln!("    {what} did not stop within {grace:?}: SIGKILL");
                // SAFETY: as above.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                std::thread::sleep(Duration::from_millis(200));
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = fs::remove_file(&self.pid_file);
        Ok(())
    }
}

/// Runs `ip` with `args`; fails with its message.
fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("run ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

/// The LAN: a bridge in its own namespace, the host attached as `HOST_IP`.
fn lan_up() -> Result<()> {
    if netns_exists(LAN_NS) {
        return Ok(());
    }
    step(&format!(
        "create the LAN ({LAN_PREFIX}.0/24, host {HOST_IP} on {HOST_IF})"
    ));
    ip(&["netns", "add", LAN_NS])?;
    ip(&["-n", LAN_NS, "link", "add", "br0", "type", "bridge"])?;
    ip(&["-n", LAN_NS, "link", "set", "br0", "up"])?;
    ip(&[
        "link", "add", HOST_IF, "type", "veth", "peer", "name", "host", "netns", LAN_NS,
    ])?;
    ip(&["-n", LAN_NS, "link", "set", "host", "master", "br0", "up"])?;
    ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", HOST_IF])?;
    ip(&["link", "set", HOST_IF, "up"])
}

/// Node `i`'s namespace, its `eth0` on the LAN and a default route through the host.
fn node_net_up(i: usize) -> Result<()> {
    let ns = node_ns(i);
    if netns_exists(&ns) {
        return Ok(());
    }
    let lan_if = format!("node{i}");
    ip(&["netns", "add", &ns])?;
    ip(&[
        "link", "add", "eth0", "netns", &ns, "type", "veth", "peer", "name", &lan_if, "netns",
        LAN_NS,
    ])?;
    ip(&["-n", LAN_NS, "link", "set", &lan_if, "master", "br0", "up"])?;
    ip(&["-n", &ns, "link", "set", "lo", "up"])?;
    ip(&[
        "-n",
        &ns,
        "addr",
        "add",
        &format!("{}/24", node_ip(i)),
        "dev",
        "eth0",
    ])?;
    ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
    ip(&["-n", &ns, "route", "add", "default", "via", HOST_IP])
}

/// Makes `cmd` run in network namespace `name` (`/run/netns/<name>`).
fn in_netns(cmd: &mut Command, name: &str) -> Result<()> {
    let ns = fs::File::open(Path::new("/run/netns").join(name))
        .with_context(|| format!("open namespace {name}"))?;
    // SAFETY: the closure runs in the forked child before exec and only calls setns(2), which
    // is async-signal-safe; it owns the namespace's descriptor, open until the command is
    // dropped.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

fn kubectl(kubeconfig: &Path) -> Command {
    let mut c = Command::new("kubectl");
    c.arg("--kubeconfig").arg(kubeconfig);
    c
}

/// Starts (or restarts) the control plane on the LAN address; returns the admin kubeconfig.
fn control_up(bin: &Path) -> Result<PathBuf> {
    let proc = Proc::control();
    if proc.running().is_some() {
        proc.stop(
            "the control plane, to restart it with the new build",
            Duration::from_secs(15),
        )?;
    }
    step("start the control plane (store, API server, scheduler, controllers)");
    let data = dir().join("control");
    fs::create_dir_all(&data).with_context(|| format!("create {}", data.display()))?;
    let log_path = dir().join("control.log");
    let log =
        fs::File::create(&log_path).with_context(|| format!("create {}", log_path.display()))?;
    let mut child = Command::new(bin.join("skiff-control"))
        .arg("--data-dir")
        .arg(&data)
        .args(["--api-listen", &format!("{HOST_IP}:{API_PORT}")])
        .args(["--tls-san", HOST_IP])
        .args(["--peer-listen", PEER, "--client-listen", CLIENT])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own process group: Ctrl-C in this terminal does not stop it; `down` does.
        .process_group(0)
        .spawn()
        .context("start skiff-control")?;
    fs::write(&proc.pid_file, child.id().to_string()).context("write the pid file")?;
    let kubeconfig = data.join("admin.kubeconfig");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = kubeconfig.exists()
            && kubectl(&kubeconfig)
                .args(["get", "--raw", "/readyz"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
        if ready {
            return Ok(kubeconfig);
        }
        if let Ok(Some(status)) = child.try_wait() {
            let _ = fs::remove_file(&proc.pid_file);
            bail!(
                "skiff-control exited during start ({status}); its log is {}:\n{}",
                log_path.display(),
                fs::read_to_string(&log_path).unwrap_or_default()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "skiff-control did not become ready in 30 s; see {}",
                log_path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Starts node `i`'s agent in its namespace (restarting one already running).
fn node_up(bin: &Path, i: usize, image: &Path) -> Result<()> {
    let name = node_name(i);
    let proc = Proc::node(&name);
    if proc.running().is_some() {
        proc.stop(
            &format!("node {name}, to restart it"),
            Duration::from_secs(30),
        )?;
    }
    step(&format!(
        "start node {name} ({}) with its own containerd",
        node_ip(i)
    ));
    let data = data_dir(&name);
    fs::create_dir_all(&data).with_context(|| format!("create {}", data.display()))?;
    let log_path = dir().join("nodes").join(format!("{name}.log"));
    let log =
        fs::File::create(&log_path).with_context(|| format!("create {}", log_path.display()))?;
    let mut cmd = Command::new(bin.join("skiff-node"));
    cmd.args(["--node-name", &name])
        .arg("--kubeconfig")
        .arg(dir().join("control/node.kubeconfig"))
        .arg("--data-dir")
        .arg(&data)
        .arg("--run-dir")
        .arg(run_dir(&name))
        .args(["--node-ip", &node_ip(i), "--uplink", "eth0"])
        .arg("--import-image")
        .arg(image)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0);
    in_netns(&mut cmd, &node_ns(i))?;
    let child = cmd.spawn().context("start skiff-node")?;
    fs::write(&proc.pid_file, child.id().to_string()).context("write the pid file")?;
    Ok(())
}

/// Waits until every node is Ready.
fn wait_ready(kubeconfig: &Path, nodes: usize) -> Result<()> {
    step(&format!("wait for {nodes} node(s) to be Ready"));
    let deadline = Instant::now() + Duration::from_secs(120);
    for i in 1..=nodes {
        let name = node_name(i);
        loop {
            let out = kubectl(kubeconfig)
                .args(["get", "node", &name, "-o"])
                .arg("jsonpath={.status.conditions[?(@.type==\"Ready\")].status}")
                .output()?;
            if out.stdout == b"True" {
                break;
            }
            if Proc::node(&name).running().is_none() {
                let log = dir().join("nodes").join(format!("{name}.log"));
                bail!(
                    "node {name} exited; its log is {}:\n{}",
                    log.display(),
                    tail(&log)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "node {name} not Ready after 120 s; see {}",
                    dir().join("nodes").join(format!("{name}.log")).display()
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    Ok(())
}

fn tail(path: &Path) -> String {
    let s = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// `cargo xtask up --nodes N` after the build: the control plane, N nodes, the demo.
pub fn up(bin: &Path, nodes: usize) -> Result<PathBuf> {
    if !(1..=MAX_NODES).contains(&nodes) {
        bail!("--nodes must be between 1 and {MAX_NODES}");
    }
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "the local cluster's nodes need root (network namespaces, BPF, containerd): \
             run `sudo -E cargo xtask up`"
        );
    }
    // Nodes of an earlier, larger cluster go first.
    for i in nodes + 1..=MAX_NODES {
        if Proc::node(&node_name(i)).running().is_some() || netns_exists(&node_ns(i)) {
            node_down(bin, i, false)?;
        }
    }
    fs::create_dir_all(dir().join("nodes"))?;
    let image = dir().join("busybox.tar");
    if !image.exists() {
        step("write the demo image (busybox, OCI archive)");
        let status = Command::new(bin.join("skiff-node"))
            .arg("test-image")
            .arg("--out")
            .arg(&image)
            .status()?;
        if !status.success() {
            bail!(
                "skiff-node test-image failed (is busybox-static installed? `cargo xtask setup`)"
            );
        }
    }
    lan_up()?;
    let kubeconfig = control_up(bin)?;
    for i in 1..=nodes {
        node_net_up(i)?;
        node_up(bin, i, &image)?;
    }
    wait_ready(&kubeconfig, nodes)?;
    // The host routes to every node's pods, as machines on a routed network do: pods reach the
    // API server (the `kubernetes` Service) and the host reaches pods.
    step("route the host to the nodes' pod networks");
    for i in 1..=nodes {
        let out = kubectl(&kubeconfig)
            .args([
                "get",
                "node",
                &node_name(i),
                "-o",
                "jsonpath={.spec.podCIDR}",
            ])
            .output()?;
        let cidr = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if cidr.is_empty() {
            bail!("node {} has no pod CIDR yet", node_name(i));
        }
        ip(&[
            "route",
            "replace",
            &cidr,
            "via",
            &node_ip(i),
            "dev",
            HOST_IF,
        ])?;
    }
    step("apply manifests/demo/");
    let status = kubectl(&kubeconfig)
        .args(["apply", "-f"])
        .arg(root().join("manifests/demo"))
        .status()?;
    if !status.success() {
        bail!("kubectl apply -f manifests/demo failed");
    }
    step("wait for the demo to be available");
    let status = kubectl(&kubeconfig)
        .args([
            "-n",
            "demo",
            "wait",
            "--for=condition=Available",
            "deployment/web",
            "deployment/client",
            "--timeout=120s",
        ])
        .status()?;
    if !status.success() {
        bail!("the demo did not become available; `kubectl -n demo describe pods` says why");
    }
    Ok(kubeconfig)
}

/// Stops node `i` and removes what it created.
fn node_down(bin: &Path, i: usize, purge: bool) -> Result<()> {
    let name = node_name(i);
    Proc::node(&name).stop(&format!("node {name}"), Duration::from_secs(30))?;
    let ns = node_ns(i);
    if netns_exists(&ns) {
        step(&format!(
            "reset node {name} (containers, containerd, mounts, pins)"
        ));
        let mut cmd = Command::new(bin.join("skiff-node"));
        cmd.args(["--node-name", &name])
            .arg("--data-dir")
            .arg(data_dir(&name))
            .arg("--run-dir")
            .arg(run_dir(&name))
            .arg("reset");
        if purge {
            cmd.arg("--purge");
        }
        in_netns(&mut cmd, &ns)?;
        let status = cmd.status().context("run skiff-node reset")?;
        if !status.success() {
            bail!("skiff-node reset for {name} failed (see above)");
        }
        step(&format!("remove namespace {ns}"));
        ip(&["netns", "del", &ns])?;
    }
    if purge {
        let _ = fs::remove_dir_all(data_dir(&name));
    }
    Ok(())
}

/// `cargo xtask down [--purge]`.
pub fn down(bin: &Path, purge: bool) -> Result<()> {
    for i in 1..=MAX_NODES {
        node_down(bin, i, purge)?;
    }
    Proc::control().stop("the control plane", Duration::from_secs(15))?;
    if netns_exists(LAN_NS) {
        step("remove the LAN");
        ip(&["netns", "del", LAN_NS])?;
    }
    // The host's end goes with its peer; this covers a half-built LAN.
    let _ = ip(&["link", "del", HOST_IF]);
    // The nodes' run directories are gone; their parent too when nothing else is in it.
    let _ = fs::remove_dir("/run/skiff-local");
    if purge {
        step("remove the local cluster's data");
        match fs::remove_dir_all(dir()) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("remove {}", dir().display())),
        }
    }
    Ok(())
}
