//! The cross-node datapath modes besides the VXLAN device (tests/overlay.rs): native routing
//! (`--routing native`: no encapsulation, `from_pod` out of the underlay, `from_underlay` into the
//! pod) and the tunnel written by podwire's programs (`--encap bpf`: `from_pod` pushes the VXLAN
//! headers, `from_underlay` takes them off). Two node namespaces on an underlay bridge, pods
//! wired by the CNI plugin, real traffic; a capture on the bridge shows what crossed it.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result};
use nix::sys::signal::Signal;
use podwire_common::Reason;
use podwire_lab::{
    cni::Pod,
    nodes::{Cluster, ClusterSpec, BRIDGE},
    packets,
    processes::{run, run_with_stdin, Daemon},
    traffic::{
        ping, receive, seen_from, send_frame, send_vxlan, tcp_echo, tcp_request, udp_listener,
        udp_request, EchoServers,
    },
};

const VNI: u32 = 42;
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 100);
/// Bytes of the bulk transfers, every one checked.
const BULK: usize = 8_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Native,
    BpfEncap,
}

impl Mode {
    fn agent_args(self) -> Vec<String> {
        let mut args = vec!["--vni".to_owned(), VNI.to_string()];
        args.extend(
            match self {
                Mode::Native => ["--routing", "native"],
                Mode::BpfEncap => ["--encap", "bpf"],
            }
            .map(str::to_owned),
        );
        args
    }

    /// What `from_pod` counts for a packet it sends to another node, and what `from_underlay`
    /// counts for one it delivers.
    fn reasons(self) -> (Reason, Reason) {
        match self {
            Mode::Native => (Reason::RedirectNative, Reason::RedirectFromNative),
            Mode::BpfEncap => (Reason::RedirectEncap, Reason::RedirectDecap),
        }
    }

    /// The pods' MTU (underlay 1500).
    fn pod_mtu(self) -> u64 {
        match self {
            Mode::Native => 1500,
            Mode::BpfEncap => 1450,
        }
    }
}

fn cluster(mode: Mode) -> Result<Cluster> {
    Cluster::start(ClusterSpec {
        nodes: 2,
        agent_args: mode.agent_args(),
        echo_agents: false,
    })
}

/// The MTU `pod` sends to `to` with: its route's, else its interface's.
fn path_mtu(pod: &Pod, to: Ipv4Addr) -> Result<u64> {
    let out = run(pod
        .ns
        .command("ip")
        .args(["-4", "route", "get", &to.to_string()]))?;
    let route = String::from_utf8_lossy(&out.stdout).into_owned();
    let words: Vec<&str> = route.split_whitespace().collect();
    if let Some(i) = words.iter().position(|w| *w == "mtu") {
        return Ok(words.get(i + 1).context("an MTU")?.parse()?);
    }
    pod.result["interfaces"][1]["mtu"]
        .as_u64()
        .with_context(|| format!("the pod's interface MTU in {}", pod.result))
}

/// A capture of everything on the underlay bridge, read back with tcpdump filters.
struct Capture {
    file: tempfile::NamedTempFile,
    tcpdump: Option<Daemon>,
}

impl Capture {
    fn start(c: &Cluster) -> Result<Capture> {
        let file = tempfile::NamedTempFile::new()?;
        let mut cmd = c.underlay.ns.command("tcpdump");
        // Headers only, and a large buffer: a busy machine's tcpdump drops packets otherwise.
        cmd.args(["-i", BRIDGE, "-nn", "-U", "-s", "128", "-B", "32768", "-w"])
            .arg(file.path());
        let mut tcpdump = Daemon::spawn(cmd, None)?;
        tcpdump.wait_for_line("listening on")?;
        Ok(Capture {
            file,
            tcpdump: Some(tcpdump),
        })
    }

    fn stop(&mut self) -> Result<()> {
        // Packets still in flight make it into the capture before it stops.
        std::thread::sleep(Duration::from_millis(500));
        if let Some(tcpdump) = self.tcpdump.take() {
            tcpdump.stop(Signal::SIGINT)?;
        }
        Ok(())
    }

    fn count(&self, filter: &str) -> Result<usize> {
        let out = run(Command::new("tcpdump")
            .args(["-nn", "-r"])
            .arg(self.file.path())
            .arg(filter))?;
        Ok(String::from_utf8_lossy(&out.stdout).lines().count())
    }
}

/// Pods on two nodes exchange pings and checked bulk TCP both ways; the modes' counters move
/// and the underlay carries what the mode says.
fn pods_exchange_traffic_across_nodes(mode: Mode) -> Result<()> {
    let c = cluster(mode)?;
    let a = c.nodes[0].add_pod(&format!("m-x-a-{mode:?}"))?;
    let b = c.nodes[1].add_pod(&format!("m-x-b-{mode:?}"))?;
    for (pod, to) in [(&a, b.ip), (&b, a.ip)] {
        assert_eq!(
            path_mtu(pod, to)?,
            mode.pod_mtu(),
            "{mode:?}: {} -> {to}",
            pod.ip
        );
    }
    let mut capture = Capture::start(&c)?;
    assert!(ping(&a.ns, b.ip)?, "ping {} -> {}", a.ip, b.ip);
    assert!(ping(&b.ns, a.ip)?, "ping {} -> {}", b.ip, a.ip);
    // Full-size packets with DF: the pod MTU less IPv4 20 and ICMP 8.
    let size = (mode.pod_mtu() - 28).to_string();
    let df =
        run(a
            .ns
            .command("ping")
            .args(["-c", "2", "-M", "do", "-s", &size, &b.ip.to_string()]))?;
    assert!(String::from_utf8_lossy(&df.stdout).contains("2 received"));
    tcp_echo(&a.ns, &b.ns, b.ip, BULK)?;
    tcp_echo(&b.ns, &a.ns, a.ip, BULK)?;
    capture.stop()?;

    let (sent, delivered) = mode.reasons();
    for node in &c.nodes {
        assert!(node.counter(sent)?.packets > 100, "{sent:?} on {}", node.ip);
        assert!(
            node.counter(delivered)?.packets > 100,
            "{delivered:?} on {}",
            node.ip
        );
        // Nothing went through the VXLAN device.
        assert_eq!(node.counter(Reason::RedirectOverlay)?.packets, 0);
        assert_eq!(node.counter(Reason::RedirectFromOverlay)?.packets, 0);
    }
    let pods = "net 10.244.0.0/16";
    // Coalesced (GSO) packets cross the veth underlay whole, and a busy machine's tcpdump loses
    // some: the counters above tell the volume, the capture tells the shape of what crossed.
    let tunnel = capture.count("udp dst port 4789")?;
    match mode {
        Mode::Native => {
            assert_eq!(tunnel, 0, "no tunnel on the underlay");
            let plain = capture.count("src net 10.244.1.0/24 and dst net 10.244.2.0/24")?;
            assert!(
                plain > 0,
                "pod packets on the underlay as they are: {plain}"
            );
        }
        Mode::BpfEncap => {
            assert!(tunnel > 0, "tunnel packets on the underlay: {tunnel}");
            let nodes = "src net 192.168.77.0/24 and dst net 192.168.77.0/24";
            let vni = format!("udp[8:4] = 0x08000000 and udp[12:4] = {:#x}", VNI << 8);
            assert_eq!(
                capture.count(&format!("udp dst port 4789 and {nodes} and {vni}"))?,
                tunnel,
                "every tunnel packet between nodes, with VNI {VNI}"
            );
            assert_eq!(
                capture.count(pods)?,
                0,
                "no bare pod address on the underlay"
            );
        }
    }

    // The node's own stack reaches the other node's pods by the agent's routes.
    assert!(ping(&c.nodes[0].ns, b.ip)?, "node1 -> {}", b.ip);
    tcp_echo(&c.nodes[0].ns, &b.ns, b.ip, 256 * 1024)?;
    let route = run(c.nodes[0]
        .command("ip")
        .args(["-4", "route", "show", &Cluster::pod_cidr(1)]))?;
    let route = String::from_utf8_lossy(&route.stdout).into_owned();
    match mode {
        Mode::Native => assert!(
            route.contains("via 192.168.77.2 dev eth0"),
            "native route: {route}"
        ),
        Mode::BpfEncap => assert!(route.contains("dev pw-vxlan"), "tunnel route: {route}"),
    }
    Ok(())
}

#[test]
fn native_routing_carries_pods_across_nodes_unencapsulated() -> Result<()> {
    pods_exchange_traffic_across_nodes(Mode::Native)
}

#[test]
fn the_programs_tunnel_carries_pods_across_nodes_in_vxlan() -> Result<()> {
    pods_exchange_traffic_across_nodes(Mode::BpfEncap)
}

/// A host that is no node sends VXLAN to a node: dropped and counted.
fn vxlan_from_a_non_node_is_dropped(mode: Mode) -> Result<()> {
    let c = cluster(mode)?;
    let outside = c.underlay.plug("outside", OUTSIDE, false)?;
    let target = c.nodes[1].add_pod(&format!("m-nn-{mode:?}"))?;
    let listener = udp_listener(&target.ns, target.ip)?;
    let port = listener.local_addr()?.port();
    let before = c.nodes[1].counter(Reason::DropTunnelNotNode)?.packets;
    send_vxlan(
        &outside,
        OUTSIDE,
        Cluster::node_ip(1),
        VNI,
        (Ipv4Addr::new(10, 244, 1, 77), target.ip, port),
        b"forged",
    )?;
    assert_eq!(
        receive(&listener)?,
        None,
        "the forged packet must not arrive"
    );
    assert_eq!(
        c.nodes[1].counter(Reason::DropTunnelNotNode)?.packets,
        before + 1
    );
    Ok(())
}

#[test]
fn native_routing_drops_vxlan_from_a_host_that_is_no_node() -> Result<()> {
    vxlan_from_a_non_node_is_dropped(Mode::Native)
}

#[test]
fn the_programs_tunnel_drops_vxlan_from_a_host_that_is_no_node() -> Result<()> {
    vxlan_from_a_non_node_is_dropped(Mode::BpfEncap)
}

#[test]
fn the_programs_tunnel_delivers_a_nodes_own_pods_and_drops_what_it_does_not_own() -> Result<()> {
    let c = cluster(Mode::BpfEncap)?;
    let target = c.nodes[1].add_pod("m-spoof-bpf")?;
    let listener = udp_listener(&target.ns, target.ip)?;
    let port = listener.local_addr()?.port();
    let decapsulated = c.nodes[1].counter(Reason::RedirectDecap)?.packets;
    // Node1 tunnelling from its own pod range: taken apart at the underlay, into the pod.
    let own = Ipv4Addr::new(10, 244, 1, 77);
    send_vxlan(
        &c.nodes[0].ns,
        c.nodes[0].ip,
        Cluster::node_ip(1),
        VNI,
        (own, target.ip, port),
        b"own",
    )?;
    let (payload, from) = receive(&listener)?.context("node1's own range arrives")?;
    assert_eq!((&payload[..], from.ip()), (&b"own"[..], IpAddr::V4(own)));
    assert_eq!(
        c.nodes[1].counter(Reason::RedirectDecap)?.packets,
        decapsulated + 1
    );
    // Node1 claiming an address that is not its pods'.
    let spoofed = c.nodes[1].counter(Reason::DropOverlaySpoofed)?.packets;
    let other = Ipv4Addr::new(10, 244, 3, 77);
    send_vxlan(
        &c.nodes[0].ns,
        c.nodes[0].ip,
        Cluster::node_ip(1),
        VNI,
        (other, target.ip, port),
        b"x",
    )?;
    assert_eq!(
        receive(&listener)?,
        None,
        "a spoofed inner source must not arrive"
    );
    assert_eq!(
        c.nodes[1].counter(Reason::DropOverlaySpoofed)?.packets,
        spoofed + 1
    );
    // Another VNI.
    let vni = c.nodes[1].counter(Reason::DropOverlayVni)?.packets;
    send_vxlan(
        &c.nodes[0].ns,
        c.nodes[0].ip,
        Cluster::node_ip(1),
        VNI + 1,
        (own, target.ip, port),
        b"x",
    )?;
    assert_eq!(receive(&listener)?, None, "another VNI must not arrive");
    assert_eq!(c.nodes[1].counter(Reason::DropOverlayVni)?.packets, vni + 1);
    Ok(())
}

#[test]
fn native_routing_drops_plain_packets_no_node_may_send_and_cannot_authenticate_the_rest(
) -> Result<()> {
    let c = cluster(Mode::Native)?;
    let outside = c.underlay.plug("outside", OUTSIDE, false)?;
    let target = c.nodes[1].add_pod("m-spoof-native")?;
    let listener = udp_listener(&target.ns, target.ip)?;
    let port = listener.local_addr()?.port();
    let send = |src: Ipv4Addr| {
        let frame = packets::udp_v4_ports(
            [0x02, 0, 0, 0, 0, 0x64],
            src,
            target.ip,
            (40000, port),
            b"plain",
        );
        send_frame(&outside, "eth0", &frame)
    };
    // A source in the target node's own pod CIDR, and one in the cluster range no node owns.
    for src in [
        Ipv4Addr::new(10, 244, 2, 99),
        Ipv4Addr::new(10, 244, 200, 1),
    ] {
        let before = c.nodes[1].counter(Reason::DropNativeSpoofed)?.packets;
        send(src)?;
        assert_eq!(receive(&listener)?, None, "from {src} must not arrive");
        assert_eq!(
            c.nodes[1].counter(Reason::DropNativeSpoofed)?.packets,
            before + 1,
            "from {src}"
        );
    }
    // Without a tunnel nothing tells node1's pods from a host on the segment claiming their
    // addresses: this arrives (the trust model docs/DATAPATH-MODES.md states).
    let claimed = Ipv4Addr::new(10, 244, 1, 99);
    send(claimed)?;
    let (payload, from) = receive(&listener)?.context("a claimed pod source arrives")?;
    assert_eq!(
        (&payload[..], from.ip()),
        (&b"plain"[..], IpAddr::V4(claimed))
    );
    Ok(())
}

/// A Service-like DNAT in node1's stack (an nft rule as kube-proxy's) from a pod on node1 to a
/// backend on node2: the request goes through node1's stack, the reply comes back through it
/// (recorded by `to_underlay` or `to_overlay`, handed up by `from_underlay`), so the client sees
/// the Service's address answer and the backend sees the client.
fn a_service_dnat_through_the_stack_works(mode: Mode) -> Result<()> {
    const SERVICE: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 50);
    const BACKEND_PORT: u16 = 8080;
    let c = cluster(mode)?;
    for node in &c.nodes {
        node.ns.sysctl_ipv4("ip_forward", "1")?;
    }
    let client = c.nodes[0].add_pod(&format!("m-svc-c-{mode:?}"))?;
    let backend = c.nodes[1].add_pod(&format!("m-svc-b-{mode:?}"))?;
    let _servers = EchoServers::start(&backend.ns, backend.ip, BACKEND_PORT)?;
    let rules = format!(
        "table ip m-svc {{\n\
         \x20 chain pre {{\n\
         \x20   type nat hook prerouting priority dstnat; policy accept;\n\
         \x20   ip daddr {SERVICE} tcp dport 80 dnat to {b}:{BACKEND_PORT}\n\
         \x20   ip daddr {SERVICE} udp dport 53 dnat to {b}:{BACKEND_PORT}\n\
         \x20 }}\n\
         }}\n",
        b = backend.ip
    );
    run_with_stdin(
        c.nodes[0].command("nft").args(["-f", "-"]),
        rules.as_bytes(),
    )
    .with_context(|| format!("loading {rules}"))?;
    let stack_flows = c.nodes[0].counter(Reason::PassStackFlow)?.packets;

    let answer = tcp_request(&client.ns, SocketAddr::from((SERVICE, 80)), b"over TCP")?;
    let (echoed, peer) = seen_from(&answer)?;
    assert_eq!(echoed, b"over TCP");
    assert_eq!(
        peer.ip(),
        IpAddr::V4(client.ip),
        "the backend sees the client"
    );
    let asked = SocketAddr::from((SERVICE, 53));
    let (answer, from) = udp_request(&client.ns, asked, b"over UDP")?;
    assert_eq!(
        from, asked,
        "the UDP answer comes from the Service's address"
    );
    assert_eq!(seen_from(&answer)?.0, b"over UDP");
    assert!(
        c.nodes[0].counter(Reason::PassStackFlow)?.packets > stack_flows,
        "the replies went up node1's stack"
    );
    // Plain pod-to-pod traffic keeps the shortcut.
    let (_, delivered) = mode.reasons();
    let before = c.nodes[0].counter(delivered)?.packets;
    let direct = tcp_request(
        &client.ns,
        SocketAddr::from((backend.ip, BACKEND_PORT)),
        b"direct",
    )?;
    assert_eq!(seen_from(&direct)?.1.ip(), IpAddr::V4(client.ip));
    assert!(c.nodes[0].counter(delivered)?.packets > before);
    Ok(())
}

#[test]
fn native_routing_returns_a_services_replies_through_the_stack() -> Result<()> {
    a_service_dnat_through_the_stack_works(Mode::Native)
}

#[test]
fn the_programs_tunnel_returns_a_services_replies_through_the_stack() -> Result<()> {
    a_service_dnat_through_the_stack_works(Mode::BpfEncap)
}

/// Traffic goes on while node1's agent is down, and the restarted agent adopts every pinned
/// map and link (the underlay's tc links included).
fn traffic_survives_an_agent_restart(mode: Mode) -> Result<()> {
    let mut c = cluster(mode)?;
    let a = c.nodes[0].add_pod(&format!("m-rs-a-{mode:?}"))?;
    let b = c.nodes[1].add_pod(&format!("m-rs-b-{mode:?}"))?;
    let ids = c.nodes[0].pinned_ids()?;
    let underlay_links: Vec<&String> = ids
        .links
        .keys()
        .filter(|name| name.ends_with("underlay-eth0"))
        .collect();
    assert_eq!(
        underlay_links.len(),
        match mode {
            Mode::Native => 2,
            Mode::BpfEncap => 1,
        },
        "the underlay's tc links: {underlay_links:?}"
    );
    c.nodes[0].stop_agent()?;
    assert!(ping(&a.ns, b.ip)? && ping(&b.ns, a.ip)?, "agent down");
    tcp_echo(&a.ns, &b.ns, b.ip, BULK)?;
    c.nodes[0].start_agent()?;
    let after = c.nodes[0].pinned_ids()?;
    assert_eq!(ids.not_adopted(&after), Vec::<String>::new());
    tcp_echo(&b.ns, &a.ns, a.ip, BULK)?;
    let late = c.nodes[0].add_pod(&format!("m-rs-late-{mode:?}"))?;
    assert!(
        ping(&late.ns, b.ip)? && ping(&b.ns, late.ip)?,
        "a pod added after"
    );
    Ok(())
}

#[test]
fn native_routing_survives_an_agent_restart() -> Result<()> {
    traffic_survives_an_agent_restart(Mode::Native)
}

#[test]
fn the_programs_tunnel_survives_an_agent_restart() -> Result<()> {
    traffic_survives_an_agent_restart(Mode::BpfEncap)
}
