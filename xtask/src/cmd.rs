//! Running child processes with their command line in every error.

use std::{path::Path, process::Command};

use anyhow::{bail, Context as _, Result};

/// Runs `cmd` with inherited stdio and fails unless it exits 0.
pub fn run(mut cmd: Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Whether `binary` runs and prints `version` on stdout when called with `args`.
pub fn reports(binary: &Path, args: &[&str], version: &str) -> bool {
    Command::new(binary)
        .args(args)
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains(version))
}
