//! podwire's node agent. It owns the node's datapath (loaded from the object embedded here, with
//! its maps and links pinned in bpffs), its IPAM, and the overlay; it serves the CNI plugin on a
//! Unix socket and follows the cluster from a source.
//!
//! By job: [`server`] is the socket; [`lifecycle`] registers, releases, checks and collects pod
//! endpoints; [`ipam`] allocates their addresses and keeps them in its [`store`]; [`cluster`] is
//! where the cluster comes from ([`kubernetes`] its Kubernetes API source), [`node_table`] what
//! it asks of this node, [`reconcile`] applies that; [`overlay`] is the tunnel decided at start,
//! [`masquerade`] the nftables rules; [`metrics`] serves health and metrics over HTTP;
//! [`uninstall`] cleans the node when podwire is uninstalled.

pub mod cluster;
pub mod ipam;
pub mod kubernetes;
pub mod lifecycle;
pub mod masquerade;
pub mod metrics;
pub mod node_table;
pub mod overlay;
pub mod reconcile;
pub mod server;
pub mod store;
pub mod uninstall;

use podwire_core::pins::Pins;
use podwire_datapath::Datapath;
use podwire_netlink::Netlink;

use crate::{
    ipam::Ipam,
    overlay::{Overlay, PodMtu},
};

/// The compiled kernel programs, built by `cargo xtask build` and embedded at compile time;
/// empty in a build without them (see build.rs), which then fails to load the datapath.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("PODWIRE_EBPF_OBJECT"));

/// The agent's state, behind one lock: requests and cluster updates are short and must not
/// interleave.
pub struct Agent {
    /// This node's name, as the cluster knows it.
    node: String,
    datapath: Datapath,
    ipam: Ipam,
    pins: Pins,
    netlink: Netlink,
    /// MTU handed to pods whose plugin configuration sets none.
    pod_mtu: PodMtu,
    overlay: Option<Overlay>,
}

impl Agent {
    /// This node's name, as the cluster knows it.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The pod CIDR IPAM allocates from.
    pub fn pod_cidr(&self) -> ipnet::Ipv4Net {
        self.ipam.pod_cidr()
    }
}
