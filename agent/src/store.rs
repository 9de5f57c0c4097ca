//! IPAM's store: the node's allocations and the endpoint behind each, in one JSON file written
//! atomically (temporary file, fsync, rename) before any answer that depends on it, so a restart
//! never hands an address out twice.

use std::{
    collections::BTreeMap,
    fs,
    io::{self, Write as _},
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use ipnet::Ipv4Net;
use podwire_core::endpoint::EndpointRecord;
use serde::{Deserialize, Serialize};

/// Errors of reading and writing the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
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
}

/// What the store holds.
#[derive(Debug, Serialize, Deserialize)]
pub struct Allocations {
    pub pod_cidr: Ipv4Net,
    /// Last address handed out: allocation continues after it, so a released address is not
    /// reused until the rest of the range has been.
    pub last: Option<Ipv4Addr>,
    /// Endpoints by attachment key.
    pub endpoints: BTreeMap<String, EndpointRecord>,
}

impl Allocations {
    /// Nothing allocated from `pod_cidr` yet.
    pub fn empty(pod_cidr: Ipv4Net) -> Allocations {
        Allocations {
            pod_cidr,
            last: None,
            endpoints: BTreeMap::new(),
        }
    }
}

/// `state.json` in the agent's state directory.
#[derive(Debug)]
pub struct Store {
    path: PathBuf,
}

impl Store {
    pub fn new(dir: &Path) -> Store {
        Store {
            path: dir.join("state.json"),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io_err(&self) -> impl FnOnce(io::Error) -> StoreError + '_ {
        |source| StoreError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// What the store holds; `None` when nothing was ever stored (its directory is created then).
    pub fn load(&self) -> Result<Option<Allocations>, StoreError> {
        match fs::read(&self.path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|source| StoreError::Corrupt {
                        path: self.path.clone(),
                        source,
                    })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if let Some(dir) = self.path.parent() {
                    fs::create_dir_all(dir).map_err(self.io_err())?;
                }
                Ok(None)
            }
            Err(e) => Err(self.io_err()(e)),
        }
    }

    /// Replaces what the store holds.
    pub fn save(&self, allocations: &Allocations) -> Result<(), StoreError> {
        let tmp = self.path.with_extension("json.tmp");
        let json = serde_json::to_vec_pretty(allocations).expect("allocations serialise");
        let mut file = fs::File::create(&tmp).map_err(self.io_err())?;
        file.write_all(&json)
            .and_then(|()| file.sync_all())
            .map_err(self.io_err())?;
        fs::rename(&tmp, &self.path).map_err(self.io_err())
    }
}
