//! containerd: a child the agent starts and supervises (as k3s does), or one the node already
//! runs, reached through its socket.
//!
//! The supervised daemon gets a generated config with its root under the agent's data
//! directory, its state and socket under the agent's run directory, and the CRI plugin disabled:
//! skiff uses containerd's native API (namespaces, content, images, snapshots, containers,
//! tasks), not CRI.

use std::{
    fs,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use std::collections::HashMap;

use containerd_client::{
    services::v1::{
        CreateRequest as LeaseCreate, DeleteRequest as LeaseDelete, leases_client::LeasesClient,
        version_client::VersionClient,
    },
    tonic::{Request, transport::Channel},
    with_namespace,
};

/// The containerd namespace skiff's containers live in (the one CRI uses too, so `ctr -n
/// k8s.io` shows them).
pub const NAMESPACE: &str = "k8s.io";
/// Longest unix socket path (`sun_path` is 108 bytes with the terminating NUL).
const MAX_SOCKET_PATH: usize = 107;

/// A containerd daemon this process started; stopped (by PID, SIGTERM then SIGKILL) on drop.
#[derive(Debug)]
pub struct Supervised {
    /// `None` when a containerd of an earlier run of this agent was still answering.
    child: Option<Child>,
    socket: PathBuf,
}

/// The config for a supervised containerd.
pub fn config(root: &Path, state: &Path, socket: &Path) -> String {
    format!(
        r#"version = 2
root = "{root}"
state = "{state}"
# skiff drives containerd through its native API; CRI is not used.
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"

[debug]
  address = ""

[metrics]
  address = ""
"#,
        root = root.display(),
        state = state.display(),
        socket = socket.display(),
    )
}

impl Supervised {
    /// Starts `containerd` with its root in `data_dir/containerd` and state, socket and log in
    /// `run_dir/containerd`; waits until it answers.
    pub async fn start(binary: &Path, data_dir: &Path, run_dir: &Path) -> Result<Supervised> {
        let root = data_dir.join("containerd");
        let state = run_dir.join("containerd");
        for d in [&root, &state] {
            fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
        }
        let socket = state.join("containerd.sock");
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            bail!(
                "containerd socket path {} is longer than {MAX_SOCKET_PATH} bytes; use a shorter --run-dir",
                socket.display()
            );
        }
        // One left by an earlier run (its agent was killed before the death signal reached it):
        // keep using it rather than fail on its locks.
        if socket.exists()
            && let Ok(Ok(ch)) = tokio::time::timeout(Duration::from_secs(2), connect(&socket)).await
            && version(&ch).await.is_ok()
        {
            tracing::warn!(socket = %socket.display(), "reusing the containerd that is already running");
            return Ok(Supervised {
                child: None,
                socket,
            });
        }
        let cfg_path = state.join("config.toml");
        fs::write(&cfg_path, config(&root, &state, &socket))
            .with_context(|| format!("write {}", cfg_path.display()))?;
        let log_path = state.join("containerd.log");
        let log = fs::File::create(&log_path)
            .with_context(|| format!("create {}", log_path.display()))?;
        let mut cmd = Command::new(binary);
        cmd.arg("--config")
            .arg(&cfg_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // containerd ends with the agent, however the agent ends (containers keep running in
        // their shims, and the next agent's containerd reconnects to them).
        // SAFETY: the closure runs in the forked child before exec and only calls prctl(2),
        // which is async-signal-safe. The death signal follows the spawning thread, which is
        // the agent's main thread here.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)
                    .map_err(std::io::Error::from)
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("start {}", binary.display()))?;
        let mut sup = Supervised {
            child: Some(child),
            socket,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = sup
                .child
                .as_mut()
                .map(Child::try_wait)
                .transpose()?
                .flatten()
            {
                bail!(
                    "containerd exited during start ({status}); its log {}:\n{}",
                    log_path.display(),
                    fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            if sup.socket.exists()
                && let Ok(ch) = connect(&sup.socket).await
                && version(&ch).await.is_ok()
            {
                return Ok(sup);
            }
            if Instant::now() > deadline {
                bail!(
                    "containerd did not answer within 20 s; see {}",
                    log_path.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Its socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => self.socket.exists(),
        }
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        let Some(child) = self.child.as_mut() else {
            return;
        };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A request in skiff's namespace, under `lease` (which keeps what it creates from being
/// garbage-collected before something references it).
pub fn req<T>(msg: T, lease: &str) -> Request<T> {
    let mut r = with_namespace!(msg, NAMESPACE);
    if let Ok(v) = lease.parse() {
        r.metadata_mut().insert("containerd-lease", v);
    }
    r
}

static NEXT_LEASE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A lease that keeps what is created under it from garbage collection until something else
/// references it; it expires on its own after an hour if this process dies meanwhile.
pub async fn create_lease(ch: &Channel) -> Result<String> {
    let id = format!(
        "skiff-{}-{}",
        std::process::id(),
        NEXT_LEASE.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let expire = (chrono::Utc::now() + chrono::Duration::hours(1))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    LeasesClient::new(ch.clone())
        .create(with_namespace!(
            LeaseCreate {
                id: id.clone(),
                labels: HashMap::from([("containerd.io/gc.expire".to_string(), expire)]),
            },
            NAMESPACE
        ))
        .await
        .context("create a containerd lease")?;
    Ok(id)
}

pub async fn delete_lease(ch: &Channel, id: &str) {
    let r = LeasesClient::new(ch.clone())
        .delete(with_namespace!(
            LeaseDelete {
                id: id.into(),
                sync: false,
            },
            NAMESPACE
        ))
        .await;
    if let Err(e) = r {
        tracing::warn!(lease = id, error = %e, "deleting a containerd lease failed; it expires by itself");
    }
}

/// Connects to containerd's socket.
pub async fn connect(socket: &Path) -> Result<Channel> {
    containerd_client::connect(socket)
        .await
        .with_context(|| format!("connect to containerd at {}", socket.display()))
}

/// containerd's version (`1.6.20~ds1`).
pub async fn version(ch: &Channel) -> Result<String> {
    let v = VersionClient::new(ch.clone())
        .version(())
        .await
        .context("containerd Version")?
        .into_inner();
    Ok(v.version)
}
