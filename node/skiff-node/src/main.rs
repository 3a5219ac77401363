//! `skiff-node`: the node agent, and the CLI to inspect its data path.
//!
//! Without a subcommand it runs the agent: it loads every eBPF program through the verifier,
//! pins the shared maps under `<bpffs>/skiff/<node>/` (reusing maps left by a previous run),
//! attaches the uplink program to each `--uplink`, joins the cluster when given `--kubeconfig`
//! (registers its Node, renews its Lease, posts status), and runs until SIGINT/SIGTERM. On exit
//! the programs detach; the pinned maps stay for the next run.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use skiff_datapath::{
    LoadedProgram, PinDir, ProgramKind,
    bpffs::DEFAULT_BPFFS,
    metrics::{self, Verdict},
};
use skiff_ebpf_common::DropReason;

mod flows;
mod inspect;
mod reset;

#[derive(Debug, Parser)]
#[command(name = "skiff-node", version, about, long_about = None)]
struct Cli {
    /// This node's name: names its pin directory and (later) its Node object.
    /// Defaults to the host name.
    #[arg(long, env = "SKIFF_NODE_NAME", global = true)]
    node_name: Option<String>,

    /// Where bpffs is (or will be) mounted.
    #[arg(long, default_value = DEFAULT_BPFFS, global = true)]
    bpffs: PathBuf,

    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,

    /// Uplink interfaces (in the agent's network namespace) to attach the XDP program to.
    #[arg(long = "uplink", value_name = "IFACE")]
    uplinks: Vec<String>,

    /// Join the cluster with this kubeconfig (`skiff-control` writes `node.kubeconfig` with the
    /// node bootstrap token). Without it the agent runs the data path only.
    #[arg(long, env = "SKIFF_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,

    /// The node's address (its InternalIP). Default: the first global IPv4 address of the
    /// agent's network namespace.
    #[arg(long)]
    node_ip: Option<std::net::Ipv4Addr>,

    /// Where the agent keeps its state.
    #[arg(long, default_value = "/var/lib/skiff/node", global = true)]
    data_dir: PathBuf,

    /// The agent's HTTPS port (logs and exec), published as the node's kubelet endpoint.
    #[arg(long, default_value_t = 10250)]
    port: u16,

    /// Where the agent keeps runtime state (pod namespaces, runc state, containerd's socket).
    #[arg(long, default_value = "/run/skiff/node", global = true)]
    run_dir: PathBuf,

    /// An existing containerd socket to use; without it the agent starts and supervises its
    /// own containerd (from PATH) with state under --data-dir and --run-dir.
    #[arg(long)]
    containerd: Option<PathBuf>,

    /// OCI image-layout archives to import into containerd at start (repeatable); their
    /// `org.opencontainers.image.ref.name` annotation names the image.
    #[arg(long = "import-image", value_name = "ARCHIVE")]
    import_images: Vec<PathBuf>,

    /// A registry (`host:port`) to reach over plain HTTP instead of HTTPS (repeatable);
    /// loopback registries always are.
    #[arg(long = "insecure-registry", value_name = "HOST:PORT")]
    insecure_registries: Vec<String>,

    /// The simulated runtime, for scale tests: register N nodes named `<node-name>-<i>` (label
    /// `skiff.dev/simulated=true`) and drive their pods through their phases without
    /// containers. Needs --kubeconfig; nothing else runs.
    #[arg(long, value_name = "N")]
    simulate: Option<usize>,

    /// Simulated pods become Running this long after they are bound (`500ms`, `2s`, …).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    simulate_start_delay: std::time::Duration,

    /// How often configMap, secret, downwardAPI and projected volumes are brought up to date
    /// (the kubelet's sync period).
    #[arg(long, default_value = "1m", value_parser = parse_duration)]
    volume_sync_period: std::time::Duration,

    /// Where the Prometheus endpoint (`/metrics`, plain HTTP) listens; `off` disables it.
    #[arg(long, default_value = "127.0.0.1:10249")]
    metrics_addr: String,

    /// The cluster DNS address written into pods' resolv.conf (`dnsPolicy: ClusterFirst`): the
    /// `kube-system/kube-dns` Service.
    #[arg(long, default_value_t = skiff_agent::dns::CLUSTER_DNS_IP)]
    cluster_dns: std::net::Ipv4Addr,

    /// Don't run the built-in DNS server (this node's pods then need another server behind
    /// --cluster-dns).
    #[arg(long)]
    no_dns_server: bool,

    /// Resolvers the DNS server forwards names outside the cluster domain to (repeatable,
    /// `ip` or `ip:port`). Default: the node's resolv.conf nameservers.
    #[arg(long = "dns-upstream", value_name = "ADDR")]
    dns_upstreams: Vec<String>,

    /// How many recent policy flows the agent keeps for `skiff-node flows`.
    #[arg(long, default_value_t = 4096)]
    flow_log_capacity: usize,

    /// Extra node labels, `key=value` (repeatable).
    #[arg(long = "node-label", value_name = "KEY=VALUE")]
    node_labels: Vec<String>,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Inspect the node's eBPF data path.
    #[command(subcommand)]
    Bpf(BpfCommand),
    /// The agent's log of new connections decided by NetworkPolicy (allowed, dropped, audit),
    /// with the pods at both ends and the policy that decided (like `hubble observe`).
    Flows {
        /// Keep printing new flows as they come.
        #[arg(long, short = 'f')]
        follow: bool,
        /// Only flows with this verdict.
        #[arg(long, value_enum)]
        verdict: Option<flows::VerdictArg>,
        /// Only flows from or to this pod (`namespace/name`; `name` alone: in `default`).
        #[arg(long, value_name = "NAMESPACE/NAME")]
        pod: Option<String>,
        /// How many of the most recent matching flows to print first.
        #[arg(long, default_value_t = 20)]
        last: usize,
        /// Output format.
        #[arg(long, short = 'o', value_enum, default_value_t = flows::Output::Table)]
        output: flows::Output,
    },
    /// Remove what the agent created on this machine (run with the agent stopped):
    /// containers, its containerd and shims, mounts under --run-dir and --data-dir, its routes
    /// to other nodes' pods, the node's pinned maps and links, and --run-dir.
    Reset {
        /// Also remove --data-dir (images, pod state, the node's credentials).
        #[arg(long)]
        purge: bool,
    },
    /// Build the small test and demo image: an OCI image-layout archive of a static busybox
    /// with its applets linked, for `--import-image` or a registry (`skopeo copy
    /// oci-archive:…`).
    TestImage {
        /// The archive to write.
        #[arg(long)]
        out: PathBuf,
        /// The static busybox binary (Debian's `busybox-static`).
        #[arg(long, default_value = "/bin/busybox")]
        busybox: PathBuf,
        /// The image's name.
        #[arg(long, default_value = "busybox:1.36")]
        name: String,
    },
    /// The logging binary the runc shim starts with each container (not for direct use):
    /// writes the container's stdout and stderr (descriptors 3 and 4) to PATH as CRI records.
    #[command(name = "container-log", hide = true)]
    ContainerLog {
        /// The log file.
        path: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum BpfCommand {
    /// Packet and byte counters by hook and verdict (drops by stable reason), summed over CPUs.
    Metrics,
    /// The stable drop reasons: code, name, meaning.
    DropReasons,
    /// Service load balancing maps (like `cilium bpf lb list`).
    #[command(subcommand)]
    Lb(LbCommand),
    /// Connection tracking of translated flows (like `cilium bpf ct list global`).
    #[command(subcommand)]
    Ct(CtCommand),
    /// This node's pods as the programs deliver to them (like `cilium bpf endpoint list`).
    #[command(subcommand)]
    Endpoint(EndpointCommand),
    /// NetworkPolicy maps (like `cilium bpf policy get`).
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Remove this node's pinned maps (run only when the agent is stopped: counters and
    /// connection state are lost).
    Unpin,
}

#[derive(Debug, Subcommand)]
enum LbCommand {
    /// Every frontend with its backend slots, decoded.
    List,
}

#[derive(Debug, Subcommand)]
enum CtCommand {
    /// Every live connection-tracking entry, decoded.
    List,
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// A pod's isolation and what its policy map allows, decoded and named (pod and policy
    /// names come from the running agent; an address works without it).
    Get {
        /// `namespace/name` (`name` alone: in `default`), or the pod's address.
        pod: String,
    },
}

#[derive(Debug, Subcommand)]
enum EndpointCommand {
    /// Every pod of this node: address, host-side interface, MACs.
    List,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Some(Command::ContainerLog { path }) = &cli.command {
        return skiff_runtime::crilog::run_driver(path);
    }
    init_logging(cli.log_format);
    let node = match &cli.node_name {
        Some(n) => n.clone(),
        None => nix::unistd::gethostname()
            .context("reading the host name (pass --node-name)")?
            .to_string_lossy()
            .to_lowercase(),
    };
    match cli.command {
        None => run_agent(&cli, &node),
        Some(Command::Bpf(BpfCommand::Metrics)) => print_metrics(&cli.bpffs, &node),
        Some(Command::Bpf(BpfCommand::Lb(LbCommand::List))) => inspect::lb_list(&cli.bpffs, &node),
        Some(Command::Bpf(BpfCommand::Ct(CtCommand::List))) => inspect::ct_list(&cli.bpffs, &node),
        Some(Command::Bpf(BpfCommand::Endpoint(EndpointCommand::List))) => {
            inspect::endpoint_list(&cli.bpffs, &node)
        }
        Some(Command::Bpf(BpfCommand::Policy(PolicyCommand::Get { pod }))) => {
            flows::policy_get(&cli.bpffs, &node, &cli.run_dir, &pod)
        }
        Some(Command::Flows {
            follow,
            verdict,
            ref pod,
            last,
            output,
        }) => flows::flows(&cli.run_dir, follow, last, verdict, pod.as_deref(), output),
        Some(Command::Bpf(BpfCommand::DropReasons)) => {
            println!("{:<6} {:<20} DESCRIPTION", "CODE", "NAME");
            for r in DropReason::ALL {
                println!("{:<6} {:<20} {}", r.code(), r.name(), r.description());
            }
            Ok(())
        }
        Some(Command::ContainerLog { .. }) => unreachable!("handled before logging starts"),
        Some(Command::TestImage { out, busybox, name }) => {
            skiff_runtime::oci_layout::build_busybox_archive(&busybox, &name, &out)?;
            println!("{} ({name})", out.display());
            Ok(())
        }
        Some(Command::Reset { purge }) => reset::Reset {
            node: &node,
            bpffs: &cli.bpffs,
            run_dir: &cli.run_dir,
            data_dir: &cli.data_dir,
            purge,
        }
        .run(),
        Some(Command::Bpf(BpfCommand::Unpin)) => {
            let pins = PinDir::open(&cli.bpffs, &node)?;
            let path = pins.path().to_owned();
            pins.remove()?;
            println!("removed {}", path.display());
            Ok(())
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // hickory's server logs every query at info.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,hickory_server=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn join_config(cli: &Cli, node: &str) -> Result<skiff_agent::register::NodeConfig> {
    let internal_ip = match cli.node_ip {
        Some(ip) => ip,
        None => skiff_agent::machine::default_ipv4()
            .context("no global IPv4 address in this network namespace; pass --node-ip")?,
    };
    let labels = cli
        .node_labels
        .iter()
        .map(|l| {
            l.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("--node-label {l:?} is not KEY=VALUE"))
        })
        .collect::<Result<_>>()?;
    std::fs::create_dir_all(&cli.data_dir)
        .with_context(|| format!("create {}", cli.data_dir.display()))?;
    Ok(skiff_agent::register::NodeConfig {
        name: node.to_string(),
        internal_ip,
        data_dir: cli.data_dir.clone(),
        port: cli.port,
        runtime_version: String::new(),
        labels,
        annotations: Vec::new(),
    })
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    skiff_agent::simulate::parse_duration(s)
        .ok_or_else(|| format!("{s:?} is not a duration like 500ms, 30s, 5m or 1h"))
}

/// `--simulate N`: simulated nodes only.
fn run_simulated(cli: &Cli, node: &str, n: usize) -> Result<()> {
    let kubeconfig = cli
        .kubeconfig
        .clone()
        .context("--simulate needs --kubeconfig (the node kubeconfig of skiff-control)")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let client = skiff_agent::client_from_kubeconfig(&kubeconfig).await?;
        let cfg = skiff_agent::simulate::SimConfig {
            nodes: n,
            prefix: node.to_string(),
            start_delay: cli.simulate_start_delay,
            cpus: 32,
            memory_gib: 256,
            max_pods: 110,
        };
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = skiff_agent::simulate::run(client, cfg) => r,
            _ = tokio::signal::ctrl_c() => Ok(()),
            _ = term.recv() => Ok(()),
        }
    })
}

fn run_agent(cli: &Cli, node: &str) -> Result<()> {
    if let Some(n) = cli.simulate {
        return run_simulated(cli, node, n);
    }
    let (bpffs, uplinks) = (&cli.bpffs, &cli.uplinks);
    let join = match &cli.kubeconfig {
        Some(k) => Some((k.clone(), join_config(cli, node)?)),
        None => None,
    };
    let pins = PinDir::create(bpffs, node)?;
    let mut programs = Vec::new();
    for kind in ProgramKind::ALL {
        programs.push(LoadedProgram::load(kind, &pins)?);
    }
    let (pod_programs, mut programs): (Vec<_>, Vec<_>) = programs
        .into_iter()
        .partition(|p| matches!(p.kind(), ProgramKind::FromPod | ProgramKind::ToPod));
    let policy_gate = skiff_agent::policy::gate::Gate::new();
    let pod_programs = std::sync::Arc::new(
        skiff_agent::datapath::PodPrograms::new(pins.clone(), pod_programs)?
            .with_policy_gate(policy_gate.clone()),
    );
    let lb_metrics = std::sync::Arc::new(skiff_agent::metrics::LbMetrics::default());
    let flow_log =
        skiff_agent::policy::flows::FlowLog::new(node.to_string(), cli.flow_log_capacity);
    let metrics_addr: Option<std::net::SocketAddr> = match cli.metrics_addr.as_str() {
        "off" => None,
        a => Some(
            a.parse()
                .with_context(|| format!("--metrics-addr {a:?} is not host:port or off"))?,
        ),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    // The NodePort fast path needs native XDP on every uplink.
    let mut xdp_native = !uplinks.is_empty();
    for iface in uplinks {
        let xdp = programs
            .iter_mut()
            .find(|p| p.kind() == ProgramKind::XdpUplink)
            .expect("loaded above");
        // A veth uplink gets generic XDP: native XDP_TX on a veth is dropped unless its peer
        // runs XDP or GRO, which this node does not control.
        let veth = rt
            .block_on(async { skiff_net::Netlink::connect()?.is_veth(iface).await })
            .with_context(|| format!("uplink {iface}"))?;
        xdp_native &= !veth;
        if veth {
            xdp.attach_generic(iface)
        } else {
            xdp.attach(iface)
        }
        .with_context(|| format!("attaching to uplink {iface}"))?;
    }
    // NodePort from outside: `from-netdev` on the uplinks, or on the interface holding the
    // node's address when none is named.
    let mut netdevs = uplinks.clone();
    if netdevs.is_empty()
        && let Some(ip) = join.as_ref().map(|(_, cfg)| cfg.internal_ip)
        && let Some(iface) = skiff_agent::machine::iface_with_addr(ip)
    {
        netdevs.push(iface);
    }
    // Links left on interfaces that are no longer uplinks are removed.
    for iface in skiff_datapath::program::pinned_link_ifaces(&pins, ProgramKind::FromNetdev) {
        if !netdevs.contains(&iface) {
            let _ = skiff_datapath::program::unpin_link(&pins, &iface, ProgramKind::FromNetdev);
        }
    }
    for iface in &netdevs {
        programs
            .iter_mut()
            .find(|p| p.kind() == ProgramKind::FromNetdev)
            .expect("loaded above")
            .attach_pinned(iface, &pins)
            .with_context(|| format!("attaching from-netdev to {iface}"))?;
    }
    tracing::info!(
        node,
        pins = %pins.path().display(),
        uplinks = ?uplinks,
        netdevs = ?netdevs,
        "data path ready"
    );
    rt.block_on(async {
        if let Some(addr) = metrics_addr {
            let registry =
                skiff_agent::metrics::registry(pins.clone(), lb_metrics.clone(), &flow_log.metrics);
            tokio::spawn(async move {
                if let Err(e) = skiff_agent::metrics::serve(addr, registry).await {
                    tracing::error!(error = format!("{e:#}"), "metrics endpoint stopped");
                }
            });
        }
        let mut supervised = None;
        let mut pods_for_shutdown = None;
        let heartbeat = match join {
            Some((kubeconfig, mut cfg)) => {
                let socket = match &cli.containerd {
                    Some(s) => s.clone(),
                    None => {
                        let s = skiff_runtime::containerd::Supervised::start(
                            std::path::Path::new("containerd"),
                            &cli.data_dir,
                            &cli.run_dir,
                        )
                        .await
                        .context("start containerd")?;
                        let path = s.socket().to_path_buf();
                        supervised = Some(s);
                        path
                    }
                };
                let ch = skiff_runtime::containerd::connect(&socket).await?;
                cfg.runtime_version = format!(
                    "containerd://{}",
                    skiff_runtime::containerd::version(&ch).await?
                );
                let mut images = Vec::new();
                for archive in &cli.import_images {
                    let name = skiff_runtime::oci_layout::ref_name(archive)?;
                    images.push(
                        skiff_runtime::image::import_oci_archive(&ch, archive, &name)
                            .await
                            .with_context(|| format!("import {}", archive.display()))?,
                    );
                }
                // The agent's endpoint (container logs), its certificate pinned through the Node.
                let cert = skiff_agent::server::ServingCert::generate(vec![
                    cfg.name.clone(),
                    cfg.internal_ip.to_string(),
                ])?;
                cfg.annotations.push((
                    skiff_agent::server::FINGERPRINT_ANNOTATION.to_string(),
                    cert.fingerprint.clone(),
                ));
                let served = std::sync::Arc::new(skiff_agent::server::Endpoint {
                    pods_dir: cli.data_dir.join("pods"),
                    token: skiff_agent::token_from_kubeconfig(&kubeconfig)?,
                    pods: std::sync::OnceLock::new(),
                });
                let endpoint = std::net::SocketAddr::from(([0, 0, 0, 0], cli.port));
                let source = served.clone();
                tokio::spawn(async move {
                    if let Err(e) = skiff_agent::server::serve(endpoint, &cert, source).await {
                        tracing::error!(error = format!("{e:#}"), "agent endpoint stopped");
                    }
                });
                let client = skiff_agent::client_from_kubeconfig(&kubeconfig).await?;
                let status = skiff_agent::register::register(&client, &cfg).await?;
                tracing::info!(node = %cfg.name, ip = %cfg.internal_ip, "joined the cluster");
                let zone = if cli.no_dns_server {
                    None
                } else {
                    let zone = std::sync::Arc::new(
                        skiff_agent::dns::Zone::new(skiff_agent::volumes::CLUSTER_DOMAIN)
                            .map_err(anyhow::Error::msg)?,
                    );
                    let upstreams = dns_upstreams(cli, cfg.internal_ip)?;
                    let addr = std::net::SocketAddr::from((cfg.internal_ip, 53));
                    let (client, name, zone2) = (client.clone(), cfg.name.clone(), zone.clone());
                    tokio::spawn(async move {
                        if let Err(e) =
                            skiff_agent::dns::run(client, name, addr, zone2, upstreams).await
                        {
                            tracing::error!(error = format!("{e:#}"), "cluster DNS stopped");
                        }
                    });
                    Some(zone)
                };
                {
                    let view = skiff_agent::services::desired::NodeView {
                        name: cfg.name.clone(),
                        addresses: vec![cfg.internal_ip],
                        xdp_fast_path: xdp_native,
                    };
                    let (client, pins, metrics) =
                        (client.clone(), pins.clone(), lb_metrics.clone());
                    tokio::spawn(async move {
                        if let Err(e) =
                            skiff_agent::services::run(client, view, pins, metrics, zone).await
                        {
                            tracing::error!(error = format!("{e:#}"), "service sync stopped");
                        }
                    });
                }
                {
                    use skiff_agent::policy::flows;
                    let (names_tx, names) = tokio::sync::watch::channel(Default::default());
                    let (client, me, pins2) = (client.clone(), cfg.name.clone(), pins.clone());
                    let gate = policy_gate.clone();
                    // Restarted when it fails: until it runs, new pods stay closed (see
                    // `policy::gate`).
                    tokio::spawn(async move {
                        let mut delay = std::time::Duration::from_secs(1);
                        loop {
                            let started = std::time::Instant::now();
                            let result = skiff_agent::policy::sync::run(
                                client.clone(),
                                me.clone(),
                                pins2.clone(),
                                names_tx.clone(),
                                gate.clone(),
                            )
                            .await;
                            if let Err(e) = result {
                                tracing::error!(
                                    error = format!("{e:#}"),
                                    "network policy sync stopped; restarting"
                                );
                            }
                            if started.elapsed() > std::time::Duration::from_secs(60) {
                                delay = std::time::Duration::from_secs(1);
                            }
                            tokio::time::sleep(delay).await;
                            delay = (delay * 2).min(std::time::Duration::from_secs(30));
                        }
                    });
                    let ring = skiff_datapath::policy::Flows::open(&pins)?;
                    let (log, names2) = (flow_log.clone(), names.clone());
                    tokio::spawn(async move {
                        if let Err(e) = flows::run(log, ring, names2).await {
                            tracing::error!(error = format!("{e:#}"), "flow log stopped");
                        }
                    });
                    let (socket, log) = (flows::socket_path(&cli.run_dir), flow_log.clone());
                    tokio::spawn(async move {
                        if let Err(e) = flows::serve(&socket, log, names).await {
                            tracing::error!(error = format!("{e:#}"), "flow socket stopped");
                        }
                    });
                }
                {
                    let (client, me) = (client.clone(), cfg.name.clone());
                    tokio::spawn(async move {
                        if let Err(e) = skiff_agent::routes::run(client, me).await {
                            tracing::error!(error = format!("{e:#}"), "node routes stopped");
                        }
                    });
                }
                // Pods last: the pod manager waits for the node's pod CIDR; service routing,
                // DNS and routes to other nodes do not need it.
                let pods = skiff_agent::pods::PodManager::new(
                    client.clone(),
                    skiff_agent::pods::PodConfig {
                        node: cfg.name.clone(),
                        node_ip: cfg.internal_ip,
                        data_dir: cli.data_dir.clone(),
                        run_dir: cli.run_dir.clone(),
                        insecure_registries: cli.insecure_registries.clone(),
                        volume_sync: cli.volume_sync_period,
                        datapath: Some(pod_programs.clone()),
                        cluster_dns: Some(cli.cluster_dns),
                        host_dns: (!cli.no_dns_server).then_some(cfg.internal_ip),
                    },
                    ch,
                    images,
                )
                .await?;
                let _ = served.pods.set(pods.clone());
                pods_for_shutdown = Some(pods.clone());
                let pods_task = tokio::spawn(async move {
                    if let Err(e) = pods.run().await {
                        tracing::error!(error = format!("{e:#}"), "pod manager stopped");
                    }
                });
                let hb = tokio::spawn(skiff_agent::register::heartbeat(client, cfg, status));
                Some(tokio::spawn(async move {
                    let _ = tokio::join!(pods_task, hb);
                }))
            }
            None => {
                tracing::warn!("no --kubeconfig: this agent runs the data path only");
                None
            }
        };
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        if let Some(p) = &pods_for_shutdown {
            p.shutdown();
        }
        if let Some(h) = heartbeat {
            h.abort();
        }
        // Containers keep running under their shims; a restarted agent finds them.
        drop(supervised);
        anyhow::Ok(())
    })?;
    tracing::info!("stopping: the uplink program detaches; pinned maps and pod links stay");
    drop(programs);
    drop(pod_programs);
    Ok(())
}

/// The DNS server's upstream resolvers: `--dns-upstream`, else the node's resolv.conf.
fn dns_upstreams(cli: &Cli, node_ip: std::net::Ipv4Addr) -> Result<Vec<std::net::SocketAddr>> {
    let exclude = [
        std::net::IpAddr::V4(cli.cluster_dns),
        std::net::IpAddr::V4(node_ip),
    ];
    if cli.dns_upstreams.is_empty() {
        let conf = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        return Ok(skiff_agent::dns::upstreams_from(&conf, &exclude));
    }
    cli.dns_upstreams
        .iter()
        .map(|u| {
            u.parse::<std::net::SocketAddr>()
                .or_else(|_| u.parse::<std::net::IpAddr>().map(|ip| (ip, 53).into()))
                .with_context(|| format!("--dns-upstream {u:?}: not an address"))
        })
        .collect()
}

fn print_metrics(bpffs: &std::path::Path, node: &str) -> Result<()> {
    let pins = PinDir::open(bpffs, node)?;
    let rows = metrics::read(&pins)?;
    println!(
        "{:<12} {:<10} {:<20} {:>12} {:>14}",
        "HOOK", "VERDICT", "REASON", "PACKETS", "BYTES"
    );
    for r in rows {
        let hook = r.hook.map_or_else(
            || format!("unknown_{}", r.hook_code),
            |h| h.name().to_string(),
        );
        let (verdict, reason) = match r.verdict {
            Verdict::Forwarded => ("forwarded", "-".to_string()),
            Verdict::Redirected => ("redirected", "-".to_string()),
            other => ("dropped", other.name()),
        };
        println!(
            "{hook:<12} {verdict:<10} {reason:<20} {:>12} {:>14}",
            r.packets, r.bytes
        );
    }
    Ok(())
}
