//! The simulated runtime (`skiff-node --simulate N`, the kwok role): one process registers a
//! thousand Ready nodes with their Leases, and the pods the scheduler binds to them run, become
//! Ready after their readiness delay, complete when scripted to, and go when deleted. No root
//! needed: nothing runs but API calls.

use skiff_tests::{control::ControlPlane, simulate::Simulator};

const NODES: usize = 1000;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_thousand_simulated_nodes_register_and_run_pods() {
    let cp = ControlPlane::start();
    // Waits for the thousand nodes to be Ready.
    let mut sim = Simulator::start(&cp, NODES, "200ms");
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let leases = cp.ok(&["get", "leases", "-n", "kube-node-lease", "-o", "name"]);
        assert_eq!(leases.lines().count(), NODES);
        let rss = rss_kib(sim.pid().expect("the simulator runs"));
        eprintln!("simulator RSS with {NODES} nodes: {} MiB", rss / 1024);
        assert!(rss > 0 && rss < 512 * 1024, "simulator RSS {rss} KiB");

        // Pods bound by the scheduler run with distinct addresses on simulated nodes.
        let mut manifest = String::new();
        for i in 0..100 {
            manifest.push_str(&format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p{i}}}\nspec: {{containers: [{{name: c, image: \"busybox:1.36\"}}]}}\n"
            ));
        }
        manifest.push_str(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {name: batch, annotations: {skiff.dev/simulate-exit-after: 1s}}\nspec: {restartPolicy: Never, containers: [{name: c, image: \"busybox:1.36\"}]}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: slow}\nspec: {containers: [{name: c, image: \"busybox:1.36\", readinessProbe: {initialDelaySeconds: 2, exec: {command: [\"true\"]}}}]}\n",
        );
        cp.ok_stdin(&["apply", "-f", "-"], &manifest);
        let running = || {
            cp.ok(&[
                "get",
                "pods",
                "-o",
                "jsonpath={range .items[?(@.status.phase==\"Running\")]}{.metadata.name} {.spec.nodeName} {.status.podIP}{\"\\n\"}{end}",
            ])
        };
        cp.eventually(120, "the pods Running", || {
            running().lines().filter(|l| l.starts_with('p')).count() == 100
        });
        let rows = running();
        let mut ips = std::collections::HashSet::new();
        for row in rows.lines().filter(|l| l.starts_with('p')) {
            let f: Vec<&str> = row.split(' ').collect();
            assert!(f[1].starts_with("sim-"), "{row}");
            assert!(ips.insert(f[2].to_string()), "address {} twice", f[2]);
        }
        cp.eventually(60, "the scripted pod Succeeded", || {
            cp.ok(&["get", "pod", "batch", "-o", "jsonpath={.status.phase}"]) == "Succeeded"
        });
        cp.eventually(60, "the slow pod Ready", || {
            cp.ok(&[
                "get",
                "pod",
                "slow",
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
            ]) == "True"
        });
        cp.ok(&["delete", "pods", "--all", "--timeout=120s"]);
        assert_eq!(cp.ok(&["get", "pods", "-o", "name"]), "");
    }));
    if outcome.is_err() {
        let log = sim.log();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        eprintln!("simulator log (tail):\n{}", tail.join("\n"));
    }
    sim.stop();
    if let Err(p) = outcome {
        std::panic::resume_unwind(p);
    }
}
