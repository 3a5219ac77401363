//! Routing a packet from the program (FIB lookup, then redirect to the egress interface), for
//! translated packets the kernel's input path would refuse: one that now carries one of the
//! node's own addresses as its source is a "martian" to `ip_route_input`.

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup},
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};

const AF_INET: u8 = 2;

/// Routes the packet (`saddr → daddr`, network order) out of the interface the FIB names:
/// with the neighbour's MAC when known, else through `bpf_redirect_neigh`. `None` when the
/// FIB has no usable route (the caller lets the kernel try).
#[inline(always)]
pub fn redirect_routed(ctx: &TcContext, saddr: u32, daddr: u32) -> Option<i32> {
    // SAFETY: an all-zero `bpf_fib_lookup` is a valid (empty) request.
    let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    p.family = AF_INET;
    // SAFETY: `ctx.skb.skb` is the program's own context, valid for the whole run.
    p.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // `tot_len` stays 0: the kernel then checks the skb itself (GSO-aware) instead of comparing
    // an aggregated packet's length with the route's MTU.
    p.__bindgen_anon_3.ipv4_src = saddr;
    p.__bindgen_anon_4.ipv4_dst = daddr;
    // SAFETY: `p` is a properly sized, initialised request on our stack; the context pointer
    // is the program's own.
    let rc = unsafe {
        fib_lookup(
            ctx.skb.skb as *mut _,
            &mut p,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if rc == BPF_FIB_LKUP_RET_SUCCESS as i64 {
        let mut macs = [0u8; 12];
        macs[..6].copy_from_slice(&p.dmac);
        macs[6..].copy_from_slice(&p.smac);
        ctx.store(0, &macs, 0).ok()?;
        // SAFETY: a helper taking plain integers.
        return Some(unsafe { bpf_redirect(p.ifindex, 0) } as i32);
    }
    if rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        // SAFETY: a null parameter block asks the kernel to resolve the next hop itself.
        return Some(unsafe { bpf_redirect_neigh(p.ifindex, core::ptr::null_mut(), 0, 0) } as i32);
    }
    None
}
