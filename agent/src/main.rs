//! podwire-agent: the node daemon. Loads the datapath with its maps pinned in bpffs, restores the
//! endpoints of its persisted state, and serves the CNI plugin on a Unix socket. The datapath keeps
//! forwarding while the agent is down or restarting.
//!
//! The cluster comes from a file (`--cluster-file`) or from the Kubernetes API's Nodes
//! (`--kubernetes`); a node alone serves its `--pod-cidr`. A cluster whose apply fails is
//! applied again (after 1 s, doubling up to 15 s) until it succeeds or a newer one arrives, and
//! the agent is not ready until one has been applied. Health, readiness and Prometheus
//! metrics are served over HTTP on `--http-address` (see `podwire_agent::metrics`). With
//! `--daemonset`, a SIGTERM after that DaemonSet was deleted (`helm uninstall`) removes podwire
//! from the node; `--cleanup` does that at once.
//!
//! `--iface` attaches `from_pod` to an interface for the developer's loop (`cargo xtask run`);
//! those attachments, unlike the pods', are removed when the agent exits.

use std::{io::IsTerminal as _, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context as _, Result};
use clap::Parser;
use ipnet::Ipv4Net;
use podwire_agent::{
    cluster::{ClusterError, ClusterSource, FileSource},
    ipam::Ipam,
    kubernetes::{self, KubeSource},
    metrics::{self, Health, Metrics, DEFAULT_HTTP_ADDRESS},
    overlay::{self, Encap, Overlay, OverlayConfig, Routing, UnderlayXdp},
    server,
    uninstall::{self, Cleanup, Uninstalling},
    Agent, OBJECT,
};
use podwire_core::{
    api,
    cluster::{Cluster, NodeInfo},
    error_chain,
    pins::Pins,
};
use podwire_datapath::{Datapath, Hook, LoadOptions, LogLevel, Logger};
use podwire_netlink::Netlink;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, SignalKind},
};
use tracing::{error, info, warn};

#[derive(Parser)]
#[command(version, about = "podwire node agent")]
struct Args {
    /// The cluster description (JSON: clusterCIDR and nodes with name, address, podCIDR),
    /// re-read when it changes. This node's pod CIDR and underlay address come from it, and
    /// traffic to other nodes' pods goes through a VXLAN tunnel.
    #[arg(long, value_name = "FILE", conflicts_with = "pod_cidr")]
    cluster_file: Option<PathBuf>,

    /// Follow the cluster from the Kubernetes API: every Node's InternalIP and spec.podCIDR(s).
    /// The agent waits until its own Node (--node-name) has both; its pod CIDR feeds IPAM and
    /// its InternalIP carries the tunnel. Once the datapath is up, the Node's
    /// NetworkUnavailable condition is set to False.
    #[arg(
        long,
        conflicts_with_all = ["cluster_file", "pod_cidr"],
        requires = "cluster_cidr"
    )]
    kubernetes: bool,

    /// kubeconfig for --kubernetes; without it, the in-cluster service account, else
    /// KUBECONFIG or ~/.kube/config.
    #[arg(long, value_name = "PATH", requires = "kubernetes")]
    kubeconfig: Option<PathBuf>,

    /// The pod range every node's podCIDR comes from (kube-controller-manager's
    /// --cluster-cidr), with --kubernetes: destinations in it that no node owns are dropped,
    /// and pod traffic to it is not masqueraded.
    #[arg(long, value_name = "CIDR", requires = "kubernetes")]
    cluster_cidr: Option<Ipv4Net>,

    /// podwire's DaemonSet (in --namespace), with --kubernetes: once it is deleted (helm
    /// uninstall), the SIGTERM that stops the agent also removes podwire from the node (see
    /// --cleanup). Without its deletion a SIGTERM keeps the datapath in place.
    #[arg(long, value_name = "NAME", requires = "kubernetes")]
    daemonset: Option<String>,

    /// The namespace of --daemonset (the downward API's metadata.namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "kube-system")]
    namespace: String,

    /// The CNI conflist installed for podwire, removed first on uninstall.
    #[arg(long, value_name = "PATH")]
    cni_conf_file: Option<PathBuf>,

    /// The CNI plugin binary installed for podwire, removed on uninstall.
    #[arg(long, value_name = "PATH")]
    cni_bin_file: Option<PathBuf>,

    /// Remove podwire from this node and exit: --cni-conf-file, --cni-bin-file, every pinned
    /// link and map below --bpffs, the overlay device, the masquerade table, --state-dir and
    /// --socket. For a node whose podwire was removed without `helm uninstall`.
    #[arg(long)]
    cleanup: bool,

    /// Where /healthz, /readyz and /metrics are served.
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_HTTP_ADDRESS)]
    http_address: SocketAddr,

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

    /// How packets for other nodes' pods cross the underlay: in a VXLAN tunnel (tunnel), or
    /// unencapsulated, routed via the owning node's address (native: the nodes must share one
    /// segment, and a pod address on it cannot be authenticated; see docs/DATAPATH-MODES.md).
    #[arg(long, env = "PODWIRE_ROUTING", value_enum, default_value_t = Routing::Tunnel)]
    routing: Routing,

    /// Who writes the tunnel's headers with --routing tunnel: podwire's programs (bpf: pushed
    /// in `from_pod`, taken off at the underlay's tc ingress straight into the pod; the default,
    /// it measured better) or the kernel's collect_md VXLAN device (device). Both speak the same
    /// VXLAN.
    #[arg(long, env = "PODWIRE_ENCAP", value_enum, default_value_t = Encap::Bpf)]
    encap: Encap,

    /// Pod MTU; by default the underlay interface's MTU less the VXLAN overhead (50 bytes) for
    /// the cluster route (the underlay's with --routing native), or 1500 without an overlay.
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
    if args.cleanup {
        // Not under a running agent: it would go on serving pods on a node without podwire.
        let _state_lock = podwire_agent::store::StateLock::acquire(&args.state_dir)
            .context("--cleanup needs the agent of this node stopped first")?;
        cleanup_of(&args)
            .run()
            .await
            .context("removing podwire from this node")?;
        info!("podwire removed from this node");
        return Ok(());
    }
    let mut signals = Signals::new()?;

    let follows_cluster = args.cluster_file.is_some() || args.kubernetes;
    let serving = args.pod_cidr.is_some() || follows_cluster;
    // Before anything on the node is touched (HTTP port, overlay, datapath): a second agent for
    // the same node exits here, naming the one that holds the state directory.
    let state_lock = serving
        .then(|| podwire_agent::store::StateLock::acquire(&args.state_dir))
        .transpose()
        .context("locking --state-dir")?;
    let pins = serving.then(|| Pins::new(&args.bpffs));
    let health = Arc::new(Health::new(follows_cluster, serving));
    let metrics = Arc::new(Metrics::new(pins.clone(), health.clone()));
    let http = metrics::bind(args.http_address)
        .await
        .with_context(|| format!("binding --http-address {}", args.http_address))?;
    tokio::spawn(metrics::serve(http, health.clone(), metrics.clone()));
    info!(address = %args.http_address, "serving /healthz, /readyz and /metrics");

    let kube = match args.kubernetes {
        true => {
            check_ip_forward();
            Some(
                kubernetes::client(args.kubeconfig.as_deref())
                    .await
                    .context("connecting to the Kubernetes API")?,
            )
        }
        false => None,
    };
    let uninstalling = Arc::new(Uninstalling::default());
    if let (Some(client), Some(name)) = (&kube, &args.daemonset) {
        tokio::spawn(uninstall::watch_daemonset(
            client.clone(),
            args.namespace.clone(),
            name.clone(),
            uninstalling.clone(),
        ));
    }

    let mut cluster_source = match (&args.cluster_file, &kube) {
        (Some(path), _) => Some(Source::File(FileSource::new(
            path.clone(),
            Duration::from_secs(1),
        ))),
        (None, Some(client)) => Some(Source::Kube(KubeSource::new(
            client.clone(),
            args.cluster_cidr
                .context("--kubernetes needs --cluster-cidr")?,
        ))),
        (None, None) => None,
    };
    let joined = match &mut cluster_source {
        Some(source) => tokio::select! {
            joined = join(&args, source, &metrics) => Some(joined?),
            signal = signals.recv() => {
                info!("{signal} before this node joined the cluster: exiting");
                return exit(&args, &kube, &uninstalling).await;
            }
        },
        None => None,
    };
    let overlay = joined.as_ref().map(|j| &j.overlay);
    let mut datapath = Datapath::load_crossing(
        OBJECT,
        LoadOptions {
            log_level: LogLevel::from_filter(&args.log),
            pins: pins.as_ref(),
            tunnel: overlay.map(Overlay::tunnel),
            test_run: false,
        },
        overlay.map(Overlay::crossing),
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
        health.set_datapath_loaded();
        info!("datapath running; Ctrl-C or SIGTERM detaches and exits");
        let signal = signals.recv().await;
        info!("{signal}: exiting");
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

    let state_lock = state_lock.expect("taken whenever the agent serves a pod CIDR");
    let ipam = Ipam::open_locked(state_lock, &args.state_dir, pod_cidr)?;
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
    health.set_datapath_loaded();
    // The first apply before serving pods; one that fails is retried while they are served.
    let applied = match &cluster {
        Some(cluster) => apply(&mut agent, cluster, &metrics, &health).await,
        None => true,
    };
    let agent = Arc::new(tokio::sync::Mutex::new(agent));
    if let (Some(source), Some(cluster)) = (cluster_source, cluster) {
        tokio::spawn(follow(
            source,
            Following {
                cluster,
                applied,
                agent: agent.clone(),
                metrics: metrics.clone(),
                health: health.clone(),
            },
        ));
    }
    let listener = server::bind(&args.socket)
        .with_context(|| format!("binding the API socket {}", args.socket.display()))?;
    tokio::spawn(server::serve(agent.clone(), listener, metrics.clone()));
    health.set_cni_serving();
    info!(node = %args.node_name, %pod_cidr, ?pod_mtu, socket = %args.socket.display(), "serving CNI requests");
    if let Some(client) = &kube {
        tokio::spawn(mark_network_available(
            client.clone(),
            args.node_name.clone(),
        ));
    }

    info!("datapath running; it stays in place when the agent exits");
    let signal = signals.recv().await;
    info!("{signal}: exiting");
    let _ = std::fs::remove_file(&args.socket);
    // Pod attachments are pinned and stay; only `--iface` ones are detached with the datapath.
    drop(agent);
    exit(&args, &kube, &uninstalling).await
}

/// The end of a run: on uninstall (the DaemonSet deleted), podwire is removed from the node;
/// otherwise everything stays for the next agent.
async fn exit(args: &Args, kube: &Option<kube::Client>, uninstalling: &Uninstalling) -> Result<()> {
    let uninstall = match (kube, &args.daemonset) {
        (Some(client), Some(name)) => {
            uninstalling.get()
                || uninstall::daemonset_gone(client.clone(), &args.namespace, name).await
        }
        _ => false,
    };
    if !uninstall {
        info!("agent stopped");
        return Ok(());
    }
    info!("podwire is being uninstalled: removing it from this node");
    cleanup_of(args)
        .run()
        .await
        .context("removing podwire from this node")?;
    info!("agent stopped; podwire removed from this node");
    Ok(())
}

fn cleanup_of(args: &Args) -> Cleanup {
    Cleanup {
        conf_file: args.cni_conf_file.clone(),
        bin_file: args.cni_bin_file.clone(),
        pins: Pins::new(&args.bpffs),
        state_dir: args.state_dir.clone(),
        socket: args.socket.clone(),
    }
}

/// Where the agent learns the cluster.
enum Source {
    File(FileSource),
    Kube(KubeSource),
}

impl ClusterSource for Source {
    async fn next(&mut self) -> Result<Cluster, ClusterError> {
        match self {
            Source::File(source) => source.next().await,
            Source::Kube(source) => source.next().await,
        }
    }
}

/// How long the first retry of a failed apply waits; each next one waits twice as long, up to
/// [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(15);

/// Applies `cluster`, counting the success or failure; whether it succeeded.
async fn apply(agent: &mut Agent, cluster: &Cluster, metrics: &Metrics, health: &Health) -> bool {
    match agent.apply_cluster(cluster).await {
        Ok(_) => {
            metrics.cluster_synced(cluster.nodes.len());
            health.set_cluster_synced();
            true
        }
        Err(e) => {
            metrics.cluster_sync_failed();
            error!("applying the cluster: {}", error_chain(&e));
            false
        }
    }
}

/// What [`follow`] starts from: the cluster applied first and whether that succeeded.
struct Following {
    cluster: Cluster,
    applied: bool,
    agent: Arc<tokio::sync::Mutex<Agent>>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

/// Applies every cluster `source` hands on. A failed apply is retried with backoff until it
/// succeeds or a newer cluster arrives, which is applied instead: the source only says what
/// changed, so a cluster that failed once would otherwise never be applied.
async fn follow(mut source: Source, start: Following) {
    let Following {
        cluster,
        applied,
        agent,
        metrics,
        health,
    } = start;
    let (newer, mut latest) = tokio::sync::watch::channel(cluster);
    let reader_metrics = metrics.clone();
    tokio::spawn(async move {
        loop {
            match source.next().await {
                Ok(cluster) => {
                    if newer.send(cluster).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    reader_metrics.cluster_sync_failed();
                    warn!("cluster update: {}", error_chain(&e));
                }
            }
        }
    });
    let mut failed = !applied;
    let mut backoff = RETRY_FIRST;
    loop {
        let retry = async {
            match failed {
                true => tokio::time::sleep(backoff).await,
                false => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = latest.changed() => {
                if changed.is_err() {
                    return;
                }
                backoff = RETRY_FIRST;
            }
            () = retry => {
                info!("retrying the cluster apply that failed");
                backoff = (backoff * 2).min(RETRY_MAX);
            }
        }
        let cluster = latest.borrow_and_update().clone();
        failed = !apply(&mut *agent.lock().await, &cluster, &metrics, &health).await;
        if failed {
            warn!("retrying in {backoff:?}, or at once when the cluster changes");
        }
    }
}

/// Sets this node's NetworkUnavailable condition to False, retrying until the API takes it.
async fn mark_network_available(client: kube::Client, node: String) {
    loop {
        match kubernetes::mark_network_available(client.clone(), &node).await {
            Ok(()) => return info!(node = %node, "Node condition NetworkUnavailable set to False"),
            Err(e) => warn!("{}; retrying in 5s", error_chain(&e)),
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

/// Warns when this node does not forward IPv4: podwire's own paths do not need it, but hosts
/// that are no podwire node (the API server's, reaching pods for `kubectl exec` or its proxy)
/// and kube-proxy's Services do, and kubeadm requires it.
fn check_ip_forward() {
    let path = "/proc/sys/net/ipv4/ip_forward";
    match std::fs::read_to_string(path) {
        Ok(value) if value.trim() == "0" => warn!(
            "{path} is 0: this node does not forward IPv4, so hosts that are no podwire node \
             (the API server's) cannot reach its pods and Services through kube-proxy fail; set \
             net.ipv4.ip_forward=1 on the node (the Helm chart's privileged init container does, \
             as kubeadm requires)"
        ),
        Ok(_) => {}
        Err(e) => warn!("reading {path}: {e}"),
    }
}

/// This node's place in the cluster, and its overlay made ready before the datapath loads (the
/// programs get the VXLAN device's ifindex at load time).
struct Joined {
    cluster: Cluster,
    pod_cidr: Ipv4Net,
    overlay: Overlay,
}

async fn join(args: &Args, source: &mut Source, metrics: &Metrics) -> Result<Joined> {
    let (cluster, me) = match source {
        Source::File(file) => {
            let cluster = file.next().await?;
            let me = cluster.node(&args.node_name).cloned().with_context(|| {
                format!(
                    "node {} is not in the cluster file {:?}",
                    args.node_name, args.cluster_file
                )
            })?;
            (cluster, me)
        }
        Source::Kube(kube) => wait_for_own_node(&args.node_name, kube, metrics).await,
    };
    let overlay = Overlay::setup(
        &Netlink::connect()?,
        OverlayConfig {
            address: me.address,
            vni: args.vni,
            port: args.vxlan_port,
            underlay_xdp: args.underlay_xdp,
            routing: args.routing,
            encap: args.encap,
        },
    )
    .await?;
    info!(
        underlay = %overlay.underlay,
        underlay_mtu = overlay.underlay_mtu,
        vni = args.vni,
        mode = ?overlay.config.cross_node(),
        "overlay device {} ready",
        overlay::VXLAN_DEV
    );
    Ok(Joined {
        cluster,
        pod_cidr: me.pod_cidr,
        overlay,
    })
}

/// The first cluster that has this node (with its InternalIP and pod CIDR, which the controller
/// manager assigns seconds after the kubelet registers it), and this node in it. Waits, saying
/// why, until there is one.
async fn wait_for_own_node(
    name: &str,
    source: &mut KubeSource,
    metrics: &Metrics,
) -> (Cluster, NodeInfo) {
    loop {
        match source.next().await {
            Ok(cluster) => {
                if let Some(me) = cluster.node(name).cloned() {
                    info!(node = %name, address = %me.address, pod_cidr = %me.pod_cidr, "found this node's Node");
                    return (cluster, me);
                }
                info!(
                    "waiting for Node {name}: {} (it must have an InternalIP and a podCIDR)",
                    source.why_not_in(name)
                );
            }
            Err(e) => {
                metrics.cluster_sync_failed();
                warn!("{}; retrying", error_chain(&e));
            }
        }
    }
}

/// SIGINT and SIGTERM.
struct Signals {
    sigint: tokio::signal::unix::Signal,
    sigterm: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Signals> {
        Ok(Signals {
            sigint: signal(SignalKind::interrupt())?,
            sigterm: signal(SignalKind::terminate())?,
        })
    }

    /// The next of them, by name.
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.sigint.recv() => "SIGINT",
            _ = self.sigterm.recv() => "SIGTERM",
        }
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
