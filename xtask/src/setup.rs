//! `cargo xtask setup`: installs what a fresh machine needs, skipping what is present.

use std::process::Command;

use anyhow::{Result, bail};

use crate::util::{cargo_with, is_root, output, run, step};

/// Debian packages skiff needs to build, run and test, and why.
const PACKAGES: &[(&str, &str)] = &[
    ("bpftool", "inspect programs and pinned maps; used by tests"),
    ("iproute2", "ip/tc for inspection and tests"),
    ("file", "checks built eBPF objects"),
    ("containerd", "container runtime the node agent drives"),
    ("runc", "OCI runtime under containerd"),
    ("busybox-static", "source of the small demo/test image"),
    ("iptables", "kube-proxy baseline in the data-path benchmark"),
    (
        "nftables",
        "kube-proxy nftables baseline in the data-path benchmark",
    ),
    ("iperf3", "bulk throughput in the data-path benchmark"),
    ("curl", "the NodePort request `cargo xtask up` suggests"),
    ("make", "builds jemalloc, skiff-control's allocator"),
    ("etcd-server", "etcd peer in the store benchmark"),
    (
        "protobuf-compiler",
        "builds the etcd client of the store benchmark",
    ),
    (
        "libprotobuf-dev",
        "protobuf well-known types for the etcd client",
    ),
    ("docker-registry", "loopback registry for image pull tests"),
    ("skopeo", "pushes test images to the loopback registry"),
];

/// The bpf-linker release that works with the machine's nightly LLVM (newer ones need a system
/// LLVM 21–23 that Debian 12 does not ship).
const BPF_LINKER_VERSION: &str = "0.10.4";

/// Runs every setup step.
pub fn all() -> Result<()> {
    apt_packages()?;
    nightly_rust_src()?;
    bpf_linker()?;
    nextest()?;
    step("setup complete");
    Ok(())
}

fn installed(pkg: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
        .is_some_and(|s| s.contains("install ok installed"))
}

fn apt_packages() -> Result<()> {
    step("Debian packages");
    let missing: Vec<&str> = PACKAGES
        .iter()
        .map(|(p, _)| *p)
        .filter(|p| !installed(p))
        .collect();
    if missing.is_empty() {
        eprintln!("    present: {}", names(PACKAGES));
        return Ok(());
    }
    for (p, why) in PACKAGES.iter().filter(|(p, _)| missing.contains(p)) {
        eprintln!("    missing: {p} ({why})");
    }
    if !is_root() {
        bail!(
            "installing Debian packages needs root: run `sudo apt-get install -y {}` or run \
             this command as root",
            missing.join(" ")
        );
    }
    run(Command::new("apt-get").args(["update", "-q"]))?;
    let mut install = Command::new("apt-get");
    install
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive");
    if run(&mut install).is_err() {
        let still: Vec<&str> = missing.iter().copied().filter(|p| !installed(p)).collect();
        bail!(
            "could not install Debian packages: {} (see apt-get's output above)",
            still.join(", ")
        );
    }
    Ok(())
}

fn names(pkgs: &[(&str, &str)]) -> String {
    pkgs.iter().map(|(p, _)| *p).collect::<Vec<_>>().join(" ")
}

/// `rust-src` for the nightly toolchain (`-Z build-std=core` needs it). Installs the nightly
/// itself as a fallback when the machine lacks it.
fn nightly_rust_src() -> Result<()> {
    step("nightly toolchain with rust-src (for -Z build-std=core)");
    let has_nightly = output(Command::new("rustup").args(["toolchain", "list"]))
        .is_some_and(|s| s.lines().any(|l| l.starts_with("nightly")));
    if !has_nightly {
        eprintln!("    no nightly toolchain: installing one (minimal profile, with rust-src)");
        return run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))
        .map_err(|e| {
            e.context(
                "the nightly toolchain could not be installed; eBPF programs cannot be built \
                 without it",
            )
        });
    }
    let has_src = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .is_some_and(|s| s.lines().any(|l| l.starts_with("rust-src")));
    if has_src {
        eprintln!("    present");
        return Ok(());
    }
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

/// Whether the installed bpf-linker is the pinned version.
pub fn bpf_linker_ok() -> bool {
    output(Command::new("bpf-linker").arg("--version"))
        .is_some_and(|v| v.contains(BPF_LINKER_VERSION))
}

fn bpf_linker() -> Result<()> {
    step(&format!("bpf-linker {BPF_LINKER_VERSION}"));
    if bpf_linker_ok() {
        eprintln!("    present");
        return Ok(());
    }
    // bpf-linker loads LLVM from the toolchain that invokes it (the nightly, at build-ebpf
    // time), so building it with the default toolchain is fine.
    run(cargo_with(None).args([
        "install",
        &format!("bpf-linker@{BPF_LINKER_VERSION}"),
        "--locked",
        "--force",
    ]))
}

fn nextest() -> Result<()> {
    step("cargo-nextest");
    if output(cargo_with(None).args(["nextest", "--version"])).is_some() {
        eprintln!("    present");
        return Ok(());
    }
    run(cargo_with(None).args(["install", "cargo-nextest", "--locked"]))
}
