//! IPAM: pod addresses from the node's pod CIDR, one per container attachment, kept in the
//! [`Store`] before they are handed out. Every change is made to a copy, stored, and only then
//! taken: a failed save (a full or read-only disk) leaves memory as the disk has it.

use std::{collections::HashSet, net::Ipv4Addr, path::Path};

use ipnet::Ipv4Net;
use podwire_core::endpoint::{Attachment, EndpointRecord, VethPair};

use crate::store::{Allocations, StateLock, Store, StoreError};

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
    /// Every address of the pod CIDR is in use. Transient in the CNI spec's sense (the plugin
    /// answers code 11, try again later): addresses come back as this node's pods are deleted,
    /// and kubelet retries the pod's sandbox with backoff whatever the code; the configuration
    /// is valid (not 7) and no I/O failed (not 5).
    #[error("pod CIDR {0} is full: all {n} of its pod addresses are in use (they are free again as this node's pods are deleted)", n = pod_addresses(*.0))]
    Exhausted(Ipv4Net),
}

/// The node's address allocations, as stored, in a state directory this agent alone owns.
#[derive(Debug)]
pub struct Ipam {
    _lock: StateLock,
    store: Store,
    allocations: Allocations,
}

impl Ipam {
    /// Locks `dir` (failing if another agent holds it: see [`StateLock`]) and opens its store,
    /// starting empty for `pod_cidr` if it holds nothing (or nothing from another CIDR). The
    /// lock is held as long as the `Ipam` lives, so take it before serving anything.
    pub fn open(dir: &Path, pod_cidr: Ipv4Net) -> Result<Ipam, IpamError> {
        Self::open_locked(StateLock::acquire(dir)?, dir, pod_cidr)
    }

    /// [`Ipam::open`] with the lock of `dir` taken already (first thing at startup, before the
    /// agent touches anything of the node).
    pub fn open_locked(lock: StateLock, dir: &Path, pod_cidr: Ipv4Net) -> Result<Ipam, IpamError> {
        let pod_cidr = pod_cidr.trunc();
        if pod_cidr.prefix_len() > 30 {
            return Err(IpamError::CidrTooSmall(pod_cidr));
        }
        let store = Store::new(dir);
        let stored = store.load()?;
        let allocations = match stored.clone() {
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
        // Written only if it differs: an agent restarting on a full disk still starts, and
        // serves what needs no write.
        if stored.as_ref() != Some(&allocations) {
            store.save(&allocations)?;
        }
        Ok(Ipam {
            _lock: lock,
            store,
            allocations,
        })
    }

    /// Stores `next` and takes it as the allocations. Whatever the save did is what memory
    /// holds afterwards: the old allocations if nothing was written, the new ones if the file
    /// was replaced but not made durable (an error still, for the request to fail and be
    /// retried or undone by the runtime).
    fn commit(&mut self, next: Allocations) -> Result<(), IpamError> {
        match self.store.save(&next) {
            Ok(()) => {
                self.allocations = next;
                Ok(())
            }
            Err(e @ StoreError::NotDurable { .. }) => {
                self.allocations = next;
                Err(e.into())
            }
            Err(e) => Err(e.into()),
        }
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
        network: Option<&str>,
    ) -> Result<Ipv4Addr, IpamError> {
        if let Some(existing) = self.get(attachment) {
            return Ok(existing.ip);
        }
        let used: HashSet<Ipv4Addr> = self.records().map(|e| e.ip).collect();
        let ip = next_free(self.allocations.pod_cidr, self.allocations.last, &used)?;
        let mut next = self.allocations.clone();
        next.last = Some(ip);
        next.endpoints.insert(
            attachment.key(),
            EndpointRecord {
                container_id: attachment.container_id.clone(),
                ifname: attachment.ifname.clone(),
                ip,
                netns: netns.to_owned(),
                network: network.map(str::to_owned),
                veth: None,
            },
        );
        self.commit(next)?;
        Ok(ip)
    }

    /// Records the veth pair of an allocated endpoint (stored before returning).
    pub fn set_veth(&mut self, attachment: &Attachment, veth: VethPair) -> Result<(), IpamError> {
        let mut next = self.allocations.clone();
        if let Some(record) = next.endpoints.get_mut(&attachment.key()) {
            record.veth = Some(veth);
            self.commit(next)?;
        }
        Ok(())
    }

    /// Forgets `attachment`, freeing its address (stored before returning).
    pub fn release(
        &mut self,
        attachment: &Attachment,
    ) -> Result<Option<EndpointRecord>, IpamError> {
        let mut next = self.allocations.clone();
        let removed = next.endpoints.remove(&attachment.key());
        if removed.is_some() {
            self.commit(next)?;
        }
        Ok(removed)
    }
}

/// How many addresses of `cidr` pods get: all but the network, broadcast and node addresses.
fn pod_addresses(cidr: Ipv4Net) -> u64 {
    (1u64 << (32 - cidr.prefix_len())).saturating_sub(3)
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
            ipam.allocate(&att("a"), "/ns/a", None).unwrap(),
            Ipv4Addr::new(10, 244, 1, 2)
        );
        assert_eq!(
            ipam.allocate(&att("b"), "/ns/b", None).unwrap(),
            Ipv4Addr::new(10, 244, 1, 3)
        );
        // Asking again for the same attachment returns its address, not a new one.
        assert_eq!(
            ipam.allocate(&att("a"), "/ns/a", None).unwrap(),
            Ipv4Addr::new(10, 244, 1, 2)
        );
        drop(ipam);

        let mut ipam = Ipam::open(dir.path(), cidr).unwrap();
        assert_eq!(
            ipam.allocate(&att("c"), "/ns/c", None).unwrap(),
            Ipv4Addr::new(10, 244, 1, 4)
        );
        // A released address is reused only after the rest of the range.
        ipam.release(&att("a")).unwrap();
        assert_eq!(
            ipam.allocate(&att("d"), "/ns/d", None).unwrap(),
            Ipv4Addr::new(10, 244, 1, 5)
        );
        assert_eq!(
            ipam.allocate(&att("e"), "/ns/e", None).unwrap(),
            Ipv4Addr::new(10, 244, 1, 6)
        );
        assert_eq!(
            ipam.allocate(&att("f"), "/ns/f", None).unwrap(),
            Ipv4Addr::new(10, 244, 1, 2)
        );
        assert!(matches!(
            ipam.allocate(&att("g"), "/ns/g", None),
            Err(IpamError::Exhausted(_))
        ));
    }

    #[test]
    fn refuses_a_changed_cidr_while_addresses_are_held() {
        let dir = tempfile::tempdir().unwrap();
        let mut ipam = Ipam::open(dir.path(), "10.244.1.0/24".parse().unwrap()).unwrap();
        ipam.allocate(&att("a"), "/ns/a", None).unwrap();
        drop(ipam);
        let err = Ipam::open(dir.path(), "10.244.2.0/24".parse().unwrap()).unwrap_err();
        assert!(err.to_string().contains("10.244.1.0/24"), "{err}");
        assert!(matches!(
            Ipam::open(dir.path(), "10.244.1.0/31".parse().unwrap()),
            Err(IpamError::CidrTooSmall(_))
        ));
    }

    #[test]
    fn a_second_open_of_the_same_directory_fails_while_the_first_lives() {
        let dir = tempfile::tempdir().unwrap();
        let cidr: Ipv4Net = "10.244.1.0/24".parse().unwrap();
        let first = Ipam::open(dir.path(), cidr).unwrap();
        let err = Ipam::open(dir.path(), cidr).unwrap_err();
        assert!(
            matches!(err, IpamError::Store(StoreError::Locked { .. })),
            "{err:?}"
        );
        drop(first);
        Ipam::open(dir.path(), cidr).expect("free once the first is gone");
    }

    #[test]
    fn a_failed_save_leaves_memory_as_the_disk_has_it() {
        let dir = tempfile::tempdir().unwrap();
        let cidr: Ipv4Net = "10.244.1.0/24".parse().unwrap();
        let mut ipam = Ipam::open(dir.path(), cidr).unwrap();
        let a = ipam.allocate(&att("a"), "/ns/a", None).unwrap();
        // The temporary file's name taken by a directory: every save fails before writing.
        let blocker = dir.path().join("state.json.tmp");
        std::fs::create_dir(&blocker).unwrap();

        let err = ipam.allocate(&att("b"), "/ns/b", None).unwrap_err();
        assert!(
            matches!(err, IpamError::Store(StoreError::Write { .. })),
            "{err:?}"
        );
        assert!(ipam.get(&att("b")).is_none(), "b holds nothing");
        assert!(ipam.release(&att("a")).is_err());
        assert_eq!(
            ipam.get(&att("a")).map(|r| r.ip),
            Some(a),
            "a still holds {a}"
        );

        std::fs::remove_dir(&blocker).unwrap();
        // The address b did not get is the next one still.
        let b = ipam.allocate(&att("b"), "/ns/b", None).unwrap();
        assert_eq!(b, Ipv4Addr::new(10, 244, 1, 3));
        drop(ipam);
        let ipam = Ipam::open(dir.path(), cidr).unwrap();
        let held: Vec<_> = ipam.records().map(|r| r.ip).collect();
        assert_eq!(held, [a, b]);
    }

    #[test]
    fn exhaustion_names_the_cidr_and_its_size() {
        let cidr: Ipv4Net = "10.244.1.0/29".parse().unwrap();
        assert_eq!(
            IpamError::Exhausted(cidr).to_string(),
            "pod CIDR 10.244.1.0/29 is full: all 5 of its pod addresses are in use (they are \
             free again as this node's pods are deleted)"
        );
    }
}
