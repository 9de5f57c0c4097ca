//! What a cluster snapshot asks of this node, computed without touching anything: the node table
//! the programs route by, the routes that send the node's own traffic into the tunnel, and the
//! ranges its pods reach unmasqueraded. [`crate::reconcile`] applies it.
//!
//! This node is found in a snapshot by its name, and its own pod CIDR and address are those it
//! started with (IPAM allocates from that CIDR, the tunnel leaves from that address): a snapshot
//! that gives them to another node, or drops or changes this one, never takes this node's pods
//! away from it. Such a snapshot is applied without those parts and says why ([`Conflict`]).

use std::{
    collections::{HashMap, HashSet},
    net::Ipv4Addr,
};

use ipnet::Ipv4Net;
use podwire_common::{NodeEntry, NodeKind};
use podwire_core::cluster::Cluster;
use podwire_netlink::overlay::PodRoute;

/// This node, as far as the node table is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ThisNode<'a> {
    /// Its name, by which it finds itself in a snapshot.
    pub name: &'a str,
    /// Its underlay address, which the tunnel was set up with.
    pub address: Ipv4Addr,
    /// The pod CIDR its IPAM allocates from.
    pub pod_cidr: Ipv4Net,
}

/// What in a snapshot contradicts this node's own place, and was left out of the table.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Conflict {
    /// The snapshot does not list this node.
    #[error(
        "this node ({name}) is not in the cluster: its pod CIDR {pod_cidr} stays local until it \
         is listed again"
    )]
    Missing { name: String, pod_cidr: Ipv4Net },
    /// The snapshot gives this node another pod CIDR than the one its IPAM allocates from.
    #[error(
        "the cluster gives this node ({name}) the pod CIDR {listed}, but its pods are in \
         {pod_cidr}: {pod_cidr} stays local and {listed} is not used; restart the agent once \
         this node's pods have moved to take the new CIDR"
    )]
    PodCidrChanged {
        name: String,
        pod_cidr: Ipv4Net,
        listed: Ipv4Net,
    },
    /// The snapshot gives this node another underlay address than the tunnel was set up with.
    #[error(
        "the cluster gives this node ({name}) the address {listed}, but its tunnel uses \
         {address}; restart the agent to take the new address"
    )]
    AddressChanged {
        name: String,
        address: Ipv4Addr,
        listed: Ipv4Addr,
    },
    /// Another node's pod CIDR overlaps this node's: it would own this node's pods.
    #[error(
        "node {node}'s pod CIDR {cidr} overlaps this node's {pod_cidr}: left out of the node \
         table and the routes, this node's pods stay local (fix the cluster's pod CIDRs)"
    )]
    OwnsOurPods {
        node: String,
        cidr: Ipv4Net,
        pod_cidr: Ipv4Net,
    },
    /// Another node has this node's underlay address.
    #[error("node {node} has this node's address {address}: left out of the node table")]
    HasOurAddress { node: String, address: Ipv4Addr },
}

/// The state a cluster snapshot calls for on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired {
    /// Every entry of the node table.
    pub nodes: Vec<(Ipv4Net, NodeEntry)>,
    /// The other nodes' pod CIDRs with their nodes' addresses, routed over the VXLAN device (or
    /// via those addresses, with native routing) for the node's own traffic.
    pub routes: Vec<PodRoute>,
    /// Where pod traffic goes unmasqueraded: the cluster range, or every node's pod CIDR when
    /// the cluster has no range.
    pub pod_ranges: Vec<Ipv4Net>,
    /// What the snapshot says against this node's own place, left out of the above.
    pub conflicts: Vec<Conflict>,
}

/// What `cluster` calls for on `me`: the cluster range as no node's (so an address that no node
/// owns is dropped, not sent out of the node), `me`'s pod CIDR as local, and every other node's
/// pod CIDR and underlay address (so pods' packets to it, and its replies, use the tunnel) as
/// that node's, but never `me`'s own pod CIDR or address.
pub fn desired(cluster: &Cluster, me: ThisNode<'_>) -> Desired {
    let mut conflicts = Vec::new();
    match cluster.node(me.name) {
        None => conflicts.push(Conflict::Missing {
            name: me.name.to_owned(),
            pod_cidr: me.pod_cidr,
        }),
        Some(listed) => {
            if listed.pod_cidr != me.pod_cidr {
                conflicts.push(Conflict::PodCidrChanged {
                    name: me.name.to_owned(),
                    pod_cidr: me.pod_cidr,
                    listed: listed.pod_cidr,
                });
            }
            if listed.address != me.address {
                conflicts.push(Conflict::AddressChanged {
                    name: me.name.to_owned(),
                    address: me.address,
                    listed: listed.address,
                });
            }
        }
    }
    let mut nodes = Vec::new();
    if let Some(range) = cluster.cluster_cidr {
        nodes.push((range, NodeEntry::no_node()));
    }
    nodes.push((
        me.pod_cidr,
        NodeEntry::node(NodeKind::Local, me.address.octets()),
    ));
    let mut routes = Vec::new();
    let mut pod_ranges = vec![me.pod_cidr];
    for node in cluster.nodes.iter().filter(|n| n.name != me.name) {
        if node.address == me.address {
            conflicts.push(Conflict::HasOurAddress {
                node: node.name.clone(),
                address: node.address,
            });
            continue;
        }
        let entry = NodeEntry::node(NodeKind::Remote, node.address.octets());
        nodes.push((Ipv4Net::from(node.address), entry));
        if node.pod_cidr.contains(&me.pod_cidr) || me.pod_cidr.contains(&node.pod_cidr) {
            conflicts.push(Conflict::OwnsOurPods {
                node: node.name.clone(),
                cidr: node.pod_cidr,
                pod_cidr: me.pod_cidr,
            });
            continue;
        }
        nodes.push((node.pod_cidr, entry));
        routes.push(PodRoute {
            dst: node.pod_cidr,
            node: node.address,
        });
        pod_ranges.push(node.pod_cidr);
    }
    if let Some(range) = cluster.cluster_cidr {
        pod_ranges = vec![range];
    }
    Desired {
        nodes,
        routes,
        pod_ranges,
        conflicts,
    }
}

/// The writes that turn the node table `have` into `want`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Prefixes to remove: no longer wanted at all.
    pub remove: Vec<Ipv4Net>,
    /// Entries to write: new, or with another value than they have.
    pub set: Vec<(Ipv4Net, NodeEntry)>,
    /// How many entries are already as wanted, and are left alone.
    pub kept: usize,
}

/// The least that turns `have` into `want`: entries already right are never touched (a live
/// entry is never removed and written again, so lookups never miss it), a changed one is
/// overwritten in place. Linear in the sizes, for tables of thousands of nodes.
pub fn diff(have: &[(Ipv4Net, NodeEntry)], want: &[(Ipv4Net, NodeEntry)]) -> Changes {
    let have_by_net: HashMap<Ipv4Net, NodeEntry> = have.iter().copied().collect();
    let wanted: HashSet<Ipv4Net> = want.iter().map(|(net, _)| *net).collect();
    let set: Vec<(Ipv4Net, NodeEntry)> = want
        .iter()
        .filter(|(net, entry)| have_by_net.get(net) != Some(entry))
        .copied()
        .collect();
    Changes {
        remove: have
            .iter()
            .filter(|(net, _)| !wanted.contains(net))
            .map(|(net, _)| *net)
            .collect(),
        kept: want.len() - set.len(),
        set,
    }
}

#[cfg(test)]
mod tests {
    use podwire_core::cluster::NodeInfo;

    use super::*;

    /// The routes' destinations.
    fn dsts(want: &Desired) -> Vec<Ipv4Net> {
        want.routes.iter().map(|r| r.dst).collect()
    }

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn node(name: &str, last: u8) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            address: Ipv4Addr::new(192, 168, 77, last),
            pod_cidr: net(&format!("10.244.{last}.0/24")),
        }
    }

    fn me() -> ThisNode<'static> {
        ThisNode {
            name: "a",
            address: Ipv4Addr::new(192, 168, 77, 1),
            pod_cidr: net("10.244.1.0/24"),
        }
    }

    fn remote(last: u8) -> NodeEntry {
        NodeEntry::node(NodeKind::Remote, [192, 168, 77, last])
    }

    fn local() -> (Ipv4Net, NodeEntry) {
        (
            net("10.244.1.0/24"),
            NodeEntry::node(NodeKind::Local, [192, 168, 77, 1]),
        )
    }

    #[test]
    fn every_other_node_is_remote_this_one_local_and_the_rest_of_the_range_no_ones() {
        let cluster = Cluster {
            cluster_cidr: Some(net("10.244.0.0/16")),
            nodes: vec![node("a", 1), node("b", 2), node("c", 3)],
        };
        assert_eq!(
            desired(&cluster, me()),
            Desired {
                nodes: vec![
                    (net("10.244.0.0/16"), NodeEntry::no_node()),
                    local(),
                    (net("192.168.77.2/32"), remote(2)),
                    (net("10.244.2.0/24"), remote(2)),
                    (net("192.168.77.3/32"), remote(3)),
                    (net("10.244.3.0/24"), remote(3)),
                ],
                routes: vec![
                    PodRoute {
                        dst: net("10.244.2.0/24"),
                        node: Ipv4Addr::new(192, 168, 77, 2),
                    },
                    PodRoute {
                        dst: net("10.244.3.0/24"),
                        node: Ipv4Addr::new(192, 168, 77, 3),
                    },
                ],
                pod_ranges: vec![net("10.244.0.0/16")],
                conflicts: vec![],
            }
        );
    }

    #[test]
    fn without_a_cluster_range_nothing_is_no_ones_and_every_pod_cidr_is_exempt() {
        let cluster = Cluster {
            cluster_cidr: None,
            nodes: vec![node("a", 1), node("b", 2)],
        };
        let want = desired(&cluster, me());
        assert!(want
            .nodes
            .iter()
            .all(|(_, e)| e.kind() != Some(NodeKind::NoNode)));
        assert_eq!(
            want.pod_ranges,
            [net("10.244.1.0/24"), net("10.244.2.0/24")]
        );
    }

    #[test]
    fn a_node_alone_has_only_its_own_cidr_and_no_routes() {
        let cluster = Cluster {
            cluster_cidr: Some(net("10.244.0.0/16")),
            nodes: vec![node("a", 1)],
        };
        let want = desired(&cluster, me());
        assert_eq!(want.nodes.len(), 2);
        assert!(dsts(&want).is_empty());
        assert!(want.conflicts.is_empty());
    }

    #[test]
    fn another_node_given_this_nodes_pod_cidr_never_owns_its_pods() {
        // This node's CIDR moved to b, and this node given another one.
        let mut moved_to_b = node("b", 2);
        moved_to_b.pod_cidr = net("10.244.1.0/24");
        let mut a = node("a", 1);
        a.pod_cidr = net("10.244.9.0/24");
        let cluster = Cluster {
            cluster_cidr: Some(net("10.244.0.0/16")),
            nodes: vec![a, moved_to_b, node("c", 3)],
        };
        let want = desired(&cluster, me());
        assert_eq!(
            want.nodes,
            [
                (net("10.244.0.0/16"), NodeEntry::no_node()),
                local(),
                (net("192.168.77.2/32"), remote(2)),
                (net("192.168.77.3/32"), remote(3)),
                (net("10.244.3.0/24"), remote(3)),
            ],
            "b's address stays, its pod CIDR (this node's) does not"
        );
        assert_eq!(dsts(&want), [net("10.244.3.0/24")]);
        assert_eq!(
            want.conflicts,
            [
                Conflict::PodCidrChanged {
                    name: "a".into(),
                    pod_cidr: net("10.244.1.0/24"),
                    listed: net("10.244.9.0/24"),
                },
                Conflict::OwnsOurPods {
                    node: "b".into(),
                    cidr: net("10.244.1.0/24"),
                    pod_cidr: net("10.244.1.0/24"),
                },
            ]
        );
        // The same when the other node's CIDR only overlaps this one's, either way round.
        for overlapping in ["10.244.0.0/23", "10.244.1.128/25"] {
            let mut b = node("b", 2);
            b.pod_cidr = net(overlapping);
            let cluster = Cluster {
                cluster_cidr: None,
                nodes: vec![node("a", 1), b],
            };
            let want = desired(&cluster, me());
            assert!(dsts(&want).is_empty(), "{overlapping}");
            assert!(!want.nodes.iter().any(|(n, _)| *n == net(overlapping)));
            assert_eq!(want.pod_ranges, [net("10.244.1.0/24")]);
        }
    }

    #[test]
    fn this_node_missing_keeps_its_cidr_local_and_another_node_with_its_address_is_left_out() {
        let mut impostor = node("x", 1);
        impostor.pod_cidr = net("10.244.7.0/24");
        let cluster = Cluster {
            cluster_cidr: Some(net("10.244.0.0/16")),
            nodes: vec![impostor, node("b", 2)],
        };
        let want = desired(&cluster, me());
        assert!(want.nodes.contains(&local()));
        assert!(!want
            .nodes
            .iter()
            .any(|(n, _)| *n == net("192.168.77.1/32") || *n == net("10.244.7.0/24")));
        assert_eq!(dsts(&want), [net("10.244.2.0/24")]);
        assert_eq!(
            want.conflicts,
            [
                Conflict::Missing {
                    name: "a".into(),
                    pod_cidr: net("10.244.1.0/24"),
                },
                Conflict::HasOurAddress {
                    node: "x".into(),
                    address: Ipv4Addr::new(192, 168, 77, 1),
                },
            ]
        );
        assert!(want.conflicts[0].to_string().contains("not in the cluster"));
    }

    #[test]
    fn this_node_is_found_by_name_not_by_address() {
        // This node's entry carries another address: it is still this node, never remote.
        let mut a = node("a", 1);
        a.address = Ipv4Addr::new(192, 168, 77, 9);
        let cluster = Cluster {
            cluster_cidr: None,
            nodes: vec![a, node("b", 2)],
        };
        let want = desired(&cluster, me());
        assert!(want.nodes.contains(&local()));
        assert!(!dsts(&want).contains(&net("10.244.1.0/24")));
        assert!(matches!(
            want.conflicts[..],
            [Conflict::AddressChanged { .. }]
        ));
    }

    #[test]
    fn diff_removes_what_left_writes_what_changed_and_keeps_the_rest() {
        let kept = (
            net("10.244.2.0/24"),
            NodeEntry::node(NodeKind::Remote, [1, 1, 1, 2]),
        );
        let moved_before = (
            net("10.244.3.0/24"),
            NodeEntry::node(NodeKind::Remote, [1, 1, 1, 3]),
        );
        let moved_after = (
            net("10.244.3.0/24"),
            NodeEntry::node(NodeKind::Remote, [1, 1, 1, 9]),
        );
        let gone = (
            net("10.244.4.0/24"),
            NodeEntry::node(NodeKind::Remote, [1, 1, 1, 4]),
        );
        let new = (
            net("10.244.5.0/24"),
            NodeEntry::node(NodeKind::Remote, [1, 1, 1, 5]),
        );
        assert_eq!(
            diff(&[kept, moved_before, gone], &[kept, moved_after, new]),
            Changes {
                remove: vec![gone.0],
                set: vec![moved_after, new],
                kept: 1,
            }
        );
        assert_eq!(
            diff(&[kept], &[kept]),
            Changes {
                kept: 1,
                ..Changes::default()
            }
        );
    }
}
