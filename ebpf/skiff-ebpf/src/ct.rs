//! Connection tracking of translated flows (`skiff_ct`); layout in `skiff_ebpf_common::ct`.

use aya_ebpf::{btf_maps::LruHashMap, helpers::bpf_ktime_get_ns, macros::btf_map};
use skiff_ebpf_common::ct::{
    CT_CLOSING, CT_FIN, CT_LIFETIME_CLOSE_NS, CT_LIFETIME_OTHER_NS, CT_LIFETIME_TCP_NS,
    CT_MAX_ENTRIES, CT_REFRESH_NS, CT_REPLY, CtEntry, CtKey,
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

/// The key of the other direction's entry of the connection `e` (found under `key`) belongs to.
#[inline(always)]
pub fn partner_key(key: &CtKey, e: &CtEntry) -> CtKey {
    if e.flags & CT_REPLY != 0 {
        // Reply (backend → client or NAT address): the client's tuple towards the frontend.
        let (c, cp) = if e.to_addr != 0 {
            (e.to_addr, e.to_port)
        } else {
            (key.daddr, key.dport)
        };
        CtKey::new(c, e.from_addr, cp, e.from_port, key.proto)
    } else {
        // Forward (client → frontend): the backend's tuple towards the client or NAT address.
        let (s, sp) = if e.from_addr != 0 {
            (e.from_addr, e.from_port)
        } else {
            (key.saddr, key.sport)
        };
        CtKey::new(e.to_addr, s, e.to_port, sp, key.proto)
    }
}

/// Marks the connection closing in both entries: `CT_CLOSING` and a short life.
#[inline(always)]
fn close(e: *mut CtEntry, now: u64) {
    // SAFETY: pointer from a successful lookup in this run.
    unsafe {
        if (*e).flags & CT_CLOSING == 0 {
            (*e).flags |= CT_CLOSING;
            (*e).expires = now + CT_LIFETIME_CLOSE_NS;
        }
    }
}

/// Notes a packet of a tracked flow (found under `key`): a RST closes the connection, a FIN
/// half-closes its direction and closes the connection once the other direction has sent one
/// too; otherwise the expiry moves forward (written at most once per [`CT_REFRESH_NS`]).
#[inline(always)]
pub fn touch(key: &CtKey, e: *mut CtEntry, proto: u8, tcp_flags: u8, now: u64) {
    // SAFETY: `e` comes from `lookup` in this program run; concurrent writers on other CPUs
    // can only move `expires`/`flags` between equally valid values.
    unsafe {
        if proto == IPPROTO_TCP && tcp_flags & (TCP_FIN | TCP_RST) != 0 {
            let partner = CT.get_ptr_mut(&partner_key(key, &*e));
            if tcp_flags & TCP_RST != 0 {
                close(e, now);
                if let Some(p) = partner {
                    close(p, now);
                }
                return;
            }
            (*e).flags |= CT_FIN;
            if let Some(p) = partner
                && (*p).flags & CT_FIN != 0
            {
                close(e, now);
                close(p, now);
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
