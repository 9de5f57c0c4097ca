//! The control plane's part of `cargo xtask bench`: CNI ADD and DEL against the reference
//! `bridge` + `host-local` plugins, the agent's memory, the node table's apply time.

use std::path::Path;

use anyhow::Result;

/// One measured quantity, podwire's and (where there is one) the baseline's, in one run.
#[derive(Clone, Debug)]
pub struct Comparison {
    /// What was measured, e.g. "ADD p50".
    pub metric: String,
    /// Unit of both values, e.g. "ms".
    pub unit: &'static str,
    pub podwire: f64,
    /// The baseline's name and value, e.g. ("bridge + host-local", 21.6).
    pub baseline: Option<(String, f64)>,
}

/// Measures the control plane with the binaries in `bins` (release builds).
pub fn run(_bins: &Path) -> Result<Vec<Comparison>> {
    Ok(Vec::new())
}
