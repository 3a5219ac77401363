//! Service translation for TC hooks: what kube-proxy's rules do, as one connection-tracking
//! lookup per packet of an established flow.
//!
//! - [`from_pod`] (TC ingress on a pod's host-side veth): a packet of a tracked flow is
//!   translated as its entry says (forward: to the backend; reply: back from the frontend); an
//!   untracked packet to a frontend starts a flow (backend choice, both entries, translation) or,
//!   with no backend, is turned into a rejection and sent back.
//! - [`to_pod`] (TC egress on the same veth): replies from backends on other nodes get their
//!   source restored before the pod sees them.
//!
//! What `from_pod` and `from_netdev` pass on to a pod of this node is delivered straight to it
//! ([`local::deliver`]).

use aya_ebpf::programs::{TcContext, XdpContext};
use skiff_ebpf_common::{
    DropReason, Hook,
    ct::{CT_CLOSING, CT_HAIRPIN, CT_REPLY, CT_ROUTE, CtEntry, CtKey},
    lb::{
        BE_LOCAL, CFG_XDP_FAST_PATH, HAIRPIN_ADDR, NAT_PORT_MAX, NAT_PORT_MIN, SVC_EXTERNAL_IP,
        SVC_NODEPORT,
    },
};

use crate::{
    ct,
    fib::Route,
    frame::Frame,
    lb, local,
    nat::End,
    packet::{IPPROTO_TCP, IPPROTO_UDP, Ipv4Info, TCP_ACK, TCP_SYN},
    policy,
};

/// What the hook does with the packet.
pub enum Verdict {
    /// Let the kernel carry on (translated or not).
    Pass,
    /// Sent back out of the interface it came in on (`bpf_redirect` was called; return its
    /// result).
    Redirected(i32),
    /// Drop, with this reason.
    Drop(DropReason),
    /// The connection was rejected: the packet now is the rejection and was redirected. Counted
    /// as a drop of the original with [`DropReason::ServiceNoBackend`].
    Rejected(i32),
}

/// The verdict of a [`local::deliver`] attempt.
#[inline(always)]
fn delivered(r: Result<Option<i32>, ()>) -> Verdict {
    match r {
        Ok(r) => r.map_or(Verdict::Pass, Verdict::Redirected),
        Err(()) => Verdict::Drop(DropReason::PolicyDenied),
    }
}

/// The addresses a routed entry's packets carry once translated (`CT_ROUTE`: the program
/// routes them itself), else `None`.
#[inline(always)]
fn routed(info: &Ipv4Info, e: &CtEntry) -> Option<(u32, u32)> {
    if e.flags & CT_ROUTE == 0 || e.flags & CT_HAIRPIN != 0 {
        return None;
    }
    Some(if e.flags & CT_REPLY != 0 {
        (
            e.from_addr,
            if e.to_addr != 0 {
                e.to_addr
            } else {
                info.daddr
            },
        )
    } else {
        (
            if e.from_addr != 0 {
                e.from_addr
            } else {
                info.saddr
            },
            e.to_addr,
        )
    })
}

/// Where the packet goes once `e` is applied (looked up before it is rewritten).
#[inline(always)]
fn plan<F: Frame>(ctx: &F, info: &Ipv4Info, e: &CtEntry) -> Route {
    match routed(info, e) {
        Some((src, dst)) => ctx.route(src, dst),
        None => Route::None,
    }
}

/// Whether a hook that is not [`Frame::FULL`] (XDP) can take the flow: only when it can send
/// the packet straight back out of the interface it arrived on.
#[inline(always)]
fn takes<F: Frame>(ctx: &F, route: &Route) -> bool {
    F::FULL || matches!(route, Route::Known { ifindex, .. } if *ifindex == ctx.ifindex())
}

/// Applies a tracked entry to the packet, then sends it along `route` if it has one.
#[inline(always)]
fn apply<F: Frame>(ctx: &F, info: &Ipv4Info, e: &CtEntry, route: Route) -> Result<Verdict, ()> {
    if e.flags & CT_REPLY != 0 {
        ctx.rewrite(info, End::Source, e.from_addr, e.from_port)?;
        if e.to_addr != 0 {
            ctx.rewrite(info, End::Destination, e.to_addr, e.to_port)?;
        }
    } else {
        // The destination first: `rewrite` reads the old values from `info`, which still
        // describes the packet as it arrived.
        ctx.rewrite(info, End::Destination, e.to_addr, e.to_port)?;
        if e.from_addr != 0 {
            ctx.rewrite(info, End::Source, e.from_addr, e.from_port)?;
        }
    }
    if e.flags & CT_HAIRPIN != 0 {
        return Ok(Verdict::Redirected(ctx.send_back()?));
    }
    match ctx.send(&route) {
        Some(r) => Ok(Verdict::Redirected(r)),
        // A hook that is not FULL only applies entries it can send (see `takes`): failing
        // now means the frame could not be written, and a rewritten packet must not go on.
        None if !F::FULL => Err(()),
        None => Ok(Verdict::Pass),
    }
}

/// Whether a packet found a tracked entry it should follow. A SYN on a closing forward entry is
/// a new connection reusing the tuple; a SYN or a UDP datagram whose backend was removed from
/// the Service (kube-proxy flushes UDP conntrack for this) chooses again.
#[inline(always)]
fn keep_tracked(entry: &CtEntry, info: &Ipv4Info, new_syn: bool) -> bool {
    if entry.flags & CT_REPLY != 0 {
        return true;
    }
    if new_syn && entry.flags & CT_CLOSING != 0 {
        return false;
    }
    if new_syn || info.proto == IPPROTO_UDP {
        return lb::backend_is(entry.backend_id, entry.to_addr, entry.to_port);
    }
    true
}

/// The packet's tuple, and whether it opens a TCP connection.
#[inline(always)]
fn tuple(info: &Ipv4Info) -> (CtKey, bool) {
    let key = CtKey::new(info.saddr, info.daddr, info.sport, info.dport, info.proto);
    let new_syn = info.proto == IPPROTO_TCP && info.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    (key, new_syn)
}

/// Translates a packet of a tracked flow as its entry says; `None` when the packet starts (or
/// restarts) a flow.
#[inline(always)]
fn tracked<F: Frame>(
    ctx: &F,
    info: &Ipv4Info,
    key: &CtKey,
    new_syn: bool,
    now: u64,
) -> Option<Result<Verdict, ()>> {
    let e = ct::lookup(key, now)?;
    // SAFETY: pointer from a successful lookup, valid for this run.
    let entry = unsafe { *e };
    if !keep_tracked(&entry, info, new_syn) {
        return None;
    }
    let route = plan(ctx, info, &entry);
    if !takes(ctx, &route) {
        // Left untouched for TC, which counts it.
        return Some(Ok(Verdict::Pass));
    }
    ct::touch(key, e, info.proto, info.tcp_flags, now);
    lb::count(entry.service_id, ctx.len());
    Some(apply(ctx, info, &entry, route))
}

/// A backend of `fe` for a new connection; with none, the packet becomes its rejection and is
/// sent back (`Err` carries the verdict to return; a hook that cannot reject passes it on).
#[inline(always)]
fn choose<F: Frame>(
    ctx: &F,
    info: &Ipv4Info,
    fe: &lb::Frontend,
    now: u64,
) -> Result<(u32, skiff_ebpf_common::lb::Backend), Verdict> {
    match lb::select(fe, info.saddr, now) {
        Ok(b) => Ok(b),
        Err(DropReason::ServiceNoBackend) if !F::FULL => Err(Verdict::Pass),
        Err(DropReason::ServiceNoBackend) => match ctx.reject(info) {
            Ok(r) => Err(Verdict::Rejected(r)),
            Err(()) => Err(Verdict::Drop(DropReason::ServiceNoBackend)),
        },
        Err(reason) => Err(Verdict::Drop(reason)),
    }
}

/// A packet leaving a pod.
#[inline(always)]
pub fn from_pod(ctx: &TcContext, info: &Ipv4Info) -> Verdict {
    match from_pod_inner(ctx, info) {
        Ok(Verdict::Pass) => {
            let Some(dest) = policy::current_destination(ctx, info) else {
                return Verdict::Pass;
            };
            // Policy sees the packet as translated: it applies to the backend.
            if let Some(ep) = local::endpoint(info.saddr)
                && !policy::egress(&ep, info, dest, Hook::FromPod)
            {
                return Verdict::Drop(DropReason::PolicyDenied);
            }
            delivered(local::deliver(ctx, info, dest, Hook::FromPod))
        }
        Ok(Verdict::Rejected(r)) => {
            // The rejection (RST, ICMP unreachable from the frontend) comes back to the pod
            // through `to-pod`: an ingress-isolated client gets it as the answer to its own
            // attempt.
            if let Some(ep) = local::endpoint(info.saddr) {
                policy::expect_answer(&ep, info);
            }
            Verdict::Rejected(r)
        }
        Ok(v) => v,
        // A helper refused to rewrite the packet: it is no longer what its headers say.
        Err(()) => Verdict::Drop(DropReason::MalformedL4),
    }
}

#[inline(always)]
fn from_pod_inner(ctx: &TcContext, info: &Ipv4Info) -> Result<Verdict, ()> {
    let now = ct::now();
    let (key, new_syn) = tuple(info);
    if let Some(v) = tracked(ctx, info, &key, new_syn, now) {
        return v;
    }
    let Some(fe) = lb::frontend(info.daddr, info.dport, info.proto, true) else {
        return Ok(Verdict::Pass);
    };
    let (backend_id, be) = match choose(ctx, info, &fe, now) {
        Ok(b) => b,
        Err(v) => return Ok(v),
    };
    let hairpin = be.address == info.saddr;
    let (src, sport) = if hairpin {
        (u32::from_ne_bytes(HAIRPIN_ADDR), info.sport)
    } else {
        (info.saddr, info.sport)
    };
    let expires = now + ct::lifetime(info.proto);
    let flags = if hairpin { CT_HAIRPIN } else { 0 };
    // Replies from a NodePort (or an external IP the node holds) carry a local address as
    // source.
    let reply_route = if fe.svc.flags & (SVC_NODEPORT | SVC_EXTERNAL_IP) != 0 {
        CT_ROUTE
    } else {
        0
    };
    let fwd = CtEntry {
        expires,
        to_addr: be.address,
        to_port: be.port,
        from_addr: if hairpin { src } else { 0 },
        from_port: if hairpin { sport } else { 0 },
        service_id: fe.svc.service_id,
        backend_id,
        flags,
        pad: 0,
    };
    let rev_key = CtKey::new(be.address, src, be.port, sport, info.proto);
    let rev = CtEntry {
        expires,
        from_addr: info.daddr,
        from_port: info.dport,
        to_addr: if hairpin { info.saddr } else { 0 },
        to_port: if hairpin { info.sport } else { 0 },
        service_id: fe.svc.service_id,
        backend_id,
        flags: flags | CT_REPLY | reply_route,
        pad: 0,
    };
    if ct::create(&key, &fwd, &rev_key, &rev).is_err() {
        return Ok(Verdict::Drop(DropReason::CtCreateFailed));
    }
    lb::count(fe.svc.service_id, ctx.len());
    apply(ctx, info, &fwd, plan(ctx, info, &fwd))
}

/// A packet arriving from the network on the node's uplink: NodePort and external-IP traffic
/// from outside the cluster, and replies to it from backends on other nodes.
///
/// A new connection to a backend on this node is only destination-translated (its reply
/// meets `from-pod` on the backend's interface). One to a backend elsewhere is also
/// source-translated to the node's address (externalTrafficPolicy=Cluster, as kube-proxy
/// masquerades), so the reply comes back here; both are then routed by the program.
#[inline(always)]
pub fn from_netdev(ctx: &TcContext, info: &Ipv4Info) -> Verdict {
    match from_netdev_inner(ctx, info) {
        Ok(Verdict::Pass) => match policy::current_destination(ctx, info) {
            Some(dest) => delivered(local::deliver(ctx, info, dest, Hook::FromNetdev)),
            None => Verdict::Pass,
        },
        Ok(v) => v,
        Err(()) => Verdict::Drop(DropReason::MalformedL4),
    }
}

/// The NodePort fast path at XDP on the uplink, before the kernel allocates an skb: what
/// [`from_netdev`] does for flows to a backend on another node (new connections, their
/// packets, and the replies coming back), when the packet leaves again through the interface
/// it arrived on. Everything else — local backends, rejections, unresolved neighbours — is
/// passed on untouched to TC.
#[inline(always)]
pub fn xdp_nodeport(ctx: &XdpContext, info: &Ipv4Info) -> Verdict {
    // Off unless the agent turned it on (every uplink in native XDP: generic XDP cannot tell
    // a CHECKSUM_PARTIAL skb, whose checksum field is only a seed, from a complete one).
    if lb::config_flags() & CFG_XDP_FAST_PATH == 0 {
        return Verdict::Pass;
    }
    from_netdev_inner(ctx, info).unwrap_or(Verdict::Drop(DropReason::MalformedL4))
}

#[inline(always)]
fn from_netdev_inner<F: Frame>(ctx: &F, info: &Ipv4Info) -> Result<Verdict, ()> {
    let now = ct::now();
    let (key, new_syn) = tuple(info);
    if let Some(v) = tracked(ctx, info, &key, new_syn, now) {
        return v;
    }
    let Some(fe) = lb::frontend(info.daddr, info.dport, info.proto, false) else {
        return Ok(Verdict::Pass);
    };
    // ClusterIPs are not reachable from outside.
    if fe.svc.flags & (SVC_NODEPORT | SVC_EXTERNAL_IP) == 0 {
        return Ok(Verdict::Pass);
    }
    let (backend_id, be) = match choose(ctx, info, &fe, now) {
        Ok(b) => b,
        Err(v) => return Ok(v),
    };
    let expires = now + ct::lifetime(info.proto);
    let local = be.flags & BE_LOCAL != 0;
    if local && !F::FULL {
        // Delivered into a pod: TC's job.
        return Ok(Verdict::Pass);
    }
    let (snat, nat_port) = if local {
        (0, 0)
    } else {
        let node = lb::node_addr();
        let addr = if node != 0 { node } else { info.daddr };
        match nat_port(addr, &be, info, now) {
            Some(port) => (addr, port),
            // XDP leaves it to TC, which counts the drop.
            None if !F::FULL => return Ok(Verdict::Pass),
            None => return Ok(Verdict::Drop(DropReason::CtCreateFailed)),
        }
    };
    let src = if local { info.saddr } else { snat };
    let sport = if local { info.sport } else { nat_port };
    let fwd = CtEntry {
        expires,
        to_addr: be.address,
        to_port: be.port,
        from_addr: snat,
        from_port: nat_port,
        service_id: fe.svc.service_id,
        backend_id,
        flags: if local { 0 } else { CT_ROUTE },
        pad: 0,
    };
    let rev_key = CtKey::new(be.address, src, be.port, sport, info.proto);
    let rev = CtEntry {
        expires,
        from_addr: info.daddr,
        from_port: info.dport,
        to_addr: if local { 0 } else { info.saddr },
        to_port: if local { 0 } else { info.sport },
        service_id: fe.svc.service_id,
        backend_id,
        flags: CT_REPLY | CT_ROUTE,
        pad: 0,
    };
    let route = plan(ctx, info, &fwd);
    if !takes(ctx, &route) {
        return Ok(Verdict::Pass);
    }
    if ct::create(&key, &fwd, &rev_key, &rev).is_err() {
        return Ok(Verdict::Drop(DropReason::CtCreateFailed));
    }
    lb::count(fe.svc.service_id, ctx.len());
    apply(ctx, info, &fwd, route)
}

/// A source port for a flow source-translated to `addr` towards `be`: a random one in the NAT
/// range (above the node's own ephemeral ports) that no live tracked flow uses; a few tries.
#[inline(always)]
fn nat_port(
    addr: u32,
    be: &skiff_ebpf_common::lb::Backend,
    info: &Ipv4Info,
    now: u64,
) -> Option<u16> {
    let span = (NAT_PORT_MAX - NAT_PORT_MIN) as u32 + 1;
    for _ in 0..5 {
        // SAFETY: a helper without arguments.
        let r = unsafe { aya_ebpf::helpers::bpf_get_prandom_u32() };
        let port = (NAT_PORT_MIN + (r % span) as u16).to_be();
        let k = CtKey::new(be.address, addr, be.port, port, info.proto);
        if ct::lookup(&k, now).is_none() {
            return Some(port);
        }
    }
    None
}
/// A packet about to enter a pod: replies of flows translated on this node get their source
/// (and, if it was translated, destination) restored.
#[inline(always)]
pub fn to_pod(ctx: &TcContext, info: &Ipv4Info) -> Verdict {
    // Policy sees the packet as it arrives (a reply before its source is restored: the
    // connection as the pod opened it, after translation).
    if let Some(ep) = local::endpoint(info.daddr)
        && !policy::ingress(&ep, info, (info.daddr, info.dport), Hook::ToPod)
    {
        return Verdict::Drop(DropReason::PolicyDenied);
    }
    let now = ct::now();
    let key = CtKey::new(info.saddr, info.daddr, info.sport, info.dport, info.proto);
    let Some(e) = ct::lookup(&key, now) else {
        return Verdict::Pass;
    };
    // SAFETY: pointer from a successful lookup, valid for this run.
    let entry = unsafe { *e };
    if entry.flags & CT_REPLY == 0 {
        return Verdict::Pass;
    }
    ct::touch(&key, e, info.proto, info.tcp_flags, now);
    lb::count(entry.service_id, ctx.len());
    match apply(ctx, info, &entry, plan(ctx, info, &entry)) {
        Ok(v) => v,
        Err(()) => Verdict::Drop(DropReason::MalformedL4),
    }
}
