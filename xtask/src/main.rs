//! `cargo xtask`: skiff's developer commands.
//!
//! - `setup`: install what a machine needs (Debian packages, the nightly's rust-src,
//!   bpf-linker, cargo-nextest), idempotently, step by step.
//! - `build-ebpf [--release]`: compile `ebpf/skiff-ebpf` with the nightly toolchain for
//!   `bpfel-unknown-none` into `target/ebpf/*.o`, which `skiff-datapath` embeds.
//! - `test`: setup, build-ebpf, format and lint checks, then every test suite (privileged ones
//!   for real when run as root). Its output ends with the test runner's summary line.
//! - `up`: setup and build everything, start the local control plane (store, API server,
//!   controllers) and print how to use kubectl with it.
//! - `down [--purge]`: stop the local control plane (and remove its data).
//! - `bench <name>`: a benchmark against its real peer, in one run (`store`: against etcd;
//!   `api`, `podstartup`, `scheduler`: against upstream figures and the runtime's floor).

mod build;
mod cluster;
mod setup;
mod util;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "skiff's developer commands")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install everything this machine needs to build, run and test skiff (idempotent).
    Setup,
    /// Compile the eBPF programs into target/ebpf/.
    BuildEbpf {
        /// Use the release profile (both profiles are optimised; release is what `up` uses).
        #[arg(long)]
        release: bool,
    },
    /// Setup, build-ebpf, fmt and clippy checks, then all test suites (extra args go to nextest).
    Test {
        /// Arguments passed through to `cargo nextest run`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        nextest_args: Vec<String>,
    },
    /// Install what is missing, build everything, start the local cluster (control plane and
    /// nodes, each node in its own network namespace), apply the demo, print how to use it.
    Up {
        /// How many nodes.
        #[arg(long, default_value_t = 1)]
        nodes: usize,
        /// Run the `skiff-control` and `skiff-node` already built in this directory: no set-up,
        /// no build (the end-to-end suite uses its debug build).
        #[arg(long, value_name = "DIR")]
        bin_dir: Option<std::path::PathBuf>,
    },
    /// Stop the local cluster `up` started and remove everything it created.
    Down {
        /// Also remove its data (store, certificates, kubeconfig).
        #[arg(long)]
        purge: bool,
        /// Where the `skiff-node` that resets the nodes is (default: the release build).
        #[arg(long, value_name = "DIR")]
        bin_dir: Option<std::path::PathBuf>,
    },
    /// Build the busybox test and demo image as an OCI layout archive (for `skiff-node
    /// --import-image`, or `skopeo copy oci-archive:…` into a registry).
    TestImage {
        /// Where to write it.
        #[arg(long, default_value = "target/images/busybox.tar")]
        out: std::path::PathBuf,
    },
    /// Run a benchmark against its real peer (release builds).
    Bench {
        /// Which benchmark.
        #[arg(value_enum)]
        name: build::BenchName,
        /// Seconds per workload.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Setup => setup::all(),
        Command::BuildEbpf { release } => build::ebpf(release),
        Command::Test { nextest_args } => build::test(&nextest_args),
        Command::Up { nodes, bin_dir } => build::up(nodes, bin_dir),
        Command::Down { purge, bin_dir } => cluster::down(
            &bin_dir.unwrap_or_else(|| util::root().join("target/release")),
            purge,
        ),
        Command::Bench { name, seconds } => build::bench(name, seconds),
        Command::TestImage { out } => build::test_image(&out),
    }
}
