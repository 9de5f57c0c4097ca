//! Types shared by podwire's kernel programs and userspace. Everything here is `#[repr(C)]` and
//! plain data: the kernel side writes it into maps, the agent and the CLI read it back.
#![no_std]

/// Declares [`Reason`] from one table: number, name and verdict of each reason side by side, so
/// the list of reasons, their names and which of them are drops cannot drift apart.
macro_rules! reasons {
    ($($(#[doc = $doc:literal])+ $variant:ident = $number:literal, $name:literal, $verdict:ident;)+) => {
        /// Why a packet got its verdict. The value indexes `COUNTERS`, so a variant's number never
        /// changes once released; new reasons take new numbers below [`Reason::SLOTS`].
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Reason {
            $($(#[doc = $doc])+ $variant = $number,)+
        }

        impl Reason {
            /// Every reason, in number order.
            pub const ALL: [Reason; [$($number),+].len()] = [$(Reason::$variant),+];

            /// Stable kebab-case name, used in tables, JSON and metrics labels.
            pub const fn name(self) -> &'static str {
                match self {
                    $(Reason::$variant => $name,)+
                }
            }

            /// What happened to the packets counted under this reason.
            pub const fn verdict(self) -> Verdict {
                match self {
                    $(Reason::$variant => Verdict::$verdict,)+
                }
            }
        }
    };
}

reasons! {
    /// IPv4 from a pod to a destination that is not a local pod, handed to the host stack.
    PassToStack = 0, "pass-to-stack", Pass;
    /// Not IPv4, and allowed: a pod's ARP for its own address, or what the node's stack routes
    /// to the VXLAN device that the device will discard.
    PassNotIpv4 = 1, "pass-not-ipv4", Pass;
    /// Too short for its Ethernet or IPv4 header, or an IPv4 header length below 20 bytes.
    DropMalformed = 2, "drop-malformed", Drop;
    /// Delivered straight into a pod on this node (bpf_redirect_peer).
    RedirectLocal = 3, "redirect-local", Redirect;
    /// Source IPv4 address is not the sending pod's own.
    DropSpoofedIp = 4, "drop-spoofed-ip", Drop;
    /// Source MAC address is not the sending pod's own.
    DropSpoofedMac = 5, "drop-spoofed-mac", Drop;
    /// TTL would reach zero when forwarded.
    DropTtlExceeded = 6, "drop-ttl-exceeded", Drop;
    /// Sent into the VXLAN tunnel toward the node owning the destination's pod CIDR.
    RedirectOverlay = 7, "redirect-overlay", Redirect;
    /// Destination is in the cluster's pod range, but no node owns its pod CIDR (any more).
    DropNoNode = 8, "drop-no-node", Drop;
    /// Destination is in this node's pod CIDR, but no pod holds it.
    DropNoEndpoint = 9, "drop-no-endpoint", Drop;
    /// Arrived through the tunnel and delivered into a pod on this node.
    RedirectFromOverlay = 10, "redirect-from-overlay", Redirect;
    /// Arrived through the tunnel with an inner source that the sending node does not own.
    DropOverlaySpoofed = 11, "drop-overlay-spoofed", Drop;
    /// Sent by the node's own stack toward a remote pod, put into the tunnel.
    EncapHost = 12, "encap-host", Pass;
    /// The kernel refused the tunnel key or the redirect into the tunnel.
    DropEncapFailed = 13, "drop-encap-failed", Drop;
    /// Carries an 802.1Q or 802.1ad tag (in the frame, or already taken off by the kernel): pods
    /// send untagged frames only.
    DropVlan = 14, "drop-vlan", Drop;
    /// IPv6 from a pod: podwire does not carry it yet, and a router advertisement must not
    /// reach the node.
    DropIpv6 = 15, "drop-ipv6", Drop;
    /// ARP that is not the pod's own: another sender address or MAC, or not Ethernet/IPv4 ARP.
    DropSpoofedArp = 16, "drop-spoofed-arp", Drop;
    /// Neither IPv4 nor ARP (nor IPv6 or VLAN, counted apart): nothing a pod needs to send.
    DropEtherType = 17, "drop-ethertype", Drop;
    /// A tunnel packet with another VNI than the cluster's.
    DropOverlayVni = 18, "drop-overlay-vni", Drop;
    /// Arrived through the tunnel for an address that is neither a pod on this node nor this
    /// node: podwire does not relay.
    DropOverlayRelay = 19, "drop-overlay-relay", Drop;
    /// A reply in a flow the node's stack delivered (a Service kube-proxy NATed, say): handed to
    /// the stack, whose conntrack reverses the NAT.
    PassStackFlow = 20, "pass-stack-flow", Pass;
    /// An IPv4 fragment for a pod: handed to the stack, which reassembles it (a NATed flow's
    /// later fragments carry no ports to look its flow up by).
    PassFragment = 21, "pass-fragment", Pass;
    /// Sent into a pod by the node's stack (`to_pod`); a flow from another pod here is recorded
    /// so its replies go back through the stack.
    PassToPod = 22, "pass-to-pod", Pass;
    /// A tunnel packet on the underlay from an address that is no node of the cluster, dropped
    /// before the VXLAN device's socket sees it (`from_netdev`).
    DropTunnelNotNode = 23, "drop-tunnel-not-node", Drop;
    /// A tunnel packet from a node with the cluster's VNI, on to the VXLAN device
    /// (`from_netdev`).
    PassTunnel = 24, "pass-tunnel", Pass;
    /// Underlay traffic that is not podwire's tunnel, let through untouched (`from_netdev`).
    PassUnderlay = 25, "pass-underlay", Pass;
    /// Native routing: sent by `from_pod` straight out of the underlay, unencapsulated, toward
    /// the node owning the destination (`bpf_redirect_neigh`).
    RedirectNative = 26, "redirect-native", Redirect;
    /// Native routing: a plain packet from another node's pod, delivered by `from_underlay`
    /// straight into a pod on this node.
    RedirectFromNative = 27, "redirect-from-native", Redirect;
    /// Native routing: a plain packet on the underlay for a pod here whose source claims the
    /// cluster's pod range but no other node's pod CIDR (this node's own, or a range no node
    /// owns): no node sends that.
    DropNativeSpoofed = 28, "drop-native-spoofed", Drop;
    /// Tunnel written by the programs: `from_pod` pushed the outer Ethernet/IPv4/UDP/VXLAN
    /// headers and sent it out of the underlay toward the node.
    RedirectEncap = 29, "redirect-encap", Redirect;
    /// Tunnel written by the programs: `from_underlay` took the outer headers off a tunnel packet
    /// from a node and delivered it straight into a pod on this node.
    RedirectDecap = 30, "redirect-decap", Redirect;
    /// Native routing: sent out of the underlay by the node's own stack (`to_underlay`); a flow
    /// from a pod here (a Service it NATed) is recorded so its replies come back through it.
    PassStackOut = 31, "pass-stack-out", Pass;
}

/// How packets for other nodes' pods cross the underlay; the programs' `CROSS_NODE`, set at load
/// time.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrossNode {
    /// VXLAN through the agent's collect_md device: the kernel encapsulates and decapsulates.
    TunnelDevice = 0,
    /// VXLAN written by the programs: `from_pod` encapsulates, `from_underlay` decapsulates.
    TunnelBpf = 1,
    /// No encapsulation: plain packets routed to the owning node over the underlay.
    Native = 2,
}

/// `__sk_buff.tc_index` of a packet `from_pod` sent out of the underlay itself, so that
/// `to_underlay` (which runs on it too) tells it from what the node's stack routed there, and
/// clears it. ("pw")
pub const TC_INDEX_FROM_POD: u32 = 0x7077;

impl Reason {
    /// Entries in `COUNTERS`: fixed, so adding a reason does not change the map's layout.
    pub const SLOTS: u32 = 64;

    /// The reason with this number, if it is one.
    pub fn from_u32(n: u32) -> Option<Reason> {
        Self::ALL.into_iter().find(|r| *r as u32 == n)
    }

    /// Whether packets counted under this reason were dropped.
    pub const fn is_drop(self) -> bool {
        matches!(self.verdict(), Verdict::Drop)
    }
}

/// What the datapath did with a packet, as `podwire counters` shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Handed on to the kernel: the host stack, or the tunnel device's own egress.
    Pass,
    /// Redirected by the program: into a pod, or into the tunnel.
    Redirect,
    /// Dropped, and reported on the event ring.
    Drop,
}

impl Verdict {
    /// Stable lower-case name, used in tables and JSON.
    pub const fn name(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Redirect => "redirect",
            Verdict::Drop => "drop",
        }
    }
}

/// Per-CPU value of `COUNTERS`: packets and bytes (as the skb length: L2 header included).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

#[cfg(feature = "user")]
// SAFETY: plain-old-data with no padding (two u64).
unsafe impl aya::Pod for Counter {}

/// Per-CPU values add up to the node's total.
impl core::iter::Sum for Counter {
    fn sum<I: Iterator<Item = Counter>>(iter: I) -> Counter {
        iter.fold(Counter::default(), |sum, c| Counter {
            packets: sum.packets + c.packets,
            bytes: sum.bytes + c.bytes,
        })
    }
}

/// Key of `ENDPOINTS_V2`: a pod's IPv4 address, in network byte order as it stands in packets.
pub type EndpointKey = [u8; 4];

/// Value of `ENDPOINTS_V2`: a pod on this node, as the datapath needs it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Endpoint {
    /// ifindex of the pod's host-side veth (in the node's namespace).
    pub ifindex: u32,
    /// Reserved, zero.
    pub flags: u32,
    /// MAC of the pod's interface: the only source MAC it may send from, the destination MAC of
    /// what is delivered to it.
    pub pod_mac: [u8; 6],
    /// MAC of the host-side veth: the pod's gateway, the source MAC of what is delivered to it.
    pub host_mac: [u8; 6],
}

#[cfg(feature = "user")]
// SAFETY: plain-old-data, 20 bytes with no padding (two u32, two [u8; 6]).
unsafe impl aya::Pod for Endpoint {}

/// What a prefix of `NODES_V1` stands for. The numbers are those of the flags the first release
/// stored in the same field, so tables pinned by it read the same.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeKind {
    /// Another node's pod CIDR, or its underlay address as a /32: tunnelled to that node.
    Remote = 0,
    /// This node's own pod CIDR: its pods are in `ENDPOINTS_V2`, never tunnelled.
    Local = 1,
    /// The cluster's whole pod range, below every node's CIDR: matches only addresses that no
    /// node owns.
    NoNode = 2,
}

/// Value of `NODES_V1`, an LPM trie keyed by IPv4 prefix (address bytes in network order): who
/// owns a pod CIDR, or a node's own underlay address (as a /32).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeEntry {
    /// The owning node's underlay IPv4 address, network byte order; zero for [`NodeKind::NoNode`].
    pub addr: [u8; 4],
    /// `NodeKind as u32`, kept as a number because a map may hold one this build does not know.
    kind: u32,
}

impl NodeEntry {
    /// A prefix owned by the node at `addr`: another node ([`NodeKind::Remote`]) or this one.
    pub const fn node(kind: NodeKind, addr: [u8; 4]) -> NodeEntry {
        NodeEntry {
            addr,
            kind: kind as u32,
        }
    }

    /// The cluster range no node owns.
    pub const fn no_node() -> NodeEntry {
        Self::node(NodeKind::NoNode, [0; 4])
    }

    /// The entry's kind; `None` for a number this build does not know (written by a newer agent),
    /// which the programs treat as no node.
    pub const fn kind(&self) -> Option<NodeKind> {
        match self.kind {
            0 => Some(NodeKind::Remote),
            1 => Some(NodeKind::Local),
            2 => Some(NodeKind::NoNode),
            _ => None,
        }
    }

    /// Whether this is another node's prefix, tunnelled to it.
    pub const fn is_remote(&self) -> bool {
        matches!(self.kind(), Some(NodeKind::Remote))
    }

    /// Whether this is another node's prefix and that node's underlay address is `addr`: what
    /// makes `addr` a node allowed to tunnel packets from the prefix.
    #[inline]
    pub fn is_remote_at(&self, addr: [u8; 4]) -> bool {
        self.is_remote() && self.addr == addr
    }
}

#[cfg(feature = "user")]
// SAFETY: plain-old-data, 8 bytes with no padding.
unsafe impl aya::Pod for NodeEntry {}

/// Most entries of `NODES_V1`: a pod CIDR and an address per node, and the cluster range.
pub const MAX_NODES: u32 = 16384;

/// A dropped packet, as `EVENTS_V1` reports it to `podwire events`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropEvent {
    /// `Reason as u32`.
    pub reason: u32,
    /// Interface the program ran on.
    pub ifindex: u32,
    /// Packet length (skb->len).
    pub len: u32,
    /// IPv4 source and destination, network byte order; zero when the packet has no IPv4 header.
    pub src: [u8; 4],
    pub dst: [u8; 4],
    /// IPv4 protocol number; zero without an IPv4 header.
    pub proto: u8,
    pub _pad: [u8; 3],
}

#[cfg(feature = "user")]
// SAFETY: plain-old-data, 24 bytes with explicit padding.
unsafe impl aya::Pod for DropEvent {}

/// Key of `STACK_FLOWS_V1`: a flow as its replies look (source the pod that answers), so a
/// reply is looked up as it is. Addresses and ports in network byte order; ports zero for
/// protocols without them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub proto: u8,
    pub _pad: [u8; 3],
}

#[cfg(feature = "user")]
// SAFETY: plain-old-data, 16 bytes with explicit padding.
unsafe impl aya::Pod for FlowKey {}

/// Most entries of `STACK_FLOWS_V1`, least recently used evicted first. A node's stack
/// delivering more concurrent flows between its own pods (Services, mostly) than this loses the
/// oldest records, and their replies then take the shortcut.
pub const MAX_STACK_FLOWS: u32 = 131_072;

/// Most endpoints one node holds: a /16 of pods (Kubernetes' default is 110 pods per node, but
/// a node's pod CIDR may be as large as the cluster lets it). The map is preallocated: 6 MiB of
/// kernel memory at this size (0.4 MiB at 4096, what `ENDPOINTS_V1` held). Changing this changes
/// the map's version suffix.
pub const MAX_ENDPOINTS: u32 = 65536;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_numbers_round_trip_and_fit_the_counter_map() {
        for (i, reason) in Reason::ALL.into_iter().enumerate() {
            assert_eq!(reason as usize, i, "ALL lists the reasons in number order");
            assert_eq!(Reason::from_u32(reason as u32), Some(reason));
            assert!((reason as u32) < Reason::SLOTS);
        }
        assert_eq!(Reason::from_u32(Reason::SLOTS - 1), None);
    }

    #[test]
    fn shared_types_have_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<Endpoint>(), 20);
        assert_eq!(core::mem::size_of::<NodeEntry>(), 8);
        assert_eq!(core::mem::size_of::<DropEvent>(), 24);
        assert_eq!(core::mem::size_of::<FlowKey>(), 16);
    }

    #[test]
    fn node_kinds_round_trip_and_unknown_ones_are_none() {
        for kind in [NodeKind::Remote, NodeKind::Local, NodeKind::NoNode] {
            assert_eq!(NodeEntry::node(kind, [1, 2, 3, 4]).kind(), Some(kind));
        }
        let unknown = NodeEntry {
            addr: [0; 4],
            kind: 7,
        };
        assert_eq!(unknown.kind(), None);
        assert!(!unknown.is_remote());
    }

    #[test]
    fn reason_names_are_unique() {
        for a in Reason::ALL {
            for b in Reason::ALL {
                assert_eq!(a == b, a.name() == b.name(), "{a:?} and {b:?}");
            }
        }
    }
}
