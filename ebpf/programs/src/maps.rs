//! Maps the agent fills and the programs read, and the load-time configuration.

use aya_ebpf::{
    macros::map,
    maps::{lpm_trie::Key, HashMap, LpmTrie},
    Global,
};
use podwire_common::{CrossNode, Endpoint, EndpointKey, NodeEntry, MAX_ENDPOINTS, MAX_NODES};

/// Pods on this node by IPv4 address: their host-side veth and MACs.
#[map]
pub static ENDPOINTS_V2: HashMap<EndpointKey, Endpoint> =
    HashMap::with_max_entries(MAX_ENDPOINTS, 0);

/// Pod CIDRs (and underlay addresses) to the node owning them, longest prefix first.
#[map]
pub static NODES_V1: LpmTrie<[u8; 4], NodeEntry> = LpmTrie::with_max_entries(MAX_NODES, 0);

/// ifindex of the agent's collect_md VXLAN device; 0 without an overlay. Set at load time.
#[unsafe(no_mangle)]
pub static VXLAN_IFINDEX: Global<u32> = Global::new(0);

/// How packets for other nodes' pods cross the underlay: `CrossNode as u32`. Set at load time,
/// so the verifier walks only the chosen mode's paths.
#[unsafe(no_mangle)]
pub static CROSS_NODE: Global<u32> = Global::new(CrossNode::TunnelDevice as u32);

/// ifindex of the underlay interface (the one holding the node's address), where the tunnel
/// written by the programs and native routing leave; 0 without an overlay. Set at load time.
#[unsafe(no_mangle)]
pub static UNDERLAY_IFINDEX: Global<u32> = Global::new(0);

/// VXLAN network identifier of the cluster's tunnel. Set at load time.
#[unsafe(no_mangle)]
pub static VNI: Global<u32> = Global::new(1);

/// UDP port of the cluster's tunnel, in network byte order as packets carry it. Set at load
/// time.
#[unsafe(no_mangle)]
pub static VXLAN_PORT: Global<u16> = Global::new(u16::to_be(4789));

/// This node's underlay address, in network byte order: the one address of its own that other
/// nodes tunnel to. Set at load time.
#[unsafe(no_mangle)]
pub static NODE_ADDR: Global<[u8; 4]> = Global::new([0; 4]);

/// The pod on this node holding `addr` (network byte order), looked up with the key read in place
/// from the packet.
#[inline(always)]
pub fn endpoint_of(addr: &[u8; 4]) -> Option<&'static Endpoint> {
    // SAFETY: map values are only read here; the agent replaces them whole.
    unsafe { ENDPOINTS_V2.get(addr) }
}

/// The node owning `addr` (network byte order), if any prefix covers it.
#[inline(always)]
pub fn node_of(addr: [u8; 4]) -> Option<NodeEntry> {
    NODES_V1.get(Key::new(32, addr)).copied()
}

/// Whether the load-time mode is `mode`.
#[inline(always)]
pub fn cross_node_is(mode: CrossNode) -> bool {
    CROSS_NODE.load() == mode as u32
}
