//! Fuzzing podwire's inputs from outside, with proptest, against the real binaries and programs:
//!
//! - the CNI plugin: random and mutated network configurations and CNI_* environments, the
//!   plugin exec'd against a real agent; it must exit 0 or 1 (never a panic or a signal), fail
//!   with one JSON error object carrying a numeric `code` and a `msg`, and leave nothing behind
//!   (no veth, no endpoint entry, no address held);
//! - the agent's API socket: random lines and mutated requests of every op; every line gets one
//!   JSON reply line (an oversized one may instead close the connection), and the agent keeps
//!   answering Status;
//! - the programs' parser, through BPF_PROG_TEST_RUN: random and mutated frames of every length
//!   0..=1600 through `from_pod`, `to_pod`, `from_overlay` and `from_netdev`; the kernel runs
//!   each one (it may refuse only frames too short for the headers their ethertype announces),
//!   the verdict is one the program returns, exactly one known reason is counted, consistent
//!   with the verdict, every drop is on the event ring with its reason, and a valid packet from
//!   a pod to a known pod is never dropped (nor anything `to_pod` is given).
//!
//! Each proptest target runs 256 cases (`PROPTEST_CASES=<n>` runs more or fewer). A failing
//! case is shrunk and its seed written to `tests/proptest-regressions/fuzz.txt`, which is
//! committed: it runs first on every later run, so a crash found once stays a test. The sweep
//! over every frame length is seeded: a failure names the program, length and frame.

use std::{
    cell::RefCell,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, Shutdown},
    os::unix::{net::UnixStream, process::ExitStatusExt as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use aya::{
    maps::{Map, MapData, PerCpuArray},
    programs::{TestRun as _, TestRunOptions},
};
use ipnet::Ipv4Net;
use podwire_common::{Counter, Endpoint, NodeEntry, NodeKind, Reason, Verdict};
use podwire_core::{
    api::{self, ApiError, Reply, Request},
    object::{maps, programs},
};
use podwire_datapath::{Datapath, DatapathMap as _, DropEvents, LoadOptions, Tunnel};
use podwire_lab::{
    artifacts, faults,
    namespaces::NetNs,
    nodes::{Node, PinRoot},
    packets::{checksum, ETH_LEN},
    require_root,
};
use proptest::{
    prelude::*,
    test_runner::{FileFailurePersistence, TestCaseError, TestRunner},
};
use serde_json::{json, Value};

#[path = "../../core/tests/mutate/mod.rs"]
mod mutate;
use mutate::{apply, apply_bytes, byte_mutation, mutation, ByteMutation, Mutation};

/// 256 cases (or `PROPTEST_CASES`); failures persist next to this file, to be committed.
fn config() -> ProptestConfig {
    ProptestConfig {
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/proptest-regressions/fuzz.txt"
        )))),
        source_file: Some(file!()),
        ..ProptestConfig::default()
    }
}

/// Runs `test` on values of `strategy` as `proptest!` would, but with a fixture the test owns
/// (an agent, a loaded datapath), which the macro cannot share between cases.
fn fuzz<S: Strategy>(name: &str, strategy: S, test: impl Fn(S::Value) -> Result<()>) -> Result<()> {
    let mut runner = TestRunner::new(config());
    let started = Instant::now();
    let outcome = runner.run(&strategy, |value| {
        test(value).map_err(|e| TestCaseError::fail(format!("{e:#}")))
    });
    eprintln!(
        "{name}: {} cases in {:.1} s",
        config().cases,
        started.elapsed().as_secs_f64()
    );
    outcome.map_err(|e| anyhow::anyhow!("{name}: {e}"))
}

/// `s`, cut to a length that a failure message can show.
fn short(s: &str) -> String {
    match s.char_indices().nth(600) {
        Some((at, _)) => format!("{}... ({} bytes)", &s[..at], s.len()),
        None => s.to_owned(),
    }
}

fn no_nul(s: String) -> String {
    s.replace('\0', "x")
}

// ---------------------------------------------------------------------------------------------
// The programs' parser, through BPF_PROG_TEST_RUN.
// ---------------------------------------------------------------------------------------------

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
const STRANGER: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 200);
/// The test runs' pod: tc test runs happen on loopback, ifindex 1.
const POD_A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const POD_A_EP: Endpoint = Endpoint {
    ifindex: 1,
    flags: 0,
    pod_mac: [0x02, 0, 0, 0, 0, 2],
    host_mac: [0x02, 0, 0, 0, 0, 1],
};
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 3);
const POD_B_EP: Endpoint = Endpoint {
    ifindex: 7,
    flags: 0,
    pod_mac: [0x02, 0, 0, 0, 0, 3],
    host_mac: [0x02, 0, 0, 0, 0, 4],
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Prog {
    FromPod,
    ToPod,
    /// `from_overlay`'s test twin, which reads the tunnel from `cb[0]` and `cb[1]`.
    FromOverlay,
    FromNetdev,
}

const PROGS: [Prog; 4] = [
    Prog::FromPod,
    Prog::ToPod,
    Prog::FromOverlay,
    Prog::FromNetdev,
];

/// A small, seeded generator (SplitMix64), so the sweep is the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.byte()).collect()
    }
    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.below(from.len())]
    }
}

/// An IPv4 packet (header with `options`, valid checksum) carrying `l4` of protocol `proto`.
fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, ttl: u8, options: &[u8], l4: &[u8]) -> Vec<u8> {
    let ihl = 5 + options.len() / 4;
    let total = (ihl * 4 + l4.len()) as u16;
    let mut ip = vec![0x40 | ihl as u8, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    // Identification, DF, no offset.
    ip.extend_from_slice(&[0x12, 0x34, 0x40, 0, ttl, proto, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    ip.extend_from_slice(options);
    let sum = checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    ip.extend_from_slice(l4);
    ip
}

fn ether(dst: [u8; 6], src: [u8; 6], ether_type: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = dst.to_vec();
    frame.extend_from_slice(&src);
    frame.extend_from_slice(&ether_type.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// A transport payload of `len` bytes in all: UDP, TCP or ICMP echo headers (when they fit)
/// followed by random data, or random data for another protocol. Returns it and its protocol.
fn l4(rng: &mut Rng, len: usize) -> (u8, Vec<u8>) {
    let mut data = rng.bytes(len);
    let proto = match rng.below(5) {
        0 | 1 if len >= 8 => {
            data[4..6].copy_from_slice(&(len as u16).to_be_bytes());
            data[6..8].copy_from_slice(&[0, 0]);
            17
        }
        2 if len >= 20 => {
            // Data offset 5 words, any flags.
            data[12] = 0x50;
            6
        }
        3 if len >= 8 => {
            data[0] = 8;
            data[1] = 0;
            1
        }
        _ => rng.pick(&[47u8, 132, 50, 253]),
    };
    (proto, data)
}

/// A valid IPv4 packet of `len` bytes from `src` to `dst` (IHL 5 to 15, TTL 2 or more, not a
/// fragment), or `None` if `len` is too short for its header.
fn valid_ipv4(rng: &mut Rng, len: usize, src: Ipv4Addr, dst: Ipv4Addr) -> Option<Vec<u8>> {
    let options = if rng.below(4) == 0 {
        // NOPs and an end-of-options: harmless options of 4 to 40 bytes.
        let mut o = vec![1u8; 4 * (1 + rng.below(10))];
        *o.last_mut().expect("at least 4 bytes") = 0;
        o
    } else {
        Vec::new()
    };
    let header = 20 + options.len();
    let room = len.checked_sub(header)?;
    // Ethernet padding after the IPv4 packet, as short frames carry.
    let pad = if rng.below(4) == 0 {
        rng.below(room.min(18) + 1)
    } else {
        0
    };
    let (proto, payload) = l4(rng, room - pad);
    let ttl = 2 + rng.below(254) as u8;
    let mut packet = ipv4(src, dst, proto, ttl, &options, &payload);
    packet.extend(rng.bytes(pad));
    Some(packet)
}

fn in_net(rng: &mut Rng, net: &str) -> Ipv4Addr {
    let net: Ipv4Net = net.parse().expect("a prefix");
    let hosts = u32::from(net.broadcast()) - u32::from(net.network()) + 1;
    Ipv4Addr::from(u32::from(net.network()) + (rng.next() as u32) % hosts)
}

/// The tunnel a valid packet arrives through at `from_overlay`: node B with the cluster's VNI.
const GOOD_TUNNEL: Option<(Ipv4Addr, u32)> = Some((NODE_B, VNI));

/// A valid frame of `len` bytes from a pod to a known pod, as `prog` sees it, which it must not
/// drop; `None` if `len` is too short for one. `from_netdev` gets it tunnelled from node B.
fn valid_frame(rng: &mut Rng, prog: Prog, len: usize) -> Option<Vec<u8>> {
    let ip_len = len.checked_sub(ETH_LEN)?;
    match prog {
        Prog::FromPod => {
            let dst = match rng.below(3) {
                0 => POD_B,
                1 => in_net(rng, "10.244.2.0/24"),
                _ => in_net(rng, "10.244.3.0/24"),
            };
            let packet = valid_ipv4(rng, ip_len, POD_A, dst)?;
            Some(ether(POD_A_EP.host_mac, POD_A_EP.pod_mac, 0x0800, &packet))
        }
        Prog::ToPod => {
            let packet = valid_ipv4(rng, ip_len, POD_B, POD_A)?;
            Some(ether(POD_A_EP.pod_mac, POD_A_EP.host_mac, 0x0800, &packet))
        }
        Prog::FromOverlay => {
            let src = if rng.below(8) == 0 {
                NODE_B
            } else {
                in_net(rng, "10.244.2.0/24")
            };
            let packet = valid_ipv4(rng, ip_len, src, POD_B)?;
            Some(ether(
                [0x02, 0, 0, 0, 0, 0x99],
                [0x02, 0, 0, 0, 0, 0x98],
                0x0800,
                &packet,
            ))
        }
        Prog::FromNetdev => {
            // Outer IPv4 (20), UDP (8), VXLAN (8), then an inner frame.
            let inner_len = ip_len.checked_sub(20 + 8 + 8)?;
            let inner = valid_frame(rng, Prog::FromOverlay, inner_len)?;
            let mut udp = rng.below(65536).max(1024).to_be_bytes()[6..].to_vec();
            udp.extend_from_slice(&PORT.to_be_bytes());
            udp.extend_from_slice(&((8 + 8 + inner.len()) as u16).to_be_bytes());
            udp.extend_from_slice(&[0, 0, 0x08, 0, 0, 0]);
            udp.extend_from_slice(&(VNI << 8).to_be_bytes());
            udp.extend_from_slice(&inner);
            let outer = ipv4(NODE_B, THIS_NODE, 17, 64, &[], &udp);
            Some(ether(
                [0x02, 0, 0, 0, 0, 0x01],
                [0x02, 0, 0, 0, 0, 0x77],
                0x0800,
                &outer,
            ))
        }
    }
}

/// Ethertypes the programs tell apart.
const ETHER_TYPES: [u16; 6] = [0x0800, 0x0806, 0x86dd, 0x8100, 0x88a8, 0x88cc];

/// `len` random bytes, half the time with an ethertype the programs look into.
fn random_frame(rng: &mut Rng, len: usize) -> Vec<u8> {
    let mut frame = rng.bytes(len);
    if len >= ETH_LEN && rng.below(2) == 0 {
        let t = rng.pick(&ETHER_TYPES);
        frame[12..14].copy_from_slice(&t.to_be_bytes());
        if t == 0x0800 && len > ETH_LEN {
            // Version 4, IHL 5 to 15.
            frame[ETH_LEN] = 0x45 + rng.below(11) as u8;
        }
    }
    frame
}

/// A valid frame for `prog` (of any length), cut or grown to `len` and with a few bytes of its
/// headers changed.
fn mutated_frame(rng: &mut Rng, prog: Prog, len: usize) -> Vec<u8> {
    let base_len = 160 + rng.below(1400);
    let mut frame = valid_frame(rng, prog, base_len).expect("160 bytes hold a valid frame");
    frame.truncate(len);
    while frame.len() < len {
        frame.push(rng.byte());
    }
    if !frame.is_empty() {
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(frame.len().min(100));
            frame[at] = match rng.below(3) {
                0 => rng.byte(),
                1 => frame[at] ^ (1 << rng.below(8)),
                _ => [0u8, 0xff, 1][rng.below(3)],
            };
        }
    }
    frame
}

/// The tunnel a random packet claims at `from_overlay`.
fn random_tunnel(rng: &mut Rng) -> Option<(Ipv4Addr, u32)> {
    match rng.below(6) {
        0 => None,
        1 => Some((NODE_C, VNI)),
        2 => Some((STRANGER, VNI)),
        3 => Some((NODE_B, rng.next() as u32 & 0xff_ffff)),
        4 => Some((Ipv4Addr::from(rng.next() as u32), rng.next() as u32)),
        _ => GOOD_TUNNEL,
    }
}

/// `__sk_buff` up to `cb[1]`: the tunnel's remote end and VNI, as the test twins read them.
fn ctx_with_tunnel((remote, vni): (Ipv4Addr, u32)) -> Vec<u8> {
    const CB0: usize = 48;
    let mut ctx = vec![0u8; CB0 + 8];
    ctx[CB0..CB0 + 4].copy_from_slice(&remote.octets());
    ctx[CB0 + 4..].copy_from_slice(&vni.to_ne_bytes());
    ctx
}

/// Whether BPF_PROG_TEST_RUN may refuse `frame` before the program runs: shorter than an
/// Ethernet header, or than the IPv4 or IPv6 header its ethertype announces.
fn kernel_may_refuse(frame: &[u8]) -> bool {
    if frame.len() < ETH_LEN {
        return true;
    }
    match u16::from_be_bytes([frame[12], frame[13]]) {
        0x0800 => frame.len() < ETH_LEN + 20,
        0x86dd => frame.len() < ETH_LEN + 40,
        _ => false,
    }
}

/// The datapath loaded for test runs with a node table and two pods (as in verdicts.rs), its
/// maps pinned so the counters' every slot and the event ring can be read.
struct Parser {
    datapath: Datapath,
    counters: PerCpuArray<MapData, Counter>,
    events: DropEvents,
    /// Every counter slot after the last run.
    last: Vec<Counter>,
    /// Dropped last: the maps are pinned in it.
    _pins: PinRoot,
}

impl Parser {
    fn load() -> Result<Parser> {
        require_root()?;
        let object = artifacts::object()?;
        let pin_root = PinRoot::new();
        let pins = pin_root.pins();
        let mut datapath = Datapath::load(
            object.bytes(),
            LoadOptions {
                tunnel: Some(Tunnel {
                    vxlan_ifindex: 1000,
                    vni: VNI,
                    port: PORT,
                    node_address: THIS_NODE,
                }),
                test_run: true,
                pins: Some(&pins),
                ..LoadOptions::default()
            },
        )
        .context("loading the datapath with the test-run programs")?;
        let remote = |addr: Ipv4Addr| NodeEntry::node(NodeKind::Remote, addr.octets());
        for (prefix, entry) in [
            ("10.244.0.0/16", NodeEntry::no_node()),
            (
                "10.244.1.0/24",
                NodeEntry::node(NodeKind::Local, THIS_NODE.octets()),
            ),
            ("10.244.2.0/24", remote(NODE_B)),
            ("192.168.77.2/32", remote(NODE_B)),
            ("10.244.3.0/24", remote(NODE_C)),
            ("192.168.77.3/32", remote(NODE_C)),
        ] {
            datapath.nodes.set(prefix.parse()?, entry)?;
        }
        datapath.endpoints.set(POD_A, POD_A_EP)?;
        datapath.endpoints.set(POD_B, POD_B_EP)?;
        let map = Map::from_map_data(MapData::from_pin(pins.map(maps::COUNTERS))?)?;
        let mut parser = Parser {
            datapath,
            counters: PerCpuArray::try_from(map)?,
            events: DropEvents::open(&pins)?,
            last: Vec::new(),
            _pins: pin_root,
        };
        parser.last = parser.slots()?;
        Ok(parser)
    }

    /// Every slot of `COUNTERS`, known reason or not, summed over CPUs.
    fn slots(&self) -> Result<Vec<Counter>> {
        (0..Reason::SLOTS)
            .map(|i| Ok(self.counters.get(&i, 0)?.iter().copied().sum()))
            .collect()
    }

    /// Runs `frame` through `prog` and checks everything the run leaves; `None` if the kernel
    /// refused the frame (which it may only for [`kernel_may_refuse`]).
    fn check(
        &mut self,
        prog: Prog,
        frame: &[u8],
        tunnel: Option<(Ipv4Addr, u32)>,
        must_deliver: bool,
    ) -> Result<Option<Reason>> {
        self.check_inner(prog, frame, tunnel, must_deliver)
            .with_context(|| {
                format!(
                    "{prog:?}, {} bytes, tunnel {tunnel:?}: {}",
                    frame.len(),
                    frame.iter().map(|b| format!("{b:02x}")).collect::<String>()
                )
            })
    }

    fn check_inner(
        &mut self,
        prog: Prog,
        frame: &[u8],
        tunnel: Option<(Ipv4Addr, u32)>,
        must_deliver: bool,
    ) -> Result<Option<Reason>> {
        let ctx = tunnel.map(ctx_with_tunnel);
        let mut out = vec![0u8; frame.len()];
        let options = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: if prog == Prog::FromOverlay {
                ctx.as_deref()
            } else {
                None
            },
            ..Default::default()
        };
        let result = match prog {
            Prog::FromPod => self.datapath.program(programs::FROM_POD)?.test_run(options),
            Prog::ToPod => self.datapath.program(programs::TO_POD)?.test_run(options),
            Prog::FromOverlay => self
                .datapath
                .program(programs::TEST_FROM_OVERLAY)?
                .test_run(options),
            Prog::FromNetdev => self.datapath.from_netdev()?.test_run(options),
        };
        let after = self.slots()?;
        let changed: Vec<(u32, Counter)> = (0..Reason::SLOTS)
            .zip(after.iter().zip(&self.last))
            .filter(|(_, (a, b))| a != b)
            .map(|(i, (a, b))| {
                (
                    i,
                    Counter {
                        packets: a.packets - b.packets,
                        bytes: a.bytes - b.bytes,
                    },
                )
            })
            .collect();
        self.last = after;
        let mut events = Vec::new();
        while let Some(event) = self.events.pop()? {
            events.push(event);
        }
        let action = match result {
            Ok(r) => r.return_value,
            Err(e) => {
                ensure!(
                    kernel_may_refuse(frame),
                    "BPF_PROG_TEST_RUN failed: {:#}",
                    anyhow::Error::from(e)
                );
                ensure!(
                    changed.is_empty() && events.is_empty(),
                    "a refused run counted {changed:?}"
                );
                return Ok(None);
            }
        };
        let known: &[u32] = match prog {
            Prog::FromNetdev => &[XDP_DROP, XDP_PASS],
            _ => &[TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT],
        };
        ensure!(known.contains(&action), "unknown verdict {action}");
        let [(slot, counted)] = changed[..] else {
            bail!("verdict {action} counted in {changed:?}, not in exactly one slot");
        };
        let reason = Reason::from_u32(slot).with_context(|| format!("counted in slot {slot}"))?;
        ensure!(
            counted
                == Counter {
                    packets: 1,
                    bytes: frame.len() as u64
                },
            "{} counted {counted:?}",
            reason.name()
        );
        let expected: &[u32] = match (prog, reason.verdict()) {
            (Prog::FromNetdev, Verdict::Drop) => &[XDP_DROP],
            (Prog::FromNetdev, Verdict::Pass) => &[XDP_PASS],
            (Prog::FromNetdev, Verdict::Redirect) => &[],
            (_, Verdict::Drop) => &[TC_ACT_SHOT],
            (_, Verdict::Pass) => &[TC_ACT_OK],
            (_, Verdict::Redirect) => &[TC_ACT_REDIRECT],
        };
        ensure!(
            expected.contains(&action),
            "verdict {action} with reason {}",
            reason.name()
        );
        if reason.is_drop() {
            ensure!(
                matches!(&events[..], [e] if e.reason == slot && e.len as usize == frame.len()),
                "drop {} reported on the ring as {events:?}",
                reason.name()
            );
        } else {
            ensure!(events.is_empty(), "{} reported {events:?}", reason.name());
        }
        ensure!(
            !(must_deliver || prog == Prog::ToPod) || !reason.is_drop(),
            "a valid packet dropped as {}",
            reason.name()
        );
        if matches!(reason, Reason::RedirectLocal | Reason::RedirectFromOverlay) {
            routed_into_pod(frame, &out)?;
        }
        Ok(Some(reason))
    }
}

/// Checks that `out` is `frame` routed into the local pod it is addressed to: that pod's MACs,
/// TTL one less, the header checksum still right if it was, the rest untouched.
fn routed_into_pod(frame: &[u8], out: &[u8]) -> Result<()> {
    let ihl = usize::from(frame[ETH_LEN] & 0x0f) * 4;
    let header = ETH_LEN..ETH_LEN + ihl;
    let dst = Ipv4Addr::new(frame[30], frame[31], frame[32], frame[33]);
    let pod = [(POD_A, POD_A_EP), (POD_B, POD_B_EP)]
        .into_iter()
        .find(|(ip, _)| *ip == dst)
        .map(|(_, ep)| ep)
        .with_context(|| format!("redirected into a pod, but {dst} is none"))?;
    ensure!(
        out[..6] == pod.pod_mac && out[6..12] == pod.host_mac,
        "delivered to {dst} with MACs {:02x?}",
        &out[..12]
    );
    ensure!(
        out[ETH_LEN + 8] == frame[ETH_LEN + 8].wrapping_sub(1),
        "TTL {} became {}",
        frame[ETH_LEN + 8],
        out[ETH_LEN + 8]
    );
    if frame.len() >= header.end && checksum(&frame[header.clone()]) == 0 {
        ensure!(
            checksum(&out[header.clone()]) == 0,
            "the IPv4 header checksum is wrong after the TTL change"
        );
    }
    let unchanged = |range: std::ops::Range<usize>| {
        let range = range.start.min(frame.len())..range.end.min(frame.len());
        frame[range.clone()] == out[range]
    };
    ensure!(
        unchanged(12..ETH_LEN + 8) && unchanged(ETH_LEN + 9..ETH_LEN + 10),
        "the header changed beyond TTL and checksum"
    );
    ensure!(
        unchanged(ETH_LEN + 12..frame.len()),
        "addresses, options or payload changed"
    );
    Ok(())
}

/// Random, mutated and valid frames of every length from 0 to 1600 bytes through each program.
#[test]
fn fuzz_programs_with_frames_of_every_length() -> Result<()> {
    let mut parser = Parser::load()?;
    let mut rng = Rng(0x5eed_f00d);
    let started = Instant::now();
    let (mut runs, mut refused, mut delivered) = (0u32, 0u32, 0u32);
    for len in 0..=1600 {
        for prog in PROGS {
            let tunnel = random_tunnel(&mut rng);
            let frame = random_frame(&mut rng, len);
            refused += u32::from(parser.check(prog, &frame, tunnel, false)?.is_none());
            let tunnel = random_tunnel(&mut rng);
            let frame = mutated_frame(&mut rng, prog, len);
            refused += u32::from(parser.check(prog, &frame, tunnel, false)?.is_none());
            runs += 2;
            if let Some(frame) = valid_frame(&mut rng, prog, len) {
                let ran = parser
                    .check(prog, &frame, GOOD_TUNNEL, true)?
                    .with_context(|| format!("{prog:?} refused a valid frame of {len} bytes"))?;
                runs += 1;
                delivered += u32::from(!ran.is_drop());
            }
        }
    }
    eprintln!(
        "{runs} test runs ({refused} refused by the kernel, {delivered} valid frames delivered) \
         in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// What the proptest target below draws: a program, and which frame of which length.
fn frame_case() -> impl Strategy<Value = (usize, u8, usize, u64)> {
    (0..PROGS.len(), 0u8..3, 0usize..=1600, any::<u64>())
}

#[test]
fn fuzz_programs_with_random_frames() -> Result<()> {
    let parser = RefCell::new(Parser::load()?);
    fuzz(
        "frames",
        frame_case(),
        |(prog, kind, len, seed): (usize, u8, usize, u64)| {
            let mut rng = Rng(seed);
            let prog = PROGS[prog];
            let mut parser = parser.borrow_mut();
            match kind {
                0 => {
                    let tunnel = random_tunnel(&mut rng);
                    parser.check(prog, &random_frame(&mut rng, len), tunnel, false)?;
                }
                1 => {
                    let tunnel = random_tunnel(&mut rng);
                    parser.check(prog, &mutated_frame(&mut rng, prog, len), tunnel, false)?;
                }
                _ => {
                    if let Some(frame) = valid_frame(&mut rng, prog, len) {
                        parser
                            .check(prog, &frame, GOOD_TUNNEL, true)?
                            .context("a valid frame refused")?;
                    }
                }
            }
            Ok(())
        },
    )
}

// ---------------------------------------------------------------------------------------------
// The agent's API socket.
// ---------------------------------------------------------------------------------------------

const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 10);
const POD_CIDR: &str = "10.244.0.0/24";
/// Lines longer than this may be refused by closing the connection instead of a reply.
const OVERSIZED: usize = 64 * 1024;

/// Request fields, for mutations that add fields.
const API_KEYS: &[&str] = &[
    "op",
    "attachment",
    "containerID",
    "ifname",
    "netns",
    "host_ifname",
    "host_mac",
    "pod_mac",
    "valid",
];

fn api_near_misses() -> Vec<Value> {
    [
        "status",
        "allocate",
        "register",
        "release",
        "check",
        "gc",
        "Status",
        "GC",
        "lo",
        "eth0",
        "pw0123456789a",
        "0a:58:0a:f4:01:01",
        "0a:58:0a:f4:01",
        "zz:zz:zz:zz:zz:zz",
        "/proc/self/ns/net",
        "/run/netns/none",
    ]
    .into_iter()
    .map(Value::from)
    .collect()
}

fn attachment() -> impl Strategy<Value = Value> {
    (
        prop_oneof![
            4 => prop::sample::select(vec!["c-a", "c-b", "c-c"]).prop_map(str::to_owned),
            1 => ".{0,16}".prop_map(no_nul),
        ],
        prop_oneof![4 => Just("eth0".to_owned()), 1 => ".{0,20}".prop_map(no_nul)],
    )
        .prop_map(|(id, ifname)| json!({ "containerID": id, "ifname": ifname }))
}

fn mac() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => any::<[u8; 6]>().prop_map(|m| podwire_core::mac::Mac(m).to_string()),
        1 => ".{0,20}".prop_map(no_nul),
    ]
}

/// A well-formed request of any op, with plausible or odd field values.
fn request() -> impl Strategy<Value = Value> {
    let host_ifname = prop_oneof![
        Just("lo".to_owned()),
        Just("pwdoesnotexist".to_owned()),
        Just("a-name-longer-than-ifnamsiz".to_owned()),
        ".{0,16}".prop_map(no_nul),
    ];
    prop_oneof![
        Just(json!({ "op": "status" })),
        (
            attachment(),
            prop_oneof!["/proc/self/ns/net", "/run/netns/none", ".{0,20}"]
        )
            .prop_map(|(a, n)| json!({ "op": "allocate", "attachment": a, "netns": n })),
        (attachment(), host_ifname, mac(), mac()).prop_map(|(a, h, hm, pm)| json!({
            "op": "register", "attachment": a, "host_ifname": h, "host_mac": hm, "pod_mac": pm
        })),
        attachment().prop_map(|a| json!({ "op": "release", "attachment": a })),
        attachment().prop_map(|a| json!({ "op": "check", "attachment": a })),
        prop::collection::vec(attachment(), 0..4).prop_map(|v| json!({ "op": "gc", "valid": v })),
    ]
}

/// A line for the agent, without its newline.
fn api_line() -> impl Strategy<Value = Vec<u8>> {
    let mutated = (
        request(),
        prop_oneof![
            2 => Just(Vec::new()),
            1 => prop::collection::vec(mutation(API_KEYS, api_near_misses()), 1..3),
        ],
        prop_oneof![3 => Just(Vec::new()), 1 => prop::collection::vec(byte_mutation(), 1..2)],
    )
        .prop_map(|(mut request, mutations, byte_mutations)| {
            for m in &mutations {
                apply(&mut request, m);
            }
            let mut bytes = serde_json::to_vec(&request).expect("values serialise");
            for m in &byte_mutations {
                apply_bytes(&mut bytes, m);
            }
            bytes
        });
    prop_oneof![
        6 => mutated,
        2 => prop::collection::vec(any::<u8>(), 0..512),
        1 => (OVERSIZED..3 * 1024 * 1024).prop_map(|n| {
            let mut line = br#"{"op":"status","pad":""#.to_vec();
            line.resize(n, b'x');
            line.extend_from_slice(br#""}"#);
            line
        }),
    ]
}

/// Sends `line` and a newline, then reads until the agent closes the connection.
fn send_line(socket: &Path, line: &[u8]) -> Result<Vec<u8>> {
    let mut stream = UnixStream::connect(socket).context("connecting to the agent")?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut all = line.to_vec();
    all.push(b'\n');
    // The agent answers the first line and closes: the rest may not be read.
    match stream.write_all(&all) {
        Err(e)
            if !matches!(
                e.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            ) =>
        {
            return Err(e).context("writing the line")
        }
        _ => {}
    }
    let _ = stream.shutdown(Shutdown::Write);
    let mut answer = Vec::new();
    match stream.read_to_end(&mut answer) {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => return Err(e).context("reading the answer (30 s at most)"),
        Ok(_) => {}
    }
    Ok(answer)
}

fn agent_answers_status(socket: &Path) -> Result<()> {
    match api::call(socket, &Request::Status) {
        Ok(Reply::Status { .. }) => Ok(()),
        other => bail!("Status answered {other:?}"),
    }
}

#[test]
fn fuzz_agent_api_requests() -> Result<()> {
    let node = Node::start(NODE_IP, POD_CIDR)?;
    let socket = node.socket();
    fuzz("agent API", api_line(), |line: Vec<u8>| {
        let what = || {
            format!(
                "line {:?}",
                String::from_utf8_lossy(&line[..line.len().min(300)])
            )
        };
        let answer = send_line(&socket, &line).with_context(what)?;
        if answer.is_empty() && line.len() > OVERSIZED {
            // Refused by closing: allowed for oversized lines only.
        } else {
            let text = std::str::from_utf8(&answer).with_context(what)?;
            ensure!(
                text.ends_with('\n') && text.matches('\n').count() == 1,
                "not one reply line: {text:?} for {}",
                what()
            );
            let _reply: Result<Reply, ApiError> = serde_json::from_str(text)
                .with_context(|| format!("reply {text:?} for {}", what()))?;
        }
        agent_answers_status(&socket).with_context(|| format!("after {}", what()))
    })
}

// ---------------------------------------------------------------------------------------------
// The CNI plugin's configuration and environment.
// ---------------------------------------------------------------------------------------------

/// Where CNI_NETNS points.
#[derive(Clone, Debug)]
enum NetnsArg {
    /// A pod namespace made for the test.
    Pod,
    /// The plugin's own namespace, the node's.
    Own,
    Missing,
    Empty,
    Nonexistent,
    /// A regular file and a directory, no namespaces.
    File,
    Dir,
    Odd(String),
}

#[derive(Clone, Debug)]
enum ConfInput {
    /// The node's valid configuration with these changes.
    Mutated {
        version: &'static str,
        extra: Vec<(&'static str, Value)>,
        mutations: Vec<Mutation>,
        byte_mutations: Vec<ByteMutation>,
    },
    Bytes(Vec<u8>),
}

#[derive(Clone, Debug)]
struct CniCase {
    command: Option<String>,
    container_id: Option<String>,
    ifname: Option<String>,
    netns: NetnsArg,
    cni_args: Option<String>,
    conf: ConfInput,
    /// Run the same invocation twice, as a runtime retrying does.
    twice: bool,
}

const CNI_KEYS: &[&str] = &[
    "cniVersion",
    "name",
    "type",
    "mtu",
    "agentSocket",
    "ipam",
    "prevResult",
    "cni.dev/valid-attachments",
    "interfaces",
    "ips",
    "routes",
    "dns",
    "address",
    "gateway",
    "interface",
];

fn cni_near_misses() -> Vec<Value> {
    vec![
        json!("1.1.0"),
        json!("0.2.0"),
        json!("99.0.0"),
        json!("1.1.0 "),
        json!(575),
        json!(576),
        json!(65535),
        json!(65536),
        json!(-1),
        json!(1e30),
        json!(1500.5),
        json!({ "type": "host-local" }),
        json!([{ "containerID": "c", "ifname": "eth0" }]),
        json!([{ "containerID": 1 }]),
        json!({ "name": "eth0", "mac": "zz", "sandbox": 7 }),
        json!({ "address": "10.244.0.300/32", "gateway": "x", "interface": -1 }),
        json!({ "dst": "0.0.0.0/33", "gw": "::", "mtu": "x", "priority": -5 }),
    ]
}

/// A plausible previous result, for CHECK and chained ADD.
fn prev_result() -> Value {
    json!({
        "cniVersion": "1.1.0",
        "interfaces": [
            { "name": "pw0123456789a", "mac": "0a:58:0a:f4:00:01" },
            { "name": "eth0", "mac": "0a:58:0a:f4:00:02", "sandbox": "/run/netns/x", "mtu": 1500 }
        ],
        "ips": [{ "address": "10.244.0.2/32", "gateway": "169.254.1.1", "interface": 1 }],
        "routes": [{ "dst": "0.0.0.0/0", "gw": "169.254.1.1", "mtu": 1400, "table": 7, "scope": 0 }],
        "dns": { "nameservers": ["10.96.0.10"], "search": ["svc"], "options": ["ndots:5"] }
    })
}

fn cni_case() -> impl Strategy<Value = CniCase> {
    let command = prop_oneof![
        6 => Just(Some("ADD".to_owned())),
        2 => Just(Some("DEL".to_owned())),
        2 => Just(Some("CHECK".to_owned())),
        1 => Just(Some("STATUS".to_owned())),
        1 => Just(Some("GC".to_owned())),
        1 => Just(Some("VERSION".to_owned())),
        1 => ".{0,10}".prop_map(|s| Some(no_nul(s))),
        1 => Just(None),
    ];
    let container_id = prop_oneof![
        6 => "[a-zA-Z0-9][a-zA-Z0-9_.-]{0,63}".prop_map(Some),
        1 => ".{0,30}".prop_map(|s| Some(no_nul(s))),
        1 => (1000usize..100_000).prop_map(|n| Some("c".repeat(n))),
        1 => Just(None),
    ];
    let ifname = prop_oneof![
        6 => Just(Some("eth0".to_owned())),
        // Taken in the pod already: ADD fails after the agent allocated the address.
        2 => Just(Some("lo".to_owned())),
        1 => "[a-z0-9]{1,15}".prop_map(Some),
        1 => "[a-z0-9]{16,40}".prop_map(Some),
        1 => prop::sample::select(vec!["lo", ".", "..", "a/b", "a:b", "a b", ""])
            .prop_map(|s| Some(s.to_owned())),
        1 => ".{0,20}".prop_map(|s| Some(no_nul(s))),
        1 => Just(None),
    ];
    let netns = prop_oneof![
        8 => Just(NetnsArg::Pod),
        1 => Just(NetnsArg::Own),
        1 => Just(NetnsArg::Missing),
        1 => Just(NetnsArg::Empty),
        1 => Just(NetnsArg::Nonexistent),
        1 => Just(NetnsArg::File),
        1 => Just(NetnsArg::Dir),
        1 => ".{0,40}".prop_map(|s| NetnsArg::Odd(no_nul(s))),
    ];
    let cni_args = prop_oneof![
        3 => Just(None),
        1 => Just(Some("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=p".to_owned())),
        1 => ".{0,60}".prop_map(|s| Some(no_nul(s))),
    ];
    let extra = prop::collection::vec(
        prop_oneof![
            (
                Just("mtu"),
                prop_oneof![Just(json!(1400)), any::<i64>().prop_map(Value::from)]
            ),
            (Just("prevResult"), Just(prev_result())),
            (Just("cni.dev/valid-attachments"), Just(json!([]))),
            (Just("ipam"), Just(json!({}))),
        ],
        0..3,
    );
    let mutated = (
        prop::sample::select(vec![
            "1.1.0", "1.1.0", "1.0.0", "0.4.0", "0.3.1", "0.2.0", "", "1.1",
        ]),
        extra,
        prop::collection::vec(mutation(CNI_KEYS, cni_near_misses()), 0..4),
        prop::collection::vec(byte_mutation(), 0..2),
    )
        .prop_map(
            |(version, extra, mutations, byte_mutations)| ConfInput::Mutated {
                version,
                extra,
                mutations,
                byte_mutations,
            },
        );
    let conf = prop_oneof![
        6 => mutated,
        1 => prop::collection::vec(any::<u8>(), 0..256).prop_map(ConfInput::Bytes),
    ];
    let twice = prop_oneof![3 => Just(false), 1 => Just(true)];
    (command, container_id, ifname, netns, cni_args, conf, twice).prop_map(
        |(command, container_id, ifname, netns, cni_args, conf, twice)| CniCase {
            command,
            container_id,
            ifname,
            netns,
            cni_args,
            conf,
            twice,
        },
    )
}

/// What the plugin runs against: a node with its agent, a pod namespace, and paths that are no
/// namespace.
struct CniBench {
    node: Node,
    pod: NetNs,
    plugin: PathBuf,
    scratch: tempfile::TempDir,
}

impl CniBench {
    fn new() -> Result<CniBench> {
        let node = Node::start(NODE_IP, POD_CIDR)?;
        let scratch = tempfile::tempdir()?;
        std::fs::write(scratch.path().join("file"), "not a namespace")?;
        Ok(CniBench {
            node,
            pod: NetNs::new("pod")?,
            plugin: artifacts::bin("podwire-cni")?,
            scratch,
        })
    }

    /// A socket path that nothing listens on.
    fn dead_socket(&self) -> PathBuf {
        self.scratch.path().join("nothing.sock")
    }

    /// The configuration's bytes, or `None` for one that could reach an agent other than this
    /// test's (a missing or absolute foreign `agentSocket` means the node's default socket,
    /// which another agent on this machine may own).
    fn conf(&self, input: &ConfInput) -> Option<Vec<u8>> {
        let bytes = match input {
            ConfInput::Bytes(b) => b.clone(),
            ConfInput::Mutated {
                version,
                extra,
                mutations,
                byte_mutations,
            } => {
                let mut conf = self.node.conf();
                conf["cniVersion"] = (*version).into();
                for (k, v) in extra {
                    conf[*k] = v.clone();
                }
                for m in mutations {
                    apply(&mut conf, m);
                }
                let mut bytes = serde_json::to_vec(&conf).expect("values serialise");
                for m in byte_mutations {
                    apply_bytes(&mut bytes, m);
                }
                bytes
            }
        };
        let Ok(Value::Object(parsed)) = serde_json::from_slice::<Value>(&bytes) else {
            return Some(bytes);
        };
        let ours = [self.node.socket(), self.dead_socket()];
        match parsed.get("agentSocket") {
            Some(Value::String(s))
                if s.starts_with('/') && !ours.iter().any(|o| o == Path::new(s)) =>
            {
                None
            }
            None => None,
            _ => Some(bytes),
        }
    }

    fn netns(&self, arg: &NetnsArg) -> Option<String> {
        match arg {
            NetnsArg::Pod => Some(self.pod.path().display().to_string()),
            NetnsArg::Own => Some("/proc/self/ns/net".into()),
            NetnsArg::Missing => None,
            NetnsArg::Empty => Some(String::new()),
            NetnsArg::Nonexistent => Some("/run/netns/pwlab-does-not-exist".into()),
            NetnsArg::File => Some(self.scratch.path().join("file").display().to_string()),
            NetnsArg::Dir => Some(self.scratch.path().display().to_string()),
            NetnsArg::Odd(s) => Some(s.clone()),
        }
    }

    /// Execs the plugin in the node with `env` (CNI_PATH set unless given) and `stdin`, killing
    /// it after 30 s; its exit status, stdout and stderr.
    fn exec(
        &self,
        env: &[(&str, Option<String>)],
        stdin: &[u8],
    ) -> Result<(std::process::ExitStatus, String, String)> {
        let mut cmd: Command = self.node.command(&self.plugin);
        cmd.env(
            "CNI_PATH",
            self.plugin.parent().context("the plugin's directory")?,
        );
        for (k, v) in env {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting podwire-cni")?;
        let mut input = child.stdin.take().context("stdin")?;
        let mut stdout = child.stdout.take().context("stdout")?;
        let mut stderr = child.stderr.take().context("stderr")?;
        let stdin = stdin.to_vec();
        // The plugin may exit before reading its input: a write error is no failure.
        let writer = std::thread::spawn(move || {
            let _ = input.write_all(&stdin);
        });
        let out = std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = stdout.read_to_end(&mut s);
            s
        });
        let err = std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = stderr.read_to_end(&mut s);
            s
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("podwire-cni still running after 30 s");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let _ = writer.join();
        let out = out.join().expect("reader thread");
        let err = err.join().expect("reader thread");
        Ok((
            status,
            String::from_utf8_lossy(&out).trim().to_owned(),
            String::from_utf8_lossy(&err).into_owned(),
        ))
    }

    /// Fails unless the node holds nothing: no link but loopback in the node or the pod, no
    /// endpoint map entry, no address in the agent's state, and the agent answering.
    fn holds_nothing(&self) -> Result<()> {
        for (ns, what) in [(&self.node.ns, "node"), (&self.pod, "pod")] {
            let names = faults::interfaces(ns)?;
            ensure!(
                names.is_empty(),
                "links left in the {what}: {}",
                short(&format!("{names:?}"))
            );
        }
        let entries = self.node.endpoints()?;
        ensure!(
            entries.is_empty(),
            "endpoint entries left: {}",
            short(&format!("{entries:?}"))
        );
        // An agent that never allocated may not have written its state yet.
        if self.node.state_dir.path().join("state.json").exists() {
            let state = self.node.state()?;
            ensure!(
                state["endpoints"] == json!({}),
                "addresses still held: {}",
                short(&state["endpoints"].to_string())
            );
        }
        agent_answers_status(&self.node.socket())
    }
}

#[test]
fn fuzz_cni_config_and_environment() -> Result<()> {
    let bench = RefCell::new(CniBench::new()?);
    bench.borrow().holds_nothing()?;
    fuzz("CNI", cni_case(), |case: CniCase| {
        let mut bench = bench.borrow_mut();
        if bench.holds_nothing().is_err() {
            // A failed case left something: a fresh node, so that shrinking finds the input
            // that leaks rather than one that merely runs after it.
            *bench = CniBench::new()?;
        }
        let bench = &*bench;
        let Some(conf) = bench.conf(&case.conf) else {
            // Could reach another agent: not run.
            return Ok(());
        };
        let env = [
            ("CNI_COMMAND", case.command.clone()),
            ("CNI_CONTAINERID", case.container_id.clone()),
            ("CNI_IFNAME", case.ifname.clone()),
            ("CNI_NETNS", bench.netns(&case.netns)),
            ("CNI_ARGS", case.cni_args.clone()),
        ];
        let conf_text = short(&String::from_utf8_lossy(&conf));
        let mut added = false;
        for run in 1..=if case.twice { 2 } else { 1 } {
            let (status, stdout, stderr) = bench.exec(&env, &conf)?;
            let said = format!(
                "run {run}: conf {conf_text}\nstdout {}\nstderr {}",
                short(&stdout),
                short(&stderr)
            );
            match status.code() {
                Some(0) => {
                    if !stdout.is_empty() {
                        serde_json::from_str::<Value>(&stdout).with_context(|| {
                            format!("success output is not one JSON value; {said}")
                        })?;
                    }
                }
                Some(1) => {
                    let error: Value = serde_json::from_str(&stdout)
                        .with_context(|| format!("error output is not one JSON object; {said}"))?;
                    ensure!(
                        error["code"].is_u64() && error["msg"].is_string(),
                        "error object without a numeric code and a msg; {said}"
                    );
                }
                _ => bail!("exit {status} (signal {:?}); {said}", status.signal()),
            }
            added |= status.success() && case.command.as_deref() == Some("ADD");
        }
        if added {
            // It added a pod: DEL with the node's own configuration must remove all of it.
            let env = [
                ("CNI_COMMAND", Some("DEL".to_owned())),
                ("CNI_CONTAINERID", case.container_id.clone()),
                ("CNI_IFNAME", case.ifname.clone()),
                ("CNI_NETNS", bench.netns(&case.netns)),
                ("CNI_ARGS", None),
            ];
            let (del, out, err) = bench.exec(&env, bench.node.conf().to_string().as_bytes())?;
            ensure!(
                del.success(),
                "DEL after a successful ADD: {out} {err}; conf {conf_text}"
            );
        }
        bench
            .holds_nothing()
            .with_context(|| format!("after {case:?}, conf {conf_text}"))
    })
}
