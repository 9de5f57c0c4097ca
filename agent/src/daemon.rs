//! The node daemon: owns the datapath's endpoint map and pinned links, and the persisted IPAM
//! state, and answers the CNI plugin's requests on a Unix socket.

use std::{net::Ipv4Addr, path::Path, sync::Arc};

use anyhow::Context as _;
use ipnet::Ipv4Net;
use podwire_common::{node_flags, Endpoint, NodeEntry};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::Mutex,
};
use tracing::{debug, info, warn};

use crate::{
    api::{ApiError, Attachment, ErrorKind, Reply, Request},
    cluster::{Cluster, NodeInfo},
    datapath::{self, Datapath, DatapathError, Hook},
    overlay::{self, VXLAN_DEV},
    pins::Pins,
    state::{EndpointRecord, State, StateError, Wiring},
    wiring,
};

/// The daemon's state, behind one lock: requests are short and must not interleave.
pub struct Daemon {
    node: String,
    datapath: Datapath,
    state: State,
    pins: Pins,
    netlink: rtnetlink::Handle,
    /// MTU handed to pods whose plugin configuration sets none.
    pod_mtu: u32,
    overlay: Option<OverlayNode>,
}

/// This node in the overlay.
pub struct OverlayNode {
    /// The node's underlay address (from the cluster description).
    pub address: Ipv4Addr,
    /// ifindex of the VXLAN device.
    pub vxlan_index: u32,
}

impl From<DatapathError> for ApiError {
    fn from(e: DatapathError) -> ApiError {
        ApiError {
            kind: ErrorKind::Internal,
            message: error_chain(&e),
        }
    }
}

impl From<StateError> for ApiError {
    fn from(e: StateError) -> ApiError {
        let kind = match e {
            StateError::Exhausted(_) => ErrorKind::TryAgain,
            _ => ErrorKind::Internal,
        };
        ApiError {
            kind,
            message: error_chain(&e),
        }
    }
}

/// `error: cause: cause`, for answers that cross the socket.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    message
}

fn invalid(message: String) -> ApiError {
    ApiError {
        kind: ErrorKind::Invalid,
        message,
    }
}

impl Daemon {
    /// Takes over a loaded datapath (with pinned maps) and the state, and brings the map and the
    /// attachments in line with the state: what the state does not know is removed, what it knows
    /// is attached with this agent's program.
    pub async fn start(
        node: String,
        mut datapath: Datapath,
        state: State,
        pins: Pins,
        pod_mtu: u32,
        overlay: Option<OverlayNode>,
    ) -> anyhow::Result<Daemon> {
        let (connection, netlink, _) = rtnetlink::new_connection()?;
        tokio::spawn(connection);
        if overlay.is_some() {
            for hook in Hook::overlay(VXLAN_DEV) {
                datapath.attach_pinned(hook, &pins.link(hook))?;
            }
        }
        let known: std::collections::HashSet<Ipv4Addr> = state.endpoints().map(|e| e.ip).collect();
        for (ip, _) in datapath.endpoints()? {
            if !known.contains(&ip) {
                info!(%ip, "removing endpoint the state does not know");
                datapath.remove_endpoint(ip)?;
            }
        }
        let mut daemon = Daemon {
            node,
            datapath,
            state,
            pins,
            netlink,
            pod_mtu,
            overlay,
        };
        let records: Vec<EndpointRecord> = daemon.state.endpoints().cloned().collect();
        for record in records {
            let Some(wiring) = &record.wiring else {
                continue;
            };
            match daemon.wire(record.ip, wiring) {
                Ok(()) => debug!(ip = %record.ip, veth = %wiring.host_ifname, "endpoint restored"),
                // The pod went away while the agent was down: DEL or GC will release it.
                Err(e) => {
                    warn!(ip = %record.ip, veth = %wiring.host_ifname, "cannot restore endpoint: {}", e.message)
                }
            }
        }
        Ok(daemon)
    }

    /// Serves requests on `listener` until the task is dropped.
    pub async fn serve(daemon: Arc<Mutex<Daemon>>, listener: UnixListener) {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let daemon = daemon.clone();
                    tokio::spawn(async move {
                        if let Err(e) = Self::connection(daemon, stream).await {
                            warn!("API connection: {e}");
                        }
                    });
                }
                Err(e) => warn!("accepting on the API socket: {e}"),
            }
        }
    }

    async fn connection(daemon: Arc<Mutex<Daemon>>, stream: UnixStream) -> std::io::Result<()> {
        let (read, mut write) = stream.into_split();
        let mut line = String::new();
        BufReader::new(read).read_line(&mut line).await?;
        let response: Result<Reply, ApiError> = match serde_json::from_str::<Request>(&line) {
            Ok(request) => {
                debug!(?request, "API request");
                let answer = daemon.lock().await.handle(request).await;
                if let Err(e) = &answer {
                    warn!(kind = ?e.kind, "API request failed: {}", e.message);
                }
                answer
            }
            Err(e) => Err(invalid(format!("malformed request: {e}"))),
        };
        let mut out = serde_json::to_string(&response).expect("responses serialise");
        out.push('\n');
        write.write_all(out.as_bytes()).await
    }

    async fn handle(&mut self, request: Request) -> Result<Reply, ApiError> {
        match request {
            Request::Status => Ok(Reply::Status {
                node: self.node.clone(),
                pod_cidr: self.state.pod_cidr(),
            }),
            Request::Allocate { attachment, netns } => {
                let ip = self.state.allocate(&attachment, &netns)?;
                info!(container = %attachment.container_id, %ip, "address allocated");
                Ok(Reply::Allocated {
                    ip,
                    pod_cidr: self.state.pod_cidr(),
                    mtu: self.pod_mtu,
                })
            }
            Request::Register {
                attachment,
                host_ifname,
                host_mac,
                pod_mac,
            } => {
                let record = self.state.get(&attachment).cloned().ok_or_else(|| {
                    invalid(format!(
                        "{} has no address: allocate first",
                        attachment.key()
                    ))
                })?;
                let wiring = Wiring {
                    host_ifname,
                    host_mac,
                    pod_mac,
                };
                if let Err(e) = self.wire(record.ip, &wiring) {
                    self.unwire(record.ip, &wiring.host_ifname)?;
                    return Err(e);
                }
                self.state.set_wiring(&attachment, wiring.clone())?;
                info!(container = %attachment.container_id, ip = %record.ip, veth = %wiring.host_ifname, "endpoint registered");
                Ok(Reply::Registered)
            }
            Request::Release { attachment } => {
                let ip = self.release(&attachment)?;
                Ok(Reply::Released { ip })
            }
            Request::Check { attachment } => self
                .check(&attachment)
                .map(|endpoint| Reply::Checked { endpoint }),
            Request::Gc { valid } => {
                let valid: std::collections::HashSet<Attachment> = valid.into_iter().collect();
                let stale: Vec<Attachment> = self
                    .state
                    .endpoints()
                    .map(|e| Attachment {
                        container_id: e.container_id.clone(),
                        ifname: e.ifname.clone(),
                    })
                    .filter(|a| !valid.contains(a))
                    .collect();
                for attachment in &stale {
                    if let Some(wired) = self.state.get(attachment).and_then(|r| r.wiring.clone()) {
                        wiring::delete_link(&self.netlink, &wired.host_ifname)
                            .await
                            .map_err(|e| ApiError {
                                kind: ErrorKind::Internal,
                                message: e.to_string(),
                            })?;
                    }
                    self.release(attachment)?;
                    info!(container = %attachment.container_id, ifname = %attachment.ifname, "garbage-collected");
                }
                Ok(Reply::Collected { removed: stale })
            }
        }
    }

    /// Brings the node table, the overlay routes and the masquerade rules in line with `cluster`.
    /// Nodes that left lose their entries at once, so traffic to their pods is dropped (counted)
    /// instead of leaving the node.
    pub async fn apply_cluster(&mut self, cluster: &Cluster) -> anyhow::Result<()> {
        let overlay = self.overlay.as_ref().context("no overlay on this node")?;
        let own_cidr = self.state.pod_cidr();
        let mut want: Vec<(Ipv4Net, NodeEntry)> = Vec::new();
        if let Some(cidr) = cluster.cluster_cidr {
            want.push((
                cidr,
                NodeEntry {
                    addr: [0; 4],
                    flags: node_flags::NO_NODE,
                },
            ));
        }
        want.push((
            own_cidr,
            NodeEntry {
                addr: overlay.address.octets(),
                flags: node_flags::LOCAL,
            },
        ));
        let remote: Vec<&NodeInfo> = cluster
            .nodes
            .iter()
            .filter(|n| n.address != overlay.address)
            .collect();
        for node in &remote {
            let entry = NodeEntry {
                addr: node.address.octets(),
                flags: 0,
            };
            want.push((node.pod_cidr, entry));
            // Pods reach other nodes' own addresses through the tunnel too, so their replies,
            // which come back through it, match what was sent.
            want.push((Ipv4Net::from(node.address), entry));
        }
        let have = self.datapath.nodes()?;
        for (net, _) in &have {
            if !want.iter().any(|(w, _)| w == net) {
                self.datapath.remove_node(*net)?;
            }
        }
        for (net, entry) in &want {
            if !have.contains(&(*net, *entry)) {
                self.datapath.set_node(*net, *entry)?;
            }
        }
        let remote_cidrs: Vec<Ipv4Net> = remote.iter().map(|n| n.pod_cidr).collect();
        overlay::sync_routes(
            &self.netlink,
            overlay.vxlan_index,
            overlay.address,
            &remote_cidrs,
        )
        .await?;
        let pod_ranges = match cluster.cluster_cidr {
            Some(cidr) => vec![cidr],
            None => cluster.nodes.iter().map(|n| n.pod_cidr).collect(),
        };
        overlay::sync_masquerade(own_cidr, &pod_ranges)?;
        info!(
            nodes = cluster.nodes.len(),
            remote = remote.len(),
            "cluster applied"
        );
        Ok(())
    }

    /// Writes the endpoint map entry and attaches `from_pod` to the host-side veth.
    fn wire(&mut self, ip: Ipv4Addr, wiring: &Wiring) -> Result<(), ApiError> {
        self.datapath.set_endpoint(ip, endpoint_of(ip, wiring)?)?;
        let pin = self.pins.link(Hook::from_pod(&wiring.host_ifname));
        self.datapath
            .attach_pinned(Hook::from_pod(&wiring.host_ifname), &pin)?;
        Ok(())
    }

    /// Removes the map entry of `ip` and the pinned attachment on `host_ifname`.
    fn unwire(&mut self, ip: Ipv4Addr, host_ifname: &str) -> Result<(), ApiError> {
        self.datapath.remove_endpoint(ip)?;
        Datapath::detach_pinned(&self.pins.link(Hook::from_pod(host_ifname)))?;
        Ok(())
    }

    fn release(&mut self, attachment: &Attachment) -> Result<Option<Ipv4Addr>, ApiError> {
        let Some(record) = self.state.get(attachment).cloned() else {
            return Ok(None);
        };
        if let Some(wiring) = &record.wiring {
            self.unwire(record.ip, &wiring.host_ifname)?;
        } else {
            self.datapath.remove_endpoint(record.ip)?;
        }
        self.state.release(attachment)?;
        info!(container = %attachment.container_id, ip = %record.ip, "endpoint released");
        Ok(Some(record.ip))
    }

    /// The record of `attachment`, after checking the datapath holds what the record says.
    fn check(&mut self, attachment: &Attachment) -> Result<EndpointRecord, ApiError> {
        let record = self.state.get(attachment).cloned().ok_or_else(|| {
            invalid(format!(
                "the agent has no endpoint for {}",
                attachment.key()
            ))
        })?;
        let wiring = record.wiring.as_ref().ok_or_else(|| {
            invalid(format!(
                "{} was allocated {} but never registered",
                attachment.key(),
                record.ip
            ))
        })?;
        let want = endpoint_of(record.ip, wiring)?;
        match self.datapath.endpoint(record.ip)? {
            None => {
                return Err(invalid(format!(
                    "endpoint map has no entry for {}",
                    record.ip
                )))
            }
            Some(got) if got != want => {
                return Err(invalid(format!(
                    "endpoint map entry for {} is {got:?}, expected {want:?}",
                    record.ip
                )))
            }
            Some(_) => {}
        }
        let pin = self.pins.link(Hook::from_pod(&wiring.host_ifname));
        if datapath::tcx_supported() && !pin.exists() {
            return Err(invalid(format!(
                "from_pod is not attached to {} (no link at {})",
                wiring.host_ifname,
                pin.display()
            )));
        }
        Ok(record)
    }
}

/// The endpoint map entry `wiring` calls for: the host-side veth's ifindex as it is now, and
/// both MACs.
fn endpoint_of(ip: Ipv4Addr, wiring: &Wiring) -> Result<Endpoint, ApiError> {
    let ifindex = nix::net::if_::if_nametoindex(wiring.host_ifname.as_str()).map_err(|e| {
        invalid(format!(
            "host-side veth {} of {ip}: {e}",
            wiring.host_ifname
        ))
    })?;
    Ok(Endpoint {
        ifindex,
        flags: 0,
        pod_mac: wiring.pod_mac.0,
        host_mac: wiring.host_mac.0,
    })
}

/// Binds the API socket at `path`, replacing a stale one left by a previous run. Only root may
/// connect: the API hands out addresses and deletes interfaces.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}
