//! `podwire nodes`: the node table, longest prefix first.

use std::net::Ipv4Addr;

use anyhow::Result;
use ipnet::Ipv4Net;
use podwire_common::NodeKind;
use podwire_core::pins::Pins;
use podwire_datapath::{DatapathMap as _, NodeTable};
use serde::Serialize;

use crate::output::Row;

#[derive(Serialize)]
pub struct NodeRow {
    prefix: Ipv4Net,
    /// "remote" (tunnelled to `node`), "local" (this node's pods), "no-node" (dropped), or
    /// "unknown" (written by a newer agent).
    kind: &'static str,
    node: Option<Ipv4Addr>,
}

impl Row for NodeRow {
    const HEADER: &'static [&'static str] = &["PREFIX", "KIND", "NODE"];

    fn cells(&self) -> Vec<String> {
        let node = self.node.map_or_else(|| "-".to_owned(), |n| n.to_string());
        vec![self.prefix.to_string(), self.kind.into(), node]
    }
}

pub fn read(pins: &Pins) -> Result<Vec<NodeRow>> {
    Ok(NodeTable::open(pins)?
        .list()?
        .into_iter()
        .map(|(prefix, entry)| {
            let node = Some(Ipv4Addr::from(entry.addr));
            let (kind, node) = match entry.kind() {
                Some(NodeKind::Remote) => ("remote", node),
                Some(NodeKind::Local) => ("local", node),
                Some(NodeKind::NoNode) => ("no-node", None),
                None => ("unknown", None),
            };
            NodeRow { prefix, kind, node }
        })
        .collect())
}
