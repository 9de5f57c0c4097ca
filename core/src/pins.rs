//! Where podwire pins its maps and links in bpffs, so the datapath outlives agent restarts.
//! Every pinned path is defined here; the agent creates them, the CLI and the tests read them.

use std::path::{Path, PathBuf};

/// Where Kubernetes nodes mount bpffs.
pub const BPFFS: &str = "/sys/fs/bpf";
/// Default pin root of one node's agent.
pub const DEFAULT_ROOT: &str = "/sys/fs/bpf/podwire";

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

    /// Directory of the pinned maps.
    pub fn maps_dir(&self) -> PathBuf {
        self.root.join("maps")
    }

    /// Directory of the pinned tc links.
    pub fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }

    /// Pin path of the map named `name` (one of [`crate::object::maps`]).
    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }

    /// Pin path of the tc link of `program` on the interface `iface`.
    pub fn link(&self, program: &str, iface: &str) -> PathBuf {
        self.links_dir().join(format!("{program}-{iface}"))
    }
}
