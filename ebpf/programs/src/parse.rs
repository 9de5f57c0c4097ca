//! Bounds-checked access to packet headers.

use network_types::{
    eth::{EthHdr, EtherType},
    ip::{IpProto, Ipv4Hdr},
};

use crate::{frame::Frame, Outcome, DROP_MALFORMED};

/// The `T` at `offset` in the packet, or `None` when the packet is too short for it.
#[inline(always)]
pub fn header<C: Frame, T>(ctx: &C, offset: usize) -> Option<&T> {
    let start = ctx.data();
    if start + offset + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    // SAFETY: the header lies inside the packet, which outlives `ctx`'s borrow; the packet
    // headers are plain bytes, valid for any value.
    Some(unsafe { &*((start + offset) as *const T) })
}

/// The Ethernet and IPv4 headers: `Ok(None)` when the frame is not IPv4, a malformed-drop
/// outcome when it is too short for them or its IPv4 header length is below 20 bytes.
#[inline(always)]
pub fn eth_ipv4<C: Frame>(ctx: &C) -> Result<Option<(&EthHdr, &Ipv4Hdr)>, Outcome> {
    let eth: &EthHdr = header(ctx, 0).ok_or(DROP_MALFORMED)?;
    if eth.ether_type != EtherType::Ipv4 as u16 {
        return Ok(None);
    }
    Ok(Some((eth, ipv4(ctx)?)))
}

/// The IPv4 header after the Ethernet header, checked as [`eth_ipv4`] does.
#[inline(always)]
pub fn ipv4<C: Frame>(ctx: &C) -> Result<&Ipv4Hdr, Outcome> {
    let ip: &Ipv4Hdr = header(ctx, EthHdr::LEN).ok_or(DROP_MALFORMED)?;
    if ip.ihl() < Ipv4Hdr::LEN as u8 {
        return Err(DROP_MALFORMED);
    }
    Ok(ip)
}

/// Whether `ip` is a fragment (more to come, or not the first).
#[inline(always)]
pub fn is_fragment(ip: &Ipv4Hdr) -> bool {
    // MF flag and the 13-bit offset; DF alone is no fragment.
    u16::from_be_bytes(ip.frags) & 0x3fff != 0
}

/// Whether `ip` is a fragment other than the first, which carries no transport header.
#[inline(always)]
pub fn is_later_fragment(ip: &Ipv4Hdr) -> bool {
    u16::from_be_bytes(ip.frags) & 0x1fff != 0
}

/// The transport ports (network byte order) of a TCP, UDP or SCTP packet whose IPv4 header is
/// `ip` (not a later fragment); zeros for other protocols; `None` when the packet is too short
/// for them.
#[inline(always)]
pub fn ports<C: Frame>(ctx: &C, ip: &Ipv4Hdr) -> Option<([u8; 2], [u8; 2])> {
    match ip.proto {
        p if p == IpProto::Tcp as u8 || p == IpProto::Udp as u8 || p == IpProto::Sctp as u8 => {
            // All three start with source and destination port.
            let offset = EthHdr::LEN + usize::from(ip.ihl());
            let ports: &[[u8; 2]; 2] = header(ctx, offset)?;
            Some((ports[0], ports[1]))
        }
        _ => Some(([0; 2], [0; 2])),
    }
}
