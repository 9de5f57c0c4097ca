//! Applying a cluster snapshot to this node: the node table the programs route by, the overlay
//! routes and the masquerade rules, as [`node_table::desired`] computes them. Nodes that left
//! lose their entries at once, so traffic to their pods is dropped (and counted) instead of
//! leaving the node.
//!
//! Every step runs even when one before it failed (a failing `nft` must not keep a new node out
//! of the node table), and the apply fails with all of their errors; the caller retries it.

use std::time::Instant;

use podwire_core::{
    cluster::Cluster,
    error_chain,
    fault::{self, Injected},
};
use podwire_datapath::MapError;
use podwire_netlink::NetlinkError;
use tracing::{error, info};

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
    /// Some steps failed; the others were applied. Applying the snapshot again retries them.
    #[error("{}", failed_steps(.0))]
    Steps(Vec<StepError>),
}

/// The failure of one step of an apply.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// The node table could not be read or written.
    #[error("updating the node table")]
    NodeTable(#[from] MapError),
    /// The overlay routes could not be synced.
    #[error("updating the overlay routes")]
    Routes(#[from] NetlinkError),
    /// The masquerade rules could not be installed.
    #[error(transparent)]
    Masquerade(#[from] MasqueradeError),
    /// A fault point made the step fail (reliability tests only).
    #[error(transparent)]
    Injected(#[from] Injected),
}

fn failed_steps(errors: &[StepError]) -> String {
    let each: Vec<String> = errors.iter().map(|e| error_chain(e)).collect();
    format!(
        "{} of 3 steps failed (the others were applied): {}",
        errors.len(),
        each.join("; ")
    )
}

/// What an apply changed in the node table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Entries written: new, or changed in place.
    pub written: usize,
    /// Entries removed: no longer wanted.
    pub removed: usize,
    /// Entries already right, left alone.
    pub kept: usize,
}

impl Agent {
    /// Brings the node table, the overlay routes and the masquerade rules in line with `cluster`:
    /// runs every step, and fails with the errors of those that failed.
    pub async fn apply_cluster(&mut self, cluster: &Cluster) -> Result<Applied, ReconcileError> {
        let started = Instant::now();
        let overlay = self.overlay.as_ref().ok_or(ReconcileError::NoOverlay)?;
        let (address, vxlan_ifindex) = (overlay.config.address, overlay.vxlan_ifindex);
        let pod_cidr = self.ipam.pod_cidr();
        let me = ThisNode {
            name: &self.node,
            address,
            pod_cidr,
        };
        let want = node_table::desired(cluster, me);
        for conflict in &want.conflicts {
            error!("{conflict}");
        }
        let mut errors = Vec::new();
        let mut applied = Applied::default();
        match self.sync_node_table(&want.nodes) {
            Ok(done) => applied = done,
            Err(e) => errors.push(e),
        }
        let node_table_done = started.elapsed();
        let routes = async {
            fault::point("agent.apply.routes")?;
            self.netlink
                .sync_routes(vxlan_ifindex, VXLAN_DEV, address, &want.routes)
                .await?;
            Ok::<_, StepError>(())
        };
        if let Err(e) = routes.await {
            errors.push(e);
        }
        let routes_done = started.elapsed();
        let masquerade = fault::point("agent.apply.masquerade")
            .map_err(StepError::from)
            .and_then(|()| Ok(masquerade::sync(pod_cidr, &want.pod_ranges)?));
        if let Err(e) = masquerade {
            errors.push(e);
        }
        if !errors.is_empty() {
            return Err(ReconcileError::Steps(errors));
        }
        info!(
            nodes = cluster.nodes.len(),
            remote = want.routes.len(),
            written = applied.written,
            removed = applied.removed,
            kept = applied.kept,
            node_table_ms = node_table_done.as_millis() as u64,
            routes_ms = (routes_done - node_table_done).as_millis() as u64,
            masquerade_ms = (started.elapsed() - routes_done).as_millis() as u64,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "cluster applied"
        );
        Ok(applied)
    }

    /// Writes what differs between the node table and `want`: new and changed entries first,
    /// then the removals. Goes on past a failed write, and fails with the first error.
    fn sync_node_table(
        &mut self,
        want: &[(ipnet::Ipv4Net, podwire_common::NodeEntry)],
    ) -> Result<Applied, StepError> {
        fault::point("agent.apply.node-table")?;
        let changes = node_table::diff(&self.datapath.nodes.list()?, want);
        let mut first_error = None;
        let mut applied = Applied {
            kept: changes.kept,
            ..Applied::default()
        };
        for (net, entry) in changes.set {
            match self.datapath.nodes.set(net, entry) {
                Ok(()) => applied.written += 1,
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        for net in changes.remove {
            match self.datapath.nodes.remove(net) {
                Ok(()) => applied.removed += 1,
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e.into()),
            None => Ok(applied),
        }
    }
}
