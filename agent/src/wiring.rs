//! The veth pair and pod addressing, through rtnetlink: what the CNI plugin does to wire a pod
//! (and `podwire-verify` on other kernels). Netlink sockets belong to the namespace
//! they are opened in, so the pod's is opened after entering the pod's netns.
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
use nix::sched::{setns, CloneFlags};

use rtnetlink::{
    packet_route::{
        address::AddressAttribute,
        link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkMessage},
        neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState},
        route::{RouteAddress, RouteAttribute, RouteScope},
    },
    Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder,
};
use sha2::{Digest as _, Sha256};

use crate::{api::Attachment, mac::Mac};

/// Errors of wiring a pod.
#[derive(Debug, thiserror::Error)]
pub enum WiringError {
    /// The pod's network namespace could not be opened or entered.
    #[error("network namespace {path}: {message}")]
    Netns { path: String, message: String },
    /// A netlink request failed.
    #[error("{what}: {source}")]
    Netlink {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    /// Something the wiring needs is not there (a socket, a link that should exist).
    #[error("{0}")]
    Missing(String),
    /// A wired pod is not as ADD left it.
    #[error("{0}")]
    Check(String),
}

/// The pods' gateway: link-local, the same on every node, never on the wire.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// Name of the host-side veth of `attachment`: "pw" and 11 hex digits of a hash of the container
/// id and interface name, so it is the same at ADD, DEL and GC and fits IFNAMSIZ.
pub fn host_ifname(attachment: &Attachment) -> String {
    let digest = Sha256::digest(attachment.key().as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("pw{}", &hex[..11])
}

fn io_err(what: impl std::fmt::Display) -> impl FnOnce(rtnetlink::Error) -> WiringError {
    move |source| WiringError::Netlink {
        what: what.to_string(),
        source,
    }
}

/// Opens a netlink connection in the calling thread's namespace.
fn connect() -> Result<Handle, WiringError> {
    let (connection, handle, _) = rtnetlink::new_connection()
        .map_err(|e| WiringError::Missing(format!("opening a netlink socket: {e}")))?;
    tokio::spawn(connection);
    Ok(handle)
}

/// Netlink connections in the node's namespace (where the plugin runs) and the pod's.
pub struct Netlink {
    pub host: Handle,
    pub pod: Option<(Handle, File)>,
}

impl Netlink {
    /// Connects in the current namespace and, given `netns`, in that one. Needs a tokio runtime.
    pub fn open(netns: Option<&str>) -> Result<Netlink, WiringError> {
        let host = connect()?;
        let pod = match netns {
            None => None,
            Some(path) => {
                let ns = File::open(path).map_err(|e| WiringError::Netns {
                    path: path.to_owned(),
                    message: e.to_string(),
                })?;
                Some((Self::connect_in(&ns, path)?, ns))
            }
        };
        Ok(Netlink { host, pod })
    }

    fn connect_in(ns: &File, path: &str) -> Result<Handle, WiringError> {
        let enter_err = |e: nix::Error| WiringError::Netns {
            path: path.to_owned(),
            message: format!("entering it: {e}"),
        };
        let here = File::open("/proc/thread-self/ns/net")
            .map_err(|e| WiringError::Missing(format!("opening this thread's netns: {e}")))?;
        setns(ns, CloneFlags::CLONE_NEWNET).map_err(enter_err)?;
        let handle = connect();
        // Back to the node's namespace whatever happened; nothing else may run in the pod's.
        setns(&here, CloneFlags::CLONE_NEWNET).expect("returning to the node's network namespace");
        handle
    }

    fn pod(&self) -> &Handle {
        &self.pod.as_ref().expect("opened with a netns").0
    }

    /// Creates the veth pair, its peer already inside the pod's netns as `ifname`, addresses and
    /// routes both sides; returns (host MAC, pod MAC).
    pub async fn create(
        &self,
        host_ifname: &str,
        ifname: &str,
        ip: Ipv4Addr,
        mtu: u32,
    ) -> Result<(Mac, Mac), WiringError> {
        let (_, ns) = self.pod.as_ref().expect("opened with a netns");
        let peer = LinkMessageBuilder::<LinkUnspec>::new()
            .name(ifname)
            .mtu(mtu)
            .setns_by_fd(ns.as_raw_fd())
            .build();
        let veth = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
            .name(host_ifname)
            .mtu(mtu)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .build();
        self.host
            .link()
            .add(veth)
            .execute()
            .await
            .map_err(io_err(format!("creating veth {host_ifname}")))?;

        let host_link = link(&self.host, host_ifname).await?.ok_or_else(|| {
            WiringError::Missing(format!("veth {host_ifname} vanished after creation"))
        })?;
        let host_index = host_link.header.index;
        let host_mac = mac_of(&host_link)?;
        self.host
            .link()
            .set(LinkUnspec::new_with_index(host_index).up().build())
            .execute()
            .await
            .map_err(io_err(format!("setting {host_ifname} up")))?;
        let to_pod = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(ip, 32)
            .output_interface(host_index)
            .scope(RouteScope::Link)
            .build();
        self.host
            .route()
            .add(to_pod)
            .execute()
            .await
            .map_err(io_err(format!("route to {ip} via {host_ifname}")))?;

        let pod = self.pod();
        let pod_link = link(pod, ifname).await?.ok_or_else(|| {
            WiringError::Missing(format!("{ifname} did not appear in the pod's netns"))
        })?;
        let index = pod_link.header.index;
        let pod_mac = mac_of(&pod_link)?;
        pod.address()
            .add(index, IpAddr::V4(ip), 32)
            .execute()
            .await
            .map_err(io_err(format!("adding {ip}/32 to {ifname}")))?;
        pod.link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(io_err(format!("setting {ifname} up")))?;
        pod.neighbours()
            .add(index, IpAddr::V4(GATEWAY))
            .link_layer_address(&host_mac.0)
            .state(NeighbourState::Permanent)
            .execute()
            .await
            .map_err(io_err(format!("neighbour entry for gateway {GATEWAY}")))?;
        let to_gateway = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(GATEWAY, 32)
            .output_interface(index)
            .scope(RouteScope::Link)
            .build();
        pod.route()
            .add(to_gateway)
            .execute()
            .await
            .map_err(io_err(format!("route to gateway {GATEWAY}")))?;
        let default = RouteMessageBuilder::<Ipv4Addr>::new()
            .gateway(GATEWAY)
            .output_interface(index)
            .build();
        pod.route()
            .add(default)
            .execute()
            .await
            .map_err(io_err(format!("default route via {GATEWAY}")))?;
        Ok((host_mac, pod_mac))
    }

    /// Deletes the host-side veth (its peer in the pod goes with it); a missing one is fine.
    pub async fn delete_host_veth(&self, host_ifname: &str) -> Result<(), WiringError> {
        delete_link(&self.host, host_ifname).await
    }

    /// Whether the host-side veth exists.
    pub async fn host_veth_exists(&self, host_ifname: &str) -> Result<bool, WiringError> {
        Ok(link(&self.host, host_ifname).await?.is_some())
    }

    /// Verifies the pod side is as ADD left it: `ifname` up with `ip`/32, the gateway's permanent
    /// neighbour entry with `host_mac`, and the default route via the gateway.
    pub async fn check_pod(
        &self,
        ifname: &str,
        ip: Ipv4Addr,
        host_mac: Mac,
    ) -> Result<(), WiringError> {
        let failed = WiringError::Check;
        let pod = self.pod();
        let found = link(pod, ifname)
            .await?
            .ok_or_else(|| failed(format!("{ifname} is missing from the pod's netns")))?;
        let index = found.header.index;
        if !found.header.flags.contains(LinkFlags::Up) {
            return Err(failed(format!("{ifname} is down")));
        }
        let addresses: Vec<_> = pod
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(io_err(format!("listing addresses of {ifname}")))?;
        let has_ip = addresses.iter().any(|a| {
            a.header.prefix_len == 32
                && a.attributes
                    .contains(&AddressAttribute::Address(IpAddr::V4(ip)))
        });
        if !has_ip {
            return Err(failed(format!("{ifname} does not hold {ip}/32")));
        }
        let neighbours: Vec<_> = pod
            .neighbours()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(io_err("listing neighbours"))?;
        let gateway_ok = neighbours.iter().any(|n| {
            n.header.ifindex == index
                && n.header.state == NeighbourState::Permanent
                && n.attributes
                    .contains(&NeighbourAttribute::Destination(NeighbourAddress::Inet(
                        GATEWAY,
                    )))
                && n.attributes
                    .contains(&NeighbourAttribute::LinkLayerAddress(host_mac.0.to_vec()))
        });
        if !gateway_ok {
            return Err(failed(format!(
                "no permanent neighbour entry {GATEWAY} -> {host_mac} on {ifname}"
            )));
        }
        let routes: Vec<_> = pod
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .map_err(io_err("listing routes"))?;
        let default_ok = routes.iter().any(|r| {
            r.header.destination_prefix_length == 0
                && r.attributes
                    .contains(&RouteAttribute::Gateway(RouteAddress::Inet(GATEWAY)))
                && r.attributes.contains(&RouteAttribute::Oif(index))
        });
        if !default_ok {
            return Err(failed(format!(
                "no default route via {GATEWAY} dev {ifname}"
            )));
        }
        Ok(())
    }
}

/// Deletes the link named `name` (a veth takes its peer with it); a missing one is fine.
pub async fn delete_link(handle: &Handle, name: &str) -> Result<(), WiringError> {
    let Some(found) = link(handle, name).await? else {
        return Ok(());
    };
    match handle.link().del(found.header.index).execute().await {
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(()),
        other => other.map_err(io_err(format!("deleting {name}"))),
    }
}

/// The link named `name`, if it exists.
async fn link(handle: &Handle, name: &str) -> Result<Option<LinkMessage>, WiringError> {
    match handle
        .link()
        .get()
        .match_name(name.to_owned())
        .execute()
        .try_next()
        .await
    {
        Ok(found) => Ok(found),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(io_err(format!("looking up {name}"))(e)),
    }
}

fn mac_of(link: &LinkMessage) -> Result<Mac, WiringError> {
    link.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Address(bytes) => Mac::try_from(bytes.as_slice()).ok(),
            _ => None,
        })
        .ok_or_else(|| {
            WiringError::Missing(format!("link {} has no MAC address", link.header.index))
        })
}
