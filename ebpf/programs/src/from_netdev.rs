//! `from_netdev`: XDP on the node's underlay interface, the one holding its address. Sees every
//! frame that arrives on it, before the VXLAN device's socket does: in the driver before the
//! kernel allocates an skb where a NIC's driver runs XDP (native mode), or first thing in the stack
//! (generic mode).
//!
//! Tunnel packets (UDP to the cluster's VXLAN port) from an address that is no node of the
//! cluster, or with another VNI, are dropped: nobody but a node may put a packet into this node's
//! overlay. Everything else passes untouched.

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use network_types::{eth::EthHdr, ip::IpProto, udp::UdpHdr, vxlan::VxlanHdr};
use podwire_common::Reason;

use crate::{
    counters::verdict,
    maps::{node_of, VNI, VXLAN_PORT},
    parse::{eth_ipv4, header, is_later_fragment},
};

#[xdp]
pub fn from_netdev(ctx: XdpContext) -> u32 {
    let (reason, action) = match tunnel_packet(&ctx) {
        Ok(reason) => (reason, xdp_action::XDP_PASS),
        Err(reason) => (reason, xdp_action::XDP_DROP),
    };
    verdict(&ctx, reason, action)
}

/// Passes (`Ok`) or drops (`Err`) a frame, and why.
#[inline(always)]
fn tunnel_packet(ctx: &XdpContext) -> Result<Reason, Reason> {
    // Whatever is not well-formed IPv4 is not the tunnel: the stack judges it.
    let Ok(Some((_, ip))) = eth_ipv4(ctx) else {
        return Ok(Reason::PassUnderlay);
    };
    if ip.proto != IpProto::Udp as u8 || is_later_fragment(ip) {
        return Ok(Reason::PassUnderlay);
    }
    let udp_at = EthHdr::LEN + usize::from(ip.ihl());
    let Some(udp) = header::<_, UdpHdr>(ctx, udp_at) else {
        return Ok(Reason::PassUnderlay);
    };
    if u16::from_ne_bytes(udp.dst) != VXLAN_PORT.load() {
        return Ok(Reason::PassUnderlay);
    }
    if !node_of(ip.src_addr).is_some_and(|node| node.is_remote_at(ip.src_addr)) {
        return Err(Reason::DropTunnelNotNode);
    }
    let vxlan: &VxlanHdr = header(ctx, udp_at + UdpHdr::LEN).ok_or(Reason::DropMalformed)?;
    if !vxlan.vni_present() || vxlan.vni() != VNI.load() {
        return Err(Reason::DropOverlayVni);
    }
    Ok(Reason::PassTunnel)
}
