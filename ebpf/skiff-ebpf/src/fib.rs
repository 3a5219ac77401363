//! Routing a packet from the program (FIB lookup, then redirect to the egress interface), for
//! translated packets the kernel's input path would refuse: one that now carries one of the
//! node's own addresses as its source is a "martian" to `ip_route_input`.
//!
//! The lookup is made before the packet is rewritten (it names the translated addresses), so
//! a hook that can only forward when the route is known (XDP) can leave the packet untouched
//! otherwise.

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup},
    cty::c_void,
    helpers::bpf_fib_lookup as fib_lookup,
};

const AF_INET: u8 = 2;

/// Where a routed packet goes.
#[derive(Clone, Copy)]
pub enum Route {
    /// Out of `ifindex` to a neighbour whose MAC is known.
    Known {
        ifindex: u32,
        dmac: [u8; 6],
        smac: [u8; 6],
    },
    /// Out of `ifindex`, the neighbour still to be resolved (TC: `bpf_redirect_neigh`).
    Neigh { ifindex: u32 },
    /// Not routed by the program: the kernel carries on (or it is not a routed flow).
    None,
}

/// Looks up the route of `saddr → daddr` (network order) as a packet arriving on `ifindex`.
/// `ctx` is the program's context (an skb or an xdp_md); `tot_len` the IPv4 total length to
/// check against the route's MTU, or 0 to let the kernel check the skb itself (GSO-aware).
#[inline(always)]
pub fn lookup(ctx: *mut c_void, ifindex: u32, saddr: u32, daddr: u32, tot_len: u16) -> Route {
    // SAFETY: an all-zero `bpf_fib_lookup` is a valid (empty) request.
    let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    p.family = AF_INET;
    p.ifindex = ifindex;
    p.__bindgen_anon_1.tot_len = tot_len;
    p.__bindgen_anon_3.ipv4_src = saddr;
    p.__bindgen_anon_4.ipv4_dst = daddr;
    // SAFETY: `p` is a properly sized, initialised request on our stack; `ctx` is the
    // program's own context.
    let rc = unsafe {
        fib_lookup(
            ctx,
            &mut p,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if rc == BPF_FIB_LKUP_RET_SUCCESS as i64 {
        return Route::Known {
            ifindex: p.ifindex,
            dmac: p.dmac,
            smac: p.smac,
        };
    }
    if rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        return Route::Neigh { ifindex: p.ifindex };
    }
    Route::None
}
