//! `podwire nodes`: the node table, longest prefix first.

use std::net::Ipv4Addr;

use anyhow::{Context as _, Result};
use aya::maps::{lpm_trie::LpmTrie, MapData};
use podwire_agent::{datapath::maps::NODES, pins::Pins};
use podwire_common::{node_flags, NodeEntry};
use serde::Serialize;

use crate::output::Row;

#[derive(Serialize)]
pub struct NodeRow {
    prefix: String,
    /// "remote" (tunnelled to `node`), "local" (this node's pods) or "no-node" (dropped).
    kind: &'static str,
    node: Option<Ipv4Addr>,
}

impl Row for NodeRow {
    const HEADER: &'static [&'static str] = &["PREFIX", "KIND", "NODE"];

    fn cells(&self) -> Vec<String> {
        let node = self.node.map_or_else(|| "-".to_owned(), |n| n.to_string());
        vec![self.prefix.clone(), self.kind.into(), node]
    }
}

pub fn read(pins: &Pins) -> Result<Vec<NodeRow>> {
    let map: LpmTrie<MapData, [u8; 4], NodeEntry> = crate::maps::open(pins, NODES)?;
    let mut rows = Vec::new();
    for entry in map.iter() {
        let (key, node) = entry.context("reading the node table")?;
        let (kind, owner) = match node.flags {
            f if f & node_flags::NO_NODE != 0 => ("no-node", None),
            f if f & node_flags::LOCAL != 0 => ("local", Some(Ipv4Addr::from(node.addr))),
            _ => ("remote", Some(Ipv4Addr::from(node.addr))),
        };
        rows.push((
            key.prefix_len(),
            Ipv4Addr::from(key.data()),
            NodeRow {
                prefix: format!("{}/{}", Ipv4Addr::from(key.data()), key.prefix_len()),
                kind,
                node: owner,
            },
        ));
    }
    rows.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    Ok(rows.into_iter().map(|(_, _, row)| row).collect())
}
