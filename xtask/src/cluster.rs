//! `up` and `down`: a local cluster on this machine.
//!
//! Today that is the control plane: one `skiff-control` (store, API server, controllers) with
//! its data in `target/local-cluster/control`, its log next to it, and its PID in
//! `target/local-cluster/control.pid`. `up` (re)starts it with the freshly built binary (data
//! is kept); `down` stops it by that PID; `down --purge` also removes the data. Node agents
//! join the local cluster once the node agent can run pods.

use std::{
    fs,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::util::{root, step};

/// API server address of the local cluster.
const API: &str = "127.0.0.1:6443";
/// Store ports, away from etcd's 2379/2380 (Debian's etcd-server, installed for the store
/// benchmark, may be running).
const PEER: &str = "127.0.0.1:7380";
const CLIENT: &str = "127.0.0.1:7379";

fn dir() -> PathBuf {
    root().join("target/local-cluster")
}

fn pid_file() -> PathBuf {
    dir().join("control.pid")
}

/// The PID in the pid file, if that process is still our `skiff-control`.
fn running() -> Option<i32> {
    let pid: i32 = fs::read_to_string(pid_file()).ok()?.trim().parse().ok()?;
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let cmdline = String::from_utf8_lossy(&cmdline);
    let data = dir().join("control");
    (cmdline.contains("skiff-control") && cmdline.contains(&*data.to_string_lossy())).then_some(pid)
}

fn stop(pid: i32) -> Result<()> {
    // SAFETY: kill(2) with a PID we started (checked against its command line) and SIGTERM.
    let r = unsafe { libc::kill(pid, libc::SIGTERM) };
    if r != 0 {
        bail!(
            "stopping skiff-control (pid {pid}): {}",
            std::io::Error::last_os_error()
        );
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while Path::new(&format!("/proc/{pid}")).exists() {
        if Instant::now() > deadline {
            bail!("skiff-control (pid {pid}) did not stop within 15 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = fs::remove_file(pid_file());
    Ok(())
}

/// Starts (or restarts) the local control plane from `bin/skiff-control`.
pub fn start(bin: &Path) -> Result<PathBuf> {
    if let Some(pid) = running() {
        step("restart the local control plane with the new build (data is kept)");
        stop(pid)?;
    } else {
        step("start the local control plane");
    }
    let data = dir().join("control");
    fs::create_dir_all(&data).with_context(|| format!("create {}", data.display()))?;
    let log_path = dir().join("control.log");
    let log =
        fs::File::create(&log_path).with_context(|| format!("create {}", log_path.display()))?;
    let mut child = Command::new(bin.join("skiff-control"))
        .arg("--data-dir")
        .arg(&data)
        .args([
            "--api-listen",
            API,
            "--peer-listen",
            PEER,
            "--client-listen",
            CLIENT,
        ])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own process group: Ctrl-C in this terminal does not stop it; `down` does.
        .process_group(0)
        .spawn()
        .context("start skiff-control")?;
    fs::write(pid_file(), child.id().to_string()).context("write the pid file")?;
    let kubeconfig = data.join("admin.kubeconfig");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = kubeconfig.exists()
            && Command::new("kubectl")
                .args(["get", "--raw", "/readyz", "--kubeconfig"])
                .arg(&kubeconfig)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
        if ready {
            return Ok(kubeconfig);
        }
        if let Ok(Some(status)) = child.try_wait() {
            let _ = fs::remove_file(pid_file());
            bail!(
                "skiff-control exited during start ({status}); its log is {}:\n{}",
                log_path.display(),
                fs::read_to_string(&log_path).unwrap_or_default()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "skiff-control did not become ready in 30 s; see {}",
                log_path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `cargo xtask down [--purge]`.
pub fn down(purge: bool) -> Result<()> {
    match running() {
        Some(pid) => {
            step(&format!("stop skiff-control (pid {pid})"));
            stop(pid)?;
        }
        None => println!("no local control plane is running"),
    }
    if purge {
        step("remove the local cluster's data");
        match fs::remove_dir_all(dir()) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("remove {}", dir().display())),
        }
    }
    Ok(())
}
