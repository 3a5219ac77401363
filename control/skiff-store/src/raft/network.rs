//! Peer transport: Raft RPCs as HTTP POSTs with postcard bodies, on the peer listener (separate
//! from the client API). Connection failures, timeouts and 503 answers map to `Unreachable`, so
//! openraft backs off instead of hammering a dead or refusing peer.

use openraft::{
    BasicNode, RaftNetwork, RaftNetworkFactory,
    error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable},
    network::RPCOption,
    raft::{
        AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest,
        InstallSnapshotResponse, VoteRequest, VoteResponse,
    },
};
use serde::{Serialize, de::DeserializeOwned};

use super::{NodeId, TypeConfig};

/// The HTTP client of the peer listeners: plain HTTP, or HTTPS with this member's
/// certificate (mutual TLS, `crate::tls`). Clones share one connection pool.
#[derive(Clone, Debug)]
pub struct PeerHttp {
    client: reqwest::Client,
    scheme: &'static str,
}

impl PeerHttp {
    /// A client for peers over plain HTTP, or over TLS with `tls` (a client configuration
    /// presenting this member's certificate and trusting the members' CA).
    pub fn new(tls: Option<rustls::ClientConfig>) -> Result<PeerHttp, reqwest::Error> {
        let builder = reqwest::Client::builder()
            .pool_max_idle_per_host(64)
            .tcp_nodelay(true);
        Ok(match tls {
            Some(cfg) => PeerHttp {
                client: builder
                    .use_preconfigured_tls(cfg)
                    .https_only(true)
                    .build()?,
                scheme: "https",
            },
            None => PeerHttp {
                client: builder.build()?,
                scheme: "http",
            },
        })
    }
}

/// Creates a client per peer; clones share one HTTP connection pool.
#[derive(Clone, Debug)]
pub struct Network {
    http: PeerHttp,
}

impl Network {
    /// A network using `http` for every peer.
    pub fn new(http: PeerHttp) -> Network {
        Network { http }
    }
}

/// The connection to one peer.
#[derive(Debug)]
pub struct PeerClient {
    target: NodeId,
    addr: String,
    http: PeerHttp,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerClient {
        PeerClient {
            target,
            addr: node.addr.clone(),
            http: self.http.clone(),
        }
    }
}

/// Sends `req` to `<scheme>://<addr>/<path>` and decodes a postcard `Result<Resp, Err>`. A 503
/// answer is `Unreachable`, like a refused connection: on the peer listener it means the peer
/// did not act on the request (only the snapshot handler answers it, for a transfer it refused
/// before installing anything), which is what the forwarder's retry of unreachable writes
/// relies on.
pub(crate) async fn post<Req, Resp, E>(
    http: &PeerHttp,
    addr: &str,
    path: &str,
    req: &Req,
    timeout: Option<std::time::Duration>,
) -> Result<Result<Resp, E>, RPCError<NodeId, BasicNode, RaftError<NodeId>>>
where
    Req: Serialize,
    Resp: DeserializeOwned,
    E: DeserializeOwned,
{
    let body = postcard::to_allocvec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
    let mut builder = http
        .client
        .post(format!("{}://{addr}/{path}", http.scheme))
        .header("content-type", "application/octet-stream")
        .body(body);
    if let Some(t) = timeout {
        builder = builder.timeout(t);
    }
    let resp = builder.send().await.map_err(|e| {
        if e.is_connect() || e.is_timeout() {
            RPCError::Unreachable(Unreachable::new(&e))
        } else {
            RPCError::Network(NetworkError::new(&e))
        }
    })?;
    if resp.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE {
        // The peer cannot take this now (a snapshot it refused): back off, as from a peer
        // that is down.
        let text = resp.text().await.unwrap_or_default();
        return Err(RPCError::Unreachable(Unreachable::new(
            &std::io::Error::other(format!("peer {addr} is unavailable: {text}")),
        )));
    }
    if !resp.status().is_success() {
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        return Err(RPCError::Network(NetworkError::new(
            &std::io::Error::other(format!("peer {addr} answered {status}: {text}")),
        )));
    }
    let bytes = resp
        .bytes()
        .await
        .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
    postcard::from_bytes(&bytes).map_err(|e| RPCError::Network(NetworkError::new(&e)))
}

impl PeerClient {
    async fn call<Req, Resp, E>(
        &self,
        path: &str,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: DeserializeOwned + std::error::Error,
    {
        let result: Result<Resp, RaftError<NodeId, E>> =
            post(&self.http, &self.addr, path, req, Some(option.hard_ttl()))
                .await
                .map_err(|e| match e {
                    RPCError::Unreachable(u) => RPCError::Unreachable(u),
                    RPCError::Network(n) => RPCError::Network(n),
                    other => RPCError::Network(NetworkError::new(&std::io::Error::other(
                        other.to_string(),
                    ))),
                })?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call("raft/append", &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call("raft/snapshot", &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call("raft/vote", &rpc, &option).await
    }
}
