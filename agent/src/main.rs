//! podwire-agent: the node daemon. Loads the datapath and attaches it to the given interfaces,
//! forwards the programs' log records, and detaches everything on SIGINT or SIGTERM.

use std::io::IsTerminal as _;

use anyhow::{Context as _, Result};
use clap::Parser;
use podwire_agent::datapath::{Datapath, LogLevel, Logger};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, SignalKind},
};
use tracing::{info, warn};

#[derive(Parser)]
#[command(version, about = "podwire node agent")]
struct Args {
    /// Attach `from_pod` to tc ingress of this interface (repeatable): the developer's loop,
    /// e.g. onto a veth of a test namespace.
    #[arg(long = "iface", value_name = "NAME")]
    ifaces: Vec<String>,

    /// Log filter (tracing EnvFilter syntax). Its most verbose level also decides which log
    /// statements the kernel programs keep; below that they cost nothing.
    #[arg(long, env = "PODWIRE_LOG", default_value = "info")]
    log: String,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&args.log).context("--log")?)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    let mut datapath = Datapath::load(LogLevel::from_filter(&args.log))?;
    if let Some(logger) = datapath.take_logger() {
        tokio::spawn(forward_logs(logger));
    }
    for iface in &args.ifaces {
        datapath
            .attach_from_pod(iface)
            .with_context(|| format!("attaching to {iface}"))?;
        info!(iface = %iface, "attached from_pod to tc ingress");
    }

    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    info!("datapath running; Ctrl-C or SIGTERM detaches and exits");
    tokio::select! {
        _ = sigint.recv() => info!("SIGINT: detaching"),
        _ = sigterm.recv() => info!("SIGTERM: detaching"),
    }
    for (reason, counter) in datapath.counters()? {
        info!(reason = reason.name(), packets = counter.packets, bytes = counter.bytes, "counter");
    }
    // Dropping the datapath detaches every link and unloads the programs.
    drop(datapath);
    info!("detached");
    Ok(())
}

async fn forward_logs(logger: Logger) {
    // SAFETY: the logger owns its ring buffer's fd, which stays open and unchanged for as long as
    // the logger (moved into the AsyncFd) lives.
    let registered =
        unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
    let mut logger = match registered {
        Ok(fd) => fd,
        Err(e) => return warn!(error = %e, "cannot poll the eBPF log ring; kernel logs are off"),
    };
    loop {
        match logger.readable_mut().await {
            Ok(mut guard) => {
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
            Err(e) => return warn!(error = %e, "eBPF log ring failed; kernel logs are off"),
        }
    }
}
