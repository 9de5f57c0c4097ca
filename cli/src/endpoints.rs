//! `podwire endpoints`: the endpoint map.

use std::net::Ipv4Addr;

use anyhow::Result;
use podwire_core::{mac::Mac, pins::Pins};
use podwire_datapath::{DatapathMap as _, Endpoints};
use serde::Serialize;

use crate::output::Row;

#[derive(Serialize)]
pub struct EndpointRow {
    ip: Ipv4Addr,
    ifindex: u32,
    host_veth: String,
    pod_mac: Mac,
    host_mac: Mac,
}

impl Row for EndpointRow {
    const HEADER: &'static [&'static str] = &["IP", "IFINDEX", "HOST VETH", "POD MAC", "HOST MAC"];

    fn cells(&self) -> Vec<String> {
        vec![
            self.ip.to_string(),
            self.ifindex.to_string(),
            self.host_veth.clone(),
            self.pod_mac.to_string(),
            self.host_mac.to_string(),
        ]
    }
}

pub fn read(pins: &Pins) -> Result<Vec<EndpointRow>> {
    Ok(Endpoints::open(pins)?
        .list()?
        .into_iter()
        .map(|(ip, ep)| EndpointRow {
            ip,
            ifindex: ep.ifindex,
            // Names resolve in this process's network namespace: run it in the node's.
            // nix 0.29 misses libc's NULL return and hands back "" for an unknown ifindex.
            host_veth: nix::net::if_::if_indextoname(ep.ifindex)
                .ok()
                .and_then(|n| n.into_string().ok())
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| "-".into()),
            pod_mac: Mac(ep.pod_mac),
            host_mac: Mac(ep.host_mac),
        })
        .collect())
}
