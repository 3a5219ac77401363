//! Same-node delivery: a packet for a pod of this node is handed straight to that pod's
//! interface (`bpf_redirect_peer` into the veth's peer), instead of crossing the node's IP
//! stack — routing, forwarding, the host-side veth's transmit queue and a second softirq pass.
//! The pods are the agent's `skiff_endpoints` entries (layout in `skiff_ebpf_common::endpoint`).
//!
//! Only TC ingress can redirect to a peer, so this serves `from-pod` (pod to pod, and replies
//! of translated flows) and `from-netdev` (from other nodes). What arrives this way skips the
//! destination veth's egress hook (`to-pod`): it carries nothing `to-pod` would change, since
//! replies were already restored by the hook that delivers them.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC, btf_maps::HashMap, helpers::bpf_redirect_peer, macros::btf_map,
    programs::TcContext,
};
use skiff_ebpf_common::endpoint::{ENDPOINTS_MAX_ENTRIES, EndpointInfo};

use skiff_ebpf_common::Hook;

use crate::{
    frame::{tc_hop, tc_set_macs},
    packet::Ipv4Info,
};

/// Pods of this node by IPv4 address (network order).
#[btf_map(name = "skiff_endpoints")]
pub static ENDPOINTS: HashMap<
    u32,
    EndpointInfo,
    { ENDPOINTS_MAX_ENTRIES as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// Each pod interface's address (ifindex → IPv4, network order), for [`source_is_pod`].
#[btf_map(name = "skiff_ifaces")]
pub static IFACES: HashMap<
    u32,
    u32,
    { ENDPOINTS_MAX_ENTRIES as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// Whether a packet leaving a pod through interface `ifindex` carries the pod's own source
/// address (an interface the agent has not recorded yet passes). Without it, a pod could
/// claim another's address and with it the other's identity before policy.
#[inline(always)]
pub fn source_is_pod(ifindex: u32, info: &Ipv4Info) -> bool {
    // SAFETY: a value pointer from a successful lookup, read at once.
    match unsafe { IFACES.get(&ifindex) } {
        Some(addr) => *addr == info.saddr,
        None => true,
    }
}

/// The pod of this node at `addr` (network order), if any.
#[inline(always)]
pub fn endpoint(addr: u32) -> Option<EndpointInfo> {
    // SAFETY: a value pointer from a successful lookup, read at once.
    unsafe { ENDPOINTS.get(&addr) }.copied()
}

/// Delivers the packet to the pod of this node it is addressed to (`dest`: its destination
/// after any translation), once that pod's ingress policy lets it in (the delivery skips
/// `to-pod`, where it is checked otherwise): the frame's MACs as the pod's gateway sets them,
/// the TTL decremented as by a router hop, then `bpf_redirect_peer`. `Ok(None)` when the
/// destination is not a pod of this node, or its TTL is spent (the kernel then answers "time
/// exceeded"); `Err` when the policy drops the packet.
#[inline(always)]
pub fn deliver(
    ctx: &TcContext,
    info: &Ipv4Info,
    dest: (u32, u16),
    hook: Hook,
) -> Result<Option<i32>, ()> {
    let Some(ep) = endpoint(dest.0) else {
        return Ok(None);
    };
    if !crate::policy::ingress(&ep, info, dest, hook) {
        return Err(());
    }
    Ok(redirect(ctx, &ep))
}

#[inline(always)]
fn redirect(ctx: &TcContext, ep: &EndpointInfo) -> Option<i32> {
    tc_hop(ctx)?;
    tc_set_macs(ctx, &ep.mac, &ep.node_mac)?;
    // SAFETY: a helper taking plain integers.
    Some(unsafe { bpf_redirect_peer(ep.ifindex, 0) } as i32)
}
