//! Opening the node's pinned maps.

use std::io::ErrorKind;

use anyhow::{anyhow, Context as _, Result};
use aya::maps::{Map, MapData, MapError};
use podwire_agent::pins::Pins;

/// The pinned map `name` as `M` (e.g. `HashMap<MapData, [u8; 4], Endpoint>`). The kernel's record
/// of the map's type and key and value sizes must match `M`, so a map pinned by an incompatible
/// agent is refused rather than misread.
pub fn open<M: TryFrom<Map, Error = MapError>>(pins: &Pins, name: &str) -> Result<M> {
    let path = pins.map(name);
    let data = MapData::from_pin(&path).map_err(|e| {
        let kind = match &e {
            MapError::SyscallError(s) => Some(s.io_error.kind()),
            _ => None,
        };
        let root = pins.root().display();
        let hint = match kind {
            Some(ErrorKind::NotFound) => format!(
                "no pinned map at {}: is the podwire agent running on this node with --bpffs {root}, or was it ever started?",
                path.display()
            ),
            // The kernel also answers EACCES for a path that is not a pinned BPF object.
            Some(ErrorKind::PermissionDenied) => format!(
                "cannot open the pinned map {}: run podwire as root on the node, and check that {root} is the agent's --bpffs on a bpf filesystem",
                path.display()
            ),
            _ => format!("opening the pinned map {}", path.display()),
        };
        anyhow!(e).context(hint)
    })?;
    Map::from_map_data(data)
        .and_then(M::try_from)
        .with_context(|| format!("{} is not the map this podwire reads: was it pinned by an incompatible agent version?", path.display()))
}
