//! Putting packets into the cluster's VXLAN tunnel and reading where they came from.
//!
//! The agent's VXLAN device is in collect_md ("external") mode: the kernel encapsulates in VXLAN
//! whatever the program hands it, to the remote and VNI set with bpf_skb_set_tunnel_key. That
//! keeps the kernel's own UDP/VXLAN path (GSO, checksum offload, the routing of the outer
//! packet) instead of writing outer headers in the program.

use aya_ebpf::{
    bindings::{bpf_tunnel_key, BPF_F_ZERO_CSUM_TX},
    helpers::generated::{bpf_redirect, bpf_skb_get_tunnel_key, bpf_skb_set_tunnel_key},
    programs::TcContext,
};
use podwire_common::NodeEntry;

use crate::maps::{VNI, VXLAN_IFINDEX};

/// Key size up to (not including) `tunnel_label`: accepted by every kernel since 4.3, while the
/// full struct grew in 6.0 (local_ipv4, commit 26101f5ab6bd) and older kernels reject it.
const KEY_SIZE: u32 = core::mem::offset_of!(bpf_tunnel_key, tunnel_label) as u32;

/// Sets the tunnel key toward `node`. Errors are the helper's.
#[inline(always)]
pub fn set_key(ctx: &TcContext, node: &NodeEntry) -> Result<(), i64> {
    // SAFETY: all-zero is a valid bpf_tunnel_key.
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    key.tunnel_id = VNI.load();
    // The helper wants the remote address in host byte order.
    key.__bindgen_anon_1.remote_ipv4 = u32::from_be_bytes(node.addr);
    key.tunnel_ttl = 64;
    // SAFETY: key is a live stack object of at least KEY_SIZE bytes.
    let ret = unsafe {
        bpf_skb_set_tunnel_key(
            ctx.skb.skb,
            &mut key,
            KEY_SIZE,
            u64::from(BPF_F_ZERO_CSUM_TX),
        )
    };
    if ret < 0 {
        return Err(ret);
    }
    Ok(())
}

/// Sets the tunnel key toward `node` and redirects to the VXLAN device's egress; the TC action.
#[inline(always)]
pub fn redirect_to(ctx: &TcContext, node: &NodeEntry) -> Result<i32, i64> {
    set_key(ctx, node)?;
    // SAFETY: plain helper call.
    Ok(unsafe { bpf_redirect(VXLAN_IFINDEX.load(), 0) } as i32)
}

/// Where a tunnelled packet came from: the sending node's underlay address (network byte order)
/// and the VNI it used.
pub struct Tunnelled {
    pub remote: [u8; 4],
    pub vni: u32,
}

/// Where a program learns how a packet was tunnelled, if it was. The programs are generic over
/// it, so that the attached ones read the packet's tunnel metadata and carry no trace of the
/// test source.
pub trait Remote {
    fn tunnelled(ctx: &TcContext) -> Option<Tunnelled>;
}

/// The packet's tunnel metadata, which the VXLAN device set when it decapsulated it.
pub struct FromMetadata;

impl Remote for FromMetadata {
    #[inline(always)]
    fn tunnelled(ctx: &TcContext) -> Option<Tunnelled> {
        // SAFETY: all-zero is a valid bpf_tunnel_key.
        let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
        // SAFETY: key is a live stack object of at least KEY_SIZE bytes.
        let ret = unsafe { bpf_skb_get_tunnel_key(ctx.skb.skb, &mut key, KEY_SIZE, 0) };
        (ret == 0).then(|| Tunnelled {
            // SAFETY: the helper filled the IPv4 member (flags 0).
            remote: unsafe { key.__bindgen_anon_1.remote_ipv4 }.to_be_bytes(),
            vni: key.tunnel_id,
        })
    }
}

/// `__sk_buff.cb[0]` (the remote address as packets carry it; zero: not tunnelled) and `cb[1]`
/// (the VNI), for the copies of the programs run by BPF_PROG_TEST_RUN, which cannot give a packet
/// tunnel metadata but can set the control block.
pub struct FromControlBlock;

impl Remote for FromControlBlock {
    #[inline(always)]
    fn tunnelled(ctx: &TcContext) -> Option<Tunnelled> {
        // SAFETY: the kernel hands the program a valid __sk_buff.
        let cb = unsafe { (*ctx.skb.skb).cb };
        (cb[0] != 0).then(|| Tunnelled {
            remote: cb[0].to_ne_bytes(),
            vni: cb[1],
        })
    }
}

/// Whether an overlay is configured on this node.
#[inline(always)]
pub fn enabled() -> bool {
    VXLAN_IFINDEX.load() != 0
}
