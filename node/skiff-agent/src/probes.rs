//! Container probes as the kubelet runs them: `exec` (a command in the container, exit 0),
//! `httpGet` (a status from 200 to 399; HTTPS without certificate checks, as upstream), and
//! `tcpSocket` (a connection), each bounded by `timeoutSeconds`; and the periodic loop with
//! `initialDelaySeconds`, `periodSeconds`, `successThreshold` and `failureThreshold`.

use std::{net::Ipv4Addr, path::PathBuf, time::Duration};

use k8s_openapi::{
    api::core::v1::{Container, LifecycleHandler, Probe},
    apimachinery::pkg::util::intstr::IntOrString,
};
use skiff_runtime::exec::{Exec, ExecConfig};
use tokio::io::AsyncReadExt;

/// Where a container's probes go.
#[derive(Clone, Debug)]
pub struct Target {
    /// The pod's IP (the default host of `httpGet` and `tcpSocket`).
    pub pod_ip: Ipv4Addr,
    /// The container, for `exec` and named ports.
    pub container: Container,
    /// Its containerd id.
    pub container_id: String,
    /// containerd.
    pub ch: containerd_client::tonic::transport::Channel,
    /// Where exec FIFOs go.
    pub exec_dir: PathBuf,
}

/// Output kept from an exec probe (for the event message).
const MAX_OUTPUT: usize = 10 * 1024;

fn port(t: &Target, p: &IntOrString) -> Result<u16, String> {
    match p {
        IntOrString::Int(n) => u16::try_from(*n).map_err(|_| format!("port {n} is out of range")),
        IntOrString::String(name) => {
            if let Ok(n) = name.parse::<u16>() {
                return Ok(n);
            }
            t.container
                .ports
                .iter()
                .flatten()
                .find(|cp| cp.name.as_deref() == Some(name.as_str()))
                .and_then(|cp| u16::try_from(cp.container_port).ok())
                .ok_or_else(|| format!("port {name:?} is not a named port of the container"))
        }
    }
}

fn host(t: &Target, h: Option<&String>) -> String {
    h.filter(|h| !h.is_empty())
        .cloned()
        .unwrap_or_else(|| t.pod_ip.to_string())
}

/// Runs `p` once; `Err` carries the failure's description.
pub async fn check(p: &Probe, t: &Target) -> Result<(), String> {
    let timeout =
        Duration::from_secs(u64::try_from(p.timeout_seconds.unwrap_or(1).max(1)).unwrap_or(1));
    let run = async {
        if let Some(e) = &p.exec {
            exec(t, e.command.clone().unwrap_or_default()).await
        } else if let Some(h) = &p.http_get {
            let port = port(t, &h.port)?;
            let host = host(t, h.host.as_ref());
            let path = h
                .path
                .clone()
                .filter(|p| !p.is_empty())
                .unwrap_or_else(|| "/".into());
            let https = h.scheme.as_deref() == Some("HTTPS");
            let headers: Vec<(String, String)> = h
                .http_headers
                .iter()
                .flatten()
                .map(|x| (x.name.clone(), x.value.clone()))
                .collect();
            http_get(&host, port, &path, https, &headers).await
        } else if let Some(s) = &p.tcp_socket {
            let port = port(t, &s.port)?;
            let host = host(t, s.host.as_ref());
            tokio::net::TcpStream::connect((host.as_str(), port))
                .await
                .map(drop)
                .map_err(|e| format!("dial tcp {host}:{port}: {e}"))
        } else if p.grpc.is_some() {
            Err("gRPC probes are not supported by skiff yet".into())
        } else {
            Err("the probe has no handler".into())
        }
    };
    match tokio::time::timeout(timeout, run).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "timeout: the probe took longer than {}s",
            timeout.as_secs()
        )),
    }
}

async fn exec(t: &Target, args: Vec<String>) -> Result<(), String> {
    let cfg = ExecConfig {
        container_id: t.container_id.clone(),
        args: args.clone(),
        tty: false,
        stdin: false,
        stdout: true,
        stderr: true,
        console_size: None,
        fifo_dir: t.exec_dir.join(crate::exec::exec_id()),
    };
    let mut e = Exec::start(&t.ch, &cfg).await.map_err(|e| e.to_string())?;
    // Removed however this ends (a timeout drops the future).
    struct Cleanup(Option<Exec>);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            if let Some(mut e) = self.0.take() {
                tokio::spawn(async move { e.cleanup().await });
            }
        }
    }
    let (mut out, mut err) = (e.stdout.take(), e.stderr.take());
    let control = e.control();
    let _guard = Cleanup(Some(e));
    // Everything is read (a process blocked on a full pipe would never exit); the start is kept.
    let read = |r: Option<tokio::net::unix::pipe::Receiver>| async move {
        let mut kept = Vec::new();
        let Some(mut r) = r else { return kept };
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = r.read(&mut buf).await {
            let room = MAX_OUTPUT.saturating_sub(kept.len()).min(n);
            kept.extend_from_slice(&buf[..room]);
        }
        kept
    };
    let (code, o, e2) = tokio::join!(control.wait(), read(out.take()), read(err.take()));
    match code {
        Ok(0) => Ok(()),
        Ok(n) => {
            let mut text = String::from_utf8_lossy(&o).into_owned();
            text.push_str(&String::from_utf8_lossy(&e2));
            Err(format!(
                "command {args:?} exited with {n}: {}",
                text.trim_end()
            ))
        }
        Err(e) => Err(format!("{e:#}")),
    }
}

/// The HTTP client of `httpGet` probes and hooks: no certificate checks and no kept-alive
/// connections (as the kubelet's), redirects followed.
fn http_client() -> Result<&'static reqwest::Client, String> {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    if let Some(c) = CLIENT.get() {
        return Ok(c);
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let c = reqwest::Client::builder()
        .tls_danger_accept_invalid_certs(true)
        .pool_max_idle_per_host(0)
        .user_agent("kube-probe/1.32")
        .build()
        .map_err(|e| format!("the probe HTTP client: {e}"))?;
    Ok(CLIENT.get_or_init(|| c))
}

async fn http_get(
    host: &str,
    port: u16,
    path: &str,
    https: bool,
    headers: &[(String, String)],
) -> Result<(), String> {
    let url = format!(
        "{}://{host}:{port}{path}",
        if https { "https" } else { "http" }
    );
    let mut req = http_client()?
        .get(&url)
        .header(reqwest::header::ACCEPT, "*/*");
    for (k, v) in headers {
        req = req.header(k.as_str(), v.as_str());
    }
    let status = req
        .send()
        .await
        .map_err(|e| format!("Get {url:?}: {e}"))?
        .status()
        .as_u16();
    if (200..400).contains(&status) {
        Ok(())
    } else {
        Err(format!("HTTP probe failed with statuscode: {status}"))
    }
}

/// Runs a lifecycle hook (`postStart`, `preStop`): `exec`, `httpGet` or `sleep`, bounded by
/// `limit`; `Err` describes the failure.
pub async fn hook(h: &LifecycleHandler, t: &Target, limit: Duration) -> Result<(), String> {
    if let Some(sl) = &h.sleep {
        let d = Duration::from_secs(u64::try_from(sl.seconds.max(0)).unwrap_or(0));
        tokio::time::sleep(d.min(limit)).await;
        return Ok(());
    }
    if h.tcp_socket.is_some() {
        return Err("tcpSocket lifecycle handlers are not supported (as upstream)".into());
    }
    let as_probe = Probe {
        exec: h.exec.clone(),
        http_get: h.http_get.clone(),
        timeout_seconds: Some(i32::try_from(limit.as_secs().max(1)).unwrap_or(i32::MAX)),
        ..Default::default()
    };
    check(&as_probe, t).await
}

/// Outcome of a probe after its thresholds.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// `successThreshold` consecutive successes.
    Success,
    /// `failureThreshold` consecutive failures; the last failure's description.
    Failure(String),
}

/// Runs a probe periodically (after `initialDelaySeconds`, every `periodSeconds`) and reports
/// each change of verdict after the thresholds.
#[derive(Debug)]
pub struct Runner {
    probe: Probe,
    period: Duration,
    initial: Option<Duration>,
    success_threshold: i32,
    failure_threshold: i32,
    successes: i32,
    failures: i32,
    verdict: Option<Verdict>,
}

impl Runner {
    /// A runner for `p`.
    pub fn new(p: &Probe) -> Runner {
        let secs = |v: Option<i32>, d: i32| {
            Duration::from_secs(u64::try_from(v.unwrap_or(d).max(0)).unwrap_or(0))
        };
        Runner {
            probe: p.clone(),
            period: secs(p.period_seconds, 10).max(Duration::from_secs(1)),
            initial: Some(secs(p.initial_delay_seconds, 0)),
            success_threshold: p.success_threshold.unwrap_or(1).max(1),
            failure_threshold: p.failure_threshold.unwrap_or(3).max(1),
            successes: 0,
            failures: 0,
            verdict: None,
        }
    }

    /// Probes until the verdict changes (the first verdict is a change) and returns it;
    /// `on_failure` sees every single failure (for events).
    pub async fn next_change(&mut self, t: &Target, mut on_failure: impl FnMut(&str)) -> Verdict {
        if let Some(d) = self.initial.take() {
            tokio::time::sleep(d).await;
        } else {
            tokio::time::sleep(self.period).await;
        }
        loop {
            let started = tokio::time::Instant::now();
            let next = match check(&self.probe, t).await {
                Ok(()) => {
                    self.failures = 0;
                    self.successes += 1;
                    (self.successes >= self.success_threshold).then_some(Verdict::Success)
                }
                Err(e) => {
                    on_failure(&e);
                    self.successes = 0;
                    self.failures += 1;
                    (self.failures >= self.failure_threshold).then_some(Verdict::Failure(e))
                }
            };
            if let Some(v) = next {
                let changed = !matches!(
                    (&self.verdict, &v),
                    (Some(Verdict::Success), Verdict::Success)
                        | (Some(Verdict::Failure(_)), Verdict::Failure(_))
                );
                self.verdict = Some(v.clone());
                if changed {
                    return v;
                }
            }
            tokio::time::sleep(self.period.saturating_sub(started.elapsed())).await;
        }
    }
}
