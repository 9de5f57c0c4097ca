//! `cargo xtask bench`: podwire against the kernel's classic datapaths, measured in one run on
//! one underlay of podwire's lab (`podwire_lab::nodes::Cluster`), modes interleaved, medians of
//! the repetitions, ratios printed.
//!
//! Pairs: two pods on one node (podwire's redirect vs. a Linux bridge, the reference `bridge`
//! plugin's shape) and pods on two nodes (podwire's eBPF + collect_md VXLAN vs. kernel VXLAN
//! routed between bridges, Flannel's shape). Pods have MTU 1450 everywhere. Metrics: one TCP
//! stream (iperf3, cubic: a namespace cannot change the default bbr), and 1-byte TCP
//! request/response with both ends pinned to one CPU (unpinned, a cross-CPU wakeup costs tens of
//! microseconds and the results split into two modes).

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, TcpListener, TcpStream},
    process::Stdio,
    thread,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context as _, Result};
use nix::{sched::CpuSet, unistd::Pid};
use podwire_lab::{
    namespaces::NetNs,
    nodes::{Cluster, ClusterSpec, Underlay},
};

use crate::{
    bench_control, build,
    toolchain::{self, Needs},
};

const VXLAN_POD_MTU: u32 = 1450;

/// Two pods' namespaces and the server's address.
struct Pair<'a> {
    client: &'a NetNs,
    server: &'a NetNs,
    server_ip: Ipv4Addr,
}

struct Sample {
    gbits: f64,
    rr_per_s: f64,
    p50_us: f64,
    p99_us: f64,
}

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
    if only != Some(Part::Control) {
        data_plane(reps, seconds, agent_args)?;
    }
    if only != Some(Part::Data) {
        for row in bench_control::run(&bins)? {
            println!("{row:?}");
        }
    }
    Ok(())
}

fn data_plane(reps: usize, seconds: u64, agent_args: Vec<String>) -> Result<()> {
    if !agent_args.is_empty() {
        println!("podwire's agents run with {}", agent_args.join(" "));
    }
    let cluster = Cluster::start(ClusterSpec {
        nodes: 2,
        agent_args,
        echo_agents: false,
    })?;
    let a = cluster.nodes[0].add_pod("a")?;
    let b = cluster.nodes[0].add_pod("b")?;
    let c = cluster.nodes[1].add_pod("c")?;

    let base = [
        baseline_node(&cluster.underlay, 1)?,
        baseline_node(&cluster.underlay, 2)?,
    ];
    // The reference bridge plugin's pods keep the link's 1500; Flannel's get what its VXLAN
    // leaves, 1450.
    let (x, _) = bridge_pod(&base[0], 1, 2, 1500)?;
    let (y, y_ip) = bridge_pod(&base[0], 1, 3, 1500)?;
    let (w, _) = bridge_pod(&base[0], 1, 4, VXLAN_POD_MTU)?;
    let (z, z_ip) = bridge_pod(&base[1], 2, 2, VXLAN_POD_MTU)?;

    let modes = [
        (
            "same node",
            "podwire",
            Pair {
                client: &a.ns,
                server: &b.ns,
                server_ip: b.ip,
            },
        ),
        (
            "same node",
            "Linux bridge",
            Pair {
                client: &x,
                server: &y,
                server_ip: y_ip,
            },
        ),
        (
            "two nodes",
            "podwire",
            Pair {
                client: &a.ns,
                server: &c.ns,
                server_ip: c.ip,
            },
        ),
        (
            "two nodes",
            "kernel VXLAN + bridge",
            Pair {
                client: &w,
                server: &z,
                server_ip: z_ip,
            },
        ),
    ];
    let mut samples: Vec<Vec<Sample>> = modes.iter().map(|_| Vec::new()).collect();
    for rep in 1..=reps {
        for ((pair_name, datapath, pair), results) in modes.iter().zip(&mut samples) {
            let sample =
                measure(pair, seconds).with_context(|| format!("{pair_name}, {datapath}"))?;
            eprintln!(
                "  rep {rep}/{reps} {pair_name:9} {datapath:22} {:6.2} Gbit/s {:8.0} RR/s p50 {:5.1} us p99 {:5.1} us",
                sample.gbits, sample.rr_per_s, sample.p50_us, sample.p99_us
            );
            results.push(sample);
        }
    }

    println!("\nMedians of {reps}, {seconds} s each; TCP_RR with both ends on CPU 0. Only ratios within one run mean anything.");
    println!(
        "{:10} {:23} {:>10} {:>10} {:>14}",
        "pair", "datapath", "TCP Gbit/s", "RR tx/s", "RR p50/p99 us"
    );
    for ((pair_name, datapath, _), results) in modes.iter().zip(&samples) {
        println!(
            "{pair_name:10} {datapath:23} {:>10.2} {:>10.0} {:>8.1}/{:<5.1}",
            median(results.iter().map(|s| s.gbits)),
            median(results.iter().map(|s| s.rr_per_s)),
            median(results.iter().map(|s| s.p50_us)),
            median(results.iter().map(|s| s.p99_us)),
        );
    }
    for (i, pair_name) in [(0, "same node"), (2, "two nodes")] {
        let (ours, theirs) = (&samples[i], &samples[i + 1]);
        println!(
            "podwire / {} ({pair_name}): TCP {:.2}x, RR {:.2}x",
            modes[i + 1].1,
            median(ours.iter().map(|s| s.gbits)) / median(theirs.iter().map(|s| s.gbits)),
            median(ours.iter().map(|s| s.rr_per_s)) / median(theirs.iter().map(|s| s.rr_per_s)),
        );
    }
    Ok(())
}

/// A host on the underlay at 192.168.77.1<i> with a Linux bridge `cbr0` 10.250.<i>.1/24 for its
/// pods and a VXLAN device (VNI 99) routed to the other baseline host's pod subnet: Flannel's
/// vxlan backend, built by hand. Forwarding on, as that datapath needs.
fn baseline_node(underlay: &Underlay, i: u8) -> Result<NetNs> {
    let ns = underlay.plug("base", Ipv4Addr::new(192, 168, 77, 10 + i), true)?;
    let peer = 3 - i;
    ns.ip(&["link", "add", "cbr0", "type", "bridge"])?;
    ns.ip(&["addr", "add", &format!("10.250.{i}.1/24"), "dev", "cbr0"])?;
    ns.ip(&["link", "set", "cbr0", "up"])?;
    let _ = std::process::Command::new("modprobe")
        .arg("br_netfilter")
        .status();
    ns.command("sysctl")
        .args(["-qw", "net.bridge.bridge-nf-call-iptables=1"])
        .status()?;
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
        &format!("192.168.77.1{i}"),
        "remote",
        &format!("192.168.77.1{peer}"),
    ])?;
    ns.ip(&["addr", "add", &format!("10.251.0.{i}/24"), "dev", "vx0"])?;
    ns.ip(&["link", "set", "vx0", "up"])?;
    ns.ip(&[
        "route",
        "add",
        &format!("10.250.{peer}.0/24"),
        "via",
        &format!("10.251.0.{peer}"),
    ])?;
    Ok(ns)
}

/// A pod on `node`'s bridge at 10.250.<subnet>.<host>.
fn bridge_pod(node: &NetNs, subnet: u8, host: u8, mtu: u32) -> Result<(NetNs, Ipv4Addr)> {
    let pod = NetNs::new("pod")?;
    let port = format!("veth{host}");
    let addr = Ipv4Addr::new(10, 250, subnet, host);
    node.add_veth(&port, &pod, "eth0", Some(mtu))?;
    node.ip(&["link", "set", &port, "master", "cbr0", "up"])?;
    pod.ip(&["link", "set", "eth0", "up"])?;
    pod.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
    pod.ip(&[
        "route",
        "add",
        "default",
        "via",
        &format!("10.250.{subnet}.1"),
    ])?;
    Ok((pod, addr))
}

fn measure(pair: &Pair, seconds: u64) -> Result<Sample> {
    let gbits = iperf3(pair, seconds)?;
    let (rr_per_s, p50_us, p99_us) = request_response(pair, Duration::from_secs(seconds))?;
    Ok(Sample {
        gbits,
        rr_per_s,
        p50_us,
        p99_us,
    })
}

/// One iperf3 TCP stream from client to server; received Gbit/s.
fn iperf3(pair: &Pair, seconds: u64) -> Result<f64> {
    let bind = pair.server_ip.to_string();
    let mut server = pair
        .server
        .command("iperf3")
        .args(["-s", "-1", "-B", &bind])
        .stdout(Stdio::null())
        .spawn()
        .context("starting iperf3 -s")?;
    // Connecting to find out whether it listens would use up its one test: ask the kernel.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !listening(pair.server, 5201)? {
        ensure!(
            Instant::now() < deadline,
            "iperf3 -s in {} does not listen",
            pair.server.name()
        );
        thread::sleep(Duration::from_millis(50));
    }
    let out = pair
        .client
        .command("timeout")
        .arg((seconds + 20).to_string())
        .args([
            "iperf3",
            "-c",
            &bind,
            "-C",
            "cubic",
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
    let json: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("iperf3's JSON result")?;
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

/// 1-byte TCP request/response for `duration`, both ends pinned to CPU 0: transactions per
/// second, p50 and p99 latency in microseconds.
fn request_response(pair: &Pair, duration: Duration) -> Result<(f64, f64, f64)> {
    let listener = pair
        .server
        .run(|| TcpListener::bind((pair.server_ip, 0)))?
        .context("listening in the server pod")?;
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
    let mut conn = pair
        .client
        .run(|| TcpStream::connect_timeout(&addr, Duration::from_secs(5)))?
        .context("connecting from the client pod")?;
    conn.set_nodelay(true)?;
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
