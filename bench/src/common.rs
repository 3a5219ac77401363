//! What several benchmarks share: the processes they start (the control plane, the simulated
//! nodes), free ports, memory readings.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Node;
use kube::{Api, Client, api::ListParams};

/// A process a benchmark started, ended by PID (SIGTERM, then SIGKILL) when dropped.
#[derive(Debug)]
pub struct Proc(pub Child);

impl Proc {
    /// Its PID.
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        skiff_tests::stop_child(&mut self.0, Duration::from_secs(15));
    }
}

/// A free loopback address.
pub fn free_addr() -> Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// A `/proc/<pid>/status` figure in MiB (`VmRSS`, `VmHWM`).
pub fn status_mib(pid: u32, field: &str) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = s
        .lines()
        .find(|l| l.split(':').next() == Some(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// Resident memory in MiB.
pub fn rss_mib(pid: u32) -> Option<f64> {
    status_mib(pid, "VmRSS")
}

/// Polls `check` every `every` until it holds; an error naming `what` after `secs`.
pub async fn wait_for<F, Fut>(what: &str, secs: u64, every: Duration, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !check().await {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(every).await;
    }
    Ok(())
}

/// Whether a Node's Ready condition is True.
pub fn node_ready(n: &Node) -> bool {
    n.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// A `skiff-control` a benchmark started, and its admin client.
pub struct Control {
    pub proc: Proc,
    pub client: Client,
    /// Where its API server listens (a restart listens there again: the kubeconfigs name it).
    pub api: SocketAddr,
    /// The node bootstrap kubeconfig.
    pub node_kubeconfig: PathBuf,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("api", &self.api)
            .finish_non_exhaustive()
    }
}

/// Starts `bin` (`skiff-control`) with its data in `dir`, its API on `api` (the address also in
/// its certificate), its log appended to `log`; waits until `/readyz` answers `ok`, polling
/// every `poll`, and says how long that took.
pub async fn start_control(
    bin: &Path,
    dir: &Path,
    api: SocketAddr,
    log: &Path,
    poll: Duration,
) -> Result<(Control, Duration)> {
    let t0 = Instant::now();
    let proc = Proc(
        Command::new(bin)
            .arg("--data-dir")
            .arg(dir)
            .args(["--api-listen", &api.to_string()])
            .args(["--tls-san", &api.ip().to_string()])
            .args(["--peer-listen", &free_addr()?.to_string()])
            .args(["--client-listen", &free_addr()?.to_string()])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(log)?,
            )
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?,
    );
    let kubeconfig = dir.join("admin.kubeconfig");
    let deadline = t0 + Duration::from_secs(60);
    let mut client = None;
    loop {
        if client.is_none() && kubeconfig.exists() {
            client = skiff_controllers::client_from_kubeconfig(&kubeconfig)
                .await
                .ok();
        }
        if let Some(c) = &client {
            let req = http::Request::get("/readyz").body(Vec::new())?;
            if c.request_text(req).await.is_ok_and(|t| t.trim() == "ok") {
                break;
            }
        }
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            bail!(
                "skiff-control did not become ready; its log ends:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        tokio::time::sleep(poll).await;
    }
    let took = t0.elapsed();
    let client = client.unwrap_or_else(|| unreachable!("ready implies a client"));
    let control = Control {
        proc,
        client,
        api,
        node_kubeconfig: dir.join("node.kubeconfig"),
    };
    Ok((control, took))
}

/// Starts `bin` (`skiff-node`) simulating `n` nodes joined with `node_kubeconfig` (log in
/// `log`) and waits until all of them are Ready.
pub async fn start_simulator(bin: &Path, control: &Control, n: usize, log: &Path) -> Result<Proc> {
    let sim = Proc(
        Command::new(bin)
            .args(["--node-name", "sim", "--kubeconfig"])
            .arg(&control.node_kubeconfig)
            .args(["--simulate", &n.to_string()])
            .args(["--simulate-start-delay", "100ms"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log)?)
            .spawn()
            .context("start skiff-node --simulate")?,
    );
    let nodes: Api<Node> = Api::all(control.client.clone());
    let simulated = ListParams::default().labels("skiff.dev/simulated=true");
    wait_for(
        "the simulated nodes to be Ready",
        300,
        Duration::from_secs(1),
        || async {
            nodes
                .list(&simulated)
                .await
                .is_ok_and(|l| l.items.iter().filter(|n| node_ready(n)).count() == n)
        },
    )
    .await?;
    Ok(sim)
}
