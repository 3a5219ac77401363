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
