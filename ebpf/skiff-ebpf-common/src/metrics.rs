//! Layout of the `skiff_metrics` map: a per-CPU hash of packet and byte counters keyed by the
//! hook that saw the packet and its verdict (`reason == 0` forwarded, `255` redirected,
//! otherwise a [`crate::DropReason`] code). Userspace sums the per-CPU values.

use crate::assert_size;

/// `reason` value meaning the packet was forwarded (not dropped).
pub const REASON_FORWARDED: u8 = 0;
/// `reason` value meaning the program sent the packet on itself (to a pod, out of an interface,
/// back out of the one it came in on) instead of handing it to the kernel.
pub const REASON_REDIRECTED: u8 = 255;

/// Maximum number of distinct (hook, reason) keys.
pub const METRICS_MAX_ENTRIES: u32 = 1024;

/// Key of `skiff_metrics`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MetricsKey {
    /// `0` for forwarded packets, `255` for redirected ones, otherwise the
    /// [`crate::DropReason`] code.
    pub reason: u8,
    /// The [`crate::Hook`] that counted the packet.
    pub hook: u8,
    /// Explicit padding; always zero so equal keys hash equally.
    pub pad: u16,
}
assert_size!(MetricsKey, 4);

impl MetricsKey {
    /// Builds a key with zeroed padding.
    pub const fn new(hook: u8, reason: u8) -> Self {
        MetricsKey {
            reason,
            hook,
            pad: 0,
        }
    }
}

/// Value of `skiff_metrics` (one per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MetricsValue {
    /// Packets counted.
    pub packets: u64,
    /// Bytes counted (whole frame as the hook saw it).
    pub bytes: u64,
}
assert_size!(MetricsValue, 16);

#[cfg(feature = "user")]
mod user {
    // SAFETY: `MetricsKey` is `repr(C)`, has only integer fields and no implicit padding
    // (asserted 4 bytes = 1 + 1 + 2), so every bit pattern is valid and it can be copied to and
    // from kernel memory byte for byte.
    unsafe impl aya::Pod for super::MetricsKey {}
    // SAFETY: `MetricsValue` is `repr(C)` with two `u64` fields and no padding (asserted 16
    // bytes), so every bit pattern is a valid value.
    unsafe impl aya::Pod for super::MetricsValue {}
}
