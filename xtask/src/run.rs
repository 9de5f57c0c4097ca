//! `cargo xtask run -- <agent arguments>`: builds, then becomes the agent, so a developer sees
//! what the programs do on every packet of an interface.

use std::{os::unix::process::CommandExt as _, process::Command};

use anyhow::{Context as _, Result};

use crate::{build, toolchain::Needs};

/// Builds and replaces this process with podwire-agent run with `args`; returns only if that
/// fails.
pub fn run(release: bool, args: &[String]) -> Result<()> {
    let agent = build::all(release, Needs::Build)?
        .bins
        .join("podwire-agent");
    let mut cmd = Command::new(&agent);
    cmd.args(args);
    // Developers want to see what the programs do on every packet unless they say otherwise
    // (`podwire` is the kernel programs' log target).
    if std::env::var_os("PODWIRE_LOG").is_none() {
        cmd.env("PODWIRE_LOG", "info,podwire=debug");
    }
    // Replacing this process lets Ctrl-C and SIGTERM reach the agent directly, so it detaches.
    Err(cmd.exec()).with_context(|| format!("executing {}", agent.display()))
}
