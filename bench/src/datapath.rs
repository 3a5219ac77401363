//! Service routing: skiff's eBPF data path against kube-proxy's iptables mode, on one topology
//! built for the run (as root): a client pod namespace → a node namespace → four backend pod
//! namespaces, each pod wired exactly as the agent wires real pods (`skiff_net::pod`), the same
//! client and server programs for every mode.
//!
//! Modes: `direct` (the client connects to the backends' pod IPs: no translation, the topology's
//! own limit); `ebpf` (skiff's `from-pod`/`to-pod` on the pods' interfaces and the pods in its
//! endpoint map, attached by the agent's own code, N Services of 4
//! endpoints programmed through the agent's own `Tracker` and `Programmer`); `iptables` (the chains kube-proxy
//! generates — KUBE-SERVICES → KUBE-SVC-* with statistic-mode-random → KUBE-SEP-* DNAT — for the
//! same N Services, loaded with `iptables-restore` in the node namespace). The client targets
//! the middle Service of the N (an average position in KUBE-SERVICES' linear walk).
//!
//! Measured per mode and N: new TCP connections per second (connect, one request, one reply,
//! close; `--concurrency` at once) and the p99 connect latency; programming time of all N from
//! scratch and of one endpoint change with N present (a map update vs an `iptables-restore` of
//! the table, as kube-proxy's sync writes it); bulk throughput of one long flow (iperf3); and,
//! by BPF_PROG_RUN, the per-packet cost of `from-pod` for a new connection (service lookup,
//! backend choice, DNAT, connection tracking) and for an established one, at 1, 10k and 100k
//! Services. Prints markdown tables, writes a chart, and ends with
//! `ebpf/iptables new-conn ratio at 10000 services: R`.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use skiff_agent::services::{
    desired::{self as desired_mod, NodeView},
    programmer::Programmer,
    tracker::Tracker,
};
use skiff_agent::{datapath::PodPrograms, pods::PodDatapath};
use skiff_datapath::{LoadedProgram, PinDir, ProgramKind, lb::LbMaps};
use skiff_net::{NetNs, Netlink, pod as podnet};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Options of `skiff-bench datapath`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Seconds of load per mode and service count.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Service counts to compare at.
    #[arg(long, value_delimiter = ',', default_value = "1,1000,10000")]
    services: Vec<usize>,
    /// Service counts for the BPF_PROG_RUN per-packet cost.
    #[arg(long, value_delimiter = ',', default_value = "1,10000,100000")]
    prog_run_services: Vec<usize>,
    /// Connections in flight at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Where the chart goes.
    #[arg(long, default_value = "target/bench-datapath.png")]
    chart: PathBuf,
}

pub(crate) const SERVER_PORT: u16 = 8080;
/// The servers' port for direct connections. A port of its own keeps the direct run's TIME_WAIT
/// sockets (whose sequence numbers and timestamps were chosen for the pod IP) from refusing the
/// Service runs' SYNs (chosen for the frontend address) when a client port comes round again.
pub(crate) const DIRECT_PORT: u16 = 8081;
const IPERF_PORT: u16 = 5201;
const SERVICE_PORT: u16 = 80;

/// The topology: pod namespaces under a private directory, a node namespace.
pub(crate) struct Topology {
    dir: PathBuf,
    pub(crate) node: NetNs,
    pub(crate) client: (NetNs, Ipv4Addr, String),
    pub(crate) backends: Vec<(NetNs, Ipv4Addr, String)>,
    /// Every pod's network as `skiff_net::pod` built it (client first).
    pub(crate) nets: Vec<podnet::PodNetwork>,
}

impl Topology {
    pub(crate) async fn build(tag: &str) -> Result<Topology> {
        // Named namespaces like `ip netns` makes, so leftovers are visible and removable.
        let dir = PathBuf::from(skiff_net::netns::DEFAULT_NETNS_DIR);
        let node =
            NetNs::create(&dir, &format!("skiff-bench-{tag}-node")).context("node namespace")?;
        let nl = Netlink::connect_in(&node)?;
        nl.set_up("lo").await?;
        let pod = |i: u8| async move {
            let uid = format!("bench-{tag}-{i}");
            let ip = Ipv4Addr::new(10, 244, 250, 10 + i);
            anyhow::Ok((uid, ip))
        };
        let mut made = Vec::new();
        let mut nets = Vec::new();
        for i in 0..5u8 {
            let (uid, ip) = pod(i).await?;
            let net = podnet::setup(&nl, Some(&node), &dir, &uid, ip)
                .await
                .with_context(|| format!("pod network {i}"))?;
            made.push((NetNs::open(&net.netns)?, ip, net.host_if.clone()));
            nets.push(net);
        }
        let client = made.remove(0);
        Ok(Topology {
            dir,
            node,
            client,
            backends: made,
            nets,
        })
    }

    fn tag(&self) -> String {
        self.node
            .path()
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("skiff-bench-"))
            .and_then(|n| n.strip_suffix("-node"))
            .unwrap_or_default()
            .to_string()
    }

    pub(crate) async fn remove(self) {
        let tag = self.tag();
        if let Ok(nl) = Netlink::connect_in(&self.node) {
            for i in 0..5u8 {
                let _ = podnet::teardown(&nl, &self.dir, &format!("bench-{tag}-{i}")).await;
            }
        }
        let _ = skiff_net::netns::remove_path(self.node.path());
    }
}

/// Runs `f` on a thread inside `ns` (sockets it creates belong to `ns`).
pub(crate) fn in_ns<R: Send>(ns: &NetNs, f: impl FnOnce() -> R + Send) -> Result<R> {
    Ok(ns.run(f)?)
}

/// A command run inside `ns`.
pub(crate) fn ns_command(ns: &NetNs, program: &str) -> Command {
    let mut cmd = Command::new(program);
    let fd = ns.as_raw_fd();
    // SAFETY: the closure runs in the forked child before exec and only calls setns(2), which
    // is async-signal-safe; `fd` stays open in the parent (owned by `ns`).
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// The request/reply servers: one listener per backend, served on a runtime of their own.
pub(crate) fn start_servers(
    topo: &Topology,
    stop: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<()>> {
    let mut listeners = Vec::new();
    for (ns, ip, _) in &topo.backends {
        for port in [SERVER_PORT, DIRECT_PORT] {
            let addr = SocketAddrV4::new(*ip, port);
            let l = in_ns(ns, move || std::net::TcpListener::bind(addr))??;
            l.set_nonblocking(true)?;
            listeners.push(l);
        }
    }
    Ok(std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("server runtime");
        rt.block_on(async move {
            for l in listeners {
                let l = tokio::net::TcpListener::from_std(l).expect("listener");
                tokio::spawn(async move {
                    while let Ok((mut s, _)) = l.accept().await {
                        tokio::spawn(async move {
                            let mut buf = [0u8; 64];
                            if s.read(&mut buf).await.is_ok() {
                                let _ = s.write_all(b"HTTP/1.0 200 OK\r\n\r\nok\n").await;
                            }
                        });
                    }
                });
            }
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
    }))
}

/// What one load run measured.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Load {
    pub(crate) conns_per_sec: f64,
    pub(crate) connect_p99_ms: f64,
    pub(crate) failed: u64,
}

/// `concurrency` loops of connect → request → reply → close against `targets` (round robin)
/// for `secs`, from a runtime whose threads live in the client's namespace.
pub(crate) fn load(
    topo: &Topology,
    targets: &[SocketAddrV4],
    secs: u64,
    concurrency: usize,
) -> Result<Load> {
    let fd = topo.client.0.as_raw_fd();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .on_thread_start(move || {
            // SAFETY: setns(2) on a descriptor that stays open for the runtime's life.
            unsafe { libc::setns(fd, libc::CLONE_NEWNET) };
        })
        .build()?;
    let targets = targets.to_vec();
    rt.block_on(async move {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut tasks = Vec::new();
        for w in 0..concurrency {
            let targets = targets.clone();
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut failed = 0u64;
                let mut ok = 0u64;
                let mut i = w;
                while Instant::now() < deadline {
                    let to = targets[i % targets.len()];
                    i += 1;
                    let t = Instant::now();
                    let Ok(Ok(mut s)) = tokio::time::timeout(
                        Duration::from_secs(2),
                        tokio::net::TcpStream::connect(to),
                    )
                    .await
                    else {
                        failed += 1;
                        continue;
                    };
                    lat.push(t.elapsed());
                    if s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.is_err() {
                        failed += 1;
                        continue;
                    }
                    let mut buf = Vec::with_capacity(64);
                    if s.read_to_end(&mut buf).await.is_err() || buf.is_empty() {
                        failed += 1;
                    } else {
                        ok += 1;
                    }
                }
                (lat, failed, ok)
            }));
        }
        let mut all = Vec::new();
        let (mut failed, mut ok) = (0, 0);
        for t in tasks {
            let (l, f, o) = t.await?;
            all.extend(l);
            failed += f;
            ok += o;
        }
        all.sort();
        let p99 = all
            .get(all.len().saturating_sub(1) * 99 / 100)
            .copied()
            .unwrap_or_default();
        anyhow::Ok(Load {
            conns_per_sec: ok as f64 / secs as f64,
            connect_p99_ms: p99.as_secs_f64() * 1000.0,
            failed,
        })
    })
}

/// The address of Service `i` of `n`; the middle one, the client's target, has the same
/// address at every `n` (see [`DIRECT_PORT`]: a new address would meet the last run's TIME_WAIT
/// sockets with unrelated sequence numbers).
fn vip_of(i: usize, n: usize) -> Ipv4Addr {
    if i == n / 2 {
        return target_vip();
    }
    // 10.96.0.0/12 holds 2^20 addresses; skip .0 of each /24 for readability.
    let k = i as u32 + 1 + (i as u32 / 255);
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + k)
}

fn target_vip() -> Ipv4Addr {
    Ipv4Addr::new(10, 110, 0, 1)
}

fn iperf_vip() -> Ipv4Addr {
    Ipv4Addr::new(10, 111, 0, 1)
}

/// The cluster's objects for `n` Services of the four backends (plus the iperf Service), as
/// the agent sees them: the benchmark programs the maps through the agent's own `Tracker` and `Programmer`.
struct Objects {
    services: Vec<Service>,
    slices: Vec<EndpointSlice>,
}

const BENCH_NODE: &str = "bench-node";

fn slice(name: &str, port: u16, addrs: &[Ipv4Addr]) -> EndpointSlice {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": format!("{name}-x"), "namespace": "bench",
                     "labels": {desired_mod::SERVICE_NAME_LABEL: name}},
        "addressType": "IPv4",
        "ports": [{"port": port}],
        "endpoints": addrs.iter().map(|a| serde_json::json!({
            "addresses": [a.to_string()], "nodeName": BENCH_NODE})).collect::<Vec<_>>(),
    }))
    .expect("a valid EndpointSlice")
}

fn service(name: &str, vip: Ipv4Addr, port: u16) -> Service {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "namespace": "bench"},
        "spec": {"clusterIP": vip.to_string(), "ports": [{"port": port}]},
    }))
    .expect("a valid Service")
}

fn objects(backends: &[Ipv4Addr], n: usize) -> Objects {
    let mut services = Vec::with_capacity(n + 1);
    let mut slices = Vec::with_capacity(n + 1);
    for i in 0..n {
        let name = format!("s{i}");
        services.push(service(&name, vip_of(i, n), SERVICE_PORT));
        slices.push(slice(&name, SERVER_PORT, backends));
    }
    services.push(service("iperf", iperf_vip(), IPERF_PORT));
    slices.push(slice("iperf", IPERF_PORT, &backends[..1]));
    Objects { services, slices }
}

/// The agent's service state for the benchmark's node.
fn tracker() -> Tracker {
    Tracker::new(NodeView {
        name: BENCH_NODE.to_string(),
        addresses: Vec::new(),
        xdp_fast_path: false,
    })
}

/// One agent pass: the Services the events touched recomputed, then the maps brought to them.
fn pass(tracker: &mut Tracker, programmer: &mut Programmer, maps: &mut LbMaps) -> Result<()> {
    let report = skiff_agent::services::pass(tracker, programmer, Vec::new(), maps).report;
    if let Some((k, e)) = report.errors.first() {
        bail!("programming {k:?}: {e}");
    }
    Ok(())
}

impl Objects {
    /// Programs every object into empty maps, as an agent's first pass after its initial
    /// lists (the objects arrive owned from the watch, so the copies are made untimed).
    fn program_all(
        &self,
        tracker: &mut Tracker,
        programmer: &mut Programmer,
        maps: &mut LbMaps,
    ) -> Result<Duration> {
        let (services, slices) = (self.services.clone(), self.slices.clone());
        let t = Instant::now();
        tracker.replace_services(services);
        tracker.replace_slices(slices);
        pass(tracker, programmer, maps)?;
        Ok(t.elapsed())
    }
}

/// kube-proxy's nat table for `n` Services of the four backends (its iptables mode, the rules
/// that matter per packet: the KUBE-SERVICES walk, the masquerade mark, the random split, DNAT).
fn iptables_rules(topo: &Topology, n: usize) -> String {
    let mut chains = String::from(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n\
         :KUBE-SERVICES - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n:KUBE-POSTROUTING - [0:0]\n",
    );
    let mut rules = String::from(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         -A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0\n\
         -A KUBE-POSTROUTING -j MASQUERADE --random-fully\n",
    );
    let mut svc = |name: String, vip: Ipv4Addr, port: u16, eps: Vec<(Ipv4Addr, u16)>| {
        let (c, r) = service_rules(&name, vip, port, &eps);
        chains.push_str(&c);
        rules.push_str(&r);
    };
    let eps: Vec<(Ipv4Addr, u16)> = topo.backends.iter().map(|b| (b.1, SERVER_PORT)).collect();
    for i in 0..n {
        svc(format!("S{i:06}"), vip_of(i, n), SERVICE_PORT, eps.clone());
    }
    svc(
        "IPERF".to_string(),
        iperf_vip(),
        IPERF_PORT,
        vec![(topo.backends[0].1, IPERF_PORT)],
    );
    format!("{chains}{rules}COMMIT\n")
}

/// The chains and rules of one Service: its KUBE-SERVICES jump, KUBE-SVC-* with the masquerade
/// mark and the random split, a KUBE-SEP-* DNAT per endpoint.
fn service_rules(
    name: &str,
    vip: Ipv4Addr,
    port: u16,
    eps: &[(Ipv4Addr, u16)],
) -> (String, String) {
    let (mut chains, mut rules) = (String::new(), String::new());
    let svc_chain = format!("KUBE-SVC-{name}");
    chains.push_str(&format!(":{svc_chain} - [0:0]\n"));
    rules.push_str(&format!(
        "-A KUBE-SERVICES -d {vip}/32 -p tcp -m comment --comment \"bench/{name}\" -m tcp --dport {port} -j {svc_chain}\n"
    ));
    rules.push_str(&service_chain_rules(name, vip, port, eps, &mut chains));
    (chains, rules)
}

/// KUBE-SVC-* and KUBE-SEP-* of one Service (what a kube-proxy sync writes for an endpoint
/// change); declares their chains in `chains`.
fn service_chain_rules(
    name: &str,
    vip: Ipv4Addr,
    port: u16,
    eps: &[(Ipv4Addr, u16)],
    chains: &mut String,
) -> String {
    let svc_chain = format!("KUBE-SVC-{name}");
    let mut rules = format!(
        "-A {svc_chain} ! -s 10.244.0.0/16 -d {vip}/32 -p tcp -m tcp --dport {port} -j KUBE-MARK-MASQ\n"
    );
    let k = eps.len();
    for (j, (ip, p)) in eps.iter().enumerate() {
        let sep = format!("KUBE-SEP-{name}-{j}");
        chains.push_str(&format!(":{sep} - [0:0]\n"));
        if j + 1 < k {
            rules.push_str(&format!(
                "-A {svc_chain} -m statistic --mode random --probability {:.10} -j {sep}\n",
                1.0 / (k - j) as f64
            ));
        } else {
            rules.push_str(&format!("-A {svc_chain} -j {sep}\n"));
        }
        rules.push_str(&format!(
            "-A {sep} -s {ip}/32 -j KUBE-MARK-MASQ\n-A {sep} -p tcp -m tcp -j DNAT --to-destination {ip}:{p}\n"
        ));
    }
    rules
}

/// One endpoint leaving Service `i` of `n`, as kube-proxy's minimized restore (its default
/// since 1.27) writes it: only that Service's chains, restored with `--noflush`, the gone
/// endpoint's chain deleted.
fn iptables_one_change(topo: &Topology, i: usize, n: usize) -> String {
    let name = format!("S{i:06}");
    let mut eps: Vec<(Ipv4Addr, u16)> = topo.backends.iter().map(|b| (b.1, SERVER_PORT)).collect();
    let gone = eps.len() - 1;
    eps.pop();
    // The gone endpoint's chain is declared too (which flushes it) so it can be deleted.
    let mut chains = format!(":KUBE-SVC-{name} - [0:0]\n:KUBE-SEP-{name}-{gone} - [0:0]\n");
    let rules = service_chain_rules(&name, vip_of(i, n), SERVICE_PORT, &eps, &mut chains);
    format!("*nat\n{chains}{rules}-X KUBE-SEP-{name}-{gone}\nCOMMIT\n")
}

pub(crate) fn iptables_restore(topo: &Topology, rules: &str) -> Result<Duration> {
    iptables_restore_with(topo, rules, &[])
}

fn iptables_restore_with(topo: &Topology, rules: &str, args: &[&str]) -> Result<Duration> {
    use std::io::Write;
    let t = Instant::now();
    let mut child = ns_command(&topo.node, "iptables-restore")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("iptables-restore (Debian package iptables)")?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(rules.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "iptables-restore failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(t.elapsed())
}

pub(crate) fn iptables_flush(topo: &Topology) {
    let _ = ns_command(&topo.node, "iptables")
        .args(["-t", "nat", "-F"])
        .status();
    let _ = ns_command(&topo.node, "iptables")
        .args(["-t", "nat", "-X"])
        .status();
}

/// iperf3 throughput (Gbit/s) of one flow from the client to `to` for `secs`.
fn iperf(topo: &Topology, to: Ipv4Addr, secs: u64) -> Result<f64> {
    let mut server = ns_command(&topo.backends[0].0, "iperf3")
        .args(["-s", "-1", "-p", &IPERF_PORT.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("iperf3 (Debian package iperf3)")?;
    std::thread::sleep(Duration::from_millis(300));
    let out = ns_command(&topo.client.0, "iperf3")
        .args([
            "-c",
            &to.to_string(),
            "-p",
            &IPERF_PORT.to_string(),
            "-t",
            &secs.to_string(),
            "-J",
        ])
        .output()?;
    let _ = server.wait();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3 JSON")?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .context("iperf3 reported no throughput")
}

/// One row of the comparison.
struct Row {
    mode: &'static str,
    services: usize,
    load: Load,
    program_all_ms: Option<f64>,
    one_change_ms: Option<f64>,
}

/// The eBPF mode's programs on the topology's interfaces, with their pins.
pub(crate) struct Ebpf {
    pub(crate) pins: PinDir,
    _programs: PodPrograms,
    maps: LbMaps,
    programmer: Programmer,
}

impl Ebpf {
    pub(crate) fn attach(topo: &Topology, tag: &str) -> Result<Ebpf> {
        let pins = PinDir::create(
            Path::new(skiff_datapath::bpffs::DEFAULT_BPFFS),
            &format!("bench-{tag}"),
        )?;
        let programs = vec![
            LoadedProgram::load(ProgramKind::FromPod, &pins)?,
            LoadedProgram::load(ProgramKind::ToPod, &pins)?,
        ];
        // As the agent does it: its own pod-programs attachment (links and endpoint entries),
        // in the node's namespace where the interfaces are.
        let nets = topo.nets.clone();
        let pins2 = pins.clone();
        let pods = in_ns(&topo.node, move || -> Result<PodPrograms> {
            let pods = PodPrograms::new(pins2, programs)?;
            // No policy gate: the benchmark's pods are not isolated.
            let pod = k8s_openapi::api::core::v1::Pod::default();
            for net in &nets {
                pods.attach(net, &pod)?;
            }
            Ok(pods)
        })??;
        Ok(Ebpf {
            maps: LbMaps::open(&pins)?,
            pins,
            _programs: pods,
            programmer: Programmer::new(),
        })
    }

    pub(crate) fn remove(self) {
        drop(self._programs);
        let _ = self.pins.remove();
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// BPF_PROG_RUN cost of `from-pod` (ns per packet) for a new connection and an established one.
fn prog_run_cost(n: usize, tag: &str) -> Result<(f64, f64)> {
    let pins = PinDir::create(
        Path::new(skiff_datapath::bpffs::DEFAULT_BPFFS),
        &format!("benchrun-{tag}-{n}"),
    )?;
    let result = (|| -> Result<(f64, f64)> {
        let prog = LoadedProgram::load(ProgramKind::FromPod, &pins)?;
        let mut maps = LbMaps::open(&pins)?;
        let backends: Vec<Ipv4Addr> = (0..4u8)
            .map(|i| Ipv4Addr::new(10, 244, 250, 11 + i))
            .collect();
        objects(&backends, n).program_all(&mut tracker(), &mut Programmer::new(), &mut maps)?;
        let target = target_vip().octets();
        let client = [10, 244, 250, 10];
        let syn = |sport: u16| syn_frame(client, target, sport, SERVICE_PORT);
        // New connections: distinct source ports, one run each.
        let runs = 2000u16;
        let mut total = Duration::ZERO;
        for i in 0..runs {
            total += prog.bench_run(&syn(20000 + i), 1)?;
        }
        let new_ns = total.as_nanos() as f64 / runs as f64;
        // Established: the same tracked packet many times.
        let est = prog.bench_run(&syn(20000), 100_000)?;
        Ok((new_ns, est.as_nanos() as f64))
    })();
    let _ = pins.remove();
    result
}

/// An Ethernet/IPv4/TCP SYN with valid checksums.
pub(crate) fn syn_frame(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(54);
    f.extend_from_slice(&[2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00]);
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&src);
    ip[16..20].copy_from_slice(&dst);
    let c = csum(&ip, 0);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[4..8].copy_from_slice(&1u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02;
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let mut pseudo = Vec::from(&src[..]);
    pseudo.extend_from_slice(&dst);
    pseudo.extend_from_slice(&[0, 6, 0, 20]);
    let c = csum(&tcp, sum(&pseudo));
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&tcp);
    f
}

fn sum(b: &[u8]) -> u32 {
    b.chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum()
}

fn csum(b: &[u8], init: u32) -> u16 {
    let mut s = init + sum(b);
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

fn chart(path: &Path, rows: &[Row], direct: f64) -> Result<()> {
    use plotters::prelude::*;
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let max_n = rows.iter().map(|r| r.services).max().unwrap_or(1) as f64;
    let max_y = rows
        .iter()
        .map(|r| r.load.conns_per_sec)
        .fold(direct, f64::max)
        * 1.15;
    let mut c = ChartBuilder::on(&root)
        .caption(
            "New TCP connections/s through a Service (4 endpoints)",
            ("sans-serif", 22),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((1f64..max_n.max(10.0)).log_scale(), 0f64..max_y)?;
    c.configure_mesh()
        .x_desc("Services")
        .y_desc("connections/s")
        .draw()?;
    let series = |mode: &str| -> Vec<(f64, f64)> {
        rows.iter()
            .filter(|r| r.mode == mode)
            .map(|r| (r.services as f64, r.load.conns_per_sec))
            .collect()
    };
    for (mode, color) in [("ebpf", BLUE), ("iptables", RED)] {
        let pts = series(mode);
        c.draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(mode.to_string())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        c.draw_series(pts.into_iter().map(|p| Circle::new(p, 4, color.filled())))?;
    }
    c.draw_series(LineSeries::new(
        vec![(1.0, direct), (max_n.max(10.0), direct)],
        BLACK.stroke_width(1),
    ))?
    .label("direct to pod IPs (no translation)")
    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
    c.configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()?;
    root.present()?;
    Ok(())
}

/// Runs the whole comparison (outside any async runtime: it makes its own).
pub fn run(args: Args) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the datapath benchmark builds network namespaces and loads BPF: run it as root");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let tag = std::process::id().to_string();
    let topo = rt.block_on(Topology::build(&tag))?;
    let stop = Arc::new(AtomicBool::new(false));
    let result = compare(&args, &topo, &tag, stop.clone());
    stop.store(true, Ordering::Relaxed);
    iptables_flush(&topo);
    rt.block_on(topo.remove());
    result
}

fn compare(args: &Args, topo: &Topology, tag: &str, stop: Arc<AtomicBool>) -> Result<()> {
    let servers = start_servers(topo, stop)?;
    let secs = args.seconds;
    let direct_targets: Vec<SocketAddrV4> = topo
        .backends
        .iter()
        .map(|(_, ip, _)| SocketAddrV4::new(*ip, DIRECT_PORT))
        .collect();
    eprintln!("direct to the pod IPs …");
    let direct = load(topo, &direct_targets, secs, args.concurrency)?;
    let iperf_direct = iperf(topo, topo.backends[0].1, secs.min(5))?;
    let mut rows = Vec::new();
    let mut iperf_rows = vec![("direct", 0usize, iperf_direct)];
    let largest = args.services.iter().copied().max().unwrap_or(1);

    // eBPF.
    let backend_ips: Vec<Ipv4Addr> = topo.backends.iter().map(|b| b.1).collect();
    let mut ebpf = Ebpf::attach(topo, tag)?;
    for &n in &args.services {
        // From scratch: an empty map, then all N (a fresh agent state each time) through one
        // agent pass over the Service and EndpointSlice objects.
        ebpf.programmer.apply(&BTreeMap::new(), &mut ebpf.maps);
        ebpf.programmer = Programmer::new();
        let mut state = tracker();
        let objs = objects(&backend_ips, n);
        let all = objs.program_all(&mut state, &mut ebpf.programmer, &mut ebpf.maps)?;
        // One endpoint leaves the target Service's slice: the agent's whole pass for that
        // watch event, from the event to the maps updated.
        let mut fewer = objs.slices[n / 2].clone();
        fewer.endpoints.pop();
        let t = Instant::now();
        state.set_slice(fewer);
        pass(&mut state, &mut ebpf.programmer, &mut ebpf.maps)?;
        let one = t.elapsed();
        state.set_slice(objs.slices[n / 2].clone());
        pass(&mut state, &mut ebpf.programmer, &mut ebpf.maps)?;
        eprintln!("ebpf, {n} services …");
        let l = load(
            topo,
            &[SocketAddrV4::new(target_vip(), SERVICE_PORT)],
            secs,
            args.concurrency,
        )?;
        rows.push(Row {
            mode: "ebpf",
            services: n,
            load: l,
            program_all_ms: Some(ms(all)),
            one_change_ms: Some(ms(one)),
        });
        if n == largest {
            iperf_rows.push(("ebpf", n, iperf(topo, iperf_vip(), secs.min(5))?));
        }
    }
    ebpf.programmer.apply(&BTreeMap::new(), &mut ebpf.maps);
    ebpf.remove();

    // kube-proxy's iptables mode.
    for &n in &args.services {
        iptables_flush(topo);
        let all = iptables_restore(topo, &iptables_rules(topo, n))?;
        let one =
            iptables_restore_with(topo, &iptables_one_change(topo, n / 2, n), &["--noflush"])?;
        iptables_restore(topo, &iptables_rules(topo, n))?;
        eprintln!("iptables, {n} services …");
        let l = load(
            topo,
            &[SocketAddrV4::new(target_vip(), SERVICE_PORT)],
            secs,
            args.concurrency,
        )?;
        rows.push(Row {
            mode: "iptables",
            services: n,
            load: l,
            program_all_ms: Some(ms(all)),
            one_change_ms: Some(ms(one)),
        });
        if n == largest {
            iperf_rows.push(("iptables", n, iperf(topo, iperf_vip(), secs.min(5))?));
        }
    }
    iptables_flush(topo);
    drop(servers);

    // BPF_PROG_RUN.
    let mut cost = Vec::new();
    for &n in &args.prog_run_services {
        eprintln!("BPF_PROG_RUN, {n} services …");
        cost.push((n, prog_run_cost(n, tag)?));
    }

    println!(
        "\n## New connections through a Service (client pod → node → 4 backend pods; {} s, {} in flight)\n",
        secs, args.concurrency
    );
    println!(
        "| mode | services | conns/s | of direct | connect p99 ms | failed | program all ms | one endpoint change ms |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    println!(
        "| direct (pod IPs) | - | {:.0} | 1.00 | {:.2} | {} | - | - |",
        direct.conns_per_sec, direct.connect_p99_ms, direct.failed
    );
    for r in &rows {
        println!(
            "| {} | {} | {:.0} | {:.2} | {:.2} | {} | {:.1} | {:.2} |",
            r.mode,
            r.services,
            r.load.conns_per_sec,
            r.load.conns_per_sec / direct.conns_per_sec,
            r.load.connect_p99_ms,
            r.load.failed,
            r.program_all_ms.unwrap_or_default(),
            r.one_change_ms.unwrap_or_default()
        );
    }
    println!("\n## One long flow (iperf3)\n");
    println!("| mode | services | Gbit/s |");
    println!("|---|---:|---:|");
    for (mode, n, g) in &iperf_rows {
        println!("| {mode} | {n} | {g:.2} |");
    }
    println!("\n## `from-pod` per packet (BPF_PROG_RUN)\n");
    println!("| services | new connection ns | established ns |");
    println!("|---:|---:|---:|");
    for (n, (new, est)) in &cost {
        println!("| {n} | {new:.0} | {est:.0} |");
    }
    chart(&args.chart, &rows, direct.conns_per_sec)?;
    println!("\nchart: {}", args.chart.display());
    let at = |mode: &str| {
        rows.iter()
            .find(|r| r.mode == mode && r.services == largest)
            .map(|r| r.load.conns_per_sec)
            .unwrap_or(0.0)
    };
    let ratio = at("ebpf") / at("iptables").max(1.0);
    println!("ebpf/iptables new-conn ratio at {largest} services: {ratio:.2}");
    Ok(())
}
