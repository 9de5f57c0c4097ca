//! What a cluster snapshot asks of this node, computed without touching anything: the node table
//! the programs route by, the routes that send the node's own traffic into the tunnel, and the
//! ranges its pods reach unmasqueraded. [`crate::reconcile`] applies it.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use podwire_common::{NodeEntry, NodeKind};
use podwire_core::cluster::Cluster;

/// This node, as far as the node table is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ThisNode {
    /// Its underlay address: the other nodes' entries are those with another address.
    pub address: Ipv4Addr,
    /// The pod CIDR its IPAM allocates from.
    pub pod_cidr: Ipv4Net,
}

/// The state a cluster snapshot calls for on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired {
    /// Every entry of the node table.
    pub nodes: Vec<(Ipv4Net, NodeEntry)>,
    /// The other nodes' pod CIDRs, routed over the VXLAN device for the node's own traffic.
    pub routes: Vec<Ipv4Net>,
    /// Where pod traffic goes unmasqueraded: the cluster range, or every node's pod CIDR when
    /// the cluster has no range.
    pub pod_ranges: Vec<Ipv4Net>,
}

/// What `cluster` calls for on `me`: the cluster range as no node's (so an address that no node
/// owns is dropped, not sent out of the node), `me`'s pod CIDR as local, and every other node's
/// pod CIDR and underlay address (so pods' packets to it, and its replies, use the tunnel) as
/// that node's.
pub fn desired(cluster: &Cluster, me: ThisNode) -> Desired {
    let mut nodes = Vec::new();
    if let Some(range) = cluster.cluster_cidr {
        nodes.push((range, NodeEntry::no_node()));
    }
    nodes.push((
        me.pod_cidr,
        NodeEntry::node(NodeKind::Local, me.address.octets()),
    ));
    let mut routes = Vec::new();
    for node in cluster.nodes.iter().filter(|n| n.address != me.address) {
        let entry = NodeEntry::node(NodeKind::Remote, node.address.octets());
        nodes.push((node.pod_cidr, entry));
        nodes.push((Ipv4Net::from(node.address), entry));
        routes.push(node.pod_cidr);
    }
    let pod_ranges = match cluster.cluster_cidr {
        Some(range) => vec![range],
        None => cluster.nodes.iter().map(|n| n.pod_cidr).collect(),
    };
    Desired {
        nodes,
        routes,
        pod_ranges,
    }
}

/// The writes that turn the node table `have` into `want`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Prefixes to remove: no longer wanted at all.
    pub remove: Vec<Ipv4Net>,
    /// Entries to write: new, or with another value than they have.
    pub set: Vec<(Ipv4Net, NodeEntry)>,
}

pub fn diff(have: &[(Ipv4Net, NodeEntry)], want: &[(Ipv4Net, NodeEntry)]) -> Changes {
    Changes {
        remove: have
            .iter()
            .filter(|(net, _)| !want.iter().any(|(w, _)| w == net))
            .map(|(net, _)| *net)
            .collect(),
        set: want
            .iter()
            .filter(|entry| !have.contains(entry))
            .copied()
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use podwire_core::cluster::NodeInfo;

    use super::*;

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

    fn me() -> ThisNode {
        ThisNode {
            address: Ipv4Addr::new(192, 168, 77, 1),
            pod_cidr: net("10.244.1.0/24"),
        }
    }

    #[test]
    fn every_other_node_is_remote_this_one_local_and_the_rest_of_the_range_no_ones() {
        let cluster = Cluster {
            cluster_cidr: Some(net("10.244.0.0/16")),
            nodes: vec![node("a", 1), node("b", 2), node("c", 3)],
        };
        let remote = |last: u8| NodeEntry::node(NodeKind::Remote, [192, 168, 77, last]);
        assert_eq!(
            desired(&cluster, me()),
            Desired {
                nodes: vec![
                    (net("10.244.0.0/16"), NodeEntry::no_node()),
                    (
                        net("10.244.1.0/24"),
                        NodeEntry::node(NodeKind::Local, [192, 168, 77, 1])
                    ),
                    (net("10.244.2.0/24"), remote(2)),
                    (net("192.168.77.2/32"), remote(2)),
                    (net("10.244.3.0/24"), remote(3)),
                    (net("192.168.77.3/32"), remote(3)),
                ],
                routes: vec![net("10.244.2.0/24"), net("10.244.3.0/24")],
                pod_ranges: vec![net("10.244.0.0/16")],
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
        assert!(want.routes.is_empty());
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
            }
        );
        assert_eq!(diff(&[kept], &[kept]), Changes::default());
    }
}
