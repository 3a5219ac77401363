//! The flow log (after Hubble): the agent is the one reader of the data path's `skiff_flows`
//! ring buffer. Each [`FlowEvent`] — a new connection of an isolated endpoint, allowed,
//! dropped or audited — is named with what the policy loop last published ([`Names`]: pods by
//! address, endpoints with their isolating policies, policies by number), counted per policy
//! for `/metrics`, kept in a bounded log of recent flows and sent to followers.
//!
//! `skiff-node flows` reads the log through the agent's local socket (`<run-dir>/flows.sock`,
//! root only): one JSON [`Request`] line in, newline-delimited JSON out.

use std::{
    collections::{BTreeMap, VecDeque},
    net::Ipv4Addr,
    os::unix::fs::PermissionsExt,
    path::Path,
    sync::{Arc, Mutex},
};

use anyhow::{Context, Result};
use k8s_openapi::chrono::{DateTime, SecondsFormat, TimeDelta, Utc};
use prometheus_client::metrics::{counter::Counter, family::Family};
use serde::{Deserialize, Serialize};
use skiff_datapath::{lb::proto_name, policy::Flows};
use skiff_ebpf_common::{
    Hook,
    policy::{
        DIR_INGRESS, FlowEvent, IDENTITY_ANY, IDENTITY_CIDR_FIRST, IDENTITY_HOST,
        IDENTITY_REMOTE_NODE, IDENTITY_WORLD, VERDICT_ALLOWED, VERDICT_AUDIT,
    },
};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::{broadcast, watch},
};

use super::{desired::EndpointPolicies, rules::PolicyRef};

/// What the policy loop knows, for naming flows and map entries.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Names {
    /// This node's endpoints by number.
    pub endpoints: BTreeMap<u16, EndpointPolicies>,
    /// Every pod of the cluster by address.
    pub pods: BTreeMap<Ipv4Addr, NamedPod>,
    /// Policies by number.
    pub policies: BTreeMap<u32, PolicyRef>,
    /// Security identities by number: `namespace:key=value,…`; CIDR identities: the prefix.
    pub identities: BTreeMap<u32, String>,
    /// The first policy number never given (a restarted loop goes on from it).
    #[serde(default)]
    pub next_policy_number: u32,
}

impl Names {
    /// A short name of identity `id`.
    pub fn identity(&self, id: u32) -> String {
        match id {
            IDENTITY_ANY => "any".to_string(),
            IDENTITY_HOST => "host".to_string(),
            IDENTITY_WORLD => "world".to_string(),
            IDENTITY_REMOTE_NODE => "remote-node".to_string(),
            _ => match self.identities.get(&id) {
                Some(d) if id >= IDENTITY_CIDR_FIRST => format!("cidr:{d}"),
                Some(d) => format!("{id} ({d})"),
                None => id.to_string(),
            },
        }
    }
}

/// A pod as flows name it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NamedPod {
    pub namespace: String,
    pub name: String,
    /// Its security identity (none until allocated).
    pub identity: Option<u32>,
}

/// A flow's verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Verdict {
    /// Allowed by a policy, or the direction is not isolated.
    Allowed,
    /// No policy allows it: dropped.
    Dropped,
    /// Would be dropped; allowed because its namespace is in audit mode.
    Audit,
}

impl Verdict {
    /// Lower-case, as metrics label it.
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Allowed => "allowed",
            Verdict::Dropped => "dropped",
            Verdict::Audit => "audit",
        }
    }
}

impl std::fmt::Display for Verdict {
    /// As the JSON spells it (`ALLOWED`, `DROPPED`, `AUDIT`).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name().to_ascii_uppercase())
    }
}

/// A policy by name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyName {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for PolicyName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One end of a flow.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FlowEnd {
    pub ip: Ipv4Addr,
    pub port: u16,
    /// The pod at `ip`, when it is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// Its security identity (a reserved one for the host, other nodes and the world).
    pub identity: u32,
}

impl std::fmt::Display for FlowEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.namespace, &self.pod) {
            (Some(ns), Some(pod)) => write!(f, "{ns}/{pod}:{}", self.port),
            _ => write!(f, "{}:{}", self.ip, self.port),
        }
    }
}

/// A new connection as policy decided it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Flow {
    /// When the data path decided (RFC 3339).
    pub time: String,
    pub node: String,
    pub verdict: Verdict,
    /// Seen from the isolated endpoint: `ingress` (to it) or `egress` (from it).
    pub direction: String,
    pub protocol: String,
    pub source: FlowEnd,
    pub destination: FlowEnd,
    /// The policy whose rule allowed it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_by: Vec<PolicyName>,
    /// Dropped or audited: the policies isolating the endpoint in that direction, none of
    /// which allows it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub denied_by: Vec<PolicyName>,
    /// The program that decided.
    pub hook: String,
}

impl Flow {
    /// Whether either end is pod `namespace/name`.
    pub fn involves(&self, namespace: &str, name: &str) -> bool {
        [&self.source, &self.destination]
            .iter()
            .any(|e| e.namespace.as_deref() == Some(namespace) && e.pod.as_deref() == Some(name))
    }
}

/// Which flows a reader wants.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Filter {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<Verdict>,
    /// (namespace, name) of a pod at either end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<(String, String)>,
}

impl Filter {
    pub fn matches(&self, f: &Flow) -> bool {
        self.verdict.is_none_or(|v| v == f.verdict)
            && self.pod.as_ref().is_none_or(|(ns, n)| f.involves(ns, n))
    }
}

/// A request on the flow socket.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "get", rename_all = "kebab-case")]
pub enum Request {
    /// The last `last` matching flows, then (with `follow`) each new one as it comes.
    Flows {
        #[serde(default)]
        follow: bool,
        last: usize,
        #[serde(default)]
        filter: Filter,
    },
    /// The [`Names`] the agent has now (one JSON object).
    Names,
}

/// The path of the flow socket under the agent's run directory.
pub fn socket_path(run_dir: &Path) -> std::path::PathBuf {
    run_dir.join("flows.sock")
}

/// Per-policy counters, for `/metrics`.
#[derive(Debug, Default)]
pub struct FlowMetrics {
    /// Flows by (direction, verdict).
    pub verdicts: Family<Vec<(String, String)>, Counter>,
    /// Dropped and audited flows by (namespace, policy, direction, verdict), once per
    /// isolating policy.
    pub denials: Family<Vec<(String, String)>, Counter>,
}

/// A flow with its sequence number.
type Numbered = (u64, Arc<Flow>);

/// The log of recent flows.
#[derive(Debug)]
pub struct FlowLog {
    node: String,
    capacity: usize,
    /// The last sequence number given, and (sequence number, flow) oldest first.
    recent: Mutex<(u64, VecDeque<Numbered>)>,
    tx: broadcast::Sender<Numbered>,
    pub metrics: FlowMetrics,
}

impl From<&PolicyRef> for PolicyName {
    fn from((namespace, name): &PolicyRef) -> PolicyName {
        PolicyName {
            namespace: namespace.clone(),
            name: name.clone(),
        }
    }
}

/// `CLOCK_REALTIME − CLOCK_MONOTONIC` now, to date `bpf_ktime_get_ns` stamps.
fn boot_offset() -> Option<(DateTime<Utc>, u64)> {
    let mono = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).ok()?;
    let mono_ns =
        u64::try_from(mono.tv_sec()).ok()? * 1_000_000_000 + u64::try_from(mono.tv_nsec()).ok()?;
    Some((Utc::now(), mono_ns))
}

impl FlowLog {
    /// A log of `node`'s flows keeping the last `capacity`.
    pub fn new(node: String, capacity: usize) -> Arc<FlowLog> {
        let (tx, _) = broadcast::channel(1024);
        Arc::new(FlowLog {
            node,
            capacity: capacity.max(1),
            recent: Mutex::new((0, VecDeque::new())),
            tx,
            metrics: FlowMetrics::default(),
        })
    }

    /// Names `ev` with `names`; `clock` dates it.
    pub fn describe(
        &self,
        ev: &FlowEvent,
        names: &Names,
        clock: Option<(DateTime<Utc>, u64)>,
    ) -> Flow {
        let time = clock
            .map(|(now, mono)| {
                now - TimeDelta::nanoseconds(
                    mono.saturating_sub(ev.ts_ns).min(i64::MAX as u64) as i64
                )
            })
            .unwrap_or_else(Utc::now)
            .to_rfc3339_opts(SecondsFormat::Micros, true);
        let endpoint = names.endpoints.get(&ev.endpoint);
        let ingress = ev.direction == DIR_INGRESS;
        // The peer's identity is the one that decided; the endpoint's is its address's.
        let end = |ip: Ipv4Addr, port: u16, identity: Option<u32>| {
            let pod = names.pods.get(&ip);
            FlowEnd {
                ip,
                port,
                namespace: pod.map(|p| p.namespace.clone()),
                pod: pod.map(|p| p.name.clone()),
                identity: identity
                    .or_else(|| pod.and_then(|p| p.identity))
                    .unwrap_or(IDENTITY_WORLD),
            }
        };
        let (saddr, daddr) = (Ipv4Addr::from(ev.saddr), Ipv4Addr::from(ev.daddr));
        let (source, destination) = if ingress {
            (
                end(saddr, ev.sport, Some(ev.peer_identity)),
                end(daddr, ev.dport, None),
            )
        } else {
            (
                end(saddr, ev.sport, None),
                end(daddr, ev.dport, Some(ev.peer_identity)),
            )
        };
        let verdict = match ev.verdict {
            VERDICT_ALLOWED => Verdict::Allowed,
            VERDICT_AUDIT => Verdict::Audit,
            _ => Verdict::Dropped,
        };
        let allowed_by = names
            .policies
            .get(&ev.policy)
            .filter(|_| ev.policy != 0)
            .map(PolicyName::from)
            .into_iter()
            .collect();
        let denied_by = match (verdict, endpoint) {
            (Verdict::Allowed, _) | (_, None) => Vec::new(),
            (_, Some(e)) => (if ingress { &e.ingress } else { &e.egress })
                .iter()
                .map(PolicyName::from)
                .collect(),
        };
        Flow {
            time,
            node: self.node.clone(),
            verdict,
            direction: if ingress { "ingress" } else { "egress" }.to_string(),
            protocol: proto_name(ev.proto),
            source,
            destination,
            allowed_by,
            denied_by,
            hook: Hook::from_u8(ev.hook).map_or_else(|| ev.hook.to_string(), |h| h.name().into()),
        }
    }

    /// Counts and keeps `flow`, and sends it to followers.
    pub fn record(&self, flow: Flow) {
        let verdict = flow.verdict.name();
        self.metrics
            .verdicts
            .get_or_create(&vec![
                ("direction".to_string(), flow.direction.clone()),
                ("verdict".to_string(), verdict.to_string()),
            ])
            .inc();
        for p in &flow.denied_by {
            self.metrics
                .denials
                .get_or_create(&vec![
                    ("namespace".to_string(), p.namespace.clone()),
                    ("policy".to_string(), p.name.clone()),
                    ("direction".to_string(), flow.direction.clone()),
                    ("verdict".to_string(), verdict.to_string()),
                ])
                .inc();
        }
        let flow = Arc::new(flow);
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        let (last, flows) = &mut *recent;
        *last += 1;
        if flows.len() == self.capacity {
            flows.pop_front();
        }
        flows.push_back((*last, flow.clone()));
        // Sent under the lock, so followers see sequence numbers in order. No followers is
        // fine.
        let _ = self.tx.send((*last, flow));
    }

    /// The last `last` flows matching `filter`, oldest first, with the sequence number of the
    /// newest flow kept (matching or not).
    pub fn recent(&self, filter: &Filter, last: usize) -> (Vec<Arc<Flow>>, u64) {
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        let newest = recent.0;
        let mut out: Vec<Arc<Flow>> = recent
            .1
            .iter()
            .rev()
            .filter(|(_, f)| filter.matches(f))
            .take(last)
            .map(|(_, f)| f.clone())
            .collect();
        out.reverse();
        (out, newest)
    }
}

/// Events read at once.
const BATCH: usize = 1024;

/// Reads `flows` into `log` until an error; `names` names them.
pub async fn run(
    log: Arc<FlowLog>,
    flows: Flows,
    names: watch::Receiver<Arc<Names>>,
) -> Result<()> {
    // SAFETY: `Flows::as_raw_fd` is its ring map's descriptor, owned by `flows` (moved into
    // the `AsyncFd`), open and the same until it is dropped.
    let mut fd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(flows, tokio::io::Interest::READABLE)
    }
    .map_err(|e| anyhow::anyhow!("watch the flow ring buffer: {e}"))?;
    loop {
        let mut guard = fd.readable_mut().await.context("flow ring buffer")?;
        // Cleared before reading: an event committed after the last read wakes us again.
        guard.clear_ready();
        loop {
            // In batches, yielding between them: a burst does not hold a worker.
            let events = guard.get_inner_mut().drain_up_to(BATCH);
            let clock = boot_offset();
            let names = names.borrow().clone();
            for ev in &events {
                log.record(log.describe(ev, &names, clock));
            }
            if events.len() < BATCH {
                break;
            }
            tokio::task::yield_now().await;
        }
    }
}

/// The longest request line accepted.
const MAX_REQUEST: usize = 64 * 1024;
/// Clients served at once.
const MAX_CLIENTS: usize = 64;
/// How long a client has to send its request.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves the flow socket at `path` (replacing a stale one; mode 0600).
pub async fn serve(
    path: &Path,
    log: Arc<FlowLog>,
    names: watch::Receiver<Arc<Names>>,
) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("remove stale {}", path.display())),
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    // Made private under another name, then moved into place: never reachable while open.
    let staging = path.with_extension("sock.new");
    let _ = std::fs::remove_file(&staging);
    let listener =
        UnixListener::bind(&staging).with_context(|| format!("bind {}", staging.display()))?;
    std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod {}", staging.display()))?;
    std::fs::rename(&staging, path).with_context(|| format!("move to {}", path.display()))?;
    tracing::info!(socket = %path.display(), "flow log listening");
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CLIENTS));
    loop {
        let (stream, _) = listener
            .accept()
            .await
            .context("accept on the flow socket")?;
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!("flow socket: {MAX_CLIENTS} clients already; refusing another");
            continue;
        };
        let (log, names) = (log.clone(), names.clone());
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = session(stream, &log, &names).await {
                tracing::debug!(error = format!("{e:#}"), "flow socket client");
            }
        });
    }
}

async fn write_json<T: Serialize>(w: &mut (impl AsyncWriteExt + Unpin), v: &T) -> Result<()> {
    let mut line = serde_json::to_vec(v)?;
    line.push(b'\n');
    w.write_all(&line).await?;
    Ok(())
}

async fn session(
    stream: UnixStream,
    log: &FlowLog,
    names: &watch::Receiver<Arc<Names>>,
) -> Result<()> {
    let (read, mut write) = stream.into_split();
    let mut read = tokio::io::AsyncReadExt::take(BufReader::new(read), MAX_REQUEST as u64);
    let mut line = String::new();
    tokio::time::timeout(REQUEST_TIMEOUT, read.read_line(&mut line))
        .await
        .context("no request")??;
    let req: Request = match serde_json::from_str(&line) {
        Ok(r) => r,
        Err(e) => {
            let msg = serde_json::json!({ "error": format!("bad request: {e}") });
            return write_json(&mut write, &msg).await;
        }
    };
    match req {
        Request::Names => {
            let names = names.borrow().clone();
            write_json(&mut write, &*names).await
        }
        Request::Flows {
            follow,
            last,
            filter,
        } => {
            // Subscribed before the snapshot; what both hold is skipped by sequence number.
            let mut rx = log.tx.subscribe();
            let (flows, newest) = log.recent(&filter, last);
            for f in flows {
                write_json(&mut write, &*f).await?;
            }
            write.flush().await?;
            if !follow {
                return Ok(());
            }
            let mut rest = read.into_inner();
            let mut sink = [0u8; 64];
            loop {
                tokio::select! {
                    got = rx.recv() => match got {
                        Ok((seq, f)) if seq > newest && filter.matches(&f) => {
                            write_json(&mut write, &*f).await?;
                        }
                        Ok(_) => {}
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            // Told, so the reader knows its stream has a gap.
                            write_json(&mut write, &serde_json::json!({ "lost": n })).await?;
                        }
                        Err(broadcast::error::RecvError::Closed) => return Ok(()),
                    },
                    // The client hung up.
                    n = tokio::io::AsyncReadExt::read(&mut rest, &mut sink) => {
                        if n.unwrap_or(0) == 0 {
                            return Ok(());
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use skiff_ebpf_common::policy::{DIR_EGRESS, VERDICT_DROPPED};

    fn names() -> Names {
        let pod = |ns: &str, n: &str, id| NamedPod {
            namespace: ns.into(),
            name: n.into(),
            identity: Some(id),
        };
        Names {
            endpoints: BTreeMap::from([(
                3,
                EndpointPolicies {
                    namespace: "shop".into(),
                    pod: "web".into(),
                    ip: Some([10, 244, 0, 5].into()),
                    ingress: vec![
                        ("shop".into(), "deny-all".into()),
                        ("shop".into(), "web-in".into()),
                    ],
                    egress: vec![],
                },
            )]),
            pods: BTreeMap::from([
                ([10, 244, 0, 5].into(), pod("shop", "web", 300)),
                ([10, 244, 1, 6].into(), pod("shop", "client", 301)),
            ]),
            policies: BTreeMap::from([(7, ("shop".into(), "web-in".into()))]),
            identities: BTreeMap::new(),
            next_policy_number: 8,
        }
    }

    fn event(verdict: u8, policy: u32, sport: u16) -> FlowEvent {
        FlowEvent {
            ts_ns: 1_000,
            saddr: [10, 244, 1, 6],
            daddr: [10, 244, 0, 5],
            sport,
            dport: 80,
            peer_identity: 301,
            policy,
            endpoint: 3,
            proto: 6,
            direction: DIR_INGRESS,
            verdict,
            hook: Hook::ToPod as u8,
            pad: [0; 2],
        }
    }

    #[test]
    fn flows_name_both_ends_and_the_deciding_policies() {
        let log = FlowLog::new("n1".into(), 10);
        let names = names();
        let allowed = log.describe(&event(VERDICT_ALLOWED, 7, 40000), &names, None);
        assert_eq!(allowed.verdict, Verdict::Allowed);
        assert_eq!(allowed.source.pod.as_deref(), Some("client"));
        assert_eq!(allowed.source.identity, 301);
        assert_eq!(allowed.destination.pod.as_deref(), Some("web"));
        assert_eq!(allowed.destination.identity, 300);
        assert_eq!(allowed.allowed_by[0].to_string(), "shop/web-in");
        assert!(allowed.denied_by.is_empty());
        assert_eq!(
            (allowed.protocol.as_str(), allowed.hook.as_str()),
            ("TCP", "to-pod")
        );
        // A drop names every policy isolating the endpoint that way.
        let dropped = log.describe(&event(VERDICT_DROPPED, 0, 40001), &names, None);
        assert_eq!(dropped.verdict, Verdict::Dropped);
        assert!(dropped.allowed_by.is_empty());
        let denied: Vec<String> = dropped.denied_by.iter().map(|p| p.to_string()).collect();
        assert_eq!(denied, ["shop/deny-all", "shop/web-in"]);
        // Egress from the endpoint: the endpoint is the source.
        let mut ev = event(VERDICT_DROPPED, 0, 40002);
        ev.direction = DIR_EGRESS;
        (ev.saddr, ev.daddr) = (ev.daddr, ev.saddr);
        let out = log.describe(&ev, &names, None);
        assert_eq!(out.source.pod.as_deref(), Some("web"));
        assert_eq!(out.destination.identity, 301);
        assert!(
            out.denied_by.is_empty(),
            "egress is not isolated by anything named"
        );
        // Dated from the monotonic clock: 1 s before "now".
        let now = Utc::now();
        let dated = log.describe(&event(0, 7, 1), &names, Some((now, 1_000_001_000)));
        let t = DateTime::parse_from_rfc3339(&dated.time).unwrap();
        assert_eq!((now - t.with_timezone(&Utc)).num_milliseconds(), 1000);
    }

    #[test]
    fn the_log_keeps_the_last_flows_filters_and_counts_per_policy() {
        let log = FlowLog::new("n1".into(), 3);
        let names = names();
        for (i, v) in [
            VERDICT_ALLOWED,
            VERDICT_DROPPED,
            VERDICT_DROPPED,
            VERDICT_ALLOWED,
        ]
        .into_iter()
        .enumerate()
        {
            log.record(log.describe(&event(v, 7 * u32::from(v == 0), i as u16), &names, None));
        }
        let all = log.recent(&Filter::default(), 100);
        assert_eq!(all.1, 4, "sequence number of the newest");
        let ports: Vec<u16> = all.0.iter().map(|f| f.source.port).collect();
        assert_eq!(ports, [1, 2, 3], "capacity 3, oldest first");
        let drops = Filter {
            verdict: Some(Verdict::Dropped),
            ..Filter::default()
        };
        let last_drop = log.recent(&drops, 1).0;
        assert_eq!(last_drop.len(), 1);
        assert_eq!(last_drop[0].source.port, 2);
        let other_pod = Filter {
            pod: Some(("shop".into(), "db".into())),
            ..Filter::default()
        };
        assert!(log.recent(&other_pod, 100).0.is_empty());
        let by_web = Filter {
            pod: Some(("shop".into(), "web".into())),
            ..Filter::default()
        };
        assert_eq!(log.recent(&by_web, 100).0.len(), 3);
        // Two drops, each counted against both isolating policies.
        let denials = |policy: &str| {
            log.metrics
                .denials
                .get_or_create(&vec![
                    ("namespace".to_string(), "shop".to_string()),
                    ("policy".to_string(), policy.to_string()),
                    ("direction".to_string(), "ingress".to_string()),
                    ("verdict".to_string(), "dropped".to_string()),
                ])
                .get()
        };
        assert_eq!((denials("deny-all"), denials("web-in")), (2, 2));
    }

    #[test]
    fn requests_are_one_json_line() {
        let r: Request = serde_json::from_str(
            r#"{"get":"flows","last":5,"follow":true,"filter":{"verdict":"DROPPED","pod":["a","b"]}}"#,
        )
        .unwrap();
        assert_eq!(
            r,
            Request::Flows {
                follow: true,
                last: 5,
                filter: Filter {
                    verdict: Some(Verdict::Dropped),
                    pod: Some(("a".into(), "b".into())),
                },
            }
        );
        assert!(serde_json::from_str::<Request>(r#"{"get":"everything"}"#).is_err());
    }
}
