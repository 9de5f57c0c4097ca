//! Applying a cluster snapshot to this node: the node table the programs route by, the overlay
//! routes and the masquerade rules, as [`node_table::desired`] computes them. Nodes that left
//! lose their entries at once, so traffic to their pods is dropped (and counted) instead of
//! leaving the node.

use podwire_core::cluster::Cluster;
use podwire_datapath::MapError;
use podwire_netlink::NetlinkError;
use tracing::info;

use crate::{
    masquerade::{self, MasqueradeError},
    node_table::{self, ThisNode},
    overlay::VXLAN_DEV,
    Agent,
};

/// Errors of applying a cluster snapshot.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The node has no overlay: it serves a pod CIDR alone (`--pod-cidr`).
    #[error("no overlay on this node")]
    NoOverlay,
    /// The node table could not be read or written.
    #[error("updating the node table")]
    NodeTable(#[from] MapError),
    /// The overlay routes could not be synced.
    #[error("updating the overlay routes")]
    Routes(#[from] NetlinkError),
    /// The masquerade rules could not be installed.
    #[error(transparent)]
    Masquerade(#[from] MasqueradeError),
}

impl Agent {
    /// Brings the node table, the overlay routes and the masquerade rules in line with `cluster`.
    pub async fn apply_cluster(&mut self, cluster: &Cluster) -> Result<(), ReconcileError> {
        let overlay = self.overlay.as_ref().ok_or(ReconcileError::NoOverlay)?;
        let me = ThisNode {
            address: overlay.config.address,
            pod_cidr: self.ipam.pod_cidr(),
        };
        let want = node_table::desired(cluster, me);
        let changes = node_table::diff(&self.datapath.nodes.list()?, &want.nodes);
        for net in changes.remove {
            self.datapath.nodes.remove(net)?;
        }
        for (net, entry) in changes.set {
            self.datapath.nodes.set(net, entry)?;
        }
        self.netlink
            .sync_routes(overlay.vxlan_ifindex, VXLAN_DEV, me.address, &want.routes)
            .await?;
        masquerade::sync(me.pod_cidr, &want.pod_ranges)?;
        info!(
            nodes = cluster.nodes.len(),
            remote = want.routes.len(),
            "cluster applied"
        );
        Ok(())
    }
}
