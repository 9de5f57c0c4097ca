//! `cargo xtask demo`: a two-node cluster in network namespaces (see `lab`), each node running the
//! podwire agent with IP forwarding off, so only podwire's eBPF path can carry pod traffic. It
//! shows pod-to-pod traffic on one node and across nodes (VXLAN, in kernel), and what each node's
//! datapath holds and counted, read from its pinned maps with the `podwire` CLI.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, TcpListener, TcpStream, UdpSocket},
    path::Path,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{ensure, Result};

use crate::lab::{in_netns, ip, Lab};

const PODS_PER_NODE: usize = 2;

pub fn run(bins: &Path) -> Result<()> {
    let lab = Lab::new("pwdemo", bins)?;
    let nodes = vec![lab.node(1, false)?, lab.node(2, false)?];
    let cluster_file = lab.cluster_file(&nodes)?;
    println!(
        "== cluster file {cluster_file}:\n{}",
        std::fs::read_to_string(&cluster_file)?
    );
    let mut agents = Vec::new();
    for node in &nodes {
        println!(
            "== node {} at {} on the underlay bridge, pod CIDR {}, IP forwarding off",
            node.ns, node.ip, node.pod_cidr
        );
        agents.push(lab.start_agent(node, &cluster_file, true)?);
    }

    let mut pods = Vec::new();
    for node in &nodes {
        for p in 1..=PODS_PER_NODE {
            let (pod, pod_ip, result) = lab.add_pod(node, &format!("pod{p}"))?;
            println!(
                "== CNI ADD {pod}: {pod_ip}/32, MTU {}",
                result["interfaces"][1]["mtu"]
            );
            pods.push((pod, pod_ip));
        }
    }

    println!("== ping between every pair of pods (same node: redirected; across nodes: VXLAN)");
    for (from, _) in &pods {
        for (to, to_ip) in &pods {
            if from != to {
                let out = Command::new("ip")
                    .args([
                        "netns", "exec", from, "ping", "-c", "2", "-i", "0.2", "-W", "2",
                    ])
                    .arg(to_ip.to_string())
                    .output()?;
                let summary = String::from_utf8_lossy(&out.stdout);
                let line = summary
                    .lines()
                    .find(|l| l.contains("received"))
                    .unwrap_or("no reply");
                println!("   {from} -> {to} ({to_ip}): {line}");
                ensure!(out.status.success(), "ping {from} -> {to} failed");
            }
        }
    }
    for (server, server_ip) in [&pods[1], &pods[PODS_PER_NODE]] {
        let client = &pods[0].0;
        let (bytes, elapsed) = tcp_transfer(client, server, *server_ip, 64 << 20)?;
        println!(
            "== TCP {client} -> {server}: {} MiB arrived intact in {:.2} s",
            bytes >> 20,
            elapsed.as_secs_f64()
        );
    }

    let (spoofer, victim) = (&pods[0].0, pods[1].1);
    println!("== {spoofer} sends from {victim}, another pod's address: dropped, and reported");
    ip(&[
        "-n",
        spoofer,
        "addr",
        "add",
        &format!("{victim}/32"),
        "dev",
        "eth0",
    ])?;
    let socket = in_netns(spoofer, || UdpSocket::bind((victim, 0)))??;
    socket.send_to(b"not mine", (pods[PODS_PER_NODE].1, 9))?;
    println!("== {}: podwire events --idle 1", nodes[0].ns);
    lab.podwire(&nodes[0], &["events", "--idle", "1"])?;

    for node in &nodes {
        for verb in [&["nodes"][..], &["endpoints"], &["counters", "--nonzero"]] {
            println!("== {}: podwire {}", node.ns, verb.join(" "));
            lab.podwire(node, verb)?;
        }
    }

    for (i, node) in nodes.iter().enumerate() {
        for (pod, _) in &pods[i * PODS_PER_NODE..(i + 1) * PODS_PER_NODE] {
            lab.cni(node, "DEL", pod)?;
            println!("== CNI DEL {pod}");
        }
    }
    for agent in agents {
        agent.stop()?;
    }
    println!("== done; removing the namespaces, pins and state");
    Ok(())
}

/// Sends `len` bytes from a socket in `client` to one in `server`, checking every byte; returns
/// what arrived and the time it took.
fn tcp_transfer(
    client: &str,
    server: &str,
    server_ip: Ipv4Addr,
    len: usize,
) -> Result<(usize, Duration)> {
    let listener = in_netns(server, || TcpListener::bind((server_ip, 0)))??;
    let addr = listener.local_addr()?;
    let receiver = thread::spawn(move || -> std::io::Result<usize> {
        let (mut conn, _) = listener.accept()?;
        let mut buf = vec![0u8; 1 << 16];
        let (mut total, mut expected) = (0usize, 0u8);
        loop {
            let n = conn.read(&mut buf)?;
            if n == 0 {
                return Ok(total);
            }
            for &byte in &buf[..n] {
                if byte != expected {
                    return Err(std::io::Error::other(format!("byte {total} corrupted")));
                }
                expected = expected.wrapping_add(1);
                total += 1;
            }
        }
    });
    let start = Instant::now();
    let mut conn = in_netns(client, || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(5))
    })??;
    let chunk: Vec<u8> = (0..=255u8).cycle().take(1 << 16).collect();
    for _ in 0..len / chunk.len() {
        conn.write_all(&chunk)?;
    }
    drop(conn);
    let received = receiver.join().expect("receiver thread")?;
    ensure!(received == len, "{received} of {len} bytes arrived");
    Ok((received, start.elapsed()))
}
