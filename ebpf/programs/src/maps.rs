//! Maps the agent fills and the programs read, and the load-time configuration.

use aya_ebpf::{
    macros::map,
    maps::{lpm_trie::Key, HashMap, LpmTrie},
    Global,
};
use podwire_common::{Endpoint, EndpointKey, NodeEntry, MAX_ENDPOINTS, MAX_NODES};

/// Pods on this node by IPv4 address: their host-side veth and MACs.
#[map]
pub static ENDPOINTS_V1: HashMap<EndpointKey, Endpoint> =
    HashMap::with_max_entries(MAX_ENDPOINTS, 0);

/// Pod CIDRs (and underlay addresses) to the node owning them, longest prefix first.
#[map]
pub static NODES_V1: LpmTrie<[u8; 4], NodeEntry> = LpmTrie::with_max_entries(MAX_NODES, 0);

/// ifindex of the agent's collect_md VXLAN device; 0 without an overlay. Set at load time.
#[unsafe(no_mangle)]
pub static VXLAN_IFINDEX: Global<u32> = Global::new(0);

/// VXLAN network identifier of the cluster's tunnel. Set at load time.
#[unsafe(no_mangle)]
pub static VNI: Global<u32> = Global::new(1);

/// Non-zero only in copies of the programs loaded to be run with BPF_PROG_TEST_RUN, which cannot
/// give a packet tunnel metadata: there the tunnel's remote end is read from `__sk_buff.cb[0]`
/// (see `tunnel::remote`). An agent loads with zero; the value sits in the object's frozen
/// .rodata, so the verifier knows it and removes the branch that reads the control block.
#[unsafe(no_mangle)]
pub static TEST_RUN: Global<u32> = Global::new(0);

/// The node owning `addr` (network byte order), if any prefix covers it.
#[inline(always)]
pub fn node_of(addr: [u8; 4]) -> Option<NodeEntry> {
    NODES_V1.get(Key::new(32, addr)).copied()
}
