//! The bpf filesystem the maps and links are pinned in.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use nix::{
    fcntl::{Flock, FlockArg},
    mount::MsFlags,
    sys::statfs,
};
use podwire_core::pins::{Pins, BPFFS};

/// Errors preparing the pin directories.
#[derive(Debug, thiserror::Error)]
pub enum BpffsError {
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

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> BpffsError + '_ {
    move |source| BpffsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Makes sure the root of `pins` lies on a bpffs (mounting one at /sys/fs/bpf if nothing is
/// mounted there, as Cilium does) and creates its directories.
pub fn prepare(pins: &Pins) -> Result<(), BpffsError> {
    // Agents of several nodes on one machine (the demo, the tests) start together: without the
    // lock each could mount its own bpffs over the others'.
    let lock_path = Path::new("/run/podwire-bpffs.lock");
    let lock_file = fs::File::create(lock_path).map_err(io_err(lock_path))?;
    let _lock = Flock::lock(lock_file, FlockArg::LockExclusive)
        .map_err(|(_, e)| io_err(lock_path)(e.into()))?;
    let root = pins.root();
    if !on_bpffs(root)? {
        if !root.starts_with(BPFFS) {
            return Err(BpffsError::NotBpffs(root.to_path_buf()));
        }
        log::info!("no bpffs at {BPFFS}: mounting one");
        nix::mount::mount(
            Some("bpffs"),
            BPFFS,
            Some("bpf"),
            MsFlags::empty(),
            None::<&str>,
        )
        .map_err(BpffsError::Mount)?;
    }
    for dir in [pins.maps_dir(), pins.links_dir()] {
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    }
    Ok(())
}

/// Whether the nearest existing ancestor of `path` is on a bpffs.
fn on_bpffs(path: &Path) -> Result<bool, BpffsError> {
    let existing = path
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    let fs = statfs::statfs(existing).map_err(|e| io_err(existing)(e.into()))?;
    Ok(fs.filesystem_type() == statfs::BPF_FS_MAGIC)
}
