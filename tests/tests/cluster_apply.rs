//! Applying the cluster on a node, with real agents in the lab's cluster: a failed apply is
//! retried until it succeeds (every step runs even when one fails), a node finds itself by name
//! (a cluster file that gives its pod CIDR to another node never takes its pods away), 5000 nodes
//! are applied and looked up correctly (apply time and the agent's memory printed), and an agent
//! restarted after `kill -9` brings a pinned node table that was changed behind its back in line
//! by diff, without flushing it.
//!
//! The lab starts node agents with the test's own environment; the agents here that need an
//! environment of their own (a fault point, an `nft` that fails) or a `kill -9` are started by
//! the test in place of the lab's ([`OwnAgent`]), with the same node, state, socket and pins.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr},
    os::unix::fs::PermissionsExt as _,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{ensure, Context as _, Result};
use aya::maps::{lpm_trie::Key, LpmTrie, Map, MapData, MapInfo};
use ipnet::Ipv4Net;
use nix::sys::signal::Signal;
use podwire_common::{NodeEntry, NodeKind};
use podwire_core::{
    cluster::{Cluster as ClusterFile, NodeInfo},
    object::maps,
};
use podwire_datapath::{DatapathMap as _, NodeTable};
use podwire_lab::{
    artifacts::bin,
    eventually,
    k8s::{ControlPlane, CONTROL_PLANE_IP},
    namespaces::NetNs,
    nodes::{Cluster, ClusterSpec, PinRoot, Underlay, CLUSTER_CIDR},
    processes::{run, run_with_stdin, Daemon},
    traffic::{ping, receive, send_vxlan, tcp_echo, udp_listener},
};

/// How long a change may take to show: bounded against hanging, never asserted on.
const SETTLE: Duration = Duration::from_secs(30);

fn two_nodes() -> Result<Cluster> {
    Cluster::start(ClusterSpec {
        nodes: 2,
        ..ClusterSpec::default()
    })
}

/// An agent the test started on node `i` of a lab cluster in place of the lab's: same cluster
/// file, name, state directory, socket and pins, plus `env`. Killed when dropped (declare it
/// after the cluster, so it goes before the node's pins and namespace).
struct OwnAgent {
    daemon: Daemon,
}

impl OwnAgent {
    /// Stops the lab's agent of node `i` (SIGTERM keeps the datapath) and starts this one.
    fn replace(c: &mut Cluster, i: usize, env: &[(&str, String)]) -> Result<OwnAgent> {
        c.nodes[i].stop_agent()?;
        Self::start(c, i, env)
    }

    /// Starts the agent and waits until it serves CNI requests.
    fn start(c: &Cluster, i: usize, env: &[(&str, String)]) -> Result<OwnAgent> {
        let mut cmd = c.nodes[i].agent_command()?;
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
        let mut daemon = Daemon::spawn(cmd, None)?;
        daemon
            .wait_for_line("serving CNI requests")
            .with_context(|| format!("own podwire-agent on {}", Cluster::node_name(i)))?;
        Ok(OwnAgent { daemon })
    }

    /// The next log line containing every one of `needles`.
    fn line_with(&mut self, needles: &[&str]) -> Result<String> {
        self.line_within(needles, SETTLE)
    }

    /// The next log line containing every one of `needles`, waiting up to `within`.
    fn line_within(&mut self, needles: &[&str], within: Duration) -> Result<String> {
        let deadline = Instant::now() + within;
        loop {
            match self.daemon.wait_for_line(needles[0]) {
                Ok(line) if needles.iter().all(|n| line.contains(n)) => return Ok(line),
                Ok(_) => {}
                Err(e) if Instant::now() >= deadline => return Err(e),
                // Also when the agent exited: its last lines are in the error at the deadline.
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// The first line read so far that contains `needle`.
    fn logged(&self, needle: &str) -> Option<String> {
        self.daemon
            .seen
            .iter()
            .find(|l| l.contains(needle))
            .cloned()
    }

    /// The agent's resident memory now and at its peak, in KiB (VmRSS, VmHWM).
    fn memory_kib(&self) -> Result<(u64, u64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.daemon.pid()))?;
        let field = |name: &str| -> Result<u64> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .with_context(|| format!("no {name} in /proc/<agent>/status"))
        };
        Ok((field("VmRSS:")?, field("VmHWM:")?))
    }

    /// `kill -9`: nothing of the agent's shutdown runs.
    fn kill(self) -> Result<()> {
        let (status, _) = self.daemon.stop(Signal::SIGKILL)?;
        ensure!(!status.success(), "the agent was killed: {status}");
        Ok(())
    }
}

fn net(s: &str) -> Ipv4Net {
    s.parse().expect("a valid prefix")
}

/// The pinned node table of node `i`, as the programs see it.
fn table(c: &Cluster, i: usize) -> Result<HashMap<Ipv4Net, NodeEntry>> {
    Ok(NodeTable::open(&c.nodes[i].pins())?
        .list()?
        .into_iter()
        .collect())
}

fn remote(i: usize) -> NodeEntry {
    NodeEntry::node(NodeKind::Remote, Cluster::node_ip(i).octets())
}

/// The pod CIDRs node `ns` routes into the tunnel for its own traffic.
fn tunnel_routes(ns: &NetNs) -> Result<Vec<String>> {
    let out = ns.ip(&["-j", "route", "show", "dev", "pw-vxlan"])?;
    let routes: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(routes
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["dst"].as_str().map(str::to_owned))
        .collect())
}

/// Whether podwire's masquerade table is in `ns`.
fn has_masquerade_table(ns: &NetNs) -> Result<bool> {
    Ok(ns
        .command("nft")
        .args(["list", "table", "ip", "podwire"])
        .output()?
        .status
        .success())
}

/// The sample `name` of the agent's /metrics in `ns` (default address).
fn metric(ns: &NetNs, name: &str) -> Result<f64> {
    let out = run(ns.command("curl").args([
        "--silent",
        "--max-time",
        "5",
        "http://127.0.0.1:9962/metrics",
    ]))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .with_context(|| format!("no {name} in /metrics:\n{text}"))?
        .parse()
        .with_context(|| format!("{name}'s value"))
}

/// The agent's /readyz in `ns`: status code and body.
fn readyz(ns: &NetNs) -> Result<(u16, String)> {
    let out = run(ns.command("curl").args([
        "--silent",
        "--max-time",
        "5",
        "--write-out",
        "\n%{http_code}",
        "http://127.0.0.1:9962/readyz",
    ]))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').context("curl's status line")?;
    Ok((code.parse()?, body.to_owned()))
}

/// An `nft` that fails while `fail` exists and is the real one otherwise: put first in an
/// agent's PATH, it makes the masquerade step fail for real, as a missing or refusing nft does.
struct BrokenNft {
    dir: tempfile::TempDir,
}

impl BrokenNft {
    fn new() -> Result<BrokenNft> {
        let real =
            String::from_utf8(run(Command::new("sh").args(["-c", "command -v nft"]))?.stdout)?;
        let dir = tempfile::tempdir()?;
        let script = dir.path().join("nft");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\nif [ -e '{}' ]; then cat >/dev/null; echo 'nft made to fail by the test' >&2; exit 1; fi\nexec {} \"$@\"\n",
                dir.path().join("fail").display(),
                real.trim()
            ),
        )?;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
        let broken = BrokenNft { dir };
        broken.set_failing(true)?;
        Ok(broken)
    }

    fn set_failing(&self, failing: bool) -> Result<()> {
        let flag = self.dir.path().join("fail");
        match failing {
            true => std::fs::write(flag, b"")?,
            false => std::fs::remove_file(flag)?,
        }
        Ok(())
    }

    /// PATH with this nft first.
    fn path(&self) -> String {
        format!(
            "{}:{}",
            self.dir.path().display(),
            std::env::var("PATH").unwrap_or_default()
        )
    }
}

#[test]
fn cluster_apply_that_failed_is_retried_and_its_other_steps_still_run() -> Result<()> {
    let mut c = two_nodes()?;
    let a = c.nodes[0].add_pod("c-retry-a")?;
    let b = c.nodes[1].add_pod("c-retry-b")?;
    let nft = BrokenNft::new()?;

    // While the agent is down: a third node joins and the masquerade table is gone.
    c.nodes[0].stop_agent()?;
    c.write_members(&[0, 1, 2])?;
    run(c.nodes[0]
        .command("nft")
        .args(["delete", "table", "ip", "podwire"]))?;
    let mut agent = OwnAgent::start(&c, 0, &[("PATH", nft.path())])?;

    // nft fails, yet the node table and the routes took the third node.
    assert!(
        eventually(SETTLE, || Ok(
            table(&c, 0)?.get(&net("10.244.3.0/24")) == Some(&remote(2))
        ))?,
        "the node table has the third node although the masquerade step fails: {:#?}",
        table(&c, 0)?
    );
    assert!(
        eventually(SETTLE, || Ok(
            tunnel_routes(&c.nodes[0].ns)?.contains(&"10.244.3.0/24".to_owned())
        ))?,
        "routes: {:?}",
        tunnel_routes(&c.nodes[0].ns)?
    );
    agent.line_with(&["nft made to fail by the test"])?;
    assert!(!has_masquerade_table(&c.nodes[0].ns)?);
    assert!(metric(&c.nodes[0].ns, "podwire_cluster_sync_errors_total")? >= 1.0);
    let (code, why) = readyz(&c.nodes[0].ns)?;
    assert_eq!(
        (code, why.contains("cluster not synced")),
        (503, true),
        "{why}"
    );
    assert!(ping(&a.ns, b.ip)?, "pods talk across nodes meanwhile");

    // nft works again: the same cluster is applied again, without any change to the file.
    nft.set_failing(false)?;
    agent.line_with(&["cluster applied"])?;
    assert!(has_masquerade_table(&c.nodes[0].ns)?);
    assert_eq!(readyz(&c.nodes[0].ns)?.0, 200);

    // The same while following: a change whose masquerade step fails is retried.
    nft.set_failing(true)?;
    run(c.nodes[0]
        .command("nft")
        .args(["delete", "table", "ip", "podwire"]))?;
    c.write_members(&[0, 1])?;
    assert!(
        eventually(SETTLE, || Ok(
            !table(&c, 0)?.contains_key(&net("10.244.3.0/24"))
        ))?,
        "the third node leaves the node table although the masquerade step fails"
    );
    agent.line_with(&["nft made to fail by the test"])?;
    nft.set_failing(false)?;
    assert!(
        eventually(SETTLE, || has_masquerade_table(&c.nodes[0].ns))?,
        "the failed apply was retried once nft works; log:\n{}",
        agent.daemon.seen.join("\n")
    );
    assert!(!tunnel_routes(&c.nodes[0].ns)?.contains(&"10.244.3.0/24".to_owned()));

    // A real netlink failure: with the VXLAN device down, the kernel drops the routes over it
    // and refuses new ones (ENETDOWN) until it is up again, and only a retry puts them back.
    c.nodes[0].ns.ip(&["link", "set", "pw-vxlan", "down"])?;
    c.write_members(&[0, 1, 2])?;
    agent.line_with(&["updating the overlay routes"])?;
    assert_eq!(table(&c, 0)?.get(&net("10.244.3.0/24")), Some(&remote(2)));
    assert_eq!(tunnel_routes(&c.nodes[0].ns)?, Vec::<String>::new());
    c.nodes[0].ns.ip(&["link", "set", "pw-vxlan", "up"])?;
    assert!(
        eventually(SETTLE, || Ok(tunnel_routes(&c.nodes[0].ns)?.len() == 2))?,
        "the routes are back once the device is: {:?}",
        tunnel_routes(&c.nodes[0].ns)?
    );
    assert!(
        ping(&c.nodes[0].ns, b.ip)?,
        "the node's own traffic takes them"
    );
    drop(agent);

    // A step before the others failing (the routes, by fault point): the node table and the
    // masquerade table are still applied, and the failure is retried and counted.
    c.write_members(&[0, 1])?;
    run(c.nodes[0]
        .command("nft")
        .args(["delete", "table", "ip", "podwire"]))?;
    let mut agent = OwnAgent::start(
        &c,
        0,
        &[("PODWIRE_FAULT", "agent.apply.routes:error".into())],
    )?;
    let first = agent.line_with(&["injected fault at agent.apply.routes"])?;
    let again = agent.line_with(&["injected fault at agent.apply.routes"])?;
    assert!(!table(&c, 0)?.contains_key(&net("10.244.3.0/24")));
    assert!(has_masquerade_table(&c.nodes[0].ns)?);
    assert!(
        tunnel_routes(&c.nodes[0].ns)?.contains(&"10.244.3.0/24".to_owned()),
        "the failing step left its routes as they were"
    );
    assert!(
        metric(&c.nodes[0].ns, "podwire_cluster_sync_errors_total")? >= 2.0,
        "{first}\n{again}"
    );
    assert!(ping(&a.ns, b.ip)?);
    Ok(())
}

#[test]
fn cluster_apply_giving_this_nodes_pod_cidr_to_another_node_keeps_its_pods_local() -> Result<()> {
    let mut c = two_nodes()?;
    let a1 = c.nodes[0].add_pod("c-moved-a1")?;
    let a2 = c.nodes[0].add_pod("c-moved-a2")?;
    let mut agent = OwnAgent::replace(&mut c, 0, &[])?;
    let own = net(&Cluster::pod_cidr(0));
    assert_eq!(
        table(&c, 0)?.get(&own).and_then(NodeEntry::kind),
        Some(NodeKind::Local)
    );

    // node1's pod CIDR moved to node2 (and node1 given another): an operator's mistake.
    let moved = ClusterFile {
        cluster_cidr: Some(net(CLUSTER_CIDR)),
        nodes: vec![
            NodeInfo {
                name: Cluster::node_name(0),
                address: Cluster::node_ip(0),
                pod_cidr: net("10.244.9.0/24"),
            },
            NodeInfo {
                name: Cluster::node_name(1),
                address: Cluster::node_ip(1),
                pod_cidr: own,
            },
        ],
    };
    std::fs::write(c.file(), serde_json::to_vec_pretty(&moved)?)?;
    agent.line_with(&["cluster applied"])?;

    let have = table(&c, 0)?;
    assert_eq!(
        have.get(&own).and_then(NodeEntry::kind),
        Some(NodeKind::Local),
        "this node's pod CIDR stays local: {have:#?}"
    );
    assert!(
        !tunnel_routes(&c.nodes[0].ns)?.contains(&own.to_string()),
        "this node's pod CIDR is never routed into the tunnel: {:?}",
        tunnel_routes(&c.nodes[0].ns)?
    );
    assert!(ping(&a1.ns, a2.ip)? && ping(&a2.ns, a1.ip)?);
    assert!(ping(&c.nodes[0].ns, a1.ip)?, "the node reaches its pod");
    tcp_echo(&a1.ns, &a2.ns, a2.ip, 256 * 1024)?;

    // node2 does not own this node's pods: a tunnelled packet from it claiming one of their
    // addresses is dropped as spoofed.
    let listener = udp_listener(&a1.ns, a1.ip)?;
    let port = listener.local_addr()?.port();
    send_vxlan(
        &c.nodes[1].ns,
        c.nodes[1].ip,
        c.nodes[0].ip,
        1,
        (Ipv4Addr::new(10, 244, 1, 77), a1.ip, port),
        b"claims a pod of node1",
    )?;
    assert_eq!(
        receive(&listener)?,
        None,
        "node2 may not speak for node1's pods"
    );
    // Control: node2 speaking for itself (its own address, as its kubelet's probes do) is
    // delivered.
    send_vxlan(
        &c.nodes[1].ns,
        c.nodes[1].ip,
        c.nodes[0].ip,
        1,
        (c.nodes[1].ip, a1.ip, port),
        b"from node2 itself",
    )?;
    let (_, from) = receive(&listener)?.context("node2's own address is delivered")?;
    assert_eq!(from.ip(), IpAddr::V4(c.nodes[1].ip));

    let error = agent
        .logged("node node2's pod CIDR 10.244.1.0/24 overlaps this node's")
        .with_context(|| format!("no error logged:\n{}", agent.daemon.seen.join("\n")))?;
    assert!(error.contains("ERROR"), "logged as an error: {error}");
    Ok(())
}

/// Fake node `k` of the scale test: an underlay address in 198.18.0.0/15 (RFC 2544's benchmark
/// range; nothing is ever sent there, it only fills tables) and a /29 pod CIDR in 10.244.16.0 and
/// up, clear of the lab nodes' /24s.
fn fake_node(k: u32) -> NodeInfo {
    let address = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 1)) + k);
    let pod = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 244, 16, 0)) + 8 * k);
    NodeInfo {
        name: format!("fake{k}"),
        address,
        pod_cidr: Ipv4Net::new(pod, 29).expect("a /29"),
    }
}

/// How long the scale test waits for an apply of thousands of nodes.
const SCALE_WAIT: Duration = Duration::from_secs(600);

#[test]
fn cluster_apply_of_five_thousand_nodes_is_looked_up_correctly() -> Result<()> {
    const NODES: u32 = 5000;
    let mut c = two_nodes()?;
    let a = c.nodes[0].add_pod("c-scale-a")?;
    let b = c.nodes[1].add_pod("c-scale-b")?;
    let mut agent = OwnAgent::replace(&mut c, 0, &[])?;
    let (rss_before, _) = agent.memory_kib()?;

    let real: Vec<NodeInfo> = (0..2)
        .map(|i| NodeInfo {
            name: Cluster::node_name(i),
            address: Cluster::node_ip(i),
            pod_cidr: net(&Cluster::pod_cidr(i)),
        })
        .collect();
    let fakes: Vec<NodeInfo> = (0..NODES - 2).map(fake_node).collect();
    let big = ClusterFile {
        cluster_cidr: Some(net(CLUSTER_CIDR)),
        nodes: real.iter().chain(&fakes).cloned().collect(),
    };
    let started = Instant::now();
    std::fs::write(c.file(), serde_json::to_vec(&big)?)?;
    // A debug build on a busy machine may take long: bounded against hanging only.
    let applied = agent.line_within(&["cluster applied", "nodes=5000"], SCALE_WAIT)?;
    let seen_after = started.elapsed();
    let (rss, hwm) = agent.memory_kib()?;
    eprintln!(
        "5000 nodes: applied in the agent's log line\n  {applied}\n  seen {:.2} s after the \
         file was written (polled every 1 s); agent VmRSS {rss_before} KiB before, {rss} KiB \
         after (peak {hwm} KiB)",
        seen_after.as_secs_f64(),
    );

    // Every node's pod CIDR and address, looked up as the programs do (longest prefix match of
    // a /32 in the pinned trie), plus this node's own CIDR and the cluster range.
    let path = c.nodes[0].pins().map(maps::NODES);
    let trie: LpmTrie<MapData, [u8; 4], NodeEntry> =
        LpmTrie::try_from(Map::LpmTrie(MapData::from_pin(&path)?))?;
    let lookup = |ip: Ipv4Addr| -> Result<NodeEntry> {
        trie.get(&Key::new(32, ip.octets()), 0)
            .with_context(|| format!("looking up {ip}"))
    };
    let mut wrong = Vec::new();
    for node in real.iter().skip(1).chain(&fakes) {
        let want = NodeEntry::node(NodeKind::Remote, node.address.octets());
        let in_cidr = Ipv4Addr::from(u32::from(node.pod_cidr.network()) + 5);
        for ip in [in_cidr, node.address] {
            if lookup(ip)? != want {
                wrong.push((ip, node.name.clone()));
            }
        }
    }
    assert!(wrong.is_empty(), "looked up wrongly: {wrong:?}");
    assert_eq!(
        lookup(Ipv4Addr::new(10, 244, 1, 9))?.kind(),
        Some(NodeKind::Local)
    );
    assert_eq!(
        lookup(Ipv4Addr::new(10, 244, 200, 255))?.kind(),
        Some(NodeKind::NoNode),
        "an address past every node's CIDR is no node's"
    );
    assert_eq!(
        table(&c, 0)?.len(),
        2 * NODES as usize,
        "2 per remote node, local, range"
    );
    let routes = tunnel_routes(&c.nodes[0].ns)?;
    assert_eq!(
        routes.len(),
        NODES as usize - 1,
        "a route per remote pod CIDR"
    );

    // Real traffic still takes the right node.
    assert!(ping(&a.ns, b.ip)? && ping(&b.ns, a.ip)?);
    tcp_echo(&a.ns, &b.ns, b.ip, 1024 * 1024)?;

    // One node leaving a large cluster costs its own entries and route, not the whole table's.
    let one_less = ClusterFile {
        cluster_cidr: big.cluster_cidr,
        nodes: big.nodes[..big.nodes.len() - 1].to_vec(),
    };
    std::fs::write(c.file(), serde_json::to_vec(&one_less)?)?;
    let one_left = agent.line_within(&["cluster applied", "nodes=4999"], SCALE_WAIT)?;
    assert!(
        one_left.contains("written=0 removed=2 kept=9998"),
        "only the node that left: {one_left}"
    );
    assert_eq!(tunnel_routes(&c.nodes[0].ns)?.len(), NODES as usize - 2);
    eprintln!("one node of 5000 leaving:\n  {one_left}");

    // Back to two nodes.
    let started = Instant::now();
    c.write_members(&[0, 1])?;
    let shrunk = agent.line_within(&["cluster applied", "nodes=2"], SCALE_WAIT)?;
    let shrink_seen_after = started.elapsed();
    assert_eq!(
        table(&c, 0)?.len(),
        4,
        "range, local, the other node's CIDR and address"
    );
    assert_eq!(tunnel_routes(&c.nodes[0].ns)?, ["10.244.2.0/24"]);
    assert!(ping(&a.ns, b.ip)?);

    eprintln!(
        "{} node table entries, {} routes; back to 2 nodes:\n  {shrunk}\n  seen {:.2} s after",
        2 * NODES,
        routes.len(),
        shrink_seen_after.as_secs_f64()
    );
    Ok(())
}
/// `ping -i 0.01` from `from` to `to` until stopped; its count of sent and received.
struct Pings(Option<Child>);

impl Pings {
    fn start(from: &NetNs, to: Ipv4Addr) -> Result<Pings> {
        let child = from
            .command("ping")
            .args(["-i", "0.01", "-W", "1", &to.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting ping")?;
        Ok(Pings(Some(child)))
    }

    /// Stops it (SIGINT, so it prints its summary): (transmitted, received).
    fn stop(mut self) -> Result<(u64, u64)> {
        let child = self.0.take().context("stopped once")?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            Signal::SIGINT,
        )?;
        let out = child.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let summary = text
            .lines()
            .find(|l| l.contains("packets transmitted"))
            .with_context(|| format!("no summary from ping: {text}"))?;
        let number = |before: &str| -> Result<u64> {
            summary
                .split(',')
                .find(|part| part.contains(before))
                .and_then(|part| part.split_whitespace().next()?.parse().ok())
                .with_context(|| format!("{before} in {summary}"))
        };
        Ok((number("transmitted")?, number("received")?))
    }
}

impl Drop for Pings {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[test]
fn cluster_apply_after_kill_9_brings_the_pinned_node_table_in_line_by_diff() -> Result<()> {
    let mut c = two_nodes()?;
    // A third node that runs no agent: its entries are the ones edited behind the agent's back.
    c.write_members(&[0, 1, 2])?;
    let a = c.nodes[0].add_pod("c-diff-a")?;
    let b = c.nodes[1].add_pod("c-diff-b")?;
    let agent = OwnAgent::replace(&mut c, 0, &[])?;
    assert!(
        eventually(SETTLE, || Ok(
            table(&c, 0)?.contains_key(&net("10.244.3.0/24"))
        ))?,
        "the third node is in the node table"
    );
    let before = table(&c, 0)?;
    let path = c.nodes[0].pins().map(maps::NODES);
    let id = MapInfo::from_pin(&path)?.id();
    let pings = Pings::start(&a.ns, b.ip)?;
    std::thread::sleep(Duration::from_millis(500));

    agent.kill()?;
    let stale = net("10.244.99.0/24");
    let mut nodes = NodeTable::open(&c.nodes[0].pins())?;
    nodes.set(stale, remote(98))?;
    nodes.remove(net("10.244.3.0/24"))?;
    drop(nodes);
    std::thread::sleep(Duration::from_millis(500));

    let agent = OwnAgent::start(&c, 0, &[])?;
    let applied = agent
        .logged("cluster applied")
        .context("the restarted agent applied the cluster before serving")?;
    std::thread::sleep(Duration::from_millis(500));
    let (sent, received) = pings.stop()?;

    assert_eq!(
        table(&c, 0)?,
        before,
        "stale entry removed, missing one back"
    );
    assert_eq!(
        MapInfo::from_pin(&path)?.id(),
        id,
        "the same map, not a new one"
    );
    assert!(
        applied.contains("written=1") && applied.contains("removed=1"),
        "only the difference was written: {applied}"
    );
    assert_eq!(agent.logged("removing endpoint"), None);
    eprintln!("pings across nodes during the kill -9 and restart: {received} of {sent}");
    assert!(
        (sent - received) * 1000 <= sent,
        "at most 0.1% of pings lost across the restart: {received} of {sent}"
    );
    assert!(ping(&a.ns, b.ip)?);
    Ok(())
}

#[test]
fn cluster_apply_of_five_thousand_kubernetes_nodes_is_looked_up_correctly() -> Result<()> {
    const NODES: u32 = 5000;
    podwire_lab::require_root()?;
    let underlay = Underlay::new()?;
    let cp = ControlPlane::start(&underlay, CONTROL_PLANE_IP)?;
    let me = NodeInfo {
        name: Cluster::node_name(0),
        address: Cluster::node_ip(0),
        pod_cidr: net(&Cluster::pod_cidr(0)),
    };
    let as_node = |n: &NodeInfo| {
        serde_json::json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": { "name": n.name },
            "spec": { "podCIDR": n.pod_cidr.to_string(), "podCIDRs": [n.pod_cidr.to_string()] },
            "status": { "addresses": [{ "type": "InternalIP", "address": n.address.to_string() }] },
        })
    };
    cp.apply(&as_node(&me))?;
    let ns = underlay.plug("node", me.address, false)?;
    let pins = PinRoot::new();
    let state = tempfile::tempdir()?;
    let mut cmd = ns.command(bin("podwire-agent")?);
    cmd.arg("--kubernetes")
        .arg("--kubeconfig")
        .arg(cp.kubeconfig())
        .args(["--cluster-cidr", CLUSTER_CIDR, "--node-name", &me.name])
        .arg("--state-dir")
        .arg(state.path())
        .arg("--socket")
        .arg(state.path().join("agent.sock"))
        .arg("--bpffs")
        .arg(pins.path())
        .env("PODWIRE_LOG", "info");
    let mut agent = OwnAgent {
        daemon: Daemon::spawn(cmd, None)?,
    };
    agent.daemon.wait_for_line("serving CNI requests")?;
    let (rss_before, _) = agent.memory_kib()?;

    let fakes: Vec<NodeInfo> = (0..NODES - 1).map(fake_node).collect();
    let list = serde_json::json!({
        "apiVersion": "v1",
        "kind": "List",
        "items": fakes.iter().map(as_node).collect::<Vec<_>>(),
    });
    let started = Instant::now();
    run_with_stdin(
        &mut cp.kubectl(["create", "-f", "-", "-o", "name"]),
        list.to_string().as_bytes(),
    )?;
    let created = started.elapsed();
    let applied = agent.line_within(&["cluster applied", "nodes=5000"], SCALE_WAIT)?;
    let seen = started.elapsed();
    let (rss, hwm) = agent.memory_kib()?;
    eprintln!(
        "5000 Kubernetes Nodes: created by kubectl in {:.1} s; the agent's last apply\n  \
         {applied}\n  seen {:.1} s after kubectl started; agent VmRSS {rss_before} KiB before, \
         {rss} KiB after (peak {hwm} KiB)",
        created.as_secs_f64(),
        seen.as_secs_f64()
    );

    let trie: LpmTrie<MapData, [u8; 4], NodeEntry> = LpmTrie::try_from(Map::LpmTrie(
        MapData::from_pin(pins.pins().map(maps::NODES))?,
    ))?;
    let mut wrong = Vec::new();
    for node in &fakes {
        let want = NodeEntry::node(NodeKind::Remote, node.address.octets());
        let in_cidr = Ipv4Addr::from(u32::from(node.pod_cidr.network()) + 5);
        for ip in [in_cidr, node.address] {
            if trie.get(&Key::new(32, ip.octets()), 0)? != want {
                wrong.push((ip, node.name.clone()));
            }
        }
    }
    assert!(wrong.is_empty(), "looked up wrongly: {wrong:?}");
    assert_eq!(
        trie.get(&Key::new(32, [10, 244, 1, 9]), 0)?.kind(),
        Some(NodeKind::Local)
    );
    assert_eq!(tunnel_routes(&ns)?.len(), NODES as usize - 1);
    drop(agent);
    Ok(())
}
