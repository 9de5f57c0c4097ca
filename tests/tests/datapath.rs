//! The datapath object on this kernel: it passes the verifier, and its counters for real packets
//! on a veth in test namespaces. Its verdicts on crafted packets are in verdicts.rs.

use std::{net::UdpSocket, time::Duration};

use anyhow::{bail, Context as _, Result};
use aya::{programs::Program, Ebpf};
use podwire_common::{Endpoint, Reason};
use podwire_core::object::programs;
use podwire_datapath::{Datapath, Hook, LoadOptions};
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
