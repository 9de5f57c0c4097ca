//! `to_overlay`: tc egress of the agent's VXLAN device. Sees what `from_pod` redirected into the
//! tunnel (already carrying its tunnel key) and what the node's own stack routes to remote pod
//! CIDRs over the device, which gets its tunnel key here: the collect_md device drops packets
//! without one.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv4Hdr,
};
use podwire_common::Reason;

use crate::{counters::verdict, maps::node_of, parse::ptr_at, tunnel, Verdict, DROP_MALFORMED};

#[classifier]
pub fn to_overlay(ctx: TcContext) -> i32 {
    if tunnel::remote(&ctx).is_some() {
        // Keyed (and counted) by from_pod.
        return TC_ACT_OK as i32;
    }
    let (reason, action) = match try_to_overlay(&ctx) {
        Ok(v) => v,
        Err(v) => v,
    };
    verdict(&ctx, reason, action)
}

fn try_to_overlay(ctx: &TcContext) -> Result<Verdict, Verdict> {
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(DROP_MALFORMED)?;
    // SAFETY: ptr_at checked the header lies inside the packet.
    if unsafe { (*eth).ether_type } != EtherType::Ipv4 as u16 {
        return Err((Reason::PassNotIpv4, TC_ACT_SHOT as i32));
    }
    let ip: *const Ipv4Hdr = ptr_at(ctx, EthHdr::LEN).ok_or(DROP_MALFORMED)?;
    // SAFETY: as above.
    let dst = unsafe { (*ip).dst_addr };
    match node_of(dst) {
        Some(node) if node.flags == 0 => tunnel::set_key(ctx, &node)
            .map(|()| (Reason::EncapHost, TC_ACT_OK as i32))
            .map_err(|_| (Reason::DropEncapFailed, TC_ACT_SHOT as i32)),
        _ => Err((Reason::DropNoNode, TC_ACT_SHOT as i32)),
    }
}
