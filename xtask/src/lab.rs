//! A cluster in network namespaces on this machine, for the demo and the benchmarks: an underlay
//! bridge, nodes on it running the podwire agent fed by a cluster file, and pods wired by exec'ing
//! the CNI plugin exactly as a container runtime does. Namespaces, pins and state carry the lab's
//! prefix; dropping the lab removes them, and creating one removes leftovers of an interrupted run.

use std::{
    fs::File,
    io::{BufRead as _, BufReader, Write as _},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

use anyhow::{bail, ensure, Context as _, Result};
use nix::sched::{setns, CloneFlags};

use crate::cmd;

/// The pod range of every lab cluster.
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";

pub struct Lab {
    prefix: &'static str,
    bins: PathBuf,
    pub underlay: String,
}

/// A node of the lab: its namespace, underlay address and pod CIDR.
pub struct LabNode {
    pub ns: String,
    pub ip: Ipv4Addr,
    pub pod_cidr: String,
    state: String,
    pins: String,
}

/// A running agent; killed if not stopped.
pub struct Agent {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Lab {
    /// Removes what an earlier run with `prefix` left, then creates the underlay bridge.
    pub fn new(prefix: &'static str, bins: &Path) -> Result<Lab> {
        ensure!(
            nix::unistd::geteuid().is_root(),
            "the lab creates network namespaces and loads eBPF: run it as root"
        );
        let lab = Lab {
            prefix,
            bins: bins.to_path_buf(),
            underlay: format!("{prefix}-underlay"),
        };
        lab.remove();
        ip(&["netns", "add", &lab.underlay])?;
        ip(&["-n", &lab.underlay, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &lab.underlay, "link", "set", "br0", "up"])?;
        Ok(lab)
    }

    /// Creates namespace `<prefix>-<name>` plugged into the underlay bridge as `eth0` with
    /// `ip`/24, with IP forwarding as given.
    pub fn host(&self, name: &str, ip: Ipv4Addr, forwarding: bool) -> Result<String> {
        let ns = format!("{}-{name}", self.prefix);
        let port = format!("p-{name}");
        self::ip(&["netns", "add", &ns])?;
        self::ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        self::ip(&[
            "-n",
            &self.underlay,
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &ns,
        ])?;
        self::ip(&[
            "-n",
            &self.underlay,
            "link",
            "set",
            &port,
            "master",
            "br0",
            "up",
        ])?;
        self::ip(&["-n", &ns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        self::ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        let forward = format!("net.ipv4.ip_forward={}", u8::from(forwarding));
        cmd::run(in_ns(&ns, "sysctl", &["-qw", &forward]))?;
        Ok(ns)
    }

    /// A podwire node: host `node<i>` at 192.168.77.<i> with pod CIDR 10.244.<i>.0/24.
    pub fn node(&self, i: u8, forwarding: bool) -> Result<LabNode> {
        let ip = Ipv4Addr::new(192, 168, 77, i);
        let ns = self.host(&format!("node{i}"), ip, forwarding)?;
        Ok(LabNode {
            state: format!("{}/{ns}", self.state_dir()),
            pins: format!("/sys/fs/bpf/{}/{ns}", self.prefix),
            ns,
            ip,
            pod_cidr: format!("10.244.{i}.0/24"),
        })
    }

    fn state_dir(&self) -> String {
        format!("/run/{}", self.prefix)
    }

    /// Writes the cluster file listing `nodes`; returns its path.
    pub fn cluster_file(&self, nodes: &[LabNode]) -> Result<String> {
        let path = format!("{}/cluster.json", self.state_dir());
        std::fs::create_dir_all(self.state_dir())?;
        let cluster = serde_json::json!({
            "clusterCIDR": CLUSTER_CIDR,
            "nodes": nodes.iter().map(|n| serde_json::json!({ "name": n.ns, "address": n.ip, "podCIDR": n.pod_cidr })).collect::<Vec<_>>(),
        });
        std::fs::write(&path, serde_json::to_string_pretty(&cluster)?)?;
        Ok(path)
    }

    /// Starts the agent of `node` and waits until it serves CNI requests; with `echo`, its log
    /// lines are printed as they come.
    pub fn start_agent(&self, node: &LabNode, cluster_file: &str, echo: bool) -> Result<Agent> {
        let socket = format!("{}/agent.sock", node.state);
        let mut child = in_ns(
            &node.ns,
            self.bins.join("podwire-agent"),
            &["--cluster-file", cluster_file],
        )
        .args([
            "--node-name",
            &node.ns,
            "--state-dir",
            &node.state,
            "--socket",
            &socket,
            "--bpffs",
            &node.pins,
        ])
        .stderr(Stdio::piped())
        .spawn()
        .context("starting podwire-agent")?;
        let stream = child.stderr.take().expect("stderr is piped");
        let (tx, lines) = mpsc::channel();
        let name = node.ns.clone();
        thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                if echo {
                    eprintln!("  {name} agent | {line}");
                }
                let _ = tx.send(line);
            }
        });
        let agent = Agent { child, lines };
        loop {
            match agent.lines.recv_timeout(Duration::from_secs(30)) {
                Ok(line) if line.contains("serving CNI requests") => return Ok(agent),
                Ok(_) => {}
                Err(_) => bail!("podwire-agent on {} did not start serving", node.ns),
            }
        }
    }

    /// Creates pod namespace `<node>-<name>` and wires it with CNI ADD; returns the namespace, its
    /// address and the ADD result.
    pub fn add_pod(
        &self,
        node: &LabNode,
        name: &str,
    ) -> Result<(String, Ipv4Addr, serde_json::Value)> {
        let pod = format!("{}-{name}", node.ns);
        ip(&["netns", "add", &pod])?;
        let result: serde_json::Value = serde_json::from_str(&self.cni(node, "ADD", &pod)?)?;
        let address = result["ips"][0]["address"]
            .as_str()
            .context("ADD result has no IP")?;
        let pod_ip = address.split('/').next().unwrap_or_default().parse()?;
        Ok((pod, pod_ip, result))
    }

    /// Execs the CNI plugin in `node`'s namespace as a runtime does; returns its stdout.
    pub fn cni(&self, node: &LabNode, command: &str, pod: &str) -> Result<String> {
        let conf = format!(
            r#"{{"cniVersion":"1.1.0","name":"podwire","type":"podwire-cni","agentSocket":"{}/agent.sock"}}"#,
            node.state
        );
        let mut child = in_ns(&node.ns, self.bins.join("podwire-cni"), &[])
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", pod)
            .env("CNI_NETNS", format!("/run/netns/{pod}"))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", &self.bins)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("executing podwire-cni")?;
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(conf.as_bytes())?;
        let out = child.wait_with_output()?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        ensure!(out.status.success(), "CNI {command} {pod} failed: {stdout}");
        Ok(stdout)
    }

    /// Runs the `podwire` CLI on `node` with `args`, printing its output.
    pub fn podwire(&self, node: &LabNode, args: &[&str]) -> Result<()> {
        let mut command = in_ns(
            &node.ns,
            self.bins.join("podwire"),
            &["--bpffs", &node.pins],
        );
        command.args(args);
        cmd::run(command)
    }

    fn remove(&self) {
        let listed = Command::new("ip")
            .args(["netns", "list"])
            .output()
            .map(|o| o.stdout)
            .unwrap_or_default();
        for line in String::from_utf8_lossy(&listed).lines() {
            let ns = line.split_whitespace().next().unwrap_or_default();
            if ns.starts_with(&format!("{}-", self.prefix)) {
                let _ = Command::new("ip")
                    .args(["netns", "del", ns])
                    .stderr(Stdio::null())
                    .status();
            }
        }
        let _ = std::fs::remove_dir_all(format!("/sys/fs/bpf/{}", self.prefix));
        let _ = std::fs::remove_dir_all(self.state_dir());
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.remove();
    }
}

impl Agent {
    /// Stops the agent with SIGTERM and checks it exited cleanly.
    pub fn stop(mut self) -> Result<()> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)
            .context("stopping the agent")?;
        let status = self.child.wait()?;
        // Let the last log lines through.
        while self.lines.recv_timeout(Duration::from_millis(300)).is_ok() {}
        ensure!(status.success(), "podwire-agent exited with {status}");
        Ok(())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A command in namespace `ns` (network only: bpffs pins stay visible, which `ip netns exec`,
/// remounting /sys, would hide).
pub fn in_ns(ns: &str, program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Command {
    let mut command = Command::new("nsenter");
    command
        .arg(format!("--net=/run/netns/{ns}"))
        .arg(program)
        .args(args);
    command
}

/// Runs `f` on a thread inside namespace `ns`; sockets it makes stay there.
pub fn in_netns<R: Send>(ns: &str, f: impl FnOnce() -> R + Send) -> Result<R> {
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

pub fn ip(args: &[&str]) -> Result<()> {
    let mut ip = Command::new("ip");
    ip.args(args);
    cmd::run(ip)
}
