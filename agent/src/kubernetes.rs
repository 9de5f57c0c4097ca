//! The cluster as the Kubernetes API tells it: every Node's InternalIP and pod CIDR, followed
//! with a list+watch of Nodes ([`KubeSource`], a [`ClusterSource`]), and this node's
//! `NetworkUnavailable` condition cleared once its datapath is up ([`mark_network_available`]).
//!
//! The watch is kube's `watcher`: it lists, then watches from the list's resourceVersion, resumes
//! a dropped connection from the last one it saw, and lists again (with backoff) when that
//! version has expired (410 Gone) or a request fails. Snapshots are only computed from a complete
//! view: while a relist is under way the previous complete one stays in force, and the relist
//! replaces it whole when it is done, so a half-applied table is never handed on.

use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
    path::Path,
    pin::Pin,
};

use futures::{Stream, StreamExt as _};
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{Node, NodeCondition};
use kube::{
    api::{Patch, PatchParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        watcher::{self, Event},
        WatchStreamExt as _,
    },
    Api, Client, Config,
};
use podwire_core::cluster::{Cluster, NodeInfo};
use tracing::{info, warn};

use crate::cluster::{ClusterError, ClusterSource};

/// The reason podwire gives when it clears `NetworkUnavailable`.
pub const NETWORK_AVAILABLE_REASON: &str = "PodwireIsUp";

/// Errors of reaching the Kubernetes API.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// The kubeconfig given with `--kubeconfig` could not be read or used.
    #[error("kubeconfig {path}")]
    Kubeconfig {
        path: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// Neither the in-cluster service account nor a kubeconfig (KUBECONFIG, ~/.kube/config)
    /// was found.
    #[error("no Kubernetes client configuration (in-cluster, KUBECONFIG or ~/.kube/config)")]
    Infer(#[source] kube::config::InferConfigError),
    /// The client could not be built from the configuration (TLS, proxy, ...).
    #[error("building the Kubernetes client")]
    Client(#[source] kube::Error),
    /// The API refused or failed a request.
    #[error("{what}")]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },
}

/// A client from `kubeconfig`, or else the in-cluster configuration, or else KUBECONFIG or
/// ~/.kube/config.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, KubeError> {
    let config = match kubeconfig {
        Some(path) => {
            let kubeconfig_err = |source| KubeError::Kubeconfig {
                path: path.display().to_string(),
                source,
            };
            let kubeconfig = Kubeconfig::read_from(path).map_err(kubeconfig_err)?;
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(kubeconfig_err)?
        }
        None => Config::infer().await.map_err(KubeError::Infer)?,
    };
    Client::try_from(config).map_err(KubeError::Client)
}

/// Why a Node is not in the cluster snapshot (yet).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LeftOut {
    /// The Node has no IPv4 InternalIP: its kubelet has not reported its addresses yet.
    #[error("it has no IPv4 InternalIP address yet")]
    NoInternalIp,
    /// The Node has no IPv4 pod CIDR: the controller manager has not assigned one yet (seconds
    /// after the kubelet registers), or the cluster does not allocate node CIDRs.
    #[error(
        "it has no IPv4 podCIDR yet (kube-controller-manager --allocate-node-cidrs assigns one)"
    )]
    NoPodCidr,
    /// A pod CIDR that does not parse.
    #[error("its podCIDR {0:?} is not a network")]
    BadPodCidr(String),
    /// A pod CIDR that is not a network address (e.g. 10.244.1.7/24).
    #[error("its podCIDR {0} has host bits set")]
    HostBits(Ipv4Net),
    /// A pod CIDR outside the cluster range (`--cluster-cidr`).
    #[error("its podCIDR {cidr} is outside the cluster CIDR {cluster}")]
    OutsideCluster { cidr: Ipv4Net, cluster: Ipv4Net },
    /// Another node (first by name) has the same InternalIP.
    #[error("its InternalIP {address} is also {other}'s")]
    SameAddress { address: Ipv4Addr, other: String },
    /// Another node's (first by name) pod CIDR overlaps this one's.
    #[error("its podCIDR {cidr} overlaps {other}'s {other_cidr}")]
    Overlap {
        cidr: Ipv4Net,
        other: String,
        other_cidr: Ipv4Net,
    },
}

/// What podwire needs of one Node: its InternalIP (the first IPv4 one) and its pod CIDR (the
/// first IPv4 one of `spec.podCIDRs`, else `spec.podCIDR`).
pub fn node_info(node: &Node) -> Result<NodeInfo, LeftOut> {
    let name = node.metadata.name.clone().unwrap_or_default();
    let address = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP")
        .find_map(|a| a.address.parse::<Ipv4Addr>().ok())
        .ok_or(LeftOut::NoInternalIp)?;
    let spec = node.spec.as_ref();
    let cidrs: Vec<&String> = match spec.and_then(|s| s.pod_cidrs.as_ref()) {
        Some(list) if !list.is_empty() => list.iter().collect(),
        _ => spec.and_then(|s| s.pod_cidr.as_ref()).into_iter().collect(),
    };
    let mut pod_cidr = Err(LeftOut::NoPodCidr);
    for cidr in cidrs {
        // IPv6 ranges of a dual-stack node are not podwire's: skip them.
        if cidr.contains(':') {
            continue;
        }
        pod_cidr = cidr
            .parse::<Ipv4Net>()
            .map_err(|_| LeftOut::BadPodCidr(cidr.clone()));
        break;
    }
    Ok(NodeInfo {
        name,
        address,
        pod_cidr: pod_cidr?,
    })
}

/// A snapshot of the cluster and the Nodes left out of it.
#[derive(Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub cluster: Cluster,
    pub left_out: BTreeMap<String, LeftOut>,
}

/// The cluster `nodes` (by name, each as [`node_info`] saw it) make with the pod range
/// `cluster_cidr`. A node that would make the cluster invalid (host bits, outside the range, an
/// address or pod CIDR another node already has) is left out rather than the whole snapshot
/// refused: the nodes are taken in name order, and the first one keeps what they share.
pub fn snapshot<'a>(
    nodes: impl IntoIterator<Item = (&'a String, &'a Result<NodeInfo, LeftOut>)>,
    cluster_cidr: Ipv4Net,
) -> Snapshot {
    let mut cluster = Cluster {
        cluster_cidr: Some(cluster_cidr),
        nodes: Vec::new(),
    };
    let mut left_out = BTreeMap::new();
    // What the nodes taken so far hold, to check each next one without going over them all
    // (every watch event recomputes the snapshot, and a large cluster has thousands of Nodes).
    let mut addresses: HashMap<Ipv4Addr, String> = HashMap::new();
    // Their pod CIDRs, disjoint, by first address: (last address, node, CIDR).
    let mut cidrs: BTreeMap<u32, (u32, String, Ipv4Net)> = BTreeMap::new();
    for (name, info) in nodes {
        let checked = info.clone().and_then(|info| {
            if info.pod_cidr != info.pod_cidr.trunc() {
                return Err(LeftOut::HostBits(info.pod_cidr));
            }
            if !cluster_cidr.contains(&info.pod_cidr) {
                return Err(LeftOut::OutsideCluster {
                    cidr: info.pod_cidr,
                    cluster: cluster_cidr,
                });
            }
            if let Some(other) = addresses.get(&info.address) {
                return Err(LeftOut::SameAddress {
                    address: info.address,
                    other: other.clone(),
                });
            }
            let (first, last) = (
                u32::from(info.pod_cidr.network()),
                u32::from(info.pod_cidr.broadcast()),
            );
            // Among disjoint ranges, the one starting last at or before this one's end is the
            // only one that can overlap it.
            if let Some((_, (other_last, other, other_cidr))) = cidrs.range(..=last).next_back() {
                if *other_last >= first {
                    return Err(LeftOut::Overlap {
                        cidr: info.pod_cidr,
                        other: other.clone(),
                        other_cidr: *other_cidr,
                    });
                }
            }
            Ok(info)
        });
        match checked {
            Ok(info) => {
                addresses.insert(info.address, info.name.clone());
                cidrs.insert(
                    u32::from(info.pod_cidr.network()),
                    (
                        u32::from(info.pod_cidr.broadcast()),
                        info.name.clone(),
                        info.pod_cidr,
                    ),
                );
                cluster.nodes.push(info);
            }
            Err(why) => {
                left_out.insert(name.clone(), why);
            }
        }
    }
    Snapshot { cluster, left_out }
}

/// The Nodes as the watch has shown them, by name; complete once a list has finished.
#[derive(Debug, Default)]
pub struct NodeCache {
    /// The last complete view, updated by watch events after it.
    nodes: BTreeMap<String, Result<NodeInfo, LeftOut>>,
    /// A relist under way: it replaces `nodes` whole when it is done.
    relisting: Option<BTreeMap<String, Result<NodeInfo, LeftOut>>>,
    /// Whether a list has ever completed.
    synced: bool,
}

impl NodeCache {
    /// Takes in one watch event; true when the cache holds a complete view that it may have
    /// changed.
    pub fn apply(&mut self, event: Event<Node>) -> bool {
        let name = |node: &Node| node.metadata.name.clone().unwrap_or_default();
        match event {
            Event::Init => {
                self.relisting = Some(BTreeMap::new());
                false
            }
            Event::InitApply(node) => {
                self.relisting
                    .get_or_insert_with(BTreeMap::new)
                    .insert(name(&node), node_info(&node));
                false
            }
            Event::InitDone => {
                self.nodes = self.relisting.take().unwrap_or_default();
                self.synced = true;
                true
            }
            Event::Apply(node) => {
                self.nodes.insert(name(&node), node_info(&node));
                self.synced
            }
            Event::Delete(node) => {
                self.nodes.remove(&name(&node));
                self.synced
            }
        }
    }

    /// The complete view's Nodes, by name.
    pub fn nodes(&self) -> &BTreeMap<String, Result<NodeInfo, LeftOut>> {
        &self.nodes
    }
}

/// How long a snapshot waits, after a Node event, for the events that follow it.
const BATCH: std::time::Duration = std::time::Duration::from_millis(100);

type NodeEvents = Pin<Box<dyn Stream<Item = Result<Event<Node>, watcher::Error>> + Send>>;

/// The cluster from the Kubernetes API's Nodes, with the pod range `--cluster-cidr`.
pub struct KubeSource {
    events: NodeEvents,
    cache: NodeCache,
    cluster_cidr: Ipv4Net,
    last: Option<Cluster>,
    left_out: BTreeMap<String, LeftOut>,
}

impl KubeSource {
    /// Starts following every Node (nothing is requested before the first `next`).
    pub fn new(client: Client, cluster_cidr: Ipv4Net) -> KubeSource {
        let events = watcher::watcher(Api::<Node>::all(client), watcher::Config::default())
            // Backs off before the retry after each error: relists and rewatches do not hammer
            // an API server that is down or restarting.
            .default_backoff()
            .boxed();
        KubeSource {
            events,
            cache: NodeCache::default(),
            cluster_cidr,
            last: None,
            left_out: BTreeMap::new(),
        }
    }

    /// Why the Node `name` is not in the last snapshot.
    pub fn why_not_in(&self, name: &str) -> String {
        match self.left_out.get(name) {
            Some(why) => why.to_string(),
            None if self.cache.synced => "there is no such Node".into(),
            None => "the Nodes have not been listed yet".into(),
        }
    }

    /// Logs the Nodes newly left out (and why), once each.
    fn log_left_out(&mut self, left_out: BTreeMap<String, LeftOut>) {
        for (name, why) in &left_out {
            if self.left_out.get(name) == Some(why) {
                continue;
            }
            match why {
                LeftOut::NoInternalIp | LeftOut::NoPodCidr => {
                    info!(node = %name, "node not in the node table yet: {why}")
                }
                _ => warn!(node = %name, "node left out of the node table: {why}"),
            }
        }
        self.left_out = left_out;
    }
}

impl ClusterSource for KubeSource {
    async fn next(&mut self) -> Result<Cluster, ClusterError> {
        loop {
            let event = match self.events.next().await {
                Some(Ok(event)) => event,
                Some(Err(e)) => return Err(ClusterError::Watch(e)),
                // The watcher recovers from every error by itself and never ends.
                None => return Err(ClusterError::WatchEnded),
            };
            let mut complete = self.cache.apply(event);
            // The events of the next moment go in before one snapshot is made: a burst of
            // thousands of Node changes (a large cluster created or scaled) makes a few, not
            // thousands, each going over every Node.
            let until = tokio::time::Instant::now() + BATCH;
            loop {
                match tokio::time::timeout_at(until, self.events.next()).await {
                    Ok(Some(Ok(event))) => complete = self.cache.apply(event),
                    Ok(Some(Err(e))) => return Err(ClusterError::Watch(e)),
                    Ok(None) => return Err(ClusterError::WatchEnded),
                    Err(_) => break,
                }
            }
            if !complete {
                continue;
            }
            let Snapshot { cluster, left_out } = snapshot(self.cache.nodes(), self.cluster_cidr);
            self.log_left_out(left_out);
            if self.last.as_ref() != Some(&cluster) {
                self.last = Some(cluster.clone());
                return Ok(cluster);
            }
        }
    }
}

/// This node's `NetworkUnavailable` condition as podwire sets it once the datapath is up: False,
/// reason [`NETWORK_AVAILABLE_REASON`], as Calico and Flannel set it. Strategic merge patches
/// merge conditions by type, so the kubelet's own conditions stay.
pub fn network_available_patch(now: k8s_openapi::jiff::Timestamp) -> serde_json::Value {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    let condition = NodeCondition {
        type_: "NetworkUnavailable".into(),
        status: "False".into(),
        reason: Some(NETWORK_AVAILABLE_REASON.into()),
        message: Some("podwire's datapath is loaded and its node table in sync".into()),
        last_heartbeat_time: Some(Time(now)),
        last_transition_time: Some(Time(now)),
    };
    serde_json::json!({ "status": { "conditions": [condition] } })
}

/// Sets `NetworkUnavailable=False` on the Node `name` (nodes/status, strategic merge patch).
pub async fn mark_network_available(client: Client, name: &str) -> Result<(), KubeError> {
    let patch = network_available_patch(k8s_openapi::jiff::Timestamp::now());
    Api::<Node>::all(client)
        .patch_status(name, &PatchParams::default(), &Patch::Strategic(patch))
        .await
        .map_err(|source| KubeError::Api {
            what: format!("patching the status of Node {name}"),
            source,
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    /// A Node as the API serves it: `spec` and `status.addresses` as given.
    fn node(name: &str, spec: serde_json::Value, addresses: serde_json::Value) -> Node {
        serde_json::from_value(json!({
            "metadata": { "name": name },
            "spec": spec,
            "status": { "addresses": addresses },
        }))
        .unwrap()
    }

    fn internal(ip: &str) -> serde_json::Value {
        json!([{ "type": "Hostname", "address": "h" }, { "type": "InternalIP", "address": ip }])
    }

    fn info(name: &str, last: u8, cidr: &str) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            address: Ipv4Addr::new(192, 168, 77, last),
            pod_cidr: net(cidr),
        }
    }

    #[test]
    fn a_node_is_its_first_ipv4_internal_ip_and_pod_cidr() {
        let plain = node(
            "a",
            json!({ "podCIDR": "10.244.1.0/24" }),
            internal("192.168.77.1"),
        );
        assert_eq!(node_info(&plain), Ok(info("a", 1, "10.244.1.0/24")));
        // Dual stack: the IPv6 entries are skipped, podCIDRs wins over podCIDR.
        let dual = node(
            "b",
            json!({ "podCIDR": "fd00::/64", "podCIDRs": ["fd00::/64", "10.244.2.0/24"] }),
            json!([
                { "type": "ExternalIP", "address": "1.2.3.4" },
                { "type": "InternalIP", "address": "fd00::2" },
                { "type": "InternalIP", "address": "192.168.77.2" },
            ]),
        );
        assert_eq!(node_info(&dual), Ok(info("b", 2, "10.244.2.0/24")));
    }

    #[test]
    fn a_node_without_address_or_pod_cidr_is_not_ready_for_the_table() {
        let fresh = node("a", json!({}), internal("192.168.77.1"));
        assert_eq!(node_info(&fresh), Err(LeftOut::NoPodCidr));
        let v6_only = node(
            "a",
            json!({ "podCIDRs": ["fd00::/64"] }),
            internal("192.168.77.1"),
        );
        assert_eq!(node_info(&v6_only), Err(LeftOut::NoPodCidr));
        let external_only = node(
            "a",
            json!({ "podCIDR": "10.244.1.0/24" }),
            json!([{ "type": "ExternalIP", "address": "192.168.77.1" }]),
        );
        assert_eq!(node_info(&external_only), Err(LeftOut::NoInternalIp));
        let garbage = node("a", json!({ "podCIDR": "ten" }), internal("192.168.77.1"));
        assert_eq!(node_info(&garbage), Err(LeftOut::BadPodCidr("ten".into())));
    }

    #[test]
    fn the_snapshot_keeps_valid_nodes_and_says_why_the_others_are_left_out() {
        let nodes: BTreeMap<String, Result<NodeInfo, LeftOut>> = [
            ("a", Ok(info("a", 1, "10.244.1.0/24"))),
            ("b", Ok(info("b", 2, "10.244.2.0/24"))),
            ("c", Err(LeftOut::NoPodCidr)),
            ("d", Ok(info("d", 1, "10.244.4.0/24"))),
            ("e", Ok(info("e", 5, "10.244.2.0/23"))),
            ("f", Ok(info("f", 6, "10.9.0.0/24"))),
            ("g", Ok(info("g", 7, "10.244.7.1/24"))),
        ]
        .into_iter()
        .map(|(n, i)| (n.to_string(), i))
        .collect();
        let snap = snapshot(&nodes, net("10.244.0.0/16"));
        assert_eq!(
            snap.cluster,
            Cluster {
                cluster_cidr: Some(net("10.244.0.0/16")),
                nodes: vec![info("a", 1, "10.244.1.0/24"), info("b", 2, "10.244.2.0/24")],
            }
        );
        snap.cluster.validate().unwrap();
        let why = |n: &str| snap.left_out[n].to_string();
        assert_eq!(snap.left_out.len(), 5);
        assert!(why("c").contains("no IPv4 podCIDR"), "{}", why("c"));
        assert_eq!(why("d"), "its InternalIP 192.168.77.1 is also a's");
        assert_eq!(
            why("e"),
            "its podCIDR 10.244.2.0/23 overlaps b's 10.244.2.0/24"
        );
        assert!(
            why("f").contains("outside the cluster CIDR"),
            "{}",
            why("f")
        );
        assert!(why("g").contains("host bits"), "{}", why("g"));
    }

    #[test]
    fn a_pod_cidr_inside_or_around_a_taken_one_is_left_out_and_thousands_of_nodes_are_kept() {
        let nodes: BTreeMap<String, Result<NodeInfo, LeftOut>> = [
            ("a", Ok(info("a", 1, "10.244.4.0/24"))),
            ("b", Ok(info("b", 2, "10.244.4.128/25"))),
            ("c", Ok(info("c", 3, "10.244.0.0/21"))),
            ("d", Ok(info("d", 4, "10.244.5.0/24"))),
            ("e", Ok(info("e", 5, "10.244.3.0/24"))),
        ]
        .into_iter()
        .map(|(n, i)| (n.to_string(), i))
        .collect();
        let snap = snapshot(&nodes, net("10.244.0.0/16"));
        let kept: Vec<&str> = snap.cluster.nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(kept, ["a", "d", "e"]);
        assert_eq!(
            snap.left_out["b"].to_string(),
            "its podCIDR 10.244.4.128/25 overlaps a's 10.244.4.0/24"
        );
        assert_eq!(
            snap.left_out["c"].to_string(),
            "its podCIDR 10.244.0.0/21 overlaps a's 10.244.4.0/24"
        );

        let many: BTreeMap<String, Result<NodeInfo, LeftOut>> = (0..5000u32)
            .map(|k| {
                let name = format!("n{k:04}");
                let info = NodeInfo {
                    name: name.clone(),
                    address: Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 1)) + k),
                    pod_cidr: Ipv4Net::new(
                        Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 244, 16, 0)) + 8 * k),
                        29,
                    )
                    .unwrap(),
                };
                (name, Ok(info))
            })
            .collect();
        let snap = snapshot(&many, net("10.244.0.0/16"));
        assert_eq!(snap.cluster.nodes.len(), 5000);
        assert!(snap.left_out.is_empty());
    }

    fn named(name: &str, last: u8) -> Node {
        node(
            name,
            json!({ "podCIDR": format!("10.244.{last}.0/24") }),
            internal(&format!("192.168.77.{last}")),
        )
    }

    #[test]
    fn the_cache_is_complete_only_after_a_list_and_a_relist_replaces_it_whole() {
        let mut cache = NodeCache::default();
        assert!(!cache.apply(Event::Init));
        assert!(!cache.apply(Event::InitApply(named("a", 1))));
        // Watch events before the first list is done do not make it complete.
        assert!(!cache.apply(Event::InitApply(named("b", 2))));
        assert!(cache.apply(Event::InitDone));
        assert_eq!(
            cache.nodes().keys().collect::<Vec<_>>(),
            ["a", "b"],
            "after the first list"
        );
        assert!(cache.apply(Event::Apply(named("c", 3))));
        assert!(cache.apply(Event::Delete(named("a", 1))));
        assert_eq!(cache.nodes().keys().collect::<Vec<_>>(), ["b", "c"]);

        // A relist (410 Gone, or an error): the old view stands until the new one is complete,
        // then what the relist did not see is gone.
        assert!(!cache.apply(Event::Init));
        assert!(!cache.apply(Event::InitApply(named("d", 4))));
        assert_eq!(cache.nodes().keys().collect::<Vec<_>>(), ["b", "c"]);
        assert!(!cache.apply(Event::InitApply(named("c", 9))));
        assert!(cache.apply(Event::InitDone));
        assert_eq!(cache.nodes().keys().collect::<Vec<_>>(), ["c", "d"]);
        assert_eq!(cache.nodes()["c"], Ok(info("c", 9, "10.244.9.0/24")));
    }

    #[test]
    fn the_condition_is_network_available_false_with_podwires_reason() {
        let now: k8s_openapi::jiff::Timestamp = "2026-01-02T03:04:05Z".parse().unwrap();
        assert_eq!(
            network_available_patch(now),
            json!({ "status": { "conditions": [{
                "type": "NetworkUnavailable",
                "status": "False",
                "reason": "PodwireIsUp",
                "message": "podwire's datapath is loaded and its node table in sync",
                "lastHeartbeatTime": "2026-01-02T03:04:05Z",
                "lastTransitionTime": "2026-01-02T03:04:05Z",
            }]}})
        );
    }
}
