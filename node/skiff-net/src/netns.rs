//! Named network namespaces, created the way `ip netns add` does (a bind mount of the
//! namespace file under a directory, `/run/netns` by default) but without forking: a
//! short-lived thread unshares its network namespace and bind-mounts it, so the calling process
//! never leaves its own namespace.

use std::{
    fs::{self, File},
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd},
    path::{Path, PathBuf},
    thread,
};

use nix::{
    mount::{MntFlags, MsFlags, mount, umount2},
    sched::{CloneFlags, setns, unshare},
};

use crate::NetError;

/// Where `ip netns` keeps named namespaces.
pub const DEFAULT_NETNS_DIR: &str = "/run/netns";

/// An open handle on a network namespace (keeps it alive while open).
#[derive(Debug)]
pub struct NetNs {
    path: PathBuf,
    file: File,
}

impl NetNs {
    /// Creates the namespace `name` under `dir` (e.g. [`DEFAULT_NETNS_DIR`]). Fails if it exists.
    pub fn create(dir: &Path, name: &str) -> Result<NetNs, NetError> {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(NetError::os(
                "invalid namespace name",
                name,
                io::Error::from(io::ErrorKind::InvalidInput),
            ));
        }
        prepare_dir(dir)?;
        let path = dir.join(name);
        File::options()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| NetError::os("create namespace file", path.display().to_string(), e))?;
        let target = path.clone();
        let made = thread::spawn(move || -> Result<(), NetError> {
            // unshare(CLONE_NEWNET) moves only this thread into a new namespace; the thread
            // exits right after, and the bind mount keeps the namespace alive.
            unshare(CloneFlags::CLONE_NEWNET)
                .map_err(|e| NetError::os("unshare(CLONE_NEWNET)", "thread", e))?;
            mount(
                Some("/proc/thread-self/ns/net"),
                &target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(|e| NetError::os("bind-mount namespace", target.display().to_string(), e))
        })
        .join()
        .expect("namespace thread does not panic");
        if let Err(e) = made {
            let _ = fs::remove_file(&path);
            return Err(e);
        }
        Self::open(&path)
    }

    /// Opens an existing namespace file (a bind mount or `/proc/<pid>/ns/net`).
    pub fn open(path: &Path) -> Result<NetNs, NetError> {
        let file = File::open(path)
            .map_err(|e| NetError::os("open namespace", path.display().to_string(), e))?;
        Ok(NetNs {
            path: path.to_path_buf(),
            file,
        })
    }

    /// The namespace file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on a thread that has entered this namespace and returns its result. Sockets and
    /// netlink connections opened inside `f` stay bound to this namespace afterwards.
    pub fn run<F, R>(&self, f: F) -> Result<R, NetError>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        thread::scope(|s| {
            s.spawn(|| {
                setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| {
                    NetError::os("setns(CLONE_NEWNET)", self.path.display().to_string(), e)
                })?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Unmounts and removes the namespace file. The namespace itself goes away once nothing
    /// (process, socket, open handle) refers to it any more.
    pub fn delete(self) -> Result<(), NetError> {
        let NetNs { path, file } = self;
        drop(file);
        remove_path(&path)
    }
}

impl AsFd for NetNs {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl AsRawFd for NetNs {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// Unmounts and removes a namespace file by path (for cleanup of namespaces not open here).
pub fn remove_path(path: &Path) -> Result<(), NetError> {
    match umount2(path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => {
            return Err(NetError::os(
                "unmount namespace",
                path.display().to_string(),
                e,
            ));
        }
    }
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(NetError::os(
            "remove namespace file",
            path.display().to_string(),
            e,
        )),
    }
}

/// Makes `dir` a shared mount point, as iproute2 does for `/run/netns`, so namespace mounts
/// made here propagate to mount namespaces created later (containers see them).
fn prepare_dir(dir: &Path) -> Result<(), NetError> {
    fs::create_dir_all(dir)
        .map_err(|e| NetError::os("create namespace directory", dir.display().to_string(), e))?;
    let shared = MsFlags::MS_SHARED | MsFlags::MS_REC;
    match mount(None::<&str>, dir, None::<&str>, shared, None::<&str>) {
        Ok(()) => return Ok(()),
        Err(nix::errno::Errno::EINVAL) => {} // not a mount point yet
        Err(e) => return Err(NetError::os("make-shared", dir.display().to_string(), e)),
    }
    mount(
        Some(dir),
        dir,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| NetError::os("bind-mount onto itself", dir.display().to_string(), e))?;
    mount(None::<&str>, dir, None::<&str>, shared, None::<&str>)
        .map_err(|e| NetError::os("make-shared", dir.display().to_string(), e))
}
