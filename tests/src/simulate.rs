//! A simulated-node fleet (`skiff-node --simulate N`) against a test control plane: Ready
//! nodes named `sim-0`, `sim-1`, … whose pods run without containers. Stopped by PID on drop.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::{bin, control::ControlPlane, stop_child};

/// A running simulator.
#[derive(Debug)]
pub struct Simulator {
    child: Option<Child>,
    log: PathBuf,
    /// How many nodes it registers.
    pub nodes: usize,
}

impl Simulator {
    /// Starts `nodes` simulated nodes whose pods start after `start_delay` (e.g. `100ms`) and
    /// waits until they are Ready.
    pub fn start(cp: &ControlPlane, nodes: usize, start_delay: &str) -> Simulator {
        Self::start_named(cp, "sim", nodes, start_delay)
    }

    /// Like [`Simulator::start`], with nodes named `<prefix>-0`, `<prefix>-1`, … (several
    /// simulators can serve one control plane, and be stopped apart).
    pub fn start_named(
        cp: &ControlPlane,
        prefix: &str,
        nodes: usize,
        start_delay: &str,
    ) -> Simulator {
        let log = cp
            .scratch()
            .join(format!("simulate-{}.log", crate::unique_name(prefix)));
        let child = Command::new(bin("skiff-node"))
            .args(["--node-name", prefix, "--kubeconfig"])
            .arg(cp.scratch().join("data/node.kubeconfig"))
            .args(["--simulate", &nodes.to_string()])
            .args(["--simulate-start-delay", start_delay])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("simulator log"))
            .spawn()
            .expect("start skiff-node --simulate");
        let sim = Simulator {
            child: Some(child),
            log,
            nodes,
        };
        // Registration is paced by the API: allow more time for many nodes.
        let secs = 60 + nodes as u64 / 5;
        cp.eventually(secs, "the simulated nodes Ready", || {
            cp.ok(&[
                "get",
                "nodes",
                "-l",
                "skiff.dev/simulated=true",
                "-o",
                "jsonpath={range .items[*]}{.metadata.name} {.status.conditions[?(@.type==\"Ready\")].status}{\"\\n\"}{end}",
            ])
            .lines()
            .filter(|l| l.starts_with(&format!("{prefix}-")) && l.ends_with(" True"))
            .count()
                == nodes
        });
        sim
    }

    /// The simulator's process id (while it runs).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The simulator's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops the simulator (its nodes stop renewing their Leases).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop_child(&mut c, Duration::from_secs(10));
        }
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        self.stop();
    }
}
