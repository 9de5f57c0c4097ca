//! IPAM's store: the node's allocations and the endpoint behind each, in one JSON file written
//! atomically (temporary file, fsync, rename, fsync of the directory) before any answer that
//! depends on it, so a restart never hands an address out twice, and in a directory one agent at
//! a time owns ([`StateLock`]).

use std::{
    collections::BTreeMap,
    fs,
    io::{self, Write as _},
    net::Ipv4Addr,
    os::unix::fs::FileExt as _,
    path::{Path, PathBuf},
};

use ipnet::Ipv4Net;
use nix::{
    errno::Errno,
    fcntl::{Flock, FlockArg},
};
use podwire_core::{endpoint::EndpointRecord, fault};
use serde::{Deserialize, Serialize};

/// Errors of reading and writing the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Reading the state file, or creating its directory, failed.
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Writing the state file failed before it was replaced: what it held still holds.
    #[error("writing {path} failed, nothing changed (is its file system full or read-only?)")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The state file was replaced, but making that durable failed: the new state is what the
    /// node sees now, yet a power cut may bring the old one back.
    #[error("{path} was written, but syncing its directory failed")]
    NotDurable {
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
    /// Another process holds the state directory's lock: two agents serving from one state
    /// would hand out the same addresses.
    #[error("state directory {dir} is in use by another podwire-agent ({holder}); one agent serves a node: stop that one first, or give this one its own --state-dir and --socket")]
    Locked { dir: PathBuf, holder: String },
    /// The state directory's lock file could not be opened or locked.
    #[error("locking {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What the store holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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

/// The exclusive lock of a state directory (`flock` on its file `lock`, which names the holder's
/// pid), held for as long as this value lives and released by the kernel when its process dies,
/// however it dies.
///
/// A second agent does not wait for it but fails at once, naming the holder: a DaemonSet rolling
/// update (maxUnavailable 1, no surge) starts the new agent only after the old one's pod is gone,
/// so a held lock means something a person must look at (a manual run, an agent left over), and
/// the failing container shows why in its log while kubelet retries it with backoff. A manual
/// debug run gets its answer at once instead of hanging with SIGINT unanswered.
#[derive(Debug)]
pub struct StateLock {
    _file: Flock<fs::File>,
}

impl StateLock {
    /// Takes the lock of `dir` (created if missing), or fails with [`StoreError::Locked`].
    pub fn acquire(dir: &Path) -> Result<StateLock, StoreError> {
        let path = dir.join("lock");
        let lock_err = |source: io::Error| StoreError::Lock {
            path: path.clone(),
            source,
        };
        fs::create_dir_all(dir).map_err(lock_err)?;
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(lock_err)?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(file) => {
                let pid = format!("{}\n", std::process::id());
                file.set_len(0)
                    .and_then(|()| file.write_all_at(pid.as_bytes(), 0))
                    .map_err(lock_err)?;
                Ok(StateLock { _file: file })
            }
            Err((_, Errno::EWOULDBLOCK)) => Err(StoreError::Locked {
                dir: dir.to_path_buf(),
                holder: holder(&path),
            }),
            Err((_, errno)) => Err(lock_err(errno.into())),
        }
    }
}

/// Who holds the lock file at `path`, as it says: "pid N" (the holder's pid in its own pid
/// namespace), or why that is unknown.
fn holder(path: &Path) -> String {
    match fs::read_to_string(path) {
        Ok(pid) if pid.trim().parse::<u32>().is_ok() => format!("pid {}", pid.trim()),
        Ok(_) => "pid not recorded yet".into(),
        Err(e) => format!("pid unknown: {e}"),
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

    /// What the store holds; `None` when nothing was ever stored (its directory is created then).
    pub fn load(&self) -> Result<Option<Allocations>, StoreError> {
        let read_err = |source| StoreError::Read {
            path: self.path.clone(),
            source,
        };
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
                    fs::create_dir_all(dir).map_err(read_err)?;
                }
                Ok(None)
            }
            Err(e) => Err(read_err(e)),
        }
    }

    /// Replaces what the store holds. On [`StoreError::Write`] nothing changed; on
    /// [`StoreError::NotDurable`] the new state is in place but may not survive a power cut.
    pub fn save(&self, allocations: &Allocations) -> Result<(), StoreError> {
        let write_err = |source| StoreError::Write {
            path: self.path.clone(),
            source,
        };
        fault::point("agent.store.save").map_err(|e| write_err(io::Error::other(e)))?;
        let tmp = self.path.with_extension("json.tmp");
        let json = serde_json::to_vec_pretty(allocations).expect("allocations serialise");
        let written = fs::File::create(&tmp).and_then(|mut file| {
            file.write_all(&json)?;
            file.sync_all()
        });
        if let Err(e) = written.and_then(|()| fs::rename(&tmp, &self.path)) {
            // Not to leave a partial file taking the space of a full disk.
            let _ = fs::remove_file(&tmp);
            return Err(write_err(e));
        }
        let not_durable = |source| StoreError::NotDurable {
            path: self.path.clone(),
            source,
        };
        fault::point("agent.store.after-rename").map_err(|e| not_durable(io::Error::other(e)))?;
        // The rename is an entry of the directory: durable only once the directory is synced.
        let dir = self.path.parent().unwrap_or(Path::new("."));
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(not_durable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_of_the_same_directory_fails_naming_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let held = StateLock::acquire(dir.path()).unwrap();
        let err = StateLock::acquire(dir.path()).unwrap_err();
        assert!(matches!(err, StoreError::Locked { .. }), "{err:?}");
        assert!(
            err.to_string()
                .contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        drop(held);
        StateLock::acquire(dir.path()).expect("free again once dropped");
    }

    #[test]
    fn a_failed_write_leaves_the_stored_state_and_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let stored = Allocations::empty("10.244.1.0/24".parse().unwrap());
        store.save(&stored).unwrap();
        // The temporary file's name taken by a directory: creating it fails.
        fs::create_dir(dir.path().join("state.json.tmp")).unwrap();
        let mut next = stored.clone();
        next.last = Some(Ipv4Addr::new(10, 244, 1, 2));
        let err = store.save(&next).unwrap_err();
        assert!(matches!(err, StoreError::Write { .. }), "{err:?}");
        assert_eq!(store.load().unwrap(), Some(stored));
    }
}
