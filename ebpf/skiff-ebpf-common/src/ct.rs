//! Layout of `skiff_ct`: skiff's own connection tracking for translated flows (no netfilter
//! conntrack on the service path), an LRU hash with two entries per connection, each keyed by
//! the tuple as that direction's packets carry it when the data path first sees them:
//!
//! - the **forward** entry, keyed by the client's tuple towards the frontend (client → VIP),
//!   says where to send the packet (`to_*`, the backend) and, for hairpin and NodePort flows,
//!   which source to put on it (`from_*`);
//! - the **reply** entry, keyed by the backend's tuple towards the client as it leaves the
//!   backend (backend → client, or → the source-NAT address), says which source to restore
//!   (`from_*`, the frontend) and, when the source was translated, which destination
//!   (`to_*`, the client).
//!
//! An established flow therefore costs one lookup per packet in each direction.

use crate::assert_size;

/// Capacity of `skiff_ct` (an LRU: the least recently used entries make room).
pub const CT_MAX_ENTRIES: u32 = 1 << 17;

/// Entry flag: this is a reply entry.
pub const CT_REPLY: u16 = 1 << 0;
/// Entry flag: the connection is closing (a FIN in both directions, or a RST); the entry
/// expires soon.
pub const CT_CLOSING: u16 = 1 << 1;
/// Entry flag: the flow is a pod reaching itself through a Service (source-NATed to
/// [`crate::lb::HAIRPIN_ADDR`]); its packets are sent straight back out of the interface they
/// came in on.
pub const CT_HAIRPIN: u16 = 1 << 2;
/// Entry flag: after translation the packet carries one of the node's own addresses as its
/// source (NodePort), which the kernel's input path would drop as martian; it is routed by the
/// program instead (FIB lookup, redirect to the egress interface).
pub const CT_ROUTE: u16 = 1 << 3;
/// Entry flag: a FIN was seen in this entry's direction (a half-close: the other direction
/// may go on sending; the connection closes once both have).
pub const CT_FIN: u16 = 1 << 4;

/// Lifetime of a TCP entry while the connection is open (Cilium's default, 6 h).
pub const CT_LIFETIME_TCP_NS: u64 = 21_600 * 1_000_000_000;
/// Lifetime of a TCP entry after a FIN or RST.
pub const CT_LIFETIME_CLOSE_NS: u64 = 10 * 1_000_000_000;
/// Lifetime of a non-TCP entry since its last packet.
pub const CT_LIFETIME_OTHER_NS: u64 = 60 * 1_000_000_000;
/// Expiry is only written back when it would move by more than this (one write per second per
/// busy flow, not one per packet).
pub const CT_REFRESH_NS: u64 = 1_000_000_000;

/// Key of `skiff_ct`: a directional 5-tuple in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtKey {
    /// Source address.
    pub saddr: u32,
    /// Destination address.
    pub daddr: u32,
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// IP protocol number.
    pub proto: u8,
    /// Always zero.
    pub pad: [u8; 3],
}
assert_size!(CtKey, 16);

impl CtKey {
    /// Builds a key with zeroed padding.
    pub const fn new(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8) -> Self {
        CtKey {
            saddr,
            daddr,
            sport,
            dport,
            proto,
            pad: [0; 3],
        }
    }
}

/// Value of `skiff_ct`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtEntry {
    /// When the entry stops matching (`CLOCK_MONOTONIC` ns).
    pub expires: u64,
    /// New destination address (forward: the backend; reply: the client, or 0 to keep).
    pub to_addr: u32,
    /// New source address (forward: the source-NAT address, or 0 to keep; reply: the frontend).
    pub from_addr: u32,
    /// New destination port (with `to_addr`).
    pub to_port: u16,
    /// New source port (with `from_addr`).
    pub from_port: u16,
    /// The frontend's service id.
    pub service_id: u32,
    /// The backend id chosen.
    pub backend_id: u32,
    /// `CT_*` flags.
    pub flags: u16,
    /// Always zero.
    pub pad: u16,
}
assert_size!(CtEntry, 32);

#[cfg(feature = "user")]
mod user {
    // SAFETY: `repr(C)`, integer fields, explicit padding, size asserted (16): no implicit
    // padding, every bit pattern valid.
    unsafe impl aya::Pod for super::CtKey {}
    // SAFETY: `repr(C)`, integer fields, explicit padding, size asserted (32): no implicit
    // padding, every bit pattern valid.
    unsafe impl aya::Pod for super::CtEntry {}
}
