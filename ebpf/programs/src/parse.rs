//! Bounds-checked access to packet headers.

use aya_ebpf::programs::TcContext;
use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv4Hdr,
};

use crate::{Outcome, DROP_MALFORMED};

/// A pointer to a `T` at `offset` in the packet, or `None` when the packet is too short.
#[inline(always)]
pub fn ptr_at<T>(ctx: &TcContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}

/// The Ethernet and IPv4 headers: `Ok(None)` when the frame is not IPv4, a malformed-drop
/// verdict when it is too short for them or its IPv4 header length is below 20 bytes.
#[inline(always)]
pub fn eth_ipv4(ctx: &TcContext) -> Result<Option<(&EthHdr, &Ipv4Hdr)>, Outcome> {
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(DROP_MALFORMED)?;
    // SAFETY: ptr_at checked the header lies inside the packet, which outlives `ctx`'s borrow.
    let eth = unsafe { &*eth };
    if eth.ether_type != EtherType::Ipv4 as u16 {
        return Ok(None);
    }
    let ip: *const Ipv4Hdr = ptr_at(ctx, EthHdr::LEN).ok_or(DROP_MALFORMED)?;
    // SAFETY: as above.
    let ip = unsafe { &*ip };
    if ip.ihl() < Ipv4Hdr::LEN as u8 {
        return Err(DROP_MALFORMED);
    }
    Ok(Some((eth, ip)))
}
