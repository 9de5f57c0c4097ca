//! Names of what the eBPF object (`ebpf/programs`) holds. The programs' Rust statics carry the
//! same names; a map whose layout (type, key or value size, capacity, flags) changes gets a new
//! version suffix, so an upgraded agent creates the new map next to the old one's pin, which it
//! then removes. Loading refuses a map pinned under a current name with another layout.

/// The programs, one per attach point, named from the pod's view.
pub mod programs {
    /// tc ingress of a pod's host-side veth: everything the pod sends.
    pub const FROM_POD: &str = "from_pod";
    /// tc egress of a pod's host-side veth: what the node's stack sends into the pod.
    pub const TO_POD: &str = "to_pod";
    /// tc ingress of the VXLAN device: what other nodes tunnelled here.
    pub const FROM_OVERLAY: &str = "from_overlay";
    /// tc egress of the VXLAN device: what goes into the tunnel.
    pub const TO_OVERLAY: &str = "to_overlay";
    /// XDP on the underlay interface: everything that arrives from the network.
    pub const FROM_NETDEV: &str = "from_netdev";
    /// tc ingress of the underlay interface, with the programs' own tunnel or native routing:
    /// takes tunnel packets apart (or plain ones in) straight into pods.
    pub const FROM_UNDERLAY: &str = "from_underlay";
    /// tc egress of the underlay interface, with native routing: what the node's stack routes out.
    pub const TO_UNDERLAY: &str = "to_underlay";
    /// Every program a node may attach, in load order; all tc classifiers but [`FROM_NETDEV`].
    pub const ALL: [&str; 7] = [
        FROM_POD,
        TO_POD,
        FROM_OVERLAY,
        TO_OVERLAY,
        FROM_NETDEV,
        FROM_UNDERLAY,
        TO_UNDERLAY,
    ];
    /// `from_overlay` as BPF_PROG_TEST_RUN can run it: the same code, but the sending node's
    /// address comes from `__sk_buff.cb[0]` (in network byte order), as a test run cannot give a
    /// packet tunnel metadata. Never attached.
    pub const TEST_FROM_OVERLAY: &str = "test_from_overlay";
    /// `to_overlay` as BPF_PROG_TEST_RUN can run it: a packet already keyed toward a node is one
    /// with that node's address in `cb[0]`. Never attached.
    pub const TEST_TO_OVERLAY: &str = "test_to_overlay";
    /// The programs only tests run.
    pub const TEST_RUN: [&str; 2] = [TEST_FROM_OVERLAY, TEST_TO_OVERLAY];
}

/// The maps, all pinned in bpffs so they outlive the agent.
pub mod maps {
    /// Per-CPU packet and byte counts per verdict reason.
    pub const COUNTERS: &str = "COUNTERS";
    /// Pods on this node by IPv4 address (V1 held 4096, V2 holds 65536).
    pub const ENDPOINTS: &str = "ENDPOINTS_V2";
    /// Pod CIDRs and underlay addresses to the node owning them (LPM trie).
    pub const NODES: &str = "NODES_V1";
    /// Ring of dropped packets (read by `podwire events`, not by the agent).
    pub const EVENTS: &str = "EVENTS_V1";
    /// Flows the node's stack delivered, keyed as their replies look (LRU hash).
    pub const STACK_FLOWS: &str = "STACK_FLOWS_V1";
    /// The maps pinned in bpffs.
    pub const PINNED: [&str; 5] = [COUNTERS, ENDPOINTS, NODES, EVENTS, STACK_FLOWS];
}
