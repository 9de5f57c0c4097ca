//! podwire-verify: loads every podwire eBPF program through the running kernel's verifier, then
//! proves the datapath carries real packets on a kernel without TCX: two pods, wired as the CNI
//! plugin wires them, exchange UDP datagrams that only `from_pod` (attached through netlink tc,
//! with `bpf_redirect_peer`) can deliver, as the node does not forward. It exists so
//! `cargo xtask vm-verify` can run it (built static, as a VM's only program) on Debian 12's 6.1
//! kernel, which users run, and not only on the build machine's kernel.
//!
//!
//! Then it builds two nodes as the lab does ([`cluster`]): network namespaces joined by a veth
//! underlay, each running the real `podwire-agent` (found next to this binary), pods wired by the
//! real `podwire-cni`, continuous TCP streams and pings on one node and across nodes through the
//! VXLAN tunnel, while the agents are killed with SIGKILL and started again.
//!
//! Progress goes to stdout as it happens and, on failure, the error chain (a verifier log
//! included) to stderr, for whoever reads the console. Last, whether it succeeded or not, it
//! prints one [`VerifyReport`] line, which is what xtask checks; the exit code is 1 on failure.

use std::{
    fs::File,
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    os::fd::AsRawFd as _,
    path::Path,
    process::ExitCode,
    thread,
    time::Duration,
};

use anyhow::{ensure, Context as _, Result};
use nix::sched::{unshare, CloneFlags};
use podwire_common::{Endpoint, Reason};
use podwire_core::object::programs;
use podwire_datapath::{tcx_supported, Datapath, Hook, LoadOptions, LogLevel, Tunnel};
use podwire_lab::{
    namespaces::enter,
    vm::{Delivery, VerifyReport, NETLINK_TC},
};
use podwire_netlink::{
    pod::{create, PodInterface, PodNetns},
    Netlink,
};

const POD_IF: &str = "eth0";
const MTU: u32 = 1500;
const PORT: u16 = 7777;
/// Payload sizes sent each way, up to the largest that fits a 1500-byte MTU unfragmented.
const SIZES: [usize; 8] = [1, 18, 64, 200, 512, 1000, 1400, 1472];
/// Ethernet, IPv4 and UDP headers: what the counters add to each payload.
const HEADERS: u64 = 14 + 20 + 8;
/// A datagram takes microseconds; this is only the limit for one that was lost.
const RECV_TIMEOUT: Duration = Duration::from_secs(2);
const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

fn main() -> ExitCode {
    let mut report = VerifyReport::default();
    let outcome = run(&mut report);
    if let Err(e) = &outcome {
        eprintln!("Error: {e:?}");
        report.error = Some(format!("{e:#}"));
    }
    println!("{}", report.line());
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE,
    }
}

/// Fills `report` as far as the checks get.
fn run(report: &mut VerifyReport) -> Result<()> {
    report.kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .context("reading the kernel release from /proc (is procfs mounted?)")?
        .trim()
        .to_owned();
    // The node is a namespace of its own (made while this is the only thread, so every thread
    // started later is in it too): the check turns forwarding off and adds veths, which must not
    // touch the network of a machine this runs on outside a VM.
    unshare(CloneFlags::CLONE_NEWNET).context("creating the node's network namespace")?;
    verify(report)?;
    report.delivery = Some(deliver(&report.kernel)?);
    report.cluster = Some(cluster::check().context("the two-node check with the real agent")?);
    Ok(())
}

fn verify(report: &mut VerifyReport) -> Result<()> {
    // A tunnel makes the programs' tunnel path live, so the verifier walks it too; its ifindex is
    // only a constant to them here, as nothing is attached.
    let _datapath = Datapath::load(
        podwire_agent::OBJECT,
        LoadOptions {
            log_level: LogLevel::Off,
            pins: None,
            tunnel: Some(Tunnel {
                vxlan_ifindex: 1,
                vni: 1,
                port: 4789,
                node_address: Ipv4Addr::new(192, 168, 77, 1),
            }),
            test_run: false,
        },
    )
    .context("loading podwire's eBPF programs")?;
    for name in programs::ALL {
        println!("verified {name}");
        report.verified.push(name.to_owned());
    }
    println!(
        "podwire-verify: all {} programs passed the verifier on kernel {}",
        programs::ALL.len(),
        report.kernel
    );
    Ok(())
}

/// A pod: its namespace (alive while the file is open) and the host side of its veth pair.
struct Pod {
    ns: File,
    ip: Ipv4Addr,
    host_if: &'static str,
    endpoint: Endpoint,
}

/// Wires two pods, attaches `from_pod` to their host-side veths and has them exchange datagrams
/// that only its `bpf_redirect_peer` can deliver.
fn deliver(kernel: &str) -> Result<Delivery> {
    ensure!(
        !tcx_supported(),
        "kernel {kernel} has TCX, so podwire does not attach through netlink tc here, which is \
         what the pod-to-pod check proves: run it on a kernel before 6.6 (cargo xtask vm-verify)"
    );
    std::fs::write(IP_FORWARD, "0").context("turning IP forwarding off in the node")?;
    // rtnetlink runs on tokio, and its connections make progress only while the runtime is
    // driven: all of the wiring happens inside this one block_on.
    let (a, b) = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .context("starting a tokio runtime")?
        .block_on(async {
            let host = Netlink::connect().context("connecting to netlink in the node")?;
            let a = wire_pod(&host, "pw-a", Ipv4Addr::new(10, 244, 0, 2))
                .await
                .context("wiring pod A")?;
            let b = wire_pod(&host, "pw-b", Ipv4Addr::new(10, 244, 0, 3))
                .await
                .context("wiring pod B")?;
            anyhow::Ok((a, b))
        })?;

    let mut datapath = Datapath::load(podwire_agent::OBJECT, LoadOptions::default())
        .context("loading the datapath")?;
    for pod in [&a, &b] {
        datapath
            .endpoints
            .set(pod.ip, pod.endpoint)
            .with_context(|| format!("writing the endpoint of {}", pod.ip))?;
        // Both of a pod's hooks, as the agent attaches them (to_pod at egress sees nothing here:
        // from_pod delivers past the stack). Without TCX (checked above) nothing is pinned: the
        // path is never created.
        for hook in Hook::pod(pod.host_if) {
            let pin = Path::new("/sys/fs/bpf/podwire-verify").join(hook.program);
            datapath
                .attach_pinned(hook, &pin)
                .with_context(|| format!("attaching {} to {}", hook.program, pod.host_if))?;
        }
    }

    let socket = |pod: &Pod| {
        enter(&pod.ns, || {
            let socket = UdpSocket::bind((pod.ip, PORT))
                .with_context(|| format!("binding UDP {}:{PORT}", pod.ip))?;
            socket
                .set_read_timeout(Some(RECV_TIMEOUT))
                .context("setting a receive timeout")?;
            anyhow::Ok(socket)
        })
        .with_context(|| format!("entering the network namespace of {}", pod.ip))?
    };
    let (socket_a, socket_b) = (socket(&a)?, socket(&b)?);
    let mut bytes = 0;
    for (i, &len) in SIZES.iter().enumerate() {
        let payload: Vec<u8> = (0..len).map(|j| (i * 31 + j * 7) as u8).collect();
        exchange(&datapath, (&socket_a, a.ip), (&socket_b, b.ip), &payload)?;
        exchange(&datapath, (&socket_b, b.ip), (&socket_a, a.ip), &payload)?;
        bytes += 2 * (HEADERS + len as u64);
    }

    let sent = 2 * SIZES.len() as u64;
    let redirected = datapath
        .counters
        .get(Reason::RedirectLocal)
        .context("reading the counters")?;
    ensure!(
        (redirected.packets, redirected.bytes) == (sent, bytes),
        "{sent} datagrams ({bytes} bytes) arrived, but from_pod counted {} packets ({} bytes) \
         delivered with bpf_redirect_peer; counters: {}",
        redirected.packets,
        redirected.bytes,
        counters(&datapath)
    );
    // Read back rather than assumed: the report says what the node was like when it was done.
    let forwarding = std::fs::read_to_string(IP_FORWARD)
        .context("reading IP forwarding back")?
        .trim()
        != "0";
    println!(
        "podwire-verify: delivered {sent} datagrams pod-to-pod ({} each way, {} to {} bytes) on \
         kernel {kernel} via netlink tc, forwarding {}",
        SIZES.len(),
        SIZES[0],
        SIZES[SIZES.len() - 1],
        if forwarding { "on" } else { "off" }
    );
    Ok(Delivery {
        datagrams: sent,
        min_bytes: SIZES[0],
        max_bytes: SIZES[SIZES.len() - 1],
        attach: NETLINK_TC.to_owned(),
        forwarding,
    })
}

/// Sends `payload` from one pod's socket to the other's and checks it arrives intact.
fn exchange(
    datapath: &Datapath,
    (from, from_ip): (&UdpSocket, Ipv4Addr),
    (to, to_ip): (&UdpSocket, Ipv4Addr),
    payload: &[u8],
) -> Result<()> {
    from.send_to(payload, (to_ip, PORT))
        .with_context(|| format!("sending {} bytes from {from_ip} to {to_ip}", payload.len()))?;
    let mut buf = [0; 2048];
    let (len, source) = to.recv_from(&mut buf).with_context(|| {
        format!(
            "{to_ip} receiving {} bytes from {from_ip}; counters: {}",
            payload.len(),
            counters(datapath)
        )
    })?;
    ensure!(
        source == SocketAddr::from((from_ip, PORT)),
        "{to_ip} received a datagram from {source}, expected one from {from_ip}:{PORT}"
    );
    ensure!(
        &buf[..len] == payload,
        "{to_ip} received {len} bytes from {from_ip} that differ from the {} sent",
        payload.len()
    );
    Ok(())
}

/// The non-zero counters, for failure messages.
fn counters(datapath: &Datapath) -> String {
    match datapath.counters.all() {
        Ok(all) => all
            .iter()
            .filter(|(_, c)| c.packets > 0)
            .map(|(reason, c)| format!("{} {} packets", reason.name(), c.packets))
            .collect::<Vec<_>>()
            .join(", "),
        Err(e) => format!("unreadable ({e})"),
    }
}

/// Creates a pod: a network namespace, and the veth pair and addressing exactly as the CNI plugin
/// makes them (`podwire_netlink::pod`), `host_if` in the node (`host`) and eth0 in the pod.
async fn wire_pod(host: &Netlink, host_if: &'static str, ip: Ipv4Addr) -> Result<Pod> {
    let ns = new_netns()?;
    // The namespace has no name: the wiring reaches it through this process's open file.
    let path = format!("/proc/self/fd/{}", ns.as_raw_fd());
    let pod_netns = PodNetns::open(&path).context("opening the pod's network namespace")?;
    let want = PodInterface {
        host_ifname: host_if,
        ifname: POD_IF,
        ip,
        mtu: MTU,
        split: None,
    };
    let veth = create(host, &pod_netns, want)
        .await
        .with_context(|| format!("wiring {host_if} and {POD_IF} for {ip}"))?;
    Ok(Pod {
        ns,
        ip,
        host_if,
        endpoint: podwire_agent::lifecycle::endpoint_of(ip, &veth)?,
    })
}

/// A new network namespace, held by the returned file (no name, no bind mount): made on a thread
/// of its own so this process stays in the node's.
fn new_netns() -> Result<File> {
    thread::spawn(|| -> Result<File> {
        unshare(CloneFlags::CLONE_NEWNET)?;
        Ok(File::open("/proc/thread-self/ns/net")?)
    })
    .join()
    .expect("the namespace thread does not panic")
    .context("creating a network namespace")
}

/// Two nodes with the real agent and plugin, traffic across them, and the agents killed and
/// restarted under it. The VM has no iproute2 and no `ip netns`: every namespace is held by a
/// `busybox sleep` of its own, links are made with busybox's `ip`, and the agent and the plugin
/// run in a namespace through busybox's `nsenter`.
mod cluster {
    use std::{
        fs::File,
        net::Ipv4Addr,
        os::unix::process::CommandExt as _,
        path::{Path, PathBuf},
        process::{Child, Command},
        time::{Duration, Instant},
    };

    use anyhow::{ensure, Context as _, Result};
    use nix::sched::{unshare, CloneFlags};
    use podwire_common::Reason;
    use podwire_core::{
        cluster::{Cluster, NodeInfo},
        pins::Pins,
    };
    use podwire_datapath::{Counters, DatapathMap as _, Endpoints};
    use podwire_lab::{
        cni::pod_ip,
        eventually,
        load::{Pace, PingReport, Pinger, Stream, StreamReport},
        nodes::PinnedIds,
        processes::{run, run_with_stdin, Daemon},
        vm::{ClusterCheck, PingResult, Restart, StreamResult, NETLINK_TC},
    };

    const BUSYBOX: &str = "/bin/busybox";
    /// Agent restarts, alternating between the nodes: each costs the emulated VM seconds of
    /// verifier time.
    const RESTARTS: usize = 3;
    /// How long an agent stays dead before it is started again.
    const DOWN: Duration = Duration::from_millis(500);
    /// The emulated VM is slow: an agent's start (all programs through the verifier) takes
    /// seconds there.
    const AGENT_START: Duration = Duration::from_secs(120);
    /// Light enough for one emulated CPU running two agents.
    const PACE: Pace = Pace {
        chunk: 4096,
        interval: Duration::from_millis(10),
    };
    const PING_INTERVAL: Duration = Duration::from_millis(10);
    /// Bounds the waits for traffic to show; never what is asserted.
    const PROGRESS: Duration = Duration::from_secs(30);

    /// A network namespace held by a process of its own, killed on drop (the namespace goes with
    /// it once nothing else holds it).
    struct Host {
        holder: Child,
        ns: File,
    }

    impl Host {
        fn new() -> Result<Host> {
            let mut cmd = Command::new(BUSYBOX);
            cmd.args(["sleep", "100000"]);
            // SAFETY: unshare is a plain syscall, safe between fork and exec.
            unsafe {
                cmd.pre_exec(|| unshare(CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from));
            }
            let holder = cmd.spawn().context("starting a namespace's holder")?;
            let ns = File::open(format!("/proc/{}/ns/net", holder.id()))
                .context("opening a new network namespace")?;
            let host = Host { holder, ns };
            host.ip(&["link", "set", "lo", "up"])?;
            Ok(host)
        }

        /// The namespace's path, as CNI_NETNS names it.
        fn path(&self) -> String {
            format!("/proc/{}/ns/net", self.holder.id())
        }

        fn pid(&self) -> u32 {
            self.holder.id()
        }

        /// `program` run in this namespace, through busybox's nsenter (which execs it, so the
        /// process is the program's).
        fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
            let mut cmd = Command::new(BUSYBOX);
            cmd.arg("nsenter")
                .arg(format!("--net={}", self.path()))
                .arg(program);
            cmd
        }

        /// busybox `ip` with `args` in this namespace.
        fn ip(&self, args: &[&str]) -> Result<()> {
            run(self.command(BUSYBOX).arg("ip").args(args))?;
            Ok(())
        }
    }

    impl Drop for Host {
        fn drop(&mut self) {
            let _ = self.holder.kill();
            let _ = self.holder.wait();
        }
    }

    /// A node: its namespace on the underlay, its agent's files, and the agent when running.
    struct Node {
        name: String,
        host: Host,
        dir: PathBuf,
        agent: Option<Daemon>,
        /// The agent's binary.
        binary: PathBuf,
        cluster_file: PathBuf,
    }

    impl Node {
        fn pins(&self) -> Pins {
            Pins::new(format!("/sys/fs/bpf/podwire-{}", self.name))
        }

        fn socket(&self) -> PathBuf {
            self.dir.join("agent.sock")
        }

        /// Starts the agent and waits until it serves CNI requests.
        fn start_agent(&mut self) -> Result<()> {
            let mut cmd = self.host.command(&self.binary);
            cmd.arg("--cluster-file")
                .arg(&self.cluster_file)
                .args(["--node-name", &self.name])
                .arg("--state-dir")
                .arg(self.dir.join("state"))
                .arg("--socket")
                .arg(self.socket())
                .arg("--bpffs")
                .arg(self.pins().root())
                .args(["--http-address", "127.0.0.1:9962"])
                .env("PODWIRE_LOG", "info");
            let mut agent = Daemon::spawn(cmd, None)?;
            agent
                .wait_for_line_within("serving CNI requests", AGENT_START)
                .with_context(|| format!("podwire-agent of {}", self.name))?;
            self.agent = Some(agent);
            Ok(())
        }

        fn kill_agent(&mut self) -> Result<()> {
            let agent = self.agent.take().context("the agent is not running")?;
            agent.stop(nix::sys::signal::Signal::SIGKILL)?;
            Ok(())
        }

        /// Execs the plugin for `command` (ADD, DEL) of `container` in `pod`, as a runtime does;
        /// its result (null when it prints none, as DEL).
        fn cni(&self, command: &str, container: &str, pod: &Host) -> Result<serde_json::Value> {
            let plugin = self.binary.with_file_name("podwire-cni");
            let conf = serde_json::json!({
                "cniVersion": "1.1.0", "name": "podwire", "type": "podwire-cni",
                "agentSocket": self.socket(),
            });
            let out = run_with_stdin(
                self.host
                    .command(&plugin)
                    .env("CNI_COMMAND", command)
                    .env("CNI_CONTAINERID", container)
                    .env("CNI_NETNS", pod.path())
                    .env("CNI_IFNAME", "eth0")
                    .env("CNI_PATH", plugin.parent().unwrap_or(Path::new("/"))),
                conf.to_string().as_bytes(),
            )
            .with_context(|| format!("CNI {command} of {container} on {}", self.name))?;
            if out.stdout.is_empty() {
                return Ok(serde_json::Value::Null);
            }
            serde_json::from_slice(&out.stdout)
                .with_context(|| format!("CNI {command} of {container}: output is not JSON"))
        }

        fn endpoints(&self) -> Result<Vec<(Ipv4Addr, podwire_common::Endpoint)>> {
            let mut list = Endpoints::open(&self.pins())?.list()?;
            list.sort_by_key(|(ip, _)| *ip);
            Ok(list)
        }

        fn counter(&self, reason: Reason) -> Result<u64> {
            Ok(Counters::open(&self.pins())?.get(reason)?.packets)
        }
    }

    /// A pod: its namespace and address, on node `node`.
    struct Pod {
        host: Host,
        ip: Ipv4Addr,
        node: usize,
    }

    impl Pod {
        fn ns(&self) -> &File {
            &self.host.ns
        }
    }

    fn node_ip(i: usize) -> Ipv4Addr {
        Ipv4Addr::new(192, 168, 77, 1 + i as u8)
    }

    /// Builds the nodes, starts their agents and wires two pods on each.
    fn build(dir: &Path) -> Result<(Vec<Node>, Vec<Pod>)> {
        let binary = std::env::current_exe()
            .context("finding podwire-verify's own path")?
            .with_file_name("podwire-agent");
        ensure!(
            binary.exists() && binary.with_file_name("podwire-cni").exists(),
            "podwire-agent and podwire-cni must lie next to podwire-verify ({})",
            binary.display()
        );
        let cluster_file = dir.join("cluster.json");
        let cluster = Cluster {
            cluster_cidr: Some("10.244.0.0/16".parse()?),
            nodes: (0..2)
                .map(|i| -> Result<NodeInfo> {
                    Ok(NodeInfo {
                        name: format!("node{}", i + 1),
                        address: node_ip(i),
                        pod_cidr: format!("10.244.{}.0/24", i + 1).parse()?,
                    })
                })
                .collect::<Result<_>>()?,
        };
        std::fs::write(&cluster_file, serde_json::to_string(&cluster)?)
            .context("writing the cluster file")?;
        let mut nodes = Vec::new();
        for i in 0..2 {
            let name = format!("node{}", i + 1);
            let node_dir = dir.join(&name);
            std::fs::create_dir_all(&node_dir).context("creating a node's directory")?;
            nodes.push(Node {
                name,
                host: Host::new()?,
                dir: node_dir,
                agent: None,
                binary: binary.clone(),
                cluster_file: cluster_file.clone(),
            });
        }
        // The underlay: one veth pair, eth0 in each node. busybox names the peer veth0 and moves
        // a link to a namespace only by a process id.
        nodes[0].host.ip(&["link", "add", "eth0", "type", "veth"])?;
        let pid = nodes[1].host.pid().to_string();
        nodes[0].host.ip(&["link", "set", "veth0", "netns", &pid])?;
        nodes[1]
            .host
            .ip(&["link", "set", "veth0", "name", "eth0"])?;
        for (i, node) in nodes.iter().enumerate() {
            node.host
                .ip(&["addr", "add", &format!("{}/24", node_ip(i)), "dev", "eth0"])?;
            node.host.ip(&["link", "set", "eth0", "up"])?;
            run(node
                .host
                .command(BUSYBOX)
                .args(["sysctl", "-w", "net.ipv4.ip_forward=0"]))?;
        }
        for node in &mut nodes {
            let started = Instant::now();
            node.start_agent()?;
            println!(
                "podwire-verify: {}'s podwire-agent serving after {:.1} s",
                node.name,
                started.elapsed().as_secs_f64()
            );
        }
        let mut pods = Vec::new();
        for (i, node) in nodes.iter().enumerate() {
            for n in 0..2 {
                let host = Host::new()?;
                let result = node.cni("ADD", &format!("vm-{i}-{n}"), &host)?;
                pods.push(Pod {
                    ip: pod_ip(&result)?,
                    host,
                    node: i,
                });
            }
        }
        Ok((nodes, pods))
    }

    pub fn check() -> Result<ClusterCheck> {
        let dir = Path::new("/run/podwire-verify");
        std::fs::create_dir_all(dir).context("creating /run/podwire-verify")?;
        let (mut nodes, pods) = build(dir)?;
        // pods: node1 0 and 1, node2 2 and 3.
        let flows = [
            ("node1 same-node", 0, 1),
            ("node1->node2", 0, 2),
            ("node2->node1", 3, 1),
        ];
        let mut streams = Vec::new();
        let mut pingers = Vec::new();
        for (name, client, server) in flows {
            let (c, s) = (&pods[client], &pods[server]);
            streams.push((
                c.node != s.node,
                Stream::start(name, c.ns(), s.ns(), s.ip, PACE)?,
            ));
            pingers.push((
                c.node != s.node,
                Pinger::start(name, s.ns(), c.ip, PING_INTERVAL)?,
            ));
        }
        let received = |streams: &[(bool, Stream)]| -> Vec<u64> {
            streams.iter().map(|(_, s)| s.received()).collect()
        };
        let progressed = |streams: &[(bool, Stream)], since: &[u64]| {
            streams
                .iter()
                .zip(since)
                .all(|((_, s), &before)| s.received() > before)
        };
        let start = vec![0; streams.len()];
        ensure!(
            eventually(PROGRESS, || Ok(progressed(&streams, &start)))?,
            "the streams carry nothing, across nodes or on one"
        );
        println!("podwire-verify: streams and pings running on one node and across nodes");

        let mut restarts = Vec::new();
        for r in 0..RESTARTS {
            let i = r % 2;
            let ids = PinnedIds::read(&nodes[i].pins())?;
            let entries = nodes[i].endpoints()?;
            let killed = Instant::now();
            nodes[i].kill_agent()?;
            std::thread::sleep(DOWN);
            let before = received(&streams);
            nodes[i].start_agent()?;
            let serving = killed.elapsed();
            let not_adopted = ids.not_adopted(&PinnedIds::read(&nodes[i].pins())?);
            let endpoints_kept = nodes[i].endpoints()? == entries;
            // A pod added now reaches a pod on the other node, and goes again.
            let late = Host::new()?;
            let container = format!("vm-late-{r}");
            let late_ip = pod_ip(&nodes[i].cni("ADD", &container, &late)?)?;
            let far = pods
                .iter()
                .find(|p| p.node != i)
                .expect("pods on both nodes");
            let pinger = Pinger::start("late", &late.ns, far.ip, PING_INTERVAL)?;
            let answered = eventually(PROGRESS, || Ok(pinger.received() >= 3))?;
            pinger.finish()?;
            nodes[i].cni("DEL", &container, &late)?;
            let restart = Restart {
                node: nodes[i].name.clone(),
                serving_ms: serving.as_millis() as u64,
                not_adopted,
                endpoints_kept,
                new_pod_reached: answered,
            };
            println!(
                "podwire-verify: restart {r}: {}'s agent killed, serving again after {} ms; \
                 maps and links adopted: {}, endpoints kept: {endpoints_kept}, new pod {late_ip} \
                 reached {}: {answered}",
                restart.node,
                restart.serving_ms,
                restart.not_adopted.is_empty(),
                far.ip
            );
            restarts.push(restart);
            ensure!(
                eventually(PROGRESS, || Ok(progressed(&streams, &before)))?,
                "restart {r}: not every stream made progress after {}'s agent came back",
                nodes[i].name
            );
        }

        let mut tunnelled_packets = 0;
        let mut from_tunnel_packets = 0;
        // Whichever mode the agents run: through the VXLAN device, the programs' own tunnel, or
        // natively routed.
        for node in &nodes {
            for reason in [
                Reason::RedirectOverlay,
                Reason::RedirectEncap,
                Reason::RedirectNative,
            ] {
                tunnelled_packets += node.counter(reason)?;
            }
            for reason in [
                Reason::RedirectFromOverlay,
                Reason::RedirectDecap,
                Reason::RedirectFromNative,
            ] {
                from_tunnel_packets += node.counter(reason)?;
            }
        }
        let streams = streams
            .into_iter()
            .map(|(cross_node, stream)| {
                let name = stream.name().to_owned();
                stream_result(cross_node, name, stream.finish())
            })
            .collect();
        let pings = pingers
            .into_iter()
            .map(|(cross_node, pinger)| ping_result(cross_node, pinger.finish()))
            .collect::<Result<_>>()?;
        Ok(ClusterCheck {
            attach: NETLINK_TC.to_owned(),
            tunnelled_packets,
            from_tunnel_packets,
            restarts,
            streams,
            pings,
        })
    }

    fn stream_result(cross_node: bool, name: String, report: Result<StreamReport>) -> StreamResult {
        let result = match report {
            Ok(r) => StreamResult {
                name,
                cross_node,
                bytes: r.bytes,
                longest_gap_ms: r.longest_gap.as_millis() as u64,
                retransmits: r.retransmits,
                error: None,
            },
            Err(e) => StreamResult {
                name,
                cross_node,
                bytes: 0,
                longest_gap_ms: 0,
                retransmits: 0,
                error: Some(format!("{e:#}")),
            },
        };
        println!(
            "podwire-verify: stream {}: {} bytes in order, longest gap {} ms, {} retransmits{}",
            result.name,
            result.bytes,
            result.longest_gap_ms,
            result.retransmits,
            result
                .error
                .as_ref()
                .map(|e| format!(", broken: {e}"))
                .unwrap_or_default()
        );
        result
    }

    fn ping_result(cross_node: bool, report: Result<PingReport>) -> Result<PingResult> {
        let r = report?;
        println!(
            "podwire-verify: ping {}: {} sent, {} lost, longest run lost {}",
            r.name,
            r.sent,
            r.lost(),
            r.longest_loss_run
        );
        Ok(PingResult {
            name: r.name,
            cross_node,
            sent: r.sent,
            received: r.received,
            longest_loss_run: r.longest_loss_run,
        })
    }
}
