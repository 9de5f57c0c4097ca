//! `from_overlay`: tc ingress of the agent's VXLAN device. Sees every packet other nodes tunnelled
//! to this one, already decapsulated, with the tunnel's remote address in its metadata.
//!
//! The tunnel must be the cluster's (its VNI), and the inner source owned by the node that sent
//! it (one of its pods, or the node itself): anti-spoofing across nodes. A packet for a pod here
//! is delivered straight into it, unless it answers a flow this node's stack delivered (a Service
//! it NATed), which goes up the stack for conntrack to reverse; a packet for this node's address
//! goes up the stack; anything else is dropped: a node relays for nobody.

use aya_ebpf::{macros::classifier, programs::TcContext};
use aya_log_ebpf::debug;
use podwire_common::{NodeKind, Reason};

use crate::{
    counters::verdict,
    deliver,
    flows::{self, Path},
    maps::{endpoint_of, node_of, NODE_ADDR, VNI},
    parse::eth_ipv4,
    tunnel::{FromControlBlock, FromMetadata, Remote},
    Outcome, DROP_MALFORMED, TC_OK, TC_SHOT,
};

/// skb->pkt_type for a packet addressed to this host.
const PACKET_HOST: u32 = 0;

#[classifier]
pub fn from_overlay(ctx: TcContext) -> i32 {
    run::<FromMetadata>(&ctx)
}

/// `from_overlay` for BPF_PROG_TEST_RUN only, never attached: the sending node's address comes
/// from `cb[0]`.
#[classifier]
pub fn test_from_overlay(ctx: TcContext) -> i32 {
    run::<FromControlBlock>(&ctx)
}

#[inline(always)]
fn run<R: Remote>(ctx: &TcContext) -> i32 {
    let (reason, action) = match try_from_overlay::<R>(ctx) {
        Ok(v) => v,
        Err(v) => v,
    };
    verdict(ctx, reason, action)
}

fn try_from_overlay<R: Remote>(ctx: &TcContext) -> Result<Outcome, Outcome> {
    const SPOOFED: Outcome = (Reason::DropOverlaySpoofed, TC_SHOT);
    let tunnelled = R::tunnelled(ctx).ok_or(SPOOFED)?;
    if tunnelled.vni != VNI.load() {
        return Err((Reason::DropOverlayVni, TC_SHOT));
    }
    let remote = tunnelled.remote;
    // Only IPv4 is tunnelled: anything else claims to be what no node sends.
    let (_, ip) = eth_ipv4(ctx)?.ok_or(SPOOFED)?;
    if !node_of(ip.src_addr).is_some_and(|node| node.is_remote_at(remote)) {
        debug!(
            ctx,
            "from_overlay: drop, {:i} from {:i} is not that node's",
            ip.src_addr(),
            core::net::Ipv4Addr::from(remote)
        );
        return Err(SPOOFED);
    }
    if let Some(dest) = endpoint_of(&ip.dst_addr) {
        return match flows::path(ctx, ip) {
            Path::Shortcut => {
                debug!(
                    ctx,
                    "from_overlay: {:i} -> {:i}: local pod",
                    ip.src_addr(),
                    ip.dst_addr()
                );
                deliver::to_endpoint(ctx, ip, dest, Reason::RedirectFromOverlay)
            }
            Path::Stack(reason) => to_stack(ctx, reason),
        };
    }
    if ip.dst_addr == NODE_ADDR.load() {
        return to_stack(ctx, Reason::PassToStack);
    }
    if node_of(ip.dst_addr).is_some_and(|n| matches!(n.kind(), Some(NodeKind::Local))) {
        return Err((Reason::DropNoEndpoint, TC_SHOT));
    }
    Err((Reason::DropOverlayRelay, TC_SHOT))
}

/// Hands the packet up this node's stack, counted under `reason`.
#[inline(always)]
fn to_stack(ctx: &TcContext, reason: Reason) -> Result<Outcome, Outcome> {
    // The inner frame carries the sending node's MACs; the device is NOARP, so nothing here
    // matches them and the stack would take the packet for another host.
    ctx.change_type(PACKET_HOST).map_err(|_| DROP_MALFORMED)?;
    Ok((reason, TC_OK))
}
