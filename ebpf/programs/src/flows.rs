//! Flows the node's stack delivered, recorded so that their replies go back through it.
//!
//! kube-proxy (iptables or nftables) DNATs a Service's address to a backend pod in the node's
//! host stack, and only that stack's conntrack can reverse it. podwire's shortcuts
//! (`bpf_redirect_peer` from `from_pod` and `from_overlay`) would carry the backend's reply past
//! it, to a client that never asked the backend. So where the stack hands a packet from one of
//! this node's pods on (into another pod here: `to_pod`; into the tunnel: `to_overlay`), the flow
//! is recorded as its replies will look, and before a shortcut the programs look the packet up:
//! a recorded reply goes to the stack instead. Plain pod-to-pod traffic never passes the stack,
//! so it is never recorded and keeps the shortcut; its cost is the one lookup.

use aya_ebpf::{macros::map, maps::LruHashMap};
use network_types::{
    eth::EthHdr,
    ip::{IpProto, Ipv4Hdr},
};
use podwire_common::{FlowKey, Reason, MAX_STACK_FLOWS};

use crate::{
    frame::Frame,
    maps::endpoint_of,
    parse::{header, is_fragment, is_later_fragment, ports},
};

/// Flows the node's stack delivered between this node's pods and others, keyed as their replies
/// look; least recently used evicted first. The value is unused.
#[map]
static STACK_FLOWS_V1: LruHashMap<FlowKey, u32> = LruHashMap::with_max_entries(MAX_STACK_FLOWS, 0);

/// What a shortcut must do with a packet for a pod.
pub enum Path {
    /// Deliver it: no recorded flow.
    Shortcut,
    /// Hand it to the stack, counted under the reason: [`Reason::PassStackFlow`] for a reply in a
    /// flow the stack delivered, [`Reason::PassFragment`] for a fragment (only the stack
    /// reassembles).
    Stack(Reason),
}

/// Where the IPv4 packet `ip`, bound for a pod on this node, must go.
#[inline(always)]
pub fn path<C: Frame>(ctx: &C, ip: &Ipv4Hdr) -> Path {
    if is_fragment(ip) {
        return Path::Stack(Reason::PassFragment);
    }
    let key = match icmp_error_about(ctx, ip) {
        // An ICMP error about a packet the stack delivered belongs to that packet's flow: the
        // stack rewrites the packet it quotes too.
        Some(quoted) => reply_of(&quoted),
        None => match ports(ctx, ip) {
            Some(ports) => flow_of(ip, ports),
            None => return Path::Shortcut,
        },
    };
    // SAFETY: the value is only tested for presence.
    match unsafe { STACK_FLOWS_V1.get(key) } {
        Some(_) => Path::Stack(Reason::PassStackFlow),
        None => Path::Shortcut,
    }
}

/// ICMP types that quote the packet they answer: destination unreachable, time exceeded,
/// parameter problem.
const ICMP_ERRORS: [u8; 3] = [3, 11, 12];

/// The flow of the packet an ICMP error `ip` quotes (as that packet went), if `ip` is one and
/// quotes a plain 20-byte IPv4 header and its ports.
#[inline(always)]
fn icmp_error_about<C: Frame>(ctx: &C, ip: &Ipv4Hdr) -> Option<FlowKey> {
    if ip.proto != IpProto::Icmp as u8 {
        return None;
    }
    let icmp = EthHdr::LEN + usize::from(ip.ihl());
    let icmp_type: &u8 = header(ctx, icmp)?;
    if !ICMP_ERRORS.contains(icmp_type) {
        return None;
    }
    // The ICMP header is 8 bytes; the quoted IPv4 header follows, then 8 bytes of its payload.
    let quoted: &Ipv4Hdr = header(ctx, icmp + 8)?;
    if quoted.ihl() != Ipv4Hdr::LEN as u8 {
        return None;
    }
    let ports: &[[u8; 2]; 2] = header(ctx, icmp + 8 + Ipv4Hdr::LEN)?;
    Some(flow_of(quoted, (ports[0], ports[1])))
}

/// The flow of the packet `ip` with transport `(sport, dport)`.
#[inline(always)]
fn flow_of(ip: &Ipv4Hdr, (sport, dport): ([u8; 2], [u8; 2])) -> FlowKey {
    FlowKey {
        src: ip.src_addr,
        dst: ip.dst_addr,
        sport,
        dport,
        proto: ip.proto,
        _pad: [0; 3],
    }
}

/// The key of the replies of `flow`.
#[inline(always)]
fn reply_of(flow: &FlowKey) -> FlowKey {
    FlowKey {
        src: flow.dst,
        dst: flow.src,
        sport: flow.dport,
        dport: flow.sport,
        proto: flow.proto,
        _pad: [0; 3],
    }
}

/// Records the flow of `ip`, which the stack is sending on, when it comes from a pod on this
/// node (only then can a shortcut carry its replies past the stack).
#[inline(always)]
pub fn record<C: Frame>(ctx: &C, ip: &Ipv4Hdr) {
    // A later fragment carries no ports; the first one does.
    if is_later_fragment(ip) || endpoint_of(&ip.src_addr).is_none() {
        return;
    }
    let Some(ports) = ports(ctx, ip) else {
        return;
    };
    let key = reply_of(&flow_of(ip, ports));
    // SAFETY: only tested for presence.
    if unsafe { STACK_FLOWS_V1.get(key) }.is_none() {
        let _ = STACK_FLOWS_V1.insert(key, 0, 0);
    }
}
