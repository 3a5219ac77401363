//! Layouts of NetworkPolicy enforcement (after Cilium's ipcache and policy maps):
//!
//! - `skiff_ipcache` (LPM trie): address → [`IpcacheValue`] — the security identity of every
//!   pod of the cluster (/32) and of the nodes; an address it does not hold is
//!   [`IDENTITY_WORLD`].
//! - `skiff_cidr` (LPM trie): address → [`IpcacheValue`] — the node-local identity of the
//!   longest `ipBlock` prefix (CIDR or exception) of the policies holding it; the agent tracks
//!   every CIDR and exception, so the longest match decides membership.
//! - `skiff_policy` (LPM trie): [`PolicyKey`] → [`PolicyValue`] — what each endpoint of this
//!   node allows per direction: (endpoint, direction, peer identity, protocol, port prefix);
//!   identity [`IDENTITY_ANY`] stands for every peer, a shorter key for every port or every
//!   protocol. A new connection is allowed when its peer's ipcache identity, its CIDR identity
//!   or `IDENTITY_ANY` has a key.
//! - Whether an endpoint is isolated (and audited) is in its `skiff_endpoints` entry's flags
//!   ([`EP_INGRESS_ISOLATED`], …, with its policy endpoint number in the high 16 bits).
//! - `skiff_flows` (ring buffer): a [`FlowEvent`] per new connection a policy decided (every
//!   packet of a dropped one, at most [`DROP_EVENTS_PER_SEC`] a second per CPU, in bursts of
//!   up to [`DROP_EVENTS_BURST`]: `skiff_flow_rate` holds each CPU's [`TokenBucket`]);
//!   `skiff_flows_lost` (per-CPU array of two `u64`s) counts the events not written:
//!   [`LOST_RING_FULL`], [`LOST_RATE_LIMITED`].
//! - `skiff_frags` (LRU hash): [`FragKey`] → expiry (`u64` ns) — fragmented datagrams of
//!   isolated endpoints whose first fragment policy allowed; their later fragments (no ports)
//!   pass only with an entry.
//!
//! The tries' keys are aya's `lpm_trie::Key` (a prefix length, then the data): the ipcache's
//! data is the address's network-order bytes, the policy map's [`PolicyKey`]. Multi-byte
//! fields of the data are in network byte order, so prefixes are the high bits.

use crate::assert_size;

/// Capacity of `skiff_ipcache`.
pub const IPCACHE_MAX_ENTRIES: u32 = 1 << 18;
/// Capacity of `skiff_cidr`.
pub const CIDR_MAX_ENTRIES: u32 = 1 << 14;
/// Capacity of `skiff_policy`.
pub const POLICY_MAX_ENTRIES: u32 = 1 << 18;
/// Size of `skiff_flows` in bytes (a power of two, a multiple of the page size).
pub const FLOWS_RING_BYTES: u32 = 1 << 20;
/// Drop events written per second per CPU, at most.
pub const DROP_EVENTS_PER_SEC: u64 = 5000;
/// … in bursts of up to this many.
pub const DROP_EVENTS_BURST: u64 = 5000;
/// `skiff_flows_lost` slots.
pub const LOST_RING_FULL: u32 = 0;
pub const LOST_RATE_LIMITED: u32 = 1;
/// Capacity of `skiff_frags`.
pub const FRAGS_MAX_ENTRIES: u32 = 1 << 14;
/// How long a first fragment's verdict covers its datagram (the kernel's reassembly
/// timeout).
pub const FRAG_LIFETIME_NS: u64 = 30_000_000_000;

/// The peer identity that stands for every peer in a [`PolicyKey`].
pub const IDENTITY_ANY: u32 = 0;
/// The node itself.
pub const IDENTITY_HOST: u32 = 1;
/// Anything the ipcache does not hold.
pub const IDENTITY_WORLD: u32 = 2;
/// Another node of the cluster.
pub const IDENTITY_REMOTE_NODE: u32 = 6;
/// The first node-local identity of `ipBlock` prefixes.
pub const IDENTITY_CIDR_FIRST: u32 = 1 << 24;

/// `skiff_endpoints` flags: the endpoint is isolated for ingress.
pub const EP_INGRESS_ISOLATED: u32 = 1 << 0;
/// … for egress.
pub const EP_EGRESS_ISOLATED: u32 = 1 << 1;
/// Its namespace is in audit mode: would-be drops are logged and allowed.
pub const EP_AUDIT: u32 = 1 << 2;
/// The endpoint's policy number is the high 16 bits of the flags.
pub const EP_ID_SHIFT: u32 = 16;

/// [`PolicyKey::direction`]: connections to the endpoint.
pub const DIR_INGRESS: u8 = 0;
/// … from the endpoint.
pub const DIR_EGRESS: u8 = 1;

/// Prefix length covering endpoint, direction, reserved byte and identity.
pub const PREFIX_IDENTITY: u32 = 64;
/// … and the protocol.
pub const PREFIX_PROTO: u32 = 72;
/// … and the reserved byte before the port (a port prefix adds to this).
pub const PREFIX_PORT_BASE: u32 = 80;
/// A whole key.
pub const PREFIX_FULL: u32 = 96;

/// An identity looked up by address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IpcacheValue {
    pub identity: u32,
    /// Reserved; always zero.
    pub flags: u32,
}
assert_size!(IpcacheValue, 8);

/// The data of a `skiff_policy` key (its prefix length travels beside it, in the trie's key).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyKey {
    /// The endpoint's policy number (network order).
    pub endpoint: u16,
    /// [`DIR_INGRESS`] or [`DIR_EGRESS`].
    pub direction: u8,
    /// Reserved; always zero.
    pub pad: u8,
    /// The peer's identity (network order); [`IDENTITY_ANY`]: every peer.
    pub identity: u32,
    /// IP protocol.
    pub proto: u8,
    /// Reserved; always zero.
    pub pad2: u8,
    /// Port (network order).
    pub port: u16,
}
assert_size!(PolicyKey, 12);

impl PolicyKey {
    /// The stored key allowing `identity` through `endpoint` in `direction`, and its prefix
    /// length: every protocol when `proto` is 0, else every port when `port_bits` is 0, else
    /// ports whose first `port_bits` bits are `port`'s.
    pub fn new(
        endpoint: u16,
        direction: u8,
        identity: u32,
        proto: u8,
        port: u16,
        port_bits: u8,
    ) -> (u32, PolicyKey) {
        let port_bits = if port_bits > 16 { 16 } else { port_bits };
        let (prefix_len, proto, port) = if proto == 0 {
            (PREFIX_IDENTITY, 0, 0)
        } else if port_bits == 0 {
            (PREFIX_PROTO, proto, 0)
        } else {
            let mask = u16::MAX << (16 - u32::from(port_bits));
            (PREFIX_PORT_BASE + u32::from(port_bits), proto, port & mask)
        };
        let key = PolicyKey {
            endpoint: endpoint.to_be(),
            direction,
            pad: 0,
            identity: identity.to_be(),
            proto,
            pad2: 0,
            port: port.to_be(),
        };
        (prefix_len, key)
    }

    /// The lookup key of a connection (looked up with [`PREFIX_FULL`]: the trie finds the
    /// longest stored prefix).
    pub fn lookup(endpoint: u16, direction: u8, identity: u32, proto: u8, port: u16) -> PolicyKey {
        PolicyKey::new(endpoint, direction, identity, proto, port, 16).1
    }
}

/// What a [`PolicyKey`] leads to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyValue {
    /// The agent's number of the policy that allows it (for attribution).
    pub policy: u32,
    /// Reserved; always zero.
    pub flags: u32,
}
assert_size!(PolicyValue, 8);

/// Capacity of `skiff_pct`.
pub const PCT_MAX_ENTRIES: u32 = 1 << 17;

/// A connection of an isolated endpoint, as seen from the endpoint (`skiff_pct`, an LRU hash):
/// both directions of the connection find the same entry, so replies pass.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PctKey {
    /// The endpoint's and the peer's addresses (network order).
    pub endpoint_addr: u32,
    pub peer_addr: u32,
    /// Their ports (network order; 0 for protocols without ports).
    pub endpoint_port: u16,
    pub peer_port: u16,
    pub proto: u8,
    pub pad: [u8; 3],
}
assert_size!(PctKey, 16);

/// A tracked policy connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PctEntry {
    /// `CLOCK_MONOTONIC` ns after which the entry no longer matches.
    pub expires: u64,
    /// The policy that allowed it (0: the direction was not isolated).
    pub policy: u32,
    /// Which way it was opened ([`DIR_INGRESS`] or [`DIR_EGRESS`]).
    pub direction: u8,
    pub pad: [u8; 3],
}
assert_size!(PctEntry, 16);

/// A CPU's budget of drop events.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenBucket {
    /// Events that may still be written.
    pub tokens: u64,
    /// `CLOCK_MONOTONIC` ns of the last refill.
    pub last_ns: u64,
}
assert_size!(TokenBucket, 16);

/// A fragmented datagram: its addresses, IPv4 identification and protocol (network order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragKey {
    pub saddr: u32,
    pub daddr: u32,
    pub id: u16,
    pub proto: u8,
    pub pad: u8,
}
assert_size!(FragKey, 12);

/// [`FlowEvent::verdict`]: allowed by a policy (or the endpoint is not isolated).
pub const VERDICT_ALLOWED: u8 = 0;
/// Dropped: no policy allows it.
pub const VERDICT_DROPPED: u8 = 1;
/// Would have been dropped; allowed because the namespace is in audit mode.
pub const VERDICT_AUDIT: u8 = 2;

/// A new connection decided by policy, as the programs report it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    /// `bpf_ktime_get_ns` when decided.
    pub ts_ns: u64,
    /// Source and destination (network order bytes).
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    /// Ports (host order).
    pub sport: u16,
    pub dport: u16,
    /// The peer's identity (ipcache; CIDR identity when that decided).
    pub peer_identity: u32,
    /// The policy that allowed it (0: none, or the endpoint is not isolated).
    pub policy: u32,
    /// The endpoint's policy number.
    pub endpoint: u16,
    pub proto: u8,
    /// [`DIR_INGRESS`] or [`DIR_EGRESS`], seen from `endpoint`.
    pub direction: u8,
    /// [`VERDICT_ALLOWED`], [`VERDICT_DROPPED`] or [`VERDICT_AUDIT`].
    pub verdict: u8,
    /// The hook that decided ([`crate::Hook`]).
    pub hook: u8,
    pub pad: [u8; 2],
}
assert_size!(FlowEvent, 40);

#[cfg(feature = "user")]
mod user {
    // SAFETY: `repr(C)` structs of integers and byte arrays with their sizes asserted above
    // and no implicit padding (every field is at its natural alignment): every bit pattern is
    // a valid value, copied byte for byte.
    unsafe impl aya::Pod for super::IpcacheValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PolicyKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PolicyValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PctKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PctEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TokenBucket {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FragKey {}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes the trie compares (after `prefix_len`).
    fn data(k: &PolicyKey) -> [u8; 12] {
        let mut out = [0u8; 12];
        out[..2].copy_from_slice(&u16::from_be(k.endpoint).to_be_bytes());
        out[2] = k.direction;
        out[3] = k.pad;
        out[4..8].copy_from_slice(&u32::from_be(k.identity).to_be_bytes());
        out[8] = k.proto;
        out[9] = k.pad2;
        out[10..].copy_from_slice(&u16::from_be(k.port).to_be_bytes());
        out
    }

    /// The trie's match: the first `prefix_len` bits of the stored key's data equal the
    /// lookup's.
    fn lpm_matches((len, stored): &(u32, PolicyKey), lookup: &PolicyKey) -> bool {
        let (a, b) = (data(stored), data(lookup));
        let bits = *len as usize;
        (0..bits).all(|i| (a[i / 8] >> (7 - i % 8)) & 1 == (b[i / 8] >> (7 - i % 8)) & 1)
    }

    #[test]
    fn prefixes_mean_every_protocol_every_port_or_a_port_block() {
        let any = PolicyKey::new(3, DIR_INGRESS, 300, 0, 0, 0);
        let tcp = PolicyKey::new(3, DIR_INGRESS, 300, 6, 0, 0);
        // 8000–8007: the first 13 bits of 8000.
        let block = PolicyKey::new(3, DIR_INGRESS, 300, 6, 8003, 13);
        assert_eq!((any.0, tcp.0, block.0), (64, 72, 93));
        assert_eq!(u16::from_be(block.1.port), 8000);
        for (key, proto, port, want) in [
            (&any, 17, 53, true),
            (&tcp, 6, 1, true),
            (&tcp, 17, 1, false),
            (&block, 6, 8000, true),
            (&block, 6, 8007, true),
            (&block, 6, 8008, false),
            (&block, 6, 7999, false),
            (&block, 17, 8001, false),
        ] {
            let l = PolicyKey::lookup(3, DIR_INGRESS, 300, proto, port);
            assert_eq!(lpm_matches(key, &l), want, "{key:?} vs {proto}/{port}");
        }
        // Another endpoint, direction or identity never matches.
        for l in [
            PolicyKey::lookup(4, DIR_INGRESS, 300, 6, 8000),
            PolicyKey::lookup(3, DIR_EGRESS, 300, 6, 8000),
            PolicyKey::lookup(3, DIR_INGRESS, 301, 6, 8000),
        ] {
            assert!(!lpm_matches(&any, &l));
        }
    }
}
