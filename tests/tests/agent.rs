//! The podwire-agent binary as a developer runs it (`cargo xtask run -- --iface <veth>`): it loads
//! and attaches, logs what the programs see, and leaves nothing attached after SIGINT or SIGTERM.

use std::net::UdpSocket;

use anyhow::{Context as _, Result};
use aya::programs::{SchedClassifier, TcAttachType};
use nix::sys::signal::Signal;
use podwire_lab::{
    artifacts,
    namespaces::NetNs,
    nodes::NodeAndPod,
    processes::{run, Daemon},
};

/// Names of the BPF programs on tc ingress of `iface` in `ns`: its netlink tc filters (what a
/// pod's veth gets on every kernel) and its TCX links.
fn tc_ingress(ns: &NetNs, iface: &str) -> Result<Vec<String>> {
    let shown = run(ns
        .command("tc")
        .args(["-j", "filter", "show", "dev", iface, "ingress"]))?;
    let filters: serde_json::Value =
        serde_json::from_slice(&shown.stdout).with_context(|| format!("tc filters of {iface}"))?;
    let mut names: Vec<String> = filters
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f["options"]["bpf_name"].as_str().map(str::to_owned))
        .collect();
    let (_, links) = ns
        .run(|| SchedClassifier::query_tcx(iface, TcAttachType::Ingress))?
        .context("querying tcx ingress")?;
    names.extend(
        links
            .iter()
            .map(|p| p.name_as_str().unwrap_or("?").to_owned()),
    );
    Ok(names)
}

fn agent_in(net: &NodeAndPod) -> Result<Daemon> {
    let mut cmd = net.node.command(artifacts::bin("podwire-agent")?);
    cmd.args(["--iface", NodeAndPod::HOST_IF])
        .env("PODWIRE_LOG", "info,podwire=debug");
    Daemon::spawn(cmd, None)
}

fn attach_log_and_detach_on(signal: Signal) -> Result<()> {
    let net = NodeAndPod::new()?;
    let mut agent = agent_in(&net)?;
    agent.wait_for_line("attached from_pod to tc ingress")?;
    assert_eq!(tc_ingress(&net.node, NodeAndPod::HOST_IF)?, ["from_pod"]);

    // No pod is registered in developer mode, so from_pod drops the veth's traffic as spoofed:
    // its own log records, streamed through aya-log, say so for each packet. ARP from an
    // unregistered pod is dropped too, so the pod is given the node's MAC to send IPv4 at all.
    let (_, node_mac) = net.node.link(NodeAndPod::HOST_IF)?;
    let node_mac = podwire_core::mac::Mac(node_mac).to_string();
    net.pod.ip(&[
        "neigh",
        "add",
        &NodeAndPod::NODE_IP.to_string(),
        "lladdr",
        &node_mac,
        "dev",
        NodeAndPod::POD_IF,
        "nud",
        "permanent",
    ])?;
    let sender = net.pod.run(|| UdpSocket::bind((NodeAndPod::POD_IP, 0)))??;
    for _ in 0..3 {
        sender.send_to(b"ping", (NodeAndPod::NODE_IP, 9))?;
    }
    for _ in 0..3 {
        agent.wait_for_line("from_pod: drop, source 10.244.0.2 does not belong to ifindex")?;
    }

    let (status, rest) = agent.stop(signal)?;
    assert!(
        status.success(),
        "agent exit after {signal}: {status}; stderr:\n{}",
        rest.join("\n")
    );
    let all = rest.join("\n");
    assert!(
        all.contains(r#"reason="drop-spoofed-ip" packets=3 bytes=138"#),
        "final counters in the log:\n{all}"
    );
    assert!(all.contains("detached"), "{all}");
    assert_eq!(
        tc_ingress(&net.node, NodeAndPod::HOST_IF)?,
        Vec::<String>::new(),
        "nothing stays attached after {signal}"
    );
    Ok(())
}

#[test]
fn agent_attaches_logs_traffic_and_detaches_on_sigint() -> Result<()> {
    attach_log_and_detach_on(Signal::SIGINT)
}

#[test]
fn agent_attaches_logs_traffic_and_detaches_on_sigterm() -> Result<()> {
    attach_log_and_detach_on(Signal::SIGTERM)
}

#[test]
fn agent_names_a_missing_interface_and_attaches_nothing() -> Result<()> {
    let net = NodeAndPod::new()?;
    let mut cmd = net.node.command(artifacts::bin("podwire-agent")?);
    cmd.args(["--iface", NodeAndPod::HOST_IF, "--iface", "nosuch0"]);
    let (status, lines) = Daemon::spawn(cmd, None)?.wait()?;
    let all = lines.join("\n");
    assert!(!status.success(), "agent must fail: {all}");
    assert!(
        all.contains("attaching to nosuch0"),
        "error names the interface:\n{all}"
    );
    assert_eq!(
        tc_ingress(&net.node, NodeAndPod::HOST_IF)?,
        Vec::<String>::new(),
        "the interface attached before the error is detached again"
    );
    Ok(())
}
