//! `kubectl exec` on this node: `GET /exec/<namespace>/<pod>/<container>?command=…&stdin&stdout
//! &stderr&tty`, upgraded to a WebSocket speaking Kubernetes' `v5.channel.k8s.io` (or
//! `v4.channel.k8s.io`) stream protocol, the one kubectl 1.30+ uses and the API server proxies
//! unchanged.
//!
//! Every binary message starts with a channel byte: 0 stdin, 1 stdout, 2 stderr, 3 error (one
//! `Status` at the end: `Success`, or `NonZeroExitCode` with the code as an `ExitCode` cause, or
//! an internal error), 4 terminal resize (`{"Width":…,"Height":…}`), and in v5 255 "close
//! stream" (`[255, 0]`: the client's stdin ended). The server ends with a normal WebSocket
//! close after the status, which is when the client's readers see end of file.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::{
    body::Bytes,
    extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use skiff_runtime::exec::{Exec, ExecConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::pods::PodManager;

/// The stream protocols served, preferred first.
pub const PROTOCOLS: [&str; 2] = ["v5.channel.k8s.io", "v4.channel.k8s.io"];
const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const ERROR: u8 = 3;
const RESIZE: u8 = 4;
const CLOSE: u8 = 255;
/// How long a terminal session waits for the client's first resize before the process starts
/// (kubectl sends it at once).
const FIRST_RESIZE: Duration = Duration::from_secs(1);
/// How long a session waits before its process can produce output: kubectl's WebSocket client
/// starts reading the connection before it has registered its streams, and drops what arrives
/// on a stream it does not know yet ("Unknown stream id"), which a fast command under load hit.
const STREAMS_SETTLE: Duration = Duration::from_millis(100);
/// How long the client has to answer the server's close.
const CLOSE_WAIT: Duration = Duration::from_secs(5);
/// After the process exits, output still flowing is forwarded; output that stops for this long
/// while something else (a background child) holds the streams open is not waited for.
const DRAIN_IDLE: Duration = Duration::from_secs(2);

/// A Kubernetes `Status` response (the API server relays it to the client as it is).
pub fn status_response(code: StatusCode, reason: &str, message: &str) -> Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code.as_u16(),
    });
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// What the client asked for, from the query string (`command` repeats).
#[derive(Debug, Default, PartialEq)]
pub struct ExecOptions {
    /// The command and its arguments.
    pub command: Vec<String>,
    /// Streams.
    pub stdin: bool,
    /// Streams.
    pub stdout: bool,
    /// Streams.
    pub stderr: bool,
    /// Allocate a terminal.
    pub tty: bool,
}

impl ExecOptions {
    /// Parses `command=…&command=…&stdin=true…`.
    pub fn parse(query: &str) -> ExecOptions {
        let mut o = ExecOptions::default();
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            let on = matches!(v.as_ref(), "true" | "1");
            match k.as_ref() {
                "command" => o.command.push(v.into_owned()),
                "stdin" | "input" => o.stdin = on,
                "stdout" | "output" => o.stdout = on,
                "stderr" | "error" => o.stderr = on,
                "tty" => o.tty = on,
                _ => {}
            }
        }
        o
    }
}

/// Looks the container up and upgrades the connection; the session runs the process.
pub fn handle(
    pods: &Arc<PodManager>,
    (ns, pod, container): (String, String, String),
    query: &str,
    headers: &HeaderMap,
    ws: Option<WebSocketUpgrade>,
) -> Response {
    let opts = ExecOptions::parse(query);
    if opts.command.is_empty() {
        return status_response(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "you must specify at least 1 command",
        );
    }
    if !(opts.stdin || opts.stdout || opts.stderr) {
        return status_response(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "you must specify at least 1 of stdin, stdout, stderr",
        );
    }
    let id = match pods.running_container(&ns, &pod, &container) {
        Ok(id) => id,
        Err(e) => return status_response(StatusCode::NOT_FOUND, "NotFound", &e.to_string()),
    };
    let offered = headers
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let (Some(ws), true) = (
        ws,
        offered.split(',').any(|p| PROTOCOLS.contains(&p.trim())),
    ) else {
        return status_response(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "exec is served over a WebSocket with the v5.channel.k8s.io or v4.channel.k8s.io \
             protocol (kubectl 1.30 or newer); SPDY is not supported",
        );
    };
    let exec_id = exec_id();
    let cfg = ExecConfig {
        container_id: id,
        args: opts.command.clone(),
        tty: opts.tty,
        stdin: opts.stdin,
        stdout: opts.stdout,
        stderr: opts.stderr,
        console_size: None,
        fifo_dir: pods.exec_dir().join(&exec_id),
    };
    let ch = pods.containerd().clone();
    tracing::info!(pod = %format!("{ns}/{pod}"), %container, command = ?opts.command, tty = opts.tty, "exec");
    ws.protocols(PROTOCOLS)
        .on_upgrade(move |socket| session(socket, ch, cfg))
}

/// A new exec id (sessions and exec probes): unique on this node, also across agent restarts
/// (containerd may still hold execs of an agent that crashed).
pub(crate) fn exec_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("exec-{now:x}-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

fn frame(channel: u8, data: &[u8]) -> Message {
    let mut v = Vec::with_capacity(data.len() + 1);
    v.push(channel);
    v.extend_from_slice(data);
    Message::Binary(Bytes::from(v))
}

/// The status sent on the error channel for an exit code.
pub fn exit_status(command: &[String], code: u32) -> Value {
    if code == 0 {
        return json!({"metadata": {}, "status": "Success"});
    }
    json!({
        "metadata": {}, "status": "Failure", "reason": "NonZeroExitCode",
        "message": format!(
            "command terminated with non-zero exit code: command {command:?} exited with {code}"
        ),
        "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
    })
}

fn internal_error(message: &str) -> Value {
    let message = format!("error executing command in container: {message}");
    json!({
        "metadata": {}, "status": "Failure", "reason": "InternalError", "code": 500,
        "message": format!("Internal error occurred: {message}"),
        "details": {"causes": [{"message": message}]},
    })
}

/// A resize message's (columns, rows).
fn resize_of(data: &[u8]) -> Option<(u32, u32)> {
    if data.first() != Some(&RESIZE) {
        return None;
    }
    serde_json::from_slice::<TerminalSize>(&data[1..])
        .ok()
        .map(|s| (s.width, s.height))
}

/// The client's side of a session: the process's stdin and terminal.
struct Input {
    stdin: Option<tokio::net::unix::pipe::Sender>,
    control: skiff_runtime::exec::ExecControl,
    /// Set once the process has exited.
    exited: tokio::sync::watch::Receiver<bool>,
}

impl Input {
    /// One message from the client: input, a resize, or the end of input.
    async fn message(&mut self, data: &[u8]) {
        if *self.exited.borrow() {
            self.stdin = None;
            return;
        }
        match (data.first(), data.get(1)) {
            (Some(&STDIN), _) => {
                let Some(w) = self.stdin.as_mut() else { return };
                let written = tokio::select! {
                    r = w.write_all(&data[1..]) => r.is_ok(),
                    _ = self.exited.wait_for(|e| *e) => false,
                };
                if !written {
                    self.stdin = None;
                }
            }
            (Some(&RESIZE), _) => {
                if let Some((width, height)) = resize_of(data) {
                    let _ = self.control.resize(width, height).await;
                }
            }
            (Some(&CLOSE), Some(&STDIN)) => {
                let open = self.stdin.take().is_some();
                if open {
                    let _ = self.control.close_stdin().await;
                }
            }
            _ => {}
        }
    }
}

#[derive(serde::Deserialize)]
struct TerminalSize {
    #[serde(rename = "Width")]
    width: u32,
    #[serde(rename = "Height")]
    height: u32,
}

async fn session(
    socket: WebSocket,
    ch: containerd_client::tonic::transport::Channel,
    mut cfg: ExecConfig,
) {
    let (mut sink, mut incoming) = socket.split();
    let mut early = Vec::new();
    // Before the process starts: a terminal waits for the client's first resize (at most
    // FIRST_RESIZE); other sessions wait STREAMS_SETTLE. Input arriving meanwhile is kept.
    let wait = if cfg.tty {
        FIRST_RESIZE
    } else {
        STREAMS_SETTLE
    };
    let deadline = tokio::time::Instant::now() + wait;
    while !(cfg.tty && cfg.console_size.is_some()) {
        match tokio::time::timeout_at(deadline, incoming.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => match resize_of(&b).filter(|_| cfg.tty) {
                Some(size) => cfg.console_size = Some(size),
                None => early.push(b),
            },
            Ok(Some(Ok(Message::Close(_)) | Err(_)) | None) => return,
            Ok(Some(Ok(_))) => {}
            Err(_) => break,
        }
    }
    let finish = |status: Value| {
        [
            frame(ERROR, status.to_string().as_bytes()),
            Message::Close(Some(CloseFrame {
                code: 1000,
                reason: "".into(),
            })),
        ]
    };
    let mut exec = match Exec::start(&ch, &cfg).await {
        Ok(e) => e,
        Err(e) => {
            let msg = format!("{e:#}");
            tracing::info!(error = %msg, "exec failed to start");
            for m in finish(internal_error(&msg)) {
                let _ = sink.send(m).await;
            }
            // Read what the client still sends until its close reply: closing a socket with
            // unread input resets the connection, and the client could lose the status.
            let _ = tokio::time::timeout(CLOSE_WAIT, async {
                while let Some(Ok(m)) = incoming.next().await {
                    if matches!(m, Message::Close(_)) {
                        break;
                    }
                }
            })
            .await;
            return;
        }
    };
    let control = exec.control();

    // Output: one reader per stream, one writer to the socket.
    let (out_tx, mut out_rx) = tokio::sync::mpsc::channel::<Message>(16);
    let progress = Arc::new(AtomicU64::new(0));
    let mut readers = tokio::task::JoinSet::new();
    for (channel, stream) in [(STDOUT, exec.stdout.take()), (STDERR, exec.stderr.take())] {
        let Some(mut stream) = stream else { continue };
        let (tx, progress) = (out_tx.clone(), progress.clone());
        readers.spawn(async move {
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        progress.fetch_add(n as u64, Ordering::Relaxed);
                        if tx.send(frame(channel, &buf[..n])).await.is_err() {
                            break;
                        }
                    }
                }
            }
        });
    }
    drop(out_tx);
    let writer = tokio::spawn(async move {
        while let Some(m) = out_rx.recv().await {
            if sink.send(m).await.is_err() {
                break;
            }
        }
        sink
    });

    // Input: stdin, resizes, the close signal; ends when the client goes away.
    // After the process exits, input is discarded (a write must not wait on a full pipe that
    // nobody reads) and the loop only waits for the client's close reply.
    let (exited_tx, exited_rx) = tokio::sync::watch::channel(false);
    let mut input = {
        let mut input = Input {
            stdin: exec.stdin.take(),
            control: control.clone(),
            exited: exited_rx,
        };
        tokio::spawn(async move {
            for data in early {
                input.message(&data).await;
            }
            while let Some(Ok(msg)) = incoming.next().await {
                match msg {
                    Message::Binary(data) => input.message(&data).await,
                    Message::Close(_) => break,
                    _ => {}
                }
            }
        })
    };

    let exited = tokio::select! {
        r = control.wait() => Some(r),
        _ = &mut input => None,
    };
    let _ = exited_tx.send(true);
    let Some(exited) = exited else {
        // The client is gone: end the process, as the kubelet does.
        tracing::info!("exec client disconnected; ending the process");
        readers.abort_all();
        exec.cleanup().await;
        return;
    };
    // Forward what the process wrote; do not wait on a background child holding the streams.
    loop {
        let before = progress.load(Ordering::Relaxed);
        let drained = tokio::time::timeout(DRAIN_IDLE, async {
            while readers.join_next().await.is_some() {}
        })
        .await;
        if drained.is_ok() {
            break;
        }
        if progress.load(Ordering::Relaxed) == before {
            readers.abort_all();
            break;
        }
    }
    let status = match exited {
        Ok(code) => exit_status(&cfg.args, code),
        Err(e) => internal_error(&format!("{e:#}")),
    };
    if let Ok(mut sink) = writer.await {
        for m in finish(status) {
            if sink.send(m).await.is_err() {
                break;
            }
        }
    }
    // The client answers the close; reading up to it lets the connection end cleanly.
    if tokio::time::timeout(CLOSE_WAIT, &mut input).await.is_err() {
        input.abort();
    }
    exec.cleanup().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_from_the_query() {
        let o = ExecOptions::parse(
            "command=sh&command=-c&command=echo+a%26b&stdin=true&stdout=true&stderr=true&tty=false",
        );
        assert_eq!(o.command, vec!["sh", "-c", "echo a&b"]);
        assert!(o.stdin && o.stdout && o.stderr && !o.tty);
    }

    #[test]
    fn exit_statuses_as_the_client_decodes_them() {
        let ok = exit_status(&["true".into()], 0);
        assert_eq!(ok["status"], "Success");
        let failed = exit_status(&["false".into()], 3);
        assert_eq!(failed["reason"], "NonZeroExitCode");
        assert_eq!(failed["details"]["causes"][0]["reason"], "ExitCode");
        assert_eq!(failed["details"]["causes"][0]["message"], "3");
        let internal = internal_error("no such file");
        assert_eq!(internal["reason"], "InternalError");
        assert!(
            internal["message"]
                .as_str()
                .unwrap()
                .starts_with("Internal error occurred: ")
        );
    }
}
