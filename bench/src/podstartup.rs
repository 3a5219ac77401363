//! Pod startup: a release `skiff-control` and one real `skiff-node` (its own containerd, in a
//! node network namespace linked to this machine), the busybox image already on the node.
//! Pods are created at a steady rate; each one's latency runs from its create call to the watch
//! event that shows it `Running` (upstream's pod startup SLI). The peers in the same run: the
//! container runtime's own floor — `ctr run -d` of the same image on the same containerd,
//! sequentially — and upstream's SLO (p99 ≤ 5 s).

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, PostParams},
    runtime::{WatchStreamExt, watcher},
};

use crate::common::{node_ready, start_control, wait_for};

/// How often conditions are polled.
const POLL: Duration = Duration::from_millis(200);

/// Options of `skiff-bench podstartup`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// `skiff-control` binary.
    #[arg(long)]
    skiff_control: PathBuf,
    /// `skiff-node` binary.
    #[arg(long)]
    skiff_node: PathBuf,
    /// Directory for both (a real disk).
    #[arg(long)]
    data_dir: PathBuf,
    /// Pods to start.
    #[arg(long, default_value_t = 100)]
    pods: usize,
    /// Pods created per second.
    #[arg(long, default_value_t = 5.0)]
    rate: f64,
}

fn pct(lat: &[Duration], p: f64) -> f64 {
    let mut l = lat.to_vec();
    l.sort();
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "an index into a short list"
    )]
    let i = ((l.len() as f64 * p) as usize).min(l.len().saturating_sub(1));
    l.get(i).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// `ctr run -d` of the image, `n` times in a row on the node's containerd: the runtime's floor.
fn ctr_floor(socket: &Path, n: usize) -> Result<Vec<Duration>> {
    let ctr = |args: &[&str]| {
        Command::new("ctr")
            .arg("--address")
            .arg(socket)
            .args(["--namespace", "k8s.io"])
            .args(args)
            .output()
    };
    let mut lat = Vec::with_capacity(n);
    let mut ids = Vec::new();
    let result = (|| -> Result<()> {
        for i in 0..n {
            let id = format!("skiff-bench-ctr-{i}");
            let t0 = Instant::now();
            let out =
                ctr(&["run", "-d", "busybox:1.36", &id, "sleep", "600"]).context("run ctr")?;
            if !out.status.success() {
                bail!("ctr run: {}", String::from_utf8_lossy(&out.stderr));
            }
            lat.push(t0.elapsed());
            ids.push(id);
        }
        Ok(())
    })();
    for id in &ids {
        let _ = ctr(&["task", "kill", "-s", "SIGKILL", id]);
        for _ in 0..50 {
            if ctr(&["task", "delete", id]).is_ok_and(|o| o.status.success()) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = ctr(&["container", "delete", id]);
    }
    result.map(|()| lat)
}

fn pod(i: usize) -> Result<Pod> {
    Ok(serde_json::from_value(serde_json::json!({
        "metadata": {"name": format!("p{i}"), "namespace": "bench"},
        "spec": {"terminationGracePeriodSeconds": 1,
                 "containers": [{"name": "c", "image": "busybox:1.36", "command": ["sleep", "3600"]}]}
    }))?)
}

/// Fails unless this process may create namespaces and run containers.
pub fn require_root() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("this benchmark runs a real node (network namespaces, containerd): run it as root");
    }
    Ok(())
}

/// Runs the benchmark with the node in `node_ns`.
pub async fn run(args: Args, node_ns: &skiff_tests::node::NodeNs) -> Result<()> {
    let _ = std::fs::remove_dir_all(&args.data_dir);
    std::fs::create_dir_all(&args.data_dir)?;
    let control_dir = args.data_dir.join("control");
    let api = std::net::TcpListener::bind((node_ns.host_ip, 0))?.local_addr()?;
    let log = args.data_dir.join("control.log");
    let (control, _) = start_control(
        &args.skiff_control,
        &control_dir,
        api,
        &log,
        Duration::from_millis(100),
    )
    .await?;
    let client = control.client.clone();

    let archive = args.data_dir.join("busybox.tar");
    skiff_runtime::oci_layout::build_busybox_archive(
        Path::new("/bin/busybox"),
        "busybox:1.36",
        &archive,
    )?;
    // The agent, its own containerd and its cleanup (containers, shims, mounts, BPF pins) are
    // the tests' node harness, run with the release binary.
    let node = skiff_tests::node::NodeAgent::start_binary(
        &args.skiff_node,
        node_ns,
        &control_dir.join("node.kubeconfig"),
        &args.data_dir,
        &[archive],
        &[],
    );
    let node_name = node.name.clone();
    let socket = node.run_dir.join("containerd/containerd.sock");
    let nodes: Api<Node> = Api::all(client.clone());
    let result = async {
        wait_for("the node to be Ready", 90, POLL, || async {
            nodes
                .get_opt(&node_name)
                .await
                .ok()
                .flatten()
                .is_some_and(|n| node_ready(&n))
        })
        .await?;
        let namespaces: Api<Namespace> = Api::all(client.clone());
        namespaces
            .create(
                &PostParams::default(),
                &serde_json::from_value(serde_json::json!({"metadata": {"name": "bench"}}))?,
            )
            .await?;
        let pods: Api<Pod> = Api::namespaced(client.clone(), "bench");
        // Watch first, so no Running event is missed.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
        let watch = tokio::spawn({
            let pods = pods.clone();
            async move {
                let mut seen = std::collections::HashSet::new();
                let mut events = watcher(pods, watcher::Config::default())
                    .applied_objects()
                    .boxed();
                while let Some(Ok(p)) = events.next().await {
                    let running =
                        p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
                    if running && seen.insert(p.name_any()) {
                        let _ = tx.send((p.name_any(), Instant::now()));
                    }
                }
            }
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut created: HashMap<String, Instant> = HashMap::new();
        let gap = Duration::from_secs_f64(1.0 / args.rate.max(0.01));
        let start = Instant::now();
        for i in 0..args.pods {
            let due = start + gap * u32::try_from(i).unwrap_or(0);
            tokio::time::sleep_until(due.into()).await;
            let t0 = Instant::now();
            pods.create(&PostParams::default(), &pod(i)?).await?;
            created.insert(format!("p{i}"), t0);
        }
        let mut lat = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(300);
        while lat.len() < args.pods {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, rx.recv()).await {
                Ok(Some((name, at))) => {
                    if let Some(t0) = created.get(&name) {
                        lat.push(at.duration_since(*t0));
                    }
                }
                _ => bail!("only {} of {} pods reached Running", lat.len(), args.pods),
            }
        }
        watch.abort();
        // Stop the pods before the floor, so both measure an otherwise idle node.
        pods.delete_collection(&DeleteParams::default(), &Default::default())
            .await?;
        wait_for("the pods to go", 180, POLL, || async {
            pods.list(&Default::default())
                .await
                .is_ok_and(|l| l.items.is_empty())
        })
        .await?;
        let floor = tokio::task::block_in_place(|| ctr_floor(&socket, args.pods.min(50)))?;
        Ok::<_, anyhow::Error>((lat, floor))
    }
    .await;
    tokio::task::block_in_place(|| drop(node));
    drop(control);
    let _ = std::fs::remove_dir_all(&args.data_dir);
    let (lat, floor) = result?;
    eprintln!();
    println!(
        "| pod startup ({} pods at {}/s, 1 node) | p50 ms | p99 ms |",
        args.pods, args.rate
    );
    println!("|---|---|---|");
    println!(
        "| skiff: create → Running (watch) | {:.1} | {:.1} |",
        pct(&lat, 0.5),
        pct(&lat, 0.99)
    );
    println!(
        "| containerd floor: `ctr run -d`, sequential ({} runs) | {:.1} | {:.1} |",
        floor.len(),
        pct(&floor, 0.5),
        pct(&floor, 0.99)
    );
    println!("| upstream SLO | | 5000 |");
    println!();
    println!("pod startup p99 ms: {:.1}", pct(&lat, 0.99));
    Ok(())
}
