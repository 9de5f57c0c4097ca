//! What a hostile pod (root with CAP_NET_RAW, containerd's default) or a host on the underlay that
//! is no node can send, sent for real: raw frames from a pod's eth0, hand-made VXLAN packets from
//! underlay hosts. Each is stopped, counted under its reason, and never reaches a pod or changes
//! the node's routes; a control shows the same packet without the defect goes through.

use std::{net::Ipv4Addr, time::Duration};

use anyhow::{Context as _, Result};
use podwire_common::Reason;
use podwire_core::mac::Mac;
use podwire_lab::{
    cni::Pod,
    eventually,
    namespaces::NetNs,
    nodes::{Cluster, ClusterSpec, Node, NodeAndPod},
    packets::{self, udp_v4_ports, ETH_8021AD, ETH_8021Q},
    traffic::{receive, send_frame, send_vxlan, udp_listener},
};

const VNI: u32 = 42;
const STRANGER: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 200);

fn cluster(nodes: usize) -> Result<Cluster> {
    cluster_guarded_by(nodes, "auto")
}

/// Nodes whose agents run `from_netdev` in XDP mode `mode` (`--underlay-xdp`).
fn cluster_guarded_by(nodes: usize, mode: &str) -> Result<Cluster> {
    Cluster::start(ClusterSpec {
        nodes,
        agent_args: vec![
            "--vni".into(),
            VNI.to_string(),
            "--underlay-xdp".into(),
            mode.into(),
        ],
        echo_agents: false,
    })
}

/// How `ip link` shows the XDP program on the underlay interface of `node`.
fn xdp_on_underlay(node: &Node) -> Result<String> {
    Ok(String::from_utf8(
        node.ns.ip(&["link", "show", "eth0"])?.stdout,
    )?)
}

/// A pod's MAC and its gateway's (the host side of its veth), from its ADD result.
fn macs(pod: &Pod) -> Result<([u8; 6], [u8; 6])> {
    let mac = |i: usize| -> Result<[u8; 6]> {
        let text = pod.result["interfaces"][i]["mac"]
            .as_str()
            .context("a MAC in the ADD result")?;
        Ok(text.parse::<Mac>()?.0)
    };
    Ok((mac(1)?, mac(0)?))
}

/// A UDP frame from `pod`'s MAC to its gateway, from `src` to `dst`:`port`.
fn udp_from(pod: &Pod, src: Ipv4Addr, dst: Ipv4Addr, port: u16, payload: &[u8]) -> Result<Vec<u8>> {
    let (pod_mac, gateway_mac) = macs(pod)?;
    let mut frame = udp_v4_ports(pod_mac, src, dst, (40000, port), payload);
    frame[..6].copy_from_slice(&gateway_mac);
    Ok(frame)
}

fn count(node: &Node, reason: Reason) -> Result<u64> {
    Ok(node.counter(reason)?.packets)
}

#[test]
fn vlan_tags_carry_no_forged_source_past_from_pod() -> Result<()> {
    let c = cluster(2)?;
    let attacker = c.nodes[0].add_pod("h-vlan-attacker")?;
    let victim = c.nodes[0].add_pod("h-vlan-victim")?;
    let same_node = c.nodes[0].add_pod("h-vlan-local")?;
    let other_node = c.nodes[1].add_pod("h-vlan-remote")?;
    let node = &c.nodes[0];
    for target in [&same_node, &other_node] {
        let listener = udp_listener(&target.ns, target.ip)?;
        let port = listener.local_addr()?.port();

        // Control: its own address, untagged, arrives.
        let own = udp_from(&attacker, attacker.ip, target.ip, port, b"own")?;
        send_frame(&attacker.ns, "eth0", &own)?;
        let (data, from) = receive(&listener)?.context("the untagged control arrives")?;
        assert_eq!((&data[..], from.ip()), (&b"own"[..], attacker.ip.into()));

        let forged = udp_from(&attacker, victim.ip, target.ip, port, b"forged")?;
        let tagged = [
            (
                "one 802.1Q tag, VLAN 0",
                packets::vlan_tagged(&forged, ETH_8021Q, 0),
            ),
            (
                "802.1ad over 802.1Q (QinQ)",
                packets::vlan_tagged(&packets::vlan_tagged(&forged, ETH_8021Q, 0), ETH_8021AD, 0),
            ),
            (
                "two 802.1Q tags",
                packets::vlan_tagged(&packets::vlan_tagged(&forged, ETH_8021Q, 0), ETH_8021Q, 0),
            ),
        ];
        for (what, frame) in tagged {
            let before = count(node, Reason::DropVlan)?;
            send_frame(&attacker.ns, "eth0", &frame)?;
            assert_eq!(
                receive(&listener)?,
                None,
                "{what} from {} to {} with {}'s address",
                attacker.ip,
                target.ip,
                victim.ip
            );
            assert_eq!(
                count(node, Reason::DropVlan)?,
                before + 1,
                "{what}: counted"
            );
        }
        // Tagged with its own address is no better.
        let before = count(node, Reason::DropVlan)?;
        send_frame(
            &attacker.ns,
            "eth0",
            &packets::vlan_tagged(&own, ETH_8021Q, 0),
        )?;
        assert_eq!(receive(&listener)?, None, "tagged, own address");
        assert_eq!(count(node, Reason::DropVlan)?, before + 1);
    }
    Ok(())
}

/// Whether `ns` routes anything through a router it learnt from an advertisement.
fn has_learnt_routes(ns: &NetNs) -> Result<bool> {
    let routes = String::from_utf8(ns.ip(&["-6", "route", "show"])?.stdout)?;
    Ok(routes.contains("via fe80::") || routes.contains("2001:db8:77::"))
}

/// Bounded wait for `ns` to act on an advertisement.
fn learns_routes(ns: &NetNs) -> Result<bool> {
    eventually(Duration::from_secs(2), || has_learnt_routes(ns))
}

#[test]
fn a_pods_router_advertisement_never_reaches_its_node() -> Result<()> {
    // Control: on a plain veth pair with IPv6 on and no podwire, the same advertisement makes the
    // host route through its sender.
    let plain = NodeAndPod::new()?;
    let (_, plain_mac) = plain.pod.link(NodeAndPod::POD_IF)?;
    let ra = packets::router_advertisement(plain_mac, "fe80::2".parse()?);
    send_frame(&plain.pod, NodeAndPod::POD_IF, &ra)?;
    assert!(
        learns_routes(&plain.node)?,
        "the advertisement is one a host acts on"
    );

    let mut node = Node::start(Ipv4Addr::new(192, 168, 77, 10), "10.244.0.0/24")?;
    let pod = node.add_pod("h-ra")?;
    let (pod_mac, _) = macs(&pod)?;
    let ra = packets::router_advertisement(pod_mac, "fe80::2".parse()?);
    let before = count(&node, Reason::DropIpv6)?;
    send_frame(&pod.ns, "eth0", &ra)?;
    assert_eq!(
        count(&node, Reason::DropIpv6)?,
        before + 1,
        "dropped and counted"
    );

    // Even with IPv6 back on at the host side (the plugin turns it off), from_pod stops it.
    let veth = pod.host_veth()?.to_owned();
    podwire_lab::processes::run(
        node.command("sysctl")
            .args(["-qw", &format!("net.ipv6.conf.{veth}.disable_ipv6=0")]),
    )?;
    send_frame(&pod.ns, "eth0", &ra)?;
    assert_eq!(count(&node, Reason::DropIpv6)?, before + 2);
    assert!(
        !learns_routes(&node.ns)?,
        "the node learnt no route from its pod"
    );
    node.stop_agent()?;
    Ok(())
}

#[test]
fn a_pod_cannot_claim_another_pods_address_with_arp() -> Result<()> {
    let node = Node::start(Ipv4Addr::new(192, 168, 77, 11), "10.244.0.0/24")?;
    let attacker = node.add_pod("h-arp-attacker")?;
    let victim = node.add_pod("h-arp-victim")?;
    let (mac, _) = macs(&attacker)?;
    let veth = attacker.host_veth()?.to_owned();
    // Asking for the node's own address makes the node learn the sender's address and MAC.
    let neighbours = || -> Result<String> {
        Ok(String::from_utf8(
            node.ns.ip(&["neigh", "show", "dev", &veth])?.stdout,
        )?)
    };

    let before = count(&node, Reason::DropSpoofedArp)?;
    let forged = packets::arp_request(mac, mac, victim.ip, node.ip);
    send_frame(&attacker.ns, "eth0", &forged)?;
    assert_eq!(count(&node, Reason::DropSpoofedArp)?, before + 1);
    assert!(
        !neighbours()?.contains(&victim.ip.to_string()),
        "the node took no neighbour entry for {} from {veth}: {}",
        victim.ip,
        neighbours()?
    );

    // Control: the same request for its own address reaches the node, which learns it.
    let before = count(&node, Reason::PassNotIpv4)?;
    send_frame(
        &attacker.ns,
        "eth0",
        &packets::arp_request(mac, mac, attacker.ip, node.ip),
    )?;
    assert_eq!(count(&node, Reason::PassNotIpv4)?, before + 1);
    assert!(
        neighbours()?.contains(&attacker.ip.to_string()),
        "the node learnt {} from its own ARP: {}",
        attacker.ip,
        neighbours()?
    );
    Ok(())
}

#[test]
fn underlay_hosts_cannot_put_packets_into_the_overlay_past_generic_xdp() -> Result<()> {
    // On a virtual underlay (veth), auto runs from_netdev in the stack.
    let c = cluster(2)?;
    let link = xdp_on_underlay(&c.nodes[1])?;
    assert!(link.contains("xdpgeneric"), "{link}");
    underlay_hosts_cannot_put_packets_into_the_overlay(&c)
}

#[test]
fn underlay_hosts_cannot_put_packets_into_the_overlay_past_native_xdp() -> Result<()> {
    let mut c = cluster_guarded_by(2, "native")?;
    let link = xdp_on_underlay(&c.nodes[1])?;
    assert!(
        link.contains("xdp") && !link.contains("xdpgeneric"),
        "{link}"
    );
    underlay_hosts_cannot_put_packets_into_the_overlay(&c)?;

    // The program stays while the agent is down, and its pin is all that holds it: removing the
    // pin detaches it.
    let node = &mut c.nodes[1];
    node.stop_agent()?;
    assert!(
        xdp_on_underlay(node)?.contains("xdp"),
        "kept with the agent down"
    );
    let pin = node
        .pins()
        .link(podwire_core::object::programs::FROM_NETDEV, "eth0");
    std::fs::remove_file(&pin).with_context(|| format!("removing {}", pin.display()))?;
    let link = xdp_on_underlay(node)?;
    assert!(!link.contains("xdp"), "detached with its pin: {link}");
    Ok(())
}

fn underlay_hosts_cannot_put_packets_into_the_overlay(c: &Cluster) -> Result<()> {
    let stranger = c.underlay.plug("stranger", STRANGER, false)?;
    let target = c.nodes[1].add_pod("h-tunnel-target")?;
    let listener = udp_listener(&target.ns, target.ip)?;
    let port = listener.local_addr()?.port();
    let (node1, node2) = (&c.nodes[0], &c.nodes[1]);
    // An address of node1's pod range: what node1 may send as.
    let node1_pod = Ipv4Addr::new(10, 244, 1, 77);

    // Control: node1 tunnelling from its own range with the cluster's VNI is delivered.
    send_vxlan(
        &node1.ns,
        node1.ip,
        node2.ip,
        VNI,
        (node1_pod, target.ip, port),
        b"tunnelled",
    )?;
    let (_, from) = receive(&listener)?.context("the control arrives")?;
    assert_eq!(from.ip(), node1_pod);

    // A host that is no node, claiming node1's range: dropped by XDP before the VXLAN socket.
    let before = count(node2, Reason::DropTunnelNotNode)?;
    send_vxlan(
        &stranger,
        STRANGER,
        node2.ip,
        VNI,
        (node1_pod, target.ip, port),
        b"tunnelled",
    )?;
    assert_eq!(receive(&listener)?, None, "from a host that is no node");
    assert_eq!(count(node2, Reason::DropTunnelNotNode)?, before + 1);

    // A node with another VNI.
    let before = count(node2, Reason::DropOverlayVni)?;
    send_vxlan(
        &node1.ns,
        node1.ip,
        node2.ip,
        VNI + 1,
        (node1_pod, target.ip, port),
        b"tunnelled",
    )?;
    assert_eq!(receive(&listener)?, None, "with a foreign VNI");
    assert_eq!(count(node2, Reason::DropOverlayVni)?, before + 1);

    // A node asking node2 to relay to a host outside the cluster: node2 forwards IP (as
    // Kubernetes nodes do), yet nothing reaches the host.
    node2.ns.sysctl_ipv4("ip_forward", "1")?;
    let outside = udp_listener(&stranger, STRANGER)?;
    let outside_port = outside.local_addr()?.port();
    let before = count(node2, Reason::DropOverlayRelay)?;
    send_vxlan(
        &node1.ns,
        node1.ip,
        node2.ip,
        VNI,
        (node1_pod, STRANGER, outside_port),
        b"tunnelled",
    )?;
    assert_eq!(receive(&outside)?, None, "relayed to {STRANGER}");
    assert_eq!(count(node2, Reason::DropOverlayRelay)?, before + 1);
    Ok(())
}
