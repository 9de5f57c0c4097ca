//! `from_pod`: tc ingress of a pod's host-side veth. Sees every packet the pod sends.
//!
//! A packet must come from the pod's own IPv4 and MAC address (anti-spoofing). A packet for
//! another pod on this node is delivered straight into it; one for a pod (or the underlay address)
//! of another node goes into the VXLAN tunnel toward that node; one for the cluster's pod range
//! that no node owns is dropped. Anything else goes up the host stack (masqueraded there when
//! it leaves the node).

use aya_ebpf::{macros::classifier, programs::TcContext};
use aya_log_ebpf::debug;
use podwire_common::{NodeKind, Reason};

use crate::{
    counters::verdict,
    deliver,
    maps::{endpoint_of, node_of},
    parse::eth_ipv4,
    tunnel, Outcome, TC_OK, TC_SHOT,
};

#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    let (reason, action) = match try_from_pod(&ctx) {
        Ok(v) => v,
        Err(v) => v,
    };
    verdict(&ctx, reason, action)
}

fn try_from_pod(ctx: &TcContext) -> Result<Outcome, Outcome> {
    let Some((eth, ip)) = eth_ipv4(ctx)? else {
        return Ok((Reason::PassNotIpv4, TC_OK));
    };

    // SAFETY: the kernel hands the program a valid __sk_buff.
    let ingress = unsafe { (*ctx.skb.skb).ifindex };
    match endpoint_of(&ip.src_addr) {
        Some(ep) if ep.ifindex == ingress => {
            if ep.pod_mac != eth.src_addr {
                debug!(
                    ctx,
                    "from_pod: drop, source MAC {:mac} is not the pod's", eth.src_addr
                );
                return Err((Reason::DropSpoofedMac, TC_SHOT));
            }
        }
        _ => {
            debug!(
                ctx,
                "from_pod: drop, source {:i} does not belong to ifindex {}",
                ip.src_addr(),
                ingress
            );
            return Err((Reason::DropSpoofedIp, TC_SHOT));
        }
    }

    if let Some(dest) = endpoint_of(&ip.dst_addr) {
        debug!(
            ctx,
            "from_pod: {:i} -> {:i}: local pod",
            ip.src_addr(),
            ip.dst_addr()
        );
        return deliver::to_endpoint(ctx, ip, dest, Reason::RedirectLocal);
    }
    if let Some(node) = node_of(ip.dst_addr) {
        match node.kind() {
            Some(NodeKind::Local) => return Err((Reason::DropNoEndpoint, TC_SHOT)),
            Some(NodeKind::NoNode) | None => return Err((Reason::DropNoNode, TC_SHOT)),
            Some(NodeKind::Remote) if tunnel::enabled() => {
                debug!(
                    ctx,
                    "from_pod: {:i} -> {:i}: tunnel to {:i}",
                    ip.src_addr(),
                    ip.dst_addr(),
                    core::net::Ipv4Addr::from(node.addr)
                );
                return tunnel::redirect_to(ctx, &node)
                    .map(|action| (Reason::RedirectOverlay, action))
                    .map_err(|_| (Reason::DropEncapFailed, TC_SHOT));
            }
            // Without an overlay, other nodes' pods are the host stack's to route.
            Some(NodeKind::Remote) => {}
        }
    }
    debug!(
        ctx,
        "from_pod: {:i} -> {:i}: to host stack",
        ip.src_addr(),
        ip.dst_addr()
    );
    Ok((Reason::PassToStack, TC_OK))
}
