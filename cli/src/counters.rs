//! `podwire counters`: verdicts per reason.

use anyhow::{Context as _, Result};
use aya::maps::{MapData, PerCpuArray};
use podwire_agent::{datapath::maps::COUNTERS, pins::Pins};
use podwire_common::{Counter, Reason};
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

fn verdict(reason: Reason) -> &'static str {
    match reason {
        r if r.is_drop() => "drop",
        Reason::RedirectLocal | Reason::RedirectOverlay | Reason::RedirectFromOverlay => "redirect",
        _ => "pass",
    }
}

pub fn read(pins: &Pins, nonzero: bool) -> Result<Vec<CounterRow>> {
    let map: PerCpuArray<MapData, Counter> = crate::maps::open(pins, COUNTERS)?;
    let mut rows = Vec::new();
    for reason in Reason::ALL {
        let per_cpu = map.get(&(reason as u32), 0).with_context(|| {
            format!(
                "reading {} of {}",
                reason.name(),
                pins.map(COUNTERS).display()
            )
        })?;
        let Counter { packets, bytes } = per_cpu.iter().copied().sum();
        if nonzero && packets == 0 {
            continue;
        }
        rows.push(CounterRow {
            reason: reason.name(),
            verdict: verdict(reason),
            packets,
            bytes,
        });
    }
    Ok(rows)
}
