//! The packet operations service translation needs, for each kind of hook: the TC hooks carry
//! the whole data path (skb helpers; rejections; neighbour resolution), the XDP hook only
//! forwards flows it can route at once and leaves everything else to TC.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_redirect, bpf_redirect_neigh},
    programs::{TcContext, XdpContext},
};

use crate::{
    fib::{self, Route},
    nat::{self, End, csum_replace, xdp_load, xdp_store},
    packet::Ipv4Info,
    reject,
};

const IP_OFF: usize = 14;
const TOT_LEN_OFF: usize = IP_OFF + 2;
const TTL_OFF: usize = IP_OFF + 8;
const IP_CSUM_OFF: usize = IP_OFF + 10;

/// A packet at a hook.
pub trait Frame {
    /// The hook carries the whole data path (TC). `false` (XDP): it handles only flows it can
    /// route out at once, without creating state it would not use.
    const FULL: bool;
    /// Frame length in bytes.
    fn len(&self) -> u32;
    /// The interface it arrived on.
    fn ifindex(&self) -> u32;
    /// Rewrites one end's address and port, with checksums.
    fn rewrite(&self, info: &Ipv4Info, end: End, addr: u32, port: u16) -> Result<(), ()>;
    /// The route of the packet once translated to `saddr → daddr` ([`Route::None`] when the
    /// program does not route it; XDP also when it cannot send it itself, e.g. a spent TTL).
    fn route(&self, saddr: u32, daddr: u32) -> Route;
    /// Sends the (translated) packet along `route`: TTL − 1, MACs, redirect. `None` when it
    /// cannot (a spent TTL: the kernel answers "time exceeded"), and the kernel carries on.
    fn send(&self, route: &Route) -> Option<i32>;
    /// Sends the packet back out of the interface it came in on, MACs swapped.
    fn send_back(&self) -> Result<i32, ()>;
    /// Turns the packet into its own rejection (TCP RST, ICMP unreachable) and sends it back;
    /// `Err` when this hook cannot or the packet cannot be answered.
    fn reject(&self, info: &Ipv4Info) -> Result<i32, ()>;
}

/// The TTL and protocol bytes, and the same with the TTL decremented; `None` when it is spent.
#[inline(always)]
fn hop(ttl_proto: [u8; 2]) -> Option<[u8; 2]> {
    (ttl_proto[0] > 1).then(|| [ttl_proto[0] - 1, ttl_proto[1]])
}

/// TC: decrements the TTL as a router hop, with the header checksum; `None` when it is spent
/// (nothing is changed then).
#[inline(always)]
pub fn tc_hop(ctx: &TcContext) -> Option<()> {
    let ttl_proto: [u8; 2] = ctx.load(TTL_OFF).ok()?;
    let hopped = hop(ttl_proto)?;
    ctx.l3_csum_replace(
        IP_CSUM_OFF,
        u64::from(u16::from_ne_bytes(ttl_proto)),
        u64::from(u16::from_ne_bytes(hopped)),
        2,
    )
    .ok()?;
    ctx.store(TTL_OFF, &hopped[0], 0).ok()
}

/// TC: sets the frame's destination and source MACs.
#[inline(always)]
pub fn tc_set_macs(ctx: &TcContext, dmac: &[u8; 6], smac: &[u8; 6]) -> Option<()> {
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(dmac);
    macs[6..].copy_from_slice(smac);
    ctx.store(0, &macs, 0).ok()
}

impl Frame for TcContext {
    const FULL: bool = true;

    #[inline(always)]
    fn len(&self) -> u32 {
        TcContext::len(self)
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        // SAFETY: `skb.skb` is the program's own context, valid for the whole run.
        unsafe { (*self.skb.skb).ifindex }
    }

    #[inline(always)]
    fn rewrite(&self, info: &Ipv4Info, end: End, addr: u32, port: u16) -> Result<(), ()> {
        nat::rewrite(self, info, end, addr, port)
    }

    #[inline(always)]
    fn route(&self, saddr: u32, daddr: u32) -> Route {
        // `tot_len` 0: the kernel checks the skb itself (GSO-aware) instead of comparing an
        // aggregated packet's length with the route's MTU. A spent TTL shows in `send`.
        fib::lookup(self.skb.skb.cast(), Frame::ifindex(self), saddr, daddr, 0)
    }

    #[inline(always)]
    fn send(&self, route: &Route) -> Option<i32> {
        let ifindex = match route {
            Route::Known { ifindex, .. } | Route::Neigh { ifindex } => *ifindex,
            Route::None => return None,
        };
        tc_hop(self)?;
        if let Route::Known { dmac, smac, .. } = route {
            tc_set_macs(self, dmac, smac)?;
        }
        // SAFETY: helpers taking plain integers (a null parameter block asks the kernel to
        // resolve the next hop itself).
        Some(unsafe {
            match route {
                Route::Neigh { .. } => {
                    bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) as i32
                }
                _ => bpf_redirect(ifindex, 0) as i32,
            }
        })
    }

    #[inline(always)]
    fn send_back(&self) -> Result<i32, ()> {
        nat::swap_macs(self)?;
        // SAFETY: a helper taking plain integers.
        Ok(unsafe { bpf_redirect(Frame::ifindex(self), 0) } as i32)
    }

    #[inline(always)]
    fn reject(&self, info: &Ipv4Info) -> Result<i32, ()> {
        // `reject` leaves the MACs swapped already.
        reject::reject(self, info)?;
        // SAFETY: a helper taking plain integers.
        Ok(unsafe { bpf_redirect(Frame::ifindex(self), 0) } as i32)
    }
}

impl Frame for XdpContext {
    const FULL: bool = false;

    #[inline(always)]
    fn len(&self) -> u32 {
        (self.data_end() - self.data()) as u32
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        // SAFETY: `ctx` is the program's own context, valid for the whole run.
        unsafe { (*self.ctx).ingress_ifindex }
    }

    #[inline(always)]
    fn rewrite(&self, info: &Ipv4Info, end: End, addr: u32, port: u16) -> Result<(), ()> {
        nat::rewrite_xdp(self, info, end, addr, port)
    }

    #[inline(always)]
    fn route(&self, saddr: u32, daddr: u32) -> Route {
        let (Some(ttl_proto), Some(tot_len)) = (
            xdp_load::<[u8; 2]>(self, TTL_OFF),
            xdp_load::<u16>(self, TOT_LEN_OFF),
        ) else {
            return Route::None;
        };
        if hop(ttl_proto).is_none() {
            return Route::None;
        }
        let tot_len = u16::from_be(tot_len);
        match fib::lookup(self.ctx.cast(), Frame::ifindex(self), saddr, daddr, tot_len) {
            // XDP cannot resolve a neighbour: TC does it.
            Route::Neigh { .. } => Route::None,
            r => r,
        }
    }

    #[inline(always)]
    fn send(&self, route: &Route) -> Option<i32> {
        let Route::Known {
            ifindex,
            dmac,
            smac,
        } = route
        else {
            return None;
        };
        let ttl_proto: [u8; 2] = xdp_load(self, TTL_OFF)?;
        let hopped = hop(ttl_proto)?;
        let csum: u16 = xdp_load(self, IP_CSUM_OFF)?;
        xdp_store(self, TTL_OFF, hopped)?;
        xdp_store(
            self,
            IP_CSUM_OFF,
            csum_replace(
                csum,
                &[u16::from_ne_bytes(ttl_proto)],
                &[u16::from_ne_bytes(hopped)],
            ),
        )?;
        let mut m = [0u8; 12];
        m[..6].copy_from_slice(dmac);
        m[6..].copy_from_slice(smac);
        xdp_store(self, 0, m)?;
        if *ifindex == Frame::ifindex(self) {
            return Some(xdp_action::XDP_TX as i32);
        }
        // SAFETY: a helper taking plain integers.
        Some(unsafe { bpf_redirect(*ifindex, 0) } as i32)
    }

    #[inline(always)]
    fn send_back(&self) -> Result<i32, ()> {
        let m: [u8; 12] = xdp_load(self, 0).ok_or(())?;
        let mut swapped = [0u8; 12];
        swapped[..6].copy_from_slice(&m[6..]);
        swapped[6..].copy_from_slice(&m[..6]);
        xdp_store(self, 0, swapped).ok_or(())?;
        Ok(xdp_action::XDP_TX as i32)
    }

    #[inline(always)]
    fn reject(&self, _: &Ipv4Info) -> Result<i32, ()> {
        // Rejections need the skb helpers: TC makes them.
        Err(())
    }
}
