//! `skiff-node --kubeconfig` joins a running `skiff-control`: the Node appears Ready with the
//! machine's facts, gets a pod CIDR from the node IPAM controller, and renews its Lease.

use std::process::{Child, Command, Stdio};

use skiff_tests::{bin, control::ControlPlane, privileged, unique_name};

/// Ends (by PID) and reaps the agent this test started, and removes its pins.
struct Agent {
    child: Child,
    node: String,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
        let _ = Command::new(bin("skiff-node"))
            .args(["--node-name", &self.node, "bpf", "unpin"])
            .output();
    }
}

#[test]
fn agent_registers_a_ready_node_with_a_pod_cidr_and_a_lease() {
    if !privileged("agent_registers_a_ready_node_with_a_pod_cidr_and_a_lease") {
        return;
    }
    let cp = ControlPlane::start();
    let node = unique_name("node");
    let data = cp.scratch().join("node-data");
    let log = std::fs::File::create(cp.scratch().join("node.log")).expect("log");
    let agent = Agent {
        child: Command::new(bin("skiff-node"))
            .args(["--node-name", &node])
            .arg("--kubeconfig")
            .arg(cp.scratch().join("data/node.kubeconfig"))
            .arg("--data-dir")
            .arg(&data)
            .args([
                "--node-ip",
                "192.0.2.10",
                "--node-label",
                "skiff.dev/test=yes",
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start skiff-node"),
        node: node.clone(),
    };
    cp.eventually(30, "the node to be Ready", || {
        cp.kubectl(&[
            "get",
            "node",
            &node,
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
        ])
        .stdout
            == b"True"
    });
    let wide = cp.ok(&["get", "nodes", "-o", "wide"]);
    let row = wide
        .lines()
        .find(|l| l.starts_with(&node))
        .expect("node row");
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(&cols[1..3], ["Ready", "<none>"], "{wide}");
    assert!(
        row.contains("v1.32.0-skiff") && row.contains("192.0.2.10"),
        "{wide}"
    );
    let uname = Command::new("uname")
        .arg("-r")
        .output()
        .expect("uname")
        .stdout;
    assert!(
        row.contains(String::from_utf8_lossy(&uname).trim()),
        "{wide}"
    );

    cp.eventually(10, "a pod CIDR", || {
        !cp.ok(&["get", "node", &node, "-o", "jsonpath={.spec.podCIDR}"])
            .is_empty()
    });
    let cidr = cp.ok(&["get", "node", &node, "-o", "jsonpath={.spec.podCIDR}"]);
    assert!(
        cidr.starts_with("10.244.") && cidr.ends_with(".0/24"),
        "{cidr}"
    );
    let cpus = std::thread::available_parallelism().expect("cpus").get();
    assert_eq!(
        cp.ok(&["get", "node", &node, "-o", "jsonpath={.status.capacity.cpu} {.status.capacity.pods} {.metadata.labels.skiff\\.dev/test}"]),
        format!("{cpus} 110 yes")
    );
    // The pod CIDR is fixed once assigned.
    let err = cp.fails(&[
        "patch",
        "node",
        &node,
        "--type=merge",
        "-p",
        r#"{"spec":{"podCIDR":"10.244.99.0/24"}}"#,
    ]);
    assert!(err.contains("field is immutable"), "{err}");

    // Empty until the agent's first heartbeat creates the Lease.
    let holder = || {
        let out = cp.kubectl(&[
            "get",
            "lease",
            &node,
            "-n",
            "kube-node-lease",
            "-o",
            "jsonpath={.spec.holderIdentity} {.spec.renewTime}",
        ]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    cp.eventually(15, "the node lease", || holder().starts_with(&node));
    let first = holder();
    cp.eventually(25, "the lease to be renewed", || holder() != first);
    drop(agent);
    // The Node stays (as upstream: a stopped kubelet does not deregister).
    assert!(cp.ok(&["get", "nodes"]).contains(&node));
}
