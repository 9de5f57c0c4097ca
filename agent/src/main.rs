//! podwire-agent: the node daemon. Loads the datapath with its maps pinned in bpffs, restores the
//! endpoints of its persisted state, and serves the CNI plugin on a Unix socket. The datapath keeps
//! forwarding while the agent is down or restarting.
//!
//! `--iface` attaches `from_pod` to an interface for the developer's loop (`cargo xtask run`);
//! those attachments, unlike the pods', are removed when the agent exits.

use std::{io::IsTerminal as _, path::PathBuf, sync::Arc};

use anyhow::{Context as _, Result};
use clap::Parser;
use ipnet::Ipv4Net;
use podwire_agent::{
    api,
    daemon::{self, Daemon},
    datapath::{Datapath, LogLevel, Logger},
    pins::{self, Pins},
    state::State,
};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, SignalKind},
};
use tracing::{info, warn};

#[derive(Parser)]
#[command(version, about = "podwire node agent")]
struct Args {
    /// This node's pod CIDR: pod addresses are allocated from it. Without it the agent serves no
    /// pods and only attaches to the `--iface` interfaces.
    #[arg(long, value_name = "CIDR")]
    pod_cidr: Option<Ipv4Net>,

    /// This node's name, as the cluster knows it.
    #[arg(long, env = "NODE_NAME", default_value_t = hostname())]
    node_name: String,

    /// Directory of the persisted IPAM and endpoint state.
    #[arg(long, default_value = "/var/lib/podwire")]
    state_dir: PathBuf,

    /// Unix socket the CNI plugin talks to.
    #[arg(long, default_value = api::DEFAULT_SOCKET)]
    socket: PathBuf,

    /// bpffs directory for this node's pinned maps and links.
    #[arg(long, default_value = pins::DEFAULT_ROOT)]
    bpffs: PathBuf,

    /// Attach `from_pod` to tc ingress of this interface until the agent exits (repeatable): the
    /// developer's loop, e.g. onto a veth of a test namespace.
    #[arg(long = "iface", value_name = "NAME")]
    ifaces: Vec<String>,

    /// Log filter (tracing EnvFilter syntax). Its most verbose level also decides which log
    /// statements the kernel programs keep; below that they cost nothing.
    #[arg(long, env = "PODWIRE_LOG", default_value = "info")]
    log: String,
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&args.log).context("--log")?)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    let pins = args.pod_cidr.map(|_| Pins::new(&args.bpffs));
    if let Some(pins) = &pins {
        pins.prepare().context("preparing the bpffs pin directories")?;
    }
    let mut datapath = Datapath::load(LogLevel::from_filter(&args.log), pins.as_ref(), None)?;
    if let Some(logger) = datapath.take_logger() {
        tokio::spawn(forward_logs(logger));
    }
    for iface in &args.ifaces {
        datapath
            .attach_from_pod(iface)
            .with_context(|| format!("attaching to {iface}"))?;
        info!(iface = %iface, "attached from_pod to tc ingress");
    }

    let daemon = match (args.pod_cidr, pins) {
        (Some(pod_cidr), Some(pins)) => {
            let state = State::open(&args.state_dir, pod_cidr)?;
            let daemon = Daemon::start(args.node_name.clone(), datapath, state, pins).await?;
            let daemon = Arc::new(tokio::sync::Mutex::new(daemon));
            let listener = daemon::bind(&args.socket)
                .with_context(|| format!("binding the API socket {}", args.socket.display()))?;
            tokio::spawn(Daemon::serve(daemon.clone(), listener));
            info!(node = %args.node_name, %pod_cidr, socket = %args.socket.display(), "serving CNI requests");
            Some(daemon)
        }
        _ => {
            let mut sigint = signal(SignalKind::interrupt())?;
            let mut sigterm = signal(SignalKind::terminate())?;
            info!("datapath running; Ctrl-C or SIGTERM detaches and exits");
            wait_for_signal(&mut sigint, &mut sigterm).await;
            for (reason, counter) in datapath.counters()? {
                info!(reason = reason.name(), packets = counter.packets, bytes = counter.bytes, "counter");
            }
            drop(datapath);
            info!("detached");
            return Ok(());
        }
    };

    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    info!("datapath running; it stays in place when the agent exits");
    wait_for_signal(&mut sigint, &mut sigterm).await;
    let _ = std::fs::remove_file(&args.socket);
    // Pod attachments are pinned and stay; only `--iface` ones are detached with the datapath.
    drop(daemon);
    info!("agent stopped");
    Ok(())
}

async fn wait_for_signal(sigint: &mut tokio::signal::unix::Signal, sigterm: &mut tokio::signal::unix::Signal) {
    tokio::select! {
        _ = sigint.recv() => info!("SIGINT: exiting"),
        _ = sigterm.recv() => info!("SIGTERM: exiting"),
    }
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
