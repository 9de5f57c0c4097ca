//! Types shared by podwire's kernel programs and userspace. Everything here is `#[repr(C)]` and
//! plain data: the kernel side writes it into maps, the agent and the CLI read it back.
#![no_std]

/// Why a packet got its verdict. The value indexes `COUNTERS`, so a variant's number never changes
/// once released; new reasons take new numbers below [`Reason::SLOTS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// IPv4 from a pod to a destination that is not a local pod, handed to the host stack.
    PassToStack = 0,
    /// Not IPv4 (ARP, IPv6, ...): handed to the host stack untouched.
    PassNotIpv4 = 1,
    /// Too short for its Ethernet or IPv4 header, or an IPv4 header length below 20 bytes.
    DropMalformed = 2,
    /// Delivered straight into a pod on this node (bpf_redirect_peer).
    RedirectLocal = 3,
    /// Source IPv4 address is not the sending pod's own.
    DropSpoofedIp = 4,
    /// Source MAC address is not the sending pod's own.
    DropSpoofedMac = 5,
    /// TTL would reach zero when forwarded.
    DropTtlExceeded = 6,
}

impl Reason {
    /// Entries in `COUNTERS`: fixed, so adding a reason does not change the map's layout.
    pub const SLOTS: u32 = 64;

    /// Every reason, in number order.
    pub const ALL: [Reason; 7] = [
        Reason::PassToStack,
        Reason::PassNotIpv4,
        Reason::DropMalformed,
        Reason::RedirectLocal,
        Reason::DropSpoofedIp,
        Reason::DropSpoofedMac,
        Reason::DropTtlExceeded,
    ];

    /// The reason with this number, if it is one.
    pub fn from_u32(n: u32) -> Option<Reason> {
        Self::ALL.into_iter().find(|r| *r as u32 == n)
    }

    /// Stable kebab-case name, used in tables, JSON and metrics labels.
    pub fn name(self) -> &'static str {
        match self {
            Reason::PassToStack => "pass-to-stack",
            Reason::PassNotIpv4 => "pass-not-ipv4",
            Reason::DropMalformed => "drop-malformed",
            Reason::RedirectLocal => "redirect-local",
            Reason::DropSpoofedIp => "drop-spoofed-ip",
            Reason::DropSpoofedMac => "drop-spoofed-mac",
            Reason::DropTtlExceeded => "drop-ttl-exceeded",
        }
    }

    /// Whether packets counted under this reason were dropped.
    pub fn is_drop(self) -> bool {
        matches!(
            self,
            Reason::DropMalformed
                | Reason::DropSpoofedIp
                | Reason::DropSpoofedMac
                | Reason::DropTtlExceeded
        )
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

/// Key of `ENDPOINTS_V1`: a pod's IPv4 address, in network byte order as it stands in packets.
pub type EndpointKey = [u8; 4];

/// Value of `ENDPOINTS_V1`: a pod on this node, as the datapath needs it.
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

/// Most endpoints one node holds (Kubernetes' default is 110 pods per node).
pub const MAX_ENDPOINTS: u32 = 4096;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_numbers_round_trip_and_fit_the_counter_map() {
        for reason in Reason::ALL {
            assert_eq!(Reason::from_u32(reason as u32), Some(reason));
            assert!((reason as u32) < Reason::SLOTS);
        }
        assert_eq!(Reason::from_u32(Reason::SLOTS - 1), None);
    }

    #[test]
    fn endpoint_has_no_padding() {
        assert_eq!(core::mem::size_of::<Endpoint>(), 20);
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
