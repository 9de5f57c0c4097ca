//! IPAM: pod addresses from the node's pod CIDR, one per container attachment, kept in the
//! [`Store`] before they are handed out.

use std::{collections::HashSet, net::Ipv4Addr, path::Path};

use ipnet::Ipv4Net;
use podwire_core::endpoint::{Attachment, EndpointRecord, VethPair};

use crate::store::{Allocations, Store, StoreError};

/// Errors of IPAM.
#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    /// The store could not be read or written.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The node's pod CIDR changed while pods still hold addresses from the old one.
    #[error("{path} holds addresses from pod CIDR {stored}, but this node's pod CIDR is {configured}; drain the node's pods (or remove the file once none are left)")]
    CidrChanged {
        path: String,
        stored: Ipv4Net,
        configured: Ipv4Net,
    },
    /// The pod CIDR is too small to leave any address for pods.
    #[error("pod CIDR {0} has no addresses for pods (it needs at least a /30)")]
    CidrTooSmall(Ipv4Net),
    /// Every address of the pod CIDR is in use.
    #[error("no free address left in pod CIDR {0}")]
    Exhausted(Ipv4Net),
}

/// The node's address allocations, as stored.
#[derive(Debug)]
pub struct Ipam {
    store: Store,
    allocations: Allocations,
}

impl Ipam {
    /// Opens the store in `dir`, starting empty for `pod_cidr` if it holds nothing (or nothing
    /// from another CIDR).
    pub fn open(dir: &Path, pod_cidr: Ipv4Net) -> Result<Ipam, IpamError> {
        let pod_cidr = pod_cidr.trunc();
        if pod_cidr.prefix_len() > 30 {
            return Err(IpamError::CidrTooSmall(pod_cidr));
        }
        let store = Store::new(dir);
        let allocations = match store.load()? {
            Some(stored) if stored.pod_cidr == pod_cidr => stored,
            Some(stored) if !stored.endpoints.is_empty() => {
                return Err(IpamError::CidrChanged {
                    path: store.path().display().to_string(),
                    stored: stored.pod_cidr,
                    configured: pod_cidr,
                })
            }
            _ => Allocations::empty(pod_cidr),
        };
        store.save(&allocations)?;
        Ok(Ipam { store, allocations })
    }

    pub fn pod_cidr(&self) -> Ipv4Net {
        self.allocations.pod_cidr
    }

    pub fn get(&self, attachment: &Attachment) -> Option<&EndpointRecord> {
        self.allocations.endpoints.get(&attachment.key())
    }

    pub fn records(&self) -> impl Iterator<Item = &EndpointRecord> {
        self.allocations.endpoints.values()
    }

    /// The address of `attachment`: the one it already holds, or a newly allocated one (stored
    /// before returning).
    pub fn allocate(
        &mut self,
        attachment: &Attachment,
        netns: &str,
    ) -> Result<Ipv4Addr, IpamError> {
        if let Some(existing) = self.get(attachment) {
            return Ok(existing.ip);
        }
        let used: HashSet<Ipv4Addr> = self.records().map(|e| e.ip).collect();
        let ip = next_free(self.allocations.pod_cidr, self.allocations.last, &used)?;
        self.allocations.last = Some(ip);
        self.allocations.endpoints.insert(
            attachment.key(),
            EndpointRecord {
                container_id: attachment.container_id.clone(),
                ifname: attachment.ifname.clone(),
                ip,
                netns: netns.to_owned(),
                veth: None,
            },
        );
        self.store.save(&self.allocations)?;
        Ok(ip)
    }

    /// Records the veth pair of an allocated endpoint (stored before returning).
    pub fn set_veth(&mut self, attachment: &Attachment, veth: VethPair) -> Result<(), IpamError> {
        if let Some(record) = self.allocations.endpoints.get_mut(&attachment.key()) {
            record.veth = Some(veth);
            self.store.save(&self.allocations)?;
        }
        Ok(())
    }

    /// Forgets `attachment`, freeing its address (stored before returning).
    pub fn release(
        &mut self,
        attachment: &Attachment,
    ) -> Result<Option<EndpointRecord>, IpamError> {
        let removed = self.allocations.endpoints.remove(&attachment.key());
        if removed.is_some() {
            self.store.save(&self.allocations)?;
        }
        Ok(removed)
    }
}

/// The first address of `cidr` not in `used` after `last`, wrapping around. The network,
/// broadcast and first host address (kept for the node itself) are never handed out.
fn next_free(
    cidr: Ipv4Net,
    last: Option<Ipv4Addr>,
    used: &HashSet<Ipv4Addr>,
) -> Result<Ipv4Addr, IpamError> {
    let first = u32::from(cidr.network()) + 2;
    let end = u32::from(cidr.broadcast()) - 1;
    let start = match last.map(u32::from) {
        Some(l) if (first..end).contains(&l) => l + 1,
        _ => first,
    };
    (start..=end)
        .chain(first..start)
        .map(Ipv4Addr::from)
        .find(|ip| !used.contains(ip))
        .ok_or(IpamError::Exhausted(cidr))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn att(id: &str) -> Attachment {
        Attachment {
            container_id: id.into(),
            ifname: "eth0".into(),
        }
    }

    #[test]
    fn allocates_in_order_skipping_reserved_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let cidr: Ipv4Net = "10.244.1.0/29".parse().unwrap();
        let mut ipam = Ipam::open(dir.path(), cidr).unwrap();
        assert_eq!(
            ipam.allocate(&att("a"), "/ns/a").unwrap(),
            Ipv4Addr::new(10, 244, 1, 2)
        );
        assert_eq!(
            ipam.allocate(&att("b"), "/ns/b").unwrap(),
            Ipv4Addr::new(10, 244, 1, 3)
        );
        // Asking again for the same attachment returns its address, not a new one.
        assert_eq!(
            ipam.allocate(&att("a"), "/ns/a").unwrap(),
            Ipv4Addr::new(10, 244, 1, 2)
        );
        drop(ipam);

        let mut ipam = Ipam::open(dir.path(), cidr).unwrap();
        assert_eq!(
            ipam.allocate(&att("c"), "/ns/c").unwrap(),
            Ipv4Addr::new(10, 244, 1, 4)
        );
        // A released address is reused only after the rest of the range.
        ipam.release(&att("a")).unwrap();
        assert_eq!(
            ipam.allocate(&att("d"), "/ns/d").unwrap(),
            Ipv4Addr::new(10, 244, 1, 5)
        );
        assert_eq!(
            ipam.allocate(&att("e"), "/ns/e").unwrap(),
            Ipv4Addr::new(10, 244, 1, 6)
        );
        assert_eq!(
            ipam.allocate(&att("f"), "/ns/f").unwrap(),
            Ipv4Addr::new(10, 244, 1, 2)
        );
        assert!(matches!(
            ipam.allocate(&att("g"), "/ns/g"),
            Err(IpamError::Exhausted(_))
        ));
    }

    #[test]
    fn refuses_a_changed_cidr_while_addresses_are_held() {
        let dir = tempfile::tempdir().unwrap();
        let mut ipam = Ipam::open(dir.path(), "10.244.1.0/24".parse().unwrap()).unwrap();
        ipam.allocate(&att("a"), "/ns/a").unwrap();
        let err = Ipam::open(dir.path(), "10.244.2.0/24".parse().unwrap()).unwrap_err();
        assert!(err.to_string().contains("10.244.1.0/24"), "{err}");
        assert!(matches!(
            Ipam::open(dir.path(), "10.244.1.0/31".parse().unwrap()),
            Err(IpamError::CidrTooSmall(_))
        ));
    }
}
