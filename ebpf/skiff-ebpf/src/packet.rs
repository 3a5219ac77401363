//! Safe parsing of Ethernet / IPv4 / TCP / UDP headers.
//!
//! [`parse`] validates what the kernel would later trust (IPv4 version, header length, total
//! length; TCP data offset; UDP length) so that later stages (service translation, policy) can
//! read fields without re-checking. Anything that is not IPv4 is passed through untouched.

use core::mem::size_of;

use network_types::{eth::EthHdr, ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};
use skiff_ebpf_common::DropReason;

const ETH_P_IP: u16 = 0x0800;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_SCTP: u8 = 132;
/// Offset mask of IPv4 `frag_off`: non-zero means a non-first fragment (no L4 header).
const IP_OFFSET_MASK: u16 = 0x1fff;
/// IPv4 "more fragments" flag.
const IP_MF: u16 = 0x2000;

/// What [`parse`] found.
#[derive(Clone, Copy)]
pub enum Packet {
    /// Not IPv4 (ARP, IPv6, …): not inspected.
    Other,
    /// A valid IPv4 packet.
    Ipv4(Ipv4Info),
}

/// The fields of a valid IPv4 packet that later stages use. Addresses and ports are in network
/// byte order, as they are in the packet and in map keys.
#[derive(Clone, Copy)]
pub struct Ipv4Info {
    pub saddr: u32,
    pub daddr: u32,
    pub proto: u8,
    /// Offset of the L4 header from the start of the frame.
    pub l4_off: usize,
    /// Source and destination port for TCP/UDP/SCTP first fragments; an ICMP echo's
    /// identifier in both; else 0.
    pub sport: u16,
    pub dport: u16,
    /// IPv4 header length in bytes.
    pub ihl: u8,
    /// TCP flags byte (FIN 0x01, SYN 0x02, RST 0x04, ACK 0x10) of a TCP first fragment, else 0.
    pub tcp_flags: u8,
    /// True when the packet is a TCP or UDP first fragment with its ports parsed (what the
    /// service stages take).
    pub has_ports: bool,
    /// A non-first fragment (no L4 header).
    pub later_fragment: bool,
    /// More fragments follow (a first fragment when not `later_fragment`).
    pub more_fragments: bool,
    /// The IPv4 identification (network order): names a datagram's fragments.
    pub ip_id: u16,
    /// An ICMP error (destination unreachable, time exceeded, parameter problem): it quotes
    /// another flow's packet, in `quoted`.
    pub icmp_error: bool,
    pub quoted: Quoted,
}

/// The packet an ICMP error quotes, as it was sent (network order; ports of TCP/UDP/SCTP, an
/// ICMP echo's identifier in both). All zero when the packet is too short to hold it.
#[derive(Clone, Copy, Default)]
pub struct Quoted {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
}

/// TCP flag bits in [`Ipv4Info::tcp_flags`].
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Why [`parse`] did not return a packet.
#[derive(Clone, Copy)]
pub enum ParseError {
    /// The packet is malformed: drop it with this reason.
    Drop(DropReason),
    /// The header extends past the linear data but the packet is long enough to hold it: a TC
    /// program should `bpf_skb_pull_data(len)` and parse again. (XDP never sees this.)
    NeedPull(u32),
}

/// Returns a pointer to a `T` at `offset`, if it lies entirely before `data_end`.
#[inline(always)]
fn ptr_at<T>(data: usize, data_end: usize, offset: usize) -> Option<*const T> {
    let start = data + offset;
    if start + size_of::<T>() > data_end {
        return None;
    }
    Some(start as *const T)
}

/// Fails with `reason` if the packet is shorter than `needed`, or asks for a pull if only the
/// linear part is.
#[inline(always)]
fn short(needed: usize, pkt_len: u32, reason: DropReason) -> ParseError {
    if (needed as u64) <= pkt_len as u64 {
        ParseError::NeedPull(needed as u32)
    } else {
        ParseError::Drop(reason)
    }
}

/// Parses and validates the headers of the frame in `data..data_end`.
///
/// `pkt_len` is the full length of the packet (`skb->len` for TC, which may exceed the linear
/// data; `data_end - data` for XDP).
#[inline(always)]
pub fn parse(data: usize, data_end: usize, pkt_len: u32) -> Result<Packet, ParseError> {
    let eth: *const EthHdr = ptr_at(data, data_end, 0)
        .ok_or_else(|| short(EthHdr::LEN, pkt_len, DropReason::MalformedEthernet))?;
    // SAFETY: `eth` was bounds-checked against `data_end` by `ptr_at`.
    let ether_type = u16::from_be(unsafe { (*eth).ether_type });
    if ether_type != ETH_P_IP {
        return Ok(Packet::Other);
    }

    let ip: *const Ipv4Hdr = ptr_at(data, data_end, EthHdr::LEN).ok_or_else(|| {
        short(
            EthHdr::LEN + Ipv4Hdr::LEN,
            pkt_len,
            DropReason::MalformedIpv4,
        )
    })?;
    // SAFETY: `ip` was bounds-checked against `data_end` by `ptr_at`.
    let ip = unsafe { &*ip };
    let malformed_ip = ParseError::Drop(DropReason::MalformedIpv4);
    if ip.vihl >> 4 != 4 {
        return Err(malformed_ip);
    }
    let ihl = ((ip.vihl & 0x0f) as usize) * 4;
    if ihl < Ipv4Hdr::LEN {
        return Err(malformed_ip);
    }
    let tot_len = u16::from_be_bytes(ip.tot_len) as u32;
    let l3_len = pkt_len.saturating_sub(EthHdr::LEN as u32);
    // A GSO super-packet over 64 KiB (BIG TCP) carries tot_len 0, as the kernel allows.
    let big_gso = tot_len == 0 && l3_len > u16::MAX as u32;
    if !big_gso && (tot_len < ihl as u32 || tot_len > l3_len) {
        return Err(malformed_ip);
    }

    let mut info = Ipv4Info {
        saddr: u32::from_ne_bytes(ip.src_addr),
        daddr: u32::from_ne_bytes(ip.dst_addr),
        proto: ip.proto,
        l4_off: EthHdr::LEN + ihl,
        sport: 0,
        dport: 0,
        ihl: ihl as u8,
        tcp_flags: 0,
        has_ports: false,
        later_fragment: false,
        more_fragments: u16::from_be_bytes(ip.frags) & IP_MF != 0,
        ip_id: u16::from_ne_bytes(ip.id),
        icmp_error: false,
        quoted: Quoted::default(),
    };
    if u16::from_be_bytes(ip.frags) & IP_OFFSET_MASK != 0 {
        // A later fragment carries no L4 header.
        info.later_fragment = true;
        return Ok(Packet::Ipv4(info));
    }
    let l4_room = if big_gso {
        u32::MAX
    } else {
        tot_len - ihl as u32
    };

    match info.proto {
        IPPROTO_TCP => {
            let tcp: *const TcpHdr = ptr_at(data, data_end, info.l4_off).ok_or_else(|| {
                short(info.l4_off + TcpHdr::LEN, pkt_len, DropReason::MalformedL4)
            })?;
            // SAFETY: `tcp` was bounds-checked against `data_end` by `ptr_at`.
            let tcp = unsafe { &*tcp };
            let doff = tcp.doff() as u32 * 4;
            if doff < TcpHdr::LEN as u32 || doff > l4_room {
                return Err(ParseError::Drop(DropReason::MalformedL4));
            }
            info.sport = u16::from_ne_bytes(tcp.source);
            info.dport = u16::from_ne_bytes(tcp.dest);
            // SAFETY: byte 13 of the TCP header is inside the bounds-checked `TcpHdr`.
            info.tcp_flags = unsafe { *((tcp as *const TcpHdr as *const u8).add(13)) };
            info.has_ports = true;
        }
        IPPROTO_UDP => {
            let udp: *const UdpHdr = ptr_at(data, data_end, info.l4_off).ok_or_else(|| {
                short(info.l4_off + UdpHdr::LEN, pkt_len, DropReason::MalformedL4)
            })?;
            // SAFETY: `udp` was bounds-checked against `data_end` by `ptr_at`.
            let udp = unsafe { &*udp };
            let len = u16::from_be_bytes(udp.len) as u32;
            // UDP length 0 is legal only for UDP GSO super-packets; keep to the RFC otherwise.
            // A first fragment's length is the whole datagram's, past this packet.
            if len < UdpHdr::LEN as u32 && !(len == 0 && big_gso)
                || len > l4_room && !info.more_fragments
            {
                return Err(ParseError::Drop(DropReason::MalformedL4));
            }
            info.sport = u16::from_ne_bytes(udp.src);
            info.dport = u16::from_ne_bytes(udp.dst);
            info.has_ports = true;
        }
        // Ports for policy only (SCTP's checksum is a CRC the service stages cannot update).
        IPPROTO_SCTP => {
            let ports: *const [u8; 4] = ptr_at(data, data_end, info.l4_off)
                .ok_or_else(|| short(info.l4_off + 4, pkt_len, DropReason::MalformedL4))?;
            // SAFETY: `ports` was bounds-checked against `data_end` by `ptr_at`.
            let ports = unsafe { *ports };
            info.sport = u16::from_ne_bytes([ports[0], ports[1]]);
            info.dport = u16::from_ne_bytes([ports[2], ports[3]]);
        }
        IPPROTO_ICMP => {
            // Type, code, checksum, then (echo) identifier and sequence.
            let icmp: *const [u8; 8] = ptr_at(data, data_end, info.l4_off)
                .ok_or_else(|| short(info.l4_off + 8, pkt_len, DropReason::MalformedL4))?;
            // SAFETY: `icmp` was bounds-checked against `data_end` by `ptr_at`.
            let icmp = unsafe { *icmp };
            match icmp[0] {
                // Echo reply and request: the identifier names the exchange both ways.
                0 | 8 => {
                    info.sport = u16::from_ne_bytes([icmp[4], icmp[5]]);
                    info.dport = info.sport;
                }
                3 | 11 | 12 => {
                    info.icmp_error = true;
                    info.quoted = quoted(data, data_end, pkt_len, info.l4_off + 8)?;
                }
                _ => {}
            }
        }
        _ => {}
    }
    Ok(Packet::Ipv4(info))
}

/// The packet quoted by an ICMP error at `off` (its IPv4 header, then at least 8 bytes of its
/// L4 header): a pull is asked for when it lies past the linear data; zeroes when the packet
/// is too short to hold it.
#[inline(always)]
fn quoted(data: usize, data_end: usize, pkt_len: u32, off: usize) -> Result<Quoted, ParseError> {
    let mut q = Quoted::default();
    let Some(ip) = ptr_at::<Ipv4Hdr>(data, data_end, off) else {
        return pull_or_none(off + Ipv4Hdr::LEN, pkt_len, q);
    };
    // SAFETY: `ip` was bounds-checked against `data_end` by `ptr_at`.
    let ip = unsafe { &*ip };
    let ihl = ((ip.vihl & 0x0f) as usize) * 4;
    if ip.vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN {
        return Ok(q);
    }
    let Some(l4) = ptr_at::<[u8; 8]>(data, data_end, off + ihl) else {
        return pull_or_none(off + ihl + 8, pkt_len, q);
    };
    // SAFETY: `l4` was bounds-checked against `data_end` by `ptr_at`.
    let l4 = unsafe { *l4 };
    q.saddr = u32::from_ne_bytes(ip.src_addr);
    q.daddr = u32::from_ne_bytes(ip.dst_addr);
    q.proto = ip.proto;
    if ip.proto == IPPROTO_ICMP {
        q.sport = u16::from_ne_bytes([l4[4], l4[5]]);
        q.dport = q.sport;
    } else {
        q.sport = u16::from_ne_bytes([l4[0], l4[1]]);
        q.dport = u16::from_ne_bytes([l4[2], l4[3]]);
    }
    Ok(q)
}

/// A pull when the packet holds `needed` bytes beyond the linear data, else `none`.
#[inline(always)]
fn pull_or_none(needed: usize, pkt_len: u32, none: Quoted) -> Result<Quoted, ParseError> {
    if (needed as u64) <= pkt_len as u64 {
        Err(ParseError::NeedPull(needed as u32))
    } else {
        Ok(none)
    }
}
