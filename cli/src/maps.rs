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
    let (shown, root) = (path.display(), pins.root().display());
    let data = MapData::from_pin(&path).map_err(|e| {
        let hint = match &e {
            MapError::SyscallError(s) if s.io_error.kind() == ErrorKind::NotFound => format!(
                "no pinned map at {shown}: \
                 is the podwire agent running on this node with --bpffs {root}, or was it ever started?"
            ),
            // The kernel also answers EACCES for a path that is not a pinned BPF object.
            MapError::SyscallError(s) if s.io_error.kind() == ErrorKind::PermissionDenied => format!(
                "cannot open the pinned map {shown}: run podwire as root on the node, \
                 and check that {root} is the agent's --bpffs on a bpf filesystem"
            ),
            _ => format!("opening the pinned map {shown}"),
        };
        anyhow!(e).context(hint)
    })?;
    Map::from_map_data(data).and_then(M::try_from).with_context(|| {
        format!("{shown} is not the map this podwire reads: was it pinned by an incompatible agent version?")
    })
}
