//! The datapath object on this kernel: it passes the verifier, its verdicts on crafted packets
//! (BPF_PROG_TEST_RUN), and its counters for real packets on a veth in test namespaces.

use std::{
    net::{Ipv4Addr, UdpSocket},
    time::Duration,
};

use aya::{
    programs::{Program, TestRun as _, TestRunOptions},
    Ebpf,
};
use podwire_agent::datapath::{programs, Datapath, LogLevel, OBJECT};
use podwire_common::{Counter, Endpoint, Reason};
use podwire_tests::{packet, require_root, NodeAndPod};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

fn counter(datapath: &Datapath, reason: Reason) -> Counter {
    datapath
        .counters()
        .expect("reading COUNTERS")
        .into_iter()
        .find(|(r, _)| *r == reason)
        .map(|(_, c)| c)
        .unwrap_or_else(|| panic!("no counter row for {reason:?}"))
}

#[test]
fn every_program_in_the_object_passes_the_verifier() {
    require_root();
    let mut ebpf = Ebpf::load(OBJECT).expect("parsing the object and creating its maps");
    let mut loaded = Vec::new();
    for (name, program) in ebpf.programs_mut() {
        let result = match program {
            Program::SchedClassifier(p) => p.load(),
            Program::Xdp(p) => p.load(),
            other => panic!(
                "{name}: program type {:?} has no load case here",
                other.prog_type()
            ),
        };
        if let Err(e) = result {
            // The verifier log is in the error's source chain.
            let mut msg = format!("{name} failed to load: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                msg.push_str(&format!("\n  caused by: {s}"));
                source = s.source();
            }
            panic!("{msg}");
        }
        loaded.push(name.to_owned());
    }
    loaded.sort();
    let mut expected = programs::ALL.to_vec();
    expected.sort();
    assert_eq!(loaded, expected, "programs in the object");
}

#[test]
fn from_pod_verdicts_on_crafted_packets() {
    require_root();
    let mut datapath = Datapath::load(LogLevel::Off, None, None).expect("loading the datapath");
    let (a, b) = (Ipv4Addr::new(10, 244, 0, 2), Ipv4Addr::new(10, 244, 0, 3));
    let a_mac = [0x02, 0, 0, 0, 0, 2];
    // BPF_PROG_TEST_RUN runs tc programs on the loopback device: ifindex 1.
    let a_ep = Endpoint {
        ifindex: 1,
        flags: 0,
        pod_mac: a_mac,
        host_mac: [0x02, 0, 0, 0, 0, 1],
    };
    let b_ep = Endpoint {
        ifindex: 7,
        flags: 0,
        pod_mac: [0x02, 0, 0, 0, 0, 3],
        host_mac: [0x02, 0, 0, 0, 0, 4],
    };
    datapath.set_endpoint(a, a_ep).unwrap();
    datapath.set_endpoint(b, b_ep).unwrap();

    let to_node = packet::udp_v4(a_mac, a, Ipv4Addr::new(192, 168, 77, 1), b"hello");
    let to_b = packet::udp_v4(a_mac, a, b, b"hello b");
    let mut ttl_1 = to_b.clone();
    ttl_1[14 + 8] = 1;
    let from_stranger = packet::udp_v4(a_mac, Ipv4Addr::new(10, 244, 0, 99), b, b"x");
    let wrong_mac = packet::udp_v4([0x02, 0, 0, 0, 0, 0x66], a, b, b"x");
    let mut short_ihl = to_node.clone();
    short_ihl[14] = 0x44; // IHL 4 words = 16 bytes: below the IPv4 minimum
    let mut arp = packet::eth([0xff; 6], a_mac, packet::ETH_ARP);
    arp.extend_from_slice(&[0; 28]);

    // A frame whose IPv4 header is cut short is refused by BPF_PROG_TEST_RUN itself (EINVAL), so
    // that case is sent for real from a packet socket in the veth test below.
    let cases: [(&str, &[u8], u32, Reason); 7] = [
        (
            "to a non-pod address",
            &to_node,
            TC_ACT_OK,
            Reason::PassToStack,
        ),
        (
            "to a local pod",
            &to_b,
            TC_ACT_REDIRECT,
            Reason::RedirectLocal,
        ),
        (
            "TTL 1 to a local pod",
            &ttl_1,
            TC_ACT_SHOT,
            Reason::DropTtlExceeded,
        ),
        (
            "source IP of no endpoint",
            &from_stranger,
            TC_ACT_SHOT,
            Reason::DropSpoofedIp,
        ),
        (
            "source MAC not the pod's",
            &wrong_mac,
            TC_ACT_SHOT,
            Reason::DropSpoofedMac,
        ),
        (
            "IPv4 IHL below 5",
            &short_ihl,
            TC_ACT_SHOT,
            Reason::DropMalformed,
        ),
        ("ARP", &arp, TC_ACT_OK, Reason::PassNotIpv4),
    ];
    for (what, frame, want_verdict, want_reason) in cases {
        let before = counter(&datapath, want_reason);
        let mut out = vec![0u8; frame.len()];
        let result = datapath
            .classifier(programs::FROM_POD)
            .unwrap()
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..Default::default()
            })
            .unwrap_or_else(|e| panic!("{what}: BPF_PROG_TEST_RUN: {e:?}"));
        assert_eq!(result.return_value, want_verdict, "{what}: verdict");
        let after = counter(&datapath, want_reason);
        assert_eq!(
            after.packets,
            before.packets + 1,
            "{what}: {want_reason:?} packets"
        );
        assert_eq!(
            after.bytes,
            before.bytes + frame.len() as u64,
            "{what}: {want_reason:?} bytes"
        );
        if want_reason == Reason::RedirectLocal {
            // Routed as a router would: MACs of b's veth pair, TTL one less, checksum still valid.
            assert_eq!(&out[0..6], &b_ep.pod_mac, "destination MAC is b's");
            assert_eq!(&out[6..12], &b_ep.host_mac, "source MAC is b's gateway");
            assert_eq!(out[14 + 8], frame[14 + 8] - 1, "TTL decremented");
            assert_eq!(
                packet::checksum(&out[14..34]),
                0,
                "IPv4 header checksum valid"
            );
            assert_eq!(&out[14 + 20..], &frame[14 + 20..], "payload untouched");
        } else {
            assert_eq!(&out, frame, "{what}: frame untouched");
        }
    }
}

#[test]
fn from_pod_on_a_veth_counts_real_packets_it_passes_to_the_node() {
    let net = NodeAndPod::new();
    let mut datapath = Datapath::load(LogLevel::Off, None, None).expect("loading the datapath");
    let (ifindex, host_mac) = net.node.link(NodeAndPod::HOST_IF);
    let (_, pod_mac) = net.pod.link(NodeAndPod::POD_IF);
    datapath
        .set_endpoint(
            NodeAndPod::POD_IP,
            Endpoint {
                ifindex,
                flags: 0,
                pod_mac,
                host_mac,
            },
        )
        .unwrap();
    net.node
        .run(|| datapath.attach_from_pod(NodeAndPod::HOST_IF))
        .expect("attaching from_pod");

    let receiver = net
        .node
        .run(|| UdpSocket::bind((NodeAndPod::NODE_IP, 0)))
        .unwrap();
    receiver
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let target = receiver.local_addr().unwrap();
    let sender = net
        .pod
        .run(|| UdpSocket::bind((NodeAndPod::POD_IP, 0)))
        .unwrap();

    const DATAGRAMS: u64 = 5;
    const PAYLOAD: usize = 100;
    let mut buf = [0u8; 2048];
    for i in 0..DATAGRAMS {
        let payload = [i as u8; PAYLOAD];
        sender.send_to(&payload, target).unwrap();
        let (n, from) = receiver.recv_from(&mut buf).expect("datagram from the pod");
        assert_eq!(&buf[..n], &payload, "datagram {i} arrives intact");
        assert_eq!(from, sender.local_addr().unwrap());
    }

    let passed = counter(&datapath, Reason::PassToStack);
    assert_eq!(passed.packets, DATAGRAMS, "IPv4 packets the pod sent");
    // Ethernet 14 + IPv4 20 + UDP 8 + payload, as the skb length at tc ingress.
    assert_eq!(passed.bytes, DATAGRAMS * (14 + 20 + 8 + PAYLOAD as u64));
    assert!(
        counter(&datapath, Reason::PassNotIpv4).packets >= 1,
        "the pod's ARP request for the node was seen and passed"
    );
    assert_eq!(counter(&datapath, Reason::DropMalformed).packets, 0);

    // A pod can send anything from a packet socket: an IPv4 frame cut short inside its header is
    // dropped and counted, and never reaches the node.
    let runt = &packet::udp_v4(pod_mac, NodeAndPod::POD_IP, NodeAndPod::NODE_IP, b"x")[..14 + 12];
    net.pod.run(|| send_raw_frame(NodeAndPod::POD_IF, runt));
    let dropped = counter(&datapath, Reason::DropMalformed);
    assert_eq!(
        (dropped.packets, dropped.bytes),
        (1, runt.len() as u64),
        "runt frame dropped"
    );
    assert_eq!(counter(&datapath, Reason::PassToStack).packets, DATAGRAMS);
}

/// Sends `frame` as-is out of `iface` of the calling thread's namespace (AF_PACKET, SOCK_RAW).
fn send_raw_frame(iface: &str, frame: &[u8]) {
    let ifindex = nix::net::if_::if_nametoindex(iface).expect("pod interface");
    // SAFETY: plain socket syscalls on a descriptor this function owns and closes.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = ifindex as i32;
        addr.sll_halen = 6;
        let sent = libc::sendto(
            fd,
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        assert_eq!(sent, frame.len() as isize, "sending the raw frame: {err}");
    }
}
