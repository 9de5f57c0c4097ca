//! Hand-built frames: for BPF_PROG_TEST_RUN, for packet sockets in a pod, and VXLAN payloads sent
//! to a node as another node would.

use std::net::Ipv4Addr;

pub const ETH_IPV4: u16 = 0x0800;
pub const ETH_ARP: u16 = 0x0806;
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

/// An ARP frame from `src_mac` (broadcast, zero payload).
pub fn arp(src_mac: [u8; 6]) -> Vec<u8> {
    let mut frame = eth([0xff; 6], src_mac, ETH_ARP);
    frame.extend_from_slice(&[0; 28]);
    frame
}

/// An Ethernet + IPv4 + UDP frame from `src_mac` carrying `payload` from port 40000 to 5000,
/// with a valid IPv4 header checksum.
pub fn udp_v4(src_mac: [u8; 6], src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let mut frame = eth([0x02, 0, 0, 0, 0, 1], src_mac, ETH_IPV4);
    let total = (20 + 8 + payload.len()) as u16;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let sum = checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&40000u16.to_be_bytes());
    frame.extend_from_slice(&5000u16.to_be_bytes());
    frame.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
    frame.extend_from_slice(&[0, 0]);
    frame.extend_from_slice(payload);
    frame
}

/// Sets the UDP destination port of a frame made by [`udp_v4`].
pub fn set_udp_dst_port(frame: &mut [u8], port: u16) {
    frame[ETH_LEN + 20 + 2..ETH_LEN + 20 + 4].copy_from_slice(&port.to_be_bytes());
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
