//! `to_overlay`: tc egress of the agent's VXLAN device. Sees what `from_pod` redirected into the
//! tunnel (already carrying its tunnel key) and what the node's own stack routes to remote pod
//! CIDRs over the device, which gets its tunnel key here: the collect_md device drops packets
//! without one. A flow from a pod here that the stack routed (a Service it NATed) is recorded,
//! so `from_overlay` hands its replies to the stack (see `flows`).

use aya_ebpf::{macros::classifier, programs::TcContext};
use podwire_common::Reason;

use crate::{
    counters::verdict,
    flows,
    maps::node_of,
    parse::eth_ipv4,
    tunnel::{self, FromControlBlock, FromMetadata, Remote},
    Outcome, TC_OK, TC_SHOT,
};

#[classifier]
pub fn to_overlay(ctx: TcContext) -> i32 {
    run::<FromMetadata>(&ctx)
}

/// `to_overlay` for BPF_PROG_TEST_RUN only, never attached: what it already finds keyed is
/// marked in `cb[0]`.
#[classifier]
pub fn test_to_overlay(ctx: TcContext) -> i32 {
    run::<FromControlBlock>(&ctx)
}

#[inline(always)]
fn run<R: Remote>(ctx: &TcContext) -> i32 {
    if R::tunnelled(ctx).is_some() {
        // Keyed (and counted) by from_pod.
        return TC_OK;
    }
    let (reason, action) = match try_to_overlay(ctx) {
        Ok(v) => v,
        Err(v) => v,
    };
    verdict(ctx, reason, action)
}

#[inline(always)]
fn try_to_overlay(ctx: &TcContext) -> Result<Outcome, Outcome> {
    // The device has no ARP and no IPv6, so nothing but IPv4 is expected; anything else goes on
    // unkeyed, for the VXLAN driver to discard.
    let Some((_, ip)) = eth_ipv4(ctx)? else {
        return Ok((Reason::PassNotIpv4, TC_OK));
    };
    match node_of(ip.dst_addr) {
        Some(node) if node.is_remote() => {
            tunnel::set_key(ctx, &node).map_err(|_| (Reason::DropEncapFailed, TC_SHOT))?;
            // The stack routed it here: a pod's packet it NATed, say, whose replies must come
            // back through it.
            flows::record(ctx, ip);
            Ok((Reason::EncapHost, TC_OK))
        }
        _ => Err((Reason::DropNoNode, TC_SHOT)),
    }
}
