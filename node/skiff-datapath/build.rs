//! Embeds the eBPF objects built by `cargo xtask build-ebpf`.
//!
//! The objects are compiled with the nightly toolchain for `bpfel-unknown-none`, which a plain
//! `cargo build` of userspace must not need. So this script only copies what `build-ebpf` left in
//! `target/ebpf/` (or `$SKIFF_EBPF_DIR`) into `OUT_DIR`. When they are missing it embeds empty
//! placeholders and the loader reports, at run time, that the binary was built without its data
//! path and how to fix it (`cargo xtask build-ebpf`, then rebuild).

use std::{env, fs, path::PathBuf};

const OBJECTS: &[&str] = &["from-pod", "to-pod", "from-netdev", "xdp-uplink"];

fn main() {
    println!("cargo::rerun-if-env-changed=SKIFF_EBPF_DIR");
    let dir = match env::var_os("SKIFF_EBPF_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
            manifest.join("../../target/ebpf")
        }
    };
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let mut missing = Vec::new();
    for name in OBJECTS {
        let src = dir.join(format!("{name}.o"));
        println!("cargo::rerun-if-changed={}", src.display());
        let dst = out.join(format!("{name}.o"));
        match fs::read(&src) {
            Ok(bytes) => fs::write(&dst, bytes).expect("write to OUT_DIR"),
            Err(_) => {
                missing.push(src.display().to_string());
                fs::write(&dst, []).expect("write to OUT_DIR");
            }
        }
    }
    if !missing.is_empty() {
        println!(
            "cargo::warning=eBPF objects not found ({}); this build cannot load the data path. \
             Run `cargo xtask build-ebpf` and build again.",
            missing.join(", ")
        );
    }
}
