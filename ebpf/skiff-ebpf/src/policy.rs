//! NetworkPolicy enforcement on new connections of isolated endpoints (layouts and lookup
//! rules in `skiff_ebpf_common::policy`).
//!
//! [`egress`] is called by `from-pod` for the sending pod (after service translation: policy
//! applies to the backend), [`ingress`] by `to-pod` for the receiving pod and by whichever hook
//! delivers to a pod of this node straight into it (`bpf_redirect_peer` skips `to-pod`). A connection
//! already in `skiff_pct` passes — replies included, since the key is the endpoint's view —;
//! a new one is looked up by the peer's identity, its CIDR identity and "any peer", and on
//! allow (or audit) is tracked. The node itself may always reach its pods (probes).

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::{LpmTrie, LruHashMap, PerCpuArray, RingBuf, lpm_trie::Key},
    macros::btf_map,
};
use skiff_ebpf_common::{
    DropReason, Hook,
    endpoint::EndpointInfo,
    policy::{
        CIDR_MAX_ENTRIES, DIR_EGRESS, DIR_INGRESS, DROP_EVENTS_BURST, DROP_EVENTS_PER_SEC,
        EP_AUDIT, EP_EGRESS_ISOLATED, EP_ID_SHIFT, EP_INGRESS_ISOLATED, FLOWS_RING_BYTES,
        FRAG_LIFETIME_NS, FRAGS_MAX_ENTRIES, FlowEvent, FragKey, IDENTITY_ANY, IDENTITY_HOST,
        IDENTITY_WORLD, IPCACHE_MAX_ENTRIES, IpcacheValue, LOST_RATE_LIMITED, LOST_RING_FULL,
        PCT_MAX_ENTRIES, POLICY_MAX_ENTRIES, PREFIX_FULL, PctEntry, PctKey, PolicyKey, PolicyValue,
        TokenBucket, VERDICT_ALLOWED, VERDICT_AUDIT, VERDICT_DROPPED,
    },
};

use aya_ebpf::programs::TcContext;

use crate::{ct, local, nat::IP_DADDR_OFF, packet::Ipv4Info, service::Verdict};

/// Identities by address: pods (/32) and nodes.
#[btf_map(name = "skiff_ipcache")]
pub static IPCACHE: LpmTrie<
    [u8; 4],
    IpcacheValue,
    { IPCACHE_MAX_ENTRIES as usize },
    { BPF_F_NO_PREALLOC as usize },
> = LpmTrie::new();

/// Node-local identities of the policies' `ipBlock` prefixes.
#[btf_map(name = "skiff_cidr")]
pub static CIDR: LpmTrie<
    [u8; 4],
    IpcacheValue,
    { CIDR_MAX_ENTRIES as usize },
    { BPF_F_NO_PREALLOC as usize },
> = LpmTrie::new();

/// What each endpoint of this node allows.
#[btf_map(name = "skiff_policy")]
pub static POLICY: LpmTrie<
    PolicyKey,
    PolicyValue,
    { POLICY_MAX_ENTRIES as usize },
    { BPF_F_NO_PREALLOC as usize },
> = LpmTrie::new();

/// Connections of isolated endpoints.
#[btf_map(name = "skiff_pct")]
pub static PCT: LruHashMap<PctKey, PctEntry, { PCT_MAX_ENTRIES as usize }> = LruHashMap::new();

/// New connections decided by policy, for the agent's flow log.
#[btf_map(name = "skiff_flows")]
pub static FLOWS: RingBuf<FlowEvent, { FLOWS_RING_BYTES as usize }> = RingBuf::new();

/// Flow events not written: `FLOWS` had no room, or the CPU's drop-event budget was spent.
#[btf_map(name = "skiff_flows_lost")]
pub static FLOWS_LOST: PerCpuArray<u64, 2> = PerCpuArray::new();

/// Each CPU's drop-event budget.
#[btf_map(name = "skiff_flow_rate")]
pub static FLOW_RATE: PerCpuArray<TokenBucket, 1> = PerCpuArray::new();

/// Fragmented datagrams whose first fragment policy allowed.
#[btf_map(name = "skiff_frags")]
pub static FRAGS: LruHashMap<FragKey, u64, { FRAGS_MAX_ENTRIES as usize }> = LruHashMap::new();

#[inline(always)]
fn lost(slot: u32) {
    if let Some(n) = FLOWS_LOST.get_ptr_mut(slot) {
        // SAFETY: a pointer into this CPU's slot from a successful lookup; only this CPU
        // writes it.
        unsafe { *n += 1 };
    }
}

/// Whether this CPU may write one more drop event now (a token bucket refilled at
/// `DROP_EVENTS_PER_SEC`).
#[inline(always)]
fn drop_event_budget(now: u64) -> bool {
    let Some(b) = FLOW_RATE.get_ptr_mut(0) else {
        return true;
    };
    // SAFETY: a pointer into this CPU's slot from a successful lookup; only this CPU uses
    // it, and a program run is not preempted by another on the same CPU.
    let b = unsafe { &mut *b };
    let per_token = 1_000_000_000 / DROP_EVENTS_PER_SEC;
    let earned = now.saturating_sub(b.last_ns) / per_token;
    if earned > 0 {
        b.tokens = if b.tokens + earned > DROP_EVENTS_BURST {
            DROP_EVENTS_BURST
        } else {
            b.tokens + earned
        };
        b.last_ns += earned * per_token;
    }
    if b.tokens == 0 {
        return false;
    }
    b.tokens -= 1;
    true
}

/// A connection as an endpoint sees it.
pub struct Conn {
    /// The endpoint's address and port (network order).
    pub ep_addr: u32,
    pub ep_port: u16,
    /// The peer's.
    pub peer_addr: u32,
    pub peer_port: u16,
    pub proto: u8,
    /// [`DIR_INGRESS`] (to the endpoint) or `DIR_EGRESS`.
    pub direction: u8,
}

#[inline(always)]
fn ipcache_identity(addr: u32) -> Option<u32> {
    let key = Key::new(32, addr.to_ne_bytes());
    IPCACHE.get(&key).map(|v| v.identity)
}

#[inline(always)]
fn cidr_identity(addr: u32) -> Option<u32> {
    let key = Key::new(32, addr.to_ne_bytes());
    CIDR.get(&key).map(|v| v.identity)
}

#[inline(always)]
fn allowed_by(endpoint: u16, c: &Conn, identity: u32) -> Option<u32> {
    let data = PolicyKey::lookup(
        endpoint,
        c.direction,
        identity,
        c.proto,
        u16::from_be(c.peer_port_or_ep()),
    );
    POLICY.get(&Key::new(PREFIX_FULL, data)).map(|v| v.policy)
}

impl Conn {
    /// Its `skiff_pct` key (the endpoint's view: both directions find it).
    #[inline(always)]
    fn key(&self) -> PctKey {
        PctKey {
            endpoint_addr: self.ep_addr,
            peer_addr: self.peer_addr,
            endpoint_port: self.ep_port,
            peer_port: self.peer_port,
            proto: self.proto,
            pad: [0; 3],
        }
    }

    /// Tracks it in `skiff_pct`, attributed to `policy` (0: no policy decided).
    #[inline(always)]
    fn track(&self, policy: u32, now: u64) {
        let entry = PctEntry {
            expires: now + ct::lifetime(self.proto),
            policy,
            direction: self.direction,
            pad: [0; 3],
        };
        // Not tracked (map refused): the next packet is decided again, the same way.
        let _ = PCT.insert(&self.key(), &entry, 0);
    }

    /// Whether `skiff_pct` holds it, live.
    #[inline(always)]
    fn tracked(&self, now: u64) -> bool {
        // SAFETY: a value pointer from a successful lookup, read at once.
        match unsafe { PCT.get(&self.key()) } {
            Some(e) => e.expires >= now,
            None => false,
        }
    }

    /// The port a rule names: the endpoint's for ingress, the peer's for egress.
    #[inline(always)]
    fn peer_port_or_ep(&self) -> u16 {
        if self.direction == DIR_INGRESS {
            self.ep_port
        } else {
            self.peer_port
        }
    }
}

/// Whether the connection may pass for endpoint `ep` (isolated in some direction); records
/// new decisions.
#[inline(always)]
pub fn check(ep: &EndpointInfo, c: &Conn, hook: Hook) -> bool {
    let flags = ep.flags;
    let now = ct::now();
    if let Some(e) = PCT.get_ptr_mut(&c.key()) {
        // SAFETY: a pointer from a successful lookup, valid for this run.
        if unsafe { (*e).expires } >= now {
            // SAFETY: as above; a plain store (a racing writer only moves it too).
            unsafe { (*e).expires = now + ct::lifetime(c.proto) };
            return true;
        }
    }
    let isolated_here = if c.direction == DIR_INGRESS {
        flags & EP_INGRESS_ISOLATED != 0
    } else {
        flags & EP_EGRESS_ISOLATED != 0
    };
    let endpoint = (flags >> EP_ID_SHIFT) as u16;
    let peer = ipcache_identity(c.peer_addr).unwrap_or(IDENTITY_WORLD);
    let (mut allowed, mut policy, mut decided_by) = (!isolated_here, 0, peer);
    if isolated_here {
        if c.direction == DIR_INGRESS && peer == IDENTITY_HOST {
            allowed = true;
        } else if let Some(p) = allowed_by(endpoint, c, peer) {
            (allowed, policy) = (true, p);
        } else if let Some(cidr) = cidr_identity(c.peer_addr) {
            if let Some(p) = allowed_by(endpoint, c, cidr) {
                (allowed, policy, decided_by) = (true, p, cidr);
            }
        }
        if !allowed && let Some(p) = allowed_by(endpoint, c, IDENTITY_ANY) {
            (allowed, policy) = (true, p);
        }
        let verdict = if allowed {
            VERDICT_ALLOWED
        } else if flags & EP_AUDIT != 0 {
            VERDICT_AUDIT
        } else {
            VERDICT_DROPPED
        };
        let (saddr, daddr, sport, dport) = if c.direction == DIR_INGRESS {
            (c.peer_addr, c.ep_addr, c.peer_port, c.ep_port)
        } else {
            (c.ep_addr, c.peer_addr, c.ep_port, c.peer_port)
        };
        let ev = FlowEvent {
            ts_ns: now,
            saddr: saddr.to_ne_bytes(),
            daddr: daddr.to_ne_bytes(),
            sport: u16::from_be(sport),
            dport: u16::from_be(dport),
            peer_identity: decided_by,
            policy,
            endpoint,
            proto: c.proto,
            direction: c.direction,
            verdict,
            hook: hook as u8,
            pad: [0; 2],
        };
        // A full ring or a spent budget loses the event (counted), never the packet.
        if verdict == VERDICT_DROPPED && !drop_event_budget(now) {
            lost(LOST_RATE_LIMITED);
        } else if FLOWS.output(&ev, 0).is_err() {
            lost(LOST_RING_FULL);
        }
        if verdict == VERDICT_DROPPED {
            return false;
        }
    }
    c.track(policy, now);
    true
}

/// The packet's destination address and port as they are now (network order): after a
/// forward translation, the backend.
#[inline(always)]
pub fn current_destination(ctx: &TcContext, info: &Ipv4Info) -> Option<(u32, u16)> {
    let daddr: u32 = ctx.load(IP_DADDR_OFF).ok()?;
    let dport: u16 = ctx.load(info.l4_off + 2).ok()?;
    Some((daddr, dport))
}

// Policy sees each end of a connection by its real address: the sender as the packet arrived
// (`info`: a reply's source is restored to the frontend on the way), the receiver as the
// packet is now addressed (`dest`: a forward packet's destination is translated to the
// backend). Both directions of a connection then find the same `skiff_pct` entry.

#[inline(always)]
fn isolated(ep: &EndpointInfo) -> bool {
    ep.flags & (EP_INGRESS_ISOLATED | EP_EGRESS_ISOLATED) != 0
}

/// The sending pod's (`ep`) egress policy; false: drop.
#[inline(always)]
pub fn egress(ep: &EndpointInfo, info: &Ipv4Info, dest: (u32, u16), hook: Hook) -> bool {
    if !isolated(ep) {
        return true;
    }
    let c = Conn {
        ep_addr: info.saddr,
        ep_port: info.sport,
        peer_addr: dest.0,
        peer_port: dest.1,
        proto: info.proto,
        direction: DIR_EGRESS,
    };
    allowed_datagram(info, check(ep, &c, hook))
}

/// The receiving pod's (`ep`, at `dest`) ingress policy; false: drop.
#[inline(always)]
pub fn ingress(ep: &EndpointInfo, info: &Ipv4Info, dest: (u32, u16), hook: Hook) -> bool {
    if !isolated(ep) {
        return true;
    }
    let c = Conn {
        ep_addr: dest.0,
        ep_port: dest.1,
        peer_addr: info.saddr,
        peer_port: info.sport,
        proto: info.proto,
        direction: DIR_INGRESS,
    };
    allowed_datagram(info, check(ep, &c, hook))
}

/// The data path answers `info` itself (a rejection from a Service frontend with no
/// endpoint): the sending endpoint `ep` gets the answer through its ingress even when
/// isolated — its own attempt is tracked as a connection, without a policy decision.
#[inline(always)]
pub fn expect_answer(ep: &EndpointInfo, info: &Ipv4Info) {
    if ep.flags & EP_INGRESS_ISOLATED == 0 {
        return;
    }
    Conn {
        ep_addr: info.saddr,
        ep_port: info.sport,
        peer_addr: info.daddr,
        peer_port: info.dport,
        proto: info.proto,
        direction: DIR_EGRESS,
    }
    .track(0, ct::now());
}

#[inline(always)]
fn frag_key(info: &Ipv4Info) -> FragKey {
    FragKey {
        saddr: info.saddr,
        daddr: info.daddr,
        id: info.ip_id,
        proto: info.proto,
        pad: 0,
    }
}

/// Passes `allowed` on; an allowed first fragment lets its datagram's later fragments pass.
#[inline(always)]
fn allowed_datagram(info: &Ipv4Info, allowed: bool) -> bool {
    if allowed && info.more_fragments && !info.later_fragment {
        let expires = ct::now() + FRAG_LIFETIME_NS;
        // Not recorded (map refused): the later fragments are dropped, the datagram lost.
        let _ = FRAGS.insert(&frag_key(info), &expires, 0);
    }
    allowed
}

/// Whether a later fragment belongs to a datagram whose first fragment was allowed.
#[inline(always)]
fn datagram_allowed(info: &Ipv4Info) -> bool {
    // SAFETY: a value pointer from a successful lookup, read at once.
    match unsafe { FRAGS.get(&frag_key(info)) } {
        Some(expires) => *expires >= ct::now(),
        None => false,
    }
}

/// An ICMP error about a connection `ep` (at `ep_addr`) has in `skiff_pct`: related, passes.
#[inline(always)]
fn related(ep_addr: u32, info: &Ipv4Info) -> bool {
    let q = &info.quoted;
    // The quoted packet went out from the endpoint or came in to it.
    let c = if q.saddr == ep_addr {
        Conn {
            ep_addr: q.saddr,
            ep_port: q.sport,
            peer_addr: q.daddr,
            peer_port: q.dport,
            proto: q.proto,
            direction: DIR_EGRESS,
        }
    } else if q.daddr == ep_addr {
        Conn {
            ep_addr: q.daddr,
            ep_port: q.dport,
            peer_addr: q.saddr,
            peer_port: q.sport,
            proto: q.proto,
            direction: DIR_INGRESS,
        }
    } else {
        // About another endpoint's traffic.
        return false;
    };
    c.tracked(ct::now())
}

/// The endpoint's egress (`from-pod`) or ingress (`to-pod`) decision on a packet.
#[inline(always)]
fn judge(ep: &EndpointInfo, info: &Ipv4Info, dest: (u32, u16), hook: Hook) -> bool {
    if hook == Hook::FromPod {
        egress(ep, info, dest, hook)
    } else {
        ingress(ep, info, dest, hook)
    }
}

/// Policy for the packets the service stages do not take — ICMP, SCTP, other protocols and
/// later fragments — on their way out of a pod (`from-pod`: the sender's egress) and into one
/// (`to-pod`: the receiver's ingress; these are never delivered past it). Only a rule allowing
/// every protocol matches ICMP and protocols without ports; SCTP ports match SCTP rules; an
/// ICMP echo is tracked by its identifier, so its reply passes. An ICMP error passes when the
/// packet it quotes belongs to a connection the endpoint has in `skiff_pct` (else it is judged
/// as a new ICMP flow); a later fragment passes when its datagram's first fragment was allowed
/// (`skiff_frags`).
#[inline(always)]
pub fn portless(info: &Ipv4Info, hook: Hook) -> Verdict {
    let dest = (info.daddr, info.dport);
    let (ep, ep_addr, isolated_bit) = match hook {
        Hook::FromPod => (local::endpoint(info.saddr), info.saddr, EP_EGRESS_ISOLATED),
        Hook::ToPod => (local::endpoint(info.daddr), info.daddr, EP_INGRESS_ISOLATED),
        _ => return Verdict::Pass,
    };
    let Some(ep) = ep else {
        return Verdict::Pass;
    };
    let allowed = if ep.flags & isolated_bit == 0 {
        // Not isolated this way: passes. A new flow is still tracked, so that replies pass the
        // other way; later fragments and ICMP errors are not flows of their own.
        info.later_fragment || info.icmp_error || judge(&ep, info, dest, hook)
    } else if info.later_fragment {
        datagram_allowed(info)
    } else {
        (info.icmp_error && related(ep_addr, info)) || judge(&ep, info, dest, hook)
    };
    if allowed {
        Verdict::Pass
    } else {
        Verdict::Drop(DropReason::PolicyDenied)
    }
}
