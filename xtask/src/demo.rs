//! `cargo xtask demo`: a node and a pod as network namespaces joined by a veth, the agent attached
//! to the pod's host-side veth, traffic from the pod, and the counters the datapath kept.
//! Everything is removed at the end, and leftovers of an interrupted run at the start.

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

use anyhow::{bail, Context as _, Result};

use crate::cmd;

const NODE_NS: &str = "pwdemo-node";
const POD_NS: &str = "pwdemo-pod";
const HOST_IF: &str = "pod0";
const NODE_IP: &str = "10.244.0.1";
const POD_IP: &str = "10.244.0.2";

pub fn run(bins: &Path) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the demo creates network namespaces and loads eBPF: run it as root");
    }
    let _topology = Topology::create()?;
    println!("== node namespace {NODE_NS}, pod namespace {POD_NS}: veth {HOST_IF} <-> eth0");
    println!("== pod {POD_IP}/24, node side {NODE_IP}/24; starting podwire-agent on {HOST_IF}");

    let mut agent = Agent(
        Command::new("ip")
            .args(["netns", "exec", NODE_NS])
            .arg(bins.join("podwire-agent"))
            .args(["--iface", HOST_IF])
            .env("PODWIRE_LOG", "info,podwire=debug")
            .stderr(Stdio::piped())
            .spawn()
            .context("starting podwire-agent")?,
    );
    let lines = echo_lines(agent.0.stderr.take().expect("stderr is piped"));
    wait_for(&lines, "datapath running")?;

    println!("== pod -> node: ping; from_pod logs each packet and counts it");
    cmd::run(pod_cmd(&["ping", "-c", "3", "-i", "0.2", NODE_IP]))?;
    thread::sleep(Duration::from_millis(300));

    println!("== stopping the agent: it prints its counters and detaches");
    let pid = nix::unistd::Pid::from_raw(agent.0.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).context("stopping the agent")?;
    let status = agent.0.wait()?;
    // Let the echo thread print the agent's last lines.
    while lines.recv_timeout(Duration::from_millis(500)).is_ok() {}
    if !status.success() {
        bail!("podwire-agent exited with {status}");
    }
    println!("== done; removing the namespaces");
    Ok(())
}

fn pod_cmd(args: &[&str]) -> Command {
    let mut command = Command::new("ip");
    command.args(["netns", "exec", POD_NS]).args(args);
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

struct Topology;

impl Topology {
    fn create() -> Result<Topology> {
        Self::remove();
        let topology = Topology;
        ip(&["netns", "add", NODE_NS])?;
        ip(&["netns", "add", POD_NS])?;
        ip(&["-n", NODE_NS, "link", "add", HOST_IF, "type", "veth", "peer", "name", "eth0", "netns", POD_NS])?;
        ip(&["-n", NODE_NS, "addr", "add", &format!("{NODE_IP}/24"), "dev", HOST_IF])?;
        ip(&["-n", NODE_NS, "link", "set", HOST_IF, "up"])?;
        ip(&["-n", POD_NS, "addr", "add", &format!("{POD_IP}/24"), "dev", "eth0"])?;
        ip(&["-n", POD_NS, "link", "set", "eth0", "up"])?;
        ip(&["-n", POD_NS, "link", "set", "lo", "up"])?;
        Ok(topology)
    }

    fn remove() {
        for ns in [NODE_NS, POD_NS] {
            let _ = Command::new("ip").args(["netns", "del", ns]).stderr(Stdio::null()).status();
        }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        Self::remove();
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let mut ip = Command::new("ip");
    ip.args(args);
    cmd::run(ip)
}
