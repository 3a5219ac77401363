//! The store's client listener (etcd's client port), and a client for it.
//!
//! Inside `skiff-control` the API server calls [`crate::StoreNode`] directly; this listener lets
//! other processes use the store: the multi-process fault tests, the store benchmark, and
//! operators inspecting a member. Requests and responses are postcard; a watch answers with a
//! stream of frames, each a little-endian `u32` length and a postcard `Result<WatchEvent, _>`.
//! It binds loopback by default and has no authentication: do not expose it.

use std::{net::SocketAddr, time::Duration};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{DefaultBodyLimit, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};

use crate::{
    RangeRequest, RangeResponse, Revision, StoreError, StoreNode, Txn, TxnResponse, WatchEvent,
    raft::NodeId,
};

/// Largest client request: a transaction with a value at the limit, plus headroom.
const CLIENT_BODY_LIMIT: usize = 4 << 20;

/// A store error as it crosses the wire.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum WireError {
    /// See [`StoreError::Compacted`].
    Compacted {
        /// Asked for.
        requested: Revision,
        /// Compacted revision.
        compacted: Revision,
    },
    /// See [`StoreError::FutureRevision`].
    FutureRevision {
        /// Asked for.
        requested: Revision,
        /// Current revision.
        current: Revision,
    },
    /// See [`StoreError::ValueTooLarge`].
    ValueTooLarge {
        /// Key.
        key: String,
        /// Size.
        size: usize,
        /// Limit.
        limit: usize,
    },
    /// Invalid request.
    Invalid(String),
    /// No leader/quorum, or an ambiguous outcome.
    Unavailable(String),
    /// Anything else (storage failure on the member).
    Internal(String),
}

impl From<StoreError> for WireError {
    fn from(e: StoreError) -> WireError {
        match e {
            StoreError::Compacted {
                requested,
                compacted,
            } => WireError::Compacted {
                requested,
                compacted,
            },
            StoreError::FutureRevision { requested, current } => {
                WireError::FutureRevision { requested, current }
            }
            StoreError::ValueTooLarge { key, size, limit } => {
                WireError::ValueTooLarge { key, size, limit }
            }
            StoreError::Invalid(m) => WireError::Invalid(m),
            StoreError::Unavailable(m) => WireError::Unavailable(m),
            other => WireError::Internal(other.to_string()),
        }
    }
}

impl From<WireError> for StoreError {
    fn from(e: WireError) -> StoreError {
        match e {
            WireError::Compacted {
                requested,
                compacted,
            } => StoreError::Compacted {
                requested,
                compacted,
            },
            WireError::FutureRevision { requested, current } => {
                StoreError::FutureRevision { requested, current }
            }
            WireError::ValueTooLarge { key, size, limit } => {
                StoreError::ValueTooLarge { key, size, limit }
            }
            WireError::Invalid(m) => StoreError::Invalid(m),
            WireError::Unavailable(m) | WireError::Internal(m) => StoreError::Unavailable(m),
        }
    }
}

/// A range read over the wire.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RangeCall {
    /// What to read.
    pub range: RangeRequest,
    /// Linearizable (read index) rather than this member's local state.
    pub linearizable: bool,
}

/// A watch over the wire.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WatchCall {
    /// Keys to watch.
    pub range: RangeRequest,
    /// First revision (0 = after the current one).
    pub start: Revision,
    /// Progress interval in milliseconds (0 = none).
    pub progress_ms: u64,
}

/// A member's view of the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// This member.
    pub id: NodeId,
    /// The leader it knows of.
    pub leader: Option<NodeId>,
    /// Its applied revision.
    pub revision: Revision,
    /// Its compacted revision.
    pub compacted: Revision,
}

/// The client listener's routes.
pub fn router(node: StoreNode) -> Router {
    Router::new()
        .route("/v1/txn", post(txn))
        .route("/v1/range", post(range))
        .route("/v1/compact", post(compact))
        .route("/v1/watch", post(watch))
        .route("/v1/status", get(status))
        .route("/v1/members", get(members).post(change_members))
        .layer(DefaultBodyLimit::max(CLIENT_BODY_LIMIT))
        .with_state(node)
}

/// Serves the client listener on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, node: StoreNode) -> std::io::Result<()> {
    axum::serve(listener, router(node)).await
}

fn decode<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, (StatusCode, String)> {
    postcard::from_bytes(body)
        .map_err(|e| (StatusCode::BAD_REQUEST, format!("malformed request: {e}")))
}

fn answer<T: Serialize>(r: Result<T, StoreError>) -> Response {
    let wire: Result<T, WireError> = r.map_err(WireError::from);
    match postcard::to_allocvec(&wire) {
        Ok(b) => ([("content-type", "application/octet-stream")], b).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn txn(State(node): State<StoreNode>, body: Bytes) -> Response {
    match decode::<Txn>(&body) {
        Ok(t) => answer(node.txn(t).await),
        Err(e) => e.into_response(),
    }
}

async fn range(State(node): State<StoreNode>, body: Bytes) -> Response {
    match decode::<RangeCall>(&body) {
        Ok(c) if c.linearizable => answer(node.range(c.range).await),
        Ok(c) => answer(node.range_local(c.range).await),
        Err(e) => e.into_response(),
    }
}

async fn compact(State(node): State<StoreNode>, body: Bytes) -> Response {
    match decode::<Revision>(&body) {
        Ok(r) => answer(node.compact(r).await),
        Err(e) => e.into_response(),
    }
}

async fn status(State(node): State<StoreNode>) -> Response {
    let status = match node.mvcc().compacted() {
        Ok(compacted) => Ok(Status {
            id: node.id(),
            leader: node.leader().await,
            revision: node.mvcc().revision(),
            compacted,
        }),
        Err(e) => Err(e),
    };
    answer(status)
}

async fn members(State(node): State<StoreNode>) -> Response {
    answer::<Vec<crate::Member>>(Ok(node.members()))
}

async fn change_members(State(node): State<StoreNode>, body: Bytes) -> Response {
    match decode::<crate::MemberChange>(&body) {
        Ok(c) => answer(node.change_members(c).await),
        Err(e) => e.into_response(),
    }
}

async fn watch(State(node): State<StoreNode>, body: Bytes) -> Response {
    let call: WatchCall = match decode(&body) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    let progress = (call.progress_ms > 0).then(|| Duration::from_millis(call.progress_ms));
    let stream = node.watch(call.range, call.start, progress).map(|item| {
        let wire: Result<WatchEvent, WireError> = item.map_err(WireError::from);
        let body = postcard::to_allocvec(&wire).map_err(std::io::Error::other)?;
        let mut frame = Vec::with_capacity(4 + body.len());
        frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
        frame.extend_from_slice(&body);
        Ok::<_, std::io::Error>(Bytes::from(frame))
    });
    (
        [("content-type", "application/octet-stream")],
        Body::from_stream(stream),
    )
        .into_response()
}

/// A client of one member's client listener.
#[derive(Clone, Debug)]
pub struct StoreClient {
    http: reqwest::Client,
    base: String,
}

impl StoreClient {
    /// A client for the member listening at `addr`.
    pub fn new(addr: SocketAddr) -> StoreClient {
        let _ = rustls::crypto::ring::default_provider().install_default();
        StoreClient {
            http: reqwest::Client::builder()
                .tcp_nodelay(true)
                .build()
                .expect("a plain HTTP client builds"),
            base: format!("http://{addr}"),
        }
    }

    /// POSTs a postcard request.
    async fn call<Req: Serialize, Resp: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, StoreError> {
        let body = postcard::to_allocvec(req).map_err(|e| StoreError::Invalid(e.to_string()))?;
        let request = self.http.post(format!("{}/{path}", self.base)).body(body);
        self.send(path, request, timeout).await
    }

    /// GETs a resource.
    async fn get<Resp: serde::de::DeserializeOwned>(&self, path: &str) -> Result<Resp, StoreError> {
        let request = self.http.get(format!("{}/{path}", self.base));
        self.send(path, request, Duration::from_secs(5)).await
    }

    /// Sends a request and decodes the postcard `Result` it answers with.
    async fn send<Resp: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        request: reqwest::RequestBuilder,
        timeout: Duration,
    ) -> Result<Resp, StoreError> {
        let resp = request
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| StoreError::Unavailable(format!("{path}: {e}")))?;
        if !resp.status().is_success() {
            let status = resp.status();
            return Err(StoreError::Invalid(format!(
                "{path}: {status}: {}",
                resp.text().await.unwrap_or_default()
            )));
        }
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| StoreError::Unavailable(format!("{path}: {e}")))?;
        let wire: Result<Resp, WireError> =
            postcard::from_bytes(&bytes).map_err(|e| StoreError::Invalid(e.to_string()))?;
        wire.map_err(StoreError::from)
    }

    /// A transaction. `Unavailable` means the outcome is unknown.
    pub async fn txn(&self, txn: &Txn) -> Result<TxnResponse, StoreError> {
        self.call("v1/txn", txn, Duration::from_secs(15)).await
    }

    /// A linearizable range read.
    pub async fn range(&self, range: RangeRequest) -> Result<RangeResponse, StoreError> {
        let call = RangeCall {
            range,
            linearizable: true,
        };
        self.call("v1/range", &call, Duration::from_secs(15)).await
    }

    /// The membership as this member knows it.
    pub async fn members(&self) -> Result<Vec<crate::Member>, StoreError> {
        self.get("v1/members").await
    }

    /// Changes the membership (any member forwards to the leader).
    pub async fn change_members(
        &self,
        change: &crate::MemberChange,
    ) -> Result<Vec<crate::Member>, StoreError> {
        self.call("v1/members", change, Duration::from_secs(120))
            .await
    }

    /// The member's status.
    pub async fn status(&self) -> Result<Status, StoreError> {
        self.get("v1/status").await
    }

    /// Watches from `start`; the stream ends when the connection does.
    pub async fn watch(
        &self,
        range: RangeRequest,
        start: Revision,
    ) -> Result<futures::stream::BoxStream<'static, Result<WatchEvent, StoreError>>, StoreError>
    {
        let call = WatchCall {
            range,
            start,
            progress_ms: 0,
        };
        let body = postcard::to_allocvec(&call).map_err(|e| StoreError::Invalid(e.to_string()))?;
        let resp = self
            .http
            .post(format!("{}/v1/watch", self.base))
            .body(body)
            .send()
            .await
            .map_err(|e| StoreError::Unavailable(format!("watch: {e}")))?;
        Ok(frames(Box::pin(resp.bytes_stream())).boxed())
    }
}

type Chunks = std::pin::Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

/// Decodes the watch stream's length-prefixed frames.
fn frames(chunks: Chunks) -> impl Stream<Item = Result<WatchEvent, StoreError>> + Send {
    futures::stream::unfold(
        (chunks, Vec::<u8>::new(), false),
        |(mut chunks, mut buf, done)| async move {
            if done {
                return None;
            }
            loop {
                if buf.len() >= 4 {
                    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
                    if buf.len() >= 4 + len {
                        let frame: Vec<u8> = buf.drain(..4 + len).skip(4).collect();
                        let item = postcard::from_bytes::<Result<WatchEvent, WireError>>(&frame)
                            .map_err(|e| StoreError::Invalid(e.to_string()))
                            .and_then(|r| r.map_err(StoreError::from));
                        return Some((item, (chunks, buf, false)));
                    }
                }
                match chunks.next().await {
                    Some(Ok(b)) => buf.extend_from_slice(&b),
                    _ => {
                        let end = Err(StoreError::Unavailable("watch stream ended".into()));
                        return Some((end, (chunks, buf, true)));
                    }
                }
            }
        },
    )
}
