//! Pods on different nodes: three node namespaces on an underlay bridge, agents fed by a cluster
//! file, pods wired by the CNI plugin; traffic crosses nodes in podwire's VXLAN tunnel.

use std::{
    net::{IpAddr, Ipv4Addr, TcpListener, TcpStream},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result};
use nix::sys::signal::Signal;
use podwire_common::Reason;
use podwire_lab::{
    cni::Pod,
    eventually,
    nodes::{Cluster, ClusterSpec, BRIDGE},
    processes::{run, Daemon},
    traffic::{ping, receive, send_vxlan, tcp_echo, udp_listener},
};
use serde_json::Value;

const VNI: u32 = 42;
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 100);

/// `nodes` nodes whose agents tunnel with [`VNI`].
fn cluster(nodes: usize) -> Result<Cluster> {
    Cluster::start(ClusterSpec {
        nodes,
        agent_args: vec!["--vni".into(), VNI.to_string()],
        echo_agents: false,
    })
}

/// How long a node's change may take to show in traffic.
const SETTLE: Duration = Duration::from_secs(20);

#[test]
fn pods_on_different_nodes_talk_through_the_tunnel_with_forwarding_off() -> Result<()> {
    let c = cluster(3)?;
    let mut pods: Vec<(usize, Pod)> = Vec::new();
    for (i, node) in c.nodes.iter().enumerate() {
        // The lab's default too; this test's claim depends on it.
        node.ns.sysctl_ipv4("ip_forward", "0")?;
        for p in 0..2 {
            pods.push((i, node.add_pod(&format!("c-x-{i}-{p}"))?));
        }
    }
    // Toward another node's pod, the route's MTU where the pod has one (its interface may keep
    // the underlay's full MTU for its own node's pods), else the interface's.
    for (i, pod) in &pods {
        let (_, far) = pods
            .iter()
            .find(|(j, _)| j != i)
            .context("a pod elsewhere")?;
        let out = run(pod
            .ns
            .command("ip")
            .args(["-4", "route", "get", &far.ip.to_string()]))?;
        let route = String::from_utf8_lossy(&out.stdout).into_owned();
        let words: Vec<&str> = route.split_whitespace().collect();
        let mtu = match words.iter().position(|w| *w == "mtu") {
            Some(at) => words.get(at + 1).context("an MTU")?.parse::<u64>()?,
            None => pod.result["interfaces"][1]["mtu"]
                .as_u64()
                .context("the pod's MTU")?,
        };
        assert_eq!(mtu, 1450, "pod MTU across nodes = underlay 1500 - VXLAN 50");
    }

    let capture = tempfile::NamedTempFile::new()?;
    let mut cmd = c.underlay.ns.command("tcpdump");
    cmd.args(["-i", BRIDGE, "-nn", "-U", "-w"])
        .arg(capture.path());
    let mut tcpdump = Daemon::spawn(cmd, None)?;
    tcpdump.wait_for_line("listening on")?;

    for (i, a) in &pods {
        for (j, b) in &pods {
            if a.ip != b.ip {
                assert!(
                    ping(&a.ns, b.ip)?,
                    "ping {} ({}) -> {} ({})",
                    a.ip,
                    Cluster::node_name(*i),
                    b.ip,
                    Cluster::node_name(*j)
                );
                tcp_echo(&a.ns, &b.ns, b.ip, 64 * 1024)?;
            }
        }
    }
    // Maximum-size pings with DF set: 1450 - 20 (IPv4) - 8 (ICMP).
    let (a, b) = (&pods[0].1, &pods[5].1);
    let df =
        run(a
            .ns
            .command("ping")
            .args(["-c", "2", "-M", "do", "-s", "1422", &b.ip.to_string()]))?;
    assert!(String::from_utf8_lossy(&df.stdout).contains("2 received"));
    // 100 MB across nodes, every byte checked.
    tcp_echo(&a.ns, &b.ns, b.ip, 100_000_000)?;

    // Packets still in flight make it into the capture before it stops.
    std::thread::sleep(Duration::from_millis(500));
    tcpdump.stop(Signal::SIGINT)?;
    let packets = |filter: &str| -> Result<Vec<String>> {
        let out = run(Command::new("tcpdump")
            .args(["-nn", "-r"])
            .arg(capture.path())
            .arg(filter))?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect())
    };
    let count = |filter: &str| -> Result<usize> { Ok(packets(filter)?.len()) };
    let tunnel = count("udp dst port 4789")?;
    assert!(tunnel > 1000, "tunnel packets on the underlay: {tunnel}");
    let nodes = "src net 192.168.77.0/24 and dst net 192.168.77.0/24";
    let vni = format!("udp[8:4] = 0x08000000 and udp[12:4] = {:#x}", VNI << 8);
    assert_eq!(
        count(&format!("udp dst port 4789 and {nodes} and {vni}"))?,
        tunnel,
        "every tunnel packet between nodes, with VNI {VNI}"
    );
    // Link-local multicast (IGMP reports of the interfaces themselves) aside.
    let others = packets("ip and not ip multicast and not (udp dst port 4789)")?;
    assert!(
        others.is_empty(),
        "nothing but the tunnel crosses the underlay: {others:#?}"
    );
    assert_eq!(
        count("net 10.244.0.0/16")?,
        0,
        "no bare pod address on the underlay"
    );

    // The node table as operators see it (podwire nodes -o json on the first node).
    let out = c.nodes[0].podwire(&["nodes", "-o", "json"])?;
    let table: Value = serde_json::from_slice(&out.stdout)?;
    let rows: Vec<(String, String, String)> = table
        .as_array()
        .context("an array")?
        .iter()
        .map(|r| {
            Ok((
                r["prefix"].as_str().context("prefix")?.into(),
                r["kind"].as_str().context("kind")?.into(),
                r["node"].to_string(),
            ))
        })
        .collect::<Result<_>>()?;
    let row = |p: &str, k: &str, n: &str| (p.to_owned(), k.to_owned(), n.to_owned());
    assert_eq!(
        rows,
        [
            row("192.168.77.2/32", "remote", "\"192.168.77.2\""),
            row("192.168.77.3/32", "remote", "\"192.168.77.3\""),
            row("10.244.1.0/24", "local", "\"192.168.77.1\""),
            row("10.244.2.0/24", "remote", "\"192.168.77.2\""),
            row("10.244.3.0/24", "remote", "\"192.168.77.3\""),
            row("10.244.0.0/16", "no-node", "null"),
        ]
    );

    // Whichever writes the tunnel (the agents' default encap): podwire's programs, or the
    // VXLAN device they redirect into.
    let either = |node: &podwire_lab::nodes::Node, a: Reason, b: Reason| -> Result<u64> {
        Ok(node.counter(a)?.packets + node.counter(b)?.packets)
    };
    for node in &c.nodes {
        assert!(either(node, Reason::RedirectEncap, Reason::RedirectOverlay)? > 0);
        assert!(either(node, Reason::RedirectDecap, Reason::RedirectFromOverlay)? > 0);
        assert_eq!(node.counter(Reason::DropOverlaySpoofed)?.packets, 0);
    }
    Ok(())
}

#[test]
fn a_node_leaving_the_cluster_file_cuts_its_pods_off_and_coming_back_restores_them() -> Result<()> {
    let c = cluster(3)?;
    let a = c.nodes[0].add_pod("c-leave-a")?;
    let far = c.nodes[2].add_pod("c-leave-far")?;
    assert!(ping(&a.ns, far.ip)?);

    c.write_members(&[0, 1])?;
    let before = c.nodes[0].counter(Reason::DropNoNode)?.packets;
    assert!(
        eventually(SETTLE, || Ok(!ping(&a.ns, far.ip)?))?,
        "traffic to the removed node's pod stops"
    );
    assert!(
        c.nodes[0].counter(Reason::DropNoNode)?.packets > before,
        "dropped and counted as drop-no-node"
    );

    c.write_members(&[0, 1, 2])?;
    assert!(
        eventually(SETTLE, || ping(&a.ns, far.ip))?,
        "traffic restored once the node is back, without restarting agents"
    );
    Ok(())
}

#[test]
fn a_tunnelled_packet_from_outside_the_senders_pod_cidr_is_dropped() -> Result<()> {
    let c = cluster(3)?;
    let target = c.nodes[1].add_pod("c-victim")?;
    let listener = udp_listener(&target.ns, target.ip)?;
    let port = listener.local_addr()?.port();

    // Control: the first node tunnelling from its own pod range (10.244.1.0/24) is delivered.
    send_vxlan(
        &c.nodes[0].ns,
        c.nodes[0].ip,
        Cluster::node_ip(1),
        VNI,
        (Ipv4Addr::new(10, 244, 1, 77), target.ip, port),
        b"crafted",
    )?;
    let (payload, from) =
        receive(&listener)?.context("a packet from the first node's own range arrives")?;
    assert_eq!(
        (&payload[..], from.ip()),
        (&b"crafted"[..], IpAddr::V4(Ipv4Addr::new(10, 244, 1, 77)))
    );

    // The first node claiming an address of the third node's range.
    let before = c.nodes[1].counter(Reason::DropOverlaySpoofed)?.packets;
    send_vxlan(
        &c.nodes[0].ns,
        c.nodes[0].ip,
        Cluster::node_ip(1),
        VNI,
        (Ipv4Addr::new(10, 244, 3, 77), target.ip, port),
        b"crafted",
    )?;
    assert_eq!(
        receive(&listener)?,
        None,
        "spoofed inner source must not arrive"
    );
    assert_eq!(
        c.nodes[1].counter(Reason::DropOverlaySpoofed)?.packets,
        before + 1
    );
    Ok(())
}

#[test]
fn nodes_reach_remote_pods_and_pods_reach_the_outside_as_their_node() -> Result<()> {
    let c = cluster(2)?;
    let outside = c.underlay.plug("outside", OUTSIDE, false)?;
    let local = c.nodes[0].add_pod("c-out-local")?;
    let remote = c.nodes[1].add_pod("c-out-remote")?;
    // From a node's own namespace (kubelet probes, kube-proxy'd Service traffic) to a remote pod.
    assert!(ping(&c.nodes[0].ns, remote.ip)?);
    tcp_echo(&c.nodes[0].ns, &remote.ns, remote.ip, 256 * 1024)?;
    assert!(
        c.nodes[0].counter(Reason::EncapHost)?.packets > 0,
        "the node's own packets took the tunnel"
    );

    // Leaving the cluster needs forwarding in the node; the outside host sees the node's address.
    c.nodes[0].ns.sysctl_ipv4("ip_forward", "1")?;
    let listener = outside.run(|| TcpListener::bind((OUTSIDE, 0)))??;
    let addr = listener.local_addr()?;
    let client = local
        .ns
        .run(|| TcpStream::connect_timeout(&addr, Duration::from_secs(10)))?
        .context("pod connects to the outside host")?;
    let (_conn, peer) = listener.accept()?;
    assert_eq!(
        peer.ip(),
        IpAddr::V4(Cluster::node_ip(0)),
        "outside host sees the node, not the pod"
    );
    drop(client);
    Ok(())
}

#[test]
fn cross_node_traffic_survives_an_agent_restart() -> Result<()> {
    let mut c = cluster(2)?;
    let a = c.nodes[0].add_pod("c-rs-a")?;
    let b = c.nodes[1].add_pod("c-rs-b")?;
    c.nodes[0].stop_agent()?;
    assert!(
        ping(&a.ns, b.ip)?,
        "across nodes with the first node's agent down"
    );
    assert!(ping(&b.ns, a.ip)?);
    c.nodes[0].start_agent()?;
    assert!(ping(&a.ns, b.ip)?, "after the restart");
    let late = c.nodes[0].add_pod("c-rs-late")?;
    assert!(
        ping(&late.ns, b.ip)? && ping(&b.ns, late.ip)?,
        "a pod added after the restart"
    );
    Ok(())
}
