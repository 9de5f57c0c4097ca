//! Each program's verdicts on crafted packets, through BPF_PROG_TEST_RUN: a table per program of
//! the packet, the tc action it returns, the reason it counts (exactly one packet of the frame's
//! length), and the packet as it would leave.
//!
//! The node is 192.168.77.1 with pod CIDR 10.244.1.0/24 in the cluster range 10.244.0.0/16; nodes
//! 192.168.77.2 and .3 own 10.244.2.0/24 and 10.244.3.0/24. A test run cannot give a packet
//! tunnel metadata, so `from_overlay` and `to_overlay` run as their test twins, compiled from the
//! same code but reading the tunnel's remote end from `__sk_buff.cb[0]`.

use std::net::Ipv4Addr;

use anyhow::{Context as _, Result};
use aya::programs::{TestRun as _, TestRunOptions};
use ipnet::Ipv4Net;
use podwire_common::{Counter, Endpoint, NodeEntry, NodeKind, Reason};
use podwire_core::object::programs;
use podwire_datapath::{Datapath, LoadOptions, Tunnel};
use podwire_lab::{
    artifacts,
    packets::{self, checksum, udp_v4, ETH_LEN, TTL_OFFSET},
    require_root,
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

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

/// One row of a table.
struct Case {
    what: &'static str,
    frame: Vec<u8>,
    /// The tunnel's remote end the packet arrived from (or was keyed toward), if any.
    remote: Option<Ipv4Addr>,
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
                vni: 42,
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

/// `__sk_buff` up to and including `cb[0]`, all zero but `cb[0]`, which holds `remote` in
/// network byte order: what the test twins read as the tunnel's remote end.
fn ctx_with_remote(remote: Ipv4Addr) -> Vec<u8> {
    const CB0: usize = 48;
    let mut ctx = vec![0u8; CB0 + 4];
    ctx[CB0..].copy_from_slice(&remote.octets());
    ctx
}

fn all_counters(datapath: &Datapath) -> Result<Vec<(Reason, Counter)>> {
    Ok(datapath.counters.all()?)
}

/// Runs every case through `program`, checking action, counter and the packet that leaves.
fn check_table(datapath: &mut Datapath, program: &'static str, cases: &[Case]) -> Result<()> {
    for case in cases {
        let what = format!("{program}: {}", case.what);
        let before = all_counters(datapath)?;
        let mut out = vec![0u8; case.frame.len()];
        let ctx = case.remote.map(ctx_with_remote);
        let result = datapath
            .program(program)?
            .test_run(TestRunOptions {
                data_in: Some(&case.frame),
                data_out: Some(&mut out),
                ctx_in: ctx.as_deref(),
                ..Default::default()
            })
            .with_context(|| format!("{what}: BPF_PROG_TEST_RUN"))?;
        assert_eq!(result.return_value, case.action, "{what}: tc action");

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
    let case = |what, frame, action, reason, leaves| Case {
        what,
        frame,
        remote: None,
        action,
        reason: Some(reason),
        leaves,
    };
    use Leaves::*;
    // A frame whose IPv4 header is cut short is refused by BPF_PROG_TEST_RUN itself (EINVAL), so
    // that case is sent for real from a packet socket in datapath.rs.
    let cases = [
        case(
            "to a non-pod address outside the cluster",
            from_a(Ipv4Addr::new(192, 168, 77, 1)),
            TC_ACT_OK,
            Reason::PassToStack,
            Untouched,
        ),
        case(
            "to a local pod",
            from_a(POD_B),
            TC_ACT_REDIRECT,
            Reason::RedirectLocal,
            RoutedTo(POD_B_EP),
        ),
        case(
            "TTL 1 to a local pod",
            with_ttl_1(from_a(POD_B)),
            TC_ACT_SHOT,
            Reason::DropTtlExceeded,
            Untouched,
        ),
        case(
            "source IP of no endpoint",
            udp_v4(POD_A_MAC, Ipv4Addr::new(10, 244, 1, 99), POD_B, b"x"),
            TC_ACT_SHOT,
            Reason::DropSpoofedIp,
            Untouched,
        ),
        case(
            "source IP of another pod",
            udp_v4(POD_A_MAC, POD_B, POD_A, b"x"),
            TC_ACT_SHOT,
            Reason::DropSpoofedIp,
            Untouched,
        ),
        case(
            "source MAC not the pod's",
            udp_v4([0x02, 0, 0, 0, 0, 0x66], POD_A, POD_B, b"x"),
            TC_ACT_SHOT,
            Reason::DropSpoofedMac,
            Untouched,
        ),
        case(
            "IPv4 IHL below 5",
            with_short_ihl(from_a(THIS_NODE)),
            TC_ACT_SHOT,
            Reason::DropMalformed,
            Untouched,
        ),
        case(
            "ARP",
            packets::arp(POD_A_MAC),
            TC_ACT_OK,
            Reason::PassNotIpv4,
            Untouched,
        ),
        // Into the tunnel: the packet leaves unchanged, the kernel's VXLAN device encapsulates it.
        case(
            "to a pod on another node",
            from_a(REMOTE_POD_B),
            TC_ACT_REDIRECT,
            Reason::RedirectOverlay,
            Untouched,
        ),
        case(
            "to another node's own address",
            from_a(NODE_C),
            TC_ACT_REDIRECT,
            Reason::RedirectOverlay,
            Untouched,
        ),
        case(
            "to the cluster range where no node is",
            from_a(NO_NODE),
            TC_ACT_SHOT,
            Reason::DropNoNode,
            Untouched,
        ),
        case(
            "to this node's pod CIDR where no pod is",
            from_a(NO_POD),
            TC_ACT_SHOT,
            Reason::DropNoEndpoint,
            Untouched,
        ),
    ];
    check_table(&mut datapath, programs::FROM_POD, &cases)
}

#[test]
fn from_overlay_verdicts_on_crafted_packets() -> Result<()> {
    let object = artifacts::object()?;
    let mut datapath = datapath(object.bytes())?;
    let case = |what, frame, remote, action, reason, leaves| Case {
        what,
        frame,
        remote,
        action,
        reason: Some(reason),
        leaves,
    };
    let from_b = Some(NODE_B);
    let spoofed = |what, frame, remote| {
        case(
            what,
            frame,
            remote,
            TC_ACT_SHOT,
            Reason::DropOverlaySpoofed,
            Leaves::Untouched,
        )
    };
    use Leaves::*;
    let cases = [
        case(
            "from node B's pod to a local pod",
            udp(REMOTE_POD_B, POD_B),
            from_b,
            TC_ACT_REDIRECT,
            Reason::RedirectFromOverlay,
            RoutedTo(POD_B_EP),
        ),
        case(
            "from node B itself to a local pod",
            udp(NODE_B, POD_B),
            from_b,
            TC_ACT_REDIRECT,
            Reason::RedirectFromOverlay,
            RoutedTo(POD_B_EP),
        ),
        case(
            "TTL 1 to a local pod",
            with_ttl_1(udp(REMOTE_POD_B, POD_B)),
            from_b,
            TC_ACT_SHOT,
            Reason::DropTtlExceeded,
            Untouched,
        ),
        case(
            "to this node's pod CIDR where no pod is",
            udp(REMOTE_POD_B, NO_POD),
            from_b,
            TC_ACT_SHOT,
            Reason::DropNoEndpoint,
            Untouched,
        ),
        case(
            "to this node's own address",
            udp(REMOTE_POD_B, THIS_NODE),
            from_b,
            TC_ACT_OK,
            Reason::PassToStack,
            Untouched,
        ),
        case(
            "IPv4 IHL below 5",
            with_short_ihl(udp(REMOTE_POD_B, POD_B)),
            from_b,
            TC_ACT_SHOT,
            Reason::DropMalformed,
            Untouched,
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
            Some(STRANGER),
        ),
        spoofed("without tunnel metadata", udp(REMOTE_POD_B, POD_B), None),
        spoofed(
            "ARP, which no node tunnels",
            packets::arp([0x02, 0, 0, 0, 0, 0x99]),
            from_b,
        ),
    ];
    check_table(&mut datapath, programs::TEST_FROM_OVERLAY, &cases)
}

#[test]
fn to_overlay_verdicts_on_crafted_packets() -> Result<()> {
    let object = artifacts::object()?;
    let mut datapath = datapath(object.bytes())?;
    // The node's own stack routes these over the VXLAN device: from its own address.
    let from_node = |dst| udp(THIS_NODE, dst);
    let case = |what, frame, action, reason| Case {
        what,
        frame,
        remote: None,
        action,
        reason,
        leaves: Leaves::Untouched,
    };
    let no_node = |what, frame| case(what, frame, TC_ACT_SHOT, Some(Reason::DropNoNode));
    let cases = [
        case(
            "to a pod on another node",
            from_node(REMOTE_POD_B),
            TC_ACT_OK,
            Some(Reason::EncapHost),
        ),
        case(
            "to another node's own address",
            from_node(NODE_C),
            TC_ACT_OK,
            Some(Reason::EncapHost),
        ),
        no_node("to the cluster range where no node is", from_node(NO_NODE)),
        no_node("to this node's own pod CIDR", from_node(POD_B)),
        no_node("to an address outside the cluster", from_node(STRANGER)),
        case(
            "ARP, which the NOARP device never sends",
            packets::arp([0x02, 0, 0, 0, 0, 0x01]),
            TC_ACT_OK,
            Some(Reason::PassNotIpv4),
        ),
        case(
            "IPv4 IHL below 5",
            with_short_ihl(from_node(REMOTE_POD_B)),
            TC_ACT_SHOT,
            Some(Reason::DropMalformed),
        ),
        // from_pod keyed it and counted it already.
        Case {
            remote: Some(NODE_B),
            ..case(
                "a pod's packet already keyed toward node B",
                udp(POD_A, REMOTE_POD_B),
                TC_ACT_OK,
                None,
            )
        },
    ];
    check_table(&mut datapath, programs::TEST_TO_OVERLAY, &cases)
}
