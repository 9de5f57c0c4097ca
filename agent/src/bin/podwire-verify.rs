//! podwire-verify: loads every podwire eBPF program through the running kernel's verifier, then
//! proves the datapath carries real packets on a kernel without TCX: two pods, wired as the CNI
//! plugin wires them, exchange UDP datagrams that only `from_pod` (attached through netlink tc,
//! with `bpf_redirect_peer`) can deliver, as the node does not forward. It exists so
//! `cargo xtask vm-verify` can run it (built static, as a VM's only program) on Debian 12's 6.1
//! kernel, which users run, and not only on the build machine's kernel. On failure the error
//! chain, verifier log included, goes to stderr and the exit code is 1.

use std::{
    fs::File,
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    os::fd::AsRawFd as _,
    path::Path,
    thread,
    time::Duration,
};

use anyhow::{ensure, Context as _, Result};
use nix::sched::{setns, unshare, CloneFlags};
use podwire_agent::{
    datapath::{self, programs, Datapath, Hook, LogLevel, Overlay},
    wiring::Netlink,
};
use podwire_common::{Endpoint, Reason};

const POD_IF: &str = "eth0";
const MTU: u32 = 1500;
const PORT: u16 = 7777;
/// Payload sizes sent each way, up to the largest that fits a 1500-byte MTU unfragmented.
const SIZES: [usize; 8] = [1, 18, 64, 200, 512, 1000, 1400, 1472];
/// Ethernet, IPv4 and UDP headers: what the counters add to each payload.
const HEADERS: u64 = 14 + 20 + 8;
/// A datagram takes microseconds; this is only the limit for one that was lost.
const RECV_TIMEOUT: Duration = Duration::from_secs(2);

fn main() -> Result<()> {
    // The node is a namespace of its own (made while this is the only thread, so every thread
    // started later is in it too): the check turns forwarding off and adds veths, which must not
    // touch the network of a machine this runs on outside a VM.
    unshare(CloneFlags::CLONE_NEWNET).context("creating the node's network namespace")?;
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .context("reading the kernel release from /proc (is procfs mounted?)")?;
    let kernel = kernel.trim();
    verify(kernel)?;
    deliver(kernel)
}

fn verify(kernel: &str) -> Result<()> {
    // An overlay makes the programs' tunnel path live; its ifindex is only a constant to them here,
    // as nothing is attached.
    let _datapath = Datapath::load(LogLevel::Off, None, Some(Overlay { ifindex: 1, vni: 1 }))
        .context("loading podwire's eBPF programs")?;
    for name in programs::ALL {
        println!("verified {name}");
    }
    println!(
        "podwire-verify: all {} programs passed the verifier on kernel {kernel}",
        programs::ALL.len()
    );
    Ok(())
}

/// A pod: its namespace (alive while the file is open) and both ends of its veth pair.
struct Pod {
    ns: File,
    ip: Ipv4Addr,
    host_if: &'static str,
    endpoint: Endpoint,
}

/// Wires two pods, attaches `from_pod` to their host-side veths and has them exchange datagrams
/// that only its `bpf_redirect_peer` can deliver.
fn deliver(kernel: &str) -> Result<()> {
    ensure!(
        !datapath::tcx_supported(),
        "kernel {kernel} has TCX, so podwire does not attach through netlink tc here, which is \
         what the pod-to-pod check proves: run it on a kernel before 6.6 (cargo xtask vm-verify)"
    );
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "0")
        .context("turning IP forwarding off in the node")?;
    let a = wire_pod("pw-a", Ipv4Addr::new(10, 244, 0, 2)).context("wiring pod A")?;
    let b = wire_pod("pw-b", Ipv4Addr::new(10, 244, 0, 3)).context("wiring pod B")?;

    let mut datapath = Datapath::load(LogLevel::Off, None, None).context("loading the datapath")?;
    for pod in [&a, &b] {
        datapath
            .set_endpoint(pod.ip, pod.endpoint)
            .with_context(|| format!("writing the endpoint of {}", pod.ip))?;
        // Without TCX (checked above) nothing is pinned: the path is never created.
        let pin = Path::new("/sys/fs/bpf/podwire-verify").join(pod.host_if);
        datapath
            .attach_pinned(Hook::from_pod(pod.host_if), &pin)
            .with_context(|| format!("attaching from_pod to {}", pod.host_if))?;
    }

    let socket = |pod: &Pod| {
        in_netns(&pod.ns, || {
            let socket = UdpSocket::bind((pod.ip, PORT))
                .with_context(|| format!("binding UDP {}:{PORT}", pod.ip))?;
            socket
                .set_read_timeout(Some(RECV_TIMEOUT))
                .context("setting a receive timeout")?;
            Ok(socket)
        })
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
        .counters()
        .context("reading the counters")?
        .into_iter()
        .find(|(reason, _)| *reason == Reason::RedirectLocal)
        .map(|(_, counter)| counter)
        .unwrap_or_default();
    ensure!(
        (redirected.packets, redirected.bytes) == (sent, bytes),
        "{sent} datagrams ({bytes} bytes) arrived, but from_pod counted {} packets ({} bytes) \
         delivered with bpf_redirect_peer; counters: {}",
        redirected.packets,
        redirected.bytes,
        counters(&datapath)
    );
    println!(
        "podwire-verify: delivered {sent} datagrams pod-to-pod ({} each way, {} to {} bytes) on \
         kernel {kernel} via netlink tc, forwarding off",
        SIZES.len(),
        SIZES[0],
        SIZES[SIZES.len() - 1]
    );
    Ok(())
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
    match datapath.counters() {
        Ok(all) => all
            .iter()
            .filter(|(_, c)| c.packets > 0)
            .map(|(reason, c)| format!("{reason:?} {} packets", c.packets))
            .collect::<Vec<_>>()
            .join(", "),
        Err(e) => format!("unreadable ({e})"),
    }
}

/// Creates a pod: a network namespace, and the veth pair and addressing exactly as the CNI plugin
/// makes them (`podwire_agent::wiring`), `host_if` in the node and eth0 in the pod.
fn wire_pod(host_if: &'static str, ip: Ipv4Addr) -> Result<Pod> {
    let ns = thread::spawn(|| -> Result<File> {
        unshare(CloneFlags::CLONE_NEWNET)?;
        Ok(File::open("/proc/thread-self/ns/net")?)
    })
    .join()
    .expect("the namespace thread does not panic")
    .context("creating a network namespace")?;
    // The namespace has no name: the wiring reaches it through this process's open file.
    let netns = format!("/proc/self/fd/{}", ns.as_raw_fd());
    let (host_mac, pod_mac) = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .context("starting a tokio runtime")?
        .block_on(async {
            Netlink::open(Some(&netns))?
                .create(host_if, POD_IF, ip, MTU)
                .await
        })
        .with_context(|| format!("wiring {host_if} and {POD_IF} for {ip}"))?;
    let ifindex =
        nix::net::if_::if_nametoindex(host_if).with_context(|| format!("ifindex of {host_if}"))?;
    Ok(Pod {
        ns,
        ip,
        host_if,
        endpoint: Endpoint {
            ifindex,
            flags: 0,
            pod_mac: pod_mac.0,
            host_mac: host_mac.0,
        },
    })
}

/// Runs `f` on a thread inside the namespace `ns`: sockets it opens, netlink ones included, belong
/// to that namespace for good.
fn in_netns<R: Send>(ns: &File, f: impl FnOnce() -> Result<R> + Send) -> Result<R> {
    thread::scope(|s| {
        s.spawn(|| {
            setns(ns, CloneFlags::CLONE_NEWNET).context("entering a pod's network namespace")?;
            f()
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}
