//! The agent's persisted state: IPAM from the node's pod CIDR and the endpoint behind each address.
//! Written atomically (temporary file, fsync, rename) before any answer that depends on it, so a
//! restart never hands an address out twice.

use std::{
    collections::BTreeMap,
    fs,
    io::{self, Write as _},
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::{api::Attachment, mac::Mac};

/// Errors of the persisted state and of IPAM.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Reading or writing the state file failed.
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The state file is not valid JSON of the expected shape.
    #[error("{path} is corrupt")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// The node's pod CIDR changed while pods still hold addresses from the old one.
    #[error("{path} holds addresses from pod CIDR {stored}, but this node's pod CIDR is {configured}; drain the node's pods (or remove the file once none are left)")]
    CidrChanged {
        path: PathBuf,
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

/// One pod attachment: its address and, once the plugin has wired it, its interfaces.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRecord {
    pub container_id: String,
    pub ifname: String,
    pub ip: Ipv4Addr,
    pub netns: String,
    /// Set when the plugin registers the wired veth.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wiring: Option<Wiring>,
}

/// The veth pair of a registered endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wiring {
    pub host_ifname: String,
    pub host_mac: Mac,
    pub pod_mac: Mac,
}

#[derive(Debug, Serialize, Deserialize)]
struct Stored {
    pod_cidr: Ipv4Net,
    /// Last address handed out: allocation continues after it, so a released address is not
    /// reused until the rest of the range has been.
    last: Option<Ipv4Addr>,
    endpoints: BTreeMap<String, EndpointRecord>,
}

/// The state, loaded from and saved to one JSON file.
#[derive(Debug)]
pub struct State {
    path: PathBuf,
    stored: Stored,
}

impl State {
    /// Opens `<dir>/state.json`, creating an empty state for `pod_cidr` if there is none.
    pub fn open(dir: &Path, pod_cidr: Ipv4Net) -> Result<State, StateError> {
        let pod_cidr = pod_cidr.trunc();
        if pod_cidr.prefix_len() > 30 {
            return Err(StateError::CidrTooSmall(pod_cidr));
        }
        let path = dir.join("state.json");
        let io_err = |source| StateError::Io {
            path: path.clone(),
            source,
        };
        let stored = match fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice::<Stored>(&bytes).map_err(|source| StateError::Corrupt {
                    path: path.clone(),
                    source,
                })?
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir_all(dir).map_err(io_err)?;
                Stored {
                    pod_cidr,
                    last: None,
                    endpoints: BTreeMap::new(),
                }
            }
            Err(e) => return Err(io_err(e)),
        };
        if stored.pod_cidr != pod_cidr {
            if !stored.endpoints.is_empty() {
                return Err(StateError::CidrChanged {
                    path,
                    stored: stored.pod_cidr,
                    configured: pod_cidr,
                });
            }
            let state = State {
                path,
                stored: Stored {
                    pod_cidr,
                    last: None,
                    endpoints: BTreeMap::new(),
                },
            };
            state.save()?;
            return Ok(state);
        }
        let state = State { path, stored };
        state.save()?;
        Ok(state)
    }

    pub fn pod_cidr(&self) -> Ipv4Net {
        self.stored.pod_cidr
    }

    pub fn get(&self, attachment: &Attachment) -> Option<&EndpointRecord> {
        self.stored.endpoints.get(&attachment.key())
    }

    pub fn endpoints(&self) -> impl Iterator<Item = &EndpointRecord> {
        self.stored.endpoints.values()
    }

    /// The address of `attachment`: the one it already holds, or a newly allocated one (saved
    /// before returning).
    pub fn allocate(
        &mut self,
        attachment: &Attachment,
        netns: &str,
    ) -> Result<Ipv4Addr, StateError> {
        if let Some(existing) = self.get(attachment) {
            return Ok(existing.ip);
        }
        let ip = self.next_free()?;
        self.stored.last = Some(ip);
        self.stored.endpoints.insert(
            attachment.key(),
            EndpointRecord {
                container_id: attachment.container_id.clone(),
                ifname: attachment.ifname.clone(),
                ip,
                netns: netns.to_owned(),
                wiring: None,
            },
        );
        self.save()?;
        Ok(ip)
    }

    /// Records the wiring of an allocated endpoint (saved before returning).
    pub fn set_wiring(
        &mut self,
        attachment: &Attachment,
        wiring: Wiring,
    ) -> Result<(), StateError> {
        if let Some(record) = self.stored.endpoints.get_mut(&attachment.key()) {
            record.wiring = Some(wiring);
            self.save()?;
        }
        Ok(())
    }

    /// Forgets `attachment`, freeing its address (saved before returning).
    pub fn release(
        &mut self,
        attachment: &Attachment,
    ) -> Result<Option<EndpointRecord>, StateError> {
        let removed = self.stored.endpoints.remove(&attachment.key());
        if removed.is_some() {
            self.save()?;
        }
        Ok(removed)
    }

    /// The first free address after the last one handed out, wrapping around. The network,
    /// broadcast and first host address (kept for the node itself) are never handed out.
    fn next_free(&self) -> Result<Ipv4Addr, StateError> {
        let cidr = self.stored.pod_cidr;
        let first = u32::from(cidr.network()) + 2;
        let last = u32::from(cidr.broadcast()) - 1;
        let start = match self.stored.last.map(u32::from) {
            Some(l) if (first..last).contains(&l) => l + 1,
            _ => first,
        };
        let used: std::collections::HashSet<Ipv4Addr> = self.endpoints().map(|e| e.ip).collect();
        (start..=last)
            .chain(first..start)
            .map(Ipv4Addr::from)
            .find(|ip| !used.contains(ip))
            .ok_or(StateError::Exhausted(cidr))
    }

    fn save(&self) -> Result<(), StateError> {
        let io_err = |source| StateError::Io {
            path: self.path.clone(),
            source,
        };
        let tmp = self.path.with_extension("json.tmp");
        let json = serde_json::to_vec_pretty(&self.stored).expect("state serialises");
        let mut file = fs::File::create(&tmp).map_err(io_err)?;
        file.write_all(&json)
            .and_then(|()| file.sync_all())
            .map_err(io_err)?;
        fs::rename(&tmp, &self.path).map_err(io_err)
    }
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
        let mut state = State::open(dir.path(), cidr).unwrap();
        assert_eq!(
            state.allocate(&att("a"), "/ns/a").unwrap(),
            Ipv4Addr::new(10, 244, 1, 2)
        );
        assert_eq!(
            state.allocate(&att("b"), "/ns/b").unwrap(),
            Ipv4Addr::new(10, 244, 1, 3)
        );
        // Asking again for the same attachment returns its address, not a new one.
        assert_eq!(
            state.allocate(&att("a"), "/ns/a").unwrap(),
            Ipv4Addr::new(10, 244, 1, 2)
        );
        drop(state);

        let mut state = State::open(dir.path(), cidr).unwrap();
        assert_eq!(
            state.allocate(&att("c"), "/ns/c").unwrap(),
            Ipv4Addr::new(10, 244, 1, 4)
        );
        // A released address is reused only after the rest of the range.
        state.release(&att("a")).unwrap();
        assert_eq!(
            state.allocate(&att("d"), "/ns/d").unwrap(),
            Ipv4Addr::new(10, 244, 1, 5)
        );
        assert_eq!(
            state.allocate(&att("e"), "/ns/e").unwrap(),
            Ipv4Addr::new(10, 244, 1, 6)
        );
        assert_eq!(
            state.allocate(&att("f"), "/ns/f").unwrap(),
            Ipv4Addr::new(10, 244, 1, 2)
        );
        assert!(matches!(
            state.allocate(&att("g"), "/ns/g"),
            Err(StateError::Exhausted(_))
        ));
    }

    #[test]
    fn refuses_a_changed_cidr_while_addresses_are_held() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = State::open(dir.path(), "10.244.1.0/24".parse().unwrap()).unwrap();
        state.allocate(&att("a"), "/ns/a").unwrap();
        let err = State::open(dir.path(), "10.244.2.0/24".parse().unwrap()).unwrap_err();
        assert!(err.to_string().contains("10.244.1.0/24"), "{err}");
        assert!(matches!(
            State::open(dir.path(), "10.244.1.0/31".parse().unwrap()),
            Err(StateError::CidrTooSmall(_))
        ));
    }
}
