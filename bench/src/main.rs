//! `skiff-bench`: benchmarks run by `cargo xtask bench <name>`.
//!
//! `store`: durable writes of 256-byte values (1 and 64 concurrent clients) and linearizable
//! reads (64 clients), against skiff's store (single member and three members on loopback) and
//! etcd from Debian (single member and three members on loopback), all driven by this same load
//! generator: skiff through its client listener, etcd through gRPC (`etcd-client`). Prints a
//! markdown table and ends with `store/etcd write ratio (64 clients, 3 nodes): R`.
//!
//! `api`: the API server through HTTPS with the `kube` client: creates, gets, lists of 1k and
//! 30k pods, watch fan-out to 100 watchers, against upstream's latency SLO. Ends with
//! `api create p99 ms (64 clients): X`.
//!
//! `podstartup`: pods created at a steady rate on one real node (its own containerd, in a node
//! network namespace), from create to Running as a watch sees it, against `ctr run -d` on the
//! same containerd and upstream's SLO. Ends with `pod startup p99 ms: X`.
//!
//! `datapath`: Service routing through skiff's eBPF programs against kube-proxy's iptables
//! chains on the same namespaces: new connections/s and p99 at 1, 1k and 10k Services,
//! programming time, iperf3, BPF_PROG_RUN per-packet cost. Ends with
//! `ebpf/iptables new-conn ratio at 10000 services: R`.
//!
//! `policy`: NetworkPolicy enforcement: the new-flow check in `to-pod` by BPF_PROG_RUN with
//! 1, 100 and 1000 policies selecting the pod, and new connections/s through the veth path
//! with enforcement on vs off, against iptables policy rules (kube-router's layout) on the
//! kernel's forwarding. Ends with `policy new-conn overhead %: X`.
//!
//! `startup`: control plane start → API ready (cold and warm), a real node's start → Ready and
//! → its cluster DNS, and the control plane's memory idle and with 1000 pods on simulated
//! nodes, against k3s's published figures. Ends with `control plane idle RSS MB: X`.
//!
//! `scheduler`: the scheduling framework in process (5000 nodes, 10,000 pods) against
//! upstream's `scheduler_perf` floor, and Deployments through the API onto 1000 simulated
//! nodes. Ends with `scheduler pods/s at 5000 nodes: N`.

mod api;
mod common;
mod datapath;
mod podstartup;
mod policy;
mod scheduler;
mod startup;
mod store;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "skiff-bench", about = "skiff's benchmarks")]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// The store against etcd.
    Store(store::Args),
    /// The API server against upstream's latency SLO.
    Api(api::Args),
    /// Pod startup on a real node against the runtime's floor and upstream's SLO.
    Podstartup(podstartup::Args),
    /// The scheduler in process and end to end against upstream's figures.
    Scheduler(scheduler::Args),
    /// Service routing: the eBPF data path against kube-proxy's iptables rules (as root).
    Datapath(datapath::Args),
    /// NetworkPolicy enforcement on vs off, against iptables policy rules (as root).
    Policy(policy::Args),
    /// Start-up times and memory against k3s's published figures (as root).
    Startup(startup::Args),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.bench {
        // Not inside the runtime: it makes its own, per namespace.
        Bench::Datapath(args) => datapath::run(args),
        Bench::Policy(args) => policy::run(args),
        Bench::Store(args) => rt.block_on(store::run(args)),
        Bench::Api(args) => rt.block_on(api::run(args)),
        Bench::Scheduler(args) => rt.block_on(scheduler::run(args)),
        Bench::Startup(args) => {
            podstartup::require_root()?;
            let node_ns = skiff_tests::node::NodeNs::new();
            let r = rt.block_on(startup::run(args, &node_ns));
            drop(rt);
            drop(node_ns);
            r
        }
        Bench::Podstartup(args) => {
            podstartup::require_root()?;
            // The node's namespace is made and removed outside the runtime (its helper runs
            // its own).
            let node_ns = skiff_tests::node::NodeNs::new();
            let r = rt.block_on(podstartup::run(args, &node_ns));
            drop(rt);
            drop(node_ns);
            r
        }
    }
}
