//! `from_pod`: tc ingress of a pod's host-side veth. Sees every packet the pod sends.
//!
//! A packet must come from the pod's own IPv4 and MAC address (anti-spoofing). If its destination
//! is another pod on this node, it is routed here (TTL decremented, MACs rewritten as a router
//! would) and delivered with `bpf_redirect_peer` straight into that pod's namespace, skipping the
//! host stack (kernel 5.10, commit 9aa1206e8f48). Anything else goes up the host stack.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::generated::bpf_redirect_peer,
    macros::classifier,
    programs::TcContext,
};
use aya_log_ebpf::debug;
use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv4Hdr,
};
use podwire_common::Reason;

use crate::{counters::verdict, maps::ENDPOINTS_V1, parse::ptr_at};

type Verdict = (Reason, i32);

const DROP_MALFORMED: Verdict = (Reason::DropMalformed, TC_ACT_SHOT as i32);

#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    let (reason, action) = match try_from_pod(&ctx) {
        Ok(v) => v,
        Err(v) => v,
    };
    verdict(&ctx, reason, action)
}

fn try_from_pod(ctx: &TcContext) -> Result<Verdict, Verdict> {
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(DROP_MALFORMED)?;
    // SAFETY: ptr_at checked the header lies inside the packet.
    let eth = unsafe { &*eth };
    if eth.ether_type != EtherType::Ipv4 as u16 {
        return Ok((Reason::PassNotIpv4, TC_ACT_OK as i32));
    }
    let ip: *const Ipv4Hdr = ptr_at(ctx, EthHdr::LEN).ok_or(DROP_MALFORMED)?;
    // SAFETY: as above.
    let ip = unsafe { &*ip };
    if ip.ihl() < Ipv4Hdr::LEN as u8 {
        return Err(DROP_MALFORMED);
    }

    // SAFETY: the kernel hands the program a valid __sk_buff.
    let ingress = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: map values are only read here; the agent replaces them whole.
    let source = unsafe { ENDPOINTS_V1.get(&ip.src_addr) };
    match source {
        Some(ep) if ep.ifindex == ingress => {
            if ep.pod_mac != eth.src_addr {
                debug!(ctx, "from_pod: drop, source MAC {:mac} is not the pod's", eth.src_addr);
                return Err((Reason::DropSpoofedMac, TC_ACT_SHOT as i32));
            }
        }
        _ => {
            debug!(
                ctx,
                "from_pod: drop, source {:i} does not belong to ifindex {}",
                ip.src_addr(),
                ingress
            );
            return Err((Reason::DropSpoofedIp, TC_ACT_SHOT as i32));
        }
    }

    // SAFETY: as above.
    let Some(dest) = (unsafe { ENDPOINTS_V1.get(&ip.dst_addr) }) else {
        debug!(
            ctx,
            "from_pod: {:i} -> {:i} proto {} len {}: to host stack",
            ip.src_addr(),
            ip.dst_addr(),
            ip.proto,
            ctx.len()
        );
        return Ok((Reason::PassToStack, TC_ACT_OK as i32));
    };
    let (ttl, proto) = (ip.ttl, ip.proto);
    if ttl <= 1 {
        return Err((Reason::DropTtlExceeded, TC_ACT_SHOT as i32));
    }
    let (ifindex, pod_mac, host_mac) = (dest.ifindex, dest.pod_mac, dest.host_mac);
    debug!(
        ctx,
        "from_pod: {:i} -> {:i} proto {} len {}: redirect to ifindex {}",
        ip.src_addr(),
        ip.dst_addr(),
        proto,
        ctx.len(),
        ifindex
    );
    // Route like a router: the TTL/protocol word changes, so does the header checksum.
    const TTL_OFFSET: usize = EthHdr::LEN + 8;
    const CHECK_OFFSET: usize = EthHdr::LEN + 10;
    let old = u16::from_ne_bytes([ttl, proto]);
    let new = u16::from_ne_bytes([ttl - 1, proto]);
    ctx.l3_csum_replace(CHECK_OFFSET, u64::from(old), u64::from(new), 2)
        .map_err(|_| DROP_MALFORMED)?;
    ctx.store(TTL_OFFSET, &(ttl - 1), 0).map_err(|_| DROP_MALFORMED)?;
    ctx.store(0, &pod_mac, 0).map_err(|_| DROP_MALFORMED)?;
    ctx.store(6, &host_mac, 0).map_err(|_| DROP_MALFORMED)?;
    // SAFETY: plain helper call; flags must be 0.
    let action = unsafe { bpf_redirect_peer(ifindex, 0) } as i32;
    Ok((Reason::RedirectLocal, action))
}
