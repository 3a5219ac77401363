//! Layouts of the service load-balancing maps (kube-proxy's job), after Cilium's `lb4_*` maps.
//!
//! - `skiff_lb_svc` ([`ServiceKey`] → [`ServiceValue`]): one entry per frontend (a Service's
//!   ClusterIP, external IP or node address with its port and protocol) at `slot == 0`, holding
//!   the backend counts and the service id; then one entry per backend at `slot == 1..`, whose
//!   value names a backend id. Slots `1..=count` hold the ready backends; the `terminating`
//!   serving-but-terminating backends follow them and are used only when no ready one is left
//!   (kube-proxy's fallback). A frontend with no backend at all rejects new connections.
//! - `skiff_lb_be` (backend id → [`Backend`]): the address a backend slot translates to. Ids
//!   are allocated per frontend, so removing an endpoint from one Service removes its id, and a
//!   session-affinity entry pointing at it stops matching.
//! - `skiff_lb_aff` ([`AffinityKey`] → [`AffinityValue`], LRU): `sessionAffinity: ClientIP`.
//! - `skiff_lb_stats` (service id → [`crate::MetricsValue`], per-CPU array): packets and bytes
//!   forwarded per frontend.
//! - `skiff_lb_cfg` (index 0 → [`LbConfig`]): the node's address.
//!
//! Addresses and ports are in network byte order (as in packets); counts, slots and ids in host
//! order.

use crate::assert_size;

/// Number of frontend ids (service id `0` is never allocated).
pub const SERVICE_IDS: u32 = 1 << 17;
/// Capacity of `skiff_lb_svc` (frontends and their backend slots).
pub const SERVICES_MAX_ENTRIES: u32 = 1 << 20;
/// Capacity of `skiff_lb_be`.
pub const BACKENDS_MAX_ENTRIES: u32 = 1 << 20;
/// Capacity of `skiff_lb_aff`.
pub const AFFINITY_MAX_ENTRIES: u32 = 1 << 16;

/// Frontend scope: the entry every hook uses.
pub const SCOPE_EXTERNAL: u8 = 0;
/// Frontend scope: the entry traffic from pods uses instead, when the external entry carries
/// [`SVC_TWO_SCOPES`] (externalTrafficPolicy=Local keeps only local backends for traffic from
/// outside; pods still reach every backend, as with kube-proxy).
pub const SCOPE_INTERNAL: u8 = 1;

/// Frontend flag: a NodePort on one of the node's addresses.
pub const SVC_NODEPORT: u16 = 1 << 0;
/// Frontend flag: one of the Service's `externalIPs`.
pub const SVC_EXTERNAL_IP: u16 = 1 << 1;
/// Frontend flag: this entry keeps only backends on this node (externalTrafficPolicy=Local for
/// NodePort and external IPs, internalTrafficPolicy=Local for the ClusterIP).
pub const SVC_LOCAL_ONLY: u16 = 1 << 2;
/// Frontend flag: an [`SCOPE_INTERNAL`] entry exists for traffic from pods.
pub const SVC_TWO_SCOPES: u16 = 1 << 3;

/// Backend flag: the endpoint is terminating (serving, not ready).
pub const BE_TERMINATING: u8 = 1 << 0;
/// Backend flag: the endpoint runs on this node (NodePort traffic to it needs no source NAT).
pub const BE_LOCAL: u8 = 1 << 1;

/// Source ports for NodePort source NAT: above Linux's default local port range
/// (32768–60999), so the node's own connections do not take them.
pub const NAT_PORT_MIN: u16 = 61000;
/// Upper end (inclusive) of [`NAT_PORT_MIN`]'s range.
pub const NAT_PORT_MAX: u16 = 65535;

/// Value of `skiff_lb_cfg` (an array of one): node facts the programs need.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbConfig {
    /// The node's address (network order): the source of NodePort traffic forwarded to
    /// backends on other nodes.
    pub node_addr: u32,
    /// `CFG_*` flags.
    pub flags: u32,
}
assert_size!(LbConfig, 8);

/// Config flag: `xdp-uplink` runs the NodePort fast path. The agent sets it when every uplink
/// has XDP in native mode; generic (skb) XDP cannot tell a `CHECKSUM_PARTIAL` skb (whose L4
/// checksum field is only the pseudo-header seed) from a complete one, so it leaves NodePort
/// to `from-netdev`.
pub const CFG_XDP_FAST_PATH: u32 = 1;

/// The address pods see as the source of their own connections through a Service (hairpin):
/// a pod cannot receive a packet from its own address, so such flows are source-NATed to this
/// link-local address, as Cilium does with 169.254.42.1.
pub const HAIRPIN_ADDR: [u8; 4] = [169, 254, 42, 1];

/// Key of `skiff_lb_svc`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// Frontend address (network order).
    pub address: u32,
    /// Frontend port (network order).
    pub port: u16,
    /// `0`: the frontend itself; `1..`: its backend slots.
    pub slot: u16,
    /// IP protocol number (6 TCP, 17 UDP).
    pub proto: u8,
    /// [`SCOPE_EXTERNAL`] or [`SCOPE_INTERNAL`].
    pub scope: u8,
    /// Always zero.
    pub pad: u16,
}
assert_size!(ServiceKey, 12);

impl ServiceKey {
    /// Builds a key with zeroed padding.
    pub const fn new(address: u32, port: u16, proto: u8, scope: u8, slot: u16) -> Self {
        ServiceKey {
            address,
            port,
            slot,
            proto,
            scope,
            pad: 0,
        }
    }
}

/// Value of `skiff_lb_svc`. At `slot == 0` every field but `backend_id` is used; at a backend
/// slot only `backend_id` is.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceValue {
    /// Backend slots: the backend id (key of `skiff_lb_be`).
    pub backend_id: u32,
    /// Frontend id: indexes `skiff_lb_stats` and names the frontend in connection tracking.
    pub service_id: u32,
    /// ClientIP session affinity timeout in seconds; `0` = no affinity.
    pub affinity_timeout: u32,
    /// Ready backends, in slots `1..=count`.
    pub count: u16,
    /// Serving but terminating backends, in the slots after the ready ones.
    pub terminating: u16,
    /// `SVC_*` flags.
    pub flags: u16,
    /// Always zero.
    pub pad: u16,
}
assert_size!(ServiceValue, 20);

/// Value of `skiff_lb_be` (key: the backend id, a `u32`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    /// Backend address (network order).
    pub address: u32,
    /// Backend port (network order).
    pub port: u16,
    /// IP protocol number.
    pub proto: u8,
    /// `BE_*` flags.
    pub flags: u8,
}
assert_size!(Backend, 8);

/// Key of `skiff_lb_aff`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    /// The client's address (network order).
    pub client: u32,
    /// The frontend's service id.
    pub service_id: u32,
}
assert_size!(AffinityKey, 8);

/// Value of `skiff_lb_aff`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityValue {
    /// When the client last opened a connection to this frontend (`CLOCK_MONOTONIC` ns).
    pub last_used: u64,
    /// The backend it was sent to.
    pub backend_id: u32,
    /// Always zero.
    pub pad: u32,
}
assert_size!(AffinityValue, 16);

#[cfg(feature = "user")]
mod user {
    // Each type below is a `repr(C)` struct of integer fields with explicit padding fields and
    // its size asserted above, so there are no implicit padding bytes and every bit pattern is a
    // valid value that can be copied to and from kernel memory byte for byte.

    // SAFETY: see above.
    unsafe impl aya::Pod for super::ServiceKey {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::ServiceValue {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::Backend {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::AffinityKey {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::AffinityValue {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::LbConfig {}
}
