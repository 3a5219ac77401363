//! `cargo xtask up --nodes 3` and `cargo xtask down` as a user runs them (with the debug
//! build instead of a release build): the cluster comes up with the demo, a pod reaches the
//! demo Service by name, and `down` leaves nothing behind — no namespace, veth, pin, mount,
//! route, process or directory — so `up` after `down` starts afresh.

use std::{path::PathBuf, process::Command};

use skiff_tests::{bin, privileged};

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests live in the workspace")
        .to_path_buf()
}

fn xtask(args: &[&str]) {
    let out = Command::new(bin("xtask"))
        .args(args)
        .current_dir(workspace())
        .output()
        .expect("run xtask");
    assert!(
        out.status.success(),
        "xtask {} failed:\nstdout: {}\nstderr: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn kubectl(args: &[&str]) -> std::process::Output {
    let kubeconfig = workspace().join("target/local-cluster/control/admin.kubeconfig");
    Command::new("kubectl")
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .output()
        .expect("run kubectl")
}

fn text(cmd: &mut Command) -> String {
    cmd.output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Everything of the local cluster still on this machine (empty: nothing).
fn leftovers() -> Vec<String> {
    let mut out = Vec::new();
    let state = workspace().join("target/local-cluster");
    let state = state.display().to_string();
    for ns in text(Command::new("ip").args(["netns", "list"])).lines() {
        if ns.starts_with("skiff-local-") {
            out.push(format!("netns {ns}"));
        }
    }
    if Command::new("ip")
        .args(["link", "show", "skiff-lan0"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        out.push("link skiff-lan0".into());
    }
    for route in text(Command::new("ip").args(["route", "show"])).lines() {
        if route.contains("10.213.0.") {
            out.push(format!("route {route}"));
        }
    }
    if let Ok(entries) = std::fs::read_dir("/sys/fs/bpf/skiff") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("skiff-") && name[6..].parse::<u32>().is_ok() {
                out.push(format!("pins /sys/fs/bpf/skiff/{name}"));
            }
        }
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for m in mounts.lines() {
        if m.contains("/run/skiff-local") || m.contains(&state) {
            out.push(format!("mount {m}"));
        }
    }
    if let Ok(procs) = std::fs::read_dir("/proc") {
        for p in procs.flatten() {
            let cmdline = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains("/run/skiff-local") || cmdline.contains(&state) {
                out.push(format!(
                    "process {}: {cmdline}",
                    p.file_name().to_string_lossy()
                ));
            }
        }
    }
    for dir in ["/run/skiff-local".to_string(), state] {
        if std::path::Path::new(&dir).exists() {
            out.push(format!("directory {dir}"));
        }
    }
    out
}

#[test]
fn xtask_up_runs_the_demo_and_down_leaves_nothing_behind() {
    if !privileged("xtask_up_runs_the_demo_and_down_leaves_nothing_behind") {
        return;
    }
    // A developer's own local cluster is not ours to stop.
    let before = leftovers();
    if !before.is_empty() {
        panic!(
            "a local cluster (or its remains) is on this machine; run `cargo xtask down --purge` \
             first:\n{}",
            before.join("\n")
        );
    }
    let bin_dir = bin("skiff-node");
    let bin_dir = bin_dir.parent().expect("bin dir").display().to_string();
    let result = std::panic::catch_unwind(|| {
        xtask(&["up", "--nodes", "3", "--bin-dir", &bin_dir]);
        let pods = kubectl(&["get", "pods", "-A", "-o", "wide"]);
        let pods = String::from_utf8_lossy(&pods.stdout).into_owned();
        assert_eq!(
            pods.lines()
                .filter(|l| l.starts_with("demo ") && l.contains(" Running "))
                .count(),
            3,
            "the demo's two web pods and its client Running:\n{pods}"
        );
        // The command `up` prints: the client reaches the demo Service by name (its records and
        // routes follow the Deployment within moments of it being Available).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let got = kubectl(&[
                "-n",
                "demo",
                "exec",
                "deploy/client",
                "--",
                "wget",
                "-qO-",
                "http://web",
            ]);
            if String::from_utf8_lossy(&got.stdout).starts_with("hello from web-") {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{got:?}");
            std::thread::sleep(std::time::Duration::from_millis(500));
        }
        xtask(&["down", "--purge", "--bin-dir", &bin_dir]);
        let left = leftovers();
        assert!(
            left.is_empty(),
            "left behind by `down`:\n{}",
            left.join("\n")
        );

        // `up` after `down` starts afresh.
        xtask(&["up", "--nodes", "1", "--bin-dir", &bin_dir]);
        let nodes = kubectl(&["get", "nodes", "-o", "jsonpath={.items[*].metadata.name}"]);
        assert_eq!(String::from_utf8_lossy(&nodes.stdout), "skiff-1");
    });
    let down = Command::new(bin("xtask"))
        .args(["down", "--purge", "--bin-dir", &bin_dir])
        .current_dir(workspace())
        .output();
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
    assert!(down.is_ok_and(|o| o.status.success()), "the final down");
    let left = leftovers();
    assert!(
        left.is_empty(),
        "left behind by `down`:\n{}",
        left.join("\n")
    );
}
