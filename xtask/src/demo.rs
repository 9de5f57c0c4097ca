//! `cargo xtask demo`: a two-node cluster in network namespaces on one machine. Each node runs the
//! podwire agent, fed by a cluster file, with IP forwarding off (so only podwire's eBPF path can
//! carry pod traffic); pods are wired by exec'ing the CNI plugin exactly as a container runtime
//! does. It shows pod-to-pod traffic on one node and across nodes (VXLAN, in kernel), and what
//! each node's datapath holds and counted, read from its pinned maps with the `podwire` CLI.
//! Everything is removed at the end, and leftovers of an interrupted run at the start.

use std::{
    fs::File,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use nix::sched::{setns, CloneFlags};

use crate::cmd;

const UNDERLAY_NS: &str = "pwdemo-underlay";
const CLUSTER_CIDR: &str = "10.244.0.0/16";
const NODES: [&str; 2] = ["pwdemo-node1", "pwdemo-node2"];
const PODS_PER_NODE: usize = 2;
const PINS: &str = "/sys/fs/bpf/pwdemo";
const STATE: &str = "/run/pwdemo";

/// One demo node: its namespace, underlay address and pod CIDR.
struct DemoNode {
    ns: &'static str,
    ip: Ipv4Addr,
    pod_cidr: String,
}

impl DemoNode {
    fn dir(&self) -> String {
        format!("{STATE}/{}", self.ns)
    }

    fn pins(&self) -> String {
        format!("{PINS}/{}", self.ns)
    }

    fn conf(&self) -> String {
        format!(
            r#"{{"cniVersion":"1.1.0","name":"podwire","type":"podwire-cni","agentSocket":"{}/agent.sock"}}"#,
            self.dir()
        )
    }

    /// A command in the node's network namespace only, so bpffs pins stay visible (`ip netns
    /// exec` would remount /sys).
    fn command(&self, program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Command {
        let mut command = Command::new("nsenter");
        command.arg(format!("--net=/run/netns/{}", self.ns)).arg(program).args(args);
        command
    }
}

pub fn run(bins: &Path) -> Result<()> {
    ensure!(
        nix::unistd::geteuid().is_root(),
        "the demo creates network namespaces and loads eBPF: run it as root"
    );
    let _cleanup = Cleanup;
    Cleanup::remove();
    let nodes: Vec<DemoNode> = NODES
        .iter()
        .enumerate()
        .map(|(i, ns)| DemoNode { ns, ip: Ipv4Addr::new(192, 168, 77, 1 + i as u8), pod_cidr: format!("10.244.{}.0/24", i + 1) })
        .collect();

    ip(&["netns", "add", UNDERLAY_NS])?;
    ip(&["-n", UNDERLAY_NS, "link", "add", "br0", "type", "bridge"])?;
    ip(&["-n", UNDERLAY_NS, "link", "set", "br0", "up"])?;
    std::fs::create_dir_all(STATE)?;
    let cluster_file = format!("{STATE}/cluster.json");
    let cluster = serde_json::json!({
        "clusterCIDR": CLUSTER_CIDR,
        "nodes": nodes.iter().map(|n| serde_json::json!({ "name": n.ns, "address": n.ip, "podCIDR": n.pod_cidr })).collect::<Vec<_>>(),
    });
    std::fs::write(&cluster_file, serde_json::to_string_pretty(&cluster)?)?;
    println!("== cluster file {cluster_file}:\n{}", serde_json::to_string_pretty(&cluster)?);

    let mut agents = Vec::new();
    let mut logs = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        ip(&["netns", "add", node.ns])?;
        ip(&["-n", node.ns, "link", "set", "lo", "up"])?;
        let port = format!("n{}", i + 1);
        ip(&["-n", UNDERLAY_NS, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", node.ns])?;
        ip(&["-n", UNDERLAY_NS, "link", "set", &port, "master", "br0", "up"])?;
        ip(&["-n", node.ns, "addr", "add", &format!("{}/24", node.ip), "dev", "eth0"])?;
        ip(&["-n", node.ns, "link", "set", "eth0", "up"])?;
        cmd::run(node.command("sysctl", &["-qw", "net.ipv4.ip_forward=0"]))?;
        println!("== node {} at {} on the underlay bridge, pod CIDR {}, IP forwarding off", node.ns, node.ip, node.pod_cidr);
        let (dir, pins) = (node.dir(), node.pins());
        let mut agent = Agent(
            node.command(bins.join("podwire-agent"), &["--cluster-file", &cluster_file, "--node-name", node.ns])
                .args(["--state-dir", &dir, "--socket", &format!("{dir}/agent.sock"), "--bpffs", &pins])
                .stderr(Stdio::piped())
                .spawn()
                .context("starting podwire-agent")?,
        );
        let lines = echo_lines(node.ns, agent.0.stderr.take().expect("stderr is piped"));
        wait_for(&lines, "serving CNI requests")?;
        agents.push(agent);
        logs.push(lines);
    }

    let mut pods = Vec::new();
    for node in &nodes {
        for p in 1..=PODS_PER_NODE {
            let pod = format!("{}-pod{p}", node.ns);
            ip(&["netns", "add", &pod])?;
            let result = cni(bins, node, "ADD", &pod)?;
            let json: serde_json::Value = serde_json::from_str(&result)?;
            let address = json["ips"][0]["address"].as_str().context("ADD result has no IP")?;
            let pod_ip: Ipv4Addr = address.split('/').next().unwrap_or_default().parse()?;
            println!("== CNI ADD {pod} on {}: {address}, MTU {}", node.ns, json["interfaces"][1]["mtu"]);
            pods.push((pod, pod_ip));
        }
    }

    println!("== ping between every pair of pods (same node: redirected; across nodes: VXLAN)");
    for (from, _) in &pods {
        for (to, to_ip) in &pods {
            if from != to {
                let out = Command::new("ip")
                    .args(["netns", "exec", from, "ping", "-c", "2", "-i", "0.2", "-W", "2"])
                    .arg(to_ip.to_string())
                    .output()?;
                let summary = String::from_utf8_lossy(&out.stdout);
                let line = summary.lines().find(|l| l.contains("received")).unwrap_or("no reply");
                println!("   {from} -> {to} ({to_ip}): {line}");
                ensure!(out.status.success(), "ping {from} -> {to} failed");
            }
        }
    }
    for (client, (server, server_ip)) in [(&pods[0].0, &pods[1]), (&pods[0].0, &pods[PODS_PER_NODE])] {
        let (bytes, elapsed) = tcp_transfer(client, server, *server_ip, 64 << 20)?;
        println!("== TCP {client} -> {server}: {} MiB arrived intact in {:.2} s", bytes >> 20, elapsed.as_secs_f64());
    }

    for node in &nodes {
        let pins = node.pins();
        println!("== {}: podwire nodes", node.ns);
        cmd::run(node.command(bins.join("podwire"), &["--bpffs", &pins, "nodes"]))?;
        println!("== {}: podwire endpoints", node.ns);
        cmd::run(node.command(bins.join("podwire"), &["--bpffs", &pins, "endpoints"]))?;
        println!("== {}: podwire counters --nonzero", node.ns);
        cmd::run(node.command(bins.join("podwire"), &["--bpffs", &pins, "counters", "--nonzero"]))?;
    }

    for (i, node) in nodes.iter().enumerate() {
        for (pod, _) in &pods[i * PODS_PER_NODE..(i + 1) * PODS_PER_NODE] {
            cni(bins, node, "DEL", pod)?;
            println!("== CNI DEL {pod}");
        }
    }
    for (agent, lines) in agents.iter_mut().zip(&logs) {
        let pid = nix::unistd::Pid::from_raw(agent.0.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).context("stopping the agent")?;
        let status = agent.0.wait()?;
        while lines.recv_timeout(Duration::from_millis(300)).is_ok() {}
        ensure!(status.success(), "podwire-agent exited with {status}");
    }
    println!("== done; removing the namespaces, pins and state");
    Ok(())
}

/// Execs the CNI plugin in the node's namespace as a runtime does; returns its stdout.
fn cni(bins: &Path, node: &DemoNode, command: &str, pod: &str) -> Result<String> {
    let conf = node.conf();
    let mut child = node
        .command(bins.join("podwire-cni"), &[])
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", pod)
        .env("CNI_NETNS", format!("/run/netns/{pod}"))
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", bins)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("executing podwire-cni")?;
    child.stdin.take().expect("piped").write_all(conf.as_bytes())?;
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!("CNI {command} {pod} failed: {stdout}");
    }
    Ok(stdout)
}

/// Sends `len` bytes from a socket in `client` to one in `server`; returns what arrived and the
/// time it took. Sockets stay in the namespace their thread was in when they were made.
fn tcp_transfer(client: &str, server: &str, server_ip: Ipv4Addr, len: usize) -> Result<(usize, Duration)> {
    let listener = in_netns(server, || TcpListener::bind((server_ip, 0)))??;
    let addr = listener.local_addr()?;
    let receiver = thread::spawn(move || -> std::io::Result<usize> {
        let (mut conn, _) = listener.accept()?;
        let mut buf = vec![0u8; 1 << 16];
        let (mut total, mut expected) = (0usize, 0u8);
        loop {
            let n = conn.read(&mut buf)?;
            if n == 0 {
                return Ok(total);
            }
            for &byte in &buf[..n] {
                if byte != expected {
                    return Err(std::io::Error::other(format!("byte {total} corrupted")));
                }
                expected = expected.wrapping_add(1);
                total += 1;
            }
        }
    });
    let start = Instant::now();
    let mut conn = in_netns(client, || TcpStream::connect_timeout(&addr, Duration::from_secs(5)))??;
    let chunk: Vec<u8> = (0..=255u8).cycle().take(1 << 16).collect();
    for _ in 0..len / chunk.len() {
        conn.write_all(&chunk)?;
    }
    drop(conn);
    let received = receiver.join().expect("receiver thread")?;
    ensure!(received == len, "{received} of {len} bytes arrived");
    Ok((received, start.elapsed()))
}

fn in_netns<R: Send>(ns: &str, f: impl FnOnce() -> R + Send) -> Result<R> {
    let file = File::open(format!("/run/netns/{ns}"))?;
    thread::scope(|s| {
        s.spawn(|| -> Result<R> {
            setns(file, CloneFlags::CLONE_NEWNET)?;
            Ok(f())
        })
        .join()
        .expect("netns thread")
    })
}

/// Prints each line of `stream` as it arrives and forwards it to the returned channel.
fn echo_lines(node: &'static str, stream: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            eprintln!("  {node} agent | {line}");
            let _ = tx.send(line);
        }
    });
    rx
}

fn wait_for(lines: &mpsc::Receiver<String>, needle: &str) -> Result<()> {
    loop {
        match lines.recv_timeout(Duration::from_secs(30)) {
            Ok(line) if line.contains(needle) => return Ok(()),
            Ok(_) => {}
            Err(_) => bail!("podwire-agent did not report {needle:?}"),
        }
    }
}

/// The agent process, killed if the demo fails before stopping it.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Removes everything the demo creates, at the start and at the end.
struct Cleanup;

impl Cleanup {
    fn remove() {
        let listed = Command::new("ip").args(["netns", "list"]).output().map(|o| o.stdout).unwrap_or_default();
        for line in String::from_utf8_lossy(&listed).lines() {
            let ns = line.split_whitespace().next().unwrap_or_default();
            if ns.starts_with("pwdemo-") {
                let _ = Command::new("ip").args(["netns", "del", ns]).stderr(Stdio::null()).status();
            }
        }
        for dir in [PINS, STATE] {
            let _ = std::fs::remove_dir_all(PathBuf::from(dir));
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        Self::remove();
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let mut ip = Command::new("ip");
    ip.args(args);
    cmd::run(ip)
}
