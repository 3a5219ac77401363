//! `build-ebpf`, `test` and `up`.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::{
    setup,
    util::{cargo_with, is_root, output, root, run, step},
};

/// The program binaries of `ebpf/skiff-ebpf`, one per attach point.
const EBPF_BINS: &[&str] = &["from-pod", "to-pod", "from-netdev", "xdp-uplink"];

/// ELF machine number of eBPF objects.
const EM_BPF: u16 = 247;

/// Compiles the eBPF programs and copies them to `target/ebpf/<name>.o`.
pub fn ebpf(release: bool) -> Result<()> {
    step("build eBPF programs (nightly, bpfel-unknown-none, -Z build-std=core)");
    check_ebpf_prerequisites()?;
    let root = root();
    let crate_dir = root.join("ebpf/skiff-ebpf");
    let target_dir = root.join("target/ebpf-build");
    let mut cmd = cargo_with(Some("nightly"));
    // The crate's .cargo/config.toml sets the target, build-std and bpf-linker; it applies
    // because cargo runs in the crate's folder.
    cmd.current_dir(&crate_dir)
        .args(["build", "--bins", "--target-dir"])
        .arg(&target_dir);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)?;
    let profile = if release { "release" } else { "debug" };
    let built = target_dir.join("bpfel-unknown-none").join(profile);
    let out = root.join("target/ebpf");
    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    for bin in EBPF_BINS {
        let src = built.join(bin);
        let dst = out.join(format!("{bin}.o"));
        let bytes = fs::read(&src).with_context(|| format!("reading {}", src.display()))?;
        check_bpf_elf(&src, &bytes)?;
        fs::write(&dst, &bytes).with_context(|| format!("writing {}", dst.display()))?;
        eprintln!("    {} ({} bytes)", dst.display(), bytes.len());
    }
    Ok(())
}

fn check_ebpf_prerequisites() -> Result<()> {
    let mut missing = Vec::new();
    let nightly_src = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]));
    match nightly_src {
        None => missing.push("the nightly Rust toolchain"),
        Some(s) if !s.lines().any(|l| l.starts_with("rust-src")) => {
            missing.push("rust-src for the nightly toolchain")
        }
        Some(_) => {}
    }
    if !setup::bpf_linker_ok() {
        missing.push("bpf-linker 0.10.4");
    }
    if !missing.is_empty() {
        bail!(
            "cannot build eBPF programs: missing {}. `cargo xtask setup` installs them",
            missing.join(", ")
        );
    }
    Ok(())
}

/// Fails unless `bytes` is a little-endian 64-bit ELF for the BPF machine.
fn check_bpf_elf(path: &Path, bytes: &[u8]) -> Result<()> {
    let ok = bytes.len() > 20
        && bytes[..4] == *b"\x7fELF"
        && bytes[4] == 2 // 64-bit
        && bytes[5] == 1 // little endian
        && u16::from_le_bytes([bytes[18], bytes[19]]) == EM_BPF;
    if !ok {
        bail!("{} is not a little-endian eBPF ELF object", path.display());
    }
    Ok(())
}

/// Setup, build-ebpf, fmt and clippy, then every test suite with nextest.
pub fn test(nextest_args: &[String]) -> Result<()> {
    setup::all()?;
    ebpf(false)?;
    let root = root();
    step("format check");
    run(cargo_with(None)
        .current_dir(&root)
        .args(["fmt", "--all", "--check"]))?;
    run(cargo_with(None)
        .current_dir(root.join("ebpf/skiff-ebpf"))
        .args(["fmt", "--check"]))?;
    step("clippy");
    run(cargo_with(None).current_dir(&root).args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    step("build binaries used by the end-to-end suites");
    run(cargo_with(None)
        .current_dir(&root)
        .args(["build", "--workspace", "--bins"]))?;
    step("test suites");
    let mut cmd = cargo_with(None);
    cmd.current_dir(&root)
        .args(["nextest", "run", "--workspace", "--no-fail-fast"])
        .args(nextest_args);
    if is_root() {
        // Privileged suites must run, not skip, wherever they can.
        cmd.env("SKIFF_REQUIRE_PRIVILEGED", "1");
    } else {
        eprintln!("    not root: privileged suites (BPF, netns) will be skipped with a reason");
    }
    // Nothing is printed after this so the output ends with nextest's summary line.
    let status = cmd.status().context("starting cargo nextest")?;
    std::process::exit(status.code().unwrap_or(1));
}

/// Install, build, and say how to run what exists (with `bin_dir`: run what is built there).
pub fn up(nodes: usize, bin_dir: Option<PathBuf>) -> Result<()> {
    let root = root();
    let bin = match bin_dir {
        Some(dir) => dir,
        None => {
            setup::all()?;
            ebpf(true)?;
            step("build skiff-control and skiff-node (release)");
            run(cargo_with(None)
                .current_dir(&root)
                .args(["build", "--release", "--bins"]))?;
            root.join("target/release")
        }
    };
    let kubeconfig = crate::cluster::up(&bin, nodes)?;
    println!(
        "\nskiff is running: the control plane and {nodes} node(s), the demo applied.\n  \
         API server   https://10.213.0.1:6443\n  \
         kubeconfig   {kc}\n  \
         logs         {logs}\n\n\
         Try:\n  \
         export KUBECONFIG={kc}\n  \
         kubectl get pods -A -o wide\n  \
         kubectl -n demo exec deploy/client -- wget -qO- http://web   # by name: cluster DNS + eBPF\n  \
         curl -s http://10.213.0.11:30080/        # the NodePort, from outside the cluster\n\n\
         Inspect a node's data path: sudo {node} --node-name skiff-1 bpf lb list\n\
         Stop everything with `cargo xtask down` (`--purge` also removes the data).\n",
        kc = kubeconfig.display(),
        logs = root.join("target/local-cluster").display(),
        node = bin.join("skiff-node").display(),
    );
    Ok(())
}

/// Benchmarks `cargo xtask bench` knows.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum BenchName {
    /// skiff's store against etcd 3.4, single member and three members on loopback.
    Store,
    /// The API server: creates, gets, lists (1k, 30k pods), watch fan-out, against upstream's SLO.
    Api,
    /// Pod startup on one real node (needs root), against `ctr run` and upstream's SLO.
    Podstartup,
    /// The scheduler: 5000 nodes / 10,000 pods in process (vs upstream's scheduler_perf floor),
    /// and Deployments onto 1000 simulated nodes through the API.
    Scheduler,
    /// Start-up and memory (needs root): control plane start → ready, a real node → Ready, RSS
    /// idle and with 1000 pods on simulated nodes, against k3s's published figures.
    Startup,
    /// Service routing (needs root): skiff's eBPF path against kube-proxy's iptables rules at
    /// 1, 1k and 10k Services, programming time, iperf3, BPF_PROG_RUN per-packet cost.
    Datapath,
    /// NetworkPolicy (needs root): the new-flow check by BPF_PROG_RUN at 1, 100 and 1000
    /// policies; new connections/s with enforcement on vs off, against iptables policy rules.
    Policy,
}

/// Builds `skiff-node` and has it write the busybox test image to `out`.
pub fn test_image(out: &Path) -> Result<()> {
    let root = root();
    let out = if out.is_absolute() {
        out.to_path_buf()
    } else {
        root.join(out)
    };
    if let Some(dir) = out.parent() {
        fs::create_dir_all(dir)?;
    }
    step("build skiff-node");
    run(cargo_with(None)
        .current_dir(&root)
        .args(["build", "-p", "skiff-node"]))?;
    step("write the busybox test image");
    run(Command::new(root.join("target/debug/skiff-node"))
        .arg("test-image")
        .arg("--out")
        .arg(&out))
}

/// Builds release binaries and runs the benchmark; its last line is the summary ratio.
pub fn bench(name: BenchName, seconds: u64) -> Result<()> {
    setup::all()?;
    // The agent and the datapath benchmark embed the eBPF objects.
    ebpf(false)?;
    let root = root();
    step("build release binaries");
    run(cargo_with(None).current_dir(&root).args([
        "build",
        "--release",
        "-p",
        "skiff-control",
        "-p",
        "skiff-node",
        "-p",
        "skiff-bench",
    ]))?;
    let bin = root.join("target/release");
    // Data on the workspace's disk, not a tmpfs: fsync cost is part of what is measured.
    let (sub, data, what) = match name {
        BenchName::Store => (
            "store",
            "target/bench-data",
            "store benchmark: skiff vs etcd (writes are durable on both)",
        ),
        BenchName::Api => (
            "api",
            "target/bench-data-api",
            "API server benchmark: creates, gets, lists, watch fan-out (vs upstream's SLO)",
        ),
        BenchName::Podstartup => (
            "podstartup",
            "target/bench-data-pods",
            "pod startup benchmark: one real node (vs containerd's own start and upstream's SLO)",
        ),
        BenchName::Startup => (
            "startup",
            "target/bench-data-startup",
            "start-up and memory benchmark: control plane, a real node, 1000 pods (vs k3s's figures)",
        ),
        BenchName::Scheduler => (
            "scheduler",
            "target/bench-data-scheduler",
            "scheduler benchmark: in process (vs upstream's scheduler_perf) and through the API",
        ),
        BenchName::Datapath => {
            step("datapath benchmark: eBPF service routing vs kube-proxy's iptables rules");
            return run(Command::new(bin.join("skiff-bench")).args([
                "datapath",
                "--seconds",
                &seconds.to_string(),
                "--chart",
                &root.join("target/bench-datapath.png").display().to_string(),
            ]));
        }
        BenchName::Policy => {
            step("policy benchmark: eBPF NetworkPolicy on vs off, vs iptables policy rules");
            return run(Command::new(bin.join("skiff-bench")).args([
                "policy",
                "--seconds",
                &seconds.to_string(),
            ]));
        }
    };
    let data = root.join(data);
    step(what);
    let mut cmd = Command::new(bin.join("skiff-bench"));
    cmd.arg(sub);
    match name {
        BenchName::Podstartup | BenchName::Scheduler | BenchName::Startup => {
            cmd.arg("--skiff-node").arg(bin.join("skiff-node"))
        }
        _ => cmd.args(["--seconds", &seconds.to_string()]),
    };
    let result = run(cmd
        .arg("--skiff-control")
        .arg(bin.join("skiff-control"))
        .arg("--data-dir")
        .arg(&data));
    let _ = fs::remove_dir_all(&data);
    result
}
