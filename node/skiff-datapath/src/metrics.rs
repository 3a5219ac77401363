//! Reading `skiff_metrics`: per-CPU counters summed into one row per (hook, verdict).

use aya::maps::{MapData, PerCpuHashMap};
use skiff_ebpf_common::{DropReason, Hook, MetricsKey, MetricsValue, map_names};

use crate::{DatapathError, PinDir};

/// The verdict a counter row is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verdict {
    /// Passed on to the kernel.
    Forwarded,
    /// Sent on by the program itself (to a pod, out of an interface).
    Redirected,
    /// Dropped for a known reason.
    Dropped(DropReason),
    /// Dropped with a code this binary does not know (written by a newer program).
    DroppedUnknown(u8),
}

impl Verdict {
    fn from_code(code: u8) -> Verdict {
        if code == skiff_ebpf_common::metrics::REASON_FORWARDED {
            return Verdict::Forwarded;
        }
        if code == skiff_ebpf_common::metrics::REASON_REDIRECTED {
            return Verdict::Redirected;
        }
        DropReason::from_code(code).map_or(Verdict::DroppedUnknown(code), Verdict::Dropped)
    }

    /// Label used in CLI output and metrics.
    pub fn name(self) -> String {
        match self {
            Verdict::Forwarded => "forwarded".to_string(),
            Verdict::Redirected => "redirected".to_string(),
            Verdict::Dropped(r) => r.name().to_string(),
            Verdict::DroppedUnknown(c) => format!("unknown_{c}"),
        }
    }
}

/// One summed counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetricsRow {
    /// Hook that counted (None if the code is unknown to this binary).
    pub hook: Option<Hook>,
    /// Raw hook code.
    pub hook_code: u8,
    /// Verdict.
    pub verdict: Verdict,
    /// Packets, summed over CPUs.
    pub packets: u64,
    /// Bytes, summed over CPUs.
    pub bytes: u64,
}

/// Reads every counter of the node whose pins are in `pins`, sorted by hook then verdict.
pub fn read(pins: &PinDir) -> Result<Vec<MetricsRow>, DatapathError> {
    let map: PerCpuHashMap<MapData, MetricsKey, MetricsValue> =
        pins.open_map(map_names::METRICS)?;
    let iter_err = |source| DatapathError::Map {
        op: "iterate",
        map: map_names::METRICS.to_string(),
        source: Box::new(source),
    };
    let mut rows = Vec::new();
    for entry in map.iter() {
        let (key, per_cpu) = entry.map_err(iter_err)?;
        let (packets, bytes) = per_cpu
            .iter()
            .fold((0u64, 0u64), |(p, b), v| (p + v.packets, b + v.bytes));
        rows.push(MetricsRow {
            hook: Hook::from_u8(key.hook),
            hook_code: key.hook,
            verdict: Verdict::from_code(key.reason),
            packets,
            bytes,
        });
    }
    rows.sort_by_key(|r| (r.hook_code, r.verdict));
    Ok(rows)
}

/// Sum of packets counted at `hook` with `verdict` (0 when there is no such row).
pub fn packets(rows: &[MetricsRow], hook: Hook, verdict: Verdict) -> u64 {
    rows.iter()
        .filter(|r| r.hook == Some(hook) && r.verdict == verdict)
        .map(|r| r.packets)
        .sum()
}
