//! `cargo xtask bench`: podwire against the kernel's classic datapaths, measured in one run,
//! modes interleaved, medians of the repetitions, ratios printed, and the whole report written
//! to docs/BENCHMARKS.md (with docs/benchmarks.json, which the next run compares itself with).
//!
//! The data plane (this file) runs every datapath side by side, each on its own lab underlay:
//! - node to node: two hosts on the underlay, nothing in between (the limit of any datapath);
//! - same node: podwire's redirect against a Linux bridge as the reference `bridge` plugin and
//!   kubeadm set it up (pod MTU 1500, `bridge-nf-call-iptables=1`);
//! - two nodes: podwire's tunnel (through the collect_md VXLAN device, and written by its own
//!   programs) against kernel VXLAN routed between bridges (Flannel's vxlan backend, pod MTU
//!   1450), and podwire's native routing against plain routes to the other node's bridge
//!   (Flannel's host-gw).
//!
//! Metrics: one TCP stream (iperf3, cubic, client on CPU 0 and server on CPU 1: a namespace cannot
//! change the default bbr, and an unpinned stream moves between CPUs from one second to the
//! next), 1-byte TCP request/response and connect/request/response/close, both ends on CPU 0
//! (unpinned, a cross-CPU wakeup costs tens of microseconds and the results split in two modes).
//! The control plane's half is `bench_control`.

use std::{
    fmt::Write as _,
    fs,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, TcpListener, TcpStream},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context as _, Result};
use nix::{sched::CpuSet, unistd::Pid};
use podwire_lab::{
    cni::Pod,
    namespaces::NetNs,
    nodes::{Cluster, ClusterSpec, Underlay},
};
use serde_json::{json, Value};

use crate::{
    bench_control::{self, Comparison},
    build,
    toolchain::{self, Needs},
};

/// What Flannel's vxlan backend gives pods on a 1500-byte underlay.
const VXLAN_POD_MTU: u32 = 1450;
/// The report, and the numbers the next run compares itself with.
const REPORT: &str = "docs/BENCHMARKS.md";
const HISTORY: &str = "docs/benchmarks.json";

/// The two halves of the benchmark.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    /// Traffic between pods.
    Data,
    /// CNI ADD and DEL, the agent's memory, the node table.
    Control,
}

pub fn run(reps: usize, seconds: u64, only: Option<Part>, agent_args: Vec<String>) -> Result<()> {
    let bins = build::all(true, Needs::Run)?.bins;
    toolchain::ensure_packages(&[("iperf3", "TCP throughput in the benchmarks")])?;
    // Release binaries: the agent and plugin the benchmark runs are the ones it just built.
    podwire_lab::artifacts::set_bin_dir(&bins);
    if !agent_args.is_empty() {
        println!("podwire's agents also run with {}", agent_args.join(" "));
    }
    let data = match only {
        Some(Part::Control) => Vec::new(),
        _ => data_plane(reps, seconds, &agent_args)?,
    };
    let control = match only {
        Some(Part::Data) => Vec::new(),
        _ => bench_control::run(&bins)?,
    };
    let report = Report {
        reps,
        seconds,
        agent_args,
        data,
        control,
    };
    println!("\n{}", report.tables());
    if only.is_none() {
        report.write()?;
        println!("written to {REPORT} and {HISTORY}");
    }
    Ok(())
}

/// A datapath's pair of pods (or hosts): the client's namespace, the server's and its address.
struct Mode<'a> {
    pair: &'static str,
    datapath: &'static str,
    client: &'a NetNs,
    server: &'a NetNs,
    server_ip: Ipv4Addr,
}

/// Ratios the report prints: (ours, theirs), by datapath name.
const RATIOS: [(&str, &str); 5] = [
    ("podwire", "Linux bridge"),
    ("podwire, VXLAN device", "kernel VXLAN + bridge"),
    ("podwire, eBPF tunnel", "kernel VXLAN + bridge"),
    ("podwire, eBPF tunnel", "routes, no encapsulation"),
    ("podwire, native routing", "routes, no encapsulation"),
];

/// One repetition's numbers for one datapath.
#[derive(Clone, Copy)]
struct Sample {
    gbits: f64,
    rr_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    crr_per_s: f64,
}

/// A datapath's medians (and the spread of its throughput) over the repetitions.
struct Row {
    pair: &'static str,
    datapath: &'static str,
    gbits: f64,
    gbits_range: (f64, f64),
    rr_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    crr_per_s: f64,
}

/// A podwire cluster of two nodes, two pods on the first and one on the second.
struct Podwire {
    _cluster: Cluster,
    pods: [Pod; 3],
}

impl Podwire {
    fn start(mode_args: &[&str], agent_args: &[String]) -> Result<Podwire> {
        let mut args: Vec<String> = mode_args.iter().map(|a| a.to_string()).collect();
        args.extend(agent_args.iter().cloned());
        let cluster = Cluster::start(ClusterSpec {
            nodes: 2,
            agent_args: args,
            echo_agents: false,
        })
        .with_context(|| format!("podwire with {}", mode_args.join(" ")))?;
        let pods = [
            cluster.nodes[0].add_pod("a")?,
            cluster.nodes[0].add_pod("b")?,
            cluster.nodes[1].add_pod("c")?,
        ];
        Ok(Podwire {
            _cluster: cluster,
            pods,
        })
    }
}

/// The kernel's datapaths on two hosts of an underlay of their own.
struct Baseline {
    _underlay: Underlay,
    hosts: [NetNs; 2],
    /// Two pods on the first host's bridge (MTU 1500).
    bridge: [(NetNs, Ipv4Addr); 2],
    /// A pod on each host's bridge routed through kernel VXLAN (MTU 1450).
    vxlan: [(NetNs, Ipv4Addr); 2],
    /// A pod on each host's second bridge, routed to the other host without encapsulation.
    routed: [(NetNs, Ipv4Addr); 2],
}

impl Baseline {
    fn start() -> Result<Baseline> {
        let underlay = Underlay::new()?;
        // kubeadm's preflight requires br_netfilter and bridge-nf-call-iptables=1, so bridged pod
        // traffic passes iptables on the reference plugin's nodes. The underlay's bridge stands
        // for a switch, not a node: it keeps it off.
        if !std::path::Path::new("/proc/sys/net/bridge").exists() {
            // A modular br_netfilter; where it is built in (as here) there is nothing to load.
            let loaded = Command::new("modprobe").arg("br_netfilter").status();
            ensure!(
                loaded.is_ok_and(|s| s.success()),
                "the bridge baseline needs br_netfilter: modprobe br_netfilter failed"
            );
        }
        underlay
            .ns
            .sysctl("net.bridge.bridge-nf-call-iptables", "0")?;
        let hosts = [baseline_host(&underlay, 1)?, baseline_host(&underlay, 2)?];
        let bridge = [
            bridge_pod(&hosts[0], "cbr0", 250, 1, 2, 1500)?,
            bridge_pod(&hosts[0], "cbr0", 250, 1, 3, 1500)?,
        ];
        let vxlan = [
            bridge_pod(&hosts[0], "vbr0", 251, 1, 2, VXLAN_POD_MTU)?,
            bridge_pod(&hosts[1], "vbr0", 251, 2, 2, VXLAN_POD_MTU)?,
        ];
        let routed = [
            bridge_pod(&hosts[0], "rbr0", 252, 1, 2, 1500)?,
            bridge_pod(&hosts[1], "rbr0", 252, 2, 2, 1500)?,
        ];
        Ok(Baseline {
            _underlay: underlay,
            hosts,
            bridge,
            vxlan,
            routed,
        })
    }
}

fn data_plane(reps: usize, seconds: u64, agent_args: &[String]) -> Result<Vec<Row>> {
    let device = Podwire::start(&["--encap", "device"], agent_args)?;
    let ebpf = Podwire::start(&["--encap", "bpf"], agent_args)?;
    let native = Podwire::start(&["--routing", "native"], agent_args)?;
    let base = Baseline::start()?;

    let modes = [
        Mode {
            pair: "node to node",
            datapath: "veth underlay (the limit)",
            client: &base.hosts[0],
            server: &base.hosts[1],
            server_ip: baseline_address(2),
        },
        kernel_pair("same node", "Linux bridge", &base.bridge),
        podwire_pair("same node", "podwire", &device, 1),
        kernel_pair("two nodes", "kernel VXLAN + bridge", &base.vxlan),
        podwire_pair("two nodes", "podwire, VXLAN device", &device, 2),
        podwire_pair("two nodes", "podwire, eBPF tunnel", &ebpf, 2),
        kernel_pair("two nodes", "routes, no encapsulation", &base.routed),
        podwire_pair("two nodes", "podwire, native routing", &native, 2),
    ];
    let mut samples: Vec<Vec<Sample>> = modes.iter().map(|_| Vec::new()).collect();
    for rep in 1..=reps {
        for (mode, results) in modes.iter().zip(&mut samples) {
            let busy = CpuLoad::start()?;
            let sample = measure(mode, seconds)
                .with_context(|| format!("{}, {}", mode.pair, mode.datapath))?;
            let others = busy.others_percent()?;
            eprintln!(
                "  rep {rep}/{reps} {:12} {:26} {:6.2} Gbit/s {:7.0} RR/s p50 {:5.1} us p99 {:5.1} us {:6.0} CRR/s (other processes {others:.0}% CPU)",
                mode.pair, mode.datapath, sample.gbits, sample.rr_per_s, sample.p50_us, sample.p99_us, sample.crr_per_s
            );
            results.push(sample);
        }
    }
    Ok(modes
        .iter()
        .zip(&samples)
        .map(|(mode, s)| {
            let gbits: Vec<f64> = s.iter().map(|s| s.gbits).collect();
            Row {
                pair: mode.pair,
                datapath: mode.datapath,
                gbits: median(gbits.iter().copied()),
                gbits_range: (
                    gbits.iter().copied().fold(f64::INFINITY, f64::min),
                    gbits.iter().copied().fold(0.0, f64::max),
                ),
                rr_per_s: median(s.iter().map(|s| s.rr_per_s)),
                p50_us: median(s.iter().map(|s| s.p50_us)),
                p99_us: median(s.iter().map(|s| s.p99_us)),
                crr_per_s: median(s.iter().map(|s| s.crr_per_s)),
            }
        })
        .collect())
}

/// From the first pod of `cluster` to pod `server` of it.
fn podwire_pair<'a>(
    pair: &'static str,
    datapath: &'static str,
    cluster: &'a Podwire,
    server: usize,
) -> Mode<'a> {
    Mode {
        pair,
        datapath,
        client: &cluster.pods[0].ns,
        server: &cluster.pods[server].ns,
        server_ip: cluster.pods[server].ip,
    }
}

/// From the first pod of `pods` to the second.
fn kernel_pair<'a>(
    pair: &'static str,
    datapath: &'static str,
    pods: &'a [(NetNs, Ipv4Addr); 2],
) -> Mode<'a> {
    Mode {
        pair,
        datapath,
        client: &pods[0].0,
        server: &pods[1].0,
        server_ip: pods[1].1,
    }
}

/// Baseline host `i`'s underlay address.
fn baseline_address(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 77, 10 + i)
}

/// Baseline host `i` on the underlay, forwarding, with bridge-nf-call-iptables on, and three
/// bridges for its pods:
/// - `cbr0` 10.250.<i>.1/24, the reference `bridge` plugin's shape (same-node pairs);
/// - `vbr0` 10.251.<i>.1/24, routed to the other host's through a VXLAN device (VNI 99): Flannel's
///   vxlan backend, built by hand;
/// - `rbr0` 10.252.<i>.1/24, routed to the other host's via its underlay address: host-gw.
fn baseline_host(underlay: &Underlay, i: u8) -> Result<NetNs> {
    let ns = underlay.plug("base", baseline_address(i), true)?;
    ns.sysctl("net.bridge.bridge-nf-call-iptables", "1")?;
    let peer = 3 - i;
    for (bridge, net) in [("cbr0", 250), ("vbr0", 251), ("rbr0", 252)] {
        ns.ip(&["link", "add", bridge, "type", "bridge"])?;
        ns.ip(&["addr", "add", &format!("10.{net}.{i}.1/24"), "dev", bridge])?;
        ns.ip(&["link", "set", bridge, "up"])?;
    }
    ns.ip(&[
        "link",
        "add",
        "vx0",
        "type",
        "vxlan",
        "id",
        "99",
        "dstport",
        "4789",
        "dev",
        "eth0",
        "local",
        &baseline_address(i).to_string(),
        "remote",
        &baseline_address(peer).to_string(),
    ])?;
    ns.ip(&["addr", "add", &format!("10.253.0.{i}/24"), "dev", "vx0"])?;
    ns.ip(&["link", "set", "vx0", "up"])?;
    ns.ip(&[
        "route",
        "add",
        &format!("10.251.{peer}.0/24"),
        "via",
        &format!("10.253.0.{peer}"),
    ])?;
    ns.ip(&[
        "route",
        "add",
        &format!("10.252.{peer}.0/24"),
        "via",
        &baseline_address(peer).to_string(),
    ])?;
    Ok(ns)
}

/// A pod on `host`'s `bridge` at 10.<net>.<subnet>.<last> with `mtu`.
fn bridge_pod(
    host: &NetNs,
    bridge: &str,
    net: u8,
    subnet: u8,
    last: u8,
    mtu: u32,
) -> Result<(NetNs, Ipv4Addr)> {
    let pod = NetNs::new("pod")?;
    let port = format!("{bridge}p{last}");
    let addr = Ipv4Addr::new(10, net, subnet, last);
    host.add_veth(&port, &pod, "eth0", Some(mtu))?;
    host.ip(&["link", "set", &port, "master", bridge, "up"])?;
    pod.ip(&["link", "set", "eth0", "up"])?;
    pod.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
    pod.ip(&[
        "route",
        "add",
        "default",
        "via",
        &format!("10.{net}.{subnet}.1"),
    ])?;
    Ok((pod, addr))
}

fn measure(mode: &Mode, seconds: u64) -> Result<Sample> {
    let duration = Duration::from_secs(seconds);
    let gbits = iperf3(mode, seconds)?;
    let (rr_per_s, p50_us, p99_us) = request_response(mode, duration)?;
    let crr_per_s = connect_request_response(mode, duration)?;
    Ok(Sample {
        gbits,
        rr_per_s,
        p50_us,
        p99_us,
        crr_per_s,
    })
}

/// One iperf3 TCP stream from client (CPU 0) to server (CPU 1); received Gbit/s.
fn iperf3(mode: &Mode, seconds: u64) -> Result<f64> {
    let bind = mode.server_ip.to_string();
    let mut server = mode
        .server
        .command("iperf3")
        .args(["-s", "-1", "-B", &bind])
        .stdout(Stdio::null())
        .spawn()
        .context("starting iperf3 -s")?;
    // Connecting to find out whether it listens would use up its one test: ask the kernel.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !listening(mode.server, 5201)? {
        ensure!(
            Instant::now() < deadline,
            "iperf3 -s in {} does not listen",
            mode.server.name()
        );
        thread::sleep(Duration::from_millis(50));
    }
    let out = mode
        .client
        .command("timeout")
        .arg((seconds + 20).to_string())
        .args([
            "iperf3",
            "-c",
            &bind,
            "-C",
            "cubic",
            // Client on CPU 0, server on CPU 1.
            "-A",
            "0,1",
            "-J",
            "-t",
            &seconds.to_string(),
        ])
        .output()
        .context("running iperf3 -c")?;
    // Ignoring errors: the server may have exited after its one test.
    let _ = server.kill();
    let _ = server.wait();
    ensure!(
        out.status.success(),
        "iperf3 -c {bind}: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let json: Value = serde_json::from_slice(&out.stdout).context("iperf3's JSON result")?;
    let bits = json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 result")?;
    Ok(bits / 1e9)
}

/// Whether something listens on TCP `port` in namespace `ns`.
fn listening(ns: &NetNs, port: u16) -> Result<bool> {
    let out = ns
        .command("ss")
        .args(["-Hltn", &format!("sport = :{port}")])
        .output()
        .context("ss")?;
    Ok(!out.stdout.is_empty())
}

/// A listener in the server's namespace on an ephemeral port.
fn listen(mode: &Mode) -> Result<TcpListener> {
    mode.server
        .run(|| TcpListener::bind((mode.server_ip, 0)))?
        .context("listening in the server's namespace")
}

/// A connection from the client's namespace.
fn connect(mode: &Mode, to: std::net::SocketAddr) -> Result<TcpStream> {
    let conn = mode
        .client
        .run(|| TcpStream::connect_timeout(&to, Duration::from_secs(5)))?
        .context("connecting from the client's namespace")?;
    conn.set_nodelay(true)?;
    Ok(conn)
}

/// 1-byte TCP request/response for `duration`, both ends pinned to CPU 0: transactions per
/// second, p50 and p99 latency in microseconds.
fn request_response(mode: &Mode, duration: Duration) -> Result<(f64, f64, f64)> {
    let listener = listen(mode)?;
    let addr = listener.local_addr()?;
    let server = thread::spawn(move || -> std::io::Result<()> {
        pin_to_cpu0();
        let (mut conn, _) = listener.accept()?;
        conn.set_nodelay(true)?;
        conn.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut byte = [0u8; 1];
        while conn.read(&mut byte)? == 1 {
            conn.write_all(&byte)?;
        }
        Ok(())
    });
    let mut conn = connect(mode, addr)?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let latencies = thread::scope(|s| {
        s.spawn(|| -> std::io::Result<Vec<Duration>> {
            pin_to_cpu0();
            let mut latencies = Vec::with_capacity(1 << 20);
            let mut byte = [0u8; 1];
            let end = Instant::now() + duration;
            while Instant::now() < end {
                let start = Instant::now();
                conn.write_all(&byte)?;
                conn.read_exact(&mut byte)?;
                latencies.push(start.elapsed());
            }
            Ok(latencies)
        })
        .join()
        .expect("client thread")
    })?;
    drop(conn);
    server.join().expect("server thread")?;
    let mut us: Vec<f64> = latencies.iter().map(|d| d.as_secs_f64() * 1e6).collect();
    us.sort_by(f64::total_cmp);
    let at = |q: f64| us[((us.len() - 1) as f64 * q) as usize];
    Ok((us.len() as f64 / duration.as_secs_f64(), at(0.5), at(0.99)))
}

/// Connections per second, each: connect, 1-byte request, 1-byte response, close (netperf's
/// TCP_CRR), both ends pinned to CPU 0.
fn connect_request_response(mode: &Mode, duration: Duration) -> Result<f64> {
    // Every connection leaves a TIME_WAIT socket on the client; tens of thousands of them would
    // exhaust the default ephemeral ports.
    mode.client
        .sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
    mode.client.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
    let listener = listen(mode)?;
    let addr = listener.local_addr()?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let server = {
        let stop = stop.clone();
        thread::spawn(move || -> std::io::Result<()> {
            pin_to_cpu0();
            let mut byte = [0u8; 1];
            loop {
                let (mut conn, _) = listener.accept()?;
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    return Ok(());
                }
                conn.set_nodelay(true)?;
                if conn.read(&mut byte)? == 1 {
                    conn.write_all(&byte)?;
                }
            }
        })
    };
    let connections = thread::scope(|s| {
        s.spawn(|| -> Result<u64> {
            pin_to_cpu0();
            let mut byte = [0u8; 1];
            let mut n = 0;
            let end = Instant::now() + duration;
            while Instant::now() < end {
                let mut conn = connect(mode, addr)?;
                conn.write_all(&byte)?;
                conn.read_exact(&mut byte)?;
                n += 1;
            }
            Ok(n)
        })
        .join()
        .expect("client thread")
    })?;
    // Wakes the server's accept.
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    drop(connect(mode, addr)?);
    server.join().expect("server thread")?;
    Ok(connections as f64 / duration.as_secs_f64())
}

fn pin_to_cpu0() {
    let mut cpus = CpuSet::new();
    if cpus.set(0).is_ok() {
        let _ = nix::sched::sched_setaffinity(Pid::from_raw(0), &cpus);
    }
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// CPU time used by processes other than the benchmark's own during a measurement, from
/// /proc/stat minus this process tree's share: a measurement while something else ran is one
/// to distrust.
struct CpuLoad {
    busy: u64,
    total: u64,
    ours: u64,
}

impl CpuLoad {
    fn start() -> Result<CpuLoad> {
        let (busy, total) = cpu_times()?;
        Ok(CpuLoad {
            busy,
            total,
            ours: own_ticks()?,
        })
    }

    /// Percent of all CPUs' time others used since `start`; the benchmark's traffic runs in
    /// softirq and kernel threads too, so this is an upper bound.
    fn others_percent(&self) -> Result<f64> {
        let (busy, total) = cpu_times()?;
        let ours = own_ticks()?;
        let others = (busy - self.busy).saturating_sub(ours - self.ours);
        Ok(100.0 * others as f64 / (total - self.total).max(1) as f64)
    }
}

/// (busy, total) jiffies of all CPUs.
fn cpu_times() -> Result<(u64, u64)> {
    let stat = fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("/proc/stat is empty")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    ensure!(v.len() >= 5, "unexpected /proc/stat: {line}");
    let idle = v[3] + v[4];
    let total: u64 = v.iter().take(8).sum();
    Ok((total - idle, total))
}

/// Jiffies this process and its waited-for children used (the iperf3s, the threads).
fn own_ticks() -> Result<u64> {
    let stat = fs::read_to_string("/proc/self/stat")?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')').context("/proc/self/stat")? + 2..];
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    // utime, stime, cutime, cstime are fields 14 to 17 (1-based), 11 to 14 here.
    Ok(f[11] + f[12] + f[13] + f[14])
}

/// Everything one run measured.
struct Report {
    reps: usize,
    seconds: u64,
    agent_args: Vec<String>,
    data: Vec<Row>,
    control: Vec<Comparison>,
}

impl Report {
    /// The tables as the terminal and the report show them (Markdown).
    fn tables(&self) -> String {
        let mut out = String::new();
        if !self.data.is_empty() {
            let _ = writeln!(
                out,
                "| pair | datapath | 1 stream Gbit/s (min-max) | RR tx/s | RR p50/p99 us | CRR conn/s |\n|---|---|---:|---:|---|---:|"
            );
            for r in &self.data {
                let _ = writeln!(
                    out,
                    "| {} | {} | {:.1} ({:.1}-{:.1}) | {:.0} | {:.1}/{:.1} | {:.0} |",
                    r.pair,
                    r.datapath,
                    r.gbits,
                    r.gbits_range.0,
                    r.gbits_range.1,
                    r.rr_per_s,
                    r.p50_us,
                    r.p99_us,
                    r.crr_per_s
                );
            }
            let _ = writeln!(
                out,
                "\n| podwire | against | 1 stream | RR | RR p99 | CRR |\n|---|---|---:|---:|---:|---:|"
            );
            for (ours, theirs, ratios) in self.data_ratios() {
                let _ = writeln!(
                    out,
                    "| {ours} | {theirs} | {:.2}x | {:.2}x | {:.2}x | {:.2}x |",
                    ratios[0], ratios[1], ratios[2], ratios[3]
                );
            }
            let _ = writeln!(
                out,
                "\n(Ratios above 1 are better for podwire, except RR p99: below 1 is better.)"
            );
        }
        if !self.control.is_empty() {
            let _ = writeln!(
                out,
                "\n| control plane | podwire | baseline | podwire / baseline |\n|---|---:|---|---:|"
            );
            for c in &self.control {
                let (name, ratio) = match &c.baseline {
                    Some((name, value)) => (
                        format!("{name}: {value:.1} {}", c.unit),
                        format!("{:.2}x", c.podwire / value),
                    ),
                    None => ("".into(), "".into()),
                };
                let _ = writeln!(
                    out,
                    "| {} | {:.1} {} | {name} | {ratio} |",
                    c.metric, c.podwire, c.unit
                );
            }
        }
        out
    }

    /// (ours, theirs, [stream, RR, RR p99, CRR] ratios) for the pairs of [`RATIOS`] measured.
    fn data_ratios(&self) -> Vec<(&'static str, &'static str, [f64; 4])> {
        let row = |name: &str| self.data.iter().find(|r| r.datapath == name);
        RATIOS
            .iter()
            .filter_map(|(ours, theirs)| {
                let (a, b) = (row(ours)?, row(theirs)?);
                Some((
                    a.datapath,
                    b.datapath,
                    [
                        a.gbits / b.gbits,
                        a.rr_per_s / b.rr_per_s,
                        a.p99_us / b.p99_us,
                        a.crr_per_s / b.crr_per_s,
                    ],
                ))
            })
            .collect()
    }

    /// This run as the next one reads it.
    fn history(&self, commit: &str) -> Value {
        let ratios: serde_json::Map<String, Value> = self
            .data_ratios()
            .into_iter()
            .map(|(ours, theirs, r)| (format!("{ours} / {theirs}"), json!(r)))
            .collect();
        let control: serde_json::Map<String, Value> = self
            .control
            .iter()
            .map(|c| {
                (
                    c.metric.clone(),
                    json!({"podwire": c.podwire, "unit": c.unit,
                           "baseline": c.baseline.as_ref().map(|(_, v)| v)}),
                )
            })
            .collect();
        json!({ "commit": commit, "ratios": ratios, "control": control })
    }

    /// What changed against the previous run's `history`.
    fn changes(&self, previous: &Value) -> String {
        let mut out = String::new();
        let since = previous["commit"].as_str().unwrap_or("?");
        let commits =
            git(&["rev-list", "--count", &format!("{since}..HEAD")]).unwrap_or_else(|_| "?".into());
        let _ = writeln!(
            out,
            "Since the previous run (commit {since}, {commits} commits ago):\n"
        );
        for (ours, theirs, now) in self.data_ratios() {
            let key = format!("{ours} / {theirs}");
            match previous["ratios"][&key].as_array() {
                Some(before) => {
                    let b: Vec<f64> = before.iter().filter_map(Value::as_f64).collect();
                    if b.len() == 4 {
                        let _ = writeln!(
                            out,
                            "- {key}: stream {:.2}x → {:.2}x, RR {:.2}x → {:.2}x, CRR {:.2}x → {:.2}x",
                            b[0], now[0], b[1], now[1], b[3], now[3]
                        );
                    }
                }
                None => {
                    let _ = writeln!(out, "- {key}: new");
                }
            }
        }
        for c in &self.control {
            match previous["control"][&c.metric]["podwire"].as_f64() {
                Some(before) => {
                    let _ = writeln!(
                        out,
                        "- {}: {before:.1} → {:.1} {}",
                        c.metric, c.podwire, c.unit
                    );
                }
                None => {
                    let _ = writeln!(out, "- {}: new", c.metric);
                }
            }
        }
        out
    }

    /// Writes [`REPORT`] and [`HISTORY`], comparing with the history there was.
    fn write(&self) -> Result<()> {
        let commit = git(&["rev-parse", "--short", "HEAD"])?;
        let dirty = !git(&["status", "--porcelain", "--untracked-files=no"])?.is_empty();
        let previous: Option<Value> = fs::read_to_string(HISTORY)
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok());
        let changes = match &previous {
            Some(previous) => self.changes(previous),
            None => "The first run with this report.\n".into(),
        };
        let mut md = String::new();
        let _ = writeln!(md, "# Benchmarks\n");
        let _ = writeln!(
            md,
            "Written by `cargo xtask bench` (xtask/src/bench.rs, bench_control.rs); do not edit by hand. \
             Only ratios measured inside one run mean anything: absolute numbers move between runs and machines.\n"
        );
        let _ = writeln!(md, "## Machine\n\n{}", machine()?);
        let _ = writeln!(
            md,
            "- commit: {commit}{}\n",
            if dirty {
                " (with uncommitted changes)"
            } else {
                ""
            }
        );
        let _ = writeln!(
            md,
            "## How it was run\n\n\
             - `cargo xtask bench --reps {} --seconds {}{}`: release builds; every datapath measured once per repetition, interleaved, medians of {} repetitions of {} s.\n\
             - Nodes and pods are network namespaces; each datapath has its own underlay (a Linux bridge in a namespace, hosts plugged in by veth). podwire runs its real agent and CNI plugin (two-node clusters, one per mode: `--encap device`, `--encap bpf`, `--routing native`).\n\
             - Baselines, built by hand in the same run: the reference `bridge` plugin's shape (Linux bridge, pod MTU 1500, `br_netfilter` with `bridge-nf-call-iptables=1` as kubeadm requires), Flannel's vxlan backend (kernel VXLAN device routed between bridges, pod MTU 1450) and host-gw (routes via the other node's address, pod MTU 1500).\n\
             - One stream: iperf3, cubic, client pinned to CPU 0 and server to CPU 1. RR: 1-byte TCP request/response, both ends on CPU 0. CRR: connect, 1-byte request and response, close, both ends on CPU 0.\n\
             - The control plane: the real plugins exec'd as a runtime does (CNI_* environment, configuration on stdin) into fresh network namespaces; see the rows.\n",
            self.reps,
            self.seconds,
            if self.agent_args.is_empty() {
                String::new()
            } else {
                format!(" -- {}", self.agent_args.join(" "))
            },
            self.reps,
            self.seconds,
        );
        let _ = writeln!(md, "## Results\n\n{}", self.tables());
        let _ = writeln!(md, "## What changed\n\n{changes}");
        fs::write(REPORT, md).with_context(|| format!("writing {REPORT}"))?;
        fs::write(
            HISTORY,
            serde_json::to_string_pretty(&self.history(&commit))? + "\n",
        )
        .with_context(|| format!("writing {HISTORY}"))?;
        Ok(())
    }
}

/// The machine as the report describes it: CPU model and count, memory, kernel.
fn machine() -> Result<String> {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo")?;
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("unknown")
        .trim()
        .to_owned();
    let cpus = thread::available_parallelism().map_or(0, |n| n.get());
    let meminfo = fs::read_to_string("/proc/meminfo")?;
    let mem_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let kernel = nix::sys::utsname::uname()?;
    Ok(format!(
        "- CPU: {cpus} x {model}\n- memory: {:.1} GiB\n- kernel: {} {}",
        mem_kib as f64 / 1048576.0,
        kernel.sysname().to_string_lossy(),
        kernel.release().to_string_lossy()
    ))
}

fn git(args: &[&str]) -> Result<String> {
    let out = Command::new("git").args(args).output().context("git")?;
    ensure!(out.status.success(), "git {}", args.join(" "));
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}
