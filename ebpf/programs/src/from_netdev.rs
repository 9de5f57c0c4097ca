//! `from_netdev`: XDP on the node's underlay interface (the one holding its address). Sees every
//! frame that arrives on it, before the kernel allocates an skb where the driver runs XDP (native
//! mode), or first thing in the stack otherwise (generic mode).
//!
//! Tunnel packets (UDP to the cluster's VXLAN port) from an address that is no node of the
//! cluster, or with another VNI, are dropped here, before the VXLAN device's socket sees them:
//! nobody but a node may put a packet into this node's overlay. Everything else passes untouched.

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use network_types::{eth::EthHdr, ip::IpProto, udp::UdpHdr, vxlan::VxlanHdr};
use podwire_common::Reason;

use crate::{
    counters::verdict,
    maps::{node_of, VNI, VXLAN_PORT},
    parse::{eth_ipv4, header, is_later_fragment},
};

/// Why, and the XDP action.
type XdpOutcome = (Reason, u32);

const PASS: u32 = xdp_action::XDP_PASS;
const DROP: u32 = xdp_action::XDP_DROP;

#[xdp]
pub fn from_netdev(ctx: XdpContext) -> u32 {
    let (reason, action) = match try_from_netdev(&ctx) {
        Ok(v) => v,
        Err(v) => v,
    };
    verdict(&ctx, reason, action)
}

#[inline(always)]
fn try_from_netdev(ctx: &XdpContext) -> Result<XdpOutcome, XdpOutcome> {
    const UNDERLAY: XdpOutcome = (Reason::PassUnderlay, PASS);
    // Whatever is not well-formed IPv4 is not the tunnel: the stack judges it.
    let Ok(Some((_, ip))) = eth_ipv4(ctx) else {
        return Ok(UNDERLAY);
    };
    if ip.proto != IpProto::Udp as u8 || is_later_fragment(ip) {
        return Ok(UNDERLAY);
    }
    let udp_at = EthHdr::LEN + usize::from(ip.ihl());
    let Some(udp) = header::<_, UdpHdr>(ctx, udp_at) else {
        return Ok(UNDERLAY);
    };
    if u16::from_ne_bytes(udp.dst) != VXLAN_PORT.load() {
        return Ok(UNDERLAY);
    }
    match node_of(ip.src_addr) {
        Some(node) if node.is_remote() && node.addr == ip.src_addr => {}
        _ => return Err((Reason::DropTunnelNotNode, DROP)),
    }
    let vxlan: &VxlanHdr =
        header(ctx, udp_at + UdpHdr::LEN).ok_or((Reason::DropMalformed, DROP))?;
    let [a, b, c] = vxlan.vni;
    let vni = u32::from_be_bytes([0, a, b, c]);
    if vxlan.flags & network_types::vxlan::VXLAN_I_FLAG_MASK == 0 || vni != VNI.load() {
        return Err((Reason::DropOverlayVni, DROP));
    }
    Ok((Reason::PassTunnel, PASS))
}
