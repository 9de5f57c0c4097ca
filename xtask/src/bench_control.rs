//! The control plane's part of `cargo xtask bench`: CNI ADD and DEL against the reference
//! `bridge` + `host-local` plugins, the kernel's own floor for a veth pair, the agent's memory,
//! the node table's apply time.
//!
//! Both plugins are exec'd as a container runtime execs them: the binary itself (no shell, no
//! `nsenter` in between: it is spawned from a thread in the node's network namespace),
//! the CNI_* environment, the configuration a runtime hands the plugin out of its conflist on
//! stdin, every pod a fresh network namespace. podwire runs on one node of the lab's cluster
//! with its agent; the reference plugins on a node namespace of their own, configured as
//! kubeadm-era clusters did (`cni0`, gateway, masquerade, hairpin, MTU 1500, the node's subnet
//! from `host-local`). The kernel's floor is `ip link add ... type veth peer ... netns <pod>` and
//! `ip link del` on a third node namespace. The three take turns pod by pod (the order rotating),
//! so a busy machine slows them alike; only ratios within one run mean anything.

use std::{
    fs::File,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{ensure, Context as _, Result};
use podwire_core::cluster::{Cluster as ClusterFile, NodeInfo};
use podwire_lab::{
    artifacts::bin,
    namespaces::{enter, NetNs},
    nodes::{Cluster, ClusterSpec, CLUSTER_CIDR},
    processes::Daemon,
};

/// One measured quantity, podwire's and (where there is one) the baseline's, in one run.
#[derive(Clone)]
pub struct Comparison {
    /// What was measured, e.g. "ADD p50".
    pub metric: String,
    /// Unit of both values, e.g. "ms".
    pub unit: &'static str,
    pub podwire: f64,
    /// The baseline's name and value, e.g. ("bridge + host-local", 21.6).
    pub baseline: Option<(String, f64)>,
    /// How it was measured and its spread (repetitions' range), for the table's notes.
    pub note: Option<String>,
}

impl Comparison {
    /// podwire's value over the baseline's (lower is better for every row here).
    pub fn ratio(&self) -> Option<f64> {
        self.baseline.as_ref().map(|(_, base)| self.podwire / base)
    }
}

/// One line: the metric, both values, the ratio, the note.
impl std::fmt::Debug for Comparison {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let unit = self.unit;
        write!(f, "{}: podwire {:.2} {unit}", self.metric, self.podwire)?;
        if let (Some((name, base)), Some(ratio)) = (&self.baseline, self.ratio()) {
            write!(f, ", {name} {base:.2} {unit}, ratio {ratio:.2}x")?;
        }
        if let Some(note) = &self.note {
            write!(f, " ({note})")?;
        }
        Ok(())
    }
}

/// Pods of the sequential ADDs and DELs, per plugin.
const SEQUENTIAL_PODS: usize = 100;
/// Pods started at once, per plugin and repetition.
const PARALLEL_PODS: usize = 100;
/// Repetitions of the parallel ADDs and DELs (plugins alternating which goes first).
const PARALLEL_REPS: usize = 3;
/// Pods on the node when the agent's memory is read.
const MEMORY_PODS: usize = 250;
/// Nodes in the large cluster file.
const CLUSTER_NODES: u32 = 5000;
/// Repetitions of the large cluster's apply (each from a one-node table).
const APPLY_REPS: usize = 3;
/// How long an apply of the large cluster may take before the benchmark gives up.
const APPLY_WAIT: Duration = Duration::from_secs(120);

/// The CNI version of both configurations: what podwire's chart writes into its conflist by
/// default, and the newest Debian 12's reference plugins (1.1.1) speak.
const CNI_VERSION: &str = "1.0.0";
/// Where Debian's containernetworking-plugins installs the reference plugins.
const REFERENCE_PLUGINS: &str = "/usr/lib/cni";
const BRIDGE: &str = "bridge + host-local";
const FLOOR: &str = "kernel floor (ip link)";
/// The reference node's subnet (the reference plugins' pods live in their own namespace).
const BRIDGE_SUBNET: &str = "10.244.2.0/24";

/// Measures the control plane with the binaries in `bins` (release builds).
pub fn run(bins: &Path) -> Result<Vec<Comparison>> {
    podwire_lab::artifacts::set_bin_dir(bins);
    // The load before each phase says how busy the machine was with others' work; the
    // parallel phase raises it by itself (100 plugins at once).
    eprintln!("control plane: load average {}", load_average());
    let mut lab = Lab::start()?;
    let mut rows = sequential(&lab)?;
    rows.extend(parallel(&lab)?);
    rows.extend(memory_and_node_table(&mut lab)?);
    drop(lab);
    eprintln!("control plane: done; load average {}", load_average());
    Ok(rows)
}

/// Everything the benchmark runs on; dropped field by field in this order: the agent first, the
/// namespaces' open files, the cluster (its node, pins and underlay), the other nodes with their
/// bridge, veths and iptables rules, `host-local`'s directory.
struct Lab {
    agent: Agent,
    podwire: Plugin,
    bridge: Plugin,
    floor: Floor,
    cluster: Cluster,
    _bridge_node: NetNs,
    _floor_node: NetNs,
    _host_local: ScratchDir,
}

impl Lab {
    fn start() -> Result<Lab> {
        eprintln!("control plane: starting a podwire node and the reference nodes");
        let mut cluster = Cluster::start(ClusterSpec {
            nodes: 1,
            ..ClusterSpec::default()
        })?;
        // The lab's agent, stopped (SIGTERM keeps the datapath) and run again as a daemon of
        // ours, for its process id (memory) and its log (the cluster's apply times).
        cluster.nodes[0].stop_agent()?;
        let agent = Agent::start(&cluster)?;
        let node = &cluster.nodes[0];
        let podwire = Plugin {
            label: "podwire",
            binary: bin("podwire-cni")?,
            cni_path: bins_dir(&bin("podwire-cni")?),
            // What a runtime passes from the chart's conflist: its cniVersion and name, the
            // plugin entry.
            conf: serde_json::json!({
                "cniVersion": CNI_VERSION,
                "name": "podwire",
                "type": "podwire-cni",
                "agentSocket": node.socket(),
            })
            .to_string()
            .into_bytes(),
            node: open_netns(&node.ns)?,
        };

        let bridge_node = NetNs::new("bnode")?;
        let host_local = ScratchDir::new("host-local")?;
        let bridge = Plugin {
            label: BRIDGE,
            binary: Path::new(REFERENCE_PLUGINS).join("bridge"),
            cni_path: PathBuf::from(REFERENCE_PLUGINS),
            conf: bridge_conf(BRIDGE_SUBNET, &host_local.0)
                .to_string()
                .into_bytes(),
            node: open_netns(&bridge_node)?,
        };
        ensure!(
            bridge.binary.exists(),
            "{} not found: apt-get install containernetworking-plugins",
            bridge.binary.display()
        );

        let floor_node = NetNs::new("fnode")?;
        let floor = Floor {
            node: open_netns(&floor_node)?,
        };
        check_spawns_in(&podwire.node, &cluster.nodes[0].ns)?;
        check_spawns_in(&bridge.node, &bridge_node)?;
        check_spawns_in(&floor.node, &floor_node)?;
        Ok(Lab {
            agent,
            podwire,
            bridge,
            floor,
            cluster,
            _bridge_node: bridge_node,
            _floor_node: floor_node,
            _host_local: host_local,
        })
    }
}

/// The reference `bridge` configuration as a runtime passes it out of a kubeadm-era conflist:
/// `cni0` as the pods' gateway, masquerade of their traffic leaving the subnet, hairpin, MTU
/// 1500, addresses from `host-local` in `subnet` with a default route, its files in `data_dir`.
fn bridge_conf(subnet: &str, data_dir: &Path) -> serde_json::Value {
    serde_json::json!({
        "cniVersion": CNI_VERSION,
        "name": "bridge-bench",
        "type": "bridge",
        "bridge": "cni0",
        "isGateway": true,
        "ipMasq": true,
        "hairpinMode": true,
        "mtu": 1500,
        "ipam": {
            "type": "host-local",
            "ranges": [[{ "subnet": subnet }]],
            "routes": [{ "dst": "0.0.0.0/0" }],
            "dataDir": data_dir,
        },
    })
}

fn bins_dir(binary: &Path) -> PathBuf {
    binary
        .parent()
        .expect("a binary lives in a directory")
        .to_path_buf()
}

/// A directory of ours in the system's temporary directory, removed on drop.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new(role: &str) -> Result<ScratchDir> {
        let tmp = std::env::temp_dir();
        // Those of benchmarks that were killed before their guards ran.
        for entry in std::fs::read_dir(&tmp).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let pid = name
                .strip_prefix("pwbench-")
                .and_then(|rest| rest.rsplit('-').next())
                .and_then(|pid| pid.parse::<u32>().ok());
            if pid.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        let path = tmp.join(format!("pwbench-{role}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(ScratchDir(path))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The namespace's file, for children to enter.
fn open_netns(ns: &NetNs) -> Result<File> {
    File::open(ns.path()).with_context(|| format!("opening {}", ns.path().display()))
}

/// Starts `cmds` from a thread that entered the network namespace `netns`, which the children
/// inherit (as a runtime running in the node's namespace execs its plugins: nothing between
/// fork and exec, so that std spawns with posix_spawn, a vfork, as Go's runtime does), and
/// writes `input` to the stdin of each. Returns when the first was started, and the children.
fn spawn_in(
    netns: &File,
    cmds: Vec<Command>,
    input: Option<&[u8]>,
) -> Result<(Instant, Vec<Child>)> {
    enter(netns, move || -> Result<(Instant, Vec<Child>)> {
        let started = Instant::now();
        let children = cmds
            .into_iter()
            .map(|mut cmd| -> Result<Child> {
                let mut child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
                if let Some(input) = input {
                    // Smaller than a pipe's buffer: written at once, closed when dropped here. A
                    // process that exits without reading it (the reference plugins answering
                    // VERSION may) closes the pipe: its exit status tells how it went.
                    let written = child
                        .stdin
                        .take()
                        .context("stdin is not piped")?
                        .write_all(input);
                    match written {
                        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                            return Err(e).with_context(|| format!("writing to {cmd:?}"));
                        }
                        _ => {}
                    }
                }
                Ok(child)
            })
            .collect::<Result<_>>()?;
        Ok((started, children))
    })?
}

/// Checks that what [`spawn_in`] starts with `netns` runs in `ns`, not in this process's
/// namespace: the benchmark's veths and routes must stay in its own namespaces.
fn check_spawns_in(netns: &File, ns: &NetNs) -> Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let mut cmd = Command::new("stat");
    cmd.args(["-L", "-c", "%i", "/proc/self/ns/net"])
        .stdout(Stdio::piped());
    let (_, child) = spawn_one(netns, cmd, None)?;
    let out = child.wait_with_output()?;
    let inode = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let want = std::fs::metadata(ns.path())?.ino().to_string();
    ensure!(
        inode == want,
        "a child spawned for {} runs in namespace inode {inode}, not {want}",
        ns.name()
    );
    Ok(())
}

/// [`spawn_in`] of one command.
fn spawn_one(netns: &File, cmd: Command, input: Option<&[u8]>) -> Result<(Instant, Child)> {
    let (started, children) = spawn_in(netns, vec![cmd], input)?;
    let child = children
        .into_iter()
        .next()
        .context("one command, one child")?;
    Ok((started, child))
}

/// A CNI plugin as a runtime execs it on one node.
struct Plugin {
    label: &'static str,
    binary: PathBuf,
    cni_path: PathBuf,
    /// The network configuration on stdin.
    conf: Vec<u8>,
    /// The node's network namespace.
    node: File,
}

impl Plugin {
    /// The plugin's command for `command` of `container_id` in `pod`.
    fn command(&self, command: &str, container_id: &str, pod: &NetNs) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container_id)
            .env("CNI_NETNS", pod.path())
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", &self.cni_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    /// One invocation, timed from exec to exit.
    fn exec(&self, command: &str, container_id: &str, pod: &NetNs) -> Result<Duration> {
        let cmd = self.command(command, container_id, pod);
        let (started, child) = spawn_one(&self.node, cmd, Some(&self.conf))?;
        let out = child
            .wait_with_output()
            .with_context(|| format!("waiting for {}", self.label))?;
        let took = started.elapsed();
        checked(self.label, command, container_id, pod, &out)?;
        Ok(took)
    }

    /// `command` for every pod at once (all started, then all waited for): the wall time from
    /// the first exec to the last exit.
    fn all_at_once(&self, command: &str, ids: &[String], pods: &[NetNs]) -> Result<Duration> {
        let cmds = ids
            .iter()
            .zip(pods)
            .map(|(id, pod)| self.command(command, id, pod))
            .collect();
        let (started, children) = spawn_in(&self.node, cmds, Some(&self.conf))?;
        let spawned = started.elapsed();
        let outs: Vec<Output> = children
            .into_iter()
            .map(|child| child.wait_with_output())
            .collect::<std::io::Result<_>>()
            .with_context(|| format!("waiting for {}", self.label))?;
        let took = started.elapsed();
        eprintln!(
            "    {} {command}: all {} started within {:.0} ms",
            self.label,
            ids.len(),
            spawned.as_secs_f64() * 1e3
        );
        for ((id, pod), out) in ids.iter().zip(pods).zip(&outs) {
            checked(self.label, command, id, pod, out)?;
        }
        Ok(took)
    }
}

/// Fails unless the plugin exited 0 and, for ADD, printed a result whose address the pod's
/// `eth0` holds, for DEL, left the pod without `eth0` (checked after the clock stopped).
fn checked(
    label: &str,
    command: &str,
    container_id: &str,
    pod: &NetNs,
    out: &Output,
) -> Result<()> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "{label} {command} {container_id} failed ({}): {} {}",
        out.status,
        stdout.trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    if command == "ADD" {
        let result: serde_json::Value = serde_json::from_str(&stdout)
            .with_context(|| format!("{label} ADD printed no JSON result: {stdout}"))?;
        let address = result["ips"][0]["address"]
            .as_str()
            .with_context(|| format!("{label} ADD {container_id}: no address in {result}"))?;
        let shown = pod.ip(&["-4", "-o", "addr", "show", "dev", "eth0"])?;
        let shown = String::from_utf8_lossy(&shown.stdout);
        ensure!(
            shown.split_whitespace().any(|word| word == address),
            "{label} ADD {container_id} answered {address}, but the pod's eth0 has: {shown}"
        );
    }
    if command == "DEL" {
        // Answered means done: a DEL that returned while the pod still had its interface would
        // be measured short.
        let links = pod.link_names(&[])?;
        ensure!(
            !links.iter().any(|l| l == "eth0"),
            "{label} DEL {container_id} returned, but the pod still has eth0: {links:?}"
        );
    }
    Ok(())
}

/// The kernel's own floor: `ip` making a veth pair into a pod's namespace, and deleting it.
struct Floor {
    node: File,
}

impl Floor {
    /// Runs `program` with `args` in the floor's node, timed from exec to exit.
    fn exec(&self, program: &str, args: &[&str]) -> Result<Duration> {
        let mut cmd = Command::new(program);
        cmd.args(args).stdout(Stdio::null()).stderr(Stdio::piped());
        let (started, child) = spawn_one(&self.node, cmd, None)?;
        let out = child.wait_with_output()?;
        let took = started.elapsed();
        ensure!(
            out.status.success(),
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(took)
    }

    fn add(&self, i: usize, pod: &NetNs) -> Result<Duration> {
        let name = format!("fl{i}");
        self.exec(
            "ip",
            &[
                "link",
                "add",
                &name,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                pod.name(),
            ],
        )
    }

    fn del(&self, i: usize) -> Result<Duration> {
        self.exec("ip", &["link", "del", &format!("fl{i}")])
    }
}

/// A container id as runtimes make them (64 hex digits), unique per phase and pod.
fn container_id(phase: u16, i: usize) -> String {
    format!("{phase:016x}{i:048x}")
}

/// Which of the three (podwire, bridge, floor) goes first, second, third for pod `i`.
fn turns(i: usize) -> [usize; 3] {
    [i % 3, (i + 1) % 3, (i + 2) % 3]
}

/// Sequential ADDs of [`SEQUENTIAL_PODS`] pods, the three taking turns, then their DELs.
fn sequential(lab: &Lab) -> Result<Vec<Comparison>> {
    eprintln!(
        "control plane: {SEQUENTIAL_PODS} sequential ADDs each, interleaved (load average {})",
        load_average()
    );
    // A pod each first, not counted: binaries and libraries in the page cache, `cni0` and the
    // iptables chains made, the agent's first connection served.
    let warm = [NetNs::new("pod")?, NetNs::new("pod")?, NetNs::new("pod")?];
    let warm_id = container_id(0xff, 0);
    lab.podwire.exec("ADD", &warm_id, &warm[0])?;
    lab.bridge.exec("ADD", &warm_id, &warm[1])?;
    lab.floor.add(SEQUENTIAL_PODS, &warm[2])?;
    lab.podwire.exec("DEL", &warm_id, &warm[0])?;
    lab.bridge.exec("DEL", &warm_id, &warm[1])?;
    lab.floor.del(SEQUENTIAL_PODS)?;
    drop(warm);

    let mut add: [Vec<Duration>; 3] = Default::default();
    let mut del: [Vec<Duration>; 3] = Default::default();
    let mut version: [Vec<Duration>; 3] = Default::default();
    let mut pods = Vec::with_capacity(SEQUENTIAL_PODS);
    for i in 0..SEQUENTIAL_PODS {
        let trio = [NetNs::new("pod")?, NetNs::new("pod")?, NetNs::new("pod")?];
        let id = container_id(1, i);
        for k in turns(i) {
            add[k].push(match k {
                0 => lab.podwire.exec("ADD", &id, &trio[0])?,
                1 => lab.bridge.exec("ADD", &id, &trio[1])?,
                _ => lab.floor.add(i, &trio[2])?,
            });
        }
        // Each plugin answering VERSION: its process start and exit alone, no socket, no
        // netlink; and the bare fork and exec of `true`.
        for k in turns(i) {
            version[k].push(match k {
                0 => lab.podwire.exec("VERSION", &id, &trio[0])?,
                1 => lab.bridge.exec("VERSION", &id, &trio[1])?,
                _ => lab.floor.exec("true", &[])?,
            });
        }
        pods.push(trio);
        if (i + 1) % 25 == 0 {
            eprintln!("  ADD {}/{SEQUENTIAL_PODS}", i + 1);
        }
    }
    for (i, trio) in pods.iter().enumerate() {
        let id = container_id(1, i);
        for k in turns(i) {
            del[k].push(match k {
                0 => lab.podwire.exec("DEL", &id, &trio[0])?,
                1 => lab.bridge.exec("DEL", &id, &trio[1])?,
                _ => lab.floor.del(i)?,
            });
        }
        if (i + 1) % 25 == 0 {
            eprintln!("  DEL {}/{SEQUENTIAL_PODS}", i + 1);
        }
    }
    drop(pods);
    let left = lab.cluster.nodes[0].host_veths()?;
    ensure!(left.is_empty(), "podwire's DELs left host veths: {left:?}");

    let ms = |d: &[Duration]| -> Vec<f64> { sorted(d.iter().map(|d| d.as_secs_f64() * 1e3)) };
    let (add, del, version) = (
        add.map(|d| ms(&d)),
        del.map(|d| ms(&d)),
        version.map(|d| ms(&d)),
    );
    for (what, samples) in [("ADD", &add), ("DEL", &del), ("VERSION", &version)] {
        let third = if what == "VERSION" {
            "fork and exec of true"
        } else {
            FLOOR
        };
        for (name, s) in ["podwire", BRIDGE, third].iter().zip(samples.iter()) {
            eprintln!(
                "  {what} {name:22} p50 {:6.1} ms  p99 {:6.1} ms  min {:6.1}  max {:6.1}",
                percentile(s, 0.5),
                percentile(s, 0.99),
                s[0],
                s[s.len() - 1]
            );
        }
    }
    let note = format!("{SEQUENTIAL_PODS} pods, one plugin exec at a time, interleaved");
    let row = |metric: &str, s: &[Vec<f64>; 3], q: f64, base: usize| Comparison {
        metric: metric.to_owned(),
        unit: "ms",
        podwire: percentile(&s[0], q),
        baseline: Some((
            [BRIDGE, BRIDGE, FLOOR][base].to_owned(),
            percentile(&s[base], q),
        )),
        note: Some(note.clone()),
    };
    Ok(vec![
        row("ADD p50, sequential", &add, 0.5, 1),
        row("ADD p99, sequential", &add, 0.99, 1),
        row("DEL p50, sequential", &del, 0.5, 1),
        row("DEL p99, sequential", &del, 0.99, 1),
        Comparison {
            note: Some(format!(
                "{note}; the plugin's process alone (it answers from its configuration); \
                 fork and exec of `true`: {:.1} ms",
                percentile(&version[2], 0.5)
            )),
            ..row("VERSION p50, sequential", &version, 0.5, 1)
        },
        Comparison {
            note: Some(format!(
                "{note}; the floor is `ip link add <host> type veth peer name eth0 netns <pod>`"
            )),
            ..row("ADD p50 vs the kernel's veth pair", &add, 0.5, 2)
        },
        Comparison {
            note: Some(format!("{note}; the floor is `ip link del <host>`")),
            ..row("DEL p50 vs the kernel's veth delete", &del, 0.5, 2)
        },
    ])
}

/// [`PARALLEL_PODS`] ADDs at once and then their DELs at once, for each plugin in turn,
/// [`PARALLEL_REPS`] times: medians of the wall times.
fn parallel(lab: &Lab) -> Result<Vec<Comparison>> {
    eprintln!(
        "control plane: {PARALLEL_PODS} ADDs at once, then their DELs, {PARALLEL_REPS} times each"
    );
    // [plugin][ADD, DEL] in seconds.
    let mut walls: [[Vec<f64>; 2]; 2] = Default::default();
    for rep in 0..PARALLEL_REPS {
        let order = if rep % 2 == 0 { [0, 1] } else { [1, 0] };
        for k in order {
            let plugin = [&lab.podwire, &lab.bridge][k];
            let pods: Vec<NetNs> = (0..PARALLEL_PODS)
                .map(|_| NetNs::new("pod"))
                .collect::<Result<_>>()?;
            let phase = u16::try_from(0x10 + rep).expect("few repetitions");
            let ids: Vec<String> = (0..PARALLEL_PODS).map(|i| container_id(phase, i)).collect();
            let add = plugin.all_at_once("ADD", &ids, &pods)?;
            let del = plugin.all_at_once("DEL", &ids, &pods)?;
            eprintln!(
                "  rep {}/{PARALLEL_REPS} {:20} ADD {:5.2} s  DEL {:5.2} s",
                rep + 1,
                plugin.label,
                add.as_secs_f64(),
                del.as_secs_f64()
            );
            walls[k][0].push(add.as_secs_f64());
            walls[k][1].push(del.as_secs_f64());
        }
    }
    let left = lab.cluster.nodes[0].host_veths()?;
    ensure!(left.is_empty(), "podwire's DELs left host veths: {left:?}");
    let row = |metric: &str, i: usize| {
        let (ours, theirs) = (
            sorted(walls[0][i].iter().copied()),
            sorted(walls[1][i].iter().copied()),
        );
        Comparison {
            metric: metric.to_owned(),
            unit: "s",
            podwire: percentile(&ours, 0.5),
            baseline: Some((BRIDGE.to_owned(), percentile(&theirs, 0.5))),
            note: Some(format!(
                "{PARALLEL_PODS} execs started together, first exec to last exit; median of \
                 {PARALLEL_REPS} (podwire {:.2}-{:.2} s, bridge {:.2}-{:.2} s)",
                ours[0],
                ours[ours.len() - 1],
                theirs[0],
                theirs[theirs.len() - 1]
            )),
        }
    };
    Ok(vec![
        row("100 ADDs at once, wall", 0),
        row("100 DELs at once, wall", 1),
    ])
}

/// The agent's memory with [`MEMORY_PODS`] pods, then the apply of a [`CLUSTER_NODES`]-node
/// cluster file (with those pods still there) and the memory after it.
fn memory_and_node_table(lab: &mut Lab) -> Result<Vec<Comparison>> {
    let (idle_rss, _) = lab.agent.memory_kib()?;
    eprintln!(
        "control plane: {MEMORY_PODS} podwire pods (agent VmRSS {idle_rss} KiB without pods)"
    );
    let mut pods = Vec::with_capacity(MEMORY_PODS);
    for i in 0..MEMORY_PODS {
        let pod = NetNs::new("pod")?;
        lab.podwire.exec("ADD", &container_id(0x20, i), &pod)?;
        pods.push(pod);
    }
    let (rss, hwm) = lab.agent.memory_kib()?;
    eprintln!("  agent VmRSS {rss} KiB, VmHWM {hwm} KiB");
    let mib = |kib: u64| kib as f64 / 1024.0;
    let mut rows = vec![
        Comparison {
            metric: format!("agent VmRSS, {MEMORY_PODS} pods"),
            unit: "MiB",
            podwire: mib(rss),
            baseline: None,
            note: Some(format!(
                "/proc/<agent>/status; {:.1} MiB before the pods",
                mib(idle_rss)
            )),
        },
        Comparison {
            metric: format!("agent VmHWM, {MEMORY_PODS} pods"),
            unit: "MiB",
            podwire: mib(hwm),
            baseline: None,
            note: Some(
                "peak resident memory since the agent started, 100 ADDs at once included".into(),
            ),
        },
    ];

    eprintln!("control plane: a cluster file of {CLUSTER_NODES} nodes, applied {APPLY_REPS} times from one node");
    let mut seen_s = Vec::new();
    let mut table_ms = Vec::new();
    let mut apply_ms = Vec::new();
    let mut routes_ms = Vec::new();
    let mut floor_ms = Vec::new();
    for rep in 0..APPLY_REPS {
        let started = Instant::now();
        write_cluster(&lab.cluster, CLUSTER_NODES)?;
        let line = lab.agent.applied(CLUSTER_NODES)?;
        let seen = started.elapsed();
        let fields = log_fields(&line);
        let field = |key: &str| -> Result<u64> {
            fields
                .iter()
                .find(|(k, _)| *k == key)
                .and_then(|(_, v)| v.parse().ok())
                .with_context(|| format!("no {key} in the agent's line {line}"))
        };
        let entries = field("written")? + field("kept")?;
        ensure!(
            entries == 2 * u64::from(CLUSTER_NODES),
            "the node table holds {entries} entries, not 2 per node: {line}"
        );
        eprintln!(
            "  rep {}/{APPLY_REPS}: applied {:.2} s after the write (the agent polls the file every 1 s); node table {} ms, routes {} ms, masquerade {} ms",
            rep + 1,
            seen.as_secs_f64(),
            field("node_table_ms")?,
            field("routes_ms")?,
            field("masquerade_ms")?,
        );
        seen_s.push(seen.as_secs_f64());
        table_ms.push(field("node_table_ms")? as f64);
        apply_ms.push(field("elapsed_ms")? as f64);
        routes_ms.push(field("routes_ms")? as f64);
        let floor = routes_floor(CLUSTER_NODES - 1)?;
        eprintln!(
            "  rep {}/{APPLY_REPS}: the same routes by `ip -batch`: {:.0} ms",
            rep + 1,
            floor.as_secs_f64() * 1e3
        );
        floor_ms.push(floor.as_secs_f64() * 1e3);
        if rep == 0 {
            let (rss, hwm) = lab.agent.memory_kib()?;
            rows.push(Comparison {
                metric: format!("agent VmRSS, {MEMORY_PODS} pods + {CLUSTER_NODES} nodes"),
                unit: "MiB",
                podwire: mib(rss),
                baseline: None,
                note: Some(format!("VmHWM {:.1} MiB", mib(hwm))),
            });
        }
        // Back to the node alone, so that the next apply writes every entry again.
        write_cluster(&lab.cluster, 1)?;
        lab.agent.applied(1)?;
    }
    drop(pods);

    let spread = |s: &[f64]| format!("{:.0}-{:.0}", s[0], s[s.len() - 1]);
    let (seen_s, apply_ms, table_ms, routes_ms, floor_ms) = (
        sorted(seen_s.into_iter()),
        sorted(apply_ms.into_iter()),
        sorted(table_ms.into_iter()),
        sorted(routes_ms.into_iter()),
        sorted(floor_ms.into_iter()),
    );
    rows.extend([
        Comparison {
            metric: format!("cluster apply, {CLUSTER_NODES} nodes"),
            unit: "ms",
            podwire: percentile(&apply_ms, 0.5),
            baseline: None,
            note: Some(format!(
                "the agent's elapsed_ms: node table, tunnel routes and masquerade rules, from \
                 the parsed file to done; median of {APPLY_REPS} ({} ms)",
                spread(&apply_ms)
            )),
        },
        Comparison {
            metric: format!("node table apply, {CLUSTER_NODES} nodes"),
            unit: "ms",
            podwire: percentile(&table_ms, 0.5),
            baseline: None,
            note: Some(format!(
                "the agent's node_table_ms: {} entries written to the pinned map; median of {APPLY_REPS} ({} ms)",
                2 * CLUSTER_NODES,
                spread(&table_ms)
            )),
        },
        Comparison {
            metric: format!("tunnel routes, {CLUSTER_NODES} nodes"),
            unit: "ms",
            podwire: percentile(&routes_ms, 0.5),
            baseline: Some((
                "kernel floor (ip -batch)".into(),
                percentile(&floor_ms, 0.5),
            )),
            note: Some(format!(
                "the agent's routes_ms: {} routes added to its tunnel device, against the same \
                 routes given to `ip -batch` (one netlink request each) in a namespace of their \
                 own; medians of {APPLY_REPS} ({} ms, {} ms)",
                CLUSTER_NODES - 1,
                spread(&routes_ms),
                spread(&floor_ms)
            )),
        },
        Comparison {
            metric: format!("cluster file written to applied, {CLUSTER_NODES} nodes"),
            unit: "s",
            podwire: percentile(&seen_s, 0.5),
            baseline: None,
            note: Some(format!(
                "includes up to 1 s of the agent's file polling; median of {APPLY_REPS} ({:.2}-{:.2} s)",
                seen_s[0],
                seen_s[seen_s.len() - 1]
            )),
        },
    ]);
    Ok(rows)
}

/// The kernel's floor for the tunnel routes of `routes` made-up nodes: the routes podwire's
/// agent adds (to the node's pod CIDR, through the tunnel device, the node's address as the
/// source) given to `ip -batch` in a namespace of their own, on a device of their own.
fn routes_floor(routes: u32) -> Result<Duration> {
    let ns = NetNs::new("rnode")?;
    // A veth pair: Debian's kernel has no dummy module, and the device's kind does not matter
    // to the routing table.
    ns.ip(&["link", "add", "rt0", "type", "veth", "peer", "name", "rt1"])?;
    ns.ip(&[
        "addr",
        "add",
        &format!("{}/24", Cluster::node_ip(0)),
        "dev",
        "rt0",
    ])?;
    ns.ip(&["link", "set", "rt0", "up"])?;
    ns.ip(&["link", "set", "rt1", "up"])?;
    let batch: String = (0..routes)
        .map(|k| {
            format!(
                "route replace {} dev rt0 src {} scope link\n",
                fake_node(k).pod_cidr,
                Cluster::node_ip(0)
            )
        })
        .collect();
    // From a file: more than a pipe holds, and `ip` may answer on stderr as it reads.
    let dir = ScratchDir::new("routes")?;
    let file = dir.0.join("batch");
    std::fs::write(&file, batch).with_context(|| format!("writing {}", file.display()))?;
    let mut cmd = Command::new("ip");
    cmd.arg("-batch")
        .arg(&file)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let netns = open_netns(&ns)?;
    check_spawns_in(&netns, &ns)?;
    let (started, child) = spawn_one(&netns, cmd, None)?;
    let out = child.wait_with_output().context("waiting for ip -batch")?;
    let took = started.elapsed();
    ensure!(
        out.status.success(),
        "ip -batch: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    // Its own routes and the subnet's.
    let shown = ns.ip(&["route", "show", "dev", "rt0"])?;
    let count = String::from_utf8_lossy(&shown.stdout).lines().count();
    ensure!(
        count == routes as usize + 1,
        "ip -batch left {count} routes on rt0, not {routes} and the subnet's"
    );
    Ok(took)
}

/// The node's agent, run by us in place of the lab's (same arguments, state and pins).
struct Agent {
    daemon: Daemon,
}

impl Agent {
    fn start(cluster: &Cluster) -> Result<Agent> {
        let mut daemon = Daemon::spawn(cluster.nodes[0].agent_command()?, None)?;
        daemon
            .wait_for_line("serving CNI requests")
            .context("podwire-agent of the benchmark's node")?;
        Ok(Agent { daemon })
    }

    /// VmRSS and VmHWM in KiB.
    fn memory_kib(&self) -> Result<(u64, u64)> {
        let path = format!("/proc/{}/status", self.daemon.pid());
        let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        ensure!(
            status.lines().next() == Some("Name:\tpodwire-agent"),
            "{path} is not the agent's"
        );
        memory_kib(&status).with_context(|| format!("no VmRSS or VmHWM in {path}"))
    }

    /// Waits for the log line of an apply of `nodes` nodes.
    fn applied(&mut self, nodes: u32) -> Result<String> {
        let want = nodes.to_string();
        let deadline = Instant::now() + APPLY_WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .daemon
                .wait_for_line_within("cluster applied", left)
                .with_context(|| format!("the agent applied no cluster of {nodes} nodes"))?;
            if log_fields(&line).contains(&("nodes", want.as_str())) {
                return Ok(line);
            }
        }
    }
}

/// VmRSS and VmHWM in KiB from a `/proc/<pid>/status`.
fn memory_kib(status: &str) -> Option<(u64, u64)> {
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// The `key=value` fields of a log line.
fn log_fields(line: &str) -> Vec<(&str, &str)> {
    line.split_whitespace()
        .filter_map(|word| word.split_once('='))
        .collect()
}

/// Writes the cluster file with node1 (the benchmark's node) and `nodes - 1` made-up ones, as
/// the runtime's ConfigMap update does: a new file renamed over the old one.
fn write_cluster(cluster: &Cluster, nodes: u32) -> Result<()> {
    let mut all = vec![NodeInfo {
        name: Cluster::node_name(0),
        address: Cluster::node_ip(0),
        pod_cidr: Cluster::pod_cidr(0).parse()?,
    }];
    all.extend((0..nodes - 1).map(fake_node));
    let file = ClusterFile {
        cluster_cidr: Some(CLUSTER_CIDR.parse()?),
        nodes: all,
    };
    let path = cluster.file();
    let partial = path.with_extension("partial");
    std::fs::write(&partial, serde_json::to_vec(&file)?)
        .with_context(|| format!("writing {}", partial.display()))?;
    std::fs::rename(&partial, &path).with_context(|| format!("renaming to {}", path.display()))
}

/// Made-up node `k`: an underlay address in 198.18.0.0/15 (RFC 2544's benchmark range; nothing is
/// sent there, it only fills tables) and a /29 pod CIDR from 10.244.16.0 up, clear of the lab
/// nodes' /24s.
fn fake_node(k: u32) -> NodeInfo {
    let address = std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(198, 18, 0, 1)) + k);
    let pod = std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 244, 16, 0)) + 8 * k);
    NodeInfo {
        name: format!("fake{k}"),
        address,
        pod_cidr: format!("{pod}/29").parse().expect("a /29"),
    }
}

fn sorted(values: impl Iterator<Item = f64>) -> Vec<f64> {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    v
}

/// The `q` quantile of `sorted` (the sample at rank floor((n-1)q), as the data plane's).
fn percentile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q) as usize]
}

/// The 1, 5 and 15 minute load averages, and a warning when the last minute's exceeds the
/// CPUs: other work then competes with the benchmark's processes.
fn load_average() -> String {
    let Ok(loadavg) = std::fs::read_to_string("/proc/loadavg") else {
        return "unknown".into();
    };
    let three: Vec<&str> = loadavg.split_whitespace().take(3).collect();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    match three.first().and_then(|l| l.parse::<f64>().ok()) {
        Some(last_minute) if last_minute > cpus as f64 => format!(
            "{} (busy: more than {cpus} CPUs' worth; only the ratios mean anything)",
            three.join(" ")
        ),
        _ => three.join(" "),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_hundred_samples_are_the_50th_and_99th() {
        let s = sorted((1..=100).rev().map(f64::from));
        assert_eq!(percentile(&s, 0.5), 50.0);
        assert_eq!(percentile(&s, 0.99), 99.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
    }

    #[test]
    fn every_one_takes_every_turn_once() {
        for i in 0..3 {
            let mut t = turns(i);
            assert_eq!(t[0], i, "pod {i} starts with the {i}th");
            t.sort();
            assert_eq!(t, [0, 1, 2]);
        }
    }

    #[test]
    fn memory_is_read_from_proc_status() {
        let status =
            "Name:\tpodwire-agent\nVmPeak:\t  900 kB\nVmHWM:\t   12000 kB\nVmRSS:\t   10140 kB\n";
        assert_eq!(memory_kib(status), Some((10140, 12000)));
        assert_eq!(memory_kib("Name:\tx\n"), None);
    }

    #[test]
    fn the_agents_apply_line_gives_its_fields() {
        let line = "2026-12-02T11:00:00Z  INFO podwire_agent::reconcile: nodes=5000 remote=4999 \
                    written=9998 removed=0 kept=2 node_table_ms=312 routes_ms=845 \
                    masquerade_ms=3 elapsed_ms=1160 cluster applied";
        let fields = log_fields(line);
        assert!(fields.contains(&("written", "9998")));
        assert!(fields.contains(&("node_table_ms", "312")));
        assert!(fields.contains(&("nodes", "5000")));
    }

    #[test]
    fn the_reference_configuration_is_kubeadms_bridge() {
        let conf = bridge_conf("10.244.2.0/24", Path::new("/tmp/x"));
        assert_eq!(conf["type"], "bridge");
        assert_eq!(conf["bridge"], "cni0");
        assert_eq!(conf["mtu"], 1500);
        assert_eq!(conf["ipMasq"], true);
        assert_eq!(conf["ipam"]["type"], "host-local");
        assert_eq!(conf["ipam"]["ranges"][0][0]["subnet"], "10.244.2.0/24");
        assert_eq!(conf["ipam"]["dataDir"], "/tmp/x");
    }

    #[test]
    fn made_up_nodes_stay_clear_of_the_lab_nodes() {
        let last = fake_node(CLUSTER_NODES - 2);
        assert_eq!(last.pod_cidr.to_string(), "10.244.172.48/29");
        assert!(last.address.octets()[0] == 198);
    }
}
