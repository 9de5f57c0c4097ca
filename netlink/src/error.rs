//! Errors of netlink operations: which operation, on what, and the kernel's answer.

use std::{fmt, io, net::Ipv4Addr};

use ipnet::Ipv4Net;

/// Errors of netlink operations.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// A netlink socket could not be opened.
    #[error("opening a netlink socket")]
    Socket(#[source] io::Error),
    /// A network namespace could not be opened or entered.
    #[error("network namespace {path}")]
    Netns {
        path: String,
        #[source]
        source: io::Error,
    },
    /// The kernel refused a request.
    #[error("{op}")]
    Request {
        op: Op,
        #[source]
        source: rtnetlink::Error,
    },
    /// A link that must exist does not: it vanished right after it was made, or a veth's peer
    /// never appeared in the pod.
    #[error("link {0} does not exist")]
    NoLink(String),
    /// A link has no MAC address.
    #[error("link {0} has no MAC address")]
    NoMac(String),
    /// A sysctl could not be written.
    #[error("writing {path}")]
    Sysctl {
        path: String,
        #[source]
        source: io::Error,
    },
    /// Deleting a link from a process of its own failed, or the link did not leave the
    /// namespace in time.
    #[error("deleting link {name}")]
    Delete {
        name: String,
        #[source]
        source: io::Error,
    },
    /// No interface of the namespace holds the address.
    #[error("no interface in this network namespace holds {0}")]
    NoAddress(Ipv4Addr),
}

/// A netlink operation, named in errors.
#[derive(Debug)]
pub enum Op {
    LookUpLink(String),
    DeleteLink(String),
    CreateVeth(String),
    CreateVxlan(String),
    SetUp(String),
    AddAddress {
        ip: Ipv4Addr,
        link: String,
    },
    AddRoute {
        dst: Ipv4Net,
        link: String,
    },
    AddRouteVia {
        dst: Ipv4Net,
        gateway: Ipv4Addr,
        link: String,
    },
    DeleteRoute(Ipv4Net),
    AddNeighbour {
        ip: Ipv4Addr,
        link: String,
    },
    ListAddresses,
    ListRoutes,
    ListNeighbours,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::LookUpLink(name) => write!(f, "looking up link {name}"),
            Op::DeleteLink(name) => write!(f, "deleting link {name}"),
            Op::CreateVeth(name) => write!(f, "creating veth {name}"),
            Op::CreateVxlan(name) => write!(f, "creating VXLAN device {name}"),
            Op::SetUp(name) => write!(f, "setting {name} up"),
            Op::AddAddress { ip, link } => write!(f, "adding {ip}/32 to {link}"),
            Op::AddRoute { dst, link } => write!(f, "adding route {dst} dev {link}"),
            Op::AddRouteVia { dst, gateway, link } if dst.prefix_len() == 0 => {
                write!(f, "adding default route via {gateway} dev {link}")
            }
            Op::AddRouteVia { dst, gateway, link } => {
                write!(f, "adding route {dst} via {gateway} dev {link}")
            }
            Op::DeleteRoute(dst) => write!(f, "removing route {dst}"),
            Op::AddNeighbour { ip, link } => write!(f, "adding neighbour {ip} on {link}"),
            Op::ListAddresses => f.write_str("listing addresses"),
            Op::ListRoutes => f.write_str("listing routes"),
            Op::ListNeighbours => f.write_str("listing neighbours"),
        }
    }
}

impl Op {
    /// Wraps the kernel's answer to this operation.
    pub(crate) fn failed(self) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
        move |source| NetlinkError::Request { op: self, source }
    }
}
