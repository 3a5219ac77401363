//! A `skiff-control` process for API tests: its own data directory and loopback ports, its
//! admin kubeconfig, and the installed `kubectl` pointed at it with a private cache. The process
//! is ended by PID on drop.

use std::{
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use crate::bin;

/// A running control plane.
#[derive(Debug)]
pub struct ControlPlane {
    child: Child,
    dir: tempfile::TempDir,
    /// The API server's address.
    pub api: SocketAddr,
}

fn free_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("addr")
}

impl ControlPlane {
    /// Starts `skiff-control` (single-member store) and waits until `kubectl` can use it.
    pub fn start() -> ControlPlane {
        Self::start_on(std::net::Ipv4Addr::LOCALHOST)
    }

    /// Like [`ControlPlane::start`], with the API server on `ip` (an address of this namespace,
    /// e.g. the host side of a test node's link) so agents in node namespaces reach it.
    pub fn start_on(ip: std::net::Ipv4Addr) -> ControlPlane {
        Self::start_with(ip, &[])
    }

    /// Like [`ControlPlane::start_on`], with extra `skiff-control` arguments.
    pub fn start_with(ip: std::net::Ipv4Addr, extra: &[&str]) -> ControlPlane {
        let dir = tempfile::tempdir().expect("tempdir");
        let api = {
            let l = TcpListener::bind((ip, 0)).expect("bind a free API port");
            l.local_addr().expect("addr")
        };
        let (peer, client) = (free_port(), free_port());
        let log = std::fs::File::create(dir.path().join("control.log")).expect("log file");
        let child = Command::new(bin("skiff-control"))
            .args(["--data-dir", &dir.path().join("data").display().to_string()])
            .args(["--api-listen", &api.to_string()])
            .args(["--peer-listen", &peer.to_string()])
            .args(["--client-listen", &client.to_string()])
            .args(["--tls-san", &ip.to_string()])
            .args(extra)
            .env("RUST_LOG", "info,skiff_controllers=debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start skiff-control");
        let cp = ControlPlane { child, dir, api };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if cp.kubeconfig().exists() {
                let out = cp.kubectl(&["get", "--raw", "/readyz"]);
                if out.status.success() {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "skiff-control did not become ready; log:\n{}",
                cp.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        cp
    }

    /// The admin kubeconfig.
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("data/admin.kubeconfig")
    }

    /// The process's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("control.log")).unwrap_or_default()
    }

    /// A scratch directory that lives as long as the control plane.
    pub fn scratch(&self) -> &Path {
        self.dir.path()
    }

    /// A `kubectl` command against this control plane (private HOME and cache).
    pub fn kubectl_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("kubectl");
        c.args(args)
            .env("KUBECONFIG", self.kubeconfig())
            .env("HOME", self.dir.path())
            .env_remove("KUBE_EDITOR")
            .stdin(Stdio::null());
        c
    }

    /// Runs `kubectl` and returns its output.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_cmd(args).output().expect("run kubectl")
    }

    /// Runs `kubectl`, asserts success, and returns stdout.
    #[track_caller]
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {} failed:\nstdout: {}\nstderr: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The busybox test image (named `busybox:1.36`) as an OCI layout archive in the scratch
    /// directory, built from the machine's static busybox.
    pub fn busybox_archive(&self) -> PathBuf {
        let archive = self.scratch().join("busybox.tar");
        skiff_runtime::oci_layout::build_busybox_archive(
            Path::new("/bin/busybox"),
            "busybox:1.36",
            &archive,
        )
        .expect("image archive");
        archive
    }

    /// Runs `kubectl <args> -o jsonpath=<path>`, asserts success, and returns stdout.
    #[track_caller]
    pub fn jsonpath(&self, args: &[&str], path: &str) -> String {
        let mut a = args.to_vec();
        let p = format!("jsonpath={path}");
        a.extend(["-o", &p]);
        self.ok(&a)
    }

    /// Runs `kubectl`, asserts failure, and returns stderr.
    #[track_caller]
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            !out.status.success(),
            "kubectl {} should have failed; stdout: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// Runs `kubectl` with `stdin` as input and asserts success.
    #[track_caller]
    pub fn ok_stdin(&self, args: &[&str], stdin: &str) -> String {
        use std::io::Write;
        let mut child = self
            .kubectl_cmd(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run kubectl");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(stdin.as_bytes())
            .expect("write stdin");
        let out = child.wait_with_output().expect("kubectl output");
        assert!(
            out.status.success(),
            "kubectl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Polls `check` every 100 ms for up to `secs` seconds.
    #[track_caller]
    pub fn eventually(&self, secs: u64, what: &str, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !check() {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; log tail:\n{}",
                self.log()
                    .lines()
                    .rev()
                    .take(
                        std::env::var("SKIFF_LOG_TAIL")
                            .ok()
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(30)
                    )
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        crate::stop_child(&mut self.child, Duration::from_secs(10));
    }
}

/// A pod on `node` accepting TCP on 80 (named `http`) and 81 — busybox `nc` listeners closing
/// each connection — with `labels` (YAML flow-mapping entries, e.g. `app: server`); a
/// manifest ending with a document separator.
pub fn listener_pod(ns: &str, name: &str, labels: &str, node: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {ns}, labels: {{{labels}}}}}
spec:
  nodeName: {node}
  terminationGracePeriodSeconds: 0
  containers:
  - name: c
    image: busybox:1.36
    command: ["sh", "-c", "nc -ll -p 80 -e true & nc -ll -p 81 -e true & wait"]
    ports: [{{name: http, containerPort: 80}}]
---
"#
    )
}
