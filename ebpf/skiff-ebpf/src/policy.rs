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
        CIDR_MAX_ENTRIES, DIR_EGRESS, DIR_INGRESS, EP_AUDIT, EP_EGRESS_ISOLATED, EP_ID_SHIFT,
        EP_INGRESS_ISOLATED, FLOWS_RING_BYTES, FlowEvent, IDENTITY_ANY, IDENTITY_HOST,
        IDENTITY_WORLD, IPCACHE_MAX_ENTRIES, IpcacheValue, PCT_MAX_ENTRIES, POLICY_MAX_ENTRIES,
        PREFIX_FULL, PctEntry, PctKey, PolicyKey, PolicyValue, VERDICT_ALLOWED, VERDICT_AUDIT,
        VERDICT_DROPPED,
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

/// Flow events `FLOWS` had no room for.
#[btf_map(name = "skiff_flows_lost")]
pub static FLOWS_LOST: PerCpuArray<u64, 1> = PerCpuArray::new();

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
    let key = PctKey {
        endpoint_addr: c.ep_addr,
        peer_addr: c.peer_addr,
        endpoint_port: c.ep_port,
        peer_port: c.peer_port,
        proto: c.proto,
        pad: [0; 3],
    };
    let now = ct::now();
    if let Some(e) = PCT.get_ptr_mut(&key) {
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
        // A full ring loses the event (counted), never the packet.
        if FLOWS.output(&ev, 0).is_err()
            && let Some(lost) = FLOWS_LOST.get_ptr_mut(0)
        {
            // SAFETY: a pointer into this CPU's slot from a successful lookup; only this CPU
            // writes it.
            unsafe { *lost += 1 };
        }
        if verdict == VERDICT_DROPPED {
            return false;
        }
    }
    let entry = PctEntry {
        expires: now + ct::lifetime(c.proto),
        policy,
        direction: c.direction,
        pad: [0; 3],
    };
    // Not tracked (map refused): the next packet is decided again, the same way.
    let _ = PCT.insert(&key, &entry, 0);
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
    check(ep, &c, hook)
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
    check(ep, &c, hook)
}

/// Policy for the packets the service stages do not take — ICMP, SCTP and other protocols —
/// on their way out of a pod (`from-pod`: the sender's egress) and into one (`to-pod`: the
/// receiver's ingress; these are never delivered past it). Only a rule allowing every
/// protocol matches ICMP and protocols without ports; SCTP ports match SCTP rules; an ICMP
/// echo is tracked by its identifier, so its reply passes. Later fragments (the first one was
/// judged; without it nothing reassembles) and ICMP errors pass.
#[inline(always)]
pub fn portless(info: &Ipv4Info, hook: Hook) -> Verdict {
    if info.later_fragment || info.icmp_error {
        return Verdict::Pass;
    }
    let dest = (info.daddr, info.dport);
    let allowed = match hook {
        Hook::FromPod => match local::endpoint(info.saddr) {
            Some(ep) => egress(&ep, info, dest, hook),
            None => true,
        },
        Hook::ToPod => match local::endpoint(info.daddr) {
            Some(ep) => ingress(&ep, info, dest, hook),
            None => true,
        },
        _ => true,
    };
    if allowed {
        Verdict::Pass
    } else {
        Verdict::Drop(DropReason::PolicyDenied)
    }
}
