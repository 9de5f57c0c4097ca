//! podwire-agent: the node daemon. Loads the datapath with its maps pinned in bpffs, restores the
//! endpoints of its persisted state, and serves the CNI plugin on a Unix socket. The datapath keeps
//! forwarding while the agent is down or restarting.
//!
//! `--iface` attaches `from_pod` to an interface for the developer's loop (`cargo xtask run`);
//! those attachments, unlike the pods', are removed when the agent exits.

use std::{io::IsTerminal as _, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context as _, Result};
use clap::Parser;
use ipnet::Ipv4Net;
use podwire_agent::{
    cluster::{ClusterSource as _, FileSource},
    ipam::Ipam,
    overlay::{self, Overlay, OverlayConfig, UnderlayXdp},
    server, Agent, OBJECT,
};
use podwire_core::{api, cluster::Cluster, pins::Pins};
use podwire_datapath::{Datapath, Hook, LoadOptions, LogLevel, Logger};
use podwire_netlink::Netlink;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, SignalKind},
};
use tracing::{info, warn};

#[derive(Parser)]
#[command(version, about = "podwire node agent")]
struct Args {
    /// The cluster description (JSON: clusterCIDR and nodes with name, address, podCIDR),
    /// re-read when it changes. This node's pod CIDR and underlay address come from it, and
    /// traffic to other nodes' pods goes through a VXLAN tunnel.
    #[arg(long, value_name = "FILE", conflicts_with = "pod_cidr")]
    cluster_file: Option<PathBuf>,

    /// This node's pod CIDR, for a node alone (no overlay): pod addresses are allocated from it.
    /// Without it or --cluster-file the agent serves no pods and only attaches to `--iface`s.
    #[arg(long, value_name = "CIDR")]
    pod_cidr: Option<Ipv4Net>,

    /// VXLAN network identifier of the overlay.
    #[arg(long, default_value_t = 1)]
    vni: u32,

    /// UDP port of the overlay.
    #[arg(long, default_value_t = 4789)]
    vxlan_port: u16,

    /// Where the XDP program that drops tunnel packets from hosts that are no node runs on the
    /// underlay interface: in the driver of a NIC that has XDP and generic elsewhere (auto), in
    /// the driver (native), or in the stack (generic). A veth's "native" XDP copies every
    /// coalesced packet.
    #[arg(long, value_enum, default_value_t = UnderlayXdp::Auto)]
    underlay_xdp: UnderlayXdp,

    /// Pod MTU; by default the underlay interface's MTU less the VXLAN overhead (50 bytes), or
    /// 1500 without an overlay.
    #[arg(long)]
    mtu: Option<u32>,

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
    #[arg(long, default_value = podwire_core::pins::DEFAULT_ROOT)]
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

    let serving = args.pod_cidr.is_some() || args.cluster_file.is_some();
    let pins = serving.then(|| Pins::new(&args.bpffs));
    let mut cluster_source = args
        .cluster_file
        .clone()
        .map(|path| FileSource::new(path, Duration::from_secs(1)));
    let joined = match &mut cluster_source {
        Some(source) => Some(join(&args, source).await?),
        None => None,
    };
    let overlay = joined.as_ref().map(|j| &j.overlay);
    let mut datapath = Datapath::load(
        OBJECT,
        LoadOptions {
            log_level: LogLevel::from_filter(&args.log),
            pins: pins.as_ref(),
            tunnel: overlay.map(Overlay::tunnel),
            test_run: false,
        },
    )?;
    if let Some(logger) = datapath.take_logger() {
        tokio::spawn(forward_logs(logger));
    }
    for iface in &args.ifaces {
        datapath
            .attach(Hook::from_pod(iface))
            .with_context(|| format!("attaching to {iface}"))?;
        info!(iface = %iface, "attached from_pod to tc ingress");
    }

    let pod_cidr = args.pod_cidr.or(joined.as_ref().map(|j| j.pod_cidr));
    let (Some(pod_cidr), Some(pins)) = (pod_cidr, pins) else {
        let mut sigint = signal(SignalKind::interrupt())?;
        let mut sigterm = signal(SignalKind::terminate())?;
        info!("datapath running; Ctrl-C or SIGTERM detaches and exits");
        wait_for_signal(&mut sigint, &mut sigterm).await;
        for (reason, counter) in datapath.counters.all()? {
            info!(
                reason = reason.name(),
                packets = counter.packets,
                bytes = counter.bytes,
                "counter"
            );
        }
        drop(datapath);
        info!("detached");
        return Ok(());
    };

    let ipam = Ipam::open(&args.state_dir, pod_cidr)?;
    let pod_mtu = overlay::pod_mtu(args.mtu, overlay);
    let (cluster, overlay) = match joined {
        Some(j) => (Some(j.cluster), Some(j.overlay)),
        None => (None, None),
    };
    let mut agent = Agent::start(
        args.node_name.clone(),
        datapath,
        ipam,
        pins,
        pod_mtu,
        overlay,
    )?;
    if let Some(cluster) = &cluster {
        agent.apply_cluster(cluster).await?;
    }
    let agent = Arc::new(tokio::sync::Mutex::new(agent));
    if let Some(mut source) = cluster_source {
        let agent = agent.clone();
        tokio::spawn(async move {
            loop {
                let result = match source.next().await {
                    Ok(cluster) => agent
                        .lock()
                        .await
                        .apply_cluster(&cluster)
                        .await
                        .map_err(anyhow::Error::from),
                    Err(e) => Err(e.into()),
                };
                if let Err(e) = result {
                    warn!("cluster update: {e:#}");
                }
            }
        });
    }
    let listener = server::bind(&args.socket)
        .with_context(|| format!("binding the API socket {}", args.socket.display()))?;
    tokio::spawn(server::serve(agent.clone(), listener));
    info!(node = %args.node_name, %pod_cidr, pod_mtu, socket = %args.socket.display(), "serving CNI requests");

    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    info!("datapath running; it stays in place when the agent exits");
    wait_for_signal(&mut sigint, &mut sigterm).await;
    let _ = std::fs::remove_file(&args.socket);
    // Pod attachments are pinned and stay; only `--iface` ones are detached with the datapath.
    drop(agent);
    info!("agent stopped");
    Ok(())
}

/// This node's place in the cluster, and its overlay made ready before the datapath loads (the
/// programs get the VXLAN device's ifindex at load time).
struct Joined {
    cluster: Cluster,
    pod_cidr: Ipv4Net,
    overlay: Overlay,
}

async fn join(args: &Args, source: &mut FileSource) -> Result<Joined> {
    let cluster = source.next().await?;
    let me = cluster.node(&args.node_name).cloned().with_context(|| {
        format!(
            "node {} is not in the cluster file {:?}",
            args.node_name, args.cluster_file
        )
    })?;
    let overlay = Overlay::setup(
        &Netlink::connect()?,
        OverlayConfig {
            address: me.address,
            vni: args.vni,
            port: args.vxlan_port,
            underlay_xdp: args.underlay_xdp,
        },
    )
    .await?;
    info!(
        underlay = %overlay.underlay,
        underlay_mtu = overlay.underlay_mtu,
        vni = args.vni,
        "overlay device {} ready",
        overlay::VXLAN_DEV
    );
    Ok(Joined {
        cluster,
        pod_cidr: me.pod_cidr,
        overlay,
    })
}

async fn wait_for_signal(
    sigint: &mut tokio::signal::unix::Signal,
    sigterm: &mut tokio::signal::unix::Signal,
) {
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
