//! Nodes: a namespace running a podwire agent with its own state directory, socket and pin root;
//! an underlay bridge to plug nodes and other hosts into; a cluster of nodes on it fed by a
//! cluster file; and the bare node-and-pod pair the datapath tests attach programs to by hand.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{ensure, Context as _, Result};
use nix::sys::signal::Signal;
use podwire_common::{Counter, Endpoint, Reason};
use podwire_core::{
    cluster::{Cluster as ClusterFile, NodeInfo},
    pins::Pins,
};
use podwire_datapath::{Counters, DatapathMap as _, Endpoints};

use crate::{
    artifacts::bin,
    namespaces::{sweep_stale, unique_name, NetNs},
    processes::{run, Daemon},
};

/// A pin root of its own below /sys/fs/bpf, removed with everything pinned in it on drop (links
/// unpinned detach, maps go once nothing holds them).
pub struct PinRoot(PathBuf);

impl PinRoot {
    pub fn new() -> PinRoot {
        static SWEEP: std::sync::Once = std::sync::Once::new();
        SWEEP.call_once(|| sweep_stale(Path::new(podwire_core::pins::BPFFS)));
        PinRoot(Path::new(podwire_core::pins::BPFFS).join(unique_name("pins")))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn pins(&self) -> Pins {
        Pins::new(&self.0)
    }
}

impl Default for PinRoot {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PinRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A node: a namespace holding the node's address and running a podwire agent that serves CNI
/// requests, with its own state directory, socket and bpffs pins.
pub struct Node {
    pub ns: NetNs,
    pub ip: Ipv4Addr,
    /// What tells the agent its pod CIDR: `--pod-cidr ...` or `--cluster-file ... --node-name ...`.
    agent_args: Vec<String>,
    /// Agent log lines are echoed behind this prefix (the demo), or only collected.
    echo: Option<String>,
    pub state_dir: tempfile::TempDir,
    pub pins: PinRoot,
    agent: Option<Daemon>,
}

impl Node {
    /// A node alone: a namespace with `ip` on its loopback (the address it reaches its pods
    /// from) and an agent serving `pod_cidr`.
    pub fn start(ip: Ipv4Addr, pod_cidr: &str) -> Result<Node> {
        let ns = NetNs::new("node")?;
        ns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "lo"])?;
        Self::start_in(ns, ip, vec!["--pod-cidr".into(), pod_cidr.into()], None)
    }

    /// Starts an agent in `ns` (which holds `ip`) with `agent_args` saying where its pod CIDR
    /// comes from, and waits until it serves CNI requests.
    pub fn start_in(
        ns: NetNs,
        ip: Ipv4Addr,
        agent_args: Vec<String>,
        echo: Option<String>,
    ) -> Result<Node> {
        let mut node = Node {
            ns,
            ip,
            agent_args,
            echo,
            state_dir: tempfile::tempdir().context("creating the agent's state directory")?,
            pins: PinRoot::new(),
            agent: None,
        };
        node.start_agent()?;
        Ok(node)
    }

    /// The agent's API socket.
    pub fn socket(&self) -> PathBuf {
        self.state_dir.path().join("agent.sock")
    }

    /// The agent's pin layout.
    pub fn pins(&self) -> Pins {
        self.pins.pins()
    }

    /// A command running `program` in the node's network namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        self.ns.command(program)
    }

    /// The node's agent as [`Node::start_agent`] runs it (its pod CIDR or cluster, state
    /// directory, socket and pins), for a test to add an environment or a flag to.
    pub fn agent_command(&self) -> Result<Command> {
        let mut cmd = self.command(bin("podwire-agent")?);
        cmd.args(&self.agent_args)
            .arg("--state-dir")
            .arg(self.state_dir.path())
            .arg("--socket")
            .arg(self.socket())
            .arg("--bpffs")
            .arg(self.pins.path())
            .env("PODWIRE_LOG", "info");
        Ok(cmd)
    }

    /// Starts the agent and waits until it serves CNI requests.
    pub fn start_agent(&mut self) -> Result<()> {
        let cmd = self.agent_command()?;
        let mut agent = Daemon::spawn(cmd, self.echo.clone())?;
        agent
            .wait_for_line("serving CNI requests")
            .with_context(|| format!("podwire-agent in {}", self.ns.name()))?;
        self.agent = Some(agent);
        Ok(())
    }

    /// Stops the agent with SIGTERM, as a DaemonSet rollout does, checking it exits cleanly;
    /// returns its log.
    pub fn stop_agent(&mut self) -> Result<Vec<String>> {
        let agent = self.agent.take().context("the agent is not running")?;
        let (status, log) = agent.stop(Signal::SIGTERM)?;
        ensure!(status.success(), "agent exit: {status}\n{}", log.join("\n"));
        Ok(log)
    }

    /// Kills the agent with SIGKILL, as a crash or the OOM killer does: none of its shutdown
    /// runs. Returns its log.
    pub fn kill_agent(&mut self) -> Result<Vec<String>> {
        use std::os::unix::process::ExitStatusExt as _;
        let agent = self.agent.take().context("the agent is not running")?;
        let (status, log) = agent.stop(Signal::SIGKILL)?;
        ensure!(
            status.signal() == Some(Signal::SIGKILL as i32),
            "the agent was not killed by SIGKILL but exited: {status}\n{}",
            log.join("\n")
        );
        Ok(log)
    }

    /// The kernel's ids of what the agent pinned, and of the programs of its tc filters on the
    /// pods' veths (see [`PinnedIds`]).
    pub fn pinned_ids(&self) -> Result<PinnedIds> {
        let mut ids = PinnedIds::read(&self.pins())?;
        for veth in self.host_veths()? {
            for (direction, program) in [("ingress", "from_pod"), ("egress", "to_pod")] {
                let out = run(self
                    .ns
                    .command("tc")
                    .args(["-j", "filter", "show", "dev", &veth, direction]))?;
                let filters: serde_json::Value = serde_json::from_slice(&out.stdout)
                    .with_context(|| format!("tc's filters of {veth} {direction}"))?;
                let id = filters.as_array().into_iter().flatten().find_map(|f| {
                    let options = &f["options"];
                    (options["handle"] == "0x7077" && options["bpf_name"].as_str() == Some(program))
                        .then(|| options["prog"]["id"].as_u64())
                        .flatten()
                });
                if let Some(id) = id {
                    ids.filters
                        .insert(format!("{program}-{veth}"), u32::try_from(id)?);
                }
            }
        }
        Ok(ids)
    }

    /// Runs the `podwire` CLI on this node with `args` (its pin root given), failing unless it
    /// succeeds.
    pub fn podwire(&self, args: &[&str]) -> Result<Output> {
        run(self
            .command(bin("podwire")?)
            .arg("--bpffs")
            .arg(self.pins.path())
            .args(args))
    }

    /// The node's pinned endpoint map, as the datapath sees it (readable with the agent down).
    pub fn endpoints(&self) -> Result<Vec<(Ipv4Addr, Endpoint)>> {
        Ok(Endpoints::open(&self.pins())?.list()?)
    }

    /// The node's pinned count of `reason`, summed over CPUs.
    pub fn counter(&self, reason: Reason) -> Result<Counter> {
        Ok(Counters::open(&self.pins())?.get(reason)?)
    }

    /// Names of the host-side veths the plugin made in this node.
    pub fn host_veths(&self) -> Result<Vec<String>> {
        let mut names = self.ns.link_names(&["type", "veth"])?;
        names.retain(|n| n.starts_with("pw"));
        Ok(names)
    }

    /// The agent's persisted state file.
    pub fn state(&self) -> Result<serde_json::Value> {
        let path = self.state_dir.path().join("state.json");
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        Ok(serde_json::from_slice(&bytes)?)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // The agent first: its pins and namespace go after it.
        drop(self.agent.take());
    }
}

/// The kernel's ids of everything pinned below a pin root: each map's id, and each link's id with
/// the id of the program it runs; and the programs of podwire's netlink tc filters on the pods'
/// veths, which hold their programs without a pin. A restarted agent that adopts the pinned
/// state keeps every map id (a re-created map gets a new one, empty), every link id and every
/// filter, with its own program swapped into the links and filters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PinnedIds {
    /// Map name to map id.
    pub maps: BTreeMap<String, u32>,
    /// Link pin name (`<program>-<interface>`) to link id and program id.
    pub links: BTreeMap<String, (u32, u32)>,
    /// `<program>-<veth>` to the id of the program podwire's filter there runs.
    pub filters: BTreeMap<String, u32>,
}

impl PinnedIds {
    /// Reads the ids of the maps and links pinned below `pins`; a root with no links directory
    /// (nothing pinned yet, or a kernel without tc links) has no links.
    pub fn read(pins: &Pins) -> Result<PinnedIds> {
        use aya::{
            maps::MapInfo,
            programs::links::{FdLink, PinnedLink},
        };
        let mut ids = PinnedIds::default();
        for name in podwire_core::object::maps::PINNED {
            let path = pins.map(name);
            let info = MapInfo::from_pin(&path)
                .with_context(|| format!("opening the pinned map {}", path.display()))?;
            ids.maps.insert(name.to_owned(), info.id());
        }
        let dir = pins.links_dir();
        let entries = match std::fs::read_dir(&dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ids),
            entries => entries.with_context(|| format!("listing {}", dir.display()))?,
        };
        for entry in entries {
            let path = entry?.path();
            let link = FdLink::from(
                PinnedLink::from_pin(&path)
                    .with_context(|| format!("opening the pinned link {}", path.display()))?,
            );
            let info = link
                .info()
                .with_context(|| format!("reading the pinned link {}", path.display()))?;
            let name = path
                .file_name()
                .expect("a directory entry has a name")
                .to_string_lossy()
                .into_owned();
            ids.links.insert(name, (info.id(), info.program_id()));
        }
        Ok(ids)
    }

    /// What differs between `self` (before a restart) and `after`, beyond the links' programs:
    /// maps or links gone, added or re-created. Empty when `after` adopted everything.
    pub fn not_adopted(&self, after: &PinnedIds) -> Vec<String> {
        let mut differences = Vec::new();
        for (name, id) in &self.maps {
            match after.maps.get(name) {
                None => differences.push(format!("map {name} is no longer pinned")),
                Some(new) if new != id => {
                    differences.push(format!("map {name} was re-created (id {id} -> {new})"))
                }
                Some(_) => {}
            }
        }
        for (name, (id, _)) in &self.links {
            match after.links.get(name) {
                None => differences.push(format!("link {name} is no longer pinned")),
                Some((new, _)) if new != id => {
                    differences.push(format!("link {name} was re-created (id {id} -> {new})"))
                }
                Some(_) => {}
            }
        }
        for name in self.filters.keys() {
            if !after.filters.contains_key(name) {
                differences.push(format!("the tc filter {name} is gone"));
            }
        }
        differences
    }
}

/// An underlay network: a bridge in a namespace of its own, which hosts plug into.
pub struct Underlay {
    pub ns: NetNs,
}

/// The bridge's name in the underlay namespace.
pub const BRIDGE: &str = "br0";

impl Underlay {
    pub fn new() -> Result<Underlay> {
        let ns = NetNs::new("underlay")?;
        ns.ip(&["link", "add", BRIDGE, "type", "bridge"])?;
        ns.ip(&["link", "set", BRIDGE, "up"])?;
        Ok(Underlay { ns })
    }

    /// A new host for `role` plugged into the bridge as `eth0` with `ip`/24, and IP forwarding
    /// as given.
    pub fn plug(&self, role: &str, ip: Ipv4Addr, forwarding: bool) -> Result<NetNs> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let host = NetNs::new(role)?;
        let port = format!("p{}", NEXT.fetch_add(1, Ordering::Relaxed));
        self.ns.add_veth(&port, &host, "eth0", None)?;
        self.ns
            .ip(&["link", "set", &port, "master", BRIDGE, "up"])?;
        host.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        host.ip(&["link", "set", "eth0", "up"])?;
        host.sysctl_ipv4("ip_forward", if forwarding { "1" } else { "0" })?;
        Ok(host)
    }
}

/// The pod range of every lab cluster.
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";

/// How to start a [`Cluster`].
#[derive(Clone, Debug, Default)]
pub struct ClusterSpec {
    /// How many nodes.
    pub nodes: usize,
    /// More arguments for every agent (e.g. `--vni 42`).
    pub agent_args: Vec<String>,
    /// Echo the agents' logs, each line behind its node's name.
    pub echo_agents: bool,
}

/// Nodes on an underlay, their agents fed by one cluster file. Node `i` (from 0) is named
/// `node<i+1>`, has the underlay address 192.168.77.<i+1> and pod CIDR 10.244.<i+1>.0/24. IP
/// forwarding is off in the nodes, so only podwire's eBPF path carries pod traffic.
pub struct Cluster {
    pub nodes: Vec<Node>,
    pub underlay: Underlay,
    dir: tempfile::TempDir,
}

impl Cluster {
    pub fn start(spec: ClusterSpec) -> Result<Cluster> {
        let underlay = Underlay::new()?;
        let dir = tempfile::tempdir().context("creating the cluster file's directory")?;
        let mut cluster = Cluster {
            nodes: Vec::new(),
            underlay,
            dir,
        };
        let all: Vec<usize> = (0..spec.nodes).collect();
        cluster.write_members(&all)?;
        for i in all {
            let ns = cluster.underlay.plug("node", Self::node_ip(i), false)?;
            let mut args = vec![
                "--cluster-file".into(),
                cluster.file().display().to_string(),
                "--node-name".into(),
                Self::node_name(i),
            ];
            args.extend(spec.agent_args.iter().cloned());
            let echo = spec
                .echo_agents
                .then(|| format!("  {} agent | ", Self::node_name(i)));
            cluster
                .nodes
                .push(Node::start_in(ns, Self::node_ip(i), args, echo)?);
        }
        Ok(cluster)
    }

    pub fn node_name(i: usize) -> String {
        format!("node{}", i + 1)
    }

    pub fn node_ip(i: usize) -> Ipv4Addr {
        Ipv4Addr::new(
            192,
            168,
            77,
            u8::try_from(i + 1).expect("fewer than 255 nodes"),
        )
    }

    pub fn pod_cidr(i: usize) -> String {
        format!("10.244.{}.0/24", i + 1)
    }

    /// The cluster file the agents read.
    pub fn file(&self) -> PathBuf {
        self.dir.path().join("cluster.json")
    }

    /// Rewrites the cluster file to list only the nodes `members` (indices); the agents pick it
    /// up without a restart.
    pub fn write_members(&self, members: &[usize]) -> Result<()> {
        let cluster = ClusterFile {
            cluster_cidr: Some(CLUSTER_CIDR.parse()?),
            nodes: members
                .iter()
                .map(|&i| -> Result<NodeInfo> {
                    Ok(NodeInfo {
                        name: Self::node_name(i),
                        address: Self::node_ip(i),
                        pod_cidr: Self::pod_cidr(i).parse()?,
                    })
                })
                .collect::<Result<_>>()?,
        };
        let path = self.file();
        std::fs::write(&path, serde_json::to_string_pretty(&cluster)?)
            .with_context(|| format!("writing {}", path.display()))
    }
}

/// A "node" namespace and a "pod" namespace joined by a veth: `host0` in the node, `eth0` in the
/// pod, addressed on one /24. No agent: tests attach the programs themselves.
pub struct NodeAndPod {
    pub node: NetNs,
    pub pod: NetNs,
}

impl NodeAndPod {
    pub const HOST_IF: &'static str = "host0";
    pub const POD_IF: &'static str = "eth0";
    pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
    pub const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);

    pub fn new() -> Result<NodeAndPod> {
        let node = NetNs::new("node")?;
        let pod = NetNs::new("pod")?;
        node.add_veth(Self::HOST_IF, &pod, Self::POD_IF, None)?;
        node.ip(&[
            "addr",
            "add",
            &format!("{}/24", Self::NODE_IP),
            "dev",
            Self::HOST_IF,
        ])?;
        node.ip(&["link", "set", Self::HOST_IF, "up"])?;
        pod.ip(&[
            "addr",
            "add",
            &format!("{}/24", Self::POD_IP),
            "dev",
            Self::POD_IF,
        ])?;
        pod.ip(&["link", "set", Self::POD_IF, "up"])?;
        Ok(NodeAndPod { node, pod })
    }
}
