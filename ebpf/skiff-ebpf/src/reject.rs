//! Rejecting a new connection at once, in place: a TCP segment becomes a RST, a UDP datagram an
//! ICMP port unreachable, sent back to the sender as if from the address it tried to reach.
//! The caller redirects the packet back out of the interface it came in on.

use aya_ebpf::{
    bindings::bpf_adj_room_mode::BPF_ADJ_ROOM_NET, helpers::bpf_skb_change_tail,
    programs::TcContext,
};

use crate::{
    nat,
    packet::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, Ipv4Info, TCP_ACK, TCP_RST},
};

const IP_OFF: usize = 14;

/// Turns the packet into the rejection of itself. Fails for packets it cannot answer (IP
/// options, other protocols); the caller drops those.
#[inline(always)]
pub fn reject(ctx: &TcContext, info: &Ipv4Info) -> Result<(), ()> {
    // A RST is never answered with a RST (RFC 793); IP options are not copied.
    if info.ihl != 20 || (info.proto == IPPROTO_TCP && info.tcp_flags & TCP_RST != 0) {
        return Err(());
    }
    match info.proto {
        IPPROTO_TCP => tcp_rst(ctx, info)?,
        IPPROTO_UDP => icmp_port_unreachable(ctx, info)?,
        _ => return Err(()),
    }
    nat::swap_macs(ctx)
}

/// Folds a 32-bit one's-complement sum into the 16-bit checksum field value.
#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// One's-complement sum of `bytes` read as big-endian 16-bit words.
#[inline(always)]
fn sum_words<const N: usize>(bytes: &[u8; N]) -> u32 {
    let mut sum = 0u32;
    let mut i = 0;
    while i + 1 < N {
        sum += u16::from_be_bytes([bytes[i], bytes[i + 1]]) as u32;
        i += 2;
    }
    sum
}

/// A fresh 20-byte IPv4 header from `src` to `dst` (network-order values as in packets).
#[inline(always)]
fn ip_header(src: u32, dst: u32, proto: u8, tot_len: u16) -> [u8; 20] {
    let mut h = [0u8; 20];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&tot_len.to_be_bytes());
    h[6] = 0x40; // don't fragment
    h[8] = 64; // TTL
    h[9] = proto;
    h[12..16].copy_from_slice(&src.to_ne_bytes());
    h[16..20].copy_from_slice(&dst.to_ne_bytes());
    let c = fold(sum_words(&h));
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h
}

/// RFC 793 reset generation: for a segment with ACK, `seq = its ack`; otherwise `seq = 0`,
/// `ack = its seq + its length (SYN and FIN count one)`, flags RST|ACK.
#[inline(always)]
fn tcp_rst(ctx: &TcContext, info: &Ipv4Info) -> Result<(), ()> {
    let l4 = info.l4_off;
    let seq = u32::from_be(ctx.load::<u32>(l4 + 4).map_err(|_| ())?);
    let ack = u32::from_be(ctx.load::<u32>(l4 + 8).map_err(|_| ())?);
    let doff_byte: u8 = ctx.load(l4 + 12).map_err(|_| ())?;
    let tot_len = u16::from_be(ctx.load::<u16>(IP_OFF + 2).map_err(|_| ())?) as u32;
    let payload = tot_len.saturating_sub(20 + ((doff_byte >> 4) as u32) * 4);
    let flags = info.tcp_flags;
    let mut t = [0u8; 20];
    t[0..2].copy_from_slice(&info.dport.to_ne_bytes());
    t[2..4].copy_from_slice(&info.sport.to_ne_bytes());
    if flags & TCP_ACK != 0 {
        t[4..8].copy_from_slice(&ack.to_be_bytes());
        t[13] = 0x04; // RST
    } else {
        let used = payload + (flags & 0x01) as u32 + ((flags >> 1) & 0x01) as u32;
        t[8..12].copy_from_slice(&seq.wrapping_add(used).to_be_bytes());
        t[13] = 0x14; // RST|ACK
    }
    t[12] = 5 << 4;
    // Pseudo-header: addresses swapped, protocol, TCP length 20.
    let (src, dst) = (info.daddr, info.saddr);
    let pseudo =
        sum_words(&src.to_ne_bytes()) + sum_words(&dst.to_ne_bytes()) + IPPROTO_TCP as u32 + 20;
    let c = fold(pseudo + sum_words(&t));
    t[16..18].copy_from_slice(&c.to_be_bytes());
    let ip = ip_header(src, dst, IPPROTO_TCP, 40);
    // SAFETY: `ctx.skb.skb` is the program's own context pointer.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, (IP_OFF + 40) as u32, 0) } != 0 {
        return Err(());
    }
    ctx.store(IP_OFF, &ip, 0).map_err(|_| ())?;
    ctx.store(IP_OFF + 20, &t, 0).map_err(|_| ())
}

/// RFC 792 destination unreachable, code 3 (port): the original IP header and the first 8
/// bytes of its datagram follow the ICMP header. Room for the new IP and ICMP headers is made
/// after the original IP header, which then moves behind them.
#[inline(always)]
fn icmp_port_unreachable(ctx: &TcContext, info: &Ipv4Info) -> Result<(), ()> {
    let orig_ip: [u8; 20] = ctx.load(IP_OFF).map_err(|_| ())?;
    let orig_l4: [u8; 8] = ctx.load(IP_OFF + 20).map_err(|_| ())?;
    let mut icmp = [0u8; 8];
    icmp[0] = 3; // destination unreachable
    icmp[1] = 3; // port unreachable
    let c = fold(sum_words(&icmp) + sum_words(&orig_ip) + sum_words(&orig_l4));
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let ip = ip_header(info.daddr, info.saddr, IPPROTO_ICMP, 20 + 8 + 20 + 8);
    ctx.adjust_room(28, BPF_ADJ_ROOM_NET, 0).map_err(|_| ())?;
    // SAFETY: `ctx.skb.skb` is the program's own context pointer.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, (IP_OFF + 56) as u32, 0) } != 0 {
        return Err(());
    }
    ctx.store(IP_OFF, &ip, 0).map_err(|_| ())?;
    ctx.store(IP_OFF + 20, &icmp, 0).map_err(|_| ())?;
    ctx.store(IP_OFF + 28, &orig_ip, 0).map_err(|_| ())?;
    ctx.store(IP_OFF + 48, &orig_l4, 0).map_err(|_| ())
}
