//! The start-up and footprint benchmark.
//!
//! - Control plane start → API ready (`/readyz` answers 200): cold (an empty data directory:
//!   the CA, credentials and store are created) and warm (a restart on its data).
//! - Node start → Ready, and → its DNS server answering a cluster name: a real `skiff-node` in
//!   a node network namespace with its own containerd, a new node each run (the one before
//!   removed, Node object included).
//! - A cluster from nothing: the last cold start of the control plane, then at once the first
//!   node until it serves DNS (what k3s's "system pods Ready" stands for: skiff has no system
//!   pods, DNS is in the agent).
//! - Resident memory: the control plane idle (10 s after its node is Ready), the node agent and
//!   its containerd idle, and the control plane with 1000 pods Running on 50 simulated nodes
//!   (and its peak).
//!
//! The peer is k3s's own figures, as the issue gives them: ≈ 500 MB resident idle and ≈ 50 s
//! until its system pods are Ready. Ends with `control plane idle RSS MB: X`.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{Node, Pod},
};
use kube::{
    Api,
    api::{ListParams, PostParams},
};
use serde_json::json;
use skiff_tests::node::{NodeAgent, NodeNs};

use crate::common::{Control, Proc, node_ready, rss_mib, start_simulator, status_mib, wait_for};

/// How often readiness is polled while timing (the resolution of the figures).
const POLL: Duration = Duration::from_millis(10);

/// Options of `skiff-bench startup`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// `skiff-control` binary.
    #[arg(long)]
    skiff_control: PathBuf,
    /// `skiff-node` binary.
    #[arg(long)]
    skiff_node: PathBuf,
    /// Directory for the data (a real disk).
    #[arg(long)]
    data_dir: PathBuf,
    /// Runs of each start-up measurement.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Pods on simulated nodes for the loaded memory figure.
    #[arg(long, default_value_t = 1000)]
    pods: usize,
    /// Simulated nodes holding them.
    #[arg(long, default_value_t = 50)]
    sim_nodes: usize,
}

/// Starts `skiff-control` on `dir`, listening on the node link's host side (on `api`, else a
/// free port there); how long until `/readyz` answered.
async fn start_control(
    args: &Args,
    dir: &Path,
    ip: std::net::Ipv4Addr,
    api: Option<std::net::SocketAddr>,
) -> Result<(Control, Duration)> {
    let api = match api {
        Some(a) => a,
        None => std::net::TcpListener::bind((ip, 0))?.local_addr()?,
    };
    let log = args.data_dir.join("control.log");
    crate::common::start_control(&args.skiff_control, dir, api, &log, POLL).await
}

/// Median and maximum in milliseconds.
fn summary(d: &[Duration]) -> (f64, f64) {
    let mut ms: Vec<f64> = d.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    ms.sort_by(f64::total_cmp);
    let median = ms.get(ms.len() / 2).copied().unwrap_or(0.0);
    (median, ms.last().copied().unwrap_or(0.0))
}

/// The PID of `parent`'s child named `comm`.
fn child_named(parent: u32, comm: &str) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
        // `pid (comm) state ppid …`; comm may hold spaces, so split at the last ')'.
        let (head, rest) = stat.rsplit_once(')')?;
        let name = head.split_once('(')?.1;
        let ppid: u32 = rest.split_whitespace().nth(1)?.parse().ok()?;
        (ppid == parent && name == comm).then_some(pid)
    })
}

/// Starts a new node agent; (time to Ready, time to its DNS server answering).
async fn start_node(
    args: &Args,
    control: &Control,
    node_ns: &NodeNs,
) -> Result<(NodeAgent, Duration, Duration)> {
    let t0 = Instant::now();
    let agent = NodeAgent::start_binary(
        &args.skiff_node,
        node_ns,
        &control.node_kubeconfig,
        &args.data_dir,
        &[],
        &[],
    );
    let nodes: Api<Node> = Api::all(control.client.clone());
    let name = agent.name.clone();
    let ready = wait_for("the node to be Ready", 60, POLL, || async {
        nodes
            .get_opt(&name)
            .await
            .ok()
            .flatten()
            .is_some_and(|n| node_ready(&n))
    })
    .await
    .map(|()| t0.elapsed());
    // Serving DNS: the agent's server on the node address answers a cluster name (its
    // records are filled from the cluster).
    let server = std::net::SocketAddr::from((node_ns.node_ip, 53));
    let timed = async {
        let ready = ready?;
        wait_for("the node's DNS to answer", 60, POLL, || async {
            skiff_agent::dns::query(
                server,
                "kubernetes.default.svc.cluster.local.",
                skiff_agent::dns::RecordType::A,
                Duration::from_millis(200),
            )
            .await
            .is_ok_and(|m| !m.answers.is_empty())
        })
        .await?;
        anyhow::Ok((ready, t0.elapsed()))
    }
    .await;
    match timed {
        Ok((r, d)) => Ok((agent, r, d)),
        Err(e) => {
            eprintln!("agent log:\n{}", agent.log());
            tokio::task::block_in_place(|| drop(agent));
            Err(e)
        }
    }
}

/// Runs `pods` pods of one Deployment on `sim_nodes` simulated nodes; the simulator.
async fn load(args: &Args, control: &Control) -> Result<Proc> {
    let log = args.data_dir.join("simulate.log");
    let sim = start_simulator(&args.skiff_node, control, args.sim_nodes, &log).await?;
    let d: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "load"},
        "spec": {"replicas": args.pods, "selector": {"matchLabels": {"app": "load"}},
            "template": {"metadata": {"labels": {"app": "load"}},
                "spec": {"nodeSelector": {"skiff.dev/simulated": "true"},
                    "containers": [{"name": "c", "image": "busybox:1.36",
                        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}}]}}}
    }))?;
    Api::<Deployment>::namespaced(control.client.clone(), "default")
        .create(&PostParams::default(), &d)
        .await?;
    let pods: Api<Pod> = Api::namespaced(control.client.clone(), "default");
    let lp = ListParams::default().labels("app=load");
    wait_for(
        "the pods to be Running",
        600,
        Duration::from_secs(1),
        || async {
            pods.list(&lp).await.is_ok_and(|l| {
                l.items
                    .iter()
                    .filter(|p| {
                        p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                    })
                    .count()
                    == args.pods
            })
        },
    )
    .await?;
    Ok(sim)
}

/// The start-up figures taken before the memory readings.
struct Timings {
    cold: Vec<Duration>,
    to_ready: Vec<Duration>,
    to_dns: Vec<Duration>,
}

/// Idle memory, warm restarts (replacing `control`), the loaded memory; prints the table.
async fn measure(
    args: &Args,
    control: &mut Option<Control>,
    agent: &NodeAgent,
    dir: &Path,
    ip: std::net::Ipv4Addr,
    t: Timings,
) -> Result<()> {
    let runs = args.runs.max(1);
    let pid = |c: &Option<Control>| c.as_ref().map(|c| c.proc.pid()).context("control plane");
    eprintln!("idle memory (10 s)…");
    tokio::time::sleep(Duration::from_secs(10)).await;
    let control_idle = rss_mib(pid(control)?).context("control plane RSS")?;
    let agent_pid = agent.pid().context("the agent runs")?;
    let agent_idle = rss_mib(agent_pid).context("agent RSS")?;
    let containerd_idle = child_named(agent_pid, "containerd").and_then(rss_mib);

    eprintln!("control plane: {runs} warm restarts…");
    let mut warm = Vec::new();
    let api = control.as_ref().map(|c| c.api);
    for _ in 0..runs {
        let old = control.take();
        tokio::task::block_in_place(|| drop(old));
        let (c, took) = start_control(args, dir, ip, api).await?;
        warm.push(took);
        *control = Some(c);
    }

    eprintln!("{} pods on {} simulated nodes…", args.pods, args.sim_nodes);
    let sim = load(args, control.as_ref().context("control plane")?).await?;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let loaded = rss_mib(pid(control)?).context("control plane RSS")?;
    let peak = status_mib(pid(control)?, "VmHWM").context("control plane peak RSS")?;
    tokio::task::block_in_place(|| drop(sim));

    let (cold_med, cold_max) = summary(&t.cold);
    let (warm_med, warm_max) = summary(&warm);
    let (ready_med, ready_max) = summary(&t.to_ready);
    let (dns_med, dns_max) = summary(&t.to_dns);
    let cluster_s = (t.cold.last().copied().unwrap_or_default()
        + t.to_dns.first().copied().unwrap_or_default())
    .as_secs_f64();
    println!("\n| measure ({runs} runs: median / max) | skiff | k3s (published) |\n|---|---|---|");
    println!(
        "| control plane start → API ready, cold (new CA, store) | {cold_med:.0} / {cold_max:.0} ms | |"
    );
    println!("| control plane restart → API ready, warm | {warm_med:.0} / {warm_max:.0} ms | |");
    println!("| node start → Ready (own containerd) | {ready_med:.0} / {ready_max:.0} ms | |");
    println!("| node start → its DNS server answering | {dns_med:.0} / {dns_max:.0} ms | |");
    println!(
        "| cluster from nothing → ready for workloads (control cold start, then a node to DNS answering) | {cluster_s:.2} s | ≈ 50 s until its system pods are Ready |"
    );
    println!(
        "| control plane RSS, idle, one node | {control_idle:.0} MB | ≈ 500 MB (server, idle) |"
    );
    let containerd = containerd_idle.map_or_else(|| "?".to_string(), |m| format!("{m:.0}"));
    println!("| + node agent and its containerd, idle | {agent_idle:.0} + {containerd} MB | |");
    println!(
        "| control plane RSS, {} pods Running on {} simulated nodes (peak) | {loaded:.0} MB ({peak:.0} MB) | |",
        args.pods, args.sim_nodes
    );
    println!("control plane idle RSS MB: {control_idle:.0}");
    Ok(())
}

/// Runs the benchmark (`node_ns`: the real node's namespace).
pub async fn run(args: Args, node_ns: &NodeNs) -> Result<()> {
    let runs = args.runs.max(1);
    let _ = std::fs::remove_dir_all(&args.data_dir);
    std::fs::create_dir_all(&args.data_dir)?;
    let dir = args.data_dir.join("control");
    let ip = node_ns.host_ip;

    eprintln!("control plane: {runs} cold starts…");
    let mut cold = Vec::new();
    let mut control = None;
    for _ in 0..runs {
        let old = control.take();
        tokio::task::block_in_place(|| drop(old));
        let _ = std::fs::remove_dir_all(&dir);
        let (c, took) = start_control(&args, &dir, ip, None).await?;
        cold.push(took);
        control = Some(c);
    }
    let control = control.unwrap_or_else(|| unreachable!("at least one run"));

    eprintln!("node: {runs} starts…");
    let (mut to_ready, mut to_dns) = (Vec::new(), Vec::new());
    let mut agent: Option<NodeAgent> = None;
    let nodes: Api<Node> = Api::all(control.client.clone());
    for _ in 0..runs {
        if let Some(a) = agent.take() {
            let name = a.name.clone();
            tokio::task::block_in_place(|| drop(a));
            // Gone for good, as a removed machine (its kube-dns slice follows it).
            nodes.delete(&name, &Default::default()).await?;
        }
        let (a, r, d) = start_node(&args, &control, node_ns).await?;
        to_ready.push(r);
        to_dns.push(d);
        agent = Some(a);
    }
    let agent = agent.unwrap_or_else(|| unreachable!("at least one run"));
    let mut control = Some(control);
    let result = measure(
        &args,
        &mut control,
        &agent,
        &dir,
        ip,
        Timings {
            cold,
            to_ready,
            to_dns,
        },
    )
    .await;
    tokio::task::block_in_place(|| {
        drop(agent);
        drop(control);
    });
    let _ = std::fs::remove_dir_all(&args.data_dir);
    result
}
