//! Per-CPU counters of packets and bytes by hook and verdict (`skiff_metrics`).

use aya_ebpf::{bindings::BPF_NOEXIST, btf_maps::PerCpuHashMap, macros::btf_map};
use skiff_ebpf_common::{
    Hook, MetricsKey, MetricsValue,
    metrics::{METRICS_MAX_ENTRIES, REASON_FORWARDED, REASON_REDIRECTED},
};

/// Pinned as `/sys/fs/bpf/skiff/<node>/skiff_metrics` and shared by every program of a node.
#[btf_map(name = "skiff_metrics")]
pub static METRICS: PerCpuHashMap<MetricsKey, MetricsValue, { METRICS_MAX_ENTRIES as usize }> =
    PerCpuHashMap::new();

/// Counts one packet of `bytes` bytes seen at `hook` with verdict `reason`
/// ([`REASON_FORWARDED`] or a drop reason code).
#[inline(always)]
pub fn count(hook: Hook, reason: u8, bytes: u32) {
    let key = MetricsKey::new(hook as u8, reason);
    if bump(&key, bytes) {
        return;
    }
    let first = MetricsValue {
        packets: 1,
        bytes: bytes as u64,
    };
    // Another CPU may create the entry between our lookup and this insert; the insert then
    // fails with EEXIST and the lookup below finds the entry (our CPU's slot is zero).
    if METRICS.insert(&key, &first, BPF_NOEXIST as u64).is_err() {
        bump(&key, bytes);
    }
}

/// Counts a forwarded packet.
#[inline(always)]
pub fn forwarded(hook: Hook, bytes: u32) {
    count(hook, REASON_FORWARDED, bytes)
}

/// Counts a packet the program sent on itself.
#[inline(always)]
pub fn redirected(hook: Hook, bytes: u32) {
    count(hook, REASON_REDIRECTED, bytes)
}

#[inline(always)]
fn bump(key: &MetricsKey, bytes: u32) -> bool {
    match METRICS.get_ptr_mut(key) {
        Some(v) => {
            // SAFETY: the pointer comes from a successful map lookup and stays valid for the
            // rest of this program run; per-CPU values are only written by this CPU.
            unsafe {
                (*v).packets += 1;
                (*v).bytes += bytes as u64;
            }
            true
        }
        None => false,
    }
}
