//! The node's overlay, decided once at start: which interface carries the node's underlay
//! address and so the tunnel, how packets for other nodes' pods cross it (`--routing`,
//! `--encap`), the collect_md VXLAN device, and the MTUs that follow from the underlay's.

use std::net::Ipv4Addr;

use podwire_common::CrossNode;
use podwire_core::{object::programs, pins::Pins};
use podwire_datapath::{AttachError, Crossing, Datapath, Hook, Tunnel, XdpMode};
use podwire_netlink::{disable_ipv6, overlay::VxlanDevice, Netlink, NetlinkError};

/// The agent's VXLAN device.
pub const VXLAN_DEV: &str = "pw-vxlan";
/// Outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8 bytes.
pub const VXLAN_OVERHEAD: u32 = 50;
/// Pod MTU of a node without an overlay (and nothing configured).
const DEFAULT_MTU: u32 = 1500;

/// What the operator sets of the overlay.
#[derive(Clone, Copy, Debug)]
pub struct OverlayConfig {
    /// This node's underlay address (from the cluster).
    pub address: Ipv4Addr,
    /// VXLAN network identifier.
    pub vni: u32,
    /// UDP port of the tunnel.
    pub port: u16,
    /// Where `from_netdev` runs on the underlay interface.
    pub underlay_xdp: UnderlayXdp,
    /// Whether other nodes' pods are reached through a tunnel or routed natively.
    pub routing: Routing,
    /// Who writes the tunnel's headers (tunnel routing only).
    pub encap: Encap,
}

impl OverlayConfig {
    /// How the programs carry packets for other nodes' pods.
    pub fn cross_node(&self) -> CrossNode {
        match (self.routing, self.encap) {
            (Routing::Native, _) => CrossNode::Native,
            (Routing::Tunnel, Encap::Bpf) => CrossNode::TunnelBpf,
            (Routing::Tunnel, Encap::Device) => CrossNode::TunnelDevice,
        }
    }
}

/// How packets for other nodes' pods cross the underlay.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Routing {
    /// In VXLAN, between the nodes' underlay addresses: any underlay that carries UDP between
    /// them will do (Flannel's vxlan backend).
    Tunnel,
    /// Unencapsulated, to the owning node's underlay address as the next hop (Flannel's host-gw,
    /// Cilium's native routing): the nodes must be neighbours on one segment, pods get the
    /// underlay's full MTU, and the source of a packet cannot be authenticated (see
    /// docs/DATAPATH-MODES.md).
    Native,
}

/// Who writes the tunnel's headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Encap {
    /// podwire's programs: `from_pod` pushes them and sends the packet out of the underlay,
    /// `from_underlay` takes them off and delivers straight into the pod.
    Bpf,
    /// The kernel's collect_md VXLAN device, which the programs redirect into and receive from.
    Device,
}

/// Where `from_netdev`, the XDP program that drops tunnel packets from hosts that are no node,
/// runs on the underlay interface.
///
/// In a NIC's driver (native mode) it runs before the kernel allocates an skb, the earliest and
/// cheapest place. A virtual device's "native" XDP is no such thing: veth runs it in a software
/// loop that first copies every coalesced (GRO/GSO) packet into a linear buffer, which took
/// cross-node TCP from 20 to 4.3 Gbit/s on a veth underlay, where generic mode (run by the stack
/// on the skb it has) kept 20.9.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum UnderlayXdp {
    /// Native on a NIC whose driver runs XDP (generic if it refuses: virtio-net with its guest
    /// offloads on, say); generic on a virtual device (veth, bridge, bond, ...).
    Auto,
    /// Native: fails where the driver has no XDP.
    Native,
    /// Generic, in the stack.
    Generic,
}

/// The overlay as this node runs it.
#[derive(Clone, Debug)]
pub struct Overlay {
    pub config: OverlayConfig,
    /// The interface holding the node's address, and its MTU.
    pub underlay: String,
    pub underlay_mtu: u32,
    /// Whether the underlay is a virtual device (veth, bridge, ...) rather than a NIC's.
    pub underlay_virtual: bool,
    /// ifindex of the underlay interface.
    pub underlay_ifindex: u32,
    /// ifindex of [`VXLAN_DEV`], which the programs redirect into (with the device's tunnel, and
    /// for what the programs' own cannot encapsulate). It exists in every mode: it carries the
    /// host stack's own tunnel traffic, and with native routing it still takes packets from
    /// nodes that tunnel (a cluster switching modes node by node).
    pub device_ifindex: u32,
    /// ifindex of the link the node's routes to other nodes' pod CIDRs leave by: [`VXLAN_DEV`]
    /// through a tunnel, the underlay with native routing (via the owning node).
    pub vxlan_ifindex: u32,
}

impl Overlay {
    /// Finds the underlay and makes the VXLAN device ready (before the datapath loads: the
    /// programs get its ifindex at load time).
    pub async fn setup(netlink: &Netlink, config: OverlayConfig) -> Result<Overlay, NetlinkError> {
        let underlay = netlink.address_owner(config.address).await?;
        let underlay_mtu = underlay.mtu.unwrap_or(DEFAULT_MTU);
        let device_ifindex = netlink
            .ensure_vxlan(VxlanDevice {
                name: VXLAN_DEV,
                port: config.port,
                mtu: underlay_mtu - VXLAN_OVERHEAD,
            })
            .await?;
        // No IPv6 on the device: nothing would carry it (the programs tunnel IPv4 only).
        let _ = disable_ipv6(VXLAN_DEV);
        Ok(Overlay {
            config,
            underlay_virtual: underlay.kind.is_some(),
            underlay_ifindex: underlay.index,
            device_ifindex,
            vxlan_ifindex: match config.routing {
                Routing::Tunnel => device_ifindex,
                Routing::Native => underlay.index,
            },
            underlay: underlay.name,
            underlay_mtu,
        })
    }

    /// MTU of the VXLAN device: what fits in one underlay frame once encapsulated.
    pub fn device_mtu(&self) -> u32 {
        self.underlay_mtu - VXLAN_OVERHEAD
    }

    /// The tunnel as the programs are loaded with it.
    pub fn tunnel(&self) -> Tunnel {
        Tunnel {
            vxlan_ifindex: self.device_ifindex,
            vni: self.config.vni,
            port: self.config.port,
            node_address: self.config.address,
        }
    }

    /// How the programs cross the underlay, as they are loaded with it.
    pub fn crossing(&self) -> Crossing {
        Crossing {
            mode: self.config.cross_node(),
            underlay_ifindex: self.underlay_ifindex,
        }
    }
}

impl Overlay {
    /// Attaches the underlay's programs, pinned: `from_underlay` and `to_underlay` (tc) where
    /// the mode uses them, detaching them where it does not (an agent restarted in another
    /// mode), and `from_netdev` (XDP) where [`UnderlayXdp`] says; a restarted agent swaps its
    /// programs into the pinned links. Returns the mode `from_netdev` runs in, `None` when it
    /// replaced the program of a pinned link, which keeps its mode.
    pub fn guard_underlay(
        &self,
        datapath: &mut Datapath,
        pins: &Pins,
    ) -> Result<Option<XdpMode>, AttachError> {
        let mode = match self.config.underlay_xdp {
            UnderlayXdp::Auto if self.underlay_virtual => XdpMode::Skb,
            // Native where the driver has it, generic otherwise.
            UnderlayXdp::Auto => XdpMode::Default,
            UnderlayXdp::Native => XdpMode::Driver,
            UnderlayXdp::Generic => XdpMode::Skb,
        };
        let iface = self.underlay.as_str();
        let mode_uses = |program| match self.config.cross_node() {
            CrossNode::TunnelDevice => false,
            CrossNode::TunnelBpf => program == programs::FROM_UNDERLAY,
            CrossNode::Native => true,
        };
        for hook in Hook::underlay(iface) {
            match mode_uses(hook.program) {
                true => datapath.attach_pinned(hook, &hook.pin(pins))?,
                false => podwire_datapath::detach(hook, pins)?,
            }
        }
        datapath.attach_from_netdev(iface, &pins.link(programs::FROM_NETDEV, iface), mode)
    }
}

/// The MTUs pods get unless their plugin configuration sets one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodMtu {
    /// The pod's interface, and its route to the other pods of its node: nothing between them is
    /// encapsulated, so they get the underlay's full MTU (a tunnel's 50 bytes cost same-node
    /// streams their full-size segments).
    pub local: u32,
    /// The pod's route to everywhere else, which may cross the tunnel.
    pub cluster: u32,
}

/// `configured` (the agent's `--mtu`) for both, else the underlay's and what the tunnel leaves
/// of it (the underlay's for both with native routing, which adds no header), else 1500.
pub fn pod_mtu(configured: Option<u32>, overlay: Option<&Overlay>) -> PodMtu {
    match (configured, overlay) {
        (Some(mtu), _) => PodMtu {
            local: mtu,
            cluster: mtu,
        },
        (None, Some(overlay)) if overlay.config.routing == Routing::Native => PodMtu {
            local: overlay.underlay_mtu,
            cluster: overlay.underlay_mtu,
        },
        (None, Some(overlay)) => PodMtu {
            local: overlay.underlay_mtu,
            cluster: overlay.device_mtu(),
        },
        (None, None) => PodMtu {
            local: DEFAULT_MTU,
            cluster: DEFAULT_MTU,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overlay(underlay_mtu: u32) -> Overlay {
        overlay_routed(underlay_mtu, Routing::Tunnel)
    }

    fn overlay_routed(underlay_mtu: u32, routing: Routing) -> Overlay {
        Overlay {
            config: OverlayConfig {
                address: Ipv4Addr::new(192, 168, 77, 1),
                vni: 1,
                port: 4789,
                underlay_xdp: UnderlayXdp::Auto,
                routing,
                encap: Encap::Bpf,
            },
            underlay: "eth0".into(),
            underlay_mtu,
            underlay_virtual: false,
            underlay_ifindex: 2,
            device_ifindex: 5,
            vxlan_ifindex: 5,
        }
    }

    #[test]
    fn native_routing_gives_pods_the_underlay_mtu_everywhere() {
        let native = |mtu| overlay_routed(mtu, Routing::Native);
        let mtu = |local, cluster| PodMtu { local, cluster };
        assert_eq!(pod_mtu(None, Some(&native(1500))), mtu(1500, 1500));
        assert_eq!(pod_mtu(None, Some(&native(9000))), mtu(9000, 9000));
        assert_eq!(pod_mtu(Some(1400), Some(&native(1500))), mtu(1400, 1400));
    }

    #[test]
    fn routing_and_encap_choose_the_programs_mode() {
        let config = |routing, encap| OverlayConfig {
            routing,
            encap,
            ..overlay(1500).config
        };
        assert_eq!(
            config(Routing::Tunnel, Encap::Bpf).cross_node(),
            CrossNode::TunnelBpf
        );
        assert_eq!(
            config(Routing::Tunnel, Encap::Device).cross_node(),
            CrossNode::TunnelDevice
        );
        assert_eq!(
            config(Routing::Native, Encap::Bpf).cross_node(),
            CrossNode::Native
        );
        assert_eq!(
            config(Routing::Native, Encap::Device).cross_node(),
            CrossNode::Native
        );
    }

    #[test]
    fn pod_mtu_is_the_configured_one_else_the_underlay_and_what_the_tunnel_leaves() {
        let mtu = |local, cluster| PodMtu { local, cluster };
        assert_eq!(pod_mtu(None, Some(&overlay(1500))), mtu(1500, 1450));
        assert_eq!(pod_mtu(None, Some(&overlay(9000))), mtu(9000, 8950));
        assert_eq!(pod_mtu(Some(1400), Some(&overlay(1500))), mtu(1400, 1400));
        assert_eq!(pod_mtu(None, None), mtu(1500, 1500));
        assert_eq!(pod_mtu(Some(9000), None), mtu(9000, 9000));
    }
}
