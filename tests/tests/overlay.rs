//! Pods on different nodes: three node namespaces on an underlay bridge, agents fed by a cluster
//! file, pods wired by the CNI plugin; traffic crosses nodes in podwire's VXLAN tunnel.

use std::{
    net::{Ipv4Addr, UdpSocket},
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use podwire_common::Reason;
use podwire_tests::{ping, run, tcp_echo, NetNs, Node, Pod};

const VNI: u32 = 42;
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 100);

/// The underlay (a bridge in its own namespace), the nodes on it, a host outside the cluster.
struct Cluster {
    nodes: Vec<Node>,
    underlay: NetNs,
    outside: NetNs,
    file: PathBuf,
    _dir: tempfile::TempDir,
}

fn node_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 77, 1 + i as u8)
}

fn cluster_json(nodes: &[usize]) -> String {
    let nodes: Vec<serde_json::Value> = nodes
        .iter()
        .map(|&i| serde_json::json!({ "name": format!("node{i}"), "address": node_ip(i), "podCIDR": format!("10.244.{}.0/24", i + 1) }))
        .collect();
    serde_json::json!({ "clusterCIDR": "10.244.0.0/16", "nodes": nodes }).to_string()
}

/// Plugs a new namespace into the underlay bridge as `eth0` with `ip`/24.
fn on_underlay(underlay: &NetNs, role: &str, port: &str, ip: Ipv4Addr) -> NetNs {
    let ns = NetNs::new(role);
    underlay.ip(&[
        "link",
        "add",
        port,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        ns.name(),
    ]);
    underlay.ip(&["link", "set", port, "master", "br0", "up"]);
    ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
    ns.ip(&["link", "set", "eth0", "up"]);
    ns
}

fn cluster(count: usize) -> Cluster {
    let underlay = NetNs::new("ul");
    underlay.ip(&["link", "add", "br0", "type", "bridge"]);
    underlay.ip(&["link", "set", "br0", "up"]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cluster.json");
    std::fs::write(&file, cluster_json(&(0..count).collect::<Vec<_>>())).unwrap();
    let nodes = (0..count)
        .map(|i| {
            let ns = on_underlay(&underlay, "node", &format!("n{i}"), node_ip(i));
            let args = vec![
                "--cluster-file".into(),
                file.display().to_string(),
                "--node-name".into(),
                format!("node{i}"),
                "--vni".into(),
                VNI.to_string(),
            ];
            Node::start_in(ns, node_ip(i), args)
        })
        .collect();
    let outside = on_underlay(&underlay, "out", "out", OUTSIDE);
    Cluster {
        nodes,
        underlay,
        outside,
        file,
        _dir: dir,
    }
}

/// Waits (bounded) until `probe` holds; whether it did.
fn eventually(mut probe: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if probe() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

#[test]
fn pods_on_different_nodes_talk_through_the_tunnel_with_forwarding_off() {
    let c = cluster(3);
    let mut pods: Vec<(usize, Pod)> = Vec::new();
    for (i, node) in c.nodes.iter().enumerate() {
        node.ns.sysctl_ipv4("ip_forward", "0");
        for p in 0..2 {
            pods.push((i, node.add_pod(&format!("c-x-{i}-{p}"))));
        }
    }
    for (_, pod) in &pods {
        assert_eq!(
            pod.result["interfaces"][1]["mtu"], 1450,
            "pod MTU = underlay 1500 - VXLAN 50"
        );
    }

    let capture = tempfile::NamedTempFile::new().unwrap();
    let mut tcpdump = c
        .underlay
        .command("tcpdump")
        .args(["-i", "br0", "-nn", "-U", "-w"])
        .arg(capture.path())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("tcpdump");
    std::thread::sleep(Duration::from_millis(500));

    for (i, a) in &pods {
        for (j, b) in &pods {
            if a.ip != b.ip {
                assert!(
                    ping(&a.ns, b.ip),
                    "ping {} (node{i}) -> {} (node{j})",
                    a.ip,
                    b.ip
                );
                tcp_echo(&a.ns, &b.ns, b.ip, 64 * 1024);
            }
        }
    }
    // Maximum-size pings with DF set: 1450 - 20 (IPv4) - 8 (ICMP).
    let (a, b) = (&pods[0].1, &pods[5].1);
    let df =
        run(a
            .ns
            .command("ping")
            .args(["-c", "2", "-M", "do", "-s", "1422", &b.ip.to_string()]));
    assert!(String::from_utf8_lossy(&df.stdout).contains("2 received"));
    // 100 MB across nodes, every byte checked.
    tcp_echo(&a.ns, &b.ns, b.ip, 100_000_000);

    std::thread::sleep(Duration::from_millis(500));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(tcpdump.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    tcpdump.wait().unwrap();
    let packets = |filter: &str| -> Vec<String> {
        let out = run(Command::new("tcpdump")
            .args(["-nn", "-r"])
            .arg(capture.path())
            .arg(filter));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    };
    let count = |filter: &str| packets(filter).len();
    let tunnel = count("udp dst port 4789");
    assert!(tunnel > 1000, "tunnel packets on the underlay: {tunnel}");
    let nodes = "src net 192.168.77.0/24 and dst net 192.168.77.0/24";
    let vni = format!("udp[8:4] = 0x08000000 and udp[12:4] = {:#x}", VNI << 8);
    assert_eq!(
        count(&format!("udp dst port 4789 and {nodes} and {vni}")),
        tunnel,
        "every tunnel packet between nodes, with VNI {VNI}"
    );
    // Link-local multicast (IGMP reports of the interfaces themselves) aside.
    let others = packets("ip and not ip multicast and not (udp dst port 4789)");
    assert!(
        others.is_empty(),
        "nothing but the tunnel crosses the underlay: {others:#?}"
    );
    assert_eq!(
        count("net 10.244.0.0/16"),
        0,
        "no bare pod address on the underlay"
    );

    // The node table as operators see it (podwire nodes -o json on node0).
    let out = run(c.nodes[0]
        .command(podwire_tests::bin("podwire"))
        .arg("--bpffs")
        .arg(&c.nodes[0].pins)
        .args(["nodes", "-o", "json"]));
    let table: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows: Vec<(String, String, String)> = table
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["prefix"].as_str().unwrap().into(),
                r["kind"].as_str().unwrap().into(),
                r["node"].to_string(),
            )
        })
        .collect();
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

    for node in &c.nodes {
        assert!(node.counter(Reason::RedirectOverlay).packets > 0);
        assert!(node.counter(Reason::RedirectFromOverlay).packets > 0);
        assert_eq!(node.counter(Reason::DropOverlaySpoofed).packets, 0);
    }
}

#[test]
fn a_node_leaving_the_cluster_file_cuts_its_pods_off_and_coming_back_restores_them() {
    let c = cluster(3);
    let a = c.nodes[0].add_pod("c-leave-a");
    let far = c.nodes[2].add_pod("c-leave-far");
    assert!(ping(&a.ns, far.ip));

    std::fs::write(&c.file, cluster_json(&[0, 1])).unwrap();
    let before = c.nodes[0].counter(Reason::DropNoNode).packets;
    assert!(
        eventually(|| !ping(&a.ns, far.ip)),
        "traffic to the removed node's pod stops"
    );
    assert!(
        c.nodes[0].counter(Reason::DropNoNode).packets > before,
        "dropped and counted as drop-no-node"
    );

    std::fs::write(&c.file, cluster_json(&[0, 1, 2])).unwrap();
    assert!(
        eventually(|| ping(&a.ns, far.ip)),
        "traffic restored once the node is back, without restarting agents"
    );
}

/// Sends a VXLAN packet by hand from `from`'s namespace to node `to`: inner IPv4/UDP from
/// `inner_src` to `inner_dst`:`port`.
fn send_vxlan(from: &Node, to: Ipv4Addr, inner_src: Ipv4Addr, inner_dst: Ipv4Addr, port: u16) {
    let mut frame = vec![0x08, 0, 0, 0];
    frame.extend_from_slice(&(VNI << 8).to_be_bytes());
    let mut inner =
        podwire_tests::packet::udp_v4([0x02, 0, 0, 0, 0, 9], inner_src, inner_dst, b"crafted");
    inner[14 + 20 + 2..14 + 20 + 4].copy_from_slice(&port.to_be_bytes());
    frame.extend_from_slice(&inner);
    let ip = from.ip;
    let socket = from.ns.run(|| UdpSocket::bind((ip, 0))).unwrap();
    socket.send_to(&frame, (to, 4789)).unwrap();
}

#[test]
fn a_tunnelled_packet_from_outside_the_senders_pod_cidr_is_dropped() {
    let c = cluster(3);
    let target = c.nodes[1].add_pod("c-victim");
    let listener = target.ns.run(|| UdpSocket::bind((target.ip, 0))).unwrap();
    listener
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut buf = [0u8; 64];

    // Control: node0 tunnelling from its own pod range is delivered.
    send_vxlan(
        &c.nodes[0],
        node_ip(1),
        Ipv4Addr::new(10, 244, 1, 77),
        target.ip,
        port,
    );
    let (n, from) = listener
        .recv_from(&mut buf)
        .expect("a packet from node0's own range arrives");
    assert_eq!(
        (&buf[..n], from.ip()),
        (
            &b"crafted"[..],
            std::net::IpAddr::V4(Ipv4Addr::new(10, 244, 1, 77))
        )
    );

    // node0 claiming an address of node2's range.
    let before = c.nodes[1].counter(Reason::DropOverlaySpoofed).packets;
    send_vxlan(
        &c.nodes[0],
        node_ip(1),
        Ipv4Addr::new(10, 244, 3, 77),
        target.ip,
        port,
    );
    assert!(
        listener.recv_from(&mut buf).is_err(),
        "spoofed inner source must not arrive"
    );
    assert_eq!(
        c.nodes[1].counter(Reason::DropOverlaySpoofed).packets,
        before + 1
    );
}

#[test]
fn nodes_reach_remote_pods_and_pods_reach_the_outside_as_their_node() {
    let c = cluster(2);
    let local = c.nodes[0].add_pod("c-out-local");
    let remote = c.nodes[1].add_pod("c-out-remote");
    // From a node's own namespace (kubelet probes, kube-proxy'd Service traffic) to a remote pod.
    assert!(ping(&c.nodes[0].ns, remote.ip));
    tcp_echo(&c.nodes[0].ns, &remote.ns, remote.ip, 256 * 1024);
    assert!(
        c.nodes[0].counter(Reason::EncapHost).packets > 0,
        "the node's own packets took the tunnel"
    );
    let _ = local;

    // Leaving the cluster needs forwarding in the node; the outside host sees the node's address.
    c.nodes[0].ns.sysctl_ipv4("ip_forward", "1");
    let listener = c
        .outside
        .run(|| std::net::TcpListener::bind((OUTSIDE, 0)))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let client = local
        .ns
        .run(|| std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10)))
        .expect("pod connects to the outside host");
    let (_conn, peer) = listener.accept().unwrap();
    assert_eq!(
        peer.ip(),
        std::net::IpAddr::V4(node_ip(0)),
        "outside host sees the node, not the pod"
    );
    drop(client);
}

#[test]
fn cross_node_traffic_survives_an_agent_restart() {
    let mut c = cluster(2);
    let a = c.nodes[0].add_pod("c-rs-a");
    let b = c.nodes[1].add_pod("c-rs-b");
    c.nodes[0].stop_agent();
    assert!(ping(&a.ns, b.ip), "across nodes with node0's agent down");
    assert!(ping(&b.ns, a.ip));
    c.nodes[0].start_agent();
    assert!(ping(&a.ns, b.ip), "after the restart");
    let late = c.nodes[0].add_pod("c-rs-late");
    assert!(
        ping(&late.ns, b.ip) && ping(&b.ns, late.ip),
        "a pod added after the restart"
    );
}
