//! Rewriting addresses and ports of a TC packet with incremental checksum updates (the IPv4
//! header checksum, and the TCP/UDP checksum including its pseudo-header).

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};

use crate::packet::{IPPROTO_TCP, Ipv4Info};

const IP_OFF: usize = 14;
const IP_CSUM_OFF: usize = IP_OFF + 10;
const IP_SADDR_OFF: usize = IP_OFF + 12;
const IP_DADDR_OFF: usize = IP_OFF + 16;

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
