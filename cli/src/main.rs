//! `podwire`: inspects a node's datapath by reading its pinned maps in bpffs directly, so it
//! works whether or not the agent is running.

mod counters;
mod endpoints;
mod events;
mod nodes;
mod output;

use std::path::PathBuf;

use anyhow::{Context as _, Result};
use clap::{CommandFactory as _, Parser, Subcommand};
use nix::sys::signal::{signal, SigHandler, Signal};
use podwire_core::pins;

#[derive(Parser)]
#[command(version, about = "Inspect podwire's datapath on this node")]
struct Cli {
    /// bpffs directory the node's agent pins its maps in.
    #[arg(long, global = true, env = "PODWIRE_BPFFS", default_value = pins::DEFAULT_ROOT)]
    bpffs: PathBuf,

    /// Output format: tables for people, JSON for scripts.
    #[arg(short, long, global = true, value_enum, default_value_t = output::Format::Table)]
    output: output::Format,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Pods on this node as the datapath knows them.
    Endpoints,
    /// The node table: which node owns each pod CIDR (and underlay address).
    Nodes,
    /// Packets and bytes per verdict reason, summed over CPUs.
    Counters {
        /// Only reasons that counted something.
        #[arg(long)]
        nonzero: bool,
    },
    /// Dropped packets, live, with reason and addresses (until interrupted).
    Events {
        /// Stop after this many events.
        #[arg(long)]
        count: Option<usize>,
        /// Stop once no event came for this many seconds.
        #[arg(long, value_name = "SECONDS")]
        idle: Option<u64>,
    },
    /// Print shell completions.
    Completions { shell: clap_complete::Shell },
}

fn main() -> Result<()> {
    // Rust ignores SIGPIPE, so writing to a closed pipe (`podwire counters | head -1`) would
    // panic; dying of the signal instead is what scripts expect of a Unix tool.
    // SAFETY: still single-threaded, and SIG_DFL runs no handler code.
    unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) }.context("restoring SIGPIPE")?;
    let cli = Cli::parse();
    let pins = pins::Pins::new(&cli.bpffs);
    match cli.command {
        Command::Endpoints => output::print(cli.output, &endpoints::read(&pins)?),
        Command::Nodes => output::print(cli.output, &nodes::read(&pins)?),
        Command::Counters { nonzero } => {
            output::print(cli.output, &counters::read(&pins, nonzero)?)
        }
        Command::Events { count, idle } => events::follow(
            &pins,
            cli.output,
            count,
            idle.map(std::time::Duration::from_secs),
        ),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "podwire",
                &mut std::io::stdout(),
            );
            Ok(())
        }
    }
}
