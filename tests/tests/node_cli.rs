//! End to end through the `skiff-node` and `skiff-control` binaries as a user runs them.

use std::{
    io::{BufRead, BufReader},
    os::{fd::AsRawFd, unix::process::CommandExt},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use skiff_ebpf_common::DropReason;
use skiff_tests::{
    Topology, bin, packets, privileged,
    topology::{NODE_IF, NODE_IP, PEER_IP},
    unique_name,
};

#[test]
fn binaries_print_help_and_version() {
    for name in ["skiff-node", "skiff-control"] {
        let help = Command::new(bin(name)).arg("--help").output().expect("run");
        assert!(help.status.success(), "{name} --help failed");
        let text = String::from_utf8_lossy(&help.stdout);
        assert!(
            text.contains(&format!("Usage: {name}")),
            "{name} --help: {text}"
        );
        let version = Command::new(bin(name))
            .arg("--version")
            .output()
            .expect("run");
        assert!(version.status.success());
        assert_eq!(
            String::from_utf8_lossy(&version.stdout).trim(),
            format!("{name} {}", env!("CARGO_PKG_VERSION"))
        );
    }
}

#[test]
fn drop_reasons_are_listed_with_stable_codes() {
    let out = Command::new(bin("skiff-node"))
        .args(["bpf", "drop-reasons"])
        .output()
        .expect("run");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for r in DropReason::ALL {
        let line = format!("{:<6} {:<20} {}", r.code(), r.name(), r.description());
        assert!(text.contains(&line), "missing {line:?} in {text}");
    }
}

/// Kills (by PID) and reaps a child this test started, also when the test fails.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn agent_attaches_counts_drops_and_keeps_pins_across_exit() {
    if !privileged("agent_attaches_counts_drops_and_keeps_pins_across_exit") {
        return;
    }
    let topo = Topology::new();
    let node = unique_name("e2e");
    let ns_fd = topo.node.as_raw_fd();
    let mut cmd = Command::new(bin("skiff-node"));
    cmd.args(["--node-name", &node, "--uplink", NODE_IF])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: the closure runs in the forked child before exec and only calls setns(2), which is
    // async-signal-safe; `ns_fd` stays open in the parent (owned by `topo`) for the whole spawn.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut agent = Reap(cmd.spawn().expect("start skiff-node"));
    let stderr = agent.0.stderr.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[skiff-node] {line}");
            if line.contains("data path ready") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(20))
        .expect("skiff-node did not report `data path ready`");

    let server = topo.bind_udp_on_node(9000);
    topo.send_udp_from_peer(9000, 5, b"ok");
    let mut buf = [0u8; 16];
    for _ in 0..5 {
        server.recv_from(&mut buf).expect("delivered through XDP");
    }
    let mut bad = packets::udp_to(topo.node_mac, PEER_IP, NODE_IP, 1, 9000, b"x");
    packets::set_ihl(&mut bad, 2);
    for _ in 0..4 {
        topo.send_raw_from_peer(&bad);
    }

    let metrics = node_cmd(&node, &["bpf", "metrics"]);
    let drop_line = metrics
        .lines()
        .find(|l| l.contains("xdp-uplink") && l.contains(DropReason::MalformedIpv4.name()))
        .unwrap_or_else(|| panic!("no malformed_ipv4 row in:\n{metrics}"));
    let cols: Vec<&str> = drop_line.split_whitespace().collect();
    assert_eq!(cols[1], "dropped", "{drop_line}");
    assert_eq!(cols[3], "4", "packets column: {drop_line}");
    let fwd = metrics
        .lines()
        .find(|l| l.contains("xdp-uplink") && l.contains("forwarded"))
        .unwrap_or_else(|| panic!("no forwarded row in:\n{metrics}"));
    let forwarded: u64 = fwd
        .split_whitespace()
        .nth(3)
        .expect("col")
        .parse()
        .expect("num");
    assert!(forwarded >= 5, "{fwd}");

    // SIGTERM: the agent exits cleanly; programs detach, pinned maps stay for the next run.
    let pid = nix::unistd::Pid::from_raw(agent.0.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("signal");
    let status = agent.0.wait().expect("wait");
    assert!(status.success(), "skiff-node exit: {status}");
    let pin_dir = skiff_tests::bpffs().join("skiff").join(&node);
    assert!(
        pin_dir.join("skiff_metrics").exists(),
        "pins must survive the agent"
    );
    let again = node_cmd(&node, &["bpf", "metrics"]);
    assert!(again.contains("malformed_ipv4"), "counters kept: {again}");

    node_cmd(&node, &["bpf", "unpin"]);
    assert!(!pin_dir.exists(), "bpf unpin removes the node's pins");
}

fn node_cmd(node: &str, args: &[&str]) -> String {
    let out = Command::new(bin("skiff-node"))
        .args(["--node-name", node])
        .args(args)
        .output()
        .expect("run skiff-node");
    assert!(
        out.status.success(),
        "skiff-node {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
