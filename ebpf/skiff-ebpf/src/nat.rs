//! Rewriting addresses and ports of a packet with incremental checksum updates (the IPv4
//! header checksum, and the TCP/UDP checksum including its pseudo-header): through the skb
//! helpers at TC ([`rewrite`]), computed here at XDP ([`rewrite_xdp`], RFC 1624).

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::{bpf_xdp_load_bytes, bpf_xdp_store_bytes},
    programs::{TcContext, XdpContext},
};

use crate::packet::{IPPROTO_TCP, Ipv4Info};

const IP_OFF: usize = 14;
const IP_CSUM_OFF: usize = IP_OFF + 10;
const IP_SADDR_OFF: usize = IP_OFF + 12;
/// Offset of the IPv4 destination address in the frame.
pub(crate) const IP_DADDR_OFF: usize = IP_OFF + 16;

/// Which end of the packet to rewrite.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum End {
    Source,
    Destination,
}

/// Rewrites the source or destination address and port of `info`'s packet to `addr:port`
/// (network order), updating every checksum that covers them.
#[inline(always)]
pub fn rewrite(ctx: &TcContext, info: &Ipv4Info, end: End, addr: u32, port: u16) -> Result<(), ()> {
    let (old_addr, old_port, addr_off, port_off) = match end {
        End::Source => (info.saddr, info.sport, IP_SADDR_OFF, info.l4_off),
        End::Destination => (info.daddr, info.dport, IP_DADDR_OFF, info.l4_off + 2),
    };
    let (csum_off, l4_flags) = if info.proto == IPPROTO_TCP {
        (info.l4_off + 16, 0u64)
    } else {
        // A UDP checksum of 0 means "none" and must stay 0.
        (info.l4_off + 6, BPF_F_MARK_MANGLED_0 as u64)
    };
    if addr != old_addr {
        ctx.l4_csum_replace(
            csum_off,
            old_addr as u64,
            addr as u64,
            l4_flags | BPF_F_PSEUDO_HDR as u64 | 4,
        )
        .map_err(|_| ())?;
        ctx.l3_csum_replace(IP_CSUM_OFF, old_addr as u64, addr as u64, 4)
            .map_err(|_| ())?;
        ctx.store(addr_off, &addr, 0).map_err(|_| ())?;
    }
    if port != old_port {
        ctx.l4_csum_replace(csum_off, old_port as u64, port as u64, l4_flags | 2)
            .map_err(|_| ())?;
        ctx.store(port_off, &port, 0).map_err(|_| ())?;
    }
    Ok(())
}

/// Swaps the Ethernet source and destination, for a packet sent back out of the interface it
/// arrived on.
#[inline(always)]
pub fn swap_macs(ctx: &TcContext) -> Result<(), ()> {
    let macs: [u8; 12] = ctx.load(0).map_err(|_| ())?;
    let mut swapped = [0u8; 12];
    swapped[..6].copy_from_slice(&macs[6..]);
    swapped[6..].copy_from_slice(&macs[..6]);
    ctx.store(0, &swapped, 0).map_err(|_| ())
}

/// RFC 1624 eq. 3: the checksum `csum` after 16-bit words `old` became `new` (values as they
/// sit in the packet; one's-complement arithmetic does not depend on byte order).
#[inline(always)]
pub fn csum_replace(csum: u16, old: &[u16], new: &[u16]) -> u16 {
    let mut sum = u32::from(!csum);
    for w in old {
        sum += u32::from(!*w);
    }
    for w in new {
        sum += u32::from(*w);
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

#[inline(always)]
fn halves(v: u32) -> [u16; 2] {
    [v as u16, (v >> 16) as u16]
}

/// Reads a `T` at `off` in an XDP frame (`None` past its end), through
/// `bpf_xdp_load_bytes`: the kernel checks the bounds, so the access does not depend on the
/// verifier following LLVM's merged bounds checks across direct packet pointers.
#[inline(always)]
pub fn xdp_load<T: Copy + Default>(ctx: &XdpContext, off: usize) -> Option<T> {
    let mut v = T::default();
    // SAFETY: the helper writes at most `size_of::<T>()` bytes into `v`, a plain value on our
    // stack; `ctx.ctx` is the program's own context.
    let rc = unsafe {
        bpf_xdp_load_bytes(
            ctx.ctx,
            off as u32,
            (&mut v as *mut T).cast(),
            core::mem::size_of::<T>() as u32,
        )
    };
    (rc == 0).then_some(v)
}

/// Writes a `T` at `off` in an XDP frame (`None` past its end), through `bpf_xdp_store_bytes`.
#[inline(always)]
pub fn xdp_store<T: Copy>(ctx: &XdpContext, off: usize, mut v: T) -> Option<()> {
    // SAFETY: the helper reads `size_of::<T>()` bytes from `v`, a plain value on our stack;
    // `ctx.ctx` is the program's own context.
    let rc = unsafe {
        bpf_xdp_store_bytes(
            ctx.ctx,
            off as u32,
            (&mut v as *mut T).cast(),
            core::mem::size_of::<T>() as u32,
        )
    };
    (rc == 0).then_some(())
}

/// [`rewrite`] for an XDP frame.
#[inline(always)]
pub fn rewrite_xdp(
    ctx: &XdpContext,
    info: &Ipv4Info,
    end: End,
    addr: u32,
    port: u16,
) -> Result<(), ()> {
    // Bounded for the verifier; `parse` already guarantees it.
    let l4 = info.l4_off;
    if l4 > IP_OFF + 60 {
        return Err(());
    }
    let (old_addr, old_port, addr_off, port_off) = match end {
        End::Source => (info.saddr, info.sport, IP_SADDR_OFF, l4),
        End::Destination => (info.daddr, info.dport, IP_DADDR_OFF, l4 + 2),
    };
    let csum_off = if info.proto == IPPROTO_TCP {
        l4 + 16
    } else {
        l4 + 6
    };
    let old_l4: u16 = xdp_load(ctx, csum_off).ok_or(())?;
    // A UDP checksum of 0 means "none" and stays 0; a computed 0 is sent as 0xffff.
    let udp_none = info.proto != IPPROTO_TCP && old_l4 == 0;
    let mut new_l4 = old_l4;
    if addr != old_addr {
        let ip: u16 = xdp_load(ctx, IP_CSUM_OFF).ok_or(())?;
        xdp_store(
            ctx,
            IP_CSUM_OFF,
            csum_replace(ip, &halves(old_addr), &halves(addr)),
        )
        .ok_or(())?;
        new_l4 = csum_replace(new_l4, &halves(old_addr), &halves(addr));
        xdp_store(ctx, addr_off, addr).ok_or(())?;
    }
    if port != old_port {
        new_l4 = csum_replace(new_l4, &[old_port], &[port]);
        xdp_store(ctx, port_off, port).ok_or(())?;
    }
    if !udp_none {
        if info.proto != IPPROTO_TCP && new_l4 == 0 {
            new_l4 = 0xffff;
        }
        xdp_store(ctx, csum_off, new_l4).ok_or(())?;
    }
    Ok(())
}
