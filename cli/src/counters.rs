//! `podwire counters`: verdicts per reason.

use anyhow::Result;
use podwire_core::pins::Pins;
use podwire_datapath::{Counters, DatapathMap as _};
use serde::Serialize;

use crate::output::Row;

#[derive(Serialize)]
pub struct CounterRow {
    reason: &'static str,
    verdict: &'static str,
    packets: u64,
    bytes: u64,
}

impl Row for CounterRow {
    const HEADER: &'static [&'static str] = &["REASON", "VERDICT", "PACKETS", "BYTES"];

    fn cells(&self) -> Vec<String> {
        vec![
            self.reason.into(),
            self.verdict.into(),
            self.packets.to_string(),
            self.bytes.to_string(),
        ]
    }
}

pub fn read(pins: &Pins, nonzero: bool) -> Result<Vec<CounterRow>> {
    Ok(Counters::open(pins)?
        .all()?
        .into_iter()
        .filter(|(_, counter)| !nonzero || counter.packets > 0)
        .map(|(reason, counter)| CounterRow {
            reason: reason.name(),
            verdict: reason.verdict().name(),
            packets: counter.packets,
            bytes: counter.bytes,
        })
        .collect())
}
