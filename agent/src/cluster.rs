//! The cluster as the agent needs it: every node's name, underlay address and pod CIDR. It comes
//! from a [`ClusterSource`]; the first is a static file, reloaded when it changes.

use std::{collections::HashSet, future::Future, net::Ipv4Addr, path::PathBuf, time::Duration};

use ipnet::Ipv4Net;
use serde::Deserialize;
use tracing::warn;

/// One node of the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeInfo {
    pub name: String,
    /// The node's underlay address: tunnels to its pods end here.
    pub address: Ipv4Addr,
    #[serde(rename = "podCIDR")]
    pub pod_cidr: Ipv4Net,
}

/// A snapshot of the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Cluster {
    /// The range every pod CIDR is carved from. Destinations in it that no node owns are dropped
    /// rather than sent out of the node, and pod traffic to it is never masqueraded.
    #[serde(rename = "clusterCIDR")]
    pub cluster_cidr: Option<Ipv4Net>,
    pub nodes: Vec<NodeInfo>,
}

/// Errors of reading a cluster description.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The file could not be read.
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid cluster description.
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl Cluster {
    /// Parses and checks a cluster description: unique names and addresses, pod CIDRs that do not
    /// overlap and lie inside the cluster CIDR.
    pub fn parse(bytes: &[u8]) -> Result<Cluster, String> {
        let cluster: Cluster = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        let mut names = HashSet::new();
        let mut addresses = HashSet::new();
        for (i, node) in cluster.nodes.iter().enumerate() {
            if !names.insert(&node.name) {
                return Err(format!("node {:?} is listed twice", node.name));
            }
            if !addresses.insert(node.address) {
                return Err(format!("address {} is given to two nodes", node.address));
            }
            if node.pod_cidr != node.pod_cidr.trunc() {
                return Err(format!(
                    "node {}: podCIDR {} has host bits set",
                    node.name, node.pod_cidr
                ));
            }
            if let Some(cidr) = cluster.cluster_cidr {
                if !cidr.contains(&node.pod_cidr) {
                    return Err(format!(
                        "node {}: podCIDR {} is outside clusterCIDR {cidr}",
                        node.name, node.pod_cidr
                    ));
                }
            }
            for other in &cluster.nodes[..i] {
                if other.pod_cidr.contains(&node.pod_cidr)
                    || node.pod_cidr.contains(&other.pod_cidr)
                {
                    return Err(format!(
                        "podCIDR {} of {} overlaps {} of {}",
                        node.pod_cidr, node.name, other.pod_cidr, other.name
                    ));
                }
            }
        }
        Ok(cluster)
    }

    pub fn node(&self, name: &str) -> Option<&NodeInfo> {
        self.nodes.iter().find(|n| n.name == name)
    }
}

/// Where the cluster comes from: a file now, Kubernetes Nodes later.
pub trait ClusterSource: Send + 'static {
    /// The current cluster on the first call, then the next different one when it changes.
    fn next(&mut self) -> impl Future<Output = Result<Cluster, ClusterError>> + Send;
}

/// A JSON file, re-read when its content changes (polled: a ConfigMap volume swaps a symlink,
/// which inotify on the file does not see).
pub struct FileSource {
    path: PathBuf,
    interval: Duration,
    last: Option<Cluster>,
}

impl FileSource {
    pub fn new(path: PathBuf, interval: Duration) -> FileSource {
        FileSource {
            path,
            interval,
            last: None,
        }
    }

    fn read(&self) -> Result<Cluster, ClusterError> {
        let bytes = std::fs::read(&self.path).map_err(|source| ClusterError::Read {
            path: self.path.clone(),
            source,
        })?;
        Cluster::parse(&bytes).map_err(|message| ClusterError::Invalid {
            path: self.path.clone(),
            message,
        })
    }
}

impl ClusterSource for FileSource {
    async fn next(&mut self) -> Result<Cluster, ClusterError> {
        if self.last.is_none() {
            let cluster = self.read()?;
            self.last = Some(cluster.clone());
            return Ok(cluster);
        }
        loop {
            tokio::time::sleep(self.interval).await;
            match self.read() {
                Ok(cluster) if Some(&cluster) != self.last.as_ref() => {
                    self.last = Some(cluster.clone());
                    return Ok(cluster);
                }
                Ok(_) => {}
                // Keep the last good cluster while the file is being rewritten or is broken.
                Err(e) => warn!(
                    "{}; keeping the previous cluster",
                    crate::daemon::error_chain(&e)
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Cluster;

    #[test]
    fn rejects_overlaps_duplicates_and_strays() {
        let ok = r#"{"clusterCIDR":"10.244.0.0/16","nodes":[
            {"name":"a","address":"192.168.77.1","podCIDR":"10.244.1.0/24"},
            {"name":"b","address":"192.168.77.2","podCIDR":"10.244.2.0/24"}]}"#;
        assert_eq!(
            Cluster::parse(ok.as_bytes())
                .unwrap()
                .node("b")
                .unwrap()
                .pod_cidr
                .to_string(),
            "10.244.2.0/24"
        );
        for (bad, says) in [
            (
                r#"{"nodes":[{"name":"a","address":"192.168.77.1","podCIDR":"10.244.1.0/24"},{"name":"a","address":"192.168.77.2","podCIDR":"10.244.2.0/24"}]}"#,
                "listed twice",
            ),
            (
                r#"{"nodes":[{"name":"a","address":"192.168.77.1","podCIDR":"10.244.0.0/16"},{"name":"b","address":"192.168.77.2","podCIDR":"10.244.2.0/24"}]}"#,
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
            let err = Cluster::parse(bad.as_bytes()).unwrap_err();
            assert!(err.contains(says), "{err} (want {says:?})");
        }
    }
}
