//! Hand-built frames: for BPF_PROG_TEST_RUN, for packet sockets in a pod, and VXLAN payloads sent
//! to a node as another node would.

use std::net::{Ipv4Addr, Ipv6Addr};

pub const ETH_IPV4: u16 = 0x0800;
pub const ETH_ARP: u16 = 0x0806;
pub const ETH_IPV6: u16 = 0x86dd;
/// 802.1Q (C-tag) and 802.1ad (S-tag) tag protocol identifiers.
pub const ETH_8021Q: u16 = 0x8100;
pub const ETH_8021AD: u16 = 0x88a8;
/// LLDP: an ethertype no pod needs.
pub const ETH_LLDP: u16 = 0x88cc;
/// Ethernet header length.
pub const ETH_LEN: usize = 14;
/// Offset of the IPv4 TTL in an Ethernet frame.
pub const TTL_OFFSET: usize = ETH_LEN + 8;

/// An Ethernet header.
pub fn eth(dst: [u8; 6], src: [u8; 6], ether_type: u16) -> Vec<u8> {
    let mut frame = Vec::with_capacity(64);
    frame.extend_from_slice(&dst);
    frame.extend_from_slice(&src);
    frame.extend_from_slice(&ether_type.to_be_bytes());
    frame
}

/// An ARP frame from `src_mac` with a zero payload (no valid Ethernet/IPv4 ARP).
pub fn arp(src_mac: [u8; 6]) -> Vec<u8> {
    ether(src_mac, ETH_ARP, 28)
}

/// An Ethernet/IPv4 ARP request, broadcast from `src_mac`, whose sender is `sha`/`spa`, asking
/// for `tpa`.
pub fn arp_request(src_mac: [u8; 6], sha: [u8; 6], spa: Ipv4Addr, tpa: Ipv4Addr) -> Vec<u8> {
    let mut frame = eth([0xff; 6], src_mac, ETH_ARP);
    frame.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]);
    frame.extend_from_slice(&sha);
    frame.extend_from_slice(&spa.octets());
    frame.extend_from_slice(&[0; 6]);
    frame.extend_from_slice(&tpa.octets());
    frame
}

/// `frame` with a VLAN tag (`tpid`, VLAN `vid`) inserted after its MAC addresses; tag twice for
/// QinQ.
pub fn vlan_tagged(frame: &[u8], tpid: u16, vid: u16) -> Vec<u8> {
    let mut tagged = frame[..12].to_vec();
    tagged.extend_from_slice(&tpid.to_be_bytes());
    tagged.extend_from_slice(&(vid & 0x0fff).to_be_bytes());
    tagged.extend_from_slice(&frame[12..]);
    tagged
}

/// A frame of `ether_type` from `src_mac` with `len` zero bytes of payload.
pub fn ether(src_mac: [u8; 6], ether_type: u16, len: usize) -> Vec<u8> {
    let mut frame = eth([0xff; 6], src_mac, ether_type);
    frame.resize(ETH_LEN + len, 0);
    frame
}

/// An ICMPv6 router advertisement from `src_mac`/`src` (a link-local address) to all nodes,
/// announcing a default router for 1800 s and the prefix 2001:db8:77::/64 for autoconfiguration,
/// with a valid checksum: what a host accepting advertisements acts on.
pub fn router_advertisement(src_mac: [u8; 6], src: Ipv6Addr) -> Vec<u8> {
    let dst: Ipv6Addr = "ff02::1".parse().expect("all-nodes address");
    // Type 134, code 0, checksum, hop limit 64, flags 0, router lifetime 1800, reachable and
    // retransmit timers 0.
    let mut icmp = vec![134, 0, 0, 0, 64, 0];
    icmp.extend_from_slice(&1800u16.to_be_bytes());
    icmp.extend_from_slice(&[0; 8]);
    // Source link-layer address option.
    icmp.extend_from_slice(&[1, 1]);
    icmp.extend_from_slice(&src_mac);
    // Prefix information option: /64, on-link and autonomous, lifetimes 1 hour.
    icmp.extend_from_slice(&[3, 4, 64, 0xc0]);
    icmp.extend_from_slice(&3600u32.to_be_bytes());
    icmp.extend_from_slice(&3600u32.to_be_bytes());
    icmp.extend_from_slice(&[0; 4]);
    let prefix: Ipv6Addr = "2001:db8:77::".parse().expect("a prefix");
    icmp.extend_from_slice(&prefix.octets());
    // ICMPv6 checksums cover a pseudo-header: addresses, length, next header.
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&(icmp.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 58]);
    pseudo.extend_from_slice(&icmp);
    let sum = checksum(&pseudo);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());

    let mut frame = eth([0x33, 0x33, 0, 0, 0, 1], src_mac, ETH_IPV6);
    frame.extend_from_slice(&[0x60, 0, 0, 0]);
    frame.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    // Next header ICMPv6, hop limit 255 as neighbour discovery requires.
    frame.extend_from_slice(&[58, 255]);
    frame.extend_from_slice(&src.octets());
    frame.extend_from_slice(&dst.octets());
    frame.extend_from_slice(&icmp);
    frame
}

/// `frame` (Ethernet + IPv4) marked as the first fragment of more (MF set), its checksum
/// updated.
pub fn first_fragment(frame: &[u8]) -> Vec<u8> {
    let mut frame = frame.to_vec();
    frame[ETH_LEN + 6] = 0x20;
    frame[ETH_LEN + 7] = 0;
    fix_ipv4_checksum(&mut frame);
    frame
}

/// An ICMP destination-unreachable (port unreachable) from `src` to `dst` quoting `quoted`, an
/// Ethernet + IPv4 frame whose IPv4 header and first 8 payload bytes it carries.
pub fn icmp_unreachable(src_mac: [u8; 6], src: Ipv4Addr, dst: Ipv4Addr, quoted: &[u8]) -> Vec<u8> {
    let mut icmp = vec![3, 3, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&quoted[ETH_LEN..ETH_LEN + 28]);
    let sum = checksum(&icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    ipv4_frame(src_mac, src, dst, 1, &icmp)
}

/// An Ethernet + IPv4 frame from `src_mac` carrying `payload` of protocol `proto`.
pub fn ipv4_frame(
    src_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut frame = eth([0x02, 0, 0, 0, 0, 1], src_mac, ETH_IPV4);
    let total = (20 + payload.len()) as u16;
    frame.extend_from_slice(&[0x45, 0]);
    frame.extend_from_slice(&total.to_be_bytes());
    frame.extend_from_slice(&[0, 0, 0x40, 0, 64, proto, 0, 0]);
    frame.extend_from_slice(&src.octets());
    frame.extend_from_slice(&dst.octets());
    fix_ipv4_checksum(&mut frame);
    frame.extend_from_slice(payload);
    frame
}

/// A tunnel packet as it arrives on a node's underlay interface: Ethernet, IPv4 from `src` to
/// `dst`, UDP to port `port`, VXLAN with `vni`, then `inner`.
pub fn vxlan_frame(src: Ipv4Addr, dst: Ipv4Addr, port: u16, vni: u32, inner: &[u8]) -> Vec<u8> {
    udp_v4_ports(
        [0x02, 0, 0, 0, 0, 0x77],
        src,
        dst,
        (4789, port),
        &vxlan(vni, inner),
    )
}

/// Recomputes the IPv4 header checksum of an Ethernet + IPv4 frame (20-byte header).
fn fix_ipv4_checksum(frame: &mut [u8]) {
    frame[ETH_LEN + 10..ETH_LEN + 12].copy_from_slice(&[0, 0]);
    let sum = checksum(&frame[ETH_LEN..ETH_LEN + 20]);
    frame[ETH_LEN + 10..ETH_LEN + 12].copy_from_slice(&sum.to_be_bytes());
}

/// An Ethernet + IPv4 + UDP frame from `src_mac` carrying `payload` from port 40000 to 5000,
/// with a valid IPv4 header checksum.
pub fn udp_v4(src_mac: [u8; 6], src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    udp_v4_ports(src_mac, src, dst, (40000, 5000), payload)
}

/// [`udp_v4`] between the ports `(sport, dport)`.
pub fn udp_v4_ports(
    src_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    (sport, dport): (u16, u16),
    payload: &[u8],
) -> Vec<u8> {
    let mut udp = sport.to_be_bytes().to_vec();
    udp.extend_from_slice(&dport.to_be_bytes());
    udp.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    ipv4_frame(src_mac, src, dst, 17, &udp)
}

/// A VXLAN header (flags: VNI valid) with `vni`, followed by `inner`: the UDP payload a node
/// sends to another node's port 4789.
pub fn vxlan(vni: u32, inner: &[u8]) -> Vec<u8> {
    let mut payload = vec![0x08, 0, 0, 0];
    payload.extend_from_slice(&(vni << 8).to_be_bytes());
    payload.extend_from_slice(inner);
    payload
}

/// The Internet checksum (RFC 1071) of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn udp_frames_carry_a_valid_ipv4_checksum_and_the_vni_in_place() {
        let frame = udp_v4(
            [2, 0, 0, 0, 0, 2],
            Ipv4Addr::new(10, 244, 1, 2),
            Ipv4Addr::new(10, 244, 2, 2),
            b"x",
        );
        assert_eq!(checksum(&frame[ETH_LEN..ETH_LEN + 20]), 0);
        assert_eq!(frame.len(), ETH_LEN + 20 + 8 + 1);
        assert_eq!(&vxlan(42, &frame)[..8], &[0x08, 0, 0, 0, 0, 0, 42, 0]);
    }
}
