//! `cargo xtask demo`: a node as a network namespace running the podwire agent, pods wired by
//! exec'ing the CNI plugin exactly as a container runtime does, pod-to-pod traffic with IP
//! forwarding off in the node (so only podwire's eBPF path can carry it), and what the datapath
//! counted, read from its pinned maps with the `podwire` CLI. Everything is removed at the end,
//! and leftovers of an interrupted run at the start.

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

const NODE_NS: &str = "pwdemo-node";
const NODE_IP: &str = "192.168.77.10";
const POD_CIDR: &str = "10.244.0.0/24";
const PODS: [&str; 3] = ["pwdemo-pod1", "pwdemo-pod2", "pwdemo-pod3"];
const PINS: &str = "/sys/fs/bpf/pwdemo";
const STATE: &str = "/run/pwdemo";

pub fn run(bins: &Path) -> Result<()> {
    ensure!(
        nix::unistd::geteuid().is_root(),
        "the demo creates network namespaces and loads eBPF: run it as root"
    );
    let _cleanup = Cleanup;
    Cleanup::remove();
    ip(&["netns", "add", NODE_NS])?;
    ip(&["-n", NODE_NS, "link", "set", "lo", "up"])?;
    ip(&["-n", NODE_NS, "addr", "add", &format!("{NODE_IP}/32"), "dev", "lo"])?;
    cmd::run(in_node("sysctl", &["-qw", "net.ipv4.ip_forward=0"]))?;
    println!("== node {NODE_NS} ({NODE_IP}), pod CIDR {POD_CIDR}, IP forwarding off");

    let socket = format!("{STATE}/agent.sock");
    let mut agent = Agent(
        in_node(bins.join("podwire-agent"), &["--pod-cidr", POD_CIDR, "--node-name", NODE_NS])
            .args(["--state-dir", STATE, "--socket", &socket, "--bpffs", PINS])
            .stderr(Stdio::piped())
            .spawn()
            .context("starting podwire-agent")?,
    );
    let lines = echo_lines(agent.0.stderr.take().expect("stderr is piped"));
    wait_for(&lines, "serving CNI requests")?;

    let conf = format!(
        r#"{{"cniVersion":"1.1.0","name":"podwire","type":"podwire-cni","mtu":1500,"agentSocket":"{socket}"}}"#
    );
    let mut pods = Vec::new();
    for pod in PODS {
        ip(&["netns", "add", pod])?;
        let result = cni(bins, "ADD", pod, &conf)?;
        let json: serde_json::Value = serde_json::from_str(&result)?;
        let address = json["ips"][0]["address"].as_str().context("ADD result has no IP")?;
        let pod_ip: Ipv4Addr = address.split('/').next().unwrap_or_default().parse()?;
        println!("== CNI ADD {pod}: {address} via {}", json["interfaces"][0]["name"]);
        pods.push((pod, pod_ip));
    }

    println!("== ping between every pair of pods");
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
    let (client, _) = pods[0];
    let (server, server_ip) = pods[2];
    let (bytes, elapsed) = tcp_transfer(client, server, server_ip, 64 << 20)?;
    println!(
        "== TCP {client} -> {server}: {} MiB arrived intact in {:.2} s",
        bytes >> 20,
        elapsed.as_secs_f64()
    );

    println!("== what the datapath counted (podwire counters, read from the pinned maps)");
    cmd::run(in_node(bins.join("podwire"), &["--bpffs", PINS, "counters", "--nonzero"]))?;
    println!("== its endpoints (podwire endpoints)");
    cmd::run(in_node(bins.join("podwire"), &["--bpffs", PINS, "endpoints"]))?;

    for (pod, _) in &pods {
        cni(bins, "DEL", pod, &conf)?;
        println!("== CNI DEL {pod}");
    }
    let pid = nix::unistd::Pid::from_raw(agent.0.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).context("stopping the agent")?;
    let status = agent.0.wait()?;
    while lines.recv_timeout(Duration::from_millis(300)).is_ok() {}
    ensure!(status.success(), "podwire-agent exited with {status}");
    println!("== done; removing the namespaces, pins and state");
    Ok(())
}

/// Execs the CNI plugin in the node's namespace as a runtime does; returns its stdout.
fn cni(bins: &Path, command: &str, pod: &str, conf: &str) -> Result<String> {
    let mut child = in_node(bins.join("podwire-cni"), &[])
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

/// A command in the node's network namespace only, so bpffs pins stay visible (`ip netns exec`
/// would remount /sys).
fn in_node(program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Command {
    let mut command = Command::new("nsenter");
    command.arg(format!("--net=/run/netns/{NODE_NS}")).arg(program).args(args);
    command
}

/// Prints each line of `stream` as it arrives and forwards it to the returned channel.
fn echo_lines(stream: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            eprintln!("  agent | {line}");
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
        for ns in PODS.iter().chain([&NODE_NS]) {
            let _ = Command::new("ip").args(["netns", "del", ns]).stderr(Stdio::null()).status();
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
