//! CHECK: the agent's view of the attachment (its map entry and attachment checked there) against
//! the pod's interface as it is now, and what the runtime's prevResult says against the node and
//! the pod: its interfaces (with their MACs) and its routes must be there. The spec asks a plugin
//! to consult prevResult for what to expect, and to allow later plugins in a chain to have
//! changed things: prevResult is the chain's final result, so checking what it says (rather than
//! what podwire made) does both.

use std::{
    collections::HashMap,
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use futures::TryStreamExt as _;
use ipnet::IpNet;
use nix::sched::{setns, CloneFlags};
use podwire_core::{
    api::{Reply, Request},
    endpoint::Attachment,
    mac::Mac,
};
use podwire_netlink::{
    pod::{self, PodNetns},
    LinkRef, Netlink,
};
use rtnetlink::{
    packet_route::{
        link::LinkAttribute,
        route::{RouteAddress, RouteAttribute, RouteMessage, RouteMetric},
        AddressFamily,
    },
    RouteMessageBuilder,
};

use crate::{
    call,
    config::{self, NetConf},
    error::{code, CniError},
    result::{CniResult, Route},
    unexpected,
};

/// Linux's main routing table, where a route without `table` lives.
const MAIN_TABLE: u32 = 254;

pub async fn check(conf: &NetConf) -> Result<(), CniError> {
    let attachment = config::attachment("CHECK")?;
    let netns = config::required("CNI_NETNS", "CHECK")?;
    let endpoint = match call(
        conf,
        &Request::Check {
            attachment: attachment.clone(),
        },
    ) {
        Ok(Reply::Checked { endpoint }) => endpoint,
        Ok(other) => return Err(unexpected(other)),
        Err(e) if e.code == code::INVALID_CONFIG => {
            return Err(CniError::new(code::CHECK_FAILED, e.msg))
        }
        Err(e) => return Err(e),
    };
    if let Some(prev) = &conf.prev_result {
        let want = format!("{}/32", endpoint.ip);
        if !prev.ips.iter().any(|ip| ip.address == want) {
            return Err(CniError::new(
                code::CHECK_FAILED,
                format!(
                    "prevResult does not list {want}, the address the agent holds for {}",
                    attachment.key()
                ),
            ));
        }
    }
    // The agent's own CHECK refuses such a record; one that answers with it anyway (another
    // release, a bug) must not take the plugin down without an answer to the runtime.
    let veth = endpoint
        .veth
        .as_ref()
        .ok_or_else(|| unwired(&attachment, endpoint.ip))?;
    let host = Netlink::connect()?;
    let pod_ns = PodNetns::open(&netns)
        .map_err(|e| CniError::new(code::CONTAINER_UNKNOWN, podwire_core::error_chain(&e)))?;
    pod::check(&host, &pod_ns, veth, &attachment.ifname, endpoint.ip).await?;
    let Some(prev) = &conf.prev_result else {
        return Ok(());
    };
    // IPv6 routes only when asked for: a kernel without IPv6 refuses to list them.
    let ipv6 = prev.routes.iter().any(|r| r.dst.contains(':'));
    let pod = observe_pod(&netns, ipv6)?;
    let mut host_links = HashMap::new();
    for iface in prev.interfaces.iter().filter(|i| is_host_interface(i)) {
        let link = host.link(LinkRef::Name(&iface.name)).await?;
        host_links.insert(iface.name.clone(), link.map(|l| l.mac));
    }
    verify(prev, &netns, &pod, &host_links).map_err(|m| CniError::new(code::CHECK_FAILED, m))
}

/// The error for an endpoint the agent holds without its veth pair.
fn unwired(attachment: &Attachment, ip: Ipv4Addr) -> CniError {
    CniError::new(
        code::CHECK_FAILED,
        format!(
            "the agent holds {ip} for {} but no veth pair: the attachment was never registered \
             (an ADD that did not finish); DEL it and ADD it again",
            attachment.key()
        ),
    )
}

/// An interface of the node's (no sandbox) that is a kernel interface (not a socket).
fn is_host_interface(iface: &crate::result::Interface) -> bool {
    iface.sandbox.as_deref().unwrap_or_default().is_empty() && iface.socket_path.is_none()
}

/// A pod's links (name to MAC, for those that have one) and routes, as the kernel holds them.
#[derive(Debug, Default)]
struct Observed {
    links: HashMap<String, Option<Mac>>,
    routes: Vec<KernelRoute>,
}

/// A route of the kernel's, in the terms of a CNI result's route.
#[derive(Clone, Debug, PartialEq, Eq)]
struct KernelRoute {
    dst: IpNet,
    gw: Option<IpAddr>,
    table: u32,
    /// RTA_PRIORITY, 0 when the kernel has none.
    priority: u32,
    scope: u32,
    mtu: Option<u32>,
    advmss: Option<u32>,
}

impl KernelRoute {
    fn from_message(message: RouteMessage) -> Option<KernelRoute> {
        let header = &message.header;
        let unspecified = match header.address_family {
            AddressFamily::Inet => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            AddressFamily::Inet6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            _ => return None,
        };
        let address = |a: &RouteAddress| match a {
            RouteAddress::Inet(ip) => Some(IpAddr::V4(*ip)),
            RouteAddress::Inet6(ip) => Some(IpAddr::V6(*ip)),
            _ => None,
        };
        let mut dst = unspecified;
        let mut route = KernelRoute {
            dst: IpNet::new(unspecified, 0).ok()?,
            gw: None,
            table: u32::from(header.table),
            priority: 0,
            scope: u32::from(u8::from(header.scope)),
            mtu: None,
            advmss: None,
        };
        for attribute in &message.attributes {
            match attribute {
                RouteAttribute::Destination(a) => dst = address(a)?,
                RouteAttribute::Gateway(a) => route.gw = address(a),
                RouteAttribute::Table(t) => route.table = *t,
                RouteAttribute::Priority(p) => route.priority = *p,
                RouteAttribute::Metrics(metrics) => {
                    for metric in metrics {
                        match metric {
                            RouteMetric::Mtu(m) => route.mtu = Some(*m),
                            RouteMetric::Advmss(m) => route.advmss = Some(*m),
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        route.dst = IpNet::new(dst, header.destination_prefix_length).ok()?;
        Some(route)
    }
}

/// Whether the kernel's `have` is the route `want` of a result: the same destination, and each
/// attribute `want` gives equal. `want` without `table` is in the main table; without `gw` it
/// may use any (the spec lets it come from the IP's gateway).
fn route_matches(want: &Route, dst: IpNet, have: &KernelRoute) -> bool {
    let gw_ok = match want.gw.as_deref().filter(|g| !g.is_empty()) {
        None => true,
        Some(gw) => gw.parse::<IpAddr>().ok() == have.gw,
    };
    have.dst == dst
        && gw_ok
        && want.table.unwrap_or(MAIN_TABLE) == have.table
        && want.priority.is_none_or(|p| p == have.priority)
        && want.scope.is_none_or(|s| s == have.scope)
        && want.mtu.is_none_or(|m| Some(m) == have.mtu)
        && want.advmss.is_none_or(|m| Some(m) == have.advmss)
}

/// `route` as `ip route` would name it, for messages.
fn describe(route: &Route) -> String {
    let mut text = route.dst.clone();
    if let Some(gw) = &route.gw {
        text += &format!(" via {gw}");
    }
    if let Some(table) = route.table {
        text += &format!(" table {table}");
    }
    if let Some(priority) = route.priority {
        text += &format!(" metric {priority}");
    }
    if let Some(scope) = route.scope {
        text += &format!(" scope {scope}");
    }
    if let Some(mtu) = route.mtu {
        text += &format!(" mtu {mtu}");
    }
    if let Some(advmss) = route.advmss {
        text += &format!(" advmss {advmss}");
    }
    text
}

/// What prevResult says against what is there: every interface it puts in the pod (`netns`) or
/// on the node exists there with the MAC it gives, and every route it lists is in the pod.
/// Interfaces of other sandboxes and socket interfaces are not the kernel's to look up here.
fn verify(
    prev: &CniResult,
    netns: &str,
    pod: &Observed,
    host: &HashMap<String, Option<Option<Mac>>>,
) -> Result<(), String> {
    for iface in &prev.interfaces {
        let (found, place) = match iface.sandbox.as_deref().unwrap_or_default() {
            "" if iface.socket_path.is_none() => {
                (host.get(&iface.name).cloned().flatten(), "on the node")
            }
            sandbox if sandbox == netns => (pod.links.get(&iface.name).cloned(), "in the pod"),
            _ => continue,
        };
        let Some(mac) = found else {
            return Err(format!(
                "{} is missing {place}, where prevResult puts it",
                iface.name
            ));
        };
        if iface.mac.is_empty() {
            continue;
        }
        let want = iface.mac.parse::<Mac>().map_err(|e| {
            format!(
                "prevResult gives {} the MAC {:?}: {e}",
                iface.name, iface.mac
            )
        })?;
        if mac != Some(want) {
            let have = mac.map_or_else(|| "none".to_owned(), |m| m.to_string());
            return Err(format!(
                "{} {place} has MAC {have}, prevResult says {}",
                iface.name, iface.mac
            ));
        }
    }
    for route in &prev.routes {
        let dst = route
            .dst
            .parse::<IpNet>()
            .map_err(|e| format!("prevResult has a route to {:?}: {e}", route.dst))?
            .trunc();
        if !pod
            .routes
            .iter()
            .any(|have| route_matches(route, dst, have))
        {
            return Err(format!(
                "the pod has no route {}, which prevResult lists",
                describe(route)
            ));
        }
    }
    Ok(())
}

/// The links and routes (IPv4, and IPv6 if `ipv6`; every table) of the pod's namespace at
/// `path`, read on a thread that enters it, so the plugin's own thread never leaves the node's
/// namespace.
fn observe_pod(path: &str, ipv6: bool) -> Result<Observed, CniError> {
    let ns = File::open(path).map_err(|e| {
        CniError::new(
            code::CONTAINER_UNKNOWN,
            format!("opening the pod's netns {path}: {e}"),
        )
    })?;
    let failed = |what: String| CniError::new(code::IO_FAILURE, format!("{what} in {path}"));
    std::thread::scope(|s| {
        s.spawn(|| {
            setns(&ns, CloneFlags::CLONE_NEWNET)
                .map_err(|e| failed(format!("entering the netns: {e}")))?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| failed(format!("starting a runtime: {e}")))?;
            runtime.block_on(async {
                let (connection, handle, _) = rtnetlink::new_connection()
                    .map_err(|e| failed(format!("opening a netlink socket: {e}")))?;
                tokio::spawn(connection);
                let mut observed = Observed::default();
                let mut links = handle.link().get().execute();
                while let Some(link) = links
                    .try_next()
                    .await
                    .map_err(|e| failed(format!("listing links: {e}")))?
                {
                    let mut name = None;
                    let mut mac = None;
                    for attribute in link.attributes {
                        match attribute {
                            LinkAttribute::IfName(n) => name = Some(n),
                            LinkAttribute::Address(bytes) => {
                                mac = Mac::try_from(bytes.as_slice()).ok()
                            }
                            _ => {}
                        }
                    }
                    if let Some(name) = name {
                        observed.links.insert(name, mac);
                    }
                }
                let mut requests = vec![RouteMessageBuilder::<Ipv4Addr>::new().build()];
                if ipv6 {
                    requests.push(RouteMessageBuilder::<Ipv6Addr>::new().build());
                }
                for request in requests {
                    let routes: Vec<RouteMessage> = handle
                        .route()
                        .get(request)
                        .execute()
                        .try_collect()
                        .await
                        .map_err(|e| failed(format!("listing routes: {e}")))?;
                    observed
                        .routes
                        .extend(routes.into_iter().filter_map(KernelRoute::from_message));
                }
                Ok(observed)
            })
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::result::Interface;

    const NETNS: &str = "/run/netns/pod";
    const POD_MAC: &str = "02:00:00:00:00:01";
    const HOST_MAC: &str = "02:00:00:00:00:02";

    fn kernel(dst: &str, gw: Option<&str>, table: u32) -> KernelRoute {
        KernelRoute {
            dst: dst.parse().unwrap(),
            gw: gw.map(|g| g.parse().unwrap()),
            table,
            priority: 0,
            scope: 0,
            mtu: None,
            advmss: None,
        }
    }

    /// A pod as ADD leaves it, with a route in table 100 besides.
    fn world() -> (Observed, HashMap<String, Option<Option<Mac>>>) {
        let pod = Observed {
            links: HashMap::from([
                ("lo".to_owned(), None),
                ("eth0".to_owned(), Some(POD_MAC.parse().unwrap())),
            ]),
            routes: vec![
                kernel("0.0.0.0/0", Some("169.254.1.1"), MAIN_TABLE),
                kernel("169.254.1.1/32", None, MAIN_TABLE),
                KernelRoute {
                    priority: 5,
                    mtu: Some(1400),
                    ..kernel("10.20.0.0/16", Some("169.254.1.1"), 100)
                },
            ],
        };
        let host = HashMap::from([("pwabc".to_owned(), Some(Some(HOST_MAC.parse().unwrap())))]);
        (pod, host)
    }

    fn result() -> CniResult {
        CniResult {
            interfaces: vec![
                Interface {
                    name: "pwabc".into(),
                    mac: HOST_MAC.into(),
                    ..Default::default()
                },
                Interface {
                    name: "eth0".into(),
                    mac: POD_MAC.into(),
                    sandbox: Some(NETNS.into()),
                    ..Default::default()
                },
            ],
            routes: vec![Route {
                dst: "0.0.0.0/0".into(),
                gw: Some("169.254.1.1".into()),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn what_add_made_passes() {
        let (pod, host) = world();
        verify(&result(), NETNS, &pod, &host).unwrap();
    }

    #[test]
    fn an_interface_with_another_mac_or_missing_fails_naming_it() {
        let (pod, host) = world();
        let mut r = result();
        r.interfaces[1].mac = "02:00:00:00:00:09".into();
        let e = verify(&r, NETNS, &pod, &host).unwrap_err();
        assert!(
            e.contains("eth0") && e.contains(POD_MAC) && e.contains("02:00:00:00:00:09"),
            "{e}"
        );
        // MACs compare as addresses, not as text.
        let mut r = result();
        r.interfaces[1].mac = POD_MAC.to_uppercase();
        verify(&r, NETNS, &pod, &host).unwrap();

        let mut r = result();
        r.interfaces[0].mac = "02:00:00:00:00:08".into();
        let e = verify(&r, NETNS, &pod, &host).unwrap_err();
        assert!(e.contains("pwabc") && e.contains("on the node"), "{e}");

        let mut r = result();
        r.interfaces.push(Interface {
            name: "net1".into(),
            sandbox: Some(NETNS.into()),
            ..Default::default()
        });
        let e = verify(&r, NETNS, &pod, &host).unwrap_err();
        assert!(e.contains("net1 is missing in the pod"), "{e}");
    }

    #[test]
    fn interfaces_elsewhere_are_not_looked_up() {
        let (pod, host) = world();
        let mut r = result();
        r.interfaces.push(Interface {
            name: "vm0".into(),
            sandbox: Some("/run/netns/another".into()),
            ..Default::default()
        });
        r.interfaces.push(Interface {
            name: "vhost0".into(),
            socket_path: Some("/run/vhost0.sock".into()),
            ..Default::default()
        });
        verify(&r, NETNS, &pod, &host).unwrap();
    }

    #[test]
    fn routes_match_on_every_attribute_prev_result_gives() {
        let (pod, host) = world();
        let with = |route: Route| {
            let mut r = result();
            r.routes.push(route);
            verify(&r, NETNS, &pod, &host)
        };
        let in_100 = Route {
            dst: "10.20.0.0/16".into(),
            gw: Some("169.254.1.1".into()),
            table: Some(100),
            ..Default::default()
        };
        with(in_100.clone()).unwrap();
        with(Route {
            priority: Some(5),
            mtu: Some(1400),
            ..in_100.clone()
        })
        .unwrap();
        // Host bits in dst are the same network.
        with(Route {
            dst: "10.20.3.4/16".into(),
            ..in_100.clone()
        })
        .unwrap();
        // No gw: any next hop.
        with(Route {
            gw: None,
            ..in_100.clone()
        })
        .unwrap();
        for (wrong, names) in [
            (
                Route {
                    table: None,
                    ..in_100.clone()
                },
                "10.20.0.0/16 via 169.254.1.1",
            ),
            (
                Route {
                    gw: Some("169.254.1.2".into()),
                    ..in_100.clone()
                },
                "via 169.254.1.2 table 100",
            ),
            (
                Route {
                    priority: Some(6),
                    ..in_100.clone()
                },
                "metric 6",
            ),
            (
                Route {
                    advmss: Some(1360),
                    ..in_100.clone()
                },
                "advmss 1360",
            ),
            (
                Route {
                    dst: "10.10.0.0/16".into(),
                    ..Default::default()
                },
                "10.10.0.0/16",
            ),
        ] {
            let e = with(wrong).unwrap_err();
            assert!(e.contains(names) && e.contains("no route"), "{e}");
        }
        let e = with(Route {
            dst: "nonsense".into(),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.contains("nonsense"), "{e}");
    }

    #[test]
    fn an_endpoint_without_wiring_is_a_check_failure() {
        let e = unwired(
            &Attachment {
                container_id: "c1".into(),
                ifname: "eth0".into(),
            },
            Ipv4Addr::new(10, 244, 0, 2),
        );
        assert_eq!(e.code, code::CHECK_FAILED);
        assert!(
            e.msg.contains("c1/eth0") && e.msg.contains("no veth"),
            "{}",
            e.msg
        );
    }
}
