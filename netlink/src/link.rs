//! Netlink connections, the one link lookup (by name or index) every operation uses, the listings
//! the other modules share, and turning IPv6 off on a link.

use std::{fs::File, net::Ipv4Addr};

use futures::TryStreamExt as _;
use nix::sched::{setns, CloneFlags};
use podwire_core::mac::Mac;
use rtnetlink::{
    packet_route::{
        link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage},
        route::RouteMessage,
    },
    Handle, RouteMessageBuilder,
};

use crate::error::{NetlinkError, Op};

/// A netlink connection in one network namespace.
#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
}

/// A link, as the lookups return it.
#[derive(Clone, Debug)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Option<Mac>,
    pub mtu: Option<u32>,
    pub up: bool,
    /// What kind of virtual device it is (veth, bridge, vxlan, ...); `None` for a device with a
    /// driver of its own (a NIC, virtio).
    pub kind: Option<InfoKind>,
}

/// How to find a link.
#[derive(Clone, Copy, Debug)]
pub enum LinkRef<'a> {
    Name(&'a str),
    Index(u32),
}

impl Link {
    fn from_message(message: LinkMessage) -> Link {
        let mut link = Link {
            index: message.header.index,
            name: String::new(),
            mac: None,
            mtu: None,
            up: message.header.flags.contains(LinkFlags::Up),
            kind: None,
        };
        for attribute in message.attributes {
            match attribute {
                LinkAttribute::IfName(name) => link.name = name,
                LinkAttribute::Address(bytes) => link.mac = Mac::try_from(bytes.as_slice()).ok(),
                LinkAttribute::Mtu(mtu) => link.mtu = Some(mtu),
                LinkAttribute::LinkInfo(infos) => {
                    link.kind = infos.into_iter().find_map(|info| match info {
                        LinkInfo::Kind(kind) => Some(kind),
                        _ => None,
                    })
                }
                _ => {}
            }
        }
        link
    }

    /// Whether the link is one end of a veth pair.
    pub fn is_veth(&self) -> bool {
        self.kind == Some(InfoKind::Veth)
    }

    /// The link's MAC address, which every veth and VXLAN device has.
    pub fn mac(&self) -> Result<Mac, NetlinkError> {
        self.mac
            .ok_or_else(|| NetlinkError::NoMac(self.name.clone()))
    }
}

impl Netlink {
    /// Connects in the calling thread's network namespace.
    pub fn connect() -> Result<Netlink, NetlinkError> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Socket)?;
        tokio::spawn(connection);
        Ok(Netlink { handle })
    }

    /// Connects inside the namespace `ns` (opened from `path`, named in errors): the calling
    /// thread enters it just long enough to open the socket, which then stays in it.
    pub fn connect_in(ns: &File, path: &str) -> Result<Netlink, NetlinkError> {
        let netns_err = |source: std::io::Error| NetlinkError::Netns {
            path: path.to_owned(),
            source,
        };
        let here = File::open("/proc/thread-self/ns/net").map_err(netns_err)?;
        setns(ns, CloneFlags::CLONE_NEWNET).map_err(|e| netns_err(e.into()))?;
        let netlink = Self::connect();
        // Back to the node's namespace whatever happened; nothing else may run in the pod's.
        setns(&here, CloneFlags::CLONE_NEWNET)
            .expect("returning to the caller's network namespace");
        netlink
    }

    /// The link `which`, if it exists.
    pub async fn link(&self, which: LinkRef<'_>) -> Result<Option<Link>, NetlinkError> {
        let request = self.handle.link().get();
        let request = match which {
            LinkRef::Name(name) => request.match_name(name.to_owned()),
            LinkRef::Index(index) => request.match_index(index),
        };
        match request.execute().try_next().await {
            Ok(found) => Ok(found.map(Link::from_message)),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
            Err(source) => Err(NetlinkError::Request {
                op: Op::LookUpLink(match which {
                    LinkRef::Name(name) => name.to_owned(),
                    LinkRef::Index(index) => format!("#{index}"),
                }),
                source,
            }),
        }
    }

    /// The link `which` in the calling thread's namespace, for a caller that cannot await (it
    /// may itself run on an async runtime): looked up on a thread of its own, with a connection
    /// of its own.
    pub fn link_blocking(which: LinkRef<'_>) -> Result<Option<Link>, NetlinkError> {
        std::thread::scope(|s| {
            // A new thread starts in its creator's network namespace.
            s.spawn(|| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_io()
                    .build()
                    .map_err(NetlinkError::Socket)?;
                runtime.block_on(async { Netlink::connect()?.link(which).await })
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// The link named `name`, which must exist.
    pub async fn existing_link(&self, name: &str) -> Result<Link, NetlinkError> {
        self.link(LinkRef::Name(name))
            .await?
            .ok_or_else(|| NetlinkError::NoLink(name.to_owned()))
    }

    /// Deletes the link named `name` (a veth takes its peer with it); a missing one is fine.
    pub async fn delete_link(&self, name: &str) -> Result<(), NetlinkError> {
        let Some(found) = self.link(LinkRef::Name(name)).await? else {
            return Ok(());
        };
        match self.handle.link().del(found.index).execute().await {
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(()),
            other => other.map_err(Op::DeleteLink(name.to_owned()).failed()),
        }
    }

    /// The interface holding `address`.
    pub async fn address_owner(&self, address: Ipv4Addr) -> Result<Link, NetlinkError> {
        use rtnetlink::packet_route::address::AddressAttribute;

        let addresses: Vec<_> = self
            .handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(Op::ListAddresses.failed())?;
        let index = addresses
            .iter()
            .find(|a| {
                a.attributes
                    .contains(&AddressAttribute::Address(address.into()))
            })
            .map(|a| a.header.index)
            .ok_or(NetlinkError::NoAddress(address))?;
        self.link(LinkRef::Index(index))
            .await?
            .ok_or_else(|| NetlinkError::NoLink(format!("#{index}")))
    }

    /// Every IPv4 route of the namespace.
    pub(crate) async fn ipv4_routes(&self) -> Result<Vec<RouteMessage>, NetlinkError> {
        self.handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .map_err(Op::ListRoutes.failed())
    }

    pub(crate) fn handle(&self) -> &Handle {
        &self.handle
    }
}

/// Turns IPv6 off on the link `ifname` of the calling thread's namespace; nothing to do where
/// the kernel has no IPv6.
pub fn disable_ipv6(ifname: &str) -> Result<(), NetlinkError> {
    let path = format!("/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6");
    match std::fs::write(&path, "1") {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(NetlinkError::Sysctl { path, source: e })
        }
        _ => Ok(()),
    }
}
