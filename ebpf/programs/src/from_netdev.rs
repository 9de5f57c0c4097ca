//! `from_netdev` (XDP) and `from_netdev_tc` (tc ingress): the node's underlay interface, the one
//! holding its address. They see every frame that arrives on it, before the VXLAN device's
//! socket does: XDP in the driver before the kernel allocates an skb (native mode) or first thing
//! in the stack (generic mode); tc just before the IP layer. The agent attaches one of them (see
//! its `--underlay-filter`): XDP where the driver runs it natively, tc where XDP would cost a copy
//! of every coalesced packet (veth, or a driver without native XDP).
//!
//! Tunnel packets (UDP to the cluster's VXLAN port) from an address that is no node of the
//! cluster, or with another VNI, are dropped: nobody but a node may put a packet into this node's
//! overlay. Everything else passes untouched.

use aya_ebpf::{
    bindings::xdp_action,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use network_types::{eth::EthHdr, ip::IpProto, udp::UdpHdr, vxlan::VxlanHdr};
use podwire_common::Reason;

use crate::{
    counters::verdict,
    frame::Frame,
    maps::{node_of, VNI, VXLAN_PORT},
    parse::{eth_ipv4, header, is_later_fragment},
    TC_OK, TC_SHOT,
};

#[xdp]
pub fn from_netdev(ctx: XdpContext) -> u32 {
    let (reason, pass) = judge(&ctx);
    let action = if pass {
        xdp_action::XDP_PASS
    } else {
        xdp_action::XDP_DROP
    };
    verdict(&ctx, reason, action)
}

#[classifier]
pub fn from_netdev_tc(ctx: TcContext) -> i32 {
    let (reason, pass) = judge(&ctx);
    verdict(&ctx, reason, if pass { TC_OK } else { TC_SHOT })
}

/// Why, and whether the frame passes.
#[inline(always)]
fn judge<C: Frame>(ctx: &C) -> (Reason, bool) {
    match tunnel_packet(ctx) {
        Ok(reason) => (reason, true),
        Err(reason) => (reason, false),
    }
}

#[inline(always)]
fn tunnel_packet<C: Frame>(ctx: &C) -> Result<Reason, Reason> {
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
    match node_of(ip.src_addr) {
        Some(node) if node.is_remote() && node.addr == ip.src_addr => {}
        _ => return Err(Reason::DropTunnelNotNode),
    }
    let vxlan: &VxlanHdr = header(ctx, udp_at + UdpHdr::LEN).ok_or(Reason::DropMalformed)?;
    let [a, b, c] = vxlan.vni;
    let vni = u32::from_be_bytes([0, a, b, c]);
    if vxlan.flags & network_types::vxlan::VXLAN_I_FLAG_MASK == 0 || vni != VNI.load() {
        return Err(Reason::DropOverlayVni);
    }
    Ok(Reason::PassTunnel)
}
