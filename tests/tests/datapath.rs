//! The datapath object on this kernel: it passes the verifier, and its counters for real packets
//! on a veth in test namespaces. Its verdicts on crafted packets are in verdicts.rs.

use std::{
    net::{Ipv4Addr, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use aya::{
    programs::{Program, TestRun as _, TestRunOptions},
    Ebpf,
};
use ipnet::Ipv4Net;
use podwire_common::{Endpoint, NodeEntry, NodeKind, Reason};
use podwire_core::object::programs;
use podwire_datapath::{Datapath, Hook, LoadOptions, Tunnel};
use podwire_lab::{
    artifacts,
    nodes::NodeAndPod,
    packets::{udp_v4, ETH_LEN},
    require_root,
    traffic::send_frame,
};

#[test]
fn every_program_in_the_object_passes_the_verifier() -> Result<()> {
    require_root()?;
    let object = artifacts::object()?;
    let mut ebpf =
        Ebpf::load(object.bytes()).context("parsing the object and creating its maps")?;
    let mut loaded = Vec::new();
    for (name, program) in ebpf.programs_mut() {
        let result = match program {
            Program::SchedClassifier(p) => p.load(),
            Program::Xdp(p) => p.load(),
            other => bail!(
                "{name}: program type {:?} has no load case here",
                other.prog_type()
            ),
        };
        // The verifier log is in the error's source chain, which the test's failure shows.
        result.with_context(|| format!("{name} failed to load"))?;
        loaded.push(name.to_owned());
    }
    loaded.sort();
    // The programs a node attaches, and their test-run twins.
    let mut expected = [programs::ALL.as_slice(), &programs::TEST_RUN].concat();
    expected.sort();
    assert_eq!(loaded, expected, "programs in the object");
    Ok(())
}

#[test]
fn from_pod_on_a_veth_counts_real_packets_it_passes_to_the_node() -> Result<()> {
    let net = NodeAndPod::new()?;
    let object = artifacts::object()?;
    let mut datapath =
        Datapath::load(object.bytes(), LoadOptions::default()).context("loading the datapath")?;
    let (ifindex, host_mac) = net.node.link(NodeAndPod::HOST_IF)?;
    let (_, pod_mac) = net.pod.link(NodeAndPod::POD_IF)?;
    datapath.endpoints.set(
        NodeAndPod::POD_IP,
        Endpoint {
            ifindex,
            flags: 0,
            pod_mac,
            host_mac,
        },
    )?;
    net.node
        .run(|| datapath.attach(Hook::from_pod(NodeAndPod::HOST_IF)))?
        .context("attaching from_pod")?;

    let receiver = net
        .node
        .run(|| UdpSocket::bind((NodeAndPod::NODE_IP, 0)))??;
    receiver.set_read_timeout(Some(Duration::from_secs(10)))?;
    let target = receiver.local_addr()?;
    let sender = net.pod.run(|| UdpSocket::bind((NodeAndPod::POD_IP, 0)))??;

    const DATAGRAMS: u64 = 5;
    const PAYLOAD: usize = 100;
    let mut buf = [0u8; 2048];
    for i in 0..DATAGRAMS {
        let payload = [i as u8; PAYLOAD];
        sender.send_to(&payload, target)?;
        let (n, from) = receiver
            .recv_from(&mut buf)
            .context("datagram from the pod")?;
        assert_eq!(&buf[..n], &payload, "datagram {i} arrives intact");
        assert_eq!(from, sender.local_addr()?);
    }

    let passed = datapath.counters.get(Reason::PassToStack)?;
    assert_eq!(passed.packets, DATAGRAMS, "IPv4 packets the pod sent");
    // Ethernet 14 + IPv4 20 + UDP 8 + payload, as the skb length at tc ingress.
    assert_eq!(passed.bytes, DATAGRAMS * (14 + 20 + 8 + PAYLOAD as u64));
    assert!(
        datapath.counters.get(Reason::PassNotIpv4)?.packets >= 1,
        "the pod's ARP request for the node was seen and passed"
    );
    assert_eq!(datapath.counters.get(Reason::DropMalformed)?.packets, 0);

    // A pod can send anything from a packet socket: an IPv4 frame cut short inside its header is
    // dropped and counted, and never reaches the node.
    let runt = &udp_v4(pod_mac, NodeAndPod::POD_IP, NodeAndPod::NODE_IP, b"x")[..ETH_LEN + 12];
    send_frame(&net.pod, NodeAndPod::POD_IF, runt)?;
    let dropped = datapath.counters.get(Reason::DropMalformed)?;
    assert_eq!(
        (dropped.packets, dropped.bytes),
        (1, runt.len() as u64),
        "runt frame dropped"
    );
    assert_eq!(
        datapath.counters.get(Reason::PassToStack)?.packets,
        DATAGRAMS
    );
    Ok(())
}

/// How many endpoints a node's table must hold: a /16 of pods.
const SCALE_ENDPOINTS: u32 = 65536;
/// How many nodes the node table must hold (a pod CIDR and an address each).
const SCALE_NODES: u32 = 5000;
const SCALE_VNI: u32 = 42;

/// Endpoint `i` of the scale test: 10.100.0.0 + i, on loopback (where test runs run).
fn scale_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 100, 0, 0)) + i)
}

fn scale_endpoint(i: u32) -> Endpoint {
    let [_, b, c, d] = i.to_be_bytes();
    Endpoint {
        ifindex: 1,
        flags: 0,
        pod_mac: [0x02, 0xee, 0, b, c, d],
        host_mac: [0x02, 0xef, 0, b, c, d],
    }
}

/// Node `j` of the scale test: pod CIDR 10.128.0.0 + j * 256 /24, address 100.64.0.0 + j.
fn scale_node(j: u32) -> (Ipv4Net, Ipv4Addr) {
    let cidr = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + (j << 8));
    let addr = Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + j);
    (Ipv4Net::new(cidr, 24).expect("a /24"), addr)
}

/// Runs `frame` through the tc program `name` once, with `cb` in `__sk_buff.cb[0..2]` if given;
/// returns the action and the packet as it leaves.
fn test_run(
    datapath: &mut Datapath,
    name: &'static str,
    frame: &[u8],
    cb: Option<(Ipv4Addr, u32)>,
) -> Result<(u32, Vec<u8>)> {
    const CB0: usize = 48;
    let ctx = cb.map(|(addr, vni)| {
        let mut ctx = vec![0u8; CB0 + 8];
        ctx[CB0..CB0 + 4].copy_from_slice(&addr.octets());
        ctx[CB0 + 4..].copy_from_slice(&vni.to_ne_bytes());
        ctx
    });
    let mut out = vec![0u8; frame.len()];
    let result = datapath.program(name)?.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ctx_in: ctx.as_deref(),
        ..Default::default()
    });
    let action = result
        .with_context(|| format!("BPF_PROG_TEST_RUN of {name}"))?
        .return_value;
    Ok((action, out))
}

#[test]
fn the_tables_hold_64k_endpoints_and_5k_nodes_and_the_programs_find_them() -> Result<()> {
    require_root()?;
    const TC_ACT_SHOT: u32 = 2;
    const TC_ACT_REDIRECT: u32 = 7;
    let this_node = Ipv4Addr::new(192, 168, 77, 1);
    let object = artifacts::object()?;
    let mut datapath = Datapath::load(
        object.bytes(),
        LoadOptions {
            tunnel: Some(Tunnel {
                vxlan_ifindex: 1000,
                vni: SCALE_VNI,
                port: 4789,
                node_address: this_node,
            }),
            test_run: true,
            ..LoadOptions::default()
        },
    )
    .context("loading the datapath with the test-run programs")?;

    let start = Instant::now();
    for i in 0..SCALE_ENDPOINTS {
        datapath
            .endpoints
            .set(scale_ip(i), scale_endpoint(i))
            .with_context(|| format!("writing endpoint {i} of {SCALE_ENDPOINTS}"))?;
    }
    let endpoints_took = start.elapsed();
    let remote = |addr: Ipv4Addr| NodeEntry::node(NodeKind::Remote, addr.octets());
    let start = Instant::now();
    datapath
        .nodes
        .set("10.0.0.0/8".parse()?, NodeEntry::no_node())?;
    datapath.nodes.set(
        "10.100.0.0/16".parse()?,
        NodeEntry::node(NodeKind::Local, this_node.octets()),
    )?;
    for j in 0..SCALE_NODES {
        let (cidr, addr) = scale_node(j);
        datapath.nodes.set(cidr, remote(addr))?;
        datapath.nodes.set(Ipv4Net::from(addr), remote(addr))?;
    }
    let nodes_took = start.elapsed();
    eprintln!(
        "wrote {SCALE_ENDPOINTS} endpoints in {endpoints_took:?}, {} node-table entries \
         ({SCALE_NODES} nodes) in {nodes_took:?}",
        2 * SCALE_NODES + 2
    );

    // Read back: every entry as written.
    let endpoints = datapath.endpoints.list()?;
    assert_eq!(
        endpoints.len(),
        SCALE_ENDPOINTS as usize,
        "endpoints listed"
    );
    for (ip, endpoint) in &endpoints {
        let i = u32::from(*ip) - u32::from(scale_ip(0));
        assert_eq!(*endpoint, scale_endpoint(i), "endpoint of {ip}");
    }
    for i in (0..SCALE_ENDPOINTS).step_by(4099) {
        assert_eq!(
            datapath.endpoints.get(scale_ip(i))?,
            Some(scale_endpoint(i))
        );
    }
    let nodes = datapath.nodes.list()?;
    assert_eq!(
        nodes.len(),
        2 * SCALE_NODES as usize + 2,
        "node-table entries"
    );
    for j in 0..SCALE_NODES {
        let (cidr, addr) = scale_node(j);
        for net in [cidr, Ipv4Net::from(addr)] {
            assert!(
                nodes.iter().any(|(n, e)| *n == net && *e == remote(addr)),
                "node {j}: {net} -> {addr}"
            );
        }
    }

    // The programs find them: a sample of pods sends to another pod on the node (delivered with
    // the destination's MACs), and a sample of nodes tunnels a pod's packet here (delivered when
    // it comes from the node owning the source, dropped from its neighbour).
    let mut samples = 0;
    for i in (0..SCALE_ENDPOINTS).step_by(997) {
        let dst = (i * 7919 + 13) % SCALE_ENDPOINTS;
        let frame = udp_v4(
            scale_endpoint(i).pod_mac,
            scale_ip(i),
            scale_ip(dst),
            b"scale",
        );
        let (action, out) = test_run(&mut datapath, programs::FROM_POD, &frame, None)?;
        assert_eq!(
            action,
            TC_ACT_REDIRECT,
            "from_pod: {} -> {}",
            scale_ip(i),
            scale_ip(dst)
        );
        assert_eq!(
            &out[0..6],
            &scale_endpoint(dst).pod_mac,
            "to {}",
            scale_ip(dst)
        );
        assert_eq!(
            &out[6..12],
            &scale_endpoint(dst).host_mac,
            "to {}",
            scale_ip(dst)
        );
        samples += 1;
    }
    for j in (0..SCALE_NODES).step_by(97) {
        let (cidr, addr) = scale_node(j);
        let (_, neighbour) = scale_node((j + 1) % SCALE_NODES);
        let src = Ipv4Addr::from(u32::from(cidr.network()) + 9);
        let dst = (j * 13) % SCALE_ENDPOINTS;
        let frame = udp_v4([0x02, 0, 0, 0, 0, 9], src, scale_ip(dst), b"scale");
        let from_overlay = programs::TEST_FROM_OVERLAY;
        let (action, out) = test_run(&mut datapath, from_overlay, &frame, Some((addr, SCALE_VNI)))?;
        assert_eq!(action, TC_ACT_REDIRECT, "{src} from node {addr}");
        assert_eq!(&out[0..6], &scale_endpoint(dst).pod_mac);
        let (action, _) = test_run(
            &mut datapath,
            from_overlay,
            &frame,
            Some((neighbour, SCALE_VNI)),
        )?;
        assert_eq!(
            action, TC_ACT_SHOT,
            "{src} from node {neighbour}, not its owner"
        );
        samples += 2;
    }
    eprintln!("{samples} sampled lookups through BPF_PROG_TEST_RUN");
    Ok(())
}

#[test]
fn removing_an_entry_that_is_not_there_is_a_no_op() -> Result<()> {
    require_root()?;
    let object = artifacts::object()?;
    let mut datapath = Datapath::load(object.bytes(), LoadOptions::default())?;
    let ip = Ipv4Addr::new(10, 244, 1, 2);
    datapath
        .endpoints
        .remove(ip)
        .context("removing an absent endpoint")?;
    datapath.endpoints.set(ip, Endpoint::default())?;
    datapath.endpoints.remove(ip)?;
    datapath
        .endpoints
        .remove(ip)
        .context("removing an endpoint twice")?;
    assert_eq!(datapath.endpoints.get(ip)?, None);
    let net: Ipv4Net = "10.244.2.0/24".parse()?;
    datapath
        .nodes
        .remove(net)
        .context("removing an absent node-table entry")?;
    Ok(())
}
