//! Shared pieces of podwire's kernel integration tests: network namespaces as nodes and pods,
//! veths between them, and the built binaries. Everything created here is removed on drop, also
//! when a test fails.

use std::{
    fs::File,
    net::Ipv4Addr,
    path::PathBuf,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
    thread,
};

use nix::sched::{setns, CloneFlags};

/// Fails the test unless it runs as root: the kernel tests must never skip silently.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "podwire's kernel tests create namespaces and load eBPF: run them as root (cargo xtask test)"
    );
}

/// Runs `cmd`, panicking with its stderr unless it succeeds.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `ip` with `args`.
pub fn ip(args: &[&str]) -> Output {
    run(Command::new("ip").args(args))
}

/// A named network namespace (`ip netns`), deleted with everything in it on drop.
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates a namespace named after `role`, unique to this process and call, with loopback up.
    pub fn new(role: &str) -> NetNs {
        require_root();
        static SWEEP: std::sync::Once = std::sync::Once::new();
        SWEEP.call_once(sweep_stale_namespaces);
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "pwt-{role}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name]);
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <ns> args...`
    pub fn ip(&self, args: &[&str]) -> Output {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// A command that runs `program` inside this namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs `f` on a thread that has entered this namespace; sockets and netlink calls made there
    /// belong to it (a socket keeps its namespace after `f` returns it).
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        let path = format!("/run/netns/{}", self.name);
        thread::scope(|s| {
            s.spawn(|| {
                let ns = File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
                setns(ns, CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| panic!("entering {path}: {e}"));
                f()
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// ifindex and MAC of the interface `name` in this namespace.
    pub fn link(&self, name: &str) -> (u32, [u8; 6]) {
        let out = self.ip(&["-j", "link", "show", "dev", name]);
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j output");
        let link = &json[0];
        let mac: Vec<u8> = link["address"]
            .as_str()
            .expect("link has a MAC")
            .split(':')
            .map(|octet| u8::from_str_radix(octet, 16).expect("hex octet"))
            .collect();
        (link["ifindex"].as_u64().expect("ifindex") as u32, mac.try_into().expect("6 octets"))
    }

    /// Sets an IPv4 sysctl such as `ip_forward` in this namespace.
    pub fn sysctl_ipv4(&self, key: &str, value: &str) {
        run(self.command("sysctl").args(["-qw", &format!("net.ipv4.{key}={value}")]));
    }
}

/// Deletes namespaces left by test processes that were killed before their guards ran.
fn sweep_stale_namespaces() {
    let out = run(Command::new("ip").args(["netns", "list"]));
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        // pwt-<role>-<pid>-<n>
        let pid = name.strip_prefix("pwt-").and_then(|rest| rest.rsplit('-').nth(1));
        if let Some(pid) = pid.and_then(|p| p.parse::<u32>().ok()) {
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                let _ = Command::new("ip").args(["netns", "del", name]).status();
            }
        }
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace destroys its veths (and so their peers) and tc attachments.
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// A "node" namespace and a "pod" namespace joined by a veth: `host` in the node, `eth0` in the pod,
/// addressed on one /24.
pub struct NodeAndPod {
    pub node: NetNs,
    pub pod: NetNs,
}

impl NodeAndPod {
    pub const HOST_IF: &'static str = "host0";
    pub const POD_IF: &'static str = "eth0";
    pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
    pub const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);

    pub fn new() -> NodeAndPod {
        let node = NetNs::new("node");
        let pod = NetNs::new("pod");
        node.ip(&[
            "link", "add", Self::HOST_IF, "type", "veth", "peer", "name", Self::POD_IF, "netns",
            pod.name(),
        ]);
        node.ip(&["addr", "add", &format!("{}/24", Self::NODE_IP), "dev", Self::HOST_IF]);
        node.ip(&["link", "set", Self::HOST_IF, "up"]);
        pod.ip(&["addr", "add", &format!("{}/24", Self::POD_IP), "dev", Self::POD_IF]);
        pod.ip(&["link", "set", Self::POD_IF, "up"]);
        NodeAndPod { node, pod }
    }
}

impl Default for NodeAndPod {
    fn default() -> Self {
        Self::new()
    }
}

/// Path of a binary built by `cargo xtask build` / `cargo xtask test`.
pub fn bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("PODWIRE_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug"));
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not found: run the tests with `cargo xtask test`, which builds it",
        path.display()
    );
    path
}

/// Hand-built frames for BPF_PROG_TEST_RUN.
pub mod packet {
    use std::net::Ipv4Addr;

    pub const ETH_IPV4: u16 = 0x0800;
    pub const ETH_ARP: u16 = 0x0806;

    /// An Ethernet header.
    pub fn eth(dst: [u8; 6], src: [u8; 6], ether_type: u16) -> Vec<u8> {
        let mut frame = Vec::with_capacity(64);
        frame.extend_from_slice(&dst);
        frame.extend_from_slice(&src);
        frame.extend_from_slice(&ether_type.to_be_bytes());
        frame
    }

    /// An Ethernet + IPv4 + UDP frame from `src_mac` carrying `payload`, with a valid IPv4
    /// header checksum.
    pub fn udp_v4(src_mac: [u8; 6], src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
        let mut frame = eth([0x02, 0, 0, 0, 0, 1], src_mac, ETH_IPV4);
        let total = (20 + 8 + payload.len()) as u16;
        let mut ip = vec![0x45, 0];
        ip.extend_from_slice(&total.to_be_bytes());
        ip.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
        ip.extend_from_slice(&src.octets());
        ip.extend_from_slice(&dst.octets());
        let sum = checksum(&ip);
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
        frame.extend_from_slice(&ip);
        frame.extend_from_slice(&40000u16.to_be_bytes());
        frame.extend_from_slice(&5000u16.to_be_bytes());
        frame.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
        frame.extend_from_slice(&[0, 0]);
        frame.extend_from_slice(payload);
        frame
    }

    /// The Internet checksum (RFC 1071) of `data`.
    pub fn checksum(data: &[u8]) -> u16 {
        let mut sum: u32 = data
            .chunks(2)
            .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }
}

/// A child process whose stderr lines are collected as they arrive; killed on drop.
pub struct Daemon {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    /// Every line read so far, for failure messages.
    pub seen: Vec<String>,
}

impl Daemon {
    /// Spawns `cmd` with stderr captured.
    pub fn spawn(mut cmd: Command) -> Daemon {
        use std::io::BufRead as _;
        let mut child = cmd
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Daemon { child, lines, seen: Vec::new() }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until a stderr line contains `needle` (a deadline only against hanging; tests
    /// never assert on time), returning it.
    pub fn wait_for_line(&mut self, needle: &str) -> String {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no line containing {needle:?}; output so far:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Sends `signal` and waits for the process to exit, returning its status and the rest of
    /// its stderr.
    pub fn stop(mut self, signal: nix::sys::signal::Signal) -> (std::process::ExitStatus, Vec<String>) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, signal).expect("signalling the daemon");
        let status = self.child.wait().expect("waiting for the daemon");
        let mut rest = std::mem::take(&mut self.seen);
        rest.extend(self.lines.try_iter());
        (status, rest)
    }

    /// Waits for the process to exit by itself, returning its status and all of its stderr.
    pub fn wait(mut self) -> (std::process::ExitStatus, Vec<String>) {
        let status = self.child.wait().expect("waiting for the daemon");
        let mut all = std::mem::take(&mut self.seen);
        // The reader thread ends at EOF, after the process exits.
        all.extend(self.lines.iter());
        (status, all)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
