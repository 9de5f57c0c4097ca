//! What is pinned in bpffs outlives the agent, and so must survive whatever the node does
//! meanwhile: a link whose device was deleted, a map pinned by an agent of another layout or
//! capacity, an older map version left behind by an upgrade, a kernel without TCX (netlink tc
//! filters, replaced in place on restart, never detached).
//!
//! Every test here holds [`serial`]: the netlink-mode test sets `PODWIRE_TC_ATTACH` for this
//! process (and so for the agents it starts), which must not leak into the others.

use std::{
    net::{Ipv4Addr, UdpSocket},
    path::Path,
    process::Command,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Mutex, MutexGuard,
    },
    thread,
    time::Duration,
};

use anyhow::{bail, ensure, Context as _, Result};
use aya::maps::MapInfo;
use podwire_common::{Endpoint, Reason, MAX_ENDPOINTS};
use podwire_core::{object::maps, pins::Pins};
use podwire_datapath::{
    attach::remove_severed_links, Datapath, DatapathMap as _, Hook, LoadOptions,
};
use podwire_lab::{
    artifacts, eventually,
    namespaces::NetNs,
    nodes::{Cluster, ClusterSpec, Node, NodeAndPod, PinRoot},
    packets::udp_v4_ports,
    processes::{run, Daemon},
    require_root,
    traffic::{ping, RawSender},
};

/// Serialises this file's tests (see the module's documentation).
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// How long a restarted agent may take to carry traffic again.
const SETTLE: Duration = Duration::from_secs(20);

#[test]
fn an_agent_restarts_after_its_overlay_device_was_deleted() -> Result<()> {
    let _serial = serial();
    let mut c = Cluster::start(ClusterSpec {
        nodes: 2,
        ..ClusterSpec::default()
    })?;
    let a = c.nodes[0].add_pod("c-severed-a")?;
    let b = c.nodes[1].add_pod("c-severed-b")?;
    assert!(ping(&a.ns, b.ip)?, "ping across nodes before the restart");

    let node = &mut c.nodes[0];
    node.stop_agent()?;
    // The pinned links of the device's tc hooks outlive it, severed from any device.
    node.ns.ip(&["link", "del", "pw-vxlan"])?;
    node.start_agent()
        .context("the agent starts again after its VXLAN device was deleted")?;

    for (from, to) in [(&a, &b), (&b, &a)] {
        assert!(
            eventually(SETTLE, || ping(&from.ns, to.ip))?,
            "ping {} -> {} after the restart",
            from.ip,
            to.ip
        );
    }
    Ok(())
}

/// `node` and its pod with the datapath loaded, maps pinned below `pins`.
fn pinned_datapath(pins: &Pins) -> Result<Datapath> {
    let object = artifacts::object()?;
    Datapath::load(
        object.bytes(),
        LoadOptions {
            pins: Some(pins),
            ..LoadOptions::default()
        },
    )
    .context("loading the datapath with pinned maps")
}

#[test]
fn a_pinned_link_whose_device_was_recreated_is_attached_afresh() -> Result<()> {
    let _serial = serial();
    let net = NodeAndPod::new()?;
    let root = PinRoot::new();
    let pins = root.pins();
    let mut datapath = pinned_datapath(&pins)?;
    let hook = Hook::from_pod(NodeAndPod::HOST_IF);
    let pin = hook.pin(&pins);
    net.node
        .run(|| datapath.attach_pinned(hook, &pin))?
        .context("attaching from_pod")?;

    // The pod's veth pair goes, and one of the same name comes back (a pod recreated while the
    // agent was down): the pinned link is severed.
    net.node.ip(&["link", "del", NodeAndPod::HOST_IF])?;
    net.node
        .add_veth(NodeAndPod::HOST_IF, &net.pod, NodeAndPod::POD_IF, None)?;
    net.node
        .run(|| datapath.attach_pinned(hook, &pin))?
        .context("attaching from_pod over the severed link pinned for it")?;

    let attached = net
        .node
        .run(|| podwire_datapath::attach::attached(hook, &pins))??;
    assert!(attached, "from_pod is attached to the new {}", hook.iface);
    assert_eq!(
        remove_severed_links(&pins)?,
        Vec::<std::path::PathBuf>::new(),
        "no severed link is left pinned"
    );
    Ok(())
}

#[test]
fn severed_links_are_unpinned_and_live_ones_kept() -> Result<()> {
    let _serial = serial();
    let net = NodeAndPod::new()?;
    net.node.add_veth("host1", &net.pod, "eth1", None)?;
    let root = PinRoot::new();
    let pins = root.pins();
    let mut datapath = pinned_datapath(&pins)?;
    // Device hooks: they are the ones with pinned TCX links (pods' veths get netlink filters).
    for iface in [NodeAndPod::HOST_IF, "host1"] {
        for hook in Hook::overlay(iface) {
            net.node
                .run(|| datapath.attach_pinned(hook, &hook.pin(&pins)))?
                .with_context(|| format!("attaching {} to {iface}", hook.program))?;
        }
    }
    net.node.ip(&["link", "del", "host1"])?;

    let mut removed = remove_severed_links(&pins)?;
    removed.sort();
    let mut expected: Vec<_> = Hook::overlay("host1")
        .iter()
        .map(|h| h.pin(&pins))
        .collect();
    expected.sort();
    assert_eq!(
        removed, expected,
        "the links of the deleted veth are unpinned"
    );
    for hook in Hook::overlay("host1") {
        assert!(
            !hook.pin(&pins).exists(),
            "{} unpinned",
            hook.pin(&pins).display()
        );
    }
    for hook in Hook::overlay(NodeAndPod::HOST_IF) {
        assert!(
            hook.pin(&pins).exists(),
            "{} kept",
            hook.pin(&pins).display()
        );
        let attached = net
            .node
            .run(|| podwire_datapath::attach::attached(hook, &pins))??;
        assert!(
            attached,
            "{} still attached to {}",
            hook.program, hook.iface
        );
    }
    assert!(
        !net.node
            .run(|| podwire_datapath::attach::attached(Hook::from_pod("host1"), &pins))??,
        "nothing is attached to a deleted veth"
    );
    Ok(())
}

/// Pins a hash map at `path` with bpftool: another agent's idea of a map.
fn pin_hash_map(path: &Path, key: usize, value: usize, entries: u32) -> Result<()> {
    std::fs::create_dir_all(path.parent().expect("a pin has a directory"))?;
    let name = path
        .file_name()
        .expect("a pin has a name")
        .to_string_lossy();
    run(Command::new("bpftool").args([
        "map",
        "create",
        &path.display().to_string(),
        "type",
        "hash",
        "key",
        &key.to_string(),
        "value",
        &value.to_string(),
        "entries",
        &entries.to_string(),
        "name",
        &name,
    ]))?;
    Ok(())
}

#[test]
fn a_pinned_map_of_another_layout_or_capacity_is_refused() -> Result<()> {
    let _serial = serial();
    require_root()?;
    let endpoint = std::mem::size_of::<Endpoint>();
    for (what, value, entries) in [
        ("value size", endpoint + 4, MAX_ENDPOINTS),
        ("capacity", endpoint, MAX_ENDPOINTS / 2),
    ] {
        let root = PinRoot::new();
        let pins = root.pins();
        let path = pins.map(maps::ENDPOINTS);
        pin_hash_map(&path, 4, value, entries)?;
        let err = match pinned_datapath(&pins) {
            Ok(_) => bail!(
                "{what}: the datapath loaded over {} pinned with value {value} and {entries} \
                 entries, where the object has value {endpoint} and {MAX_ENDPOINTS} entries",
                path.display()
            ),
            Err(e) => format!("{e:#}"),
        };
        for needle in [
            maps::ENDPOINTS.to_owned(),
            path.display().to_string(),
            format!("value {value} B, {entries} entries"),
            format!("value {endpoint} B, {MAX_ENDPOINTS} entries"),
            format!("rm {}", path.display()),
        ] {
            assert!(
                err.contains(&needle),
                "{what}: {needle:?} in the error: {err}"
            );
        }
        // Refused before anything was changed: the pin is the one it was.
        let info = MapInfo::from_pin(&path)?;
        assert_eq!(
            (info.value_size() as usize, info.max_entries()),
            (value, entries)
        );
    }
    Ok(())
}

#[test]
fn loading_removes_pins_of_older_map_versions() -> Result<()> {
    let _serial = serial();
    require_root()?;
    let root = PinRoot::new();
    let pins = root.pins();
    // The endpoint map earlier agents pinned: 4096 entries, as ENDPOINTS_V1.
    let old = pins.map("ENDPOINTS_V1");
    pin_hash_map(&old, 4, std::mem::size_of::<Endpoint>(), 4096)?;

    let mut datapath = pinned_datapath(&pins)?;
    assert!(!old.exists(), "{} is unpinned", old.display());
    let info = MapInfo::from_pin(pins.map(maps::ENDPOINTS))?;
    assert_eq!(
        info.max_entries(),
        65536,
        "{} holds 64k endpoints",
        maps::ENDPOINTS
    );
    // Every map the object uses is pinned, and nothing else.
    let mut pinned: Vec<String> = std::fs::read_dir(pins.maps_dir())?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_>>()?;
    pinned.sort();
    let mut expected: Vec<String> = maps::PINNED.iter().map(|s| s.to_string()).collect();
    expected.sort();
    assert_eq!(pinned, expected);
    // And the new map is the one the datapath writes.
    datapath
        .endpoints
        .set(Ipv4Addr::new(10, 244, 1, 2), Endpoint::default())?;
    let reopened = podwire_datapath::Endpoints::open(&pins)?;
    assert_eq!(reopened.list()?.len(), 1);
    Ok(())
}

/// The pid of the agent running with the pin root `pins` (unique per node).
fn agent_pid(pins: &Path) -> Result<i32> {
    for entry in std::fs::read_dir("/proc")? {
        let entry = entry?;
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        let is_agent = args.first().is_some_and(|a| a.ends_with(b"podwire-agent"));
        if is_agent && args.contains(&pins.as_os_str().as_encoded_bytes()) {
            return Ok(pid);
        }
    }
    bail!("no podwire-agent running with --bpffs {}", pins.display())
}

/// Sets `PODWIRE_TC_ATTACH` for this process and the agents it starts, until dropped.
struct TcAttachMode;

impl TcAttachMode {
    fn netlink() -> TcAttachMode {
        std::env::set_var("PODWIRE_TC_ATTACH", "netlink");
        TcAttachMode
    }
}

impl Drop for TcAttachMode {
    fn drop(&mut self) {
        std::env::remove_var("PODWIRE_TC_ATTACH");
    }
}

/// The tc filters on `hook` of `iface` in `ns`, as `tc filter show` prints them.
fn tc_filters(ns: &NetNs, iface: &str, hook: &str) -> Result<String> {
    let out = run(ns
        .command("tc")
        .args(["filter", "show", "dev", iface, hook]))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn without_tcx_a_restart_replaces_from_pod_in_place_under_a_spoofing_flood() -> Result<()> {
    let _serial = serial();
    let _mode = TcAttachMode::netlink();
    const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 1);
    let mut node = Node::start(NODE_IP, "10.244.1.0/24")?;
    let a = node.add_pod("c-flood-a")?;
    let b = node.add_pod("c-flood-b")?;
    let veth = a.host_veth()?.to_owned();
    let filters = tc_filters(&node.ns, &veth, "ingress")?;
    ensure!(
        filters.contains("from_pod"),
        "netlink mode: from_pod is a tc filter on {veth}: {filters:?}"
    );
    assert!(
        !Hook::from_pod(&veth).pin(&node.pins()).exists(),
        "netlink mode pins no TCX link"
    );

    // The node's socket both legit and spoofed datagrams aim at; the node would take spoofed
    // ones (no reverse-path filter), so only from_pod keeps them out.
    for iface in ["all", "default", veth.as_str()] {
        node.ns
            .sysctl_ipv4(&format!("conf.{iface}.rp_filter"), "0")?;
    }
    let receiver = node.ns.run(|| UdpSocket::bind((NODE_IP, 0)))??;
    let port = receiver.local_addr()?.port();
    receiver.set_read_timeout(Some(Duration::from_millis(500)))?;

    // Every notification about the node's tc filters while the agent restarts.
    let mut monitor = Daemon::spawn(
        {
            // Daemon collects stderr.
            let mut cmd = node.ns.command("sh");
            cmd.args(["-c", "exec stdbuf -oL tc monitor >&2"]);
            cmd
        },
        None,
    )?;
    thread::sleep(Duration::from_millis(300));

    let (_, pod_mac) = a.ns.link("eth0")?;
    let (_, gateway_mac) = node.ns.link(&veth)?;
    let mut spoofed = udp_v4_ports(pod_mac, b.ip, NODE_IP, (40000, port), b"spoofed");
    spoofed[..6].copy_from_slice(&gateway_mac);
    let stop = AtomicBool::new(false);
    let sent = AtomicU64::new(0);
    let spoofed_before = node.counter(Reason::DropSpoofedIp)?.packets;
    let received = thread::scope(|s| -> Result<u64> {
        let flood = s.spawn(|| a.ns.run(|| flood(&spoofed, &stop, &sent)));
        // Flooding before, during and after the restart.
        thread::sleep(Duration::from_millis(300));
        let pid = agent_pid(node.pins.path())?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )?;
        node.start_agent().context("restarting the agent")?;
        thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
        flood.join().expect("the flood does not panic")??;
        let mut received = 0;
        let mut buf = [0u8; 64];
        while let Ok((n, _)) = receiver.recv_from(&mut buf) {
            if &buf[..n] == b"spoofed" {
                received += 1;
            }
        }
        Ok(received)
    })?;
    let sent = sent.load(Ordering::Relaxed);
    ensure!(sent > 1000, "the flood sent {sent} frames only");
    assert_eq!(
        received, 0,
        "spoofed datagrams that reached the node of {sent} sent"
    );
    // A flood overruns the veth's backlog, which drops before tc: at most every frame counted.
    let dropped = node.counter(Reason::DropSpoofedIp)?.packets - spoofed_before;
    assert!(
        dropped > 0 && dropped <= sent,
        "{dropped} of {sent} spoofed frames dropped and counted by from_pod"
    );
    eprintln!("spoofing flood: {sent} frames sent, {dropped} dropped by from_pod, 0 delivered");

    let (_, log) = monitor_stop(&mut monitor)?;
    let about_veth: Vec<&String> = log.iter().filter(|l| l.contains(&veth)).collect();
    assert!(
        about_veth.iter().any(|l| l.contains("from_pod")),
        "the restart swapped from_pod on {veth} (tc monitor saw it): {log:#?}"
    );
    let deleted: Vec<&&String> = about_veth
        .iter()
        .filter(|l| l.starts_with("deleted"))
        .collect();
    assert!(
        deleted.is_empty(),
        "a filter on {veth} was deleted during the restart (a window without from_pod): \
         {deleted:#?}"
    );
    // One from_pod, in podwire's slot, whose program was swapped.
    let after = tc_filters(&node.ns, &veth, "ingress")?;
    let from_pod: Vec<&str> = after.lines().filter(|l| l.contains("from_pod")).collect();
    assert_eq!(
        from_pod.len(),
        1,
        "one from_pod filter on {veth}: {after:?}"
    );
    assert!(
        from_pod[0].contains("pref 1 ") && from_pod[0].contains("handle 0x7077 "),
        "from_pod at priority 1, handle 0x7077: {after:?}"
    );

    // Legit traffic flows: the pod's own datagrams reach the node, and pods reach each other.
    let sender = a.ns.run(|| UdpSocket::bind((a.ip, 0)))??;
    sender.send_to(b"legit", (NODE_IP, port))?;
    let mut buf = [0u8; 64];
    let (n, from) = receiver.recv_from(&mut buf).context("the pod's datagram")?;
    assert_eq!((&buf[..n], from.ip()), (&b"legit"[..], a.ip.into()));
    assert!(
        ping(&a.ns, b.ip)?,
        "ping between the pods after the restart"
    );

    // CHECK's question: is from_pod attached? Yes, until its filter is gone.
    let hook = Hook::from_pod(&veth);
    let pins = node.pins();
    assert!(node
        .ns
        .run(|| podwire_datapath::attach::attached(hook, &pins))??);
    run(node
        .ns
        .command("tc")
        .args(["filter", "del", "dev", &veth, "ingress"]))?;
    assert!(
        !node
            .ns
            .run(|| podwire_datapath::attach::attached(hook, &pins))??,
        "from_pod is not attached once its filter is deleted"
    );
    Ok(())
}

/// Stops `tc monitor`, returning what it printed.
fn monitor_stop(monitor: &mut Daemon) -> Result<(std::process::ExitStatus, Vec<String>)> {
    // Daemon::stop takes it by value; a stand-in takes its place.
    let taken = std::mem::replace(monitor, Daemon::spawn(Command::new("true"), None)?);
    taken.stop(nix::sys::signal::Signal::SIGTERM)
}

/// Sends `frame` out of the pod's eth0 as fast as it can until `stop`, counting into `sent`.
fn flood(frame: &[u8], stop: &AtomicBool, sent: &AtomicU64) -> Result<()> {
    let sender = RawSender::open("eth0").context("in the pod")?;
    while !stop.load(Ordering::Relaxed) {
        match sender.send(frame) {
            Ok(()) => {
                sent.fetch_add(1, Ordering::Relaxed);
            }
            // A full queue: the veth is busy, try again.
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {}
            Err(e) => return Err(e).context("sending a spoofed frame"),
        }
    }
    Ok(())
}
