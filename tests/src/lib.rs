//! Fixtures for skiff's test suites.
//!
//! Privileged tests (BPF, network namespaces) call [`privileged`] first: without root they are
//! skipped with a printed reason, unless `SKIFF_REQUIRE_PRIVILEGED=1` (set by `cargo xtask test`
//! when it runs as root, and so in CI), where a missing privilege fails the test instead of
//! silently skipping it.
//!
//! Everything a fixture creates (namespaces, veths, pins) is named uniquely per test and removed
//! in `Drop`, so tests run in parallel and clean up even when they fail.

pub mod control;
pub mod linearizability;
pub mod node;
pub mod packets;
pub mod simulate;
pub mod topology;

use std::{
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

pub use topology::Topology;

/// Returns true when the caller may run privileged operations; otherwise prints why the test
/// is skipped and returns false (or panics when privileged tests are required).
pub fn privileged(test: &str) -> bool {
    let required = std::env::var("SKIFF_REQUIRE_PRIVILEGED").is_ok_and(|v| v == "1");
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    let reason =
        format!("{test}: needs root (BPF, netns); run it as root or via `cargo xtask test`");
    assert!(!required, "{reason} (SKIFF_REQUIRE_PRIVILEGED=1)");
    eprintln!("SKIP {reason}");
    false
}

/// A name unique to this process and call, for namespaces, nodes and pins: `<prefix>-<pid>-<n>`.
pub fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A node's pin directory under the real bpffs, unique to the test, removed on drop.
#[derive(Debug)]
pub struct TestPins {
    /// The node name used for the pin directory.
    pub node: String,
    pins: Option<skiff_datapath::PinDir>,
}

impl TestPins {
    /// Creates `/sys/fs/bpf/skiff/<unique node>/`.
    pub fn new() -> TestPins {
        let node = unique_name("test");
        let pins = skiff_datapath::PinDir::create(bpffs().as_path(), &node).expect("pin dir");
        TestPins {
            node,
            pins: Some(pins),
        }
    }

    /// The pin directory.
    pub fn dir(&self) -> &skiff_datapath::PinDir {
        self.pins.as_ref().expect("present until drop")
    }
}

impl Default for TestPins {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestPins {
    fn drop(&mut self) {
        if let Some(Err(e)) = self.pins.take().map(skiff_datapath::PinDir::remove) {
            eprintln!("cleanup: {e}");
        }
    }
}

/// Ends a child this test started, by PID: SIGTERM, then SIGKILL after `grace`; reaps it.
pub fn stop_child(child: &mut std::process::Child, grace: std::time::Duration) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = std::time::Instant::now() + grace;
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The bpffs mount point tests use.
pub fn bpffs() -> PathBuf {
    PathBuf::from(skiff_datapath::bpffs::DEFAULT_BPFFS)
}

/// Path of a workspace binary (`skiff-node`, `skiff-control`) built next to this test.
/// `cargo xtask test` builds them before running the suites.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test binary lives in target/<profile>/deps")
        .join(name);
    assert!(
        path.exists(),
        "{} not built: run `cargo build --workspace --bins` first (cargo xtask test does)",
        path.display()
    );
    path
}
