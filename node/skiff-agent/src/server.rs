//! The agent's HTTPS endpoint (the kubelet port): container logs for the API server's
//! `pods/log` proxy and exec sessions for its `pods/exec` proxy.
//!
//! TLS: a serving certificate made at start (rcgen, ECDSA P-256); its SHA-256 fingerprint is
//! published on the Node (`skiff.dev/serving-cert-sha256`), and the API server pins it, so only
//! the holder of this node's credentials can impersonate it. Authentication: the caller must
//! present this node's bearer token (which the control plane issued).
//!
//! `GET /containerLogs/<namespace>/<pod>/<container>?follow&tailLines&previous&limitBytes`;
//! `GET /exec/<namespace>/<pod>/<container>?command=…` (WebSocket, see [`crate::exec`]).

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, OnceLock},
    time::Duration,
};

use anyhow::{Context, Result};
use axum::{
    Router,
    body::{Body, Bytes},
    extract::{
        Path, Query, RawQuery, State,
        ws::{WebSocketUpgrade, rejection::WebSocketUpgradeRejection},
    },
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
    service::TowerToHyperService,
};
use k8s_openapi::chrono::{DateTime, TimeDelta, Utc};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::pods::PodManager;

/// Node annotation carrying the serving certificate's SHA-256 fingerprint (hex).
pub const FINGERPRINT_ANNOTATION: &str = "skiff.dev/serving-cert-sha256";
/// How often a followed log is checked for new output.
const FOLLOW_POLL: Duration = Duration::from_millis(100);

/// A serving certificate for this agent.
#[derive(Debug)]
pub struct ServingCert {
    tls: Arc<rustls::ServerConfig>,
    /// Hex SHA-256 of the certificate (DER).
    pub fingerprint: String,
}

impl ServingCert {
    /// Makes a certificate for `names` (the node's name and address).
    pub fn generate(names: Vec<String>) -> Result<ServingCert> {
        let key = rcgen::KeyPair::generate().context("generate the serving key")?;
        let params = rcgen::CertificateParams::new(names).context("serving certificate names")?;
        let cert = params
            .self_signed(&key)
            .context("self-sign the serving certificate")?;
        let der = cert.der().to_vec();
        let fingerprint = hex::encode(Sha256::digest(&der));
        let key_der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der())
            .map_err(|e| anyhow::anyhow!("serving key: {e}"))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS versions")?
            .with_no_client_auth()
            .with_single_cert(vec![der.into()], key_der)
            .context("serving certificate")?;
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(ServingCert {
            tls: Arc::new(cfg),
            fingerprint,
        })
    }
}

/// What the endpoint serves from.
#[derive(Debug)]
pub struct Endpoint {
    /// `<data-dir>/pods` (container logs).
    pub pods_dir: PathBuf,
    /// The bearer token callers must present.
    pub token: String,
    /// The pod manager, once it runs (exec answers 503 before).
    pub pods: OnceLock<Arc<PodManager>>,
}

impl Endpoint {
    fn authorized(&self, headers: &HeaderMap) -> bool {
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|t| t.as_bytes() == self.token.as_bytes())
    }
}

#[derive(Debug, serde::Deserialize)]
struct LogQuery {
    follow: Option<bool>,
    #[serde(rename = "tailLines")]
    tail_lines: Option<usize>,
    previous: Option<bool>,
    #[serde(rename = "limitBytes")]
    limit_bytes: Option<usize>,
    timestamps: Option<bool>,
    #[serde(rename = "sinceSeconds")]
    since_seconds: Option<i64>,
    #[serde(rename = "sinceTime")]
    since_time: Option<String>,
}

/// Turns stored log lines (CRI records; raw lines from before the agent wrote records pass
/// through) into what `kubectl logs` prints: the content, with its timestamp if asked, from
/// `since` on.
#[derive(Debug, Default)]
struct Render {
    timestamps: bool,
    since: Option<DateTime<Utc>>,
    /// The previous record was partial: this one continues its line.
    continuing: bool,
}

impl Render {
    /// Appends the output for the complete lines in `data` to `out`; returns how many bytes of
    /// `data` it consumed (up to the last line end).
    fn lines(&mut self, data: &[u8], out: &mut Vec<u8>) -> usize {
        let mut used = 0;
        while let Some(n) = data[used..].iter().position(|b| *b == b'\n') {
            self.line(&data[used..used + n], out);
            used += n + 1;
        }
        used
    }

    fn line(&mut self, raw: &[u8], out: &mut Vec<u8>) {
        let Some(r) = skiff_runtime::crilog::parse(raw) else {
            out.extend_from_slice(raw);
            out.push(b'\n');
            return;
        };
        let continuing = std::mem::replace(&mut self.continuing, r.partial);
        if self.since.is_some_and(|s| r.time < s) {
            return;
        }
        if self.timestamps && !continuing {
            out.extend_from_slice(r.time_text.as_bytes());
            out.push(b' ');
        }
        out.extend_from_slice(r.content);
        if !r.partial {
            out.push(b'\n');
        }
    }
}

fn err(code: StatusCode, msg: impl Into<String>) -> Response {
    (code, [(header::CONTENT_TYPE, "text/plain")], msg.into()).into_response()
}

/// The log files of one container, oldest attempt first.
fn attempts(src: &Endpoint, ns: &str, pod: &str, container: &str) -> Vec<PathBuf> {
    let prefix = format!("{ns}_{pod}_");
    let Ok(dirs) = std::fs::read_dir(&src.pods_dir) else {
        return Vec::new();
    };
    // The newest pod directory of that name (a pod re-created with the same name has a new uid).
    let dir = dirs
        .filter_map(Result::ok)
        .filter(|d| d.file_name().to_string_lossy().starts_with(&prefix))
        .max_by_key(|d| d.metadata().and_then(|m| m.modified()).ok())
        .map(|d| d.path().join(container));
    let Some(dir) = dir else { return Vec::new() };
    let mut files: Vec<(u64, PathBuf)> = std::fs::read_dir(&dir)
        .map(|r| {
            r.filter_map(Result::ok)
                .filter_map(|e| {
                    let n = e
                        .file_name()
                        .to_string_lossy()
                        .strip_suffix(".log")?
                        .parse()
                        .ok()?;
                    Some((n, e.path()))
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files.into_iter().map(|(_, p)| p).collect()
}

fn tail(data: &[u8], lines: usize) -> &[u8] {
    if lines == 0 {
        return &data[data.len()..];
    }
    let mut seen = 0;
    let end = if data.ends_with(b"\n") {
        data.len() - 1
    } else {
        data.len()
    };
    for i in (0..end).rev() {
        if data[i] == b'\n' {
            seen += 1;
            if seen == lines {
                return &data[i + 1..];
            }
        }
    }
    data
}

async fn container_logs(
    State(src): State<Arc<Endpoint>>,
    Path((ns, pod, container)): Path<(String, String, String)>,
    Query(q): Query<LogQuery>,
    headers: HeaderMap,
) -> Response {
    if !src.authorized(&headers) {
        return err(StatusCode::UNAUTHORIZED, "Unauthorized");
    }
    let files = attempts(&src, &ns, &pod, &container);
    let file = if q.previous == Some(true) {
        if files.len() < 2 {
            return err(
                StatusCode::BAD_REQUEST,
                format!("previous terminated container \"{container}\" in pod \"{pod}\" not found"),
            );
        }
        files[files.len() - 2].clone()
    } else {
        match files.last() {
            Some(f) => f.clone(),
            None => {
                return err(
                    StatusCode::BAD_REQUEST,
                    format!("container \"{container}\" in pod \"{pod}\" is waiting to start"),
                );
            }
        }
    };
    let data = match tokio::fs::read(&file).await {
        Ok(d) => d,
        Err(e) => return err(StatusCode::NOT_FOUND, format!("log of {container}: {e}")),
    };
    let since = match (q.since_seconds, q.since_time.as_deref()) {
        (Some(secs), _) => Some(Utc::now() - TimeDelta::seconds(secs.max(0))),
        (None, Some(t)) => match DateTime::parse_from_rfc3339(t) {
            Ok(t) => Some(t.with_timezone(&Utc)),
            Err(e) => {
                return err(
                    StatusCode::BAD_REQUEST,
                    format!("sinceTime {t:?} is not an RFC 3339 time: {e}"),
                );
            }
        },
        (None, None) => None,
    };
    let mut render = Render {
        timestamps: q.timestamps == Some(true),
        since,
        continuing: false,
    };
    let mut rendered = Vec::with_capacity(data.len());
    let used = render.lines(&data, &mut rendered);
    let mut first = match q.tail_lines {
        Some(n) => tail(&rendered, n).to_vec(),
        None => rendered,
    };
    let mut budget = q.limit_bytes.unwrap_or(usize::MAX);
    first.truncate(budget);
    budget -= first.len();
    if q.follow != Some(true) || q.previous == Some(true) {
        return (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/plain")],
            first,
        )
            .into_response();
    }
    // Follow: what is there, then new output until the container is restarted (a newer attempt
    // appears) or its pod goes.
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    let offset = used as u64;
    let src2 = src.clone();
    tokio::spawn(async move {
        if tx.send(Bytes::from(first)).await.is_err() {
            return;
        }
        let Ok(mut f) = tokio::fs::File::open(&file).await else {
            return;
        };
        if f.seek(std::io::SeekFrom::Start(offset)).await.is_err() {
            return;
        }
        let mut buf = vec![0u8; 64 * 1024];
        // Bytes read but not yet a whole line.
        let mut pending: Vec<u8> = Vec::new();
        loop {
            if budget == 0 {
                return;
            }
            match f.read(&mut buf).await {
                Ok(0) => {
                    let now = attempts(&src2, &ns, &pod, &container);
                    if now.last() != Some(&file) {
                        return;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(FOLLOW_POLL) => {}
                        _ = tx.closed() => return,
                    }
                }
                Ok(n) => {
                    pending.extend_from_slice(&buf[..n]);
                    let mut out = Vec::new();
                    let used = render.lines(&pending, &mut out);
                    pending.drain(..used);
                    out.truncate(budget);
                    budget -= out.len();
                    if !out.is_empty() && tx.send(Bytes::from(out)).await.is_err() {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    });
    let body = Body::from_stream(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    }));
    (StatusCode::OK, [(header::CONTENT_TYPE, "text/plain")], body).into_response()
}

async fn exec(
    State(ep): State<Arc<Endpoint>>,
    Path(target): Path<(String, String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    if !ep.authorized(&headers) {
        return crate::exec::status_response(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "Unauthorized",
        );
    }
    let Some(pods) = ep.pods.get() else {
        return crate::exec::status_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            "the node agent is not running pods yet",
        );
    };
    crate::exec::handle(
        pods,
        target,
        query.as_deref().unwrap_or(""),
        &headers,
        ws.ok(),
    )
}

/// Serves the endpoint on `addr` until aborted.
pub async fn serve(addr: SocketAddr, cert: &ServingCert, src: Arc<Endpoint>) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("bind the agent endpoint on {addr}"))?;
    let app = Router::new()
        .route("/containerLogs/{ns}/{pod}/{container}", get(container_logs))
        .route("/exec/{ns}/{pod}/{container}", get(exec).post(exec))
        .with_state(src);
    let tls = tokio_rustls::TlsAcceptor::from(cert.tls.clone());
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            Some(_) = conns.join_next() => continue,
        };
        let Ok((tcp, _)) = accepted else { continue };
        let (tls, app) = (tls.clone(), app.clone());
        conns.spawn(async move {
            let Ok(Ok(stream)) =
                tokio::time::timeout(Duration::from_secs(10), tls.accept(tcp)).await
            else {
                return;
            };
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(stream), TowerToHyperService::new(app))
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_lines() {
        assert_eq!(tail(b"a\nb\nc\n", 2), b"b\nc\n");
        assert_eq!(tail(b"a\nb\nc", 1), b"c");
        assert_eq!(tail(b"a\nb\n", 5), b"a\nb\n");
        assert_eq!(tail(b"a\n", 0), b"");
    }
}
