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
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
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
                setns(ns, CloneFlags::CLONE_NEWNET)
                    .unwrap_or_else(|e| panic!("entering {path}: {e}"));
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
        (
            link["ifindex"].as_u64().expect("ifindex") as u32,
            mac.try_into().expect("6 octets"),
        )
    }

    /// Sets an IPv4 sysctl such as `ip_forward` in this namespace.
    pub fn sysctl_ipv4(&self, key: &str, value: &str) {
        run(self
            .command("sysctl")
            .args(["-qw", &format!("net.ipv4.{key}={value}")]));
    }
}

/// Deletes namespaces left by test processes that were killed before their guards ran.
fn sweep_stale_namespaces() {
    let out = run(Command::new("ip").args(["netns", "list"]));
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        // pwt-<role>-<pid>-<n>
        let pid = name
            .strip_prefix("pwt-")
            .and_then(|rest| rest.rsplit('-').nth(1));
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
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
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
            "link",
            "add",
            Self::HOST_IF,
            "type",
            "veth",
            "peer",
            "name",
            Self::POD_IF,
            "netns",
            pod.name(),
        ]);
        node.ip(&[
            "addr",
            "add",
            &format!("{}/24", Self::NODE_IP),
            "dev",
            Self::HOST_IF,
        ]);
        node.ip(&["link", "set", Self::HOST_IF, "up"]);
        pod.ip(&[
            "addr",
            "add",
            &format!("{}/24", Self::POD_IP),
            "dev",
            Self::POD_IF,
        ]);
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
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Daemon {
            child,
            lines,
            seen: Vec::new(),
        }
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
    pub fn stop(
        mut self,
        signal: nix::sys::signal::Signal,
    ) -> (std::process::ExitStatus, Vec<String>) {
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

/// The CNI version the tests' configurations use (the newest the plugin speaks).
pub const CNI_VERSION: &str = "1.1.0";

/// A node: a namespace with a node address on its loopback and a podwire agent serving CNI
/// requests from it, with its own state directory, socket and bpffs pins. Pods are namespaces
/// wired by exec'ing the CNI plugin as a runtime does.
pub struct Node {
    pub ns: NetNs,
    pub ip: Ipv4Addr,
    /// What tells the agent its pod CIDR: `--pod-cidr ...` or `--cluster-file ... --node-name ...`.
    agent_args: Vec<String>,
    pub state_dir: tempfile::TempDir,
    pub pins: PathBuf,
    agent: Option<Daemon>,
}

/// What one plugin invocation returned.
#[derive(Debug)]
pub struct CniOutput {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl CniOutput {
    /// Stdout as JSON (a result, or the spec's error object).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("plugin output is not JSON ({e}): {self:?}"))
    }

    /// Asserts the invocation failed with the spec's error object carrying `code`; returns `msg`.
    pub fn expect_error(&self, code: u64) -> String {
        assert!(
            !self.success,
            "expected CNI error {code}, got success: {self:?}"
        );
        let json = self.json();
        assert_eq!(json["code"], code, "error code: {json}");
        assert!(
            json["cniVersion"].is_string(),
            "error carries cniVersion: {json}"
        );
        json["msg"].as_str().expect("msg").to_owned()
    }
}

/// A pod wired by the plugin.
pub struct Pod {
    pub ns: NetNs,
    pub ip: Ipv4Addr,
    pub result: serde_json::Value,
}

impl Node {
    /// Creates the node namespace with `ip` on its loopback (the node's own address, which it
    /// reaches pods from) and starts an agent for `pod_cidr`.
    pub fn start(ip: Ipv4Addr, pod_cidr: &str) -> Node {
        let ns = NetNs::new("node");
        ns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "lo"]);
        Self::start_in(ns, ip, vec!["--pod-cidr".into(), pod_cidr.into()])
    }

    /// Starts an agent in `ns` (which holds `ip`) with `agent_args` saying where its pod CIDR
    /// comes from.
    pub fn start_in(ns: NetNs, ip: Ipv4Addr, agent_args: Vec<String>) -> Node {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let pins = PathBuf::from(format!(
            "/sys/fs/bpf/pwt-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let mut node = Node {
            ns,
            ip,
            agent_args,
            state_dir: tempfile::tempdir().expect("state dir"),
            pins,
            agent: None,
        };
        node.start_agent();
        node
    }

    pub fn socket(&self) -> PathBuf {
        self.state_dir.path().join("agent.sock")
    }

    /// A command running `program` in the node's network namespace only (not its mount
    /// namespace, as `ip netns exec` would do): bpffs pins stay visible, as on a real node.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.ns.name()))
            .arg(program);
        cmd
    }

    /// Starts the agent and waits until it serves CNI requests.
    pub fn start_agent(&mut self) {
        let mut cmd = self.command(bin("podwire-agent"));
        cmd.args(&self.agent_args)
            .arg("--state-dir")
            .arg(self.state_dir.path())
            .arg("--socket")
            .arg(self.socket())
            .arg("--bpffs")
            .arg(&self.pins)
            .env("PODWIRE_LOG", "info");
        let mut agent = Daemon::spawn(cmd);
        agent.wait_for_line("serving CNI requests");
        self.agent = Some(agent);
    }

    /// Stops the agent with SIGTERM, as a DaemonSet rollout does; returns its log.
    pub fn stop_agent(&mut self) -> Vec<String> {
        let agent = self.agent.take().expect("agent running");
        let (status, log) = agent.stop(nix::sys::signal::Signal::SIGTERM);
        assert!(status.success(), "agent exit: {status}\n{}", log.join("\n"));
        log
    }

    /// podwire's network configuration for this node (no `mtu`: the node's applies).
    pub fn conf(&self) -> serde_json::Value {
        serde_json::json!({
            "cniVersion": CNI_VERSION,
            "name": "podwire",
            "type": "podwire-cni",
            "agentSocket": self.socket(),
        })
    }

    /// Execs the plugin in the node's namespace as a runtime does: CNI_* environment, the
    /// configuration on stdin.
    pub fn cni(&self, command: &str, env: &[(&str, &str)], stdin: &[u8]) -> CniOutput {
        use std::io::Write as _;
        let mut cmd = self.command(bin("podwire-cni"));
        cmd.env("CNI_COMMAND", command)
            .env("CNI_PATH", bin("podwire-cni").parent().unwrap())
            .envs(env.iter().copied())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().expect("exec podwire-cni");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin)
            .expect("writing the configuration");
        let out = child.wait_with_output().expect("waiting for podwire-cni");
        CniOutput {
            success: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).trim().to_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// ADD, DEL or CHECK of `container_id` in `pod` with this node's configuration.
    pub fn cni_pod(&self, command: &str, container_id: &str, pod: Option<&NetNs>) -> CniOutput {
        let netns = pod.map(|p| format!("/run/netns/{}", p.name()));
        let mut env = vec![("CNI_CONTAINERID", container_id), ("CNI_IFNAME", "eth0")];
        if let Some(netns) = &netns {
            env.push(("CNI_NETNS", netns));
        }
        self.cni(command, &env, self.conf().to_string().as_bytes())
    }

    /// Creates a pod namespace and wires it with ADD, asserting success.
    pub fn add_pod(&self, container_id: &str) -> Pod {
        let ns = NetNs::new("pod");
        let out = self.cni_pod("ADD", container_id, Some(&ns));
        assert!(out.success, "ADD {container_id}: {out:?}");
        let result = out.json();
        let ip = pod_ip(&result);
        Pod { ns, ip, result }
    }

    /// The node's pinned endpoint map, as the datapath sees it (read while the agent may be down).
    pub fn endpoints(&self) -> Vec<(Ipv4Addr, podwire_common::Endpoint)> {
        let path = self
            .pins
            .join("maps")
            .join(podwire_agent::datapath::maps::ENDPOINTS);
        let data = aya::maps::MapData::from_pin(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let map: aya::maps::HashMap<_, [u8; 4], podwire_common::Endpoint> =
            aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data)).expect("endpoint map");
        let mut all: Vec<_> = map
            .iter()
            .map(|e| e.map(|(k, v)| (Ipv4Addr::from(k), v)).expect("entry"))
            .collect();
        all.sort_by_key(|(ip, _)| *ip);
        all
    }

    /// The node's pinned counters, summed over CPUs.
    pub fn counter(&self, reason: podwire_common::Reason) -> podwire_common::Counter {
        let path = self
            .pins
            .join("maps")
            .join(podwire_agent::datapath::maps::COUNTERS);
        let data = aya::maps::MapData::from_pin(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let map: aya::maps::PerCpuArray<_, podwire_common::Counter> =
            aya::maps::PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data))
                .expect("counter map");
        let per_cpu = map.get(&(reason as u32), 0).expect("counter");
        per_cpu.iter().copied().sum()
    }

    /// Names of the host-side veths the plugin made in this node.
    pub fn host_veths(&self) -> Vec<String> {
        let out = self.ns.ip(&["-j", "link", "show", "type", "veth"]);
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j output");
        json.as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| l["ifname"].as_str())
            .filter(|n| n.starts_with("pw"))
            .map(str::to_owned)
            .collect()
    }

    /// The agent's persisted state file.
    pub fn state(&self) -> serde_json::Value {
        let path = self.state_dir.path().join("state.json");
        serde_json::from_slice(&std::fs::read(&path).expect("state.json")).expect("state JSON")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(agent) = self.agent.take() {
            drop(agent);
        }
        // Unpinning the links detaches them; the maps go once nothing holds them.
        let _ = std::fs::remove_dir_all(&self.pins);
    }
}

/// The pod's address from an ADD result.
pub fn pod_ip(result: &serde_json::Value) -> Ipv4Addr {
    let address = result["ips"][0]["address"]
        .as_str()
        .unwrap_or_else(|| panic!("no IP in {result}"));
    address
        .split('/')
        .next()
        .unwrap()
        .parse()
        .expect("IPv4 address")
}

/// `ping -c 1` from `from`'s namespace; whether a reply came.
pub fn ping(from: &NetNs, to: Ipv4Addr) -> bool {
    from.command("ping")
        .args(["-c", "1", "-W", "5", &to.to_string()])
        .output()
        .expect("ping")
        .status
        .success()
}

/// Sends `len` bytes over TCP from `client` to a server on `server_ip` in `server`, which echoes
/// them; panics unless every byte comes back intact.
pub fn tcp_echo(client: &NetNs, server: &NetNs, server_ip: Ipv4Addr, len: usize) {
    use std::io::{Read as _, Write as _};
    let timeout = Some(std::time::Duration::from_secs(20));
    let listener = server
        .run(|| std::net::TcpListener::bind((server_ip, 0)))
        .expect("listen");
    let addr = listener.local_addr().unwrap();
    let echo = thread::spawn(move || {
        let (mut conn, _) = listener.accept().expect("accept");
        conn.set_read_timeout(timeout).unwrap();
        let mut buf = vec![0u8; len];
        conn.read_exact(&mut buf).expect("server read");
        conn.write_all(&buf).expect("server write");
    });
    let mut conn = client
        .run(|| std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(10)))
        .unwrap_or_else(|e| panic!("connect {} -> {addr}: {e}", client.name()));
    conn.set_read_timeout(timeout).unwrap();
    let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 251) as u8).collect();
    conn.write_all(&data).expect("client write");
    let mut back = vec![0u8; len];
    conn.read_exact(&mut back)
        .unwrap_or_else(|e| panic!("echo {} -> {addr}: {e}", client.name()));
    assert!(
        back == data,
        "bytes from {} to {addr} and back arrive intact",
        client.name()
    );
    echo.join().expect("echo server");
}

/// Path of cnitool, built by `cargo xtask test`.
pub fn cnitool() -> PathBuf {
    let path = std::env::var_os("PODWIRE_CNITOOL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/tools/cnitool")
        });
    assert!(
        path.exists(),
        "{} not found: run the tests with `cargo xtask test`, which builds it",
        path.display()
    );
    path
}
