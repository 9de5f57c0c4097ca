//! Running child processes with their command line in every error.

use std::process::Command;

use anyhow::{bail, Context as _, Result};

/// Runs `cmd` with inherited stdio and fails unless it exits 0.
pub fn run(mut cmd: Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}
