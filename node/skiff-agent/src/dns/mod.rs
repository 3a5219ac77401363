//! Cluster DNS, built into the agent (the kube-dns / CoreDNS role, placed per node as
//! NodeLocal DNSCache is): a DNS server on the node's address, port 53, UDP and TCP, answering
//! the cluster domain from the Services and EndpointSlices the agent already follows
//! ([`zone`]) and forwarding every other name to the node's resolvers.
//!
//! Pods reach it at the `kube-system/kube-dns` Service (10.96.0.10, created by the API server
//! with `internalTrafficPolicy: Local`) through the eBPF load balancer: each agent publishes an
//! EndpointSlice `kube-dns-<node>` naming its own address, owned by its Node, so a pod's query
//! is translated to its own node's server and never crosses the network.

pub mod zone;

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result};
use hickory_server::{
    net::{NetError, runtime::Time, xfer::Protocol},
    proto::{
        op::{
            Edns, Header, HeaderCounts, Message, MessageType, Metadata, OpCode, Query, ResponseCode,
        },
        rr::{DNSClass, LowerName, Name, RData, Record},
    },
    server::{Request, RequestHandler, ResponseHandler, ResponseInfo},
    zone_handler::MessageResponseBuilder,
};
use k8s_openapi::api::{core::v1::Node, discovery::v1::EndpointSlice};
use kube::{Api, Client, api::PostParams};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub use hickory_server::proto::rr::RecordType;
use zone::Lookup;
pub use zone::Zone;

pub use skiff_apimachinery::cluster::CLUSTER_DNS_IP;
use skiff_apimachinery::cluster::{DNS_SERVICE_NAME, DNS_SERVICE_NAMESPACE};
/// How long one upstream resolver gets to answer before the next is tried.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a TCP client may stay idle between queries.
const TCP_IDLE: Duration = Duration::from_secs(10);

/// Most queries forwarded at once.
pub const MAX_FORWARDS: usize = 256;

/// Answers queries: the cluster domain from the zone, everything else from upstream.
#[derive(Debug)]
pub struct Handler {
    zone: Arc<Zone>,
    upstreams: Vec<SocketAddr>,
    forwards: tokio::sync::Semaphore,
}

impl Handler {
    pub fn new(zone: Arc<Zone>, upstreams: Vec<SocketAddr>) -> Handler {
        Handler {
            zone,
            upstreams,
            forwards: tokio::sync::Semaphore::new(MAX_FORWARDS),
        }
    }

    /// The answer to one question: (response code, whether authoritative, answers,
    /// authorities); `None` when the question is not the zone's (forward it).
    async fn answer(
        &self,
        request: &Request,
        name: &LowerName,
        qtype: RecordType,
    ) -> Option<(ResponseCode, bool, Vec<Record>, Vec<Record>)> {
        match self.zone.lookup(name, qtype) {
            Lookup::Foreign => None,
            Lookup::NotSynced => Some((ResponseCode::ServFail, false, vec![], vec![])),
            Lookup::Empty => Some((ResponseCode::NoError, false, vec![], vec![])),
            Lookup::NoData(soa) => Some((ResponseCode::NoError, true, vec![], vec![soa])),
            Lookup::NxDomain(soa) => Some((ResponseCode::NXDomain, true, vec![], vec![soa])),
            Lookup::Answer(mut answers) => {
                // An ExternalName's CNAME: follow it once, as CoreDNS does, so stub resolvers
                // get the address in the same answer.
                let target = match answers.as_slice() {
                    [r] if qtype != RecordType::CNAME => match &r.data {
                        RData::CNAME(c) => Some(c.0.clone()),
                        _ => None,
                    },
                    _ => None,
                };
                let Some(target) = target else {
                    return Some((ResponseCode::NoError, true, answers, vec![]));
                };
                match self.zone.lookup(&LowerName::new(&target), qtype) {
                    Lookup::Answer(more) => {
                        answers.extend(more);
                        Some((ResponseCode::NoError, true, answers, vec![]))
                    }
                    // Followed out of the zone: the rest is the upstream's (not ours to vouch
                    // for), its code included.
                    Lookup::Foreign => match self.resolve(request, target, qtype).await {
                        Some(m) => {
                            answers.extend(m.answers);
                            Some((m.metadata.response_code, false, answers, m.authorities))
                        }
                        None => Some((ResponseCode::ServFail, false, answers, vec![])),
                    },
                    _ => Some((ResponseCode::NoError, true, answers, vec![])),
                }
            }
        }
    }

    /// Asks upstream a question of our own (to follow a CNAME out of the zone).
    async fn resolve(&self, request: &Request, name: Name, qtype: RecordType) -> Option<Message> {
        let mut q = Message::new(request.metadata.id, MessageType::Query, OpCode::Query);
        q.metadata.recursion_desired = true;
        q.add_query(Query::query(name, qtype));
        let raw = q.to_vec().ok()?;
        let bytes = self
            .forward(&raw, request.protocol(), request.max_payload())
            .await
            .ok()?;
        Message::from_vec(&bytes).ok()
    }

    /// Sends `raw` to the upstream resolvers in turn; the first answer. At most
    /// [`MAX_FORWARDS`] are in flight: beyond that a query is answered `SERVFAIL` at once
    /// rather than holding a socket and a buffer while upstreams are slow.
    async fn forward(&self, raw: &[u8], protocol: Protocol, max_udp: u16) -> Result<Vec<u8>> {
        let _permit = self
            .forwards
            .try_acquire()
            .map_err(|_| anyhow::anyhow!("{MAX_FORWARDS} forwarded queries in flight"))?;
        let id = raw.get(..2).context("short query")?;
        let mut last = anyhow::anyhow!("no upstream resolver is configured");
        for up in &self.upstreams {
            let tried = tokio::time::timeout(UPSTREAM_TIMEOUT, async {
                if protocol == Protocol::Udp {
                    let bind: SocketAddr = if up.is_ipv4() {
                        ([0, 0, 0, 0], 0).into()
                    } else {
                        ([0u16; 8], 0).into()
                    };
                    let sock = tokio::net::UdpSocket::bind(bind).await?;
                    sock.connect(up).await?;
                    sock.send(raw).await?;
                    // The upstream answers within what the query (the client's) advertised.
                    let mut buf = vec![0u8; usize::from(max_udp.max(512))];
                    loop {
                        let n = sock.recv(&mut buf).await?;
                        // Only the answer to this query (a connected socket already only
                        // hears from the upstream): its id, with the response bit set.
                        if n >= 12 && buf[..2] == *id && buf[2] & 0x80 != 0 {
                            buf.truncate(n);
                            return anyhow::Ok(buf);
                        }
                    }
                } else {
                    let mut s = tokio::net::TcpStream::connect(up).await?;
                    let len = u16::try_from(raw.len()).context("query too long")?;
                    let mut msg = len.to_be_bytes().to_vec();
                    msg.extend_from_slice(raw);
                    s.write_all(&msg).await?;
                    let n = s.read_u16().await? as usize;
                    let mut buf = vec![0u8; n];
                    s.read_exact(&mut buf).await?;
                    anyhow::Ok(buf)
                }
            })
            .await;
            match tried {
                Ok(Ok(b)) => return Ok(b),
                Ok(Err(e)) => last = e.context(format!("upstream {up}")),
                Err(_) => {
                    last = anyhow::anyhow!("upstream {up}: no answer in {UPSTREAM_TIMEOUT:?}")
                }
            }
        }
        Err(last)
    }
}

/// A response carrying only a code.
async fn reply_code<R: ResponseHandler>(
    request: &Request,
    mut response: R,
    code: ResponseCode,
) -> ResponseInfo {
    let msg =
        MessageResponseBuilder::new(&request.queries, None).error_msg(&request.metadata, code);
    match response.send_response(msg).await {
        Ok(info) => info,
        Err(e) => failed(request, &e),
    }
}

fn failed(request: &Request, e: &NetError) -> ResponseInfo {
    tracing::debug!(error = %e, src = %request.src(), "DNS response not sent");
    let mut metadata = Metadata::response_from_request(&request.metadata);
    metadata.response_code = ResponseCode::ServFail;
    ResponseInfo::from(Header {
        metadata,
        counts: HeaderCounts::default(),
    })
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response: R,
    ) -> ResponseInfo {
        if request.metadata.message_type != MessageType::Query {
            return reply_code(request, response, ResponseCode::FormErr).await;
        }
        if request.metadata.op_code != OpCode::Query {
            return reply_code(request, response, ResponseCode::NotImp).await;
        }
        let Ok(info) = request.request_info() else {
            return reply_code(request, response, ResponseCode::FormErr).await;
        };
        let (name, qtype) = (info.query.name().clone(), info.query.query_type());
        let mut edns = Edns::new();
        let req_edns = request.edns.as_ref();
        if let Some(e) = req_edns {
            edns.set_max_payload(e.max_payload().max(512));
        }
        let builder = || {
            let mut b = MessageResponseBuilder::new(&request.queries, None);
            if req_edns.is_some() {
                b.edns(&edns);
            }
            b
        };
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.recursion_available = true;
        let local = if info.query.query_class() == DNSClass::IN {
            self.answer(request, &name, qtype).await
        } else {
            None
        };
        let sent = match local {
            Some((code, authoritative, answers, authorities)) => {
                metadata.response_code = code;
                metadata.authoritative = authoritative;
                let msg = builder().build(metadata, &answers, &authorities, [], []);
                response.send_response(msg).await
            }
            None => match self
                .forward(
                    request.as_slice(),
                    request.protocol(),
                    request.max_payload(),
                )
                .await
            {
                Ok(bytes) => match Message::from_vec(&bytes) {
                    Ok(up) => {
                        let mut m = up.metadata;
                        m.id = request.metadata.id;
                        let msg =
                            builder().build(m, &up.answers, &up.authorities, [], &up.additionals);
                        response.send_response(msg).await
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, name = %name, "upstream answer unreadable");
                        return reply_code(request, response, ResponseCode::ServFail).await;
                    }
                },
                Err(e) => {
                    tracing::debug!(error = format!("{e:#}"), name = %name, "not forwarded");
                    return reply_code(request, response, ResponseCode::ServFail).await;
                }
            },
        };
        match sent {
            Ok(info) => info,
            Err(e) => failed(request, &e),
        }
    }
}

/// Asks `server` one question over UDP (what a stub resolver does); its answer.
pub async fn query(
    server: SocketAddr,
    name: &str,
    qtype: RecordType,
    timeout: Duration,
) -> Result<Message> {
    let mut q = Message::new(query_id(), MessageType::Query, OpCode::Query);
    q.metadata.recursion_desired = true;
    q.add_query(Query::query(Name::from_ascii(name)?, qtype));
    let bind: SocketAddr = if server.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    let sock = tokio::net::UdpSocket::bind(bind).await?;
    sock.connect(server).await?;
    sock.send(&q.to_vec()?).await?;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(timeout, sock.recv(&mut buf))
        .await
        .with_context(|| format!("no answer from {server} in {timeout:?}"))??;
    let m = Message::from_vec(&buf[..n])?;
    anyhow::ensure!(m.metadata.id == q.metadata.id, "an answer to another query");
    Ok(m)
}

/// A query id that differs between calls (from the clock: a connected socket on an ephemeral
/// port already only hears its server).
fn query_id() -> u16 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    (nanos ^ (nanos >> 16)) as u16
}

/// The node's resolvers, from its `resolv.conf` text (port 53), minus `exclude` (the cluster
/// DNS addresses and the node's own, which would loop).
pub fn upstreams_from(resolv_conf: &str, exclude: &[IpAddr]) -> Vec<SocketAddr> {
    resolv_conf
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|ns| ns.trim().parse::<IpAddr>().ok())
        .filter(|ip| !exclude.contains(ip))
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// A running DNS server.
pub struct Server {
    inner: hickory_server::Server<Handler>,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("addr", &self.addr).finish()
    }
}

impl Server {
    /// Listens on `addr` (UDP and TCP) with `handler`.
    pub async fn bind(addr: SocketAddr, handler: Handler) -> Result<Server> {
        let udp = tokio::net::UdpSocket::bind(addr)
            .await
            .with_context(|| format!("listen for DNS on {addr}/udp"))?;
        let addr = udp.local_addr()?;
        let tcp = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listen for DNS on {addr}/tcp"))?;
        let mut inner = hickory_server::Server::new(handler);
        inner.register_socket(udp);
        inner.register_listener(tcp, TCP_IDLE, 64);
        Ok(Server { inner, addr })
    }

    /// Serves until the listeners fail.
    pub async fn run(mut self) -> Result<()> {
        self.inner.block_until_done().await.context("DNS server")
    }
}

/// The EndpointSlice through which this node's pods reach its DNS server.
pub fn endpoint_slice(node: &Node, addr: SocketAddr) -> Result<EndpointSlice> {
    let name = node.metadata.name.clone().context("node without a name")?;
    let uid = node.metadata.uid.clone().context("node without a uid")?;
    let address_type = if addr.is_ipv4() { "IPv4" } else { "IPv6" };
    Ok(serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{DNS_SERVICE_NAME}-{name}"),
            "namespace": DNS_SERVICE_NAMESPACE,
            "labels": {
                "kubernetes.io/service-name": DNS_SERVICE_NAME,
                "endpointslice.kubernetes.io/managed-by": "skiff-node",
            },
            "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": name, "uid": uid}],
        },
        "addressType": address_type,
        "endpoints": [{
            "addresses": [addr.ip().to_string()],
            "conditions": {"ready": true, "serving": true, "terminating": false},
            "nodeName": name,
        }],
        "ports": [
            {"name": "dns", "port": addr.port(), "protocol": "UDP"},
            {"name": "dns-tcp", "port": addr.port(), "protocol": "TCP"},
        ],
    }))?)
}

/// Creates or updates this node's `kube-dns` EndpointSlice.
pub async fn publish(client: &Client, node_name: &str, addr: SocketAddr) -> Result<()> {
    let node = Api::<Node>::all(client.clone())
        .get(node_name)
        .await
        .with_context(|| format!("read Node {node_name}"))?;
    let want = endpoint_slice(&node, addr)?;
    let api = Api::<EndpointSlice>::namespaced(client.clone(), DNS_SERVICE_NAMESPACE);
    let name = want.metadata.name.clone().unwrap_or_default();
    match api.get_opt(&name).await? {
        None => {
            api.create(&PostParams::default(), &want).await?;
        }
        Some(have) => {
            if have.endpoints != want.endpoints
                || have.ports != want.ports
                || have.metadata.owner_references != want.metadata.owner_references
            {
                let mut next = want;
                next.metadata.resource_version = have.metadata.resource_version;
                api.replace(&name, &PostParams::default(), &next).await?;
            }
        }
    }
    Ok(())
}

/// How often the node's `kube-dns` EndpointSlice is checked (re-created if it went with a
/// re-registered Node, corrected if changed).
const REPUBLISH: Duration = Duration::from_secs(30);

/// Serves cluster DNS on `addr` from `zone` and keeps this node's endpoint for it published;
/// runs until the server fails.
pub async fn run(
    client: Client,
    node_name: String,
    addr: SocketAddr,
    zone: Arc<Zone>,
    upstreams: Vec<SocketAddr>,
) -> Result<()> {
    let server = Server::bind(addr, Handler::new(zone, upstreams.clone())).await?;
    tracing::info!(addr = %server.addr, upstreams = ?upstreams, "cluster DNS listening");
    let addr = server.addr;
    let publisher = async move {
        let mut delay = Duration::from_millis(200);
        loop {
            match publish(&client, &node_name, addr).await {
                Ok(()) => {
                    delay = Duration::from_millis(200);
                    tokio::time::sleep(REPUBLISH).await;
                }
                Err(e) => {
                    tracing::warn!(
                        error = format!("{e:#}"),
                        "kube-dns endpoint not published; retrying"
                    );
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
            }
        }
    };
    tokio::select! {
        r = server.run() => r,
        () = publisher => unreachable!("the publisher loops forever"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_server::proto::rr::rdata::A;
    use serde_json::json;

    /// A resolver standing in for the node's: answers every A question with 192.0.2.1.
    async fn fake_upstream() -> SocketAddr {
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok((n, from)) = sock.recv_from(&mut buf).await {
                let q = Message::from_vec(&buf[..n]).unwrap();
                let mut r = Message::new(q.metadata.id, MessageType::Response, OpCode::Query);
                r.metadata.recursion_available = true;
                for query in &q.queries {
                    r.add_query(query.clone());
                    if query.query_type() == RecordType::A {
                        r.add_answer(Record::from_rdata(
                            query.name().clone(),
                            60,
                            RData::A(A::new(192, 0, 2, 1)),
                        ));
                    }
                }
                sock.send_to(&r.to_vec().unwrap(), from).await.unwrap();
            }
        });
        addr
    }

    async fn ask(server: SocketAddr, name: &str, t: RecordType, tcp: bool) -> Message {
        if !tcp {
            return query(server, name, t, Duration::from_secs(10))
                .await
                .unwrap();
        }
        let mut q = Message::new(4242, MessageType::Query, OpCode::Query);
        q.metadata.recursion_desired = true;
        q.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
        let raw = q.to_vec().unwrap();
        let mut s = tokio::net::TcpStream::connect(server).await.unwrap();
        let mut msg = (raw.len() as u16).to_be_bytes().to_vec();
        msg.extend_from_slice(&raw);
        s.write_all(&msg).await.unwrap();
        let n = s.read_u16().await.unwrap() as usize;
        let mut buf = vec![0u8; n];
        s.read_exact(&mut buf).await.unwrap();
        let m = Message::from_vec(&buf).unwrap();
        assert_eq!(m.metadata.id, 4242);
        m
    }

    fn addrs(m: &Message) -> Vec<String> {
        m.answers
            .iter()
            .filter(|r| r.record_type() == RecordType::A)
            .map(|r| r.data.to_string())
            .collect()
    }

    async fn server(upstreams: Vec<SocketAddr>) -> (SocketAddr, Arc<Zone>) {
        let zone = Arc::new(Zone::new("cluster.local").unwrap());
        zone.set_synced(true);
        let svc = |v| serde_json::from_value(v).unwrap();
        let k = |n: &str| ("default".to_string(), n.to_string());
        zone.update(
            &k("web"),
            Some(&svc(
                json!({"metadata": {"name": "web", "namespace": "default"},
                "spec": {"clusterIP": "10.96.7.7", "ports": [{"name": "http", "port": 80}]}}),
            )),
            &[],
        );
        zone.update(
            &k("ext"),
            Some(&svc(
                json!({"metadata": {"name": "ext", "namespace": "default"},
                "spec": {"type": "ExternalName", "externalName": "example.org"}}),
            )),
            &[],
        );
        let s = Server::bind(
            "127.0.0.1:0".parse().unwrap(),
            Handler::new(zone.clone(), upstreams),
        )
        .await
        .unwrap();
        let addr = s.addr;
        tokio::spawn(s.run());
        (addr, zone)
    }

    #[tokio::test]
    async fn answers_the_cluster_domain_over_udp_and_tcp() {
        let (addr, zone) = server(vec![]).await;
        // Not filled from the cluster yet: SERVFAIL (retried), not a cacheable NXDOMAIN.
        zone.set_synced(false);
        let m = ask(addr, "web.default.svc.cluster.local.", RecordType::A, false).await;
        assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
        zone.set_synced(true);
        for tcp in [false, true] {
            let m = ask(addr, "web.default.svc.cluster.local.", RecordType::A, tcp).await;
            assert_eq!(m.metadata.response_code, ResponseCode::NoError);
            assert!(m.metadata.authoritative);
            assert_eq!(addrs(&m), ["10.96.7.7"]);
            let m = ask(
                addr,
                "_http._tcp.web.default.svc.cluster.local.",
                RecordType::SRV,
                tcp,
            )
            .await;
            assert_eq!(m.answers.len(), 1);
            let m = ask(addr, "nope.default.svc.cluster.local.", RecordType::A, tcp).await;
            assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
            assert_eq!(m.authorities.len(), 1, "negative answers carry the SOA");
        }
        // Outside the zone with nowhere to forward: SERVFAIL, not silence.
        let m = ask(addr, "example.org.", RecordType::A, false).await;
        assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    }

    #[tokio::test]
    async fn forwards_other_names_and_follows_external_names() {
        let up = fake_upstream().await;
        // The first upstream does not answer: the next one is asked.
        let dead = {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let a = s.local_addr().unwrap();
            std::mem::forget(s);
            a
        };
        let (addr, _zone) = server(vec![dead, up]).await;
        let m = ask(addr, "example.org.", RecordType::A, false).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(!m.metadata.authoritative);
        assert_eq!(addrs(&m), ["192.0.2.1"]);
        let m = ask(addr, "ext.default.svc.cluster.local.", RecordType::A, false).await;
        assert_eq!(m.answers.len(), 2, "{:?}", m.answers);
        assert_eq!(m.answers[0].record_type(), RecordType::CNAME);
        assert_eq!(addrs(&m), ["192.0.2.1"]);
    }

    #[test]
    fn upstreams_skip_the_cluster_dns_and_the_node() {
        let conf =
            "search lan\nnameserver 10.96.0.10\nnameserver 192.0.2.53\nnameserver 10.0.0.5\n";
        let ex = ["10.96.0.10".parse().unwrap(), "10.0.0.5".parse().unwrap()];
        assert_eq!(
            upstreams_from(conf, &ex),
            ["192.0.2.53:53".parse().unwrap()]
        );
    }

    #[test]
    fn the_endpoint_slice_is_owned_by_the_node() {
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": "n1", "uid": "u-1"}
        }))
        .unwrap();
        let s = endpoint_slice(&node, "10.0.0.11:53".parse().unwrap()).unwrap();
        assert_eq!(s.metadata.name.as_deref(), Some("kube-dns-n1"));
        assert_eq!(
            s.metadata.labels.as_ref().unwrap()["kubernetes.io/service-name"],
            "kube-dns"
        );
        let owner = &s.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!((owner.kind.as_str(), owner.uid.as_str()), ("Node", "u-1"));
        assert_eq!(s.endpoints[0].node_name.as_deref(), Some("n1"));
        assert_eq!(s.ports.as_ref().unwrap().len(), 2);
    }
}
