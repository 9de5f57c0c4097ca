//! Each program's verdicts on crafted packets, through BPF_PROG_TEST_RUN: a table per program of
//! the packet, the action it returns, the reason it counts (exactly one packet of the frame's
//! length), and the packet as it would leave.
//!
//! The node is 192.168.77.1 with pod CIDR 10.244.1.0/24 in the cluster range 10.244.0.0/16; nodes
//! 192.168.77.2 and .3 own 10.244.2.0/24 and 10.244.3.0/24; the tunnel is VNI 42 on port 4789.
//! A test run cannot give a packet tunnel metadata, so `from_overlay` and `to_overlay` run as
//! their test twins, compiled from the same code but reading the tunnel's remote end and VNI from
//! `__sk_buff.cb[0]` and `cb[1]`.

use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::{Context as _, Result};
use aya::programs::{TestRun as _, TestRunOptions};
use ipnet::Ipv4Net;
use podwire_common::{Counter, Endpoint, NodeEntry, NodeKind, Reason};
use podwire_core::object::programs;
use podwire_datapath::{Datapath, LoadOptions, Tunnel};
use podwire_lab::{
    artifacts,
    packets::{self, checksum, udp_v4, udp_v4_ports, ETH_LEN, TTL_OFFSET},
    require_root,
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

const VNI: u32 = 42;
const PORT: u16 = 4789;
const THIS_NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 1);
const NODE_B: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 2);
const NODE_C: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 3);
/// A host on the underlay that is no node.
const STRANGER: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 200);

/// Pod A sends the from_pod cases: BPF_PROG_TEST_RUN runs tc programs on loopback, ifindex 1.
const POD_A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const POD_A_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 2];
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 3);
const POD_B_EP: Endpoint = Endpoint {
    ifindex: 7,
    flags: 0,
    pod_mac: [0x02, 0, 0, 0, 0, 3],
    host_mac: [0x02, 0, 0, 0, 0, 4],
};
/// In this node's pod CIDR, held by no pod.
const NO_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 99);
/// Pods of the other nodes.
const REMOTE_POD_B: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 9);
const REMOTE_POD_C: Ipv4Addr = Ipv4Addr::new(10, 244, 3, 9);
/// In the cluster range, in no node's pod CIDR.
const NO_NODE: Ipv4Addr = Ipv4Addr::new(10, 244, 200, 9);

/// Which program a table runs.
#[derive(Clone, Copy)]
enum Program {
    Tc(&'static str),
    FromNetdev,
}

impl Program {
    fn name(self) -> &'static str {
        match self {
            Program::Tc(name) => name,
            Program::FromNetdev => programs::FROM_NETDEV,
        }
    }
}

/// One row of a table.
struct Case {
    what: &'static str,
    frame: Vec<u8>,
    /// The tunnel's remote end and VNI the packet arrived with (or was keyed toward), if any.
    tunnel: Option<(Ipv4Addr, u32)>,
    action: u32,
    /// What the packet is counted as; `None`: counted nowhere.
    reason: Option<Reason>,
    /// How the packet leaves the program.
    leaves: Leaves,
}

enum Leaves {
    Untouched,
    /// Delivered to the endpoint: routed as a router would.
    RoutedTo(Endpoint),
}

fn case(
    what: &'static str,
    frame: Vec<u8>,
    tunnel: Option<(Ipv4Addr, u32)>,
    action: u32,
    reason: Reason,
) -> Case {
    Case {
        what,
        frame,
        tunnel,
        action,
        reason: Some(reason),
        leaves: Leaves::Untouched,
    }
}

fn net(s: &str) -> Ipv4Net {
    s.parse().expect("a prefix")
}

/// The datapath with the test twins and a tunnel, the node table above, pods A and B.
fn datapath(object: &[u8]) -> Result<Datapath> {
    require_root()?;
    let mut datapath = Datapath::load(
        object,
        LoadOptions {
            tunnel: Some(Tunnel {
                vxlan_ifindex: 1000,
                vni: VNI,
                port: PORT,
                node_address: THIS_NODE,
            }),
            test_run: true,
            ..LoadOptions::default()
        },
    )
    .context("loading the datapath with the test-run programs")?;
    let remote = |addr: Ipv4Addr| NodeEntry::node(NodeKind::Remote, addr.octets());
    for (prefix, entry) in [
        (net("10.244.0.0/16"), NodeEntry::no_node()),
        (
            net("10.244.1.0/24"),
            NodeEntry::node(NodeKind::Local, THIS_NODE.octets()),
        ),
        (net("10.244.2.0/24"), remote(NODE_B)),
        (Ipv4Net::from(NODE_B), remote(NODE_B)),
        (net("10.244.3.0/24"), remote(NODE_C)),
        (Ipv4Net::from(NODE_C), remote(NODE_C)),
    ] {
        datapath.nodes.set(prefix, entry)?;
    }
    let pod_a = Endpoint {
        ifindex: 1,
        flags: 0,
        pod_mac: POD_A_MAC,
        host_mac: [0x02, 0, 0, 0, 0, 1],
    };
    datapath.endpoints.set(POD_A, pod_a)?;
    datapath.endpoints.set(POD_B, POD_B_EP)?;
    Ok(datapath)
}

/// `__sk_buff` up to and including `cb[1]`, all zero but `cb[0]`, which holds `remote` in network
/// byte order, and `cb[1]`, the VNI: what the test twins read as the tunnel.
fn ctx_with_tunnel((remote, vni): (Ipv4Addr, u32)) -> Vec<u8> {
    const CB0: usize = 48;
    let mut ctx = vec![0u8; CB0 + 8];
    ctx[CB0..CB0 + 4].copy_from_slice(&remote.octets());
    ctx[CB0 + 4..].copy_from_slice(&vni.to_ne_bytes());
    ctx
}

fn all_counters(datapath: &Datapath) -> Result<Vec<(Reason, Counter)>> {
    Ok(datapath.counters.all()?)
}

/// Runs `frame` through `program` once; returns what the program returned.
fn run(
    datapath: &mut Datapath,
    program: Program,
    frame: &[u8],
    tunnel: Option<(Ipv4Addr, u32)>,
    out: &mut [u8],
) -> Result<u32> {
    let ctx = tunnel.map(ctx_with_tunnel);
    let options = TestRunOptions {
        data_in: Some(frame),
        data_out: Some(out),
        ctx_in: ctx.as_deref(),
        ..Default::default()
    };
    let result = match program {
        Program::Tc(name) => datapath.program(name)?.test_run(options),
        Program::FromNetdev => datapath.from_netdev()?.test_run(options),
    };
    Ok(result.context("BPF_PROG_TEST_RUN")?.return_value)
}

/// Runs every case through `program`, checking action, counters and the packet that leaves.
fn check_table(datapath: &mut Datapath, program: Program, cases: &[Case]) -> Result<()> {
    for case in cases {
        let what = format!("{}: {}", program.name(), case.what);
        let before = all_counters(datapath)?;
        let mut out = vec![0u8; case.frame.len()];
        let action = run(datapath, program, &case.frame, case.tunnel, &mut out)
            .with_context(|| what.clone())?;
        assert_eq!(action, case.action, "{what}: action");

        let after = all_counters(datapath)?;
        for ((reason, was), (_, is)) in before.iter().zip(&after) {
            let (packets, bytes) = if case.reason == Some(*reason) {
                (1, case.frame.len() as u64)
            } else {
                (0, 0)
            };
            assert_eq!(
                (is.packets - was.packets, is.bytes - was.bytes),
                (packets, bytes),
                "{what}: packets and bytes counted as {}",
                reason.name()
            );
        }

        match &case.leaves {
            Leaves::Untouched => assert_eq!(out, case.frame, "{what}: frame untouched"),
            Leaves::RoutedTo(endpoint) => {
                assert_eq!(&out[0..6], &endpoint.pod_mac, "{what}: destination MAC");
                assert_eq!(&out[6..12], &endpoint.host_mac, "{what}: source MAC");
                assert_eq!(
                    out[TTL_OFFSET],
                    case.frame[TTL_OFFSET] - 1,
                    "{what}: TTL decremented"
                );
                assert_eq!(
                    checksum(&out[ETH_LEN..ETH_LEN + 20]),
                    0,
                    "{what}: IPv4 header checksum valid"
                );
                assert_eq!(
                    &out[ETH_LEN + 20..],
                    &case.frame[ETH_LEN + 20..],
                    "{what}: payload untouched"
                );
            }
        }
    }
    Ok(())
}

/// Runs `frame` through `program` for its side effect (a recorded flow), checking it passes.
fn prime(
    datapath: &mut Datapath,
    program: Program,
    frame: &[u8],
    tunnel: Option<(Ipv4Addr, u32)>,
) -> Result<()> {
    let mut out = vec![0u8; frame.len()];
    let action = run(datapath, program, frame, tunnel, &mut out)?;
    assert_eq!(
        action,
        TC_ACT_OK,
        "{} lets the priming packet pass",
        program.name()
    );
    Ok(())
}

/// A UDP frame from `src` to `dst` from another node's MAC.
fn udp(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    udp_v4([0x02, 0, 0, 0, 0, 0x99], src, dst, b"crafted")
}

fn with_ttl_1(mut frame: Vec<u8>) -> Vec<u8> {
    frame[TTL_OFFSET] = 1;
    frame
}

/// IHL 4 words = 16 bytes: below the IPv4 minimum.
fn with_short_ihl(mut frame: Vec<u8>) -> Vec<u8> {
    frame[ETH_LEN] = 0x44;
    frame
}

#[test]
fn from_pod_verdicts_on_crafted_packets() -> Result<()> {
    let object = artifacts::object()?;
    let mut datapath = datapath(object.bytes())?;
    let from_a = |dst| udp_v4(POD_A_MAC, POD_A, dst, b"hello");
    // A Service reply: pod B answered A's request, which the stack DNATed and delivered into B
    // (`to_pod` on B's veth recorded it). Here A plays the answering backend, as test runs come
    // from A's veth: the stack delivered B -> A on port 53, A's answer goes back through it.
    prime(
        &mut datapath,
        Program::Tc(programs::TO_POD),
        &udp_v4_ports(POD_B_EP.pod_mac, POD_B, POD_A, (33000, 53), b"query"),
        None,
    )?;
    let answer = udp_v4_ports(POD_A_MAC, POD_A, POD_B, (53, 33000), b"answer");
    let own_arp = packets::arp_request(POD_A_MAC, POD_A_MAC, POD_A, THIS_NODE);
    let ra = packets::router_advertisement(POD_A_MAC, "fe80::2".parse::<Ipv6Addr>()?);
    use Reason::*;
    let ok = |what, frame, reason| case(what, frame, None, TC_ACT_OK, reason);
    let shot = |what, frame, reason| case(what, frame, None, TC_ACT_SHOT, reason);
    let redirect = |what, frame, reason| case(what, frame, None, TC_ACT_REDIRECT, reason);
    // A frame whose IPv4 header is cut short is refused by BPF_PROG_TEST_RUN itself (EINVAL), so
    // that case is sent for real from a packet socket in datapath.rs; so is a tag the kernel
    // takes off on receive (skb->vlan_present), which a test run cannot set.
    let cases = [
        ok(
            "to a non-pod address outside the cluster",
            from_a(Ipv4Addr::new(192, 168, 77, 1)),
            PassToStack,
        ),
        Case {
            leaves: Leaves::RoutedTo(POD_B_EP),
            ..redirect("to a local pod", from_a(POD_B), RedirectLocal)
        },
        shot(
            "TTL 1 to a local pod",
            with_ttl_1(from_a(POD_B)),
            DropTtlExceeded,
        ),
        shot(
            "source IP of no endpoint",
            udp_v4(POD_A_MAC, Ipv4Addr::new(10, 244, 1, 99), POD_B, b"x"),
            DropSpoofedIp,
        ),
        shot(
            "source IP of another pod",
            udp_v4(POD_A_MAC, POD_B, POD_A, b"x"),
            DropSpoofedIp,
        ),
        shot(
            "source MAC not the pod's",
            udp_v4([0x02, 0, 0, 0, 0, 0x66], POD_A, POD_B, b"x"),
            DropSpoofedMac,
        ),
        shot(
            "IPv4 IHL below 5",
            with_short_ihl(from_a(THIS_NODE)),
            DropMalformed,
        ),
        ok("ARP for its own address", own_arp.clone(), PassNotIpv4),
        shot(
            "ARP for another pod's address",
            packets::arp_request(POD_A_MAC, POD_A_MAC, POD_B, THIS_NODE),
            DropSpoofedArp,
        ),
        shot(
            "ARP with another sender MAC",
            packets::arp_request(POD_A_MAC, [0x02, 0, 0, 0, 0, 0x66], POD_A, THIS_NODE),
            DropSpoofedArp,
        ),
        shot(
            "ARP that is not Ethernet/IPv4",
            packets::arp(POD_A_MAC),
            DropSpoofedArp,
        ),
        shot("an IPv6 router advertisement", ra, DropIpv6),
        shot(
            "802.1Q VLAN 0, another pod's source inside",
            packets::vlan_tagged(
                &udp_v4(POD_A_MAC, POD_B, POD_A, b"x"),
                packets::ETH_8021Q,
                0,
            ),
            DropVlan,
        ),
        shot(
            "802.1Q VLAN 0, its own source inside",
            packets::vlan_tagged(&from_a(POD_B), packets::ETH_8021Q, 0),
            DropVlan,
        ),
        shot(
            "802.1ad and 802.1Q (QinQ)",
            packets::vlan_tagged(
                &packets::vlan_tagged(&from_a(POD_B), packets::ETH_8021Q, 5),
                packets::ETH_8021AD,
                7,
            ),
            DropVlan,
        ),
        shot(
            "a tagged ARP",
            packets::vlan_tagged(&own_arp, packets::ETH_8021Q, 0),
            DropVlan,
        ),
        shot(
            "LLDP",
            packets::ether(POD_A_MAC, packets::ETH_LLDP, 46),
            DropEtherType,
        ),
        // Into the tunnel: the packet leaves unchanged, the kernel's VXLAN device encapsulates it.
        redirect(
            "to a pod on another node",
            from_a(REMOTE_POD_B),
            RedirectOverlay,
        ),
        redirect(
            "to another node's own address",
            from_a(NODE_C),
            RedirectOverlay,
        ),
        shot(
            "to the cluster range where no node is",
            from_a(NO_NODE),
            DropNoNode,
        ),
        shot(
            "to this node's pod CIDR where no pod is",
            from_a(NO_POD),
            DropNoEndpoint,
        ),
        ok(
            "a Service's answer to a pod here: through the stack",
            answer.clone(),
            PassStackFlow,
        ),
        ok(
            "an ICMP error about a Service's flow: through the stack",
            packets::icmp_unreachable(POD_A_MAC, POD_A, POD_B, &answer_request(&answer)),
            PassStackFlow,
        ),
        Case {
            leaves: Leaves::RoutedTo(POD_B_EP),
            ..redirect(
                "the same ports in a flow the stack never saw: the shortcut",
                udp_v4_ports(POD_A_MAC, POD_A, POD_B, (54, 33000), b"direct"),
                RedirectLocal,
            )
        },
        ok(
            "a fragment for a local pod",
            packets::first_fragment(&from_a(POD_B)),
            PassFragment,
        ),
    ];
    check_table(&mut datapath, Program::Tc(programs::FROM_POD), &cases)
}

/// The request `answer` answers (addresses and ports swapped): what an ICMP error about it
/// quotes.
fn answer_request(answer: &[u8]) -> Vec<u8> {
    let mut request = answer.to_vec();
    let (src, dst) = (ETH_LEN + 12, ETH_LEN + 16);
    let addresses = answer[src..dst + 4].to_vec();
    request[src..src + 4].copy_from_slice(&addresses[4..]);
    request[dst..dst + 4].copy_from_slice(&addresses[..4]);
    let ports = ETH_LEN + 20;
    request[ports..ports + 2].copy_from_slice(&answer[ports + 2..ports + 4]);
    request[ports + 2..ports + 4].copy_from_slice(&answer[ports..ports + 2]);
    request
}

#[test]
fn from_overlay_verdicts_on_crafted_packets() -> Result<()> {
    let object = artifacts::object()?;
    let mut datapath = datapath(object.bytes())?;
    let from_b = Some((NODE_B, VNI));
    // Pod A asked a Service whose backend is pod 10.244.2.9 on node B: this node's stack DNATed
    // the request and routed it into the tunnel, where `to_overlay` recorded it.
    prime(
        &mut datapath,
        Program::Tc(programs::TEST_TO_OVERLAY),
        &udp_v4_ports(POD_A_MAC, POD_A, REMOTE_POD_B, (33000, 53), b"query"),
        None,
    )?;
    let answer = udp_v4_ports(
        [0x02, 0, 0, 0, 0, 0x99],
        REMOTE_POD_B,
        POD_A,
        (53, 33000),
        b"answer",
    );
    use Reason::*;
    let ok = |what, frame, tunnel, reason| case(what, frame, tunnel, TC_ACT_OK, reason);
    let shot = |what, frame, tunnel, reason| case(what, frame, tunnel, TC_ACT_SHOT, reason);
    let spoofed = |what, frame, tunnel| shot(what, frame, tunnel, DropOverlaySpoofed);
    let delivered = |what, frame| Case {
        leaves: Leaves::RoutedTo(POD_B_EP),
        ..case(what, frame, from_b, TC_ACT_REDIRECT, RedirectFromOverlay)
    };
    let cases = [
        delivered("from node B's pod to a local pod", udp(REMOTE_POD_B, POD_B)),
        delivered("from node B itself to a local pod", udp(NODE_B, POD_B)),
        shot(
            "TTL 1 to a local pod",
            with_ttl_1(udp(REMOTE_POD_B, POD_B)),
            from_b,
            DropTtlExceeded,
        ),
        shot(
            "to this node's pod CIDR where no pod is",
            udp(REMOTE_POD_B, NO_POD),
            from_b,
            DropNoEndpoint,
        ),
        ok(
            "to this node's own address",
            udp(REMOTE_POD_B, THIS_NODE),
            from_b,
            PassToStack,
        ),
        shot(
            "to a pod of another node: no relaying",
            udp(REMOTE_POD_B, REMOTE_POD_C),
            from_b,
            DropOverlayRelay,
        ),
        shot(
            "to a host outside the cluster: no relaying",
            udp(REMOTE_POD_B, STRANGER),
            from_b,
            DropOverlayRelay,
        ),
        shot(
            "to the cluster range where no node is: no relaying",
            udp(REMOTE_POD_B, NO_NODE),
            from_b,
            DropOverlayRelay,
        ),
        shot(
            "from node B's pod with another VNI",
            udp(REMOTE_POD_B, POD_B),
            Some((NODE_B, VNI + 1)),
            DropOverlayVni,
        ),
        ok(
            "a Service's answer to a pod here: through the stack",
            answer,
            from_b,
            PassStackFlow,
        ),
        ok(
            "a fragment for a local pod",
            packets::first_fragment(&udp(REMOTE_POD_B, POD_B)),
            from_b,
            PassFragment,
        ),
        shot(
            "IPv4 IHL below 5",
            with_short_ihl(udp(REMOTE_POD_B, POD_B)),
            from_b,
            DropMalformed,
        ),
        spoofed(
            "from node C's pod, tunnelled by node B",
            udp(REMOTE_POD_C, POD_B),
            from_b,
        ),
        spoofed(
            "from this node's own pod CIDR, tunnelled by node B",
            udp(Ipv4Addr::new(10, 244, 1, 77), POD_B),
            from_b,
        ),
        spoofed(
            "from the cluster range where no node is",
            udp(NO_NODE, POD_B),
            from_b,
        ),
        spoofed("from outside the cluster", udp(STRANGER, POD_B), from_b),
        spoofed(
            "from node B's pod, tunnelled by a host that is no node",
            udp(REMOTE_POD_B, POD_B),
            Some((STRANGER, VNI)),
        ),
        spoofed("without tunnel metadata", udp(REMOTE_POD_B, POD_B), None),
        spoofed(
            "ARP, which no node tunnels",
            packets::arp([0x02, 0, 0, 0, 0, 0x99]),
            from_b,
        ),
    ];
    check_table(
        &mut datapath,
        Program::Tc(programs::TEST_FROM_OVERLAY),
        &cases,
    )
}

#[test]
fn to_overlay_verdicts_on_crafted_packets() -> Result<()> {
    let object = artifacts::object()?;
    let mut datapath = datapath(object.bytes())?;
    // The node's own stack routes these over the VXLAN device: from its own address.
    let from_node = |dst| udp(THIS_NODE, dst);
    let to_tunnel = |what, frame| case(what, frame, None, TC_ACT_OK, Reason::EncapHost);
    let no_node = |what, frame| case(what, frame, None, TC_ACT_SHOT, Reason::DropNoNode);
    let cases = [
        to_tunnel("to a pod on another node", from_node(REMOTE_POD_B)),
        to_tunnel("to another node's own address", from_node(NODE_C)),
        to_tunnel(
            "a pod's packet the stack routed (a Service it NATed)",
            udp_v4(POD_A_MAC, POD_A, REMOTE_POD_B, b"x"),
        ),
        no_node("to the cluster range where no node is", from_node(NO_NODE)),
        no_node("to this node's own pod CIDR", from_node(POD_B)),
        no_node("to an address outside the cluster", from_node(STRANGER)),
        case(
            "ARP, which the NOARP device never sends",
            packets::arp([0x02, 0, 0, 0, 0, 0x01]),
            None,
            TC_ACT_OK,
            Reason::PassNotIpv4,
        ),
        case(
            "IPv4 IHL below 5",
            with_short_ihl(from_node(REMOTE_POD_B)),
            None,
            TC_ACT_SHOT,
            Reason::DropMalformed,
        ),
        // from_pod keyed it and counted it already.
        Case {
            reason: None,
            ..case(
                "a pod's packet already keyed toward node B",
                udp(POD_A, REMOTE_POD_B),
                Some((NODE_B, VNI)),
                TC_ACT_OK,
                Reason::EncapHost,
            )
        },
    ];
    check_table(
        &mut datapath,
        Program::Tc(programs::TEST_TO_OVERLAY),
        &cases,
    )
}

#[test]
fn to_pod_verdicts_on_crafted_packets() -> Result<()> {
    let object = artifacts::object()?;
    let mut datapath = datapath(object.bytes())?;
    let pass = |what, frame| case(what, frame, None, TC_ACT_OK, Reason::PassToPod);
    // Whatever the stack sends into a pod passes untouched; what it records is checked by the
    // from_pod and from_overlay tables.
    let cases = [
        pass(
            "a Service request the stack DNATed to this pod",
            udp_v4(POD_B_EP.pod_mac, POD_B, POD_A, b"q"),
        ),
        pass("the node's own probe", udp(THIS_NODE, POD_A)),
        pass("from outside the cluster", udp(STRANGER, POD_A)),
        pass("ARP", packets::arp([0x02, 0, 0, 0, 0, 0x01])),
        pass("IPv4 IHL below 5", with_short_ihl(udp(THIS_NODE, POD_A))),
    ];
    check_table(&mut datapath, Program::Tc(programs::TO_POD), &cases)
}

#[test]
fn from_netdev_verdicts_on_crafted_packets() -> Result<()> {
    let object = artifacts::object()?;
    let mut datapath = datapath(object.bytes())?;
    let inner = udp(REMOTE_POD_B, POD_B);
    let tunnel = |src, vni| packets::vxlan_frame(src, THIS_NODE, PORT, vni, &inner);
    let pass = |what, frame, reason| case(what, frame, None, XDP_PASS, reason);
    let drop = |what, frame, reason| case(what, frame, None, XDP_DROP, reason);
    let mut no_vni_flag = tunnel(NODE_B, VNI);
    // The VXLAN flags follow the outer Ethernet, IPv4 and UDP headers.
    no_vni_flag[ETH_LEN + 20 + 8] = 0;
    let cases = [
        pass(
            "a tunnel packet from node B",
            tunnel(NODE_B, VNI),
            Reason::PassTunnel,
        ),
        drop(
            "a tunnel packet from a host that is no node",
            tunnel(STRANGER, VNI),
            Reason::DropTunnelNotNode,
        ),
        drop(
            "a tunnel packet from an address inside node B's pod CIDR",
            tunnel(REMOTE_POD_B, VNI),
            Reason::DropTunnelNotNode,
        ),
        drop(
            "a tunnel packet from this node's own pod range",
            tunnel(NO_POD, VNI),
            Reason::DropTunnelNotNode,
        ),
        drop(
            "a tunnel packet from node B with another VNI",
            tunnel(NODE_B, VNI + 1),
            Reason::DropOverlayVni,
        ),
        drop(
            "a tunnel packet from node B without the VNI flag",
            no_vni_flag,
            Reason::DropOverlayVni,
        ),
        drop(
            "a tunnel packet from node B cut short in its VXLAN header",
            tunnel(NODE_B, VNI)[..ETH_LEN + 20 + 8 + 4].to_vec(),
            Reason::DropMalformed,
        ),
        pass(
            "UDP to another port from a stranger",
            packets::udp_v4_ports(
                [0x02, 0, 0, 0, 0, 0x77],
                STRANGER,
                THIS_NODE,
                (4789, 53),
                b"dns",
            ),
            Reason::PassUnderlay,
        ),
        pass(
            "ARP on the underlay",
            packets::arp_request(
                [0x02, 0, 0, 0, 0, 0x77],
                [0x02, 0, 0, 0, 0, 0x77],
                STRANGER,
                THIS_NODE,
            ),
            Reason::PassUnderlay,
        ),
    ];
    check_table(&mut datapath, Program::FromNetdev, &cases)
}
