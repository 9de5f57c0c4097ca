//! The overlay's netlink side: the collect_md VXLAN device the programs tunnel through, and the
//! routes that send the node's own traffic for other nodes' pods into it (or, with native
//! routing, out of the underlay via the owning node).

use std::{
    collections::{HashMap, HashSet},
    net::Ipv4Addr,
};

use ipnet::Ipv4Net;
use rtnetlink::{
    packet_route::{
        link::InfoKind,
        route::{
            RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
        },
    },
    LinkMessageBuilder, LinkUnspec, LinkVxlan, RouteMessageBuilder,
};

use crate::{
    error::{NetlinkError, Op},
    link::{LinkRef, Netlink},
};

/// The protocol of the routes podwire writes on the underlay (native routing), which tells them
/// from the operator's there (`ip route` shows it as `proto 112`).
const UNDERLAY_PROTOCOL: RouteProtocol = RouteProtocol::Other(112);

/// A route for the node's own traffic to another node's pod CIDR.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PodRoute {
    /// The pod CIDR.
    pub dst: Ipv4Net,
    /// The underlay address of the node owning it: the next hop where the route does not go
    /// into a tunnel.
    pub node: Ipv4Addr,
}

/// A collect_md ("external") VXLAN device.
#[derive(Clone, Copy, Debug)]
pub struct VxlanDevice<'a> {
    pub name: &'a str,
    /// UDP port of the tunnel.
    pub port: u16,
    pub mtu: u32,
}

impl Netlink {
    /// Creates `device` if no link has its name (no learning, and NOARP since the programs route
    /// by IP and rewrite MACs), sets its MTU and brings it up; returns its ifindex.
    pub async fn ensure_vxlan(&self, device: VxlanDevice<'_>) -> Result<u32, NetlinkError> {
        let VxlanDevice { name, port, mtu } = device;
        let index = match self.link(LinkRef::Name(name)).await? {
            Some(link) => link.index,
            None => {
                let vxlan = LinkMessageBuilder::<LinkVxlan>::new(name)
                    .port(port)
                    .collect_metadata(true)
                    .learning(false)
                    .mtu(mtu)
                    .arp(false)
                    .build();
                self.handle()
                    .link()
                    .add(vxlan)
                    .execute()
                    .await
                    .map_err(Op::CreateVxlan(name.to_owned()).failed())?;
                self.existing_link(name).await?.index
            }
        };
        self.handle()
            .link()
            .set(LinkUnspec::new_with_index(index).mtu(mtu).up().build())
            .execute()
            .await
            .map_err(Op::SetUp(name.to_owned()).failed())?;
        Ok(index)
    }

    /// Makes the routes out of the link `ifindex` (named `name` in errors) exactly `routes`, with
    /// `source` as their preferred source address. Over a VXLAN device a route needs no next
    /// hop (the programs or the device's metadata name the node: link scope); over any other
    /// link (the underlay, with native routing) it goes via the owning node's address. Only the
    /// difference is written: a route already as wanted is left alone (a cluster of thousands of
    /// nodes changes one node at a time, and each route is a round trip to the kernel).
    pub async fn sync_routes(
        &self,
        ifindex: u32,
        name: &str,
        source: Ipv4Addr,
        routes: &[PodRoute],
    ) -> Result<(), NetlinkError> {
        let tunnel = self
            .link(LinkRef::Index(ifindex))
            .await?
            .is_some_and(|link| link.kind == Some(InfoKind::Vxlan));
        let via = |route: &PodRoute| (!tunnel).then_some(route.node);
        let wanted: HashMap<Ipv4Net, Option<Ipv4Addr>> =
            routes.iter().map(|r| (r.dst, via(r))).collect();
        let mut in_place = HashSet::new();
        for route in self
            .ipv4_routes()
            .await?
            .into_iter()
            .filter(|r| r.attributes.contains(&RouteAttribute::Oif(ifindex)))
            // The VXLAN device is podwire's: every route on it is. On the underlay only those
            // podwire wrote are (its subnet's, the default route are the operator's).
            .filter(|r| tunnel || r.header.protocol == UNDERLAY_PROTOCOL)
        {
            let dst = route.attributes.iter().find_map(|a| match a {
                RouteAttribute::Destination(RouteAddress::Inet(ip)) => Some(*ip),
                _ => None,
            });
            let net =
                dst.and_then(|ip| Ipv4Net::new(ip, route.header.destination_prefix_length).ok());
            let Some(net) = net else { continue };
            if let Some(via) = wanted.get(&net) {
                if is_as_wanted(&route, source, *via) {
                    in_place.insert(net);
                }
                continue;
            }
            self.handle()
                .route()
                .del(route)
                .execute()
                .await
                .map_err(Op::DeleteRoute(net).failed())?;
        }
        for pod_route in routes.iter().filter(|r| !in_place.contains(&r.dst)) {
            let dst = pod_route.dst;
            let builder = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(dst.network(), dst.prefix_len())
                .output_interface(ifindex)
                .pref_source(source);
            let route = match via(pod_route) {
                Some(gateway) => builder
                    .gateway(gateway)
                    .scope(RouteScope::Universe)
                    .protocol(UNDERLAY_PROTOCOL),
                None => builder.scope(RouteScope::Link),
            }
            .build();
            self.handle()
                .route()
                .add(route)
                .replace()
                .execute()
                .await
                .map_err(
                    Op::AddRoute {
                        dst,
                        link: name.to_owned(),
                    }
                    .failed(),
                )?;
        }
        Ok(())
    }
}

/// Whether `route` (out of the wanted link, to a wanted destination) is what
/// [`Netlink::sync_routes`] would write: main table, link scope without a gateway or universe
/// scope via `via`, `source` preferred, no metric.
fn is_as_wanted(route: &RouteMessage, source: Ipv4Addr, via: Option<Ipv4Addr>) -> bool {
    let gateway = route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Gateway(RouteAddress::Inet(ip)) => Some(*ip),
        _ => None,
    });
    let scope = match via {
        Some(_) => RouteScope::Universe,
        None => RouteScope::Link,
    };
    let table = route
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(table) => Some(*table),
            _ => None,
        })
        .unwrap_or(u32::from(route.header.table));
    table == u32::from(RouteHeader::RT_TABLE_MAIN)
        && route.header.scope == scope
        && gateway == via
        && route
            .attributes
            .contains(&RouteAttribute::PrefSource(RouteAddress::Inet(source)))
        && !route
            .attributes
            .iter()
            .any(|a| matches!(a, RouteAttribute::Priority(p) if *p != 0))
}
