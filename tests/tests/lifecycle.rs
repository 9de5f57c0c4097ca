//! A pod endpoint's lifecycle when the runtime or the node misbehaves: ADD repeated for a running
//! pod, GC without the runtime's list, GC of another network, GC that meets errors, and the
//! agent's Register told to wire something that is not the attachment's veth or unable to record
//! what it wired, and CHECK where tc programs are netlink filters (kernels before 6.6).

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use podwire_core::{
    api::{self, ClientError, Reply, Request},
    endpoint::Attachment,
    mac::Mac,
};
use podwire_lab::{
    cni::{pod_ip, Pod},
    namespaces::NetNs,
    nodes::{Node, Underlay},
    processes::{run, Daemon},
    traffic::{ping, tcp_echo},
};
use serde_json::Value;

const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 10);
const POD_CIDR: &str = "10.244.0.0/24";

fn node() -> Result<Node> {
    Node::start(NODE_IP, POD_CIDR)
}

fn attachment(container_id: &str) -> Attachment {
    Attachment {
        container_id: container_id.into(),
        ifname: "eth0".into(),
    }
}

/// The CNI_* variables of `container_id` (interface eth0) in `pod`.
fn env<'a>(container_id: &'a str, netns: &'a str) -> [(&'a str, &'a str); 3] {
    [
        ("CNI_CONTAINERID", container_id),
        ("CNI_IFNAME", "eth0"),
        ("CNI_NETNS", netns),
    ]
}

/// Everything a node holds for its pods, to compare before and after.
#[derive(Debug, PartialEq)]
struct Held {
    state: Value,
    endpoints: Vec<(Ipv4Addr, String)>,
    veths: Vec<String>,
    links: Vec<String>,
}

impl Held {
    fn of(node: &Node) -> Result<Held> {
        Ok(Held {
            state: node.state()?["endpoints"].clone(),
            endpoints: node
                .endpoints()?
                .into_iter()
                .map(|(ip, e)| (ip, format!("{e:?}")))
                .collect(),
            veths: node.host_veths()?,
            links: pinned_links(node)?,
        })
    }
}

/// Names of the links pinned below the node's pin root (`<program>-<interface>`).
fn pinned_links(node: &Node) -> Result<Vec<String>> {
    let dir = node.pins().links_dir();
    let mut names: Vec<String> = match std::fs::read_dir(&dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        entries => entries?
            .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
            .collect::<Result<_>>()?,
    };
    names.sort();
    Ok(names)
}

/// Whether the agent's state holds an address for `container_id`, and which.
fn held_ip(node: &Node, container_id: &str) -> Result<Option<Ipv4Addr>> {
    let state = node.state()?;
    state["endpoints"][format!("{container_id}/eth0")]["ip"]
        .as_str()
        .map(str::parse)
        .transpose()
        .context("an address in the state")
}

#[test]
fn a_repeated_add_returns_the_same_result_and_the_pod_keeps_working() -> Result<()> {
    let node = node()?;
    let peer = node.add_pod("c-again-peer")?;
    let pod = node.add_pod("c-again")?;
    assert!(ping(&pod.ns, peer.ip)?);
    tcp_echo(&pod.ns, &peer.ns, peer.ip, 64 * 1024)?;
    let before = Held::of(&node)?;

    // The runtime repeats ADD (a kubelet restart, a lost answer): nothing may change.
    let again = node.cni_pod("ADD", "c-again", Some(&pod.ns))?;
    let result = again.expect_success().context("ADD again")?;
    assert_eq!(pod_ip(&result)?, pod.ip, "the same address");
    assert_eq!(result, pod.result, "the same result");
    assert_eq!(
        Held::of(&node)?,
        before,
        "state, map, veths and links unchanged"
    );
    assert!(ping(&pod.ns, peer.ip)?, "the pod still reaches its peer");
    assert!(ping(&peer.ns, pod.ip)?, "and its peer reaches it");
    tcp_echo(&pod.ns, &peer.ns, peer.ip, 64 * 1024)?;
    tcp_echo(&peer.ns, &pod.ns, pod.ip, 64 * 1024)?;
    Ok(())
}

#[test]
fn a_repeated_add_that_fails_keeps_the_address_the_pod_holds_and_a_third_repairs_it() -> Result<()>
{
    let node = node()?;
    let peer = node.add_pod("c-repair-peer")?;
    let pod = node.add_pod("c-repair")?;
    // The pod's interface is gone (its veth peer with it): ADD again must wire it anew.
    pod.ns.ip(&["link", "del", "eth0"])?;
    let netns = pod.ns.path().display().to_string();
    let mut failing = env("c-repair", &netns).to_vec();
    failing.push(("PODWIRE_FAULT", "cni.add.after-veth:error"));
    let msg = node
        .cni("ADD", &failing, node.conf().to_string().as_bytes())?
        .expect_error(5)?;
    assert!(msg.contains("injected fault"), "{msg}");
    assert_eq!(
        held_ip(&node, "c-repair")?,
        Some(pod.ip),
        "a failed ADD releases no address it did not allocate"
    );
    assert_eq!(
        node.host_veths()?,
        [peer.host_veth()?],
        "the veth the failed ADD made is gone"
    );

    let result = node
        .cni_pod("ADD", "c-repair", Some(&pod.ns))?
        .expect_success()
        .context("ADD once more")?;
    assert_eq!(pod_ip(&result)?, pod.ip, "the pod keeps its address");
    assert!(ping(&pod.ns, peer.ip)?, "the repaired pod reaches its peer");
    tcp_echo(&peer.ns, &pod.ns, pod.ip, 64 * 1024)?;
    Ok(())
}

#[test]
fn gc_without_the_runtimes_list_of_valid_attachments_is_refused_and_removes_nothing() -> Result<()>
{
    let node = node()?;
    let pods = (0..2)
        .map(|i| node.add_pod(&format!("c-nolist-{i}")))
        .collect::<Result<Vec<Pod>>>()?;
    let before = Held::of(&node)?;
    let msg = node
        .cni("GC", &[], node.conf().to_string().as_bytes())?
        .expect_error(7)?;
    assert!(msg.contains("cni.dev/valid-attachments"), "{msg}");
    assert_eq!(Held::of(&node)?, before, "nothing removed");
    assert!(ping(&pods[0].ns, pods[1].ip)?);

    // The spec's first wording of the key, which libcni also sends, is read as well.
    let mut conf = node.conf();
    conf["cni.dev/attachments"] =
        serde_json::json!([{ "containerID": "c-nolist-0", "ifname": "eth0" }]);
    let gc = node.cni("GC", &[], conf.to_string().as_bytes())?;
    assert!(gc.success, "GC: {gc:?}");
    assert_eq!(held_ip(&node, "c-nolist-0")?, Some(pods[0].ip));
    assert_eq!(held_ip(&node, "c-nolist-1")?, None);
    Ok(())
}

#[test]
fn gc_of_another_network_using_podwire_leaves_this_networks_pods() -> Result<()> {
    let node = node()?;
    let pods = (0..2)
        .map(|i| node.add_pod(&format!("c-net-{i}")))
        .collect::<Result<Vec<Pod>>>()?;
    let name = node.conf()["name"].clone();
    assert_eq!(
        node.state()?["endpoints"]["c-net-0/eth0"]["network"],
        name,
        "the endpoint is recorded under its network's name"
    );
    let before = Held::of(&node)?;

    // A second conflist using podwire, whose runtime knows none of its own attachments.
    let mut other = node.conf();
    other["name"] = "podwire-other".into();
    other["cni.dev/valid-attachments"] = serde_json::json!([]);
    let gc = node.cni("GC", &[], other.to_string().as_bytes())?;
    assert!(gc.success, "GC of the other network: {gc:?}");
    assert_eq!(
        Held::of(&node)?,
        before,
        "another network's GC removed nothing"
    );
    assert!(ping(&pods[0].ns, pods[1].ip)?);

    // This network's own GC still collects what its runtime no longer lists.
    let mut own = node.conf();
    own["cni.dev/valid-attachments"] =
        serde_json::json!([{ "containerID": "c-net-0", "ifname": "eth0" }]);
    let gc = node.cni("GC", &[], own.to_string().as_bytes())?;
    assert!(gc.success, "GC of this network: {gc:?}");
    assert_eq!(held_ip(&node, "c-net-0")?, Some(pods[0].ip));
    assert_eq!(held_ip(&node, "c-net-1")?, None);
    Ok(())
}

/// A directory at a pinned link's path, which the agent cannot unpin: a real error for GC to
/// meet. Removed on drop.
struct Blocker(PathBuf);

impl Blocker {
    fn at(path: PathBuf) -> Result<Blocker> {
        std::fs::create_dir_all(path.parent().context("a pin has a directory")?)?;
        std::fs::create_dir(&path).with_context(|| format!("mkdir {}", path.display()))?;
        Ok(Blocker(path))
    }
}

impl Drop for Blocker {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn gc_goes_on_past_an_error_reports_it_and_removes_veths_never_registered() -> Result<()> {
    let node = node()?;
    let keep = node.add_pod("c-gc-keep")?;
    let stale = node.add_pod("c-gc-stale")?;
    // Two ADDs whose plugin died after making the veth, before registering it.
    let half: Vec<NetNs> = ["c-gc-a-half", "c-gc-z-half"]
        .iter()
        .map(|id| {
            let ns = NetNs::new("pod")?;
            let netns = ns.path().display().to_string();
            let mut killed = env(id, &netns).to_vec();
            killed.push(("PODWIRE_FAULT", "cni.add.after-veth:kill"));
            let out = node.cni("ADD", &killed, node.conf().to_string().as_bytes())?;
            assert!(!out.success, "the plugin was killed: {out:?}");
            Ok(ns)
        })
        .collect::<Result<_>>()?;
    let half_veths = ["c-gc-a-half", "c-gc-z-half"].map(|id| attachment(id).host_ifname());
    for veth in &half_veths {
        assert!(node.host_veths()?.contains(veth), "{veth} was made");
    }
    // The first of them cannot be cleaned completely.
    let blocked = Blocker::at(
        node.pins()
            .link("from_pod", &attachment("c-gc-a-half").host_ifname()),
    )?;

    let mut conf = node.conf();
    conf["cni.dev/valid-attachments"] =
        serde_json::json!([{ "containerID": "c-gc-keep", "ifname": "eth0" }]);
    let msg = node
        .cni("GC", &[], conf.to_string().as_bytes())?
        .expect_error(5)?;
    assert!(msg.contains("c-gc-a-half"), "the failure is named: {msg}");
    assert!(
        !msg.contains("c-gc-z-half") && !msg.contains("c-gc-stale"),
        "only what failed is reported: {msg}"
    );
    let veths = node.host_veths()?;
    assert_eq!(veths, [keep.host_veth()?], "every stale veth deleted");
    assert_eq!(held_ip(&node, "c-gc-stale")?, None, "past the error");
    assert_eq!(held_ip(&node, "c-gc-z-half")?, None, "past the error");
    assert!(
        held_ip(&node, "c-gc-a-half")?.is_some(),
        "what failed stays recorded, for the next GC"
    );
    let ips: Vec<Ipv4Addr> = node.endpoints()?.into_iter().map(|(ip, _)| ip).collect();
    assert_eq!(ips, [keep.ip]);

    drop(blocked);
    let gc = node.cni("GC", &[], conf.to_string().as_bytes())?;
    assert!(gc.success, "the next GC finishes the job: {gc:?}");
    assert_eq!(held_ip(&node, "c-gc-a-half")?, None);
    let links: Vec<String> = pinned_links(&node)?;
    let keep_veth = keep.host_veth()?;
    assert!(
        links.iter().all(|l| l.ends_with(keep_veth)),
        "only the kept pod's links stay pinned: {links:?}"
    );
    assert!(ping(&node.ns, keep.ip)?, "the kept pod still works");
    drop((stale, half));
    Ok(())
}

/// Register, as any local root process can send it.
fn register(node: &Node, container_id: &str, host_ifname: &str) -> Result<Reply, ClientError> {
    let zero = Mac([0x0a, 0x58, 0, 0, 0, 1]);
    api::call(
        &node.socket(),
        &Request::Register {
            attachment: attachment(container_id),
            host_ifname: host_ifname.into(),
            host_mac: zero,
            pod_mac: zero,
        },
    )
}

fn allocate(node: &Node, container_id: &str, netns: &NetNs) -> Result<Ipv4Addr> {
    match api::call(
        &node.socket(),
        &Request::Allocate {
            attachment: attachment(container_id),
            netns: netns.path().display().to_string(),
            network: None,
        },
    )? {
        Reply::Allocated { ip, .. } => Ok(ip),
        other => anyhow::bail!("unexpected answer {other:?}"),
    }
}

#[test]
fn register_refuses_an_interface_that_is_not_the_attachments_veth() -> Result<()> {
    let underlay = Underlay::new()?;
    let node_ns = underlay.plug("node", NODE_IP, false)?;
    let host = underlay.plug("host", Ipv4Addr::new(192, 168, 77, 20), false)?;
    let node = Node::start_in(
        node_ns,
        NODE_IP,
        vec!["--pod-cidr".into(), POD_CIDR.into()],
        None,
    )?;
    assert!(ping(&host, NODE_IP)?, "the node is reachable");
    let pod = NetNs::new("pod")?;
    allocate(&node, "c-evil", &pod)?;

    // The node's uplink.
    let err = register(&node, "c-evil", "eth0").expect_err("eth0 is not c-evil's veth");
    let msg = err.to_string();
    assert!(
        msg.contains("eth0") && msg.contains(&attachment("c-evil").host_ifname()),
        "names the interface and the one expected: {msg}"
    );
    assert!(pinned_links(&node)?.is_empty(), "nothing attached");
    assert!(node.endpoints()?.is_empty(), "no map entry");
    assert!(ping(&host, NODE_IP)?, "the node's own traffic still flows");

    // The right name, but not a veth.
    let name = attachment("c-evil").host_ifname();
    node.ns.ip(&["link", "add", &name, "type", "bridge"])?;
    let msg = register(&node, "c-evil", &name)
        .expect_err("a dummy is not a veth")
        .to_string();
    assert!(msg.contains("veth"), "{msg}");
    assert!(pinned_links(&node)?.is_empty(), "nothing attached");
    assert!(node.endpoints()?.is_empty(), "no map entry");
    Ok(())
}

/// Makes a directory immutable (so not even root can create files in it) until dropped.
struct Immutable(PathBuf);

impl Immutable {
    fn set(dir: &Path) -> Result<Immutable> {
        run(std::process::Command::new("chattr").arg("+i").arg(dir))?;
        Ok(Immutable(dir.to_owned()))
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chattr")
            .arg("-i")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn register_that_cannot_record_the_wiring_leaves_no_link_or_map_entry() -> Result<()> {
    let node = node()?;
    let pod = NetNs::new("pod")?;
    let ip = allocate(&node, "c-unrecorded", &pod)?;
    let name = attachment("c-unrecorded").host_ifname();
    node.ns.add_veth(&name, &pod, "eth0", None)?;
    node.ns.ip(&["link", "set", &name, "up"])?;

    let disk = Immutable::set(node.state_dir.path())?;
    let msg = register(&node, "c-unrecorded", &name)
        .expect_err("the state cannot be written")
        .to_string();
    drop(disk);
    assert!(msg.contains("state"), "says what failed: {msg}");
    assert!(pinned_links(&node)?.is_empty(), "no link left pinned");
    assert!(
        node.endpoints()?.iter().all(|(e, _)| *e != ip),
        "no map entry left"
    );
    // And once the disk is back, DEL clears the rest.
    let netns = pod.path().display().to_string();
    let del = node.cni(
        "DEL",
        &env("c-unrecorded", &netns),
        node.conf().to_string().as_bytes(),
    )?;
    assert!(del.success, "DEL: {del:?}");
    assert_eq!(held_ip(&node, "c-unrecorded")?, None);
    assert!(node.host_veths()?.is_empty());
    Ok(())
}

/// Kernels before 6.6 attach tc programs as netlink filters, with no link to pin: CHECK must
/// still find a program that is not there. `PODWIRE_TC_ATTACH=netlink` makes this kernel's agent
/// attach that way.
#[test]
fn check_finds_a_missing_filter_where_tc_programs_are_netlink_filters() -> Result<()> {
    let mut node = node()?;
    node.stop_agent()?;
    let mut cmd = node.agent_command()?;
    cmd.env("PODWIRE_TC_ATTACH", "netlink");
    let mut agent = Daemon::spawn(cmd, None)?;
    agent.wait_for_line("serving CNI requests")?;

    let pod = node.add_pod("c-netlink-check")?;
    let veth = pod.host_veth()?.to_owned();
    assert!(pinned_links(&node)?.is_empty(), "netlink filters, no links");
    let mut conf = node.conf();
    conf["prevResult"] = pod.result.clone();
    let netns = pod.ns.path().display().to_string();
    let env = env("c-netlink-check", &netns);
    let ok = node.cni("CHECK", &env, conf.to_string().as_bytes())?;
    assert!(ok.success, "CHECK of a wired pod: {ok:?}");

    // from_pod's filter goes (what a restart that detached and failed to attach again leaves).
    run(node
        .command("tc")
        .args(["filter", "del", "dev", &veth, "ingress"]))?;
    let msg = node
        .cni("CHECK", &env, conf.to_string().as_bytes())?
        .expect_error(100)?;
    assert!(
        msg.contains("from_pod") && msg.contains(&veth),
        "names the program and the veth: {msg}"
    );
    drop(agent);
    Ok(())
}
