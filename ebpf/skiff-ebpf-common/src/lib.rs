//! The one place where skiff's BPF map layouts are defined.
//!
//! Everything here is `no_std` and `#[repr(C)]`, compiled into the kernel-side programs
//! (`ebpf/skiff-ebpf`) and into userspace (with the `user` feature, which adds `aya::Pod`).
//! Field names are what `bpftool map dump` prints, because the programs carry BTF for them.
//!
//! Numeric identifiers in this crate (drop reasons, hooks) are a stable interface: they are
//! stored in pinned maps that outlive an agent upgrade and appear in metrics and the CLI. A value
//! is never reused for a different meaning; retired values stay reserved.

#![no_std]

pub mod ct;
pub mod drop;
pub mod endpoint;
pub mod hook;
pub mod lb;
pub mod metrics;
pub mod policy;

pub use drop::DropReason;
pub use hook::Hook;
pub use metrics::{MetricsKey, MetricsValue};

/// Names of the maps the programs share. Each is pinned at
/// `/sys/fs/bpf/skiff/<node>/<name>` so every program of a node, the agent and `bpftool` see
/// the same map. (Kernel object names are limited to 15 bytes.)
pub mod map_names {
    /// Per-CPU packet/byte counters by hook and verdict; see [`crate::metrics`].
    pub const METRICS: &str = "skiff_metrics";
    /// Service frontends and their backend slots; see [`crate::lb`].
    pub const SERVICES: &str = "skiff_lb_svc";
    /// Backends by id; see [`crate::lb`].
    pub const BACKENDS: &str = "skiff_lb_be";
    /// ClientIP session affinity; see [`crate::lb`].
    pub const AFFINITY: &str = "skiff_lb_aff";
    /// Per-CPU packet/byte counters per frontend; see [`crate::lb`].
    pub const SERVICE_STATS: &str = "skiff_lb_stats";
    /// Connection tracking of translated flows; see [`crate::ct`].
    pub const CT: &str = "skiff_ct";
    /// Node facts for the programs; see [`crate::lb::LbConfig`].
    pub const LB_CONFIG: &str = "skiff_lb_cfg";
    /// The pods of this node, for same-node delivery; see [`crate::endpoint`].
    pub const ENDPOINTS: &str = "skiff_endpoints";
    /// Security identities by address; see [`crate::policy`].
    pub const IPCACHE: &str = "skiff_ipcache";
    /// Node-local identities of policy prefixes; see [`crate::policy`].
    pub const CIDR: &str = "skiff_cidr";
    /// What each endpoint of this node allows; see [`crate::policy`].
    pub const POLICY: &str = "skiff_policy";
    /// Connections of isolated endpoints; see [`crate::policy::PctKey`].
    pub const PCT: &str = "skiff_pct";
    /// New connections decided by policy (ring buffer); see [`crate::policy`].
    pub const FLOWS: &str = "skiff_flows";
    /// Flow events not written (per-CPU: ring full, rate-limited); see [`crate::policy`].
    pub const FLOWS_LOST: &str = "skiff_flows_lost";
    /// The per-CPU token buckets limiting drop events; see [`crate::policy`].
    pub const FLOW_RATE: &str = "skiff_flow_rate";
    /// Fragmented datagrams whose first fragment policy allowed; see [`crate::policy`].
    pub const FRAGS: &str = "skiff_frags";
    /// Each pod interface's address, for the source check; see [`crate::endpoint`].
    pub const IFACES: &str = "skiff_ifaces";

    /// Every map a node pins, for inspection and cleanup.
    pub const ALL: &[&str] = &[
        METRICS,
        SERVICES,
        BACKENDS,
        AFFINITY,
        SERVICE_STATS,
        CT,
        LB_CONFIG,
        ENDPOINTS,
        IPCACHE,
        CIDR,
        POLICY,
        PCT,
        FLOWS,
        FLOWS_LOST,
        FLOW_RATE,
        FRAGS,
        IFACES,
    ];
}

/// Asserts at compile time that a map type has the size the kernel side expects.
macro_rules! assert_size {
    ($t:ty, $n:expr) => {
        const _: () = assert!(core::mem::size_of::<$t>() == $n);
    };
}
pub(crate) use assert_size;
