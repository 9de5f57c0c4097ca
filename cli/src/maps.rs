//! Opening the node's pinned maps.

use anyhow::{Context as _, Result};
use aya::maps::{Map, MapData};
use podwire_agent::pins::Pins;

/// The pinned map `name`, wrapped by `wrap` (e.g. `Map::HashMap`).
pub fn open(pins: &Pins, name: &str, wrap: fn(MapData) -> Map) -> Result<Map> {
    let path = pins.map(name);
    let data = MapData::from_pin(&path).with_context(|| {
        format!(
            "no pinned map at {}: is the podwire agent running on this node with --bpffs {}, or was it ever started?",
            path.display(),
            pins.root().display()
        )
    })?;
    Ok(wrap(data))
}
