//! Delivery into a pod on this node, as a router would: TTL decremented (header checksum
//! updated), MACs of the pod's veth pair, then `bpf_redirect_peer` straight into the pod's
//! namespace, skipping the host stack and its backlog queue (kernel 5.10, commit 9aa1206e8f48).

use aya_ebpf::{helpers::generated::bpf_redirect_peer, programs::TcContext};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};
use podwire_common::{Endpoint, Reason};

use crate::{Outcome, TC_SHOT};

const TTL_OFFSET: usize = EthHdr::LEN + 8;
const CHECK_OFFSET: usize = EthHdr::LEN + 10;

/// Delivers the IPv4 packet whose header is `ip` to `dest`, counting it under `reason`.
#[inline(always)]
pub fn to_endpoint(
    ctx: &TcContext,
    ip: &Ipv4Hdr,
    dest: &Endpoint,
    reason: Reason,
) -> Result<Outcome, Outcome> {
    let (ttl, proto) = (ip.ttl, ip.proto);
    if ttl <= 1 {
        return Err((Reason::DropTtlExceeded, TC_SHOT));
    }
    let (ifindex, pod_mac, host_mac) = (dest.ifindex, dest.pod_mac, dest.host_mac);
    // The TTL/protocol word changes, so does the header checksum.
    let old = u16::from_ne_bytes([ttl, proto]);
    let new = u16::from_ne_bytes([ttl - 1, proto]);
    let malformed = |_| (Reason::DropMalformed, TC_SHOT);
    ctx.l3_csum_replace(CHECK_OFFSET, u64::from(old), u64::from(new), 2)
        .map_err(malformed)?;
    ctx.store(TTL_OFFSET, &(ttl - 1), 0).map_err(malformed)?;
    ctx.store(0, &pod_mac, 0).map_err(malformed)?;
    ctx.store(6, &host_mac, 0).map_err(malformed)?;
    // SAFETY: plain helper call; flags must be 0.
    let action = unsafe { bpf_redirect_peer(ifindex, 0) } as i32;
    Ok((reason, action))
}
