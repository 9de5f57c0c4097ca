//! podwire-verify: loads every podwire eBPF program through the running kernel's verifier, then
//! proves the datapath carries real packets on a kernel without TCX: two pods, wired as the CNI
//! plugin wires them, exchange UDP datagrams that only `from_pod` (attached through netlink tc,
//! with `bpf_redirect_peer`) can deliver, as the node does not forward. It exists so
//! `cargo xtask vm-verify` can run it (built static, as a VM's only program) on Debian 12's 6.1
//! kernel, which users run, and not only on the build machine's kernel.
//!
//! Progress goes to stdout as it happens and, on failure, the error chain (a verifier log
//! included) to stderr, for whoever reads the console. Last, whether it succeeded or not, it
//! prints one [`VerifyReport`] line, which is what xtask checks; the exit code is 1 on failure.

use std::{
    fs::File,
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    os::fd::AsRawFd as _,
    path::Path,
    process::ExitCode,
    thread,
    time::Duration,
};

use anyhow::{ensure, Context as _, Result};
use nix::sched::{unshare, CloneFlags};
use podwire_common::{Endpoint, Reason};
use podwire_core::object::programs;
use podwire_datapath::{tcx_supported, Datapath, Hook, LoadOptions, LogLevel, Tunnel};
use podwire_lab::{
    namespaces::enter,
    vm::{Delivery, VerifyReport, NETLINK_TC},
};
use podwire_netlink::{
    pod::{create, PodInterface, PodNetns},
    Netlink,
};

const POD_IF: &str = "eth0";
const MTU: u32 = 1500;
const PORT: u16 = 7777;
/// Payload sizes sent each way, up to the largest that fits a 1500-byte MTU unfragmented.
const SIZES: [usize; 8] = [1, 18, 64, 200, 512, 1000, 1400, 1472];
/// Ethernet, IPv4 and UDP headers: what the counters add to each payload.
const HEADERS: u64 = 14 + 20 + 8;
/// A datagram takes microseconds; this is only the limit for one that was lost.
const RECV_TIMEOUT: Duration = Duration::from_secs(2);
const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

fn main() -> ExitCode {
    let mut report = VerifyReport::default();
    let outcome = run(&mut report);
    if let Err(e) = &outcome {
        eprintln!("Error: {e:?}");
        report.error = Some(format!("{e:#}"));
    }
    println!("{}", report.line());
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE,
    }
}

/// Fills `report` as far as the checks get.
fn run(report: &mut VerifyReport) -> Result<()> {
    report.kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .context("reading the kernel release from /proc (is procfs mounted?)")?
        .trim()
        .to_owned();
    // The node is a namespace of its own (made while this is the only thread, so every thread
    // started later is in it too): the check turns forwarding off and adds veths, which must not
    // touch the network of a machine this runs on outside a VM.
    unshare(CloneFlags::CLONE_NEWNET).context("creating the node's network namespace")?;
    verify(report)?;
    report.delivery = Some(deliver(&report.kernel)?);
    Ok(())
}

fn verify(report: &mut VerifyReport) -> Result<()> {
    // A tunnel makes the programs' tunnel path live, so the verifier walks it too; its ifindex is
    // only a constant to them here, as nothing is attached.
    let _datapath = Datapath::load(
        podwire_agent::OBJECT,
        LoadOptions {
            log_level: LogLevel::Off,
            pins: None,
            tunnel: Some(Tunnel {
                vxlan_ifindex: 1,
                vni: 1,
                port: 4789,
                node_address: Ipv4Addr::new(192, 168, 77, 1),
            }),
            test_run: false,
        },
    )
    .context("loading podwire's eBPF programs")?;
    for name in programs::ALL {
        println!("verified {name}");
        report.verified.push(name.to_owned());
    }
    println!(
        "podwire-verify: all {} programs passed the verifier on kernel {}",
        programs::ALL.len(),
        report.kernel
    );
    Ok(())
}

/// A pod: its namespace (alive while the file is open) and the host side of its veth pair.
struct Pod {
    ns: File,
    ip: Ipv4Addr,
    host_if: &'static str,
    endpoint: Endpoint,
}

/// Wires two pods, attaches `from_pod` to their host-side veths and has them exchange datagrams
/// that only its `bpf_redirect_peer` can deliver.
fn deliver(kernel: &str) -> Result<Delivery> {
    ensure!(
        !tcx_supported(),
        "kernel {kernel} has TCX, so podwire does not attach through netlink tc here, which is \
         what the pod-to-pod check proves: run it on a kernel before 6.6 (cargo xtask vm-verify)"
    );
    std::fs::write(IP_FORWARD, "0").context("turning IP forwarding off in the node")?;
    // rtnetlink runs on tokio, and its connections make progress only while the runtime is
    // driven: all of the wiring happens inside this one block_on.
    let (a, b) = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .context("starting a tokio runtime")?
        .block_on(async {
            let host = Netlink::connect().context("connecting to netlink in the node")?;
            let a = wire_pod(&host, "pw-a", Ipv4Addr::new(10, 244, 0, 2))
                .await
                .context("wiring pod A")?;
            let b = wire_pod(&host, "pw-b", Ipv4Addr::new(10, 244, 0, 3))
                .await
                .context("wiring pod B")?;
            anyhow::Ok((a, b))
        })?;

    let mut datapath = Datapath::load(podwire_agent::OBJECT, LoadOptions::default())
        .context("loading the datapath")?;
    for pod in [&a, &b] {
        datapath
            .endpoints
            .set(pod.ip, pod.endpoint)
            .with_context(|| format!("writing the endpoint of {}", pod.ip))?;
        // Both of a pod's hooks, as the agent attaches them (to_pod at egress sees nothing here:
        // from_pod delivers past the stack). Without TCX (checked above) nothing is pinned: the
        // path is never created.
        for hook in Hook::pod(pod.host_if) {
            let pin = Path::new("/sys/fs/bpf/podwire-verify").join(hook.program);
            datapath
                .attach_pinned(hook, &pin)
                .with_context(|| format!("attaching {} to {}", hook.program, pod.host_if))?;
        }
    }

    let socket = |pod: &Pod| {
        enter(&pod.ns, || {
            let socket = UdpSocket::bind((pod.ip, PORT))
                .with_context(|| format!("binding UDP {}:{PORT}", pod.ip))?;
            socket
                .set_read_timeout(Some(RECV_TIMEOUT))
                .context("setting a receive timeout")?;
            anyhow::Ok(socket)
        })
        .with_context(|| format!("entering the network namespace of {}", pod.ip))?
    };
    let (socket_a, socket_b) = (socket(&a)?, socket(&b)?);
    let mut bytes = 0;
    for (i, &len) in SIZES.iter().enumerate() {
        let payload: Vec<u8> = (0..len).map(|j| (i * 31 + j * 7) as u8).collect();
        exchange(&datapath, (&socket_a, a.ip), (&socket_b, b.ip), &payload)?;
        exchange(&datapath, (&socket_b, b.ip), (&socket_a, a.ip), &payload)?;
        bytes += 2 * (HEADERS + len as u64);
    }

    let sent = 2 * SIZES.len() as u64;
    let redirected = datapath
        .counters
        .get(Reason::RedirectLocal)
        .context("reading the counters")?;
    ensure!(
        (redirected.packets, redirected.bytes) == (sent, bytes),
        "{sent} datagrams ({bytes} bytes) arrived, but from_pod counted {} packets ({} bytes) \
         delivered with bpf_redirect_peer; counters: {}",
        redirected.packets,
        redirected.bytes,
        counters(&datapath)
    );
    // Read back rather than assumed: the report says what the node was like when it was done.
    let forwarding = std::fs::read_to_string(IP_FORWARD)
        .context("reading IP forwarding back")?
        .trim()
        != "0";
    println!(
        "podwire-verify: delivered {sent} datagrams pod-to-pod ({} each way, {} to {} bytes) on \
         kernel {kernel} via netlink tc, forwarding {}",
        SIZES.len(),
        SIZES[0],
        SIZES[SIZES.len() - 1],
        if forwarding { "on" } else { "off" }
    );
    Ok(Delivery {
        datagrams: sent,
        min_bytes: SIZES[0],
        max_bytes: SIZES[SIZES.len() - 1],
        attach: NETLINK_TC.to_owned(),
        forwarding,
    })
}

/// Sends `payload` from one pod's socket to the other's and checks it arrives intact.
fn exchange(
    datapath: &Datapath,
    (from, from_ip): (&UdpSocket, Ipv4Addr),
    (to, to_ip): (&UdpSocket, Ipv4Addr),
    payload: &[u8],
) -> Result<()> {
    from.send_to(payload, (to_ip, PORT))
        .with_context(|| format!("sending {} bytes from {from_ip} to {to_ip}", payload.len()))?;
    let mut buf = [0; 2048];
    let (len, source) = to.recv_from(&mut buf).with_context(|| {
        format!(
            "{to_ip} receiving {} bytes from {from_ip}; counters: {}",
            payload.len(),
            counters(datapath)
        )
    })?;
    ensure!(
        source == SocketAddr::from((from_ip, PORT)),
        "{to_ip} received a datagram from {source}, expected one from {from_ip}:{PORT}"
    );
    ensure!(
        &buf[..len] == payload,
        "{to_ip} received {len} bytes from {from_ip} that differ from the {} sent",
        payload.len()
    );
    Ok(())
}

/// The non-zero counters, for failure messages.
fn counters(datapath: &Datapath) -> String {
    match datapath.counters.all() {
        Ok(all) => all
            .iter()
            .filter(|(_, c)| c.packets > 0)
            .map(|(reason, c)| format!("{} {} packets", reason.name(), c.packets))
            .collect::<Vec<_>>()
            .join(", "),
        Err(e) => format!("unreadable ({e})"),
    }
}

/// Creates a pod: a network namespace, and the veth pair and addressing exactly as the CNI plugin
/// makes them (`podwire_netlink::pod`), `host_if` in the node (`host`) and eth0 in the pod.
async fn wire_pod(host: &Netlink, host_if: &'static str, ip: Ipv4Addr) -> Result<Pod> {
    let ns = new_netns()?;
    // The namespace has no name: the wiring reaches it through this process's open file.
    let path = format!("/proc/self/fd/{}", ns.as_raw_fd());
    let pod_netns = PodNetns::open(&path).context("opening the pod's network namespace")?;
    let want = PodInterface {
        host_ifname: host_if,
        ifname: POD_IF,
        ip,
        mtu: MTU,
    };
    let veth = create(host, &pod_netns, want)
        .await
        .with_context(|| format!("wiring {host_if} and {POD_IF} for {ip}"))?;
    Ok(Pod {
        ns,
        ip,
        host_if,
        endpoint: podwire_agent::lifecycle::endpoint_of(ip, &veth)?,
    })
}

/// A new network namespace, held by the returned file (no name, no bind mount): made on a thread
/// of its own so this process stays in the node's.
fn new_netns() -> Result<File> {
    thread::spawn(|| -> Result<File> {
        unshare(CloneFlags::CLONE_NEWNET)?;
        Ok(File::open("/proc/thread-self/ns/net")?)
    })
    .join()
    .expect("the namespace thread does not panic")
    .context("creating a network namespace")
}
