//! A pod endpoint's life as the agent sees it: an address allocated, the endpoint registered
//! (its map entry written and `from_pod` attached to its host-side veth), checked, released,
//! garbage-collected, and restored when the agent starts again.

use std::{collections::HashSet, net::Ipv4Addr};

use podwire_common::Endpoint;
use podwire_core::{
    api::{ApiError, ErrorKind},
    endpoint::{Attachment, EndpointRecord, VethPair},
    error_chain,
    fault::{self, Injected},
    mac::Mac,
    pins::Pins,
};
use podwire_datapath::{attached, remove_severed_links, AttachError, Datapath, Hook, MapError};
use podwire_netlink::{LinkRef, Netlink, NetlinkError};
use tracing::{debug, info, warn};

use crate::{
    ipam::{Ipam, IpamError},
    overlay::{Overlay, PodMtu, VXLAN_DEV},
    Agent,
};

/// Errors of an endpoint's lifecycle.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    /// Register for an attachment that was never allocated an address.
    #[error("{} has no address: allocate first", .0.key())]
    NotAllocated(Attachment),
    /// The agent has no endpoint for the attachment.
    #[error("the agent has no endpoint for {}", .0.key())]
    Unknown(Attachment),
    /// The attachment was allocated an address but never registered.
    #[error("{} was allocated {ip} but never registered", .attachment.key())]
    NeverRegistered {
        attachment: Attachment,
        ip: Ipv4Addr,
    },
    /// The endpoint map lacks the endpoint's entry.
    #[error("endpoint map has no entry for {0}")]
    NoMapEntry(Ipv4Addr),
    /// The endpoint map's entry differs from what the record calls for.
    #[error("endpoint map entry for {ip} is {got:?}, expected {want:?}")]
    MapEntryDiffers {
        ip: Ipv4Addr,
        got: Endpoint,
        want: Endpoint,
    },
    /// A program is not attached to the endpoint's host-side veth.
    #[error("{program} is not attached to {veth}")]
    NotAttached { program: &'static str, veth: String },
    /// The endpoint's host-side veth does not exist.
    #[error("host-side veth {veth} of {ip}: {errno}")]
    NoHostVeth {
        veth: String,
        ip: Ipv4Addr,
        errno: nix::Error,
    },
    /// Register named another interface than the attachment's own veth (whose name the agent
    /// derives from the attachment, as the plugin does).
    #[error("Register of {} names {got}, but its host-side veth is {want}: refusing to attach to anything else", .attachment.key())]
    NotItsVeth {
        attachment: Attachment,
        got: String,
        want: String,
    },
    /// The interface Register named does not exist.
    #[error("Register of {}: host-side veth {name} does not exist", .attachment.key())]
    NoSuchVeth {
        attachment: Attachment,
        name: String,
    },
    /// The interface Register named is not a veth.
    #[error("Register of {}: {name} is not a veth ({kind})", .attachment.key())]
    NotAVeth {
        attachment: Attachment,
        name: String,
        kind: String,
    },
    /// GC could not remove every stale attachment; those it could are gone.
    #[error("GC removed {removed} stale attachment(s) and failed on {}: {}", .failed.len(), gc_failures(.failed))]
    Gc {
        removed: usize,
        failed: Vec<(Attachment, LifecycleError)>,
    },
    /// IPAM failed.
    #[error(transparent)]
    Ipam(#[from] IpamError),
    /// The endpoint map could not be read or written.
    #[error(transparent)]
    Map(#[from] MapError),
    /// `from_pod` could not be attached or detached.
    #[error(transparent)]
    Attach(#[from] AttachError),
    /// A veth could not be deleted.
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    /// A fault injected for a test (`PODWIRE_FAULT`), in place of a map, attachment or disk
    /// error.
    #[error(transparent)]
    Injected(#[from] Injected),
}

/// Each failed attachment of a GC with its error chain.
fn gc_failures(failed: &[(Attachment, LifecycleError)]) -> String {
    failed
        .iter()
        .map(|(attachment, e)| format!("{}: {}", attachment.key(), error_chain(e)))
        .collect::<Vec<_>>()
        .join("; ")
}

/// What the plugin is told: the whole chain, and whether trying again may help.
impl From<LifecycleError> for ApiError {
    fn from(e: LifecycleError) -> ApiError {
        let kind = match &e {
            LifecycleError::Ipam(IpamError::Exhausted(_)) => ErrorKind::TryAgain,
            LifecycleError::Ipam(_)
            | LifecycleError::Map(_)
            | LifecycleError::Attach(_)
            | LifecycleError::Netlink(_)
            | LifecycleError::Injected(_)
            | LifecycleError::Gc { .. } => ErrorKind::Internal,
            _ => ErrorKind::Invalid,
        };
        ApiError {
            kind,
            message: error_chain(&e),
        }
    }
}

/// An attachment's address, as [`Agent::allocate`] answers it.
#[derive(Debug)]
pub struct Allocation {
    pub ip: Ipv4Addr,
    /// The MTU of its pod's routes off the node, unless the plugin's configuration sets one.
    pub mtu: u32,
    /// The MTU of its pod's link and route to the node's other pods, unless the plugin's
    /// configuration sets one.
    pub local_mtu: u32,
    /// Allocated by this request (not held before).
    pub fresh: bool,
    /// The veth pair it was registered with, if it was.
    pub registered: Option<VethPair>,
}

impl Agent {
    /// Takes over a loaded datapath (with pinned maps) and IPAM, and brings the endpoint map and
    /// the attachments in line with IPAM's records: what they do not know is removed, what they
    /// know is attached with this agent's program.
    pub fn start(
        node: String,
        mut datapath: Datapath,
        ipam: Ipam,
        pins: Pins,
        pod_mtu: PodMtu,
        overlay: Option<Overlay>,
    ) -> Result<Agent, LifecycleError> {
        let netlink = Netlink::connect()?;
        if let Some(overlay) = &overlay {
            for hook in Hook::overlay(VXLAN_DEV) {
                datapath.attach_pinned(hook, &hook.pin(&pins))?;
            }
            match overlay.guard_underlay(&mut datapath, &pins)? {
                Some(mode) => info!(underlay = %overlay.underlay, ?mode, "from_netdev attached"),
                None => info!(underlay = %overlay.underlay, "from_netdev swapped into its link"),
            }
        }
        unpin_severed_links(&pins);
        let known: HashSet<Ipv4Addr> = ipam.records().map(|e| e.ip).collect();
        for (ip, _) in datapath.endpoints.list()? {
            if !known.contains(&ip) {
                info!(%ip, "removing endpoint the state does not know");
                datapath.endpoints.remove(ip)?;
            }
        }
        let mut agent = Agent {
            node,
            datapath,
            ipam,
            pins,
            netlink,
            pod_mtu,
            overlay,
        };
        let records: Vec<EndpointRecord> = agent.ipam.records().cloned().collect();
        for record in records {
            let Some(veth) = &record.veth else {
                // A registration that never completed (the agent died before recording it):
                // what it had wired is not the pod's; the plugin's next ADD wires it anew, DEL
                // or GC releases it.
                let host_ifname = record.attachment().host_ifname();
                if let Err(e) = agent.detach_endpoint(record.ip, &host_ifname) {
                    warn!(ip = %record.ip, veth = %host_ifname, "cannot clear a registration that never completed: {}", error_chain(&e));
                }
                continue;
            };
            match agent.attach_endpoint(record.ip, veth) {
                Ok(()) => debug!(ip = %record.ip, veth = %veth.host_ifname, "endpoint restored"),
                // The pod went away while the agent was down: DEL or GC will release it.
                Err(e) => {
                    warn!(ip = %record.ip, veth = %veth.host_ifname, "cannot restore endpoint: {}", error_chain(&e))
                }
            }
        }
        Ok(agent)
    }

    /// The address of `attachment` (allocated now, or the one it holds) and what the plugin
    /// needs with it.
    pub fn allocate(
        &mut self,
        attachment: &Attachment,
        netns: &str,
        network: Option<&str>,
    ) -> Result<Allocation, LifecycleError> {
        let held = self.ipam.get(attachment).cloned();
        let ip = self.ipam.allocate(attachment, netns, network)?;
        match &held {
            None => info!(container = %attachment.container_id, %ip, "address allocated"),
            Some(_) => info!(container = %attachment.container_id, %ip, "address already held"),
        }
        Ok(Allocation {
            ip,
            mtu: self.pod_mtu.cluster,
            local_mtu: self.pod_mtu.local,
            fresh: held.is_none(),
            registered: held.and_then(|r| r.veth),
        })
    }

    /// Puts the wired veth pair of an allocated attachment into the datapath and records it.
    /// The pair must be the attachment's own: its host side named as the agent derives it from
    /// the attachment, and a veth. If any step fails, nothing of it is left wired.
    pub async fn register(
        &mut self,
        attachment: &Attachment,
        veth: VethPair,
    ) -> Result<(), LifecycleError> {
        let record = self
            .ipam
            .get(attachment)
            .cloned()
            .ok_or_else(|| LifecycleError::NotAllocated(attachment.clone()))?;
        its_own_veth(&self.netlink, attachment, &veth).await?;
        if record.veth.as_ref() == Some(&veth) {
            // Registered with this very pair already: this agent's program swapped in, nothing
            // undone if that fails (the pod is live).
            return self.attach_endpoint(record.ip, &veth);
        }
        // Links pinned under this name belong to an earlier device of the name (an ADD that
        // failed or died half way, a pod that lost its interface).
        self.detach_endpoint(record.ip, &veth.host_ifname)?;
        if let Err(e) = self.wire(attachment, record.ip, &veth) {
            // A map entry or link that the record does not know would outlive the pod.
            if let Err(undo) = self.detach_endpoint(record.ip, &veth.host_ifname) {
                warn!(ip = %record.ip, veth = %veth.host_ifname, "undoing a failed Register: {}", error_chain(&undo));
            }
            return Err(e);
        }
        info!(container = %attachment.container_id, ip = %record.ip, veth = %veth.host_ifname, "endpoint registered");
        Ok(())
    }

    /// Register's steps: the map entry, the links, the record.
    fn wire(
        &mut self,
        attachment: &Attachment,
        ip: Ipv4Addr,
        veth: &VethPair,
    ) -> Result<(), LifecycleError> {
        self.datapath.endpoints.set(ip, endpoint_of(ip, veth)?)?;
        fault::point("agent.register.after-map")?;
        self.attach_hooks(&veth.host_ifname)?;
        fault::point("agent.register.after-attach")?;
        self.ipam.set_veth(attachment, veth.clone())?;
        Ok(())
    }

    /// Forgets `attachment`: map entry, attachment, address; its address, if it had one.
    pub fn release(&mut self, attachment: &Attachment) -> Result<Option<Ipv4Addr>, LifecycleError> {
        let Some(record) = self.ipam.get(attachment).cloned() else {
            return Ok(None);
        };
        // By the derived name: a registration that died before recording its veth has links
        // there too.
        self.detach_endpoint(record.ip, &attachment.host_ifname())?;
        fault::point("agent.release.after-detach")?;
        self.ipam.release(attachment)?;
        info!(container = %attachment.container_id, ip = %record.ip, "endpoint released");
        Ok(Some(record.ip))
    }

    /// The record of `attachment`, after checking the datapath holds what the record says.
    pub fn check(&mut self, attachment: &Attachment) -> Result<EndpointRecord, LifecycleError> {
        let record = self
            .ipam
            .get(attachment)
            .cloned()
            .ok_or_else(|| LifecycleError::Unknown(attachment.clone()))?;
        let veth = record
            .veth
            .as_ref()
            .ok_or_else(|| LifecycleError::NeverRegistered {
                attachment: attachment.clone(),
                ip: record.ip,
            })?;
        let want = endpoint_of(record.ip, veth)?;
        match self.datapath.endpoints.get(record.ip)? {
            None => return Err(LifecycleError::NoMapEntry(record.ip)),
            Some(got) if got != want => {
                return Err(LifecycleError::MapEntryDiffers {
                    ip: record.ip,
                    got,
                    want,
                })
            }
            Some(_) => {}
        }
        // With TCX links and with netlink filters (kernels before 6.6) alike.
        for hook in Hook::pod(&veth.host_ifname) {
            if !attached(hook, &self.pins)? {
                return Err(LifecycleError::NotAttached {
                    program: hook.program,
                    veth: veth.host_ifname.clone(),
                });
            }
        }
        Ok(record)
    }

    /// Removes every attachment not in `valid`, with its host-side veth; returns those removed.
    /// It goes on past an attachment it cannot remove, and then fails naming each of those
    /// (kept, for the next GC).
    pub async fn gc(
        &mut self,
        valid: Vec<Attachment>,
        network: Option<&str>,
    ) -> Result<Vec<Attachment>, LifecycleError> {
        let valid: HashSet<Attachment> = valid.into_iter().collect();
        let stale: Vec<Attachment> = self
            .ipam
            .records()
            // The runtime's list names only this network's attachments: another network's (or,
            // for a named network, one recorded before networks were) are not its to collect.
            .filter(|r| r.network.as_deref() == network)
            .map(EndpointRecord::attachment)
            .filter(|a| !valid.contains(a))
            .collect();
        let mut removed = Vec::new();
        let mut failed = Vec::new();
        for attachment in stale {
            match self.collect(&attachment).await {
                Ok(()) => {
                    info!(container = %attachment.container_id, ifname = %attachment.ifname, "garbage-collected");
                    removed.push(attachment);
                }
                Err(e) => {
                    warn!(container = %attachment.container_id, ifname = %attachment.ifname, "cannot garbage-collect: {}", error_chain(&e));
                    failed.push((attachment, e));
                }
            }
        }
        unpin_severed_links(&self.pins);
        if failed.is_empty() {
            Ok(removed)
        } else {
            Err(LifecycleError::Gc {
                removed: removed.len(),
                failed,
            })
        }
    }

    /// Removes one stale attachment: its veth (by the derived name, which one never registered
    /// has too if the plugin made it), map entry, links and address.
    async fn collect(&mut self, attachment: &Attachment) -> Result<(), LifecycleError> {
        self.netlink.delete_link(&attachment.host_ifname()).await?;
        fault::point("agent.gc.after-veth-delete")?;
        self.release(attachment)?;
        Ok(())
    }

    /// Writes the endpoint map entry of `ip` and attaches `from_pod` and `to_pod` to the host
    /// side of `veth`.
    fn attach_endpoint(&mut self, ip: Ipv4Addr, veth: &VethPair) -> Result<(), LifecycleError> {
        self.datapath.endpoints.set(ip, endpoint_of(ip, veth)?)?;
        self.attach_hooks(&veth.host_ifname)
    }

    /// Attaches `from_pod` and `to_pod` to `host_ifname`, their links pinned.
    fn attach_hooks(&mut self, host_ifname: &str) -> Result<(), LifecycleError> {
        for hook in Hook::pod(host_ifname) {
            self.datapath.attach_pinned(hook, &hook.pin(&self.pins))?;
        }
        Ok(())
    }

    /// Removes the map entry of `ip` and the pinned attachments on `host_ifname`.
    fn detach_endpoint(&mut self, ip: Ipv4Addr, host_ifname: &str) -> Result<(), LifecycleError> {
        self.datapath.endpoints.remove(ip)?;
        for hook in Hook::pod(host_ifname) {
            Datapath::detach_pinned(&hook.pin(&self.pins))?;
        }
        Ok(())
    }
}

/// Unpins the links whose device is gone (a pod's veth deleted while the agent was down, or by
/// GC), which nothing else would free; a failure is only logged, as it costs a pin, not a pod.
fn unpin_severed_links(pins: &Pins) {
    match remove_severed_links(pins) {
        Ok(removed) if !removed.is_empty() => {
            info!(count = removed.len(), "unpinned links whose device is gone")
        }
        Ok(_) => {}
        Err(e) => warn!("unpinning links whose device is gone: {}", error_chain(&e)),
    }
}

/// Checks that `veth`, named in a Register of `attachment`, is the attachment's own: a Register
/// naming the node's uplink would put `from_pod` on it, which drops the node's traffic as
/// spoofed.
async fn its_own_veth(
    netlink: &Netlink,
    attachment: &Attachment,
    veth: &VethPair,
) -> Result<(), LifecycleError> {
    let want = attachment.host_ifname();
    if veth.host_ifname != want {
        return Err(LifecycleError::NotItsVeth {
            attachment: attachment.clone(),
            got: veth.host_ifname.clone(),
            want,
        });
    }
    match netlink.link(LinkRef::Name(&want)).await? {
        None => Err(LifecycleError::NoSuchVeth {
            attachment: attachment.clone(),
            name: want,
        }),
        Some(link) if !link.is_veth() => Err(LifecycleError::NotAVeth {
            attachment: attachment.clone(),
            name: want,
            kind: link
                .kind
                .map_or_else(|| "a device with a driver".into(), |k| format!("{k:?}")),
        }),
        Some(_) => Ok(()),
    }
}

/// The endpoint map entry `veth` calls for: its host side's ifindex as it is now, and both MACs.
pub fn endpoint_of(ip: Ipv4Addr, veth: &VethPair) -> Result<Endpoint, LifecycleError> {
    let ifindex = nix::net::if_::if_nametoindex(veth.host_ifname.as_str()).map_err(|errno| {
        LifecycleError::NoHostVeth {
            veth: veth.host_ifname.clone(),
            ip,
            errno,
        }
    })?;
    let Mac(pod_mac) = veth.pod_mac;
    let Mac(host_mac) = veth.host_mac;
    Ok(Endpoint {
        ifindex,
        flags: 0,
        pod_mac,
        host_mac,
    })
}
