//! `from_pod`: tc ingress of a pod's host-side veth. Sees every packet the pod sends.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};
use aya_log_ebpf::debug;
use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv4Hdr,
};
use podwire_common::Reason;

use crate::{counters::verdict, parse::ptr_at};

#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    let (reason, action) = match try_from_pod(&ctx) {
        Ok(v) => v,
        Err(v) => v,
    };
    verdict(&ctx, reason, action)
}

fn try_from_pod(ctx: &TcContext) -> Result<(Reason, i32), (Reason, i32)> {
    const DROP_MALFORMED: (Reason, i32) = (Reason::DropMalformed, TC_ACT_SHOT as i32);

    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(DROP_MALFORMED)?;
    // SAFETY: ptr_at checked the header lies inside the packet.
    if unsafe { (*eth).ether_type } != EtherType::Ipv4 as u16 {
        return Ok((Reason::PassNotIpv4, TC_ACT_OK as i32));
    }
    let ip: *const Ipv4Hdr = ptr_at(ctx, EthHdr::LEN).ok_or(DROP_MALFORMED)?;
    // SAFETY: as above.
    let ip = unsafe { &*ip };
    if ip.ihl() < Ipv4Hdr::LEN as u8 {
        return Err(DROP_MALFORMED);
    }
    debug!(
        ctx,
        "from_pod: {:i} -> {:i} proto {} len {}: to host stack",
        ip.src_addr(),
        ip.dst_addr(),
        ip.proto,
        ctx.len()
    );
    Ok((Reason::PassToStack, TC_ACT_OK as i32))
}
