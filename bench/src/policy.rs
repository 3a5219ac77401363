//! NetworkPolicy enforcement: what it costs a new connection, in skiff's eBPF data path and in
//! the iptables rules an iptables-based NetworkPolicy implementation (kube-router's layout)
//! writes for the same policies, on one topology built for the run (as root).
//!
//! The policies are NetworkPolicy objects, turned into map contents by the agent's own code
//! (`policy::desired`, written by `policy::sync::apply`): N policies select the server pods,
//! each allowing ingress on TCP 8080–8081 from its own client identity (N identities exist, so
//! the pods' policy maps hold N keys each); the benchmark client has the last one, and its own
//! egress is isolated by one more policy allowing the servers.
//!
//! - **Per packet** (BPF_PROG_RUN of `to-pod`, one distinct new connection per run): a
//!   server not isolated, isolated and allowing the connection, isolated and refusing it, and
//!   a packet of a tracked connection — with 1, 100 and 1000 policies.
//! - **New connections per second** through the veth path (client pod → node → four server
//!   pods, connect → request → reply → close, `--concurrency` at once): eBPF without policies vs
//!   with `--load-policies` policies (egress of the client and ingress of the servers
//!   enforced), and the kernel's forwarding without rules vs with the iptables rules; modes
//!   alternate for `--rounds` rounds and the median counts.
//!
//! Ends with `policy new-conn overhead %: X` (eBPF with policies against without).

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use skiff_agent::policy::{
    desired::{PodFacts, View, desired},
    sync::apply,
};
use skiff_apimachinery::identity::IdentityLabels;
use skiff_datapath::{
    LoadedProgram, PinDir, ProgramKind,
    endpoints::EndpointMap,
    policy::{Flows, PolicyMaps},
};
use skiff_ebpf_common::endpoint::EndpointInfo;

use crate::datapath::{
    self, DIRECT_PORT, Ebpf, Load, SERVER_PORT, Topology, iptables_flush, iptables_restore,
    syn_frame,
};

/// Options of `skiff-bench policy`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Policies selecting the server for the BPF_PROG_RUN cost.
    #[arg(long, value_delimiter = ',', default_value = "1,100,1000")]
    policies: Vec<usize>,
    /// Policies selecting the servers for the connection-rate runs.
    #[arg(long, default_value_t = 100)]
    load_policies: usize,
    /// Seconds of load per mode and round.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Rounds of the modes (alternating); the median counts.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Connections in flight at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
}

const NS: &str = "bench";
const SERVER_ID: u32 = 300;
const CLIENT_ID: u32 = 301;
/// Identities of the other policies' peers (no pods: only their keys exist).
const FILLER_FIRST: u32 = 1000;

fn labels(pairs: &[(&str, &str)]) -> IdentityLabels {
    let pod: BTreeMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let ns = BTreeMap::from([("kubernetes.io/metadata.name".to_string(), NS.to_string())]);
    IdentityLabels::of(NS, &pod, &ns)
}

fn client_labels(i: usize) -> IdentityLabels {
    labels(&[("role", "client"), ("client", &format!("c{i}"))])
}

/// `n` ingress policies for the servers (policy `i` allows client `c<i>`) and the client's
/// egress policy.
fn policies(n: usize) -> Vec<NetworkPolicy> {
    let mut out: Vec<NetworkPolicy> = (0..n)
        .map(|i| {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": format!("p{i}"), "namespace": NS},
                "spec": {
                    "podSelector": {"matchLabels": {"app": "server"}},
                    "ingress": [{
                        "from": [{"podSelector": {"matchLabels": {"client": format!("c{i}")}}}],
                        "ports": [{"port": SERVER_PORT}, {"port": DIRECT_PORT}],
                    }],
                },
            }))
            .expect("a valid NetworkPolicy")
        })
        .collect();
    out.push(
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "client-out", "namespace": NS},
            "spec": {
                "podSelector": {"matchLabels": {"role": "client"}},
                "policyTypes": ["Egress"],
                "egress": [{
                    "to": [{"podSelector": {"matchLabels": {"app": "server"}}}],
                    "ports": [{"port": SERVER_PORT}, {"port": DIRECT_PORT}],
                }],
            },
        }))
        .expect("a valid NetworkPolicy"),
    );
    out
}

/// The agent's view: the client (endpoint 1 when `client_local`), the servers (endpoints
/// from 2), `n` policies and every identity they name.
fn view<'a>(
    n: usize,
    policies: &'a [NetworkPolicy],
    client: Ipv4Addr,
    client_local: bool,
    servers: &[Ipv4Addr],
) -> View<'a> {
    let mut pods = vec![PodFacts {
        name: "client".to_string(),
        ip: client,
        labels: client_labels(n.saturating_sub(1)),
        ports: BTreeMap::new(),
        endpoint: client_local.then_some(1),
    }];
    for (i, ip) in servers.iter().enumerate() {
        pods.push(PodFacts {
            name: format!("server-{i}"),
            ip: *ip,
            labels: labels(&[("app", "server")]),
            ports: BTreeMap::new(),
            endpoint: Some(2 + i as u16),
        });
    }
    let mut identities = BTreeMap::from([
        (SERVER_ID, labels(&[("app", "server")])),
        (CLIENT_ID, client_labels(n.saturating_sub(1))),
    ]);
    for i in 0..n.saturating_sub(1) {
        identities.insert(FILLER_FIRST + i as u32, client_labels(i));
    }
    View {
        pods,
        policies: policies.iter().collect(),
        identities,
        ..View::default()
    }
}

/// Brings the node's policy maps and endpoint flags to `view`, as the agent's loop does;
/// returns how many allow keys the maps hold.
fn program(pins: &PinDir, view: &View<'_>) -> Result<usize> {
    let want = desired(view);
    apply(
        &want,
        &mut PolicyMaps::open(pins)?,
        &mut EndpointMap::open(pins)?,
    )?;
    Ok(want.policy.len())
}

/// Per-packet costs (ns) of `to-pod` with `n` policies.
struct Cost {
    keys: usize,
    open: f64,
    allowed: f64,
    denied: f64,
    tracked: f64,
}

const CLIENT: [u8; 4] = [10, 244, 251, 10];
const SERVER: [u8; 4] = [10, 244, 250, 11];

fn prog_run_cost(n: usize, tag: &str) -> Result<Cost> {
    let pins = PinDir::create(
        Path::new(skiff_datapath::bpffs::DEFAULT_BPFFS),
        &format!("benchpol-{tag}-{n}"),
    )?;
    let result = (|| -> Result<Cost> {
        let prog = LoadedProgram::load(ProgramKind::ToPod, &pins)?;
        let mut flows = Flows::open(&pins)?;
        EndpointMap::open(&pins)?.set(
            SERVER.into(),
            EndpointInfo {
                ifindex: 0,
                flags: 0,
                mac: [2, 0, 0, 0, 0, 11],
                node_mac: [2, 0, 0, 0, 0, 1],
            },
        )?;
        let all = policies(n);
        let none: Vec<NetworkPolicy> = Vec::new();
        let mut sport = 10000u16;
        // One distinct new connection per run (a tracked one would skip the check).
        let mut new_conns = |dport: u16, flows: &mut Flows| -> Result<f64> {
            let runs = 2000u32;
            let mut total = Duration::ZERO;
            for _ in 0..runs {
                sport = sport.wrapping_add(1).max(10000);
                total += prog.bench_run(&syn_frame(CLIENT, SERVER, sport, dport), 1)?;
            }
            flows.drain();
            Ok(total.as_nanos() as f64 / f64::from(runs))
        };
        program(
            &pins,
            &view(n, &none, CLIENT.into(), false, &[SERVER.into()]),
        )?;
        let open = new_conns(SERVER_PORT, &mut flows)?;
        let keys = program(
            &pins,
            &view(n, &all, CLIENT.into(), false, &[SERVER.into()]),
        )?;
        let allowed = new_conns(SERVER_PORT, &mut flows)?;
        let denied = new_conns(9999, &mut flows)?;
        let syn = syn_frame(CLIENT, SERVER, 9000, SERVER_PORT);
        prog.bench_run(&syn, 1)?;
        let tracked = prog.bench_run(&syn, 100_000)?.as_nanos() as f64;
        flows.drain();
        Ok(Cost {
            keys,
            open,
            allowed,
            denied,
            tracked,
        })
    })();
    let _ = pins.remove();
    result
}

/// kube-router's layout of the same policies in the node's filter table: established
/// connections accepted first; then a chain per isolated pod jumping to a chain per policy
/// selecting it (a rule per allowed peer and port), then a drop.
fn iptables_rules(topo: &Topology, n: usize) -> String {
    let client = topo.client.1;
    let mut chains = String::from("*filter\n:FORWARD ACCEPT [0:0]\n");
    let mut rules =
        String::from("-A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n");
    // Policy i's peer: the client for the last one, an address without a pod for the others.
    let peer = |i: usize| {
        if i + 1 == n {
            client
        } else {
            Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 250, 0, 0)) + i as u32)
        }
    };
    for i in 0..n {
        chains.push_str(&format!(":KUBE-NWPLCY-P{i} - [0:0]\n"));
        for port in [SERVER_PORT, DIRECT_PORT] {
            rules.push_str(&format!(
                "-A KUBE-NWPLCY-P{i} -s {}/32 -p tcp -m tcp --dport {port} -j ACCEPT\n",
                peer(i)
            ));
        }
    }
    for (j, (_, ip, _)) in topo.backends.iter().enumerate() {
        let chain = format!("KUBE-POD-FW-S{j}");
        chains.push_str(&format!(":{chain} - [0:0]\n"));
        rules.push_str(&format!("-A FORWARD -d {ip}/32 -j {chain}\n"));
        for i in 0..n {
            rules.push_str(&format!("-A {chain} -j KUBE-NWPLCY-P{i}\n"));
        }
        rules.push_str(&format!("-A {chain} -j DROP\n"));
    }
    chains.push_str(":KUBE-POD-FW-CLIENT - [0:0]\n:KUBE-NWPLCY-OUT - [0:0]\n");
    rules.push_str(&format!(
        "-A FORWARD -s {client}/32 -j KUBE-POD-FW-CLIENT\n"
    ));
    rules.push_str("-A KUBE-POD-FW-CLIENT -j KUBE-NWPLCY-OUT\n-A KUBE-POD-FW-CLIENT -j DROP\n");
    for (_, ip, _) in &topo.backends {
        for port in [SERVER_PORT, DIRECT_PORT] {
            rules.push_str(&format!(
                "-A KUBE-NWPLCY-OUT -d {ip}/32 -p tcp -m tcp --dport {port} -j ACCEPT\n"
            ));
        }
    }
    format!("{chains}{rules}COMMIT\n")
}

fn filter_flush(topo: &Topology) {
    for args in [["-t", "filter", "-F"], ["-t", "filter", "-X"]] {
        let _ = datapath::ns_command(&topo.node, "iptables")
            .args(args)
            .status();
    }
}

fn median(mut v: Vec<Load>) -> Load {
    v.sort_by(|a, b| a.conns_per_sec.total_cmp(&b.conns_per_sec));
    v[v.len() / 2]
}

/// Runs the whole comparison (outside any async runtime: it makes its own).
pub fn run(args: Args) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the policy benchmark builds network namespaces and loads BPF: run it as root");
    }
    if args.rounds == 0 || args.load_policies == 0 {
        bail!("--rounds and --load-policies must be at least 1");
    }
    let tag = std::process::id().to_string();
    let mut cost = Vec::new();
    for &n in &args.policies {
        eprintln!("BPF_PROG_RUN, {n} policies …");
        cost.push((n, prog_run_cost(n.max(1), &tag)?));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let topo = rt.block_on(Topology::build(&format!("pol{tag}")))?;
    let stop = Arc::new(AtomicBool::new(false));
    let result = compare(&args, &topo, &tag, stop.clone());
    stop.store(true, Ordering::Relaxed);
    filter_flush(&topo);
    iptables_flush(&topo);
    rt.block_on(topo.remove());
    let loads = result?;
    print(&args, &cost, &loads);
    Ok(())
}

/// Medians of (eBPF off, eBPF on, kernel without rules, iptables rules).
fn compare(args: &Args, topo: &Topology, tag: &str, stop: Arc<AtomicBool>) -> Result<[Load; 4]> {
    let _servers = datapath::start_servers(topo, stop)?;
    let targets: Vec<SocketAddrV4> = topo
        .backends
        .iter()
        .map(|(_, ip, _)| SocketAddrV4::new(*ip, DIRECT_PORT))
        .collect();
    let servers: Vec<Ipv4Addr> = topo.backends.iter().map(|b| b.1).collect();
    let n = args.load_policies;
    let all = policies(n);
    let none: Vec<NetworkPolicy> = Vec::new();
    let run = |what: &str| -> Result<Load> {
        eprintln!("{what} …");
        let l = datapath::load(topo, &targets, args.seconds, args.concurrency)?;
        if l.conns_per_sec == 0.0 {
            bail!("{what}: no connection completed ({} failed)", l.failed);
        }
        Ok(l)
    };
    let mut out: [Vec<Load>; 4] = Default::default();
    let ebpf = Ebpf::attach(topo, &format!("pol{tag}"))?;
    let r = (|| -> Result<()> {
        for round in 0..args.rounds {
            program(&ebpf.pins, &view(n, &none, topo.client.1, true, &servers))?;
            out[0].push(run(&format!("round {round}: eBPF, no policy"))?);
            let keys = program(&ebpf.pins, &view(n, &all, topo.client.1, true, &servers))?;
            out[1].push(run(&format!(
                "round {round}: eBPF, {n} policies ({keys} keys)"
            ))?);
        }
        Ok(())
    })();
    ebpf.remove();
    r?;
    for round in 0..args.rounds {
        filter_flush(topo);
        out[2].push(run(&format!("round {round}: kernel forwarding, no rules"))?);
        iptables_restore(topo, &iptables_rules(topo, n)).context("the iptables policy rules")?;
        out[3].push(run(&format!("round {round}: iptables, {n} policies"))?);
    }
    filter_flush(topo);
    let [a, b, c, d] = out;
    Ok([median(a), median(b), median(c), median(d)])
}

fn print(args: &Args, cost: &[(usize, Cost)], loads: &[Load; 4]) {
    println!("\n## `to-pod` per packet with policies selecting the pod (BPF_PROG_RUN)\n");
    println!(
        "| policies | keys | not isolated ns | new, allowed ns | new, refused ns | tracked ns | new-flow check ns |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for (n, c) in cost {
        println!(
            "| {n} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
            c.keys,
            c.open,
            c.allowed,
            c.denied,
            c.tracked,
            c.allowed - c.open
        );
    }
    println!(
        "\n## New connections through the veth path ({} policies; median of {} rounds of {} s, {} in flight)\n",
        args.load_policies, args.rounds, args.seconds, args.concurrency
    );
    println!("| mode | conns/s | of the same path without policy | connect p99 ms | failed |");
    println!("|---|---:|---:|---:|---:|");
    let rows = [
        ("eBPF, no policy", &loads[0], &loads[0]),
        ("eBPF, policies enforced", &loads[1], &loads[0]),
        ("kernel forwarding, no rules", &loads[2], &loads[2]),
        ("iptables rules (kube-router layout)", &loads[3], &loads[2]),
    ];
    for (mode, l, base) in rows {
        println!(
            "| {mode} | {:.0} | {:.2} | {:.2} | {} |",
            l.conns_per_sec,
            l.conns_per_sec / base.conns_per_sec,
            l.connect_p99_ms,
            l.failed
        );
    }
    let overhead =
        |on: &Load, off: &Load| (off.conns_per_sec - on.conns_per_sec) / off.conns_per_sec * 100.0;
    println!(
        "\niptables policy new-conn overhead %: {:.1}",
        overhead(&loads[3], &loads[2])
    );
    println!(
        "policy new-conn overhead %: {:.1}",
        overhead(&loads[1], &loads[0])
    );
}
