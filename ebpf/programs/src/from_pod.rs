//! `from_pod`: tc ingress of a pod's host-side veth. Sees every frame the pod sends.
//!
//! Only what a pod may send leaves it: untagged IPv4 from its own address and MAC, and ARP for
//! its own address. Tagged frames (any VLAN), IPv6 (not carried yet, and a router advertisement
//! must not reach the node) and every other ethertype are dropped and counted.
//!
//! A packet for another pod on this node is delivered straight into it, unless it answers a flow
//! the node's stack delivered (a Service kube-proxy NATed), which goes up the stack for its
//! conntrack to reverse. One for a pod (or the underlay address) of another node goes toward that
//! node as the load-time mode says: into the VXLAN device, encapsulated here and out of the
//! underlay, or out of the underlay as it is (native routing; see `crossing`). One for the
//! cluster's pod range that no node owns is dropped.
//! Anything else goes up the host stack (masqueraded there when it leaves the node).

use aya_ebpf::{macros::classifier, programs::TcContext};
use aya_log_ebpf::debug;
use network_types::{
    arp::ArpHdr,
    eth::{EthHdr, EtherType},
    ip::Ipv4Hdr,
};
use podwire_common::{CrossNode, NodeKind, Reason};

use crate::{
    counters::verdict,
    crossing, deliver,
    flows::{self, Path},
    frame::Frame,
    maps::{cross_node_is, endpoint_of, node_of},
    parse::{header, ipv4},
    tunnel, Outcome, DROP_MALFORMED, TC_OK, TC_SHOT,
};

const DROP_VLAN: Outcome = (Reason::DropVlan, TC_SHOT);

#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    let (reason, action) = match try_from_pod(&ctx) {
        Ok(v) => v,
        Err(v) => v,
    };
    verdict(&ctx, reason, action)
}

fn try_from_pod(ctx: &TcContext) -> Result<Outcome, Outcome> {
    // The kernel takes the outer tag off a received frame before tc sees it (into the skb's
    // metadata); inner tags stay in the frame.
    // SAFETY: the kernel hands the program a valid __sk_buff.
    if unsafe { (*ctx.skb.skb).vlan_present } != 0 {
        return Err(DROP_VLAN);
    }
    let eth: &EthHdr = header(ctx, 0).ok_or(DROP_MALFORMED)?;
    match eth.ether_type {
        t if t == EtherType::Ipv4 as u16 => from_pod_ipv4(ctx, eth, ipv4(ctx)?),
        t if t == EtherType::Arp as u16 => own_arp(ctx, eth),
        t if t == EtherType::Ipv6 as u16 => Err((Reason::DropIpv6, TC_SHOT)),
        t if t == EtherType::Ieee8021q as u16
            || t == EtherType::Ieee8021ad as u16
            || t == EtherType::Ieee8021QinQ1 as u16
            || t == EtherType::Ieee8021QinQ2 as u16
            || t == EtherType::Ieee8021QinQ3 as u16 =>
        {
            Err(DROP_VLAN)
        }
        _ => Err((Reason::DropEtherType, TC_SHOT)),
    }
}

/// Lets ARP through when it is Ethernet/IPv4 ARP whose sender is the pod itself, in its address,
/// its MAC and the frame's source MAC. (Pods never need to ARP for their gateway, whose entry is
/// permanent; this is for their own announcements.)
#[inline(always)]
fn own_arp(ctx: &TcContext, eth: &EthHdr) -> Result<Outcome, Outcome> {
    const SPOOFED: Outcome = (Reason::DropSpoofedArp, TC_SHOT);
    let arp: &ArpHdr = header(ctx, EthHdr::LEN).ok_or(DROP_MALFORMED)?;
    let ethernet_ipv4 = arp.htype == 1u16.to_be_bytes()
        && arp.ptype == 0x0800u16.to_be_bytes()
        && arp.hlen == 6
        && arp.plen == 4;
    if !ethernet_ipv4 {
        return Err(SPOOFED);
    }
    match endpoint_of(&arp.spa) {
        Some(ep)
            if ep.ifindex == ctx.ifindex()
                && ep.pod_mac == arp.sha
                && ep.pod_mac == eth.src_addr =>
        {
            Ok((Reason::PassNotIpv4, TC_OK))
        }
        _ => Err(SPOOFED),
    }
}

#[inline(always)]
fn from_pod_ipv4(ctx: &TcContext, eth: &EthHdr, ip: &Ipv4Hdr) -> Result<Outcome, Outcome> {
    let ingress = ctx.ifindex();
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
        return match flows::path(ctx, ip) {
            Path::Shortcut => {
                debug!(
                    ctx,
                    "from_pod: {:i} -> {:i}: local pod",
                    ip.src_addr(),
                    ip.dst_addr()
                );
                deliver::to_endpoint(ctx, ip, dest, Reason::RedirectLocal)
            }
            Path::Stack(reason) => Ok((reason, TC_OK)),
        };
    }
    if let Some(node) = node_of(ip.dst_addr) {
        match node.kind() {
            Some(NodeKind::Local) => return Err((Reason::DropNoEndpoint, TC_SHOT)),
            Some(NodeKind::NoNode) | None => return Err((Reason::DropNoNode, TC_SHOT)),
            Some(NodeKind::Remote) if cross_node_is(CrossNode::Native) => {
                return Ok((
                    Reason::RedirectNative,
                    crossing::redirect_native(ctx, &node),
                ));
            }
            Some(NodeKind::Remote) if cross_node_is(CrossNode::TunnelBpf) => {
                if crossing::encapsulate(ctx, &node, ip.tos).is_ok() {
                    return Ok((Reason::RedirectEncap, crossing::redirect_tunnel()));
                }
                // What the kernel would not let the program encapsulate (a UDP GSO packet, one
                // already encapsulated) goes through the device instead, unchanged.
                return tunnel::redirect_to(ctx, &node)
                    .map(|action| (Reason::RedirectOverlay, action))
                    .map_err(|_| (Reason::DropEncapFailed, TC_SHOT));
            }
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
