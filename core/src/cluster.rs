//! The cluster as podwire needs it: every node's name, underlay address and pod CIDR, and the
//! range all pod CIDRs come from. The agent reads it from a cluster source; the test lab writes
//! it as the cluster file.

use std::{collections::HashSet, net::Ipv4Addr};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// One node of the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeInfo {
    pub name: String,
    /// The node's underlay address: tunnels to its pods end here.
    pub address: Ipv4Addr,
    #[serde(rename = "podCIDR")]
    pub pod_cidr: Ipv4Net,
}

/// A snapshot of the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Cluster {
    /// The range every pod CIDR is carved from. Destinations in it that no node owns are dropped
    /// rather than sent out of the node, and pod traffic to it is never masqueraded.
    #[serde(rename = "clusterCIDR", skip_serializing_if = "Option::is_none")]
    pub cluster_cidr: Option<Ipv4Net>,
    pub nodes: Vec<NodeInfo>,
}

/// What makes a cluster description invalid.
#[derive(Debug, thiserror::Error)]
pub enum InvalidCluster {
    /// Not JSON of the cluster's shape.
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    /// Two nodes have the same name.
    #[error("node {0:?} is listed twice")]
    DuplicateName(String),
    /// Two nodes have the same underlay address.
    #[error("address {0} is given to two nodes")]
    DuplicateAddress(Ipv4Addr),
    /// A pod CIDR is not a network address (e.g. 10.244.1.7/24).
    #[error("node {node}: podCIDR {cidr} has host bits set")]
    HostBits { node: String, cidr: Ipv4Net },
    /// A pod CIDR lies outside the cluster CIDR.
    #[error("node {node}: podCIDR {cidr} is outside clusterCIDR {cluster}")]
    OutsideCluster {
        node: String,
        cidr: Ipv4Net,
        cluster: Ipv4Net,
    },
    /// Two nodes' pod CIDRs overlap.
    #[error("podCIDR {cidr} of {node} overlaps {other_cidr} of {other}")]
    Overlap {
        node: String,
        cidr: Ipv4Net,
        other: String,
        other_cidr: Ipv4Net,
    },
}

impl Cluster {
    /// Parses and checks a cluster description: unique names and addresses, pod CIDRs that do not
    /// overlap and lie inside the cluster CIDR.
    pub fn parse(bytes: &[u8]) -> Result<Cluster, InvalidCluster> {
        let cluster: Cluster = serde_json::from_slice(bytes)?;
        cluster.validate()?;
        Ok(cluster)
    }

    /// Checks what [`Cluster::parse`] checks. Linear but for one sort, for clusters of
    /// thousands of nodes.
    pub fn validate(&self) -> Result<(), InvalidCluster> {
        let mut names = HashSet::new();
        let mut addresses = HashSet::new();
        for node in &self.nodes {
            if !names.insert(&node.name) {
                return Err(InvalidCluster::DuplicateName(node.name.clone()));
            }
            if !addresses.insert(node.address) {
                return Err(InvalidCluster::DuplicateAddress(node.address));
            }
            if node.pod_cidr != node.pod_cidr.trunc() {
                return Err(InvalidCluster::HostBits {
                    node: node.name.clone(),
                    cidr: node.pod_cidr,
                });
            }
            if let Some(cluster) = self.cluster_cidr {
                if !cluster.contains(&node.pod_cidr) {
                    return Err(InvalidCluster::OutsideCluster {
                        node: node.name.clone(),
                        cidr: node.pod_cidr,
                        cluster,
                    });
                }
            }
        }
        // Two prefixes overlap only if one contains the other: in address order (the wider
        // first where two start alike), a prefix overlaps an earlier one exactly when it starts
        // before the end of the earlier one reaching furthest.
        let mut by_start: Vec<&NodeInfo> = self.nodes.iter().collect();
        by_start.sort_by_key(|n| (n.pod_cidr.network(), n.pod_cidr.prefix_len()));
        let mut furthest: Option<&NodeInfo> = None;
        for node in by_start {
            if let Some(other) = furthest {
                if node.pod_cidr.network() <= other.pod_cidr.broadcast() {
                    return Err(InvalidCluster::Overlap {
                        node: node.name.clone(),
                        cidr: node.pod_cidr,
                        other: other.name.clone(),
                        other_cidr: other.pod_cidr,
                    });
                }
            }
            if furthest.is_none_or(|f| node.pod_cidr.broadcast() > f.pod_cidr.broadcast()) {
                furthest = Some(node);
            }
        }
        Ok(())
    }

    pub fn node(&self, name: &str) -> Option<&NodeInfo> {
        self.nodes.iter().find(|n| n.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::Cluster;

    #[test]
    fn thousands_of_adjacent_pod_cidrs_are_valid() {
        let nodes: Vec<String> = (0..5000u32)
            .map(|k| {
                let cidr = std::net::Ipv4Addr::from(
                    u32::from(std::net::Ipv4Addr::new(10, 244, 16, 0)) + 8 * k,
                );
                let address =
                    std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(198, 18, 0, 1)) + k);
                format!(r#"{{"name":"n{k}","address":"{address}","podCIDR":"{cidr}/29"}}"#)
            })
            .collect();
        let json = format!(
            r#"{{"clusterCIDR":"10.244.0.0/16","nodes":[{}]}}"#,
            nodes.join(",")
        );
        assert_eq!(Cluster::parse(json.as_bytes()).unwrap().nodes.len(), 5000);
    }

    #[test]
    fn rejects_overlaps_duplicates_and_strays() {
        let ok = r#"{"clusterCIDR":"10.244.0.0/16","nodes":[
            {"name":"a","address":"192.168.77.1","podCIDR":"10.244.1.0/24"},
            {"name":"b","address":"192.168.77.2","podCIDR":"10.244.2.0/24"}]}"#;
        let cluster = Cluster::parse(ok.as_bytes()).unwrap();
        assert_eq!(
            cluster.node("b").unwrap().pod_cidr.to_string(),
            "10.244.2.0/24"
        );
        // What the lab writes reads back the same.
        let written = serde_json::to_vec(&cluster).unwrap();
        assert_eq!(Cluster::parse(&written).unwrap(), cluster);
        for (bad, says) in [
            (
                r#"{"nodes":[{"name":"a","address":"192.168.77.1","podCIDR":"10.244.1.0/24"},{"name":"a","address":"192.168.77.2","podCIDR":"10.244.2.0/24"}]}"#,
                "listed twice",
            ),
            (
                r#"{"nodes":[{"name":"a","address":"192.168.77.1","podCIDR":"10.244.1.0/24"},{"name":"b","address":"192.168.77.1","podCIDR":"10.244.2.0/24"}]}"#,
                "given to two nodes",
            ),
            (
                r#"{"nodes":[{"name":"a","address":"192.168.77.1","podCIDR":"10.244.0.0/16"},{"name":"b","address":"192.168.77.2","podCIDR":"10.244.2.0/24"}]}"#,
                "overlaps",
            ),
            (
                r#"{"nodes":[{"name":"a","address":"192.168.77.1","podCIDR":"10.244.2.0/24"},{"name":"b","address":"192.168.77.2","podCIDR":"10.244.3.0/24"},{"name":"c","address":"192.168.77.3","podCIDR":"10.244.2.128/25"}]}"#,
                "podCIDR 10.244.2.128/25 of c overlaps 10.244.2.0/24 of a",
            ),
            (
                r#"{"nodes":[{"name":"a","address":"192.168.77.1","podCIDR":"10.244.2.0/24"},{"name":"b","address":"192.168.77.2","podCIDR":"10.244.2.0/24"}]}"#,
                "overlaps",
            ),
            (
                r#"{"clusterCIDR":"10.244.0.0/16","nodes":[{"name":"a","address":"192.168.77.1","podCIDR":"10.9.1.0/24"}]}"#,
                "outside clusterCIDR",
            ),
            (
                r#"{"nodes":[{"name":"a","address":"192.168.77.1","podCIDR":"10.244.1.7/24"}]}"#,
                "host bits",
            ),
            (
                r#"{"nodes":[{"name":"a","address":"192.168.77.1"}]}"#,
                "podCIDR",
            ),
        ] {
            let err = Cluster::parse(bad.as_bytes()).unwrap_err().to_string();
            assert!(err.contains(says), "{err} (want {says:?})");
        }
    }
}
