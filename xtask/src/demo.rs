//! `cargo xtask demo`: a two-node cluster of podwire's lab (`podwire_lab::nodes::Cluster`), each
//! node running the podwire agent with IP forwarding off, so only podwire's eBPF path can carry
//! pod traffic. It shows pod-to-pod traffic on one node and across nodes (VXLAN, in kernel), a
//! spoofed packet dropped and reported, and what each node's datapath holds and counted, read
//! from its pinned maps with the `podwire` CLI.

use std::{net::UdpSocket, process::Output};

use anyhow::{ensure, Context as _, Result};
use podwire_lab::{
    cni::Pod,
    nodes::{Cluster, ClusterSpec, Node},
    traffic::tcp_transfer,
};

use crate::{build, toolchain::Needs};

const NODES: usize = 2;
const PODS_PER_NODE: usize = 2;
/// Bytes of each TCP transfer.
const TRANSFER: usize = 64 << 20;

pub fn run() -> Result<()> {
    let bins = build::all(false, Needs::Run)?.bins;
    podwire_lab::artifacts::set_bin_dir(&bins);
    let mut cluster = Cluster::start(ClusterSpec {
        nodes: NODES,
        agent_args: vec![],
        echo_agents: true,
    })?;
    let file = cluster.file();
    println!(
        "== cluster file {}:\n{}",
        file.display(),
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?
    );
    for (i, node) in cluster.nodes.iter().enumerate() {
        println!(
            "== {} (netns {}) at {} on the underlay bridge, pod CIDR {}, IP forwarding off, \
             agent serving CNI requests",
            Cluster::node_name(i),
            node.ns.name(),
            node.ip,
            Cluster::pod_cidr(i)
        );
    }

    // pods[i]: the pods of node i, container ids `node<i+1>-pod<p>`.
    let mut pods: Vec<Vec<Pod>> = Vec::new();
    for (i, node) in cluster.nodes.iter().enumerate() {
        let mut on_node = Vec::new();
        for p in 1..=PODS_PER_NODE {
            let pod = node.add_pod(&format!("{}-pod{p}", Cluster::node_name(i)))?;
            println!(
                "== CNI ADD {} (netns {}): {}/32, MTU {}",
                pod.container_id,
                pod.ns.name(),
                pod.ip,
                pod.result["interfaces"][1]["mtu"]
            );
            on_node.push(pod);
        }
        pods.push(on_node);
    }

    println!("== ping between every pair of pods (same node: redirected; across nodes: VXLAN)");
    for from in pods.iter().flatten() {
        for to in pods.iter().flatten() {
            if from.container_id == to.container_id {
                continue;
            }
            let out = from
                .ns
                .command("ping")
                .args(["-c", "2", "-i", "0.2", "-W", "2", &to.ip.to_string()])
                .output()
                .context("running ping")?;
            let summary = String::from_utf8_lossy(&out.stdout);
            let line = summary
                .lines()
                .find(|l| l.contains("received"))
                .unwrap_or("no reply");
            println!(
                "   {} -> {} ({}): {line}",
                from.container_id, to.container_id, to.ip
            );
            ensure!(
                out.status.success(),
                "ping {} -> {} failed",
                from.container_id,
                to.container_id
            );
        }
    }
    let client = &pods[0][0];
    for server in [&pods[0][1], &pods[1][0]] {
        let elapsed = tcp_transfer(&client.ns, &server.ns, server.ip, TRANSFER)
            .with_context(|| format!("TCP {} -> {}", client.container_id, server.container_id))?;
        println!(
            "== TCP {} -> {}: {} MiB arrived intact in {:.2} s",
            client.container_id,
            server.container_id,
            TRANSFER >> 20,
            elapsed.as_secs_f64()
        );
    }

    let (spoofer, victim, target) = (&pods[0][0], &pods[0][1], &pods[1][0]);
    println!(
        "== {} sends from {} ({}'s address): dropped, and reported",
        spoofer.container_id, victim.ip, victim.container_id
    );
    spoofer
        .ns
        .ip(&["addr", "add", &format!("{}/32", victim.ip), "dev", "eth0"])?;
    let socket = spoofer
        .ns
        .run(|| UdpSocket::bind((victim.ip, 0)))?
        .with_context(|| format!("binding {} in {}", victim.ip, spoofer.container_id))?;
    socket
        .send_to(b"not mine", (target.ip, 9))
        .context("sending the spoofed datagram")?;
    podwire(&cluster.nodes[0], 0, &["events", "--idle", "1"])?;

    for (i, node) in cluster.nodes.iter().enumerate() {
        for verb in [&["nodes"][..], &["endpoints"], &["counters", "--nonzero"]] {
            podwire(node, i, verb)?;
        }
    }

    for (node, on_node) in cluster.nodes.iter().zip(&pods) {
        for pod in on_node {
            node.del_pod(pod)?;
            println!("== CNI DEL {}", pod.container_id);
        }
    }
    for node in &mut cluster.nodes {
        node.stop_agent()?;
    }
    println!("== done; removing the namespaces, pins and state");
    Ok(())
}

/// Runs the `podwire` CLI on node `i` and prints what it printed.
fn podwire(node: &Node, i: usize, args: &[&str]) -> Result<()> {
    println!("== {}: podwire {}", Cluster::node_name(i), args.join(" "));
    let Output { stdout, .. } = node.podwire(args)?;
    print!("{}", String::from_utf8_lossy(&stdout));
    Ok(())
}
