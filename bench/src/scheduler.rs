//! The scheduler benchmark.
//!
//! (a) In process: the scheduling framework alone (PreFilter, Filter with node sampling,
//! Score, assume) over 5000 nodes and 10,000 pods with CPU and memory requests, the workload
//! of upstream's `scheduler_perf` `SchedulingBasic/5000Nodes_10000Pods`, whose CI floor is
//! 680–810 pods/s (on much larger machines) — the peer figure printed next to ours. A second
//! row runs pods owned by ReplicaSets, which adds the default topology spread.
//!
//! (b) End to end: a release `skiff-control` and 1000 simulated nodes (`skiff-node
//! --simulate`), 100 Deployments of 100 replicas created through the API; pods/s from the first
//! create to the last binding as a watch sees it, and the time until all are Running.
//!
//! Ends with `scheduler pods/s at 5000 nodes: N`.

use std::{
    collections::HashSet,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{Node, Pod},
};
use kube::{
    Api,
    api::PostParams,
    runtime::{WatchStreamExt, watcher},
};
use serde_json::json;
use skiff_controllers::scheduler::framework::{self, PodInfo, Snapshot};

use crate::common::{free_addr, start_control, start_simulator};

/// Options of `skiff-bench scheduler`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// `skiff-control` binary (end-to-end part).
    #[arg(long)]
    skiff_control: PathBuf,
    /// `skiff-node` binary (its simulated runtime).
    #[arg(long)]
    skiff_node: PathBuf,
    /// Directory for the control plane's data.
    #[arg(long)]
    data_dir: PathBuf,
    /// Nodes in the in-process part.
    #[arg(long, default_value_t = 5000)]
    nodes: usize,
    /// Pods in the in-process part.
    #[arg(long, default_value_t = 10_000)]
    pods: usize,
    /// Simulated nodes in the end-to-end part.
    #[arg(long, default_value_t = 1000)]
    sim_nodes: usize,
    /// Deployments (of 100 replicas) in the end-to-end part.
    #[arg(long, default_value_t = 100)]
    deployments: usize,
}

fn node(i: usize) -> Arc<Node> {
    Arc::new(
        serde_json::from_value(json!({
            "metadata": {"name": format!("node-{i:05}"), "labels": {
                "kubernetes.io/hostname": format!("node-{i:05}"),
                "topology.kubernetes.io/zone": format!("zone-{}", i % 10)}},
            "status": {"allocatable": {"cpu": "32", "memory": "256Gi", "pods": "110"},
                "conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .expect("a node"),
    )
}

fn pod(i: usize, owned: bool) -> Arc<Pod> {
    let mut v = json!({
        "metadata": {"name": format!("pod-{i}"), "namespace": "default", "uid": format!("uid-{i}"),
            "labels": {"app": format!("app-{}", i % 100)}},
        "spec": {"containers": [{"name": "c", "image": "busybox",
            "resources": {"requests": {"cpu": "100m", "memory": "500Mi"}}}]}
    });
    if owned {
        v["metadata"]["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": "ReplicaSet",
            "name": format!("rs-{}", i % 100), "uid": format!("rs-{}", i % 100), "controller": true}]);
    }
    Arc::new(serde_json::from_value(v).expect("a pod"))
}

/// Schedules `pods` pods on `nodes` nodes in process; returns pods/s.
fn in_process(nodes: usize, pods: usize, owned: bool) -> Result<f64> {
    let mut snap = Snapshot::default();
    for i in 0..nodes {
        snap.upsert_node(node(i));
    }
    let infos: Vec<Arc<PodInfo>> = (0..pods)
        .map(|i| Arc::new(PodInfo::new(pod(i, owned))))
        .collect();
    let start = Instant::now();
    for p in &infos {
        let n =
            framework::schedule(p, &mut snap).map_err(|e| anyhow::anyhow!("{}", e.message()))?;
        snap.place(p.clone(), &n);
    }
    let secs = start.elapsed().as_secs_f64();
    // Least allocated spreads the pods: no node may hold more than its share plus one sample.
    let most = snap.nodes.values().map(|n| n.pods.len()).max().unwrap_or(0);
    if most > 110 {
        bail!("a node holds {most} pods");
    }
    Ok(pods as f64 / secs)
}

/// Deployments through the API onto simulated nodes: (pods/s to bound, seconds to all Running).
async fn end_to_end(args: &Args) -> Result<(f64, f64, usize)> {
    let _ = std::fs::remove_dir_all(&args.data_dir);
    std::fs::create_dir_all(&args.data_dir)?;
    let (control, _) = start_control(
        &args.skiff_control,
        &args.data_dir.join("data"),
        free_addr()?,
        &args.data_dir.join("control.log"),
        Duration::from_millis(100),
    )
    .await?;
    let client = control.client.clone();
    let sim = start_simulator(
        &args.skiff_node,
        &control,
        args.sim_nodes,
        &args.data_dir.join("simulate.log"),
    )
    .await?;
    let total = args.deployments * 100;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let watch = tokio::spawn({
        let pods = pods.clone();
        async move {
            let mut bound = HashSet::new();
            let mut running = HashSet::new();
            let (mut bound_at, mut running_at) = (None, None);
            let mut stream = watcher(pods, watcher::Config::default())
                .default_backoff()
                .applied_objects()
                .boxed();
            while let Some(p) = stream.try_next().await? {
                let name = p.metadata.name.clone().unwrap_or_default();
                if p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some() {
                    bound.insert(name.clone());
                }
                if p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running") {
                    running.insert(name);
                }
                if bound_at.is_none() && bound.len() >= total {
                    bound_at = Some(Instant::now());
                }
                if running.len() >= total {
                    running_at = Some(Instant::now());
                    break;
                }
            }
            anyhow::Ok((bound_at, running_at))
        }
    });
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let start = Instant::now();
    for d in 0..args.deployments {
        let obj: Deployment = serde_json::from_value(json!({
            "metadata": {"name": format!("d{d}")},
            "spec": {"replicas": 100, "selector": {"matchLabels": {"app": format!("d{d}")}},
                "template": {"metadata": {"labels": {"app": format!("d{d}")}},
                    "spec": {"containers": [{"name": "c", "image": "busybox:1.36",
                        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}}}]}}}
        }))?;
        deployments.create(&PostParams::default(), &obj).await?;
    }
    let (bound_at, running_at) = tokio::time::timeout(Duration::from_secs(1800), watch)
        .await
        .context("pods not all Running within 30 minutes")???;
    let bound_secs = bound_at
        .context("not all bound")?
        .duration_since(start)
        .as_secs_f64();
    let running_secs = running_at
        .context("not all Running")?
        .duration_since(start)
        .as_secs_f64();
    drop(sim);
    drop(control);
    let _ = std::fs::remove_dir_all(&args.data_dir);
    Ok((total as f64 / bound_secs, running_secs, total))
}

/// Runs the benchmark.
pub async fn run(args: Args) -> Result<()> {
    eprintln!("in process: {} nodes, {} pods…", args.nodes, args.pods);
    let basic = in_process(args.nodes, args.pods, false)?;
    let owned = in_process(args.nodes, args.pods, true)?;
    eprintln!(
        "end to end: {} simulated nodes, {} Deployments of 100…",
        args.sim_nodes, args.deployments
    );
    let (e2e, running, total) = end_to_end(&args).await?;
    println!("| workload | skiff | peer |");
    println!("|---|---|---|");
    println!(
        "| in process, {} nodes, {} pods, basic fit | {basic:.0} pods/s | upstream scheduler_perf CI floor 680–810 pods/s |",
        args.nodes, args.pods
    );
    println!(
        "| in process, {} nodes, {} pods owned by ReplicaSets (default spread) | {owned:.0} pods/s | — |",
        args.nodes, args.pods
    );
    println!(
        "| API + {} simulated nodes, {total} pods from Deployments, create → bound | {e2e:.0} pods/s | goal ≥ 100 pods/s |",
        args.sim_nodes
    );
    println!("| same, create → all Running | {running:.1} s | — |");
    println!("scheduler pods/s at {} nodes: {basic:.0}", args.nodes);
    Ok(())
}
