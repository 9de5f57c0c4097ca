//! `podwire events`: dropped packets as the datapath reports them on its event ring, live.
//! The ring holds what was dropped while nobody read it (until it filled), so the first lines
//! may be older. One reader at a time: events read by one are gone for another.

use std::{net::Ipv4Addr, os::fd::AsFd as _, time::Duration};

use anyhow::{Context as _, Result};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use podwire_common::Reason;
use podwire_core::pins::Pins;
use podwire_datapath::{DatapathMap as _, DropEvents};
use serde::Serialize;

use crate::output::{self, Format, Row};

#[derive(Serialize)]
pub struct EventRow {
    reason: &'static str,
    ifindex: u32,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    len: u32,
}

impl Row for EventRow {
    const HEADER: &'static [&'static str] = &["REASON", "IFINDEX", "SRC", "DST", "PROTO", "LEN"];

    fn cells(&self) -> Vec<String> {
        vec![
            self.reason.into(),
            format!("ifindex={}", self.ifindex),
            format!("{} -> {}", self.src, self.dst),
            format!("proto={}", self.proto),
            format!("len={}", self.len),
        ]
    }
}

/// Prints drop events as they come, until `count` were printed (if given) or none came for
/// `idle` (if given).
pub fn follow(
    pins: &Pins,
    format: Format,
    count: Option<usize>,
    idle: Option<Duration>,
) -> Result<()> {
    let mut ring = DropEvents::open(pins)?;
    let mut printed = 0;
    loop {
        while let Some(event) = ring.pop()? {
            let reason = Reason::from_u32(event.reason).map_or("unknown", Reason::name);
            let row = EventRow {
                reason,
                ifindex: event.ifindex,
                src: Ipv4Addr::from(event.src),
                dst: Ipv4Addr::from(event.dst),
                proto: event.proto,
                len: event.len,
            };
            output::print_line(format, &row)?;
            printed += 1;
            if count.is_some_and(|c| printed >= c) {
                return Ok(());
            }
        }
        let timeout = idle.map_or(PollTimeout::NONE, |d| {
            PollTimeout::try_from(d.as_millis().min(i32::MAX as u128) as i32)
                .unwrap_or(PollTimeout::MAX)
        });
        let mut fds = [PollFd::new(ring.as_fd(), PollFlags::POLLIN)];
        if poll(&mut fds, timeout).context("waiting for events")? == 0 {
            return Ok(());
        }
    }
}
