//! `from_underlay`: tc ingress of the node's underlay interface (the one holding its address),
//! attached with the tunnel written by the programs and with native routing. Sees every packet
//! that arrives from the network, after `from_netdev` (XDP) where that runs too.
//!
//! Tunnel packets (UDP to the cluster's VXLAN port): from an address that is no node, or with
//! another VNI, dropped, as `from_netdev` does. With the programs' tunnel, one whose inner
//! source the sending node owns and whose inner destination is a pod here loses its outer headers
//! and goes straight into the pod (`bpf_redirect_peer`), skipping the VXLAN device and its UDP
//! socket; an inner source the node does not own is dropped (anti-spoofing, as `from_overlay`).
//! Every other tunnel packet (for this node's address, a flow the stack delivered, a fragment)
//! goes on to the VXLAN device untouched, which keeps carrying the host stack's own tunnel
//! traffic, and `from_overlay` judges it there.
//!
//! Native routing: a plain IPv4 packet for a pod here from another node's pod CIDR (or another
//! node's address) goes straight into the pod, unless it answers a flow the node's stack
//! delivered (a Service it NATed), which goes up the stack. Without a tunnel the sender cannot
//! be authenticated: any host on the segment may claim another node's pod address. What no node
//! may send, a source in this node's own pod CIDR or in the cluster's range outside every
//! node's, is dropped; a source outside the cluster goes up the stack, which routes it as any
//! router would. Everything else passes untouched.

use aya_ebpf::{macros::classifier, programs::TcContext};
use network_types::{
    eth::EthHdr,
    ip::{IpProto, Ipv4Hdr},
    udp::UdpHdr,
    vxlan::VxlanHdr,
};
use podwire_common::{CrossNode, Reason};

use crate::{
    counters::verdict,
    crossing::{self, INNER_IP_AT, VXLAN_AT},
    deliver,
    flows::{self, Path},
    maps::{cross_node_is, endpoint_of, node_of, VNI, VXLAN_PORT},
    parse::{eth_ipv4, header, is_fragment, is_later_fragment},
    Outcome, TC_OK, TC_SHOT,
};

const PASS: Outcome = (Reason::PassUnderlay, TC_OK);

#[classifier]
pub fn from_underlay(ctx: TcContext) -> i32 {
    let (reason, action) = match try_from_underlay(&ctx) {
        Ok(v) => v,
        Err(v) => v,
    };
    verdict(&ctx, reason, action)
}

fn try_from_underlay(ctx: &TcContext) -> Result<Outcome, Outcome> {
    // Whatever is not well-formed IPv4 is not podwire's: the stack judges it.
    let Ok(Some((_, ip))) = eth_ipv4(ctx) else {
        return Ok(PASS);
    };
    if ip.proto == IpProto::Udp as u8 && !is_later_fragment(ip) {
        let udp_at = EthHdr::LEN + usize::from(ip.ihl());
        if let Some(udp) = header::<_, UdpHdr>(ctx, udp_at) {
            if u16::from_ne_bytes(udp.dst) == VXLAN_PORT.load() {
                return tunnel_packet(ctx, ip, udp_at);
            }
        }
    }
    if cross_node_is(CrossNode::Native) && endpoint_of(&ip.dst_addr).is_some() {
        return native_packet(ctx, ip);
    }
    Ok(PASS)
}

/// A packet to the tunnel's port.
#[inline(always)]
fn tunnel_packet(ctx: &TcContext, ip: &Ipv4Hdr, udp_at: usize) -> Result<Outcome, Outcome> {
    let remote = ip.src_addr;
    if !node_of(remote).is_some_and(|node| node.is_remote_at(remote)) {
        return Err((Reason::DropTunnelNotNode, TC_SHOT));
    }
    let vxlan: &VxlanHdr =
        header(ctx, udp_at + UdpHdr::LEN).ok_or((Reason::DropMalformed, TC_SHOT))?;
    if !vxlan.vni_present() || vxlan.vni() != VNI.load() {
        return Err((Reason::DropOverlayVni, TC_SHOT));
    }
    const TO_DEVICE: Outcome = (Reason::PassTunnel, TC_OK);
    // Only the programs' own tunnel is taken apart here, and only a plain one: outer options or
    // a fragmented outer packet (the stack reassembles) go to the device.
    if !cross_node_is(CrossNode::TunnelBpf)
        || usize::from(ip.ihl()) != Ipv4Hdr::LEN
        || is_fragment(ip)
    {
        return Ok(TO_DEVICE);
    }
    let Some(inner_eth) = header::<_, EthHdr>(ctx, VXLAN_AT + 8) else {
        return Ok(TO_DEVICE);
    };
    let Some(inner) = header::<_, Ipv4Hdr>(ctx, INNER_IP_AT) else {
        return Ok(TO_DEVICE);
    };
    if inner_eth.ether_type != network_types::eth::EtherType::Ipv4 as u16
        || inner.ihl() < Ipv4Hdr::LEN as u8
    {
        return Ok(TO_DEVICE);
    }
    if !node_of(inner.src_addr).is_some_and(|node| node.is_remote_at(remote)) {
        return Err((Reason::DropOverlaySpoofed, TC_SHOT));
    }
    if endpoint_of(&inner.dst_addr).is_none() {
        // This node's own address, or a relay the device's program drops.
        return Ok(TO_DEVICE);
    }
    crossing::decapsulate(ctx).map_err(|_| TO_DEVICE)?;
    // The headers moved: read the (now outer) IPv4 header again.
    let (_, ip) = eth_ipv4(ctx)?.ok_or((Reason::DropMalformed, TC_SHOT))?;
    let dest = endpoint_of(&ip.dst_addr).ok_or((Reason::DropNoEndpoint, TC_SHOT))?;
    match flows::path(ctx, ip) {
        Path::Shortcut => deliver::to_endpoint(ctx, ip, dest, Reason::RedirectDecap),
        // Decapsulated already: the stack takes it as a plain packet from the underlay.
        Path::Stack(reason) => Ok((reason, TC_OK)),
    }
}

/// A plain IPv4 packet for a pod on this node, with native routing.
#[inline(always)]
fn native_packet(ctx: &TcContext, ip: &Ipv4Hdr) -> Result<Outcome, Outcome> {
    match node_of(ip.src_addr) {
        Some(node) if node.is_remote() => {}
        // This node's pods, or the range no node owns: nobody sends from there.
        Some(_) => return Err((Reason::DropNativeSpoofed, TC_SHOT)),
        // Outside the cluster: the stack routes it, as any router would.
        None => return Ok((Reason::PassToStack, TC_OK)),
    }
    let Some(dest) = endpoint_of(&ip.dst_addr) else {
        return Ok(PASS);
    };
    match flows::path(ctx, ip) {
        Path::Shortcut => deliver::to_endpoint(ctx, ip, dest, Reason::RedirectFromNative),
        Path::Stack(reason) => Ok((reason, TC_OK)),
    }
}
