//! Where podwire pins its maps and links in bpffs, so the datapath outlives agent restarts.
//! Every pinned path is defined here.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use nix::{
    fcntl::{Flock, FlockArg},
    mount::MsFlags,
    sys::statfs,
};
use tracing::info;

use crate::datapath::Hook;

/// Where Kubernetes nodes mount bpffs.
pub const BPFFS: &str = "/sys/fs/bpf";
/// Default pin root of one node's agent.
pub const DEFAULT_ROOT: &str = "/sys/fs/bpf/podwire";

/// Errors preparing the pin directories.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    /// The pin root is not on a bpffs and is not below /sys/fs/bpf, where one could be mounted.
    #[error("{0} is not on a bpf filesystem: mount one (mount -t bpf bpffs <dir>) or choose a path below /sys/fs/bpf")]
    NotBpffs(PathBuf),
    /// Mounting bpffs at /sys/fs/bpf failed.
    #[error("mounting bpffs at {BPFFS}")]
    Mount(#[source] nix::Error),
    /// A directory could not be created or inspected.
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The pin layout below one root: `maps/<MAP>` and `links/<program>-<interface>`.
#[derive(Clone, Debug)]
pub struct Pins {
    root: PathBuf,
}

impl Pins {
    pub fn new(root: impl Into<PathBuf>) -> Pins {
        Pins { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Pin path of the map named `name`.
    pub fn map(&self, name: &str) -> PathBuf {
        self.root.join("maps").join(name)
    }

    /// Pin path of the tc link of `hook` (a program on an interface).
    pub fn link(&self, hook: Hook<'_>) -> PathBuf {
        self.root
            .join("links")
            .join(format!("{}-{}", hook.program, hook.iface))
    }

    /// Makes sure the root lies on a bpffs (mounting one at /sys/fs/bpf if nothing is mounted
    /// there, as Cilium does) and creates the directories.
    pub fn prepare(&self) -> Result<(), PinError> {
        // Agents of several nodes on one machine (the demo, the tests) start together: without
        // the lock each could mount its own bpffs over the others'.
        let lock_path = Path::new("/run/podwire-bpffs.lock");
        let lock_file = fs::File::create(lock_path).map_err(|source| PinError::Io {
            path: lock_path.to_path_buf(),
            source,
        })?;
        let _lock =
            Flock::lock(lock_file, FlockArg::LockExclusive).map_err(|(_, e)| PinError::Io {
                path: lock_path.to_path_buf(),
                source: e.into(),
            })?;
        if !Self::on_bpffs(&self.root)? {
            if !self.root.starts_with(BPFFS) {
                return Err(PinError::NotBpffs(self.root.clone()));
            }
            info!("no bpffs at {BPFFS}: mounting one");
            nix::mount::mount(
                Some("bpffs"),
                BPFFS,
                Some("bpf"),
                MsFlags::empty(),
                None::<&str>,
            )
            .map_err(PinError::Mount)?;
        }
        for dir in [self.root.join("maps"), self.root.join("links")] {
            fs::create_dir_all(&dir).map_err(|source| PinError::Io {
                path: dir.clone(),
                source,
            })?;
        }
        Ok(())
    }

    /// Whether the nearest existing ancestor of `path` is on a bpffs.
    fn on_bpffs(path: &Path) -> Result<bool, PinError> {
        let existing = path
            .ancestors()
            .find(|p| p.exists())
            .unwrap_or(Path::new("/"));
        let fs = statfs::statfs(existing).map_err(|e| PinError::Io {
            path: existing.to_path_buf(),
            source: e.into(),
        })?;
        Ok(fs.filesystem_type() == statfs::BPF_FS_MAGIC)
    }
}
