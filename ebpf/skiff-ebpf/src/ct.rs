//! Connection tracking of translated flows (`skiff_ct`); layout in `skiff_ebpf_common::ct`.

use aya_ebpf::{btf_maps::LruHashMap, helpers::bpf_ktime_get_ns, macros::btf_map};
use skiff_ebpf_common::ct::{
    CT_CLOSING, CT_LIFETIME_CLOSE_NS, CT_LIFETIME_OTHER_NS, CT_LIFETIME_TCP_NS, CT_MAX_ENTRIES,
    CT_REFRESH_NS, CtEntry, CtKey,
};

use crate::packet::{IPPROTO_TCP, TCP_FIN, TCP_RST};

/// Pinned as `/sys/fs/bpf/skiff/<node>/skiff_ct`, shared by every program of a node.
#[btf_map(name = "skiff_ct")]
pub static CT: LruHashMap<CtKey, CtEntry, { CT_MAX_ENTRIES as usize }> = LruHashMap::new();

/// `CLOCK_MONOTONIC` now, in ns.
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: a helper without arguments or side effects.
    unsafe { bpf_ktime_get_ns() }
}

/// How long an entry of protocol `proto` lives past its last packet.
#[inline(always)]
pub fn lifetime(proto: u8) -> u64 {
    if proto == IPPROTO_TCP {
        CT_LIFETIME_TCP_NS
    } else {
        CT_LIFETIME_OTHER_NS
    }
}

/// The live entry for `key`, if any (an expired entry does not match).
#[inline(always)]
pub fn lookup(key: &CtKey, now: u64) -> Option<*mut CtEntry> {
    let e = CT.get_ptr_mut(key)?;
    // SAFETY: the pointer comes from a successful lookup and is valid for this program run.
    if unsafe { (*e).expires } < now {
        return None;
    }
    Some(e)
}

/// Notes a packet of a tracked flow: a FIN or RST shortens the entry's life, otherwise its
/// expiry moves forward (written at most once per [`CT_REFRESH_NS`]).
#[inline(always)]
pub fn touch(e: *mut CtEntry, proto: u8, tcp_flags: u8, now: u64) {
    // SAFETY: `e` comes from `lookup` in this program run; concurrent writers on other CPUs
    // can only move `expires`/`flags` between equally valid values.
    unsafe {
        if proto == IPPROTO_TCP && tcp_flags & (TCP_FIN | TCP_RST) != 0 {
            if (*e).flags & CT_CLOSING == 0 {
                (*e).flags |= CT_CLOSING;
                (*e).expires = now + CT_LIFETIME_CLOSE_NS;
            }
            return;
        }
        if (*e).flags & CT_CLOSING != 0 {
            return;
        }
        let want = now + lifetime(proto);
        if want > (*e).expires + CT_REFRESH_NS {
            (*e).expires = want;
        }
    }
}

/// Creates (or replaces) both entries of a new flow. The reply entry goes first, so a reply
/// can never find a forward entry without its partner.
#[inline(always)]
pub fn create(fwd_key: &CtKey, fwd: &CtEntry, rev_key: &CtKey, rev: &CtEntry) -> Result<(), ()> {
    CT.insert(rev_key, rev, 0).map_err(|_| ())?;
    CT.insert(fwd_key, fwd, 0).map_err(|_| ())
}
