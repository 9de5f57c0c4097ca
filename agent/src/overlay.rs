//! The node's side of the overlay: the collect_md VXLAN device the programs tunnel through, the
//! routes that send the node's own traffic for remote pods into it, and the masquerade of pod
//! traffic leaving the cluster.

use std::{io::Write as _, net::Ipv4Addr, process::Stdio};

use futures::TryStreamExt as _;
use ipnet::Ipv4Net;
use rtnetlink::{
    packet_route::{
        address::AddressAttribute,
        link::{LinkAttribute, LinkMessage},
        route::{RouteAttribute, RouteScope},
    },
    Handle, LinkMessageBuilder, LinkUnspec, LinkVxlan, RouteMessageBuilder,
};

/// The agent's VXLAN device.
pub const VXLAN_DEV: &str = "pw-vxlan";
/// Outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8 bytes.
pub const VXLAN_OVERHEAD: u32 = 50;

/// Errors of setting up the overlay.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    /// A netlink request failed.
    #[error("{what}")]
    Netlink {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    /// No interface of this node holds its underlay address from the cluster description.
    #[error("no interface in this network namespace holds the node's address {0}")]
    NoUnderlay(Ipv4Addr),
    /// `nft` could not be run or refused the masquerade rules.
    #[error("installing the masquerade rules with nft: {0}")]
    Nft(String),
}

fn netlink(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> OverlayError {
    let what = what.into();
    move |source| OverlayError::Netlink { what, source }
}

/// The interface carrying the node's underlay address.
#[derive(Clone, Debug)]
pub struct Underlay {
    pub name: String,
    pub mtu: u32,
}

/// Finds the interface holding `address`.
pub async fn underlay(handle: &Handle, address: Ipv4Addr) -> Result<Underlay, OverlayError> {
    let addresses: Vec<_> = handle
        .address()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(netlink("listing addresses"))?;
    let index = addresses
        .iter()
        .find(|a| {
            a.attributes
                .contains(&AddressAttribute::Address(address.into()))
        })
        .map(|a| a.header.index)
        .ok_or(OverlayError::NoUnderlay(address))?;
    let link = link_by_index(handle, index).await?;
    let name = link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    });
    let mtu = link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Mtu(m) => Some(*m),
        _ => None,
    });
    Ok(Underlay {
        name: name.unwrap_or_default(),
        mtu: mtu.unwrap_or(1500),
    })
}

async fn link_by_index(handle: &Handle, index: u32) -> Result<LinkMessage, OverlayError> {
    handle
        .link()
        .get()
        .match_index(index)
        .execute()
        .try_next()
        .await
        .map_err(netlink(format!("reading link {index}")))?
        .ok_or_else(|| OverlayError::Netlink {
            what: format!("link {index} vanished"),
            source: rtnetlink::Error::RequestFailed,
        })
}

/// ifindex of the VXLAN device, if it exists.
async fn vxlan_index(handle: &Handle) -> Option<u32> {
    let found = handle
        .link()
        .get()
        .match_name(VXLAN_DEV.to_owned())
        .execute()
        .try_next()
        .await;
    found.ok().flatten().map(|link| link.header.index)
}

/// Creates the VXLAN device if it does not exist (collect_md, `port`, no learning, NOARP since
/// the programs route by IP and rewrite MACs, `mtu`) and sets it up; returns its ifindex.
pub async fn ensure_vxlan(handle: &Handle, port: u16, mtu: u32) -> Result<u32, OverlayError> {
    let index = match vxlan_index(handle).await {
        Some(index) => index,
        None => {
            let vxlan = LinkMessageBuilder::<LinkVxlan>::new(VXLAN_DEV)
                .port(port)
                .collect_metadata(true)
                .learning(false)
                .mtu(mtu)
                .arp(false)
                .build();
            handle
                .link()
                .add(vxlan)
                .execute()
                .await
                .map_err(netlink(format!("creating {VXLAN_DEV}")))?;
            vxlan_index(handle)
                .await
                .ok_or_else(|| OverlayError::Netlink {
                    what: format!("{VXLAN_DEV} vanished after creation"),
                    source: rtnetlink::Error::RequestFailed,
                })?
        }
    };
    // No IPv6 on the device: nothing would carry it (the programs tunnel IPv4 only).
    let _ = std::fs::write(
        format!("/proc/sys/net/ipv6/conf/{VXLAN_DEV}/disable_ipv6"),
        "1",
    );
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).mtu(mtu).up().build())
        .execute()
        .await
        .map_err(netlink(format!("setting {VXLAN_DEV} up")))?;
    Ok(index)
}

/// Makes the routes over the VXLAN device exactly `remote_cidrs`, with the node's own address as
/// source so replies come back to it through the tunnel.
pub async fn sync_routes(
    handle: &Handle,
    vxlan_index: u32,
    source: Ipv4Addr,
    remote_cidrs: &[Ipv4Net],
) -> Result<(), OverlayError> {
    let routes: Vec<_> = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(netlink("listing routes"))?;
    for route in routes
        .into_iter()
        .filter(|r| r.attributes.contains(&RouteAttribute::Oif(vxlan_index)))
    {
        let dst = route.attributes.iter().find_map(|a| match a {
            RouteAttribute::Destination(rtnetlink::packet_route::route::RouteAddress::Inet(ip)) => {
                Some(*ip)
            }
            _ => None,
        });
        let net = dst.and_then(|ip| Ipv4Net::new(ip, route.header.destination_prefix_length).ok());
        if net.is_some_and(|n| !remote_cidrs.contains(&n)) {
            handle
                .route()
                .del(route)
                .execute()
                .await
                .map_err(netlink("removing a stale overlay route"))?;
        }
    }
    for net in remote_cidrs {
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(net.network(), net.prefix_len())
            .output_interface(vxlan_index)
            .pref_source(source)
            .scope(RouteScope::Link)
            .build();
        handle
            .route()
            .add(route)
            .replace()
            .execute()
            .await
            .map_err(netlink(format!("route {net} dev {VXLAN_DEV}")))?;
    }
    Ok(())
}

/// Replaces podwire's nftables table: traffic from this node's pods to anything outside
/// `cluster` (the pod ranges) that leaves through the host stack takes the node's address.
/// Written as one `nft -f` transaction, so the rules never disappear midway.
pub fn sync_masquerade(pod_cidr: Ipv4Net, cluster: &[Ipv4Net]) -> Result<(), OverlayError> {
    let exempt: Vec<String> = cluster.iter().map(Ipv4Net::to_string).collect();
    let ruleset = format!(
        "table ip podwire\n\
         delete table ip podwire\n\
         table ip podwire {{\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tip saddr {pod_cidr} ip daddr != {{ {} }} oifname != \"{VXLAN_DEV}\" masquerade\n\
         \t}}\n\
         }}\n",
        exempt.join(", ")
    );
    let mut nft = std::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| OverlayError::Nft(format!("{e} (is the nftables package installed?)")))?;
    nft.stdin
        .take()
        .expect("piped")
        .write_all(ruleset.as_bytes())
        .map_err(|e| OverlayError::Nft(e.to_string()))?;
    let out = nft
        .wait_with_output()
        .map_err(|e| OverlayError::Nft(e.to_string()))?;
    if !out.status.success() {
        return Err(OverlayError::Nft(
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ));
    }
    Ok(())
}
