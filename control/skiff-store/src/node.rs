//! A running store member: Raft over the peer listener, the state machine, and the client
//! operations the API server uses (writes, linearizable reads, watches).
//!
//! Writes go through Raft, batched: openraft 0.9 appends one entry per proposal and waits for
//! its fsync inside the Raft core, so the leader's batcher takes every proposal that queued
//! while the previous entry was in flight and proposes them as one [`Command::Batch`] entry:
//! one append and one fsync per member for many client writes (group commit).
//!
//! A member that is not the leader forwards the write to the leader over the peer listener, in
//! one request with the other writes queued meanwhile. It retries only when the write provably
//! was not proposed (the peer refused it as not-leader, or the connection was never made); after
//! an ambiguous failure (timeout after sending) it reports [`StoreError::Unavailable`] instead of
//! risking a second application, as etcd does.
//!
//! Linearizable reads use Raft's read index: the leader confirms its leadership with a quorum
//! and names the log index the read must see; the member waits until it has applied that far,
//! then reads locally. Watches are served from the local state.

use std::{
    collections::{BTreeMap, VecDeque},
    io::Seek,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::Bytes,
    extract::{DefaultBodyLimit, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::post,
};
use openraft::{
    BasicNode, LogId, Raft, Snapshot,
    error::{
        CheckIsLeaderError, ClientWriteError, InitializeError, InstallSnapshotError, RPCError,
        RaftError,
    },
    network::snapshot_transport::{Chunked, SnapshotTransport, Streaming},
    raft::{InstallSnapshotRequest, InstallSnapshotResponse},
};
use serde::{Deserialize, Serialize};

use crate::{
    Command, CommandResponse, Mvcc, RangeRequest, RangeResponse, Revision, StoreError, Txn,
    TxnResponse, WatchStream,
    raft::{
        Applied, LogStore, NodeId, StateMachine, TypeConfig,
        network::{Network, PeerHttp, post as peer_post},
    },
};

/// How long a client operation waits for a leader before giving up.
const LEADER_WAIT: Duration = Duration::from_secs(10);
/// Largest peer request (a batch of log entries or a snapshot chunk).
const PEER_BODY_LIMIT: usize = 64 << 20;
/// Most commands in one replicated entry.
const MAX_BATCH: usize = 1024;
/// Most bytes (approximately) in one replicated entry; a single larger command goes alone.
const MAX_BATCH_BYTES: usize = 4 << 20;
/// Proposals waiting for the batcher before callers wait to queue.
const PROPOSAL_QUEUE: usize = 4096;
/// Batches of forwarded writes a member keeps in flight to the leader at once.
const FORWARDS_IN_FLIGHT: usize = 4;

/// How to run a member.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// This member's id (unique in the cluster, never reused).
    pub id: NodeId,
    /// Where `state.redb` and `raft-log.redb` live.
    pub data_dir: PathBuf,
    /// Address the peer listener binds (port 0 picks one).
    pub peer_listen: SocketAddr,
    /// Address other members use to reach this one; `None` uses the bound address.
    pub advertise: Option<String>,
    /// Initial voters, id → peer address, used only when the cluster is created. Empty means a
    /// single-member cluster of this node. A member started to join an existing cluster is
    /// started with `join = true` and added by the leader instead.
    pub members: BTreeMap<NodeId, String>,
    /// Start without initializing: wait to be added to an existing cluster.
    pub join: bool,
    /// History kept before compaction (etcd's apiserver compacts every 5 minutes).
    pub history: Duration,
    /// How often the leader considers compacting.
    pub compact_every: Duration,
    /// Log entries applied since the last snapshot before a new one is built (and the log
    /// before it purged, keeping 1000 entries for followers that lag a little).
    pub snapshot_every: u64,
    /// Mutual TLS between members; `None`: plain HTTP (loopback, or a network only members
    /// reach).
    pub peer_tls: Option<crate::tls::PeerTls>,
}

impl NodeConfig {
    /// A single-member store in `data_dir` with defaults, its peer listener on a free loopback
    /// port.
    pub fn single(data_dir: impl Into<PathBuf>) -> NodeConfig {
        NodeConfig {
            id: 1,
            data_dir: data_dir.into(),
            peer_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            advertise: None,
            members: BTreeMap::new(),
            join: false,
            history: Duration::from_secs(300),
            compact_every: Duration::from_secs(30),
            snapshot_every: 20_000,
            peer_tls: None,
        }
    }
}

/// A change to the set of members (see docs/store.md for the procedure).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberChange {
    /// Add member `id`, reachable at peer address `addr`, as a learner: it receives the log but
    /// does not vote. Returns once it has caught up.
    AddLearner {
        /// New member id (never reuse one).
        id: NodeId,
        /// Its peer address.
        addr: String,
    },
    /// Make learners voters.
    Promote {
        /// Learners to promote.
        ids: Vec<NodeId>,
    },
    /// Remove members (voters or learners).
    Remove {
        /// Members to remove.
        ids: Vec<NodeId>,
    },
}

/// One member as the membership configuration lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Member id.
    pub id: NodeId,
    /// Peer address.
    pub addr: String,
    /// Votes (false: learner).
    pub voter: bool,
}

/// The members of the latest membership configuration `raft` knows.
fn members_of(raft: &Raft<TypeConfig>) -> Vec<Member> {
    let m = raft.metrics().borrow().membership_config.clone();
    let voters: std::collections::BTreeSet<NodeId> = m.membership().voter_ids().collect();
    m.membership()
        .nodes()
        .map(|(id, node)| Member {
            id: *id,
            addr: node.addr.clone(),
            voter: voters.contains(id),
        })
        .collect()
}

/// Runs a membership change on this member's Raft (which must be the leader).
async fn change_on_leader(
    raft: &Raft<TypeConfig>,
    change: &MemberChange,
) -> Result<(), RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>> {
    use openraft::ChangeMembers;
    match change {
        MemberChange::AddLearner { id, addr } => {
            raft.add_learner(*id, BasicNode::new(addr.clone()), true)
                .await?;
        }
        MemberChange::Promote { ids } => {
            let ids = ids.iter().copied().collect();
            raft.change_membership(ChangeMembers::AddVoterIds(ids), false)
                .await?;
        }
        MemberChange::Remove { ids } => {
            let membership = raft.metrics().borrow().membership_config.clone();
            let voters: std::collections::BTreeSet<NodeId> =
                membership.membership().voter_ids().collect();
            let (v, l): (Vec<NodeId>, Vec<NodeId>) = ids.iter().partition(|i| voters.contains(i));
            if !v.is_empty() {
                // retain = false: removed voters are dropped from the configuration entirely.
                raft.change_membership(ChangeMembers::RemoveVoters(v.into_iter().collect()), false)
                    .await?;
            }
            if !l.is_empty() {
                raft.change_membership(ChangeMembers::RemoveNodes(l.into_iter().collect()), false)
                    .await?;
            }
        }
    }
    Ok(())
}

/// Why a peer refused a forwarded request.
#[derive(Clone, Debug, Serialize, Deserialize)]
enum Refusal {
    /// It is not the leader (the request was not proposed).
    NotLeader,
    /// It tried and failed.
    Failed(String),
}

/// Deadline and exponential back-off for operations that wait for a leader or a quorum.
struct Retry {
    deadline: Instant,
    backoff: Duration,
}

impl Retry {
    fn new() -> Retry {
        Retry {
            deadline: Instant::now() + LEADER_WAIT,
            backoff: Duration::from_millis(20),
        }
    }

    /// Sleeps before the next attempt, or fails with `Unavailable` once the deadline passed.
    async fn pause(&mut self, failing: &str) -> Result<(), StoreError> {
        if Instant::now() > self.deadline {
            return Err(StoreError::Unavailable(format!(
                "{failing} within {LEADER_WAIT:?}"
            )));
        }
        tokio::time::sleep(self.backoff).await;
        self.backoff = (self.backoff * 2).min(Duration::from_millis(500));
        Ok(())
    }
}

/// Why the batcher could not get a proposal applied.
enum ProposeError {
    /// This member is not the leader; the proposal was not replicated.
    NotLeader(Option<BasicNode>),
    /// Raft failed (fatal, or an error other than leadership).
    Failed(String),
}

struct Proposal {
    cmd: Command,
    done: tokio::sync::oneshot::Sender<Result<Applied, ProposeError>>,
}

type Proposals = tokio::sync::mpsc::Sender<Proposal>;

/// Submits a proposal to the batcher and waits for its result.
async fn propose(proposals: &Proposals, cmd: Command) -> Result<Applied, ProposeError> {
    let (done, rx) = tokio::sync::oneshot::channel();
    proposals
        .send(Proposal { cmd, done })
        .await
        .map_err(|_| ProposeError::Failed("store is shutting down".into()))?;
    rx.await
        .unwrap_or_else(|_| Err(ProposeError::Failed("store is shutting down".into())))
}

/// `first` and whatever else is queued in `rx`, up to [`MAX_BATCH`] commands and
/// [`MAX_BATCH_BYTES`] (a single larger command goes alone).
fn drain<T>(
    first: T,
    rx: &mut tokio::sync::mpsc::Receiver<T>,
    cmd: impl Fn(&T) -> &Command,
) -> Vec<T> {
    let mut bytes = cmd(&first).approx_size();
    let mut batch = vec![first];
    while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
        let Ok(next) = rx.try_recv() else { break };
        bytes += cmd(&next).approx_size();
        batch.push(next);
    }
    batch
}

/// Proposes queued commands, as many as fit in one entry, one entry at a time.
async fn batcher(raft: Raft<TypeConfig>, mut rx: tokio::sync::mpsc::Receiver<Proposal>) {
    while let Some(first) = rx.recv().await {
        let batch = drain(first, &mut rx, |p| &p.cmd);
        let (cmds, dones): (Vec<Command>, Vec<_>) =
            batch.into_iter().map(|p| (p.cmd, p.done)).unzip();
        let single = cmds.len() == 1;
        let cmd = if single {
            cmds.into_iter().next().expect("one command")
        } else {
            Command::Batch(cmds)
        };
        match raft.client_write(cmd).await {
            Ok(resp) => match (single, resp.data) {
                (false, Applied::Batch(results)) if results.len() == dones.len() => {
                    for (done, r) in dones.into_iter().zip(results) {
                        let _ = done.send(Ok(r));
                    }
                }
                (true, applied) => {
                    for done in dones {
                        let _ = done.send(Ok(applied.clone()));
                    }
                }
                (_, other) => {
                    for done in dones {
                        let _ = done.send(Err(ProposeError::Failed(format!(
                            "unexpected batch result {other:?}"
                        ))));
                    }
                }
            },
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                for done in dones {
                    let _ = done.send(Err(ProposeError::NotLeader(f.leader_node.clone())));
                }
            }
            Err(e) => {
                for done in dones {
                    let _ = done.send(Err(ProposeError::Failed(e.to_string())));
                }
            }
        }
    }
}

/// What became of a write forwarded to the leader.
enum Forwarded {
    /// The leader answered.
    Answered(Result<Applied, Refusal>),
    /// The leader was never reached: the write was not proposed.
    Unreachable,
    /// The request failed after the leader may have received it.
    Ambiguous(String),
}

/// A write on its way to the leader.
struct Forward {
    leader: String,
    cmd: Command,
    done: tokio::sync::oneshot::Sender<Forwarded>,
}

/// Forwards a member's writes to the leader in batches: one peer request carries every write
/// that queued while the previous requests were on their way (at most [`FORWARDS_IN_FLIGHT`]
/// at once), as etcd's followers send proposals in batches instead of one request each.
async fn forwarder(http: PeerHttp, mut rx: tokio::sync::mpsc::Receiver<Forward>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(FORWARDS_IN_FLIGHT));
    while let Some(first) = rx.recv().await {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let batch = drain(first, &mut rx, |f| &f.cmd);
        // Leadership may have moved while writes queued: one request per leader named.
        let mut by_leader: BTreeMap<String, Vec<Forward>> = BTreeMap::new();
        for f in batch {
            by_leader.entry(f.leader.clone()).or_default().push(f);
        }
        let http = http.clone();
        tokio::spawn(async move {
            futures::future::join_all(
                by_leader
                    .into_iter()
                    .map(|(leader, writes)| forward_batch(&http, leader, writes)),
            )
            .await;
            drop(slot);
        });
    }
}

/// Sends one batch of writes to `leader` and gives each its outcome.
async fn forward_batch(http: &PeerHttp, leader: String, writes: Vec<Forward>) {
    let (cmds, dones): (Vec<Command>, Vec<_>) = writes.into_iter().map(|f| (f.cmd, f.done)).unzip();
    let sent: Result<Vec<Result<Applied, Refusal>>, _> =
        peer_post::<_, _, Refusal>(http, &leader, "store/writes", &cmds, Some(LEADER_WAIT))
            .await
            .map(|answer| answer.unwrap_or_else(|r| cmds.iter().map(|_| Err(r.clone())).collect()));
    match sent {
        Ok(results) if results.len() == dones.len() => {
            for (done, r) in dones.into_iter().zip(results) {
                let _ = done.send(Forwarded::Answered(r));
            }
        }
        Ok(results) => {
            let m = format!(
                "leader {leader} answered {} results for {} writes",
                results.len(),
                dones.len()
            );
            for done in dones {
                let _ = done.send(Forwarded::Ambiguous(m.clone()));
            }
        }
        Err(RPCError::Unreachable(_)) => {
            for done in dones {
                let _ = done.send(Forwarded::Unreachable);
            }
        }
        Err(e) => {
            let m = e.to_string();
            for done in dones {
                let _ = done.send(Forwarded::Ambiguous(m.clone()));
            }
        }
    }
}

/// Readers waiting for the next read barrier.
#[derive(Default)]
struct Barriers {
    /// A barrier loop is running.
    running: bool,
    /// Callers to answer with the next barrier that starts.
    waiting: Vec<tokio::sync::oneshot::Sender<Result<(), String>>>,
}

/// A running member. Cheap to clone.
#[derive(Clone, Debug)]
pub struct StoreNode {
    inner: Arc<Inner>,
}

struct Inner {
    id: NodeId,
    raft: Raft<TypeConfig>,
    mvcc: Mvcc,
    http: PeerHttp,
    peer_addr: SocketAddr,
    proposals: Proposals,
    forwards: tokio::sync::mpsc::Sender<Forward>,
    barriers: Mutex<Barriers>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Dead once nothing holds the Raft log file open.
    log_file: std::sync::Weak<redb::Database>,
}

impl StoreNode {
    /// Opens the files, starts Raft and the peer listener, and creates the cluster if this is
    /// its first start (all initial voters may do so: they propose the same membership).
    pub async fn start(cfg: NodeConfig) -> Result<StoreNode, StoreError> {
        let mvcc = Mvcc::open(&cfg.data_dir.join("state.redb"))?;
        let log = LogStore::open(&cfg.data_dir.join("raft-log.redb"))?;
        let sm = StateMachine::open(mvcc.clone(), &cfg.data_dir.join("snapshots"))?;
        log.purge_after(sm.durably_applied());
        let log_file = log.liveness();
        let listener = tokio::net::TcpListener::bind(cfg.peer_listen)
            .await
            .map_err(|e| StoreError::Io {
                op: "bind peer listener",
                path: PathBuf::from(cfg.peer_listen.to_string()),
                source: e,
            })?;
        let peer_addr = listener.local_addr().map_err(|e| StoreError::Io {
            op: "peer listener address",
            path: PathBuf::from(cfg.peer_listen.to_string()),
            source: e,
        })?;
        let advertise = cfg
            .advertise
            .clone()
            .unwrap_or_else(|| peer_addr.to_string());
        let raft_config = openraft::Config {
            cluster_name: "skiff".into(),
            heartbeat_interval: 100,
            election_timeout_min: 400,
            election_timeout_max: 800,
            // Per snapshot chunk; the last one waits for the check and the install.
            install_snapshot_timeout: 30_000,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(cfg.snapshot_every),
            max_in_snapshot_log_to_keep: cfg.snapshot_every.min(1000),
            max_payload_entries: 1000,
            ..openraft::Config::default()
        }
        .validate()
        .map_err(|e| StoreError::Invalid(format!("raft config: {e}")))?;
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = PeerHttp::new(cfg.peer_tls.as_ref().map(|t| t.client.clone()))
            .map_err(|e| StoreError::Invalid(format!("http client: {e}")))?;
        let raft = Raft::new(
            cfg.id,
            Arc::new(raft_config),
            Network::new(http.clone()),
            log,
            sm,
        )
        .await
        .map_err(|e| StoreError::Unavailable(format!("starting raft: {e}")))?;

        let (proposals, queue) = tokio::sync::mpsc::channel(PROPOSAL_QUEUE);
        let router = peer_router(PeerState {
            raft: raft.clone(),
            proposals: proposals.clone(),
            receiving: Arc::new(tokio::sync::Mutex::new(None)),
            refused: Arc::new(Mutex::new(None)),
        });
        let server = match &cfg.peer_tls {
            None => tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, router).await {
                    tracing::error!(error = %e, "peer listener stopped");
                }
            }),
            Some(tls) => tokio::spawn(crate::tls::serve(
                listener,
                tokio_rustls::TlsAcceptor::from(tls.server.clone()),
                router,
                "peer",
            )),
        };
        let (forwards, forward_queue) = tokio::sync::mpsc::channel(PROPOSAL_QUEUE);
        let mut tasks = vec![
            server,
            tokio::spawn(batcher(raft.clone(), queue)),
            tokio::spawn(forwarder(http.clone(), forward_queue)),
        ];

        if !cfg.join {
            let members: BTreeMap<NodeId, BasicNode> = if cfg.members.is_empty() {
                BTreeMap::from([(cfg.id, BasicNode::new(advertise.clone()))])
            } else {
                cfg.members
                    .iter()
                    .map(|(id, addr)| (*id, BasicNode::new(addr.clone())))
                    .collect()
            };
            match raft.initialize(members).await {
                Ok(()) => tracing::info!(id = cfg.id, "created the cluster"),
                Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {
                    tracing::debug!(id = cfg.id, "cluster already exists");
                }
                Err(e) => return Err(StoreError::Unavailable(format!("initializing: {e}"))),
            }
        }

        let node = StoreNode {
            inner: Arc::new(Inner {
                id: cfg.id,
                raft,
                mvcc,
                http,
                peer_addr,
                proposals,
                forwards,
                barriers: Mutex::new(Barriers::default()),
                tasks: Mutex::new(Vec::new()),
                log_file,
            }),
        };
        tasks.push(tokio::spawn(compactor(
            node.clone(),
            cfg.history,
            cfg.compact_every,
        )));
        *node.inner.tasks.lock().unwrap_or_else(|p| p.into_inner()) = tasks;
        tracing::info!(id = cfg.id, peer = %advertise, data = %cfg.data_dir.display(), "store member started");
        Ok(node)
    }

    /// This member's id.
    pub fn id(&self) -> NodeId {
        self.inner.id
    }

    /// The address the peer listener is bound to.
    pub fn peer_addr(&self) -> SocketAddr {
        self.inner.peer_addr
    }

    /// The Raft handle (membership changes, metrics).
    pub fn raft(&self) -> &Raft<TypeConfig> {
        &self.inner.raft
    }

    /// The local state (serializable reads, watches).
    pub fn mvcc(&self) -> &Mvcc {
        &self.inner.mvcc
    }

    /// The current leader, as this member knows it.
    pub async fn leader(&self) -> Option<NodeId> {
        self.inner.raft.current_leader().await
    }

    /// Replicates a command and returns its result once applied here or on the leader.
    pub async fn write(&self, cmd: Command) -> Result<CommandResponse, StoreError> {
        if let Command::Txn(t) = &cmd {
            crate::mvcc::validate_txn(t)?;
        }
        let mut retry = Retry::new();
        loop {
            // A member that knows another leads forwards at once (the leader refuses if that
            // is stale); otherwise its own Raft decides.
            let proposed = match self.other_leader() {
                Some(leader) => Err(ProposeError::NotLeader(Some(leader))),
                None => propose(&self.inner.proposals, cmd.clone()).await,
            };
            match proposed {
                Ok(a) => return applied(a),
                Err(ProposeError::NotLeader(leader)) => {
                    if let Some(leader) = leader {
                        match self.forward(leader.addr.clone(), cmd.clone()).await {
                            Forwarded::Answered(Ok(a)) => return applied(a),
                            // Leadership moved, or the leader was never reached: retry.
                            Forwarded::Answered(Err(Refusal::NotLeader))
                            | Forwarded::Unreachable => {}
                            Forwarded::Answered(Err(Refusal::Failed(m))) => {
                                return Err(StoreError::Unavailable(m));
                            }
                            Forwarded::Ambiguous(e) => {
                                return Err(StoreError::Unavailable(format!(
                                    "forwarding to leader {}: {e}; the write may or may not \
                                     have been applied",
                                    leader.addr
                                )));
                            }
                        }
                    }
                }
                Err(ProposeError::Failed(m)) => return Err(StoreError::Unavailable(m)),
            }
            retry.pause("no leader reachable").await?;
        }
    }

    /// The leader, when this member knows another member leads.
    fn other_leader(&self) -> Option<BasicNode> {
        let metrics = self.inner.raft.metrics();
        let m = metrics.borrow();
        let leader = m.current_leader.filter(|l| *l != self.inner.id)?;
        m.membership_config.membership().get_node(&leader).cloned()
    }

    /// Hands a write to the forwarder and waits for the leader's answer.
    async fn forward(&self, leader: String, cmd: Command) -> Forwarded {
        let (done, rx) = tokio::sync::oneshot::channel();
        if self
            .inner
            .forwards
            .send(Forward { leader, cmd, done })
            .await
            .is_err()
        {
            return Forwarded::Answered(Err(Refusal::Failed("store is shutting down".into())));
        }
        // The forwarder only drops a write unanswered when the store stops mid-request.
        rx.await
            .unwrap_or_else(|_| Forwarded::Ambiguous("store is shutting down".into()))
    }

    /// The members in the latest membership configuration this member knows.
    pub fn members(&self) -> Vec<Member> {
        members_of(&self.inner.raft)
    }

    /// Changes the membership (forwarded to the leader) and returns the new member list.
    pub async fn change_members(&self, change: MemberChange) -> Result<Vec<Member>, StoreError> {
        let mut retry = Retry::new();
        loop {
            match change_on_leader(&self.inner.raft, &change).await {
                Ok(()) => return Ok(self.members()),
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                    if let Some(leader) = f.leader_node {
                        let sent: Result<Result<Vec<Member>, Refusal>, _> = peer_post(
                            &self.inner.http,
                            &leader.addr,
                            "store/members",
                            &change,
                            Some(LEADER_WAIT * 6),
                        )
                        .await;
                        match sent {
                            Ok(Ok(members)) => return Ok(members),
                            Ok(Err(Refusal::NotLeader)) | Err(RPCError::Unreachable(_)) => {}
                            Ok(Err(Refusal::Failed(m))) => return Err(StoreError::Invalid(m)),
                            Err(e) => return Err(StoreError::Unavailable(e.to_string())),
                        }
                    }
                }
                Err(RaftError::APIError(e)) => return Err(StoreError::Invalid(e.to_string())),
                Err(RaftError::Fatal(e)) => return Err(StoreError::Unavailable(e.to_string())),
            }
            retry.pause("no leader reachable").await?;
        }
    }

    /// A transaction through [`StoreNode::write`].
    pub async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        match self.write(Command::Txn(txn)).await? {
            CommandResponse::Txn(r) => Ok(r),
            other => Err(StoreError::Invalid(format!(
                "unexpected response {other:?}"
            ))),
        }
    }

    /// Compacts the whole cluster at `revision`.
    pub async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        self.write(Command::Compact { revision }).await.map(|_| ())
    }

    /// A linearizable read: it sees every write acknowledged before it started, on any member.
    pub async fn range(&self, req: RangeRequest) -> Result<RangeResponse, StoreError> {
        self.read_barrier().await?;
        self.range_local(req).await
    }

    /// A read of this member's local state (may lag the leader slightly).
    pub async fn range_local(&self, req: RangeRequest) -> Result<RangeResponse, StoreError> {
        let mvcc = self.inner.mvcc.clone();
        tokio::task::spawn_blocking(move || mvcc.range(&req))
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
    }

    /// Watches the local state (see [`Mvcc::watch`]).
    pub fn watch(
        &self,
        range: RangeRequest,
        start: Revision,
        progress: Option<Duration>,
    ) -> WatchStream {
        self.inner.mvcc.watch(range, start, progress)
    }

    /// Waits until this member has applied everything committed before the call.
    ///
    /// Concurrent callers share barriers: each caller queues, and is answered by the next
    /// barrier that *starts after* it queued (never by one already in flight, which could have
    /// missed a write acknowledged just before the caller arrived). One read-index round trip
    /// then serves every read that queued meanwhile.
    pub async fn read_barrier(&self) -> Result<(), StoreError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let start = {
            let mut q = self
                .inner
                .barriers
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            q.waiting.push(tx);
            !std::mem::replace(&mut q.running, true)
        };
        if start {
            let node = self.clone();
            tokio::spawn(async move {
                loop {
                    let waiting = {
                        let mut q = node
                            .inner
                            .barriers
                            .lock()
                            .unwrap_or_else(|p| p.into_inner());
                        if q.waiting.is_empty() {
                            q.running = false;
                            return;
                        }
                        std::mem::take(&mut q.waiting)
                    };
                    let result = node.read_barrier_once().await.map_err(|e| e.to_string());
                    for w in waiting {
                        let _ = w.send(result.clone());
                    }
                }
            });
        }
        rx.await
            .map_err(|_| StoreError::Unavailable("store is shutting down".into()))?
            .map_err(StoreError::Unavailable)
    }

    /// One read-index barrier.
    async fn read_barrier_once(&self) -> Result<(), StoreError> {
        let mut retry = Retry::new();
        loop {
            match self.inner.raft.ensure_linearizable().await {
                Ok(_) => return Ok(()),
                Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
                    if let Some(leader) = f.leader_node {
                        let asked: Result<Result<Option<LogId<NodeId>>, Refusal>, _> = peer_post(
                            &self.inner.http,
                            &leader.addr,
                            "store/read-index",
                            &(),
                            Some(LEADER_WAIT),
                        )
                        .await;
                        if let Ok(Ok(read_log_id)) = asked {
                            if let Some(id) = read_log_id {
                                self.inner
                                    .raft
                                    .wait(Some(LEADER_WAIT))
                                    .applied_index_at_least(Some(id.index), "read index")
                                    .await
                                    .map_err(|e| StoreError::Unavailable(e.to_string()))?;
                            }
                            return Ok(());
                        }
                    }
                }
                Err(RaftError::APIError(e)) => {
                    tracing::debug!(error = %e, "read barrier: retrying");
                }
                Err(RaftError::Fatal(e)) => return Err(StoreError::Unavailable(e.to_string())),
            }
            retry.pause("no quorum confirmed a read").await?;
        }
    }

    /// Stops Raft, the peer listener, the batcher and the compactor, and returns once the
    /// Raft log file is closed and no task holds the state file (it closes when the last
    /// [`StoreNode`] handle is dropped). Every acknowledged write is in the durable log.
    pub async fn shutdown(&self) {
        let tasks =
            std::mem::take(&mut *self.inner.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for t in &tasks {
            t.abort();
        }
        // Wait until the aborted tasks are gone, so the handles they held are dropped.
        for t in tasks {
            let _ = t.await;
        }
        if let Err(e) = self.inner.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
        // openraft's workers (and their blocking reads) drop the storage after shutdown()
        // returns; wait for them.
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.inner.log_file.strong_count() > 0 || self.inner.mvcc.handles() > 1 {
            if Instant::now() > deadline {
                tracing::warn!("raft storage still referenced 10 s after shutdown");
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreNode")
            .field("id", &self.id)
            .field("peer_addr", &self.peer_addr)
            .finish_non_exhaustive()
    }
}

fn applied(a: Applied) -> Result<CommandResponse, StoreError> {
    match a {
        Applied::Done(r) => Ok(r),
        Applied::Rejected(m) => Err(StoreError::Invalid(m)),
        Applied::Internal | Applied::Batch(_) => {
            Err(StoreError::Invalid("not a client command result".into()))
        }
    }
}

/// The leader compacts to the newest revision that is at least `history` old, so reads and
/// watches always have that much history.
async fn compactor(node: StoreNode, history: Duration, every: Duration) {
    let mut samples: VecDeque<(Instant, Revision)> = VecDeque::new();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = Instant::now();
        samples.push_back((now, node.inner.mvcc.revision()));
        let Some(cutoff) = now.checked_sub(history) else {
            continue;
        };
        let mut target = None;
        while let Some(&(t, rev)) = samples.front() {
            if t > cutoff {
                break;
            }
            target = Some(rev);
            samples.pop_front();
        }
        let Some(target) = target else { continue };
        if node.leader().await != Some(node.id()) {
            continue;
        }
        let compacted = node.inner.mvcc.compacted().unwrap_or(0);
        if target > compacted {
            match node.compact(target).await {
                Ok(()) => tracing::info!(revision = target, "compacted"),
                Err(e) => tracing::warn!(error = %e, "compaction failed; will retry"),
            }
        }
    }
}

/// What the peer listener's handlers need.
#[derive(Clone)]
struct PeerState {
    raft: Raft<TypeConfig>,
    proposals: Proposals,
    /// The snapshot being received in chunks, if any.
    receiving: Arc<tokio::sync::Mutex<Option<Streaming<TypeConfig>>>>,
    /// The last snapshot that arrived damaged, and when.
    refused: Arc<Mutex<Option<(String, Instant)>>>,
}

fn peer_router(state: PeerState) -> Router {
    Router::new()
        .route("/raft/append", post(append))
        .route("/raft/vote", post(vote))
        .route("/raft/snapshot", post(snapshot))
        .route("/store/writes", post(forwarded_writes))
        .route("/store/read-index", post(read_index))
        .route("/store/members", post(forwarded_members))
        .layer(DefaultBodyLimit::max(PEER_BODY_LIMIT))
        .with_state(state)
}

fn decode<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, (StatusCode, String)> {
    postcard::from_bytes(body).map_err(|e| {
        (
            StatusCode::BAD_REQUEST,
            format!("malformed peer request: {e}"),
        )
    })
}

fn encode<T: Serialize>(v: &T) -> Response {
    match postcard::to_allocvec(v) {
        Ok(b) => ([("content-type", "application/octet-stream")], b).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "encoding peer response");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

async fn append(State(PeerState { raft, .. }): State<PeerState>, body: Bytes) -> Response {
    match decode(&body) {
        Ok(req) => encode(&raft.append_entries(req).await),
        Err(r) => r.into_response(),
    }
}

async fn vote(State(PeerState { raft, .. }): State<PeerState>, body: Bytes) -> Response {
    match decode(&body) {
        Ok(req) => encode(&raft.vote(req).await),
        Err(r) => r.into_response(),
    }
}

async fn snapshot(State(state): State<PeerState>, body: Bytes) -> Response {
    let req: InstallSnapshotRequest<TypeConfig> = match decode(&body) {
        Ok(req) => req,
        Err(r) => return r.into_response(),
    };
    match receive_snapshot(&state, req).await {
        Ok(answer) => encode(&answer),
        // The leader's transport takes 503 as unreachable: it retries each chunk a few times,
        // with backoff, then gives up this transfer and backs off before the next.
        Err(refused) => (StatusCode::SERVICE_UNAVAILABLE, refused.to_string()).into_response(),
    }
}

/// How long chunks of a snapshot that arrived damaged are refused at once (its sender is
/// given up on for that long; a new snapshot is taken as usual).
const REFUSE_DAMAGED_FOR: Duration = Duration::from_secs(60);

/// openraft's `Raft::install_snapshot` (a chunk at a time, installed when the last arrives)
/// with one step added: the finished stream is read through (layout, record count, checksum)
/// before the state machine gets it. A damaged transfer is refused (handed to the state
/// machine, its failure would stop this member), and so are that snapshot's chunks for
/// [`REFUSE_DAMAGED_FOR`], so a leader whose snapshot is damaged backs off instead of sending
/// it again and again. The check and the install run in their own task: a leader that gives up
/// waiting does not cancel an install under way.
async fn receive_snapshot(
    state: &PeerState,
    req: InstallSnapshotRequest<TypeConfig>,
) -> Result<
    Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>,
    StoreError,
> {
    let vote = req.vote;
    let mine = match state.raft.with_raft_state(|s| *s.vote_ref()).await {
        Ok(v) => v,
        Err(e) => return Ok(Err(e.into())),
    };
    // A stale leader's chunks are not even stored (votes of different leaders in one term are
    // incomparable: also stale).
    if !matches!(
        vote.partial_cmp(&mine),
        Some(std::cmp::Ordering::Greater | std::cmp::Ordering::Equal)
    ) {
        return Ok(Ok(InstallSnapshotResponse { vote: mine }));
    }
    let id = req.meta.snapshot_id.clone();
    if let Some((damaged, since)) = &*state.refused.lock().unwrap_or_else(|p| p.into_inner())
        && *damaged == id
        && since.elapsed() < REFUSE_DAMAGED_FOR
    {
        return Err(StoreError::Unavailable(format!(
            "snapshot {id} arrived damaged {}s ago; refused",
            since.elapsed().as_secs()
        )));
    }
    let finished = {
        let mut receiving = state.receiving.lock().await;
        match Chunked::receive_snapshot(&mut receiving, &state.raft, req).await {
            Ok(f) => f,
            Err(e) => return Ok(Err(e)),
        }
    };
    let Some(Snapshot { meta, snapshot }) = finished else {
        return Ok(Ok(InstallSnapshotResponse { vote: mine }));
    };
    let (raft, refused) = (state.raft.clone(), state.refused.clone());
    tokio::spawn(async move {
        let file = snapshot.into_std().await;
        let what = id.clone();
        let checked = tokio::task::spawn_blocking(move || -> Result<std::fs::File, StoreError> {
            let mut file = file;
            let rewind = |f: &mut std::fs::File| {
                f.seek(std::io::SeekFrom::Start(0)).map_err(|e| {
                    StoreError::Unavailable(format!("reading the received snapshot {what}: {e}"))
                })
            };
            rewind(&mut file)?;
            crate::snapshot::check(std::io::BufReader::new(&mut file), &what)?;
            rewind(&mut file)?;
            Ok(file)
        })
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        let file = match checked {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(snapshot = %id, error = %e, "refusing a damaged snapshot");
                *refused.lock().unwrap_or_else(|p| p.into_inner()) = Some((id, Instant::now()));
                return Err(e);
            }
        };
        let snapshot = Snapshot {
            meta,
            snapshot: Box::new(tokio::fs::File::from_std(file)),
        };
        Ok(raft
            .install_full_snapshot(vote, snapshot)
            .await
            .map(Into::into)
            .map_err(Into::into))
    })
    .await
    .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

/// Writes forwarded by another member, proposed together (in order, so they share entries)
/// and answered one result each.
async fn forwarded_writes(State(state): State<PeerState>, body: Bytes) -> Response {
    let cmds: Vec<Command> = match decode(&body) {
        Ok(c) => c,
        Err(r) => return r.into_response(),
    };
    let results: Vec<Result<Applied, Refusal>> =
        futures::future::join_all(cmds.into_iter().map(|cmd| {
            let proposals = state.proposals.clone();
            async move {
                match propose(&proposals, cmd).await {
                    Ok(a) => Ok(a),
                    Err(ProposeError::NotLeader(_)) => Err(Refusal::NotLeader),
                    Err(ProposeError::Failed(m)) => Err(Refusal::Failed(m)),
                }
            }
        }))
        .await;
    // Peer answers are all `Result<_, Refusal>`; a batch is refused only write by write.
    encode(&Ok::<_, Refusal>(results))
}

async fn read_index(State(PeerState { raft, .. }): State<PeerState>) -> Response {
    let result: Result<Option<LogId<NodeId>>, Refusal> = match raft.get_read_log_id().await {
        Ok((read_log_id, _)) => Ok(read_log_id),
        Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(_))) => Err(Refusal::NotLeader),
        Err(e) => Err(Refusal::Failed(e.to_string())),
    };
    encode(&result)
}

async fn forwarded_members(State(state): State<PeerState>, body: Bytes) -> Response {
    let change: MemberChange = match decode(&body) {
        Ok(c) => c,
        Err(r) => return r.into_response(),
    };
    let result: Result<Vec<Member>, Refusal> = match change_on_leader(&state.raft, &change).await {
        Ok(()) => Ok(members_of(&state.raft)),
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => Err(Refusal::NotLeader),
        Err(e) => Err(Refusal::Failed(e.to_string())),
    };
    encode(&result)
}
