//! Hand-built frames for packet tests, made with `etherparse` and then, for the malformed
//! cases, corrupted byte by byte at known offsets.

use etherparse::PacketBuilder;

/// Ethernet header length.
pub const ETH_LEN: usize = 14;
/// Offset of the IPv4 total-length field in a frame.
pub const IPV4_TOT_LEN: usize = ETH_LEN + 2;

/// Source MAC used by test frames.
pub const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// Destination MAC used by test frames when none is given.
pub const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// A valid Ethernet/IPv4/UDP frame.
pub fn udp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    udp_to(DST_MAC, src, dst, sport, dport, payload)
}

/// A valid Ethernet/IPv4/UDP frame to `dst_mac`.
pub fn udp_to(
    dst_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(SRC_MAC, dst_mac)
        .ipv4(src, dst, 64)
        .udp(sport, dport);
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, payload).expect("write to Vec");
    out
}

/// A valid Ethernet/IPv4/TCP SYN frame.
pub fn tcp_syn(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(SRC_MAC, DST_MAC)
        .ipv4(src, dst, 64)
        .tcp(sport, dport, 1, 64240)
        .syn();
    let mut out = Vec::with_capacity(b.size(0));
    b.write(&mut out, &[]).expect("write to Vec");
    out
}

/// Sets the IPv4 header-length nibble (in 32-bit words) of a frame, keeping the version.
pub fn set_ihl(frame: &mut [u8], words: u8) {
    frame[ETH_LEN] = (frame[ETH_LEN] & 0xf0) | (words & 0x0f);
}

/// Sets the IPv4 version nibble of a frame.
pub fn set_ip_version(frame: &mut [u8], version: u8) {
    frame[ETH_LEN] = (version << 4) | (frame[ETH_LEN] & 0x0f);
}

/// Sets the IPv4 total length of a frame.
pub fn set_tot_len(frame: &mut [u8], len: u16) {
    frame[IPV4_TOT_LEN..IPV4_TOT_LEN + 2].copy_from_slice(&len.to_be_bytes());
}

/// Sets the IPv4 TTL of a valid frame, with a correct header checksum.
pub fn set_ttl(frame: &mut [u8], ttl: u8) {
    let (mut h, _) = etherparse::Ipv4Header::from_slice(&frame[ETH_LEN..]).expect("an IPv4 header");
    h.time_to_live = ttl;
    h.header_checksum = h.calc_header_checksum();
    let mut out = Vec::with_capacity(h.header_len());
    h.write(&mut out).expect("write the IPv4 header");
    frame[ETH_LEN..ETH_LEN + out.len()].copy_from_slice(&out);
}

/// Offset of the L4 header of a frame with a 20-byte IPv4 header.
pub const L4: usize = ETH_LEN + 20;

/// An ARP request frame (not IPv4: the data path passes it untouched).
pub fn arp_request(sender: [u8; 4], target: [u8; 4]) -> Vec<u8> {
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&SRC_MAC);
    f.extend_from_slice(&0x0806u16.to_be_bytes());
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]); // Ethernet/IPv4, request
    f.extend_from_slice(&SRC_MAC);
    f.extend_from_slice(&sender);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target);
    f
}

/// TCP flags for [`tcp`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Flags {
    pub syn: bool,
    pub ack: bool,
    pub fin: bool,
    pub rst: bool,
}

/// SYN.
pub const SYN: Flags = Flags {
    syn: true,
    ack: false,
    fin: false,
    rst: false,
};
/// ACK.
pub const ACK: Flags = Flags {
    syn: false,
    ack: true,
    fin: false,
    rst: false,
};
/// SYN|ACK.
pub const SYN_ACK: Flags = Flags {
    syn: true,
    ack: true,
    fin: false,
    rst: false,
};
/// FIN|ACK.
pub const FIN_ACK: Flags = Flags {
    syn: false,
    ack: true,
    fin: true,
    rst: false,
};

/// A valid Ethernet/IPv4/TCP frame with the given flags, sequence and acknowledgment numbers.
#[expect(
    clippy::too_many_arguments,
    reason = "one argument per header field a test varies"
)]
pub fn tcp(
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    flags: Flags,
    seq: u32,
    ack: u32,
    payload: &[u8],
) -> Vec<u8> {
    let mut b = PacketBuilder::ethernet2(SRC_MAC, DST_MAC)
        .ipv4(src, dst, 64)
        .tcp(sport, dport, seq, 64240);
    if flags.syn {
        b = b.syn();
    }
    if flags.ack {
        b = b.ack(ack);
    }
    if flags.fin {
        b = b.fin();
    }
    if flags.rst {
        b = b.rst();
    }
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, payload).expect("write to Vec");
    out
}

/// What a test reads back from a frame a program returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decoded {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub proto: u8,
    pub ttl: u8,
    pub sport: u16,
    pub dport: u16,
    /// The IPv4 header checksum is right.
    pub ip_checksum_ok: bool,
    /// The TCP/UDP/ICMP checksum is right (a UDP checksum of 0, "none", counts as right).
    pub l4_checksum_ok: bool,
    /// TCP: (SYN, ACK, FIN, RST).
    pub tcp_flags: (bool, bool, bool, bool),
    pub seq: u32,
    pub ack: u32,
    /// ICMP messages.
    pub icmp: Option<Icmp>,
    pub payload: Vec<u8>,
}

/// An ICMP error message and what it quotes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Icmp {
    pub icmp_type: u8,
    pub code: u8,
    /// The quoted IPv4 header's source, destination and protocol.
    pub quoted_src: [u8; 4],
    pub quoted_dst: [u8; 4],
    pub quoted_proto: u8,
    /// The quoted L4 ports.
    pub quoted_sport: u16,
    pub quoted_dport: u16,
}

/// Decodes an Ethernet/IPv4 frame, checking its checksums.
pub fn decode(frame: &[u8]) -> Decoded {
    use etherparse::{InternetSlice, SlicedPacket, TransportSlice};
    let p = SlicedPacket::from_ethernet(frame).expect("a well-formed frame");
    let Some(etherparse::LinkSlice::Ethernet2(eth)) = &p.link else {
        panic!("not Ethernet II")
    };
    let Some(InternetSlice::Ipv4(ip)) = &p.net else {
        panic!("not IPv4")
    };
    let iph = ip.header().to_header();
    let mut d = Decoded {
        src_mac: eth.source(),
        dst_mac: eth.destination(),
        src: iph.source,
        dst: iph.destination,
        proto: iph.protocol.0,
        ttl: iph.time_to_live,
        sport: 0,
        dport: 0,
        ip_checksum_ok: iph.calc_header_checksum() == iph.header_checksum,
        l4_checksum_ok: false,
        tcp_flags: (false, false, false, false),
        seq: 0,
        ack: 0,
        icmp: None,
        payload: Vec::new(),
    };
    match &p.transport {
        Some(TransportSlice::Tcp(t)) => {
            let h = t.to_header();
            d.sport = h.source_port;
            d.dport = h.destination_port;
            d.tcp_flags = (h.syn, h.ack, h.fin, h.rst);
            d.seq = h.sequence_number;
            d.ack = h.acknowledgment_number;
            d.payload = t.payload().to_vec();
            d.l4_checksum_ok = h
                .calc_checksum_ipv4(&iph, t.payload())
                .is_ok_and(|c| c == h.checksum);
        }
        Some(TransportSlice::Udp(u)) => {
            let h = u.to_header();
            d.sport = h.source_port;
            d.dport = h.destination_port;
            d.payload = u.payload().to_vec();
            d.l4_checksum_ok = h.checksum == 0
                || h.calc_checksum_ipv4(&iph, u.payload())
                    .is_ok_and(|c| c == h.checksum);
        }
        Some(TransportSlice::Icmpv4(i)) => {
            let h = i.header();
            d.l4_checksum_ok = h.icmp_type.calc_checksum(i.payload()) == h.checksum;
            let q = i.payload();
            let quoted = etherparse::Ipv4HeaderSlice::from_slice(q).expect("quoted IPv4 header");
            let l4 = &q[quoted.slice().len()..];
            d.icmp = Some(Icmp {
                icmp_type: i.type_u8(),
                code: i.code_u8(),
                quoted_src: quoted.source(),
                quoted_dst: quoted.destination(),
                quoted_proto: quoted.protocol().0,
                quoted_sport: u16::from_be_bytes([l4[0], l4[1]]),
                quoted_dport: u16::from_be_bytes([l4[2], l4[3]]),
            });
        }
        _ => {}
    }
    d
}

/// A valid Ethernet/IPv4/ICMP echo request (`reply`: echo reply) with identifier `id`.
pub fn icmp_echo(src: [u8; 4], dst: [u8; 4], id: u16, seq: u16, reply: bool) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(SRC_MAC, DST_MAC).ipv4(src, dst, 64);
    let b = if reply {
        b.icmpv4_echo_reply(id, seq)
    } else {
        b.icmpv4_echo_request(id, seq)
    };
    let mut out = Vec::with_capacity(b.size(8));
    b.write(&mut out, &[0; 8]).expect("write to Vec");
    out
}

/// An Ethernet/IPv4 frame carrying an SCTP common header (ports, verification tag, a zero
/// checksum) and no chunks: enough for the programs, which read only the ports.
pub fn sctp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(SRC_MAC, DST_MAC).ipv4(src, dst, 64);
    let mut header = Vec::new();
    header.extend_from_slice(&sport.to_be_bytes());
    header.extend_from_slice(&dport.to_be_bytes());
    header.extend_from_slice(&[0; 8]);
    let mut out = Vec::new();
    b.write(&mut out, etherparse::IpNumber::SCTP, &header)
        .expect("write to Vec");
    out
}

/// An Ethernet/IPv4 ICMP "host unreachable" from `src` to `dst` quoting `quoted` (the
/// original packet's IPv4 header and the first 8 bytes after it).
pub fn icmp_unreachable(src: [u8; 4], dst: [u8; 4], quoted: &[u8]) -> Vec<u8> {
    use etherparse::{Icmpv4Type, icmpv4::DestUnreachableHeader};
    let b = PacketBuilder::ethernet2(SRC_MAC, DST_MAC)
        .ipv4(src, dst, 64)
        .icmpv4(Icmpv4Type::DestinationUnreachable(
            DestUnreachableHeader::Host,
        ));
    let mut out = Vec::with_capacity(b.size(quoted.len()));
    b.write(&mut out, quoted).expect("write to Vec");
    out
}

/// Makes `frame` (Ethernet/IPv4) a fragment of datagram `id`: the first (more fragments
/// follow) when `offset_words` is 0, else a later one at `offset_words` × 8 bytes. The IPv4
/// checksum is not recomputed.
pub fn fragment(frame: &mut [u8], id: u16, offset_words: u16) {
    frame[ETH_LEN + 4..ETH_LEN + 6].copy_from_slice(&id.to_be_bytes());
    let frags: u16 = if offset_words == 0 {
        0x2000
    } else {
        offset_words & 0x1fff
    };
    frame[ETH_LEN + 6..ETH_LEN + 8].copy_from_slice(&frags.to_be_bytes());
}
