//! `cargo xtask`: podwire's developer entry point. Every command installs what it needs first.

mod bench;
mod build;
mod cmd;
mod cnitool;
mod demo;
mod lab;
mod toolchain;
mod vm;

use std::{os::unix::process::CommandExt as _, path::PathBuf, process::Command};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use toolchain::Needs;

#[derive(Parser)]
#[command(about = "Build, load, demo and test podwire")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the eBPF object and the userspace binaries that embed it.
    Build {
        /// Build userspace in release mode (the eBPF object is always optimised).
        #[arg(long)]
        release: bool,
    },
    /// Build, then run the agent with the given arguments, e.g. `-- --iface veth0`:
    /// loads and attaches the programs and streams their logs until Ctrl-C or SIGTERM.
    Run {
        #[arg(long)]
        release: bool,
        /// Arguments for podwire-agent.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Bring up a node running the agent and pods wired through the CNI plugin, show pod-to-pod
    /// traffic carried by the eBPF datapath and its counters, and tear everything down.
    Demo,
    /// Measure podwire against the kernel's classic datapaths (Linux bridge, kernel VXLAN) in
    /// one run: TCP throughput and request/response, medians and ratios.
    Bench {
        /// Repetitions of every measurement (modes interleaved).
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
    /// Run the unit tests and the kernel integration tests (needs root).
    Test {
        /// Arguments passed to `cargo test` after `--`, e.g. a test name filter.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Boot Debian 12's 6.1 LTS kernel in qemu and check every program passes its verifier.
    VmVerify,
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Build { release } => {
            build::all(release, Needs::Build)?;
        }
        Cmd::Run { release, args } => {
            let bins = build::all(release, Needs::Build)?.bins;
            let agent = bins.join("podwire-agent");
            let mut cmd = Command::new(&agent);
            cmd.args(&args);
            // Developers want to see what the programs do on every packet unless they say otherwise
            // (`podwire` is the kernel programs' log target).
            if std::env::var_os("PODWIRE_LOG").is_none() {
                cmd.env("PODWIRE_LOG", "info,podwire=debug");
            }
            // Replace this process so Ctrl-C and SIGTERM reach the agent directly and it detaches.
            return Err(cmd.exec()).with_context(|| format!("executing {}", agent.display()));
        }
        Cmd::Demo => {
            let bins = build::all(false, Needs::Run)?.bins;
            demo::run(&bins)?;
        }
        Cmd::Bench { reps, seconds } => {
            let bins = build::all(true, Needs::Run)?.bins;
            bench::run(&bins, reps, seconds)?;
        }
        Cmd::Test { args } => {
            build::test(&args)?;
        }
        Cmd::VmVerify => {
            vm::verify()?;
        }
    }
    Ok(())
}

/// The workspace root (the parent of this crate).
fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}
