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

    /// Deletes the link named `name` as [`Netlink::delete_link`] does, but returns once it has
    /// left the namespace (no lookup finds it, its name is free for a new link), not once the
    /// kernel has torn it down: a veth's deletion goes on for tens of milliseconds after that,
    /// waiting for RCU grace periods, and nothing of the link is visible meanwhile. A child
    /// process sends the deletion and waits for it; this one watches the link go, and fails if
    /// the kernel refuses the deletion. The child holds none of this process's standard streams,
    /// so a runtime waiting for those to close does not wait for it.
    ///
    /// Forks: only for a process with one thread (the CNI plugin's).
    pub async fn delete_link_unlisted(&self, name: &str) -> Result<(), NetlinkError> {
        let Some(found) = self.link(LinkRef::Name(name)).await? else {
            return Ok(());
        };
        unlist::delete(found.index, name)
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

/// [`Netlink::delete_link_unlisted`]'s deletion by a child process.
mod unlist {
    use std::{
        fs::File,
        io,
        os::fd::{AsFd as _, AsRawFd as _, OwnedFd},
        time::Duration,
    };

    use nix::{
        fcntl::OFlag,
        poll::{poll, PollFd, PollFlags, PollTimeout},
        unistd::{fork, pipe2, ForkResult},
    };

    use crate::error::NetlinkError;

    /// How long the parent first waits for the child before it looks whether the link is gone;
    /// doubled each time up to [`LAST_PAUSE`], so hundreds of DELs at once waiting for a busy
    /// rtnl lock do not take the CPUs from it.
    const FIRST_PAUSE: Duration = Duration::from_millis(1);
    const LAST_PAUSE: Duration = Duration::from_millis(5);

    /// Deletes the link `index` (named `name`) from a child process; returns once it is gone
    /// from the namespace.
    pub(super) fn delete(index: u32, name: &str) -> Result<(), NetlinkError> {
        let failed = |source: io::Error| NetlinkError::Delete {
            name: name.to_owned(),
            source,
        };
        let devnull = File::options()
            .read(true)
            .write(true)
            .open("/dev/null")
            .map_err(failed)?;
        let (answer, answer_tx) =
            pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).map_err(|e| failed(e.into()))?;
        // SAFETY: the caller has one thread, so the child's copy holds no lock another thread
        // took; it makes system calls on its stack's buffers and exits without unwinding.
        match unsafe { fork() }.map_err(|e| failed(e.into()))? {
            ForkResult::Child => {
                for fd in 0..=2 {
                    // SAFETY: replacing the standard streams with /dev/null, open above.
                    unsafe { libc::dup2(devnull.as_raw_fd(), fd) };
                }
                let errno = request_delete(index);
                // SAFETY: a write of a local buffer to the pipe, then leaving at once.
                unsafe {
                    libc::write(
                        answer_tx.as_raw_fd(),
                        errno.to_ne_bytes().as_ptr().cast(),
                        4,
                    );
                    libc::_exit(0)
                }
            }
            ForkResult::Parent { .. } => {}
        }
        drop(answer_tx);
        // No deadline of its own: the deletion waits for the node's rtnl lock, as any netlink
        // request does, and the runtime bounds how long DEL may take.
        let mut pause = FIRST_PAUSE;
        loop {
            let answered = child_answer(&answer, pause);
            let gone = !listed(index);
            match answered {
                // Deleted (by the child, or by someone else meanwhile).
                Some(0 | libc::ENODEV) => return Ok(()),
                Some(_) if gone => return Ok(()),
                Some(errno) => return Err(failed(io::Error::from_raw_os_error(errno))),
                None if gone => return Ok(()),
                None => pause = (pause * 2).min(LAST_PAUSE),
            }
        }
    }

    /// The errno the child reports (0: deleted) within `wait`, if it does; `EIO` if it died
    /// without one.
    fn child_answer(answer: &OwnedFd, wait: Duration) -> Option<i32> {
        let mut fds = [PollFd::new(answer.as_fd(), PollFlags::POLLIN)];
        let wait = PollTimeout::try_from(wait.as_millis().max(1)).unwrap_or(PollTimeout::MAX);
        if !matches!(poll(&mut fds, wait), Ok(1..)) {
            return None;
        }
        let mut buf = [0u8; 4];
        match nix::unistd::read(answer.as_raw_fd(), &mut buf) {
            Ok(4) => Some(i32::from_ne_bytes(buf)),
            Ok(_) => Some(libc::EIO),
            Err(_) => None,
        }
    }

    /// Whether the link `index` is still in this namespace.
    fn listed(index: u32) -> bool {
        let mut name = [0 as libc::c_char; libc::IF_NAMESIZE];
        // SAFETY: the buffer has the IF_NAMESIZE bytes if_indextoname writes at most.
        !unsafe { libc::if_indextoname(index, name.as_mut_ptr()) }.is_null()
    }

    /// RTM_DELLINK of the link `index` on a netlink socket of its own, without allocating (it
    /// runs in the forked child); the kernel's errno, 0 once deleted.
    fn request_delete(index: u32) -> i32 {
        const HEADER: usize = 16;
        const LEN: usize = HEADER + 16;
        let mut request = [0u8; LEN];
        request[0..4].copy_from_slice(&(LEN as u32).to_ne_bytes());
        request[4..6].copy_from_slice(&libc::RTM_DELLINK.to_ne_bytes());
        let flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
        request[6..8].copy_from_slice(&flags.to_ne_bytes());
        request[8..12].copy_from_slice(&1u32.to_ne_bytes());
        // struct ifinfomsg: family AF_UNSPEC, then the index at offset 4.
        request[HEADER + 4..HEADER + 8].copy_from_slice(&index.to_ne_bytes());
        let errno = || {
            io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO)
        };
        // SAFETY: system calls on a socket this function owns and on local buffers.
        unsafe {
            let fd = libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            );
            if fd < 0 {
                return errno();
            }
            let mut kernel: libc::sockaddr_nl = std::mem::zeroed();
            kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
            let sent = libc::sendto(
                fd,
                request.as_ptr().cast(),
                request.len(),
                0,
                std::ptr::from_ref(&kernel).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            );
            if sent < 0 {
                return errno();
            }
            // The acknowledgement: NLMSG_ERROR with the (negative) errno after the header.
            let mut ack = [0u8; 256];
            let got = libc::recv(fd, ack.as_mut_ptr().cast(), ack.len(), 0);
            if got < (HEADER + 4) as isize {
                return libc::EIO;
            }
            let kind = u16::from_ne_bytes([ack[4], ack[5]]);
            if kind != libc::NLMSG_ERROR as u16 {
                return libc::EIO;
            }
            let error = i32::from_ne_bytes([ack[16], ack[17], ack[18], ack[19]]);
            -error
        }
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
