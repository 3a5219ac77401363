//! `skiff-node`: the node agent, and the CLI to inspect its data path.
//!
//! Without a subcommand it runs the agent: it loads every eBPF program through the verifier,
//! pins the shared maps under `<bpffs>/skiff/<node>/` (reusing maps left by a previous run),
//! attaches the uplink program to each `--uplink`, and runs until SIGINT/SIGTERM. On exit the
//! programs detach; the pinned maps stay for the next run.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use skiff_datapath::{
    LoadedProgram, PinDir, ProgramKind,
    bpffs::DEFAULT_BPFFS,
    metrics::{self, Verdict},
};
use skiff_ebpf_common::DropReason;

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
}

#[derive(Debug, Subcommand)]
enum BpfCommand {
    /// Packet and byte counters by hook and verdict (drops by stable reason), summed over CPUs.
    Metrics,
    /// The stable drop reasons: code, name, meaning.
    DropReasons,
    /// Remove this node's pinned maps (run only when the agent is stopped: counters and
    /// connection state are lost).
    Unpin,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let node = match &cli.node_name {
        Some(n) => n.clone(),
        None => nix::unistd::gethostname()
            .context("reading the host name (pass --node-name)")?
            .to_string_lossy()
            .to_lowercase(),
    };
    match cli.command {
        None => run_agent(&cli.bpffs, &node, &cli.uplinks),
        Some(Command::Bpf(BpfCommand::Metrics)) => print_metrics(&cli.bpffs, &node),
        Some(Command::Bpf(BpfCommand::DropReasons)) => {
            println!("{:<6} {:<20} DESCRIPTION", "CODE", "NAME");
            for r in DropReason::ALL {
                println!("{:<6} {:<20} {}", r.code(), r.name(), r.description());
            }
            Ok(())
        }
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
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn run_agent(bpffs: &std::path::Path, node: &str, uplinks: &[String]) -> Result<()> {
    let pins = PinDir::create(bpffs, node)?;
    let mut programs = Vec::new();
    for kind in ProgramKind::ALL {
        programs.push(LoadedProgram::load(kind, &pins)?);
    }
    for iface in uplinks {
        programs
            .iter_mut()
            .find(|p| p.kind() == ProgramKind::XdpUplink)
            .expect("loaded above")
            .attach(iface)
            .with_context(|| format!("attaching to uplink {iface}"))?;
    }
    tracing::info!(
        node,
        pins = %pins.path().display(),
        uplinks = ?uplinks,
        "data path ready"
    );
    tracing::warn!("no API client yet: this agent runs the data path only");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        anyhow::Ok(())
    })?;
    tracing::info!("stopping: programs detach, pinned maps stay");
    drop(programs);
    Ok(())
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
            other => ("dropped", other.name()),
        };
        println!(
            "{hook:<12} {verdict:<10} {reason:<20} {:>12} {:>14}",
            r.packets, r.bytes
        );
    }
    Ok(())
}
