//! What several benchmarks share: the processes they start, free ports, memory readings.

use std::{
    net::SocketAddr,
    process::Child,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

/// A process a benchmark started, ended by PID (SIGTERM, then SIGKILL) when dropped.
#[derive(Debug)]
pub struct Proc(pub Child);

impl Proc {
    /// Its PID.
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        skiff_tests::stop_child(&mut self.0, Duration::from_secs(15));
    }
}

/// A free loopback address.
pub fn free_addr() -> Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// A `/proc/<pid>/status` figure in MiB (`VmRSS`, `VmHWM`).
pub fn status_mib(pid: u32, field: &str) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = s
        .lines()
        .find(|l| l.split(':').next() == Some(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// Resident memory in MiB.
pub fn rss_mib(pid: u32) -> Option<f64> {
    status_mib(pid, "VmRSS")
}

/// Polls `check` every `every` until it holds; an error naming `what` after `secs`.
pub async fn wait_for<F, Fut>(what: &str, secs: u64, every: Duration, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !check().await {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(every).await;
    }
    Ok(())
}

/// Whether a Node's Ready condition is True.
pub fn node_ready(n: &k8s_openapi::api::core::v1::Node) -> bool {
    n.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}
