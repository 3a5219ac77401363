//! `skiff-node reset`: removes what the agent created on this machine — what `kubeadm reset`
//! and k3s' `killall` script do for a kubelet — for a node leaving service or a local cluster
//! going down. Run it with the agent stopped. Each step reports what it removed; a step that
//! fails is reported and the others still run.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Result, bail};
use skiff_datapath::PinDir;

/// What to reset.
pub struct Reset<'a> {
    pub node: &'a str,
    pub bpffs: &'a Path,
    pub run_dir: &'a Path,
    pub data_dir: &'a Path,
    /// Also remove the data directory (images, pod state, the node's credentials).
    pub purge: bool,
}

impl Reset<'_> {
    pub fn run(&self) -> Result<()> {
        let mut failed = Vec::new();
        let mut report = |what: &str, r: Result<usize>| match r {
            Ok(n) => println!("{what}: {n}"),
            Err(e) => {
                println!("{what}: failed: {e:#}");
                failed.push(what.to_string());
            }
        };
        report("containers removed", self.containers());
        report("processes ended", self.processes());
        report("mounts removed", self.mounts());
        report("routes removed", self.routes());
        report("pin directories removed", self.pins());
        report("directories removed", self.dirs());
        if !failed.is_empty() {
            bail!("reset incomplete: {}", failed.join(", "));
        }
        Ok(())
    }

    /// Containers in the agent's runc state (pods that were still running).
    fn containers(&self) -> Result<usize> {
        let root = self.run_dir.join("runc/k8s.io");
        if !root.exists() {
            return Ok(0);
        }
        let out = Command::new("runc")
            .arg("--root")
            .arg(&root)
            .args(["list", "-q"])
            .output()?;
        let mut n = 0;
        for id in String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.is_empty())
        {
            let ok = Command::new("runc")
                .arg("--root")
                .arg(&root)
                .args(["delete", "--force", id])
                .status()?
                .success();
            n += usize::from(ok);
        }
        Ok(n)
    }

    /// The agent's containerd and its shims: processes whose command line names the agent's
    /// run directory (containerd's socket and state live there).
    fn processes(&self) -> Result<usize> {
        let me = std::process::id();
        let mut n = 0;
        for p in std::fs::read_dir("/proc")?.filter_map(Result::ok) {
            let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            if pid as u32 == me {
                continue;
            }
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            // A path under the run directory in one of its arguments (`/run/x/node` must not
            // match `/run/x/node2`, another agent's).
            let ours = String::from_utf8_lossy(&cmdline).split('\0').any(|arg| {
                arg.split(['=', ',', ' '])
                    .any(|part| Path::new(part).starts_with(self.run_dir))
            });
            if ours {
                let killed = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
                n += usize::from(killed.is_ok());
            }
        }
        if n > 0 {
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(n)
    }

    /// Mounts under the run and data directories (pod network namespaces, container root
    /// filesystems, volumes), deepest first.
    fn mounts(&self) -> Result<usize> {
        let mounts = std::fs::read_to_string("/proc/self/mounts")?;
        let dirs = [self.run_dir, self.data_dir].map(|d| d.display().to_string());
        let mut targets: Vec<String> = mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            // /proc/mounts escapes spaces and the like as octal.
            .map(|m| m.replace("\\040", " "))
            .filter(|m| dirs.iter().any(|d| Path::new(m).starts_with(d)))
            .collect();
        targets.sort_by_key(|t| std::cmp::Reverse(t.len()));
        let mut n = 0;
        for t in targets {
            nix::mount::umount2(t.as_str(), nix::mount::MntFlags::MNT_DETACH)?;
            n += 1;
        }
        Ok(n)
    }

    /// The agent's routes to other nodes' pod CIDRs (its routing protocol number).
    fn routes(&self) -> Result<usize> {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(async {
                let nl = skiff_net::Netlink::connect()?;
                let proto = skiff_agent::routes::PROTO;
                let routes = nl.routes_with_protocol(proto).await?;
                for (dest, prefix, _) in &routes {
                    nl.delete_route(*dest, *prefix, proto).await?;
                }
                Ok(routes.len())
            })
    }

    /// The node's pinned maps and links (detaching the pod and uplink programs).
    fn pins(&self) -> Result<usize> {
        match PinDir::open(self.bpffs, self.node) {
            Ok(pins) => {
                pins.remove()?;
                Ok(1)
            }
            Err(_) => Ok(0),
        }
    }

    fn dirs(&self) -> Result<usize> {
        let mut dirs: Vec<PathBuf> = vec![self.run_dir.to_path_buf()];
        if self.purge {
            dirs.push(self.data_dir.to_path_buf());
        }
        let mut n = 0;
        for d in dirs {
            match std::fs::remove_dir_all(&d) {
                Ok(()) => n += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(n)
    }
}
