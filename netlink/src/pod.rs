//! A pod's veth pair and addressing: what the CNI plugin makes at ADD and verifies at CHECK (and
//! `podwire-verify` makes on other kernels).
//!
//! Pod addressing follows Calico: the pod's address is a /32, its default route goes via
//! 169.254.1.1 on a link-scope route, and a permanent neighbour entry maps 169.254.1.1 to the
//! host-side veth's MAC. The pod therefore never ARPs for its gateway and every packet it sends
//! reaches `from_pod` on the host side. The node reaches the pod over a /32 route on the veth.

use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr},
    os::fd::AsRawFd as _,
};

use futures::TryStreamExt as _;
use ipnet::Ipv4Net;
use nix::sched::{setns, CloneFlags};
use podwire_core::{
    endpoint::VethPair,
    fault::{self, Injected},
    mac::Mac,
};
use rtnetlink::{
    packet_route::{
        address::AddressAttribute,
        link::{InfoData, InfoKind, InfoVeth},
        neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState},
        route::{RouteAddress, RouteAttribute, RouteMetric, RouteScope},
    },
    LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder,
};

use crate::{
    error::{NetlinkError, Op},
    link::{disable_ipv6, LinkRef, Netlink},
};

/// The pods' gateway: link-local, the same on every node, never on the wire.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// A pod's network namespace, held open, with a netlink connection inside it.
pub struct PodNetns {
    netlink: Netlink,
    ns: File,
    /// As the runtime named it, for errors.
    path: String,
}

impl PodNetns {
    /// Opens the namespace at `path` (e.g. CNI_NETNS) and connects inside it.
    pub fn open(path: &str) -> Result<PodNetns, NetlinkError> {
        let ns = File::open(path).map_err(|source| NetlinkError::Netns {
            path: path.to_owned(),
            source,
        })?;
        Ok(PodNetns {
            netlink: Netlink::connect_in(&ns, path)?,
            ns,
            path: path.to_owned(),
        })
    }
}

impl PodNetns {
    /// Runs `f` on a thread inside the pod's namespace (for its /proc/sys/net, which belongs to
    /// the namespace of whoever opens it).
    fn enter<R: Send>(
        &self,
        f: impl FnOnce() -> Result<R, NetlinkError> + Send,
    ) -> Result<R, NetlinkError> {
        std::thread::scope(|s| {
            s.spawn(|| {
                setns(&self.ns, CloneFlags::CLONE_NEWNET).map_err(|e| NetlinkError::Netns {
                    path: self.path.clone(),
                    source: e.into(),
                })?;
                f()
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

/// A pod's interface as ADD makes it.
#[derive(Clone, Copy, Debug)]
pub struct PodInterface<'a> {
    /// Name of the veth's host side in the node.
    pub host_ifname: &'a str,
    /// Name of its peer in the pod (CNI_IFNAME).
    pub ifname: &'a str,
    pub ip: Ipv4Addr,
    /// MTU of both ends of the veth pair.
    pub mtu: u32,
    /// Set when traffic leaving the node has less room than the pod's link (a tunnel's
    /// headers): `None` gives every route the link's MTU.
    pub split: Option<MtuSplit>,
}

/// A pod's two MTUs: the link's for the node's other pods (nothing between them is
/// encapsulated), a smaller one for everything else.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MtuSplit {
    /// The node's pod CIDR, routed via the gateway at the link's MTU.
    pub node_pods: Ipv4Net,
    /// MTU of the default route: what may cross the tunnel.
    pub cluster_mtu: u32,
}

impl PodInterface<'_> {
    /// The pod's routes via the gateway, with the MTU each carries (`None`: the link's): the
    /// default route, and with a split the node's pod CIDR at the link's MTU.
    pub fn routes(&self) -> Vec<(Ipv4Net, Option<u32>)> {
        let default = Ipv4Net::default();
        match self.split {
            None => vec![(default, None)],
            Some(split) => vec![
                (default, Some(split.cluster_mtu)),
                (split.node_pods.trunc(), Some(self.mtu)),
            ],
        }
    }
}

/// Creates the veth pair, its peer directly inside the pod's namespace, and addresses and routes
/// both sides; returns the pair with both MACs. If a step after the pair's creation fails, the
/// pair is deleted again (its peer with it): nothing is left half made.
pub async fn create(
    host: &Netlink,
    pod: &PodNetns,
    want: PodInterface<'_>,
) -> Result<VethPair, NetlinkError> {
    let PodInterface {
        host_ifname,
        ifname,
        mtu,
        ..
    } = want;
    let peer = LinkMessageBuilder::<LinkUnspec>::new()
        .name(ifname)
        .mtu(mtu)
        .setns_by_fd(pod.ns.as_raw_fd())
        .build();
    let veth = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
        .name(host_ifname)
        .mtu(mtu)
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .build();
    host.handle()
        .link()
        .add(veth)
        .execute()
        .await
        .map_err(Op::CreateVeth(host_ifname.to_owned()).failed())?;
    match address(host, pod, want).await {
        Ok(pair) => Ok(pair),
        Err(e) => {
            let _ = host.delete_link(host_ifname).await;
            Err(e)
        }
    }
}

/// Addresses and routes both sides of the new veth pair of `want`.
async fn address(
    host: &Netlink,
    pod: &PodNetns,
    want: PodInterface<'_>,
) -> Result<VethPair, NetlinkError> {
    let PodInterface {
        host_ifname,
        ifname,
        ip,
        ..
    } = want;
    fault::point("cni.add.after-veth").map_err(injected(Op::SetUp(host_ifname.to_owned())))?;
    let host_link = host.existing_link(host_ifname).await?;
    let host_mac = host_link.mac()?;
    // Pods are IPv4 only: with IPv6 off on both ends before they come up, the node never accepts
    // a router advertisement or autoconfigures from a pod, and a pod never sends IPv6.
    disable_ipv6(host_ifname)?;
    set_up(host, host_link.index, host_ifname).await?;
    add_route(host, Ipv4Net::from(ip), host_link.index, host_ifname).await?;

    let pod_nl = &pod.netlink;
    let pod_link = pod_nl.existing_link(ifname).await?;
    let index = pod_link.index;
    let pod_mac = pod_link.mac()?;
    pod_nl
        .handle()
        .address()
        .add(index, IpAddr::V4(ip), 32)
        .execute()
        .await
        .map_err(
            Op::AddAddress {
                ip,
                link: ifname.to_owned(),
            }
            .failed(),
        )?;
    fault::point("cni.add.after-address").map_err(injected(Op::SetUp(ifname.to_owned())))?;
    pod.enter(|| disable_ipv6(ifname))?;
    set_up(pod_nl, index, ifname).await?;
    pod_nl
        .handle()
        .neighbours()
        .add(index, IpAddr::V4(GATEWAY))
        .link_layer_address(&host_mac.0)
        .state(NeighbourState::Permanent)
        .execute()
        .await
        .map_err(
            Op::AddNeighbour {
                ip: GATEWAY,
                link: ifname.to_owned(),
            }
            .failed(),
        )?;
    add_route(pod_nl, Ipv4Net::from(GATEWAY), index, ifname).await?;
    for (dst, mtu) in want.routes() {
        let mut route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst.network(), dst.prefix_len())
            .gateway(GATEWAY)
            .output_interface(index)
            .build();
        if let Some(mtu) = mtu {
            route
                .attributes
                .push(RouteAttribute::Metrics(vec![RouteMetric::Mtu(mtu)]));
        }
        pod_nl.handle().route().add(route).execute().await.map_err(
            Op::AddRouteVia {
                dst,
                gateway: GATEWAY,
                link: ifname.to_owned(),
            }
            .failed(),
        )?;
    }
    Ok(VethPair {
        host_ifname: host_ifname.to_owned(),
        host_mac,
        pod_mac,
    })
}

/// A failure injected at a fault point (see `podwire_core::fault`), as the kernel refusing `op`,
/// the step that comes next.
fn injected(op: Op) -> impl FnOnce(Injected) -> NetlinkError {
    |injected| NetlinkError::Request {
        op,
        // The one free-text error rtnetlink has: the message says what happened.
        source: rtnetlink::Error::NamespaceError(injected.to_string()),
    }
}

async fn set_up(netlink: &Netlink, index: u32, name: &str) -> Result<(), NetlinkError> {
    netlink
        .handle()
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(Op::SetUp(name.to_owned()).failed())
}

/// A link-scope route to `dst` out of the link `index` (named `name` in errors).
async fn add_route(
    netlink: &Netlink,
    dst: Ipv4Net,
    index: u32,
    name: &str,
) -> Result<(), NetlinkError> {
    let route = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(dst.network(), dst.prefix_len())
        .output_interface(index)
        .scope(RouteScope::Link)
        .build();
    netlink.handle().route().add(route).execute().await.map_err(
        Op::AddRoute {
            dst,
            link: name.to_owned(),
        }
        .failed(),
    )
}

/// How a pod's interface differs from what ADD made (CNI CHECK).
#[derive(Debug, thiserror::Error)]
pub enum Mismatch {
    /// The pod's interface is gone.
    #[error("{0} is missing from the pod's netns")]
    NoInterface(String),
    /// The pod's interface is down.
    #[error("{0} is down")]
    Down(String),
    /// The pod's interface lost its address.
    #[error("{ifname} does not hold {ip}/32")]
    NoAddress { ifname: String, ip: Ipv4Addr },
    /// The gateway's permanent neighbour entry is gone or names another MAC.
    #[error("no permanent neighbour entry {GATEWAY} -> {host_mac} on {ifname}")]
    NoGatewayNeighbour { ifname: String, host_mac: Mac },
    /// The default route via the gateway is gone.
    #[error("no default route via {GATEWAY} dev {0}")]
    NoDefaultRoute(String),
    /// The host side of the veth pair is gone.
    #[error("host-side veth {0} is missing")]
    NoHostVeth(String),
    /// An end of the veth pair has another MTU than ADD gave it.
    #[error("{ifname} has MTU {}, not {want}", .have.map_or_else(|| "none".to_owned(), |m| m.to_string()))]
    Mtu {
        ifname: String,
        have: Option<u32>,
        want: u32,
    },
    /// A route ADD made via the gateway is gone, or carries another MTU.
    #[error("no route {dst} via {GATEWAY} dev {ifname}{}", .mtu.map_or_else(String::new, |m| format!(" mtu {m}")))]
    NoRoute {
        dst: Ipv4Net,
        mtu: Option<u32>,
        ifname: String,
    },
}

/// Errors of CHECK.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The pod is not wired as ADD left it.
    #[error(transparent)]
    Mismatch(#[from] Mismatch),
    /// Looking at it failed.
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
}

/// Verifies what [`check`] leaves out of `want`, for a repeated ADD to find the pod as this ADD
/// would make it: both ends of the veth pair have its MTU, and each of its routes via the gateway
/// is there with the MTU it calls for (and none where it calls for none).
pub async fn check_mtus(
    host: &Netlink,
    pod: &PodNetns,
    want: PodInterface<'_>,
) -> Result<(), CheckError> {
    let ends = [(host, want.host_ifname), (&pod.netlink, want.ifname)];
    let mut pod_index = 0;
    for (netlink, ifname) in ends {
        let link = netlink
            .link(LinkRef::Name(ifname))
            .await?
            .ok_or_else(|| Mismatch::NoInterface(ifname.to_owned()))?;
        if link.mtu != Some(want.mtu) {
            return Err(Mismatch::Mtu {
                ifname: ifname.to_owned(),
                have: link.mtu,
                want: want.mtu,
            }
            .into());
        }
        pod_index = link.index;
    }
    let routes = pod.netlink.ipv4_routes().await?;
    for (dst, mtu) in want.routes() {
        let found = routes.iter().any(|r| {
            let have_mtu = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Metrics(metrics) => metrics.iter().find_map(|m| match m {
                    RouteMetric::Mtu(m) => Some(*m),
                    _ => None,
                }),
                _ => None,
            });
            let have_dst = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Destination(RouteAddress::Inet(ip)) => Some(*ip),
                _ => None,
            });
            r.header.destination_prefix_length == dst.prefix_len()
                && have_dst.unwrap_or(Ipv4Addr::UNSPECIFIED) == dst.network()
                && r.attributes
                    .contains(&RouteAttribute::Gateway(RouteAddress::Inet(GATEWAY)))
                && r.attributes.contains(&RouteAttribute::Oif(pod_index))
                && have_mtu == mtu
        });
        if !found {
            return Err(Mismatch::NoRoute {
                dst,
                mtu,
                ifname: want.ifname.to_owned(),
            }
            .into());
        }
    }
    Ok(())
}

/// Verifies the pod is as ADD left it: the host side of `veth` exists, and in the pod `ifname`
/// is up with `ip`/32, the gateway's permanent neighbour entry holds the host side's MAC, and
/// the default route goes via the gateway.
pub async fn check(
    host: &Netlink,
    pod: &PodNetns,
    veth: &VethPair,
    ifname: &str,
    ip: Ipv4Addr,
) -> Result<(), CheckError> {
    if host.link(LinkRef::Name(&veth.host_ifname)).await?.is_none() {
        return Err(Mismatch::NoHostVeth(veth.host_ifname.clone()).into());
    }
    let pod = &pod.netlink;
    let found = pod
        .link(LinkRef::Name(ifname))
        .await?
        .ok_or_else(|| Mismatch::NoInterface(ifname.to_owned()))?;
    let index = found.index;
    if !found.up {
        return Err(Mismatch::Down(ifname.to_owned()).into());
    }
    let addresses: Vec<_> = pod
        .handle()
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .map_err(Op::ListAddresses.failed())?;
    let has_ip = addresses.iter().any(|a| {
        a.header.prefix_len == 32
            && a.attributes
                .contains(&AddressAttribute::Address(IpAddr::V4(ip)))
    });
    if !has_ip {
        return Err(Mismatch::NoAddress {
            ifname: ifname.to_owned(),
            ip,
        }
        .into());
    }
    let neighbours: Vec<_> = pod
        .handle()
        .neighbours()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(Op::ListNeighbours.failed())?;
    let gateway_ok = neighbours.iter().any(|n| {
        n.header.ifindex == index
            && n.header.state == NeighbourState::Permanent
            && n.attributes
                .contains(&NeighbourAttribute::Destination(NeighbourAddress::Inet(
                    GATEWAY,
                )))
            && n.attributes.contains(&NeighbourAttribute::LinkLayerAddress(
                veth.host_mac.0.to_vec(),
            ))
    });
    if !gateway_ok {
        return Err(Mismatch::NoGatewayNeighbour {
            ifname: ifname.to_owned(),
            host_mac: veth.host_mac,
        }
        .into());
    }
    let default_ok = pod.ipv4_routes().await?.iter().any(|r| {
        r.header.destination_prefix_length == 0
            && r.attributes
                .contains(&RouteAttribute::Gateway(RouteAddress::Inet(GATEWAY)))
            && r.attributes.contains(&RouteAttribute::Oif(index))
    });
    if !default_ok {
        return Err(Mismatch::NoDefaultRoute(ifname.to_owned()).into());
    }
    Ok(())
}
