//! Facts about this machine, read from the kernel, for the Node object: capacity, addresses,
//! identity, and the pressure conditions (with upstream's default eviction thresholds).

use std::{fs, net::Ipv4Addr, path::Path};

use anyhow::{Context, Result};

/// Pods a node accepts (upstream's default `maxPods`).
pub const MAX_PODS: u32 = 110;
/// `memory.available` below this is memory pressure (upstream's default hard eviction).
pub const MEMORY_AVAILABLE_MIN: u64 = 100 * 1024 * 1024;
/// `nodefs.available` below this fraction is disk pressure.
pub const NODEFS_AVAILABLE_MIN: f64 = 0.10;
/// More than this fraction of `pid_max` in use is PID pressure.
pub const PIDS_MAX_FRACTION: f64 = 0.90;

/// What the node reports about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Machine {
    /// CPUs.
    pub cpus: usize,
    /// Memory in bytes.
    pub memory: u64,
    /// Bytes of the filesystem holding the agent's data.
    pub ephemeral_storage: u64,
    /// `/etc/machine-id`.
    pub machine_id: String,
    /// `/proc/sys/kernel/random/boot_id`.
    pub boot_id: String,
    /// `uname -r`.
    pub kernel: String,
    /// `PRETTY_NAME` of `/etc/os-release`.
    pub os_image: String,
    /// `amd64`, `arm64`, … (Go's names, as Kubernetes uses them).
    pub arch: &'static str,
}

/// Pressure as the kubelet's eviction manager would see it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pressure {
    /// `memory.available` < 100Mi.
    pub memory: bool,
    /// `nodefs.available` < 10%.
    pub disk: bool,
    /// Processes above 90% of `pid_max`.
    pub pids: bool,
}

fn read_trim(path: &str) -> String {
    fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn meminfo(field: &str) -> Option<u64> {
    let text = fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn statvfs(path: &Path) -> Result<(u64, u64)> {
    let s =
        nix::sys::statvfs::statvfs(path).with_context(|| format!("statvfs {}", path.display()))?;
    let frag = s.fragment_size();
    Ok((s.blocks() * frag, s.blocks_available() * frag))
}

/// Go's name of this architecture (as images and Nodes use it).
pub use skiff_runtime::arch as go_arch;

impl Machine {
    /// Reads the facts; `data_dir` is where the agent keeps its state.
    pub fn read(data_dir: &Path) -> Result<Machine> {
        let os_release = fs::read_to_string("/etc/os-release").unwrap_or_default();
        let os_image = os_release
            .lines()
            .find_map(|l| l.strip_prefix("PRETTY_NAME="))
            .map(|v| v.trim_matches('"').to_string())
            .unwrap_or_else(|| "Linux".into());
        let uname = nix::sys::utsname::uname().context("uname")?;
        Ok(Machine {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory: meminfo("MemTotal:").context("MemTotal in /proc/meminfo")?,
            ephemeral_storage: statvfs(data_dir)?.0,
            machine_id: read_trim("/etc/machine-id"),
            boot_id: read_trim("/proc/sys/kernel/random/boot_id"),
            kernel: uname.release().to_string_lossy().into_owned(),
            os_image,
            arch: go_arch(),
        })
    }
}

/// Current pressure on this machine.
pub fn pressure(data_dir: &Path) -> Pressure {
    let memory = meminfo("MemAvailable:").is_some_and(|a| a < MEMORY_AVAILABLE_MIN);
    let disk = statvfs(data_dir)
        .map(|(total, avail)| total > 0 && (avail as f64) < NODEFS_AVAILABLE_MIN * total as f64)
        .unwrap_or(false);
    let pid_max: f64 = read_trim("/proc/sys/kernel/pid_max")
        .parse()
        .unwrap_or(f64::MAX);
    let procs = fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .bytes()
                        .all(|b| b.is_ascii_digit())
                })
                .count()
        })
        .unwrap_or(0);
    Pressure {
        memory,
        disk,
        pids: procs as f64 > PIDS_MAX_FRACTION * pid_max,
    }
}

/// The first global IPv4 address of this network namespace (the node's InternalIP when none is
/// given): the source address of the default route's interface, else any non-loopback one.
pub fn default_ipv4() -> Option<Ipv4Addr> {
    let addrs = nix::ifaddrs::getifaddrs().ok()?;
    let mut found = None;
    for a in addrs {
        if a.interface_name == "lo" {
            continue;
        }
        if let Some(sin) = a.address.as_ref().and_then(|s| s.as_sockaddr_in()) {
            let ip = sin.ip();
            if !ip.is_loopback() && !ip.is_link_local() {
                found = Some(ip);
                break;
            }
        }
    }
    found
}

/// The interface (in this network namespace) that holds `ip`.
pub fn iface_with_addr(ip: Ipv4Addr) -> Option<String> {
    nix::ifaddrs::getifaddrs().ok()?.find_map(|a| {
        let addr = a.address?;
        let v4 = addr.as_sockaddr_in()?;
        (v4.ip() == ip).then_some(a.interface_name)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_machine() {
        let m = Machine::read(Path::new("/")).unwrap();
        assert!(m.cpus >= 1);
        assert!(m.memory > 64 * 1024 * 1024);
        assert!(m.ephemeral_storage > 0);
        assert!(!m.kernel.is_empty());
        assert_eq!(m.arch, go_arch());
    }
}
