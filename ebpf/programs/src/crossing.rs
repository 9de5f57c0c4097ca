//! Crossing the underlay without the VXLAN device: the tunnel written by the programs
//! (`CrossNode::TunnelBpf`) and native routing (`CrossNode::Native`).
//!
//! Both leave with `bpf_redirect_neigh` (kernel 5.10, commit b4ab31414970): the kernel fills the
//! Ethernet header from its neighbour table, resolving (and queueing) like the stack does, and
//! needs no IPv4 forwarding on the node. `bpf_fib_lookup` + `bpf_redirect` was the alternative:
//! it refuses on an interface without forwarding (BPF_FIB_LKUP_RET_FWD_DISABLED; podwire nodes
//! need not forward) and answers NO_NEIGH until the stack has resolved the neighbour, so it needs
//! `bpf_redirect_neigh` as its fallback anyway; in the steady state both do one FIB and one
//! neighbour lookup. A tunnel packet leaves with no next hop given: the kernel routes its outer
//! destination (the node), so the tunnel crosses routed underlays as the device's does. A native
//! packet leaves with the owning node's address as its next hop: native routing's premise is that
//! nodes are neighbours on one segment (as Flannel's host-gw), the agent's routes for the host
//! stack say the same, and it saves the route lookup.

use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, bpf_redir_neigh, BPF_ADJ_ROOM_ENCAP_L2_SHIFT,
        BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_UDP,
        BPF_F_ADJ_ROOM_FIXED_GSO,
    },
    helpers::generated::{bpf_get_hash_recalc, bpf_redirect_neigh},
    programs::TcContext,
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};
use podwire_common::{NodeEntry, TC_INDEX_FROM_POD};

use crate::maps::{NODE_ADDR, UNDERLAY_IFINDEX, VNI, VXLAN_PORT};

/// Outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14 bytes, between the outer Ethernet header
/// and the inner IPv4 header.
pub const ENCAP_LEN: usize = 50;
/// Where the VXLAN header of a tunnel packet with a 20-byte outer IPv4 header starts.
pub const VXLAN_AT: usize = EthHdr::LEN + Ipv4Hdr::LEN + 8;
/// Where its inner IPv4 header starts.
pub const INNER_IP_AT: usize = EthHdr::LEN + ENCAP_LEN;

/// Room made after the Ethernet header, declared as UDP-in-IPv4 carrying an Ethernet frame, so
/// the kernel marks the skb encapsulated (GSO type UDP_TUNNEL, inner header offsets) and
/// segments or offloads it as it would the VXLAN device's. FIXED_GSO: the segment size stays the
/// pod's, whose cluster route MTU already leaves the 50 bytes (without it the kernel would cut
/// every segment by 50 bytes more).
const ENCAP_FLAGS: u64 = (BPF_F_ADJ_ROOM_ENCAP_L3_IPV4
    | BPF_F_ADJ_ROOM_ENCAP_L4_UDP
    | BPF_F_ADJ_ROOM_ENCAP_L2_ETH
    | BPF_F_ADJ_ROOM_FIXED_GSO) as u64
    | ((EthHdr::LEN as u64) << BPF_ADJ_ROOM_ENCAP_L2_SHIFT);

/// The UDP source port range of the tunnel (the kernel's default local port range, as the VXLAN
/// device uses it): the skb's flow hash picks one, so each flow keeps its port and the underlay
/// spreads flows (ECMP, RSS).
const SPORT_MIN: u32 = 32768;
const SPORT_MAX: u32 = 61000;

/// What goes between the outer Ethernet header and the inner IPv4 header.
#[repr(C)]
struct Encap {
    ip: [u8; 20],
    udp: [u8; 8],
    vxlan: [u8; 8],
    inner_eth: [u8; 14],
}

/// Puts the IPv4 packet of `ctx` (an Ethernet frame whose IPv4 header has `tos`) into the tunnel
/// toward `node`: outer IPv4 (this node to `node`, TTL 64, DF, checksummed), UDP (source port from
/// the flow hash, zero checksum as RFC 7348 allows over IPv4), VXLAN (the cluster's VNI), and the
/// frame's own Ethernet header inside. Nothing is changed when it fails.
#[inline(always)]
pub fn encapsulate(ctx: &TcContext, node: &NodeEntry, tos: u8) -> Result<(), i64> {
    let inner_eth: [u8; 14] = ctx.load(0)?;
    // The length of the inner IPv4 packet; a GSO packet's lengths are rewritten per segment.
    let inner_len = ctx.len().wrapping_sub(EthHdr::LEN as u32);
    // SAFETY: plain helper call on the program's own skb.
    let hash = unsafe { bpf_get_hash_recalc(ctx.skb.skb) };
    let sport =
        (((u64::from(hash) * u64::from(SPORT_MAX - SPORT_MIN)) >> 32) as u32 + SPORT_MIN) as u16;
    let ip_len = (inner_len + ENCAP_LEN as u32) as u16;
    let udp_len = ip_len - Ipv4Hdr::LEN as u16;
    let [l0, l1] = ip_len.to_be_bytes();
    let src = NODE_ADDR.load();
    let dst = node.addr;
    let mut ip = [
        0x45, tos, l0, l1, // version 4, 20 bytes; TOS (ECN too) copied from the inner header
        0, 0, 0x40, 0, // no ID: DF set (RFC 6864)
        64, 17, 0, 0, // TTL, UDP, checksum below
        src[0], src[1], src[2], src[3], dst[0], dst[1], dst[2], dst[3],
    ];
    let check = ipv4_checksum(&ip).to_be_bytes();
    (ip[10], ip[11]) = (check[0], check[1]);
    let [p0, p1] = sport.to_be_bytes();
    let [d0, d1] = VXLAN_PORT.load().to_ne_bytes();
    let [u0, u1] = udp_len.to_be_bytes();
    let vni = VNI.load().to_be_bytes();
    let encap = Encap {
        ip,
        udp: [p0, p1, d0, d1, u0, u1, 0, 0],
        // Flags: the VNI is valid; the VNI in the upper 24 bits of the second word.
        vxlan: [0x08, 0, 0, 0, vni[1], vni[2], vni[3], 0],
        inner_eth,
    };
    ctx.adjust_room(ENCAP_LEN as i32, BPF_ADJ_ROOM_MAC, ENCAP_FLAGS)?;
    ctx.store(EthHdr::LEN, &encap, 0)?;
    Ok(())
}

/// The IPv4 header checksum of `header` (with its checksum field zero).
#[inline(always)]
fn ipv4_checksum(header: &[u8; 20]) -> u16 {
    let mut sum = 0u32;
    let mut i = 0;
    while i < header.len() {
        sum += u32::from(u16::from_be_bytes([header[i], header[i + 1]]));
        i += 2;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Takes the outer IPv4, UDP and VXLAN headers and the inner Ethernet header off a tunnel packet
/// (20-byte outer IPv4 header), leaving the outer Ethernet header before the inner IPv4 packet.
/// FIXED_GSO: a coalesced packet's segment size is the inner TCP's, which the outer headers never
/// counted. Without BPF_F_ADJ_ROOM_DECAP_L3_IPV4 (kernel 6.3, commit d219df60a70e): that flag
/// only switches skb->protocol when the inner family differs from the outer one (and, from 6.16,
/// drops a routing dst, which tc ingress has not got yet), so for IPv4 in IPv4 it changes
/// nothing, and 6.1 would refuse it (EINVAL): one call everywhere instead of a retry per packet.
#[inline(always)]
pub fn decapsulate(ctx: &TcContext) -> Result<(), i64> {
    ctx.adjust_room(
        -(ENCAP_LEN as i32),
        BPF_ADJ_ROOM_MAC,
        u64::from(BPF_F_ADJ_ROOM_FIXED_GSO),
    )
}

/// Sends the (encapsulated) packet out of the underlay, next hop from the kernel's FIB for its
/// outer destination; the TC action.
#[inline(always)]
pub fn redirect_tunnel() -> i32 {
    // SAFETY: plain helper call; no parameters means the kernel routes the packet's destination.
    unsafe { bpf_redirect_neigh(UNDERLAY_IFINDEX.load(), core::ptr::null_mut(), 0, 0) as i32 }
}

/// Sends the packet out of the underlay unencapsulated, to `node` as the next hop, marked for
/// `to_underlay` as podwire's own; the TC action.
#[inline(always)]
pub fn redirect_native(ctx: &TcContext, node: &NodeEntry) -> i32 {
    // SAFETY: tc programs may write tc_index; the kernel hands a valid __sk_buff.
    unsafe { (*ctx.skb.skb).tc_index = TC_INDEX_FROM_POD };
    // SAFETY: all-zero is a valid bpf_redir_neigh.
    let mut nh: bpf_redir_neigh = unsafe { core::mem::zeroed() };
    nh.nh_family = AF_INET;
    // Network byte order, as the packet carries it.
    nh.__bindgen_anon_1.ipv4_nh = u32::from_ne_bytes(node.addr);
    // SAFETY: nh is a live stack object of the size passed.
    unsafe {
        bpf_redirect_neigh(
            UNDERLAY_IFINDEX.load(),
            &mut nh,
            core::mem::size_of::<bpf_redir_neigh>() as i32,
            0,
        ) as i32
    }
}

const AF_INET: u32 = 2;
