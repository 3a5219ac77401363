//! Layout of `skiff_endpoints`, the pods of this node (after Cilium's `lxc` map): pod IPv4
//! address (network order) → [`EndpointInfo`]. The agent writes an entry when it attaches the
//! pod programs to a pod's interface and removes it with the pod's network.
//!
//! The programs use it for same-node delivery: a packet leaving a pod (or arriving on the
//! uplink) for a pod of this node is handed straight to that pod's interface with
//! `bpf_redirect_peer`, skipping the node's IP stack between the two veths.

use crate::assert_size;

/// Capacity of `skiff_endpoints` (pods per node).
pub const ENDPOINTS_MAX_ENTRIES: u32 = 1 << 16;

/// A pod of this node.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointInfo {
    /// Interface index of the pod's host-side veth (in the node's namespace).
    pub ifindex: u32,
    /// Reserved; always zero.
    pub flags: u32,
    /// The pod interface's MAC (a delivered frame's destination).
    pub mac: [u8; 6],
    /// The host-side veth's MAC (a delivered frame's source, the pod's gateway).
    pub node_mac: [u8; 6],
}
assert_size!(EndpointInfo, 20);

#[cfg(feature = "user")]
mod user {
    // SAFETY: a `repr(C)` struct of integers and byte arrays with its size asserted above (no
    // implicit padding): every bit pattern is a valid value, copied byte for byte.
    unsafe impl aya::Pod for super::EndpointInfo {}
}
