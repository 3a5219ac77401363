//! Service load balancing: frontend lookup and backend choice (`skiff_lb_*` maps); layouts in
//! `skiff_ebpf_common::lb`.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray},
    helpers::bpf_get_prandom_u32,
    macros::btf_map,
};
use skiff_ebpf_common::{
    DropReason, MetricsValue,
    lb::{
        AFFINITY_MAX_ENTRIES, AffinityKey, AffinityValue, BACKENDS_MAX_ENTRIES, BE_TERMINATING,
        Backend, LbConfig, SCOPE_EXTERNAL, SCOPE_INTERNAL, SERVICE_IDS, SERVICES_MAX_ENTRIES,
        SVC_TWO_SCOPES, ServiceKey, ServiceValue,
    },
};

/// Frontends and backend slots. Not preallocated: memory follows the number of services.
#[btf_map(name = "skiff_lb_svc")]
pub static SERVICES: HashMap<
    ServiceKey,
    ServiceValue,
    { SERVICES_MAX_ENTRIES as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// Backends by id.
#[btf_map(name = "skiff_lb_be")]
pub static BACKENDS: HashMap<
    u32,
    Backend,
    { BACKENDS_MAX_ENTRIES as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// ClientIP session affinity.
#[btf_map(name = "skiff_lb_aff")]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue, { AFFINITY_MAX_ENTRIES as usize }> =
    LruHashMap::new();

/// Packets and bytes per frontend id.
#[btf_map(name = "skiff_lb_stats")]
pub static STATS: PerCpuArray<MetricsValue, { SERVICE_IDS as usize }> = PerCpuArray::new();

/// Node facts written by the agent.
#[btf_map(name = "skiff_lb_cfg")]
pub static CONFIG: Array<LbConfig, 1> = Array::new();

/// The node's address (0 until the agent has written it).
#[inline(always)]
pub fn node_addr() -> u32 {
    CONFIG.get(0).map_or(0, |c| c.node_addr)
}

/// The `CFG_*` flags the agent set (0 until it has written them).
#[inline(always)]
pub fn config_flags() -> u32 {
    CONFIG.get(0).map_or(0, |c| c.flags)
}

/// A frontend found for a packet.
#[derive(Clone, Copy)]
pub struct Frontend {
    pub key: ServiceKey,
    pub svc: ServiceValue,
}

/// The frontend `daddr:dport/proto`, if it is one. Traffic from pods (`from_pod`) uses the
/// internal-scope entry where there is one.
#[inline(always)]
pub fn frontend(daddr: u32, dport: u16, proto: u8, from_pod: bool) -> Option<Frontend> {
    let mut key = ServiceKey::new(daddr, dport, proto, SCOPE_EXTERNAL, 0);
    // SAFETY: the value is copied out at once; the agent replaces values whole.
    let svc = unsafe { *SERVICES.get(&key)? };
    if from_pod && svc.flags & SVC_TWO_SCOPES != 0 {
        key.scope = SCOPE_INTERNAL;
        // SAFETY: as above.
        if let Some(inner) = unsafe { SERVICES.get(&key) } {
            return Some(Frontend { key, svc: *inner });
        }
        key.scope = SCOPE_EXTERNAL;
    }
    Some(Frontend { key, svc })
}

/// Chooses a backend of `fe` for a new connection from `client`: the affinity entry while it
/// is fresh and its backend still usable, else a random ready backend (a random terminating one
/// when none is ready).
#[inline(always)]
pub fn select(fe: &Frontend, client: u32, now: u64) -> Result<(u32, Backend), DropReason> {
    let svc = &fe.svc;
    let (first, n) = if svc.count > 0 {
        (1u16, svc.count)
    } else if svc.terminating > 0 {
        (1u16, svc.terminating)
    } else {
        return Err(DropReason::ServiceNoBackend);
    };
    let akey = AffinityKey {
        client,
        service_id: svc.service_id,
    };
    let timeout = svc.affinity_timeout as u64 * 1_000_000_000;
    if timeout != 0
        && let Some(a) = AFFINITY.get_ptr_mut(&akey)
    {
        // SAFETY: pointer from a successful lookup, valid for this run.
        let (last, id) = unsafe { ((*a).last_used, (*a).backend_id) };
        if now.saturating_sub(last) <= timeout
            && let Some(be) = backend(id)
            && (be.flags & BE_TERMINATING == 0 || svc.count == 0)
        {
            // SAFETY: as above.
            unsafe { (*a).last_used = now };
            return Ok((id, be));
        }
    }
    // SAFETY: a helper without arguments.
    let r = unsafe { bpf_get_prandom_u32() };
    let slot = first + (r % n as u32) as u16;
    let mut skey = fe.key;
    skey.slot = slot;
    // SAFETY: copied out at once.
    let id = unsafe { SERVICES.get(&skey) }
        .ok_or(DropReason::ServiceBackendMissing)?
        .backend_id;
    let be = backend(id).ok_or(DropReason::ServiceBackendMissing)?;
    if timeout != 0 {
        let v = AffinityValue {
            last_used: now,
            backend_id: id,
            pad: 0,
        };
        // Best effort: without the entry the next connection simply chooses again.
        let _ = AFFINITY.insert(&akey, &v, 0);
    }
    Ok((id, be))
}

/// Whether backend `id` still exists and is `addr:port` (network order).
#[inline(always)]
pub fn backend_is(id: u32, addr: u32, port: u16) -> bool {
    backend(id).is_some_and(|b| b.address == addr && b.port == port)
}

#[inline(always)]
fn backend(id: u32) -> Option<Backend> {
    // SAFETY: copied out at once.
    unsafe { BACKENDS.get(&id).copied() }
}

/// Counts a packet of `bytes` bytes for frontend `service_id`.
#[inline(always)]
pub fn count(service_id: u32, bytes: u32) {
    if let Some(v) = STATS.get_ptr_mut(service_id) {
        // SAFETY: per-CPU slot from a successful lookup; only this CPU writes it.
        unsafe {
            (*v).packets += 1;
            (*v).bytes += bytes as u64;
        }
    }
}
