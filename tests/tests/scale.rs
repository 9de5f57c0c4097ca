//! Load on one node: 200 pods added at once by 200 concurrent executions of the real CNI plugin
//! against one agent, as a runtime starting many pods does, then all deleted at once. Every ADD
//! must succeed with an address of its own, and what the node holds (veths, endpoint map, pinned
//! links, the agent's state file) must agree with the results; after the DELs nothing may be
//! left. Wall times are printed (`-- --nocapture`).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
    path::Path,
    sync::Barrier,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context as _, Result};
use ipnet::Ipv4Net;
use podwire_core::object::programs;
use podwire_lab::{
    artifacts,
    cni::{pod_ip, CniOutput},
    namespaces::NetNs,
    nodes::Node,
    processes::output_with_stdin,
    traffic::ping,
};
use serde_json::Value;

const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 10);
/// A /24 gives pods .2 to .254 (253 addresses: .0 and .255 are the network's, .1 the node's).
const POD_CIDR: &str = "10.244.0.0/24";
const PODS: usize = 200;

/// One plugin execution in the node's namespace, as [`Node::cni`] does it; here on its own so
/// that many threads can run it at once (a `Node` is not shared across threads).
fn exec_plugin(
    node_ns: &NetNs,
    plugin: &Path,
    command: &str,
    container_id: &str,
    pod: &NetNs,
    conf: &[u8],
) -> Result<(CniOutput, Duration)> {
    let netns = pod.path();
    let mut cmd = node_ns.command(plugin);
    cmd.env("CNI_COMMAND", command)
        .env(
            "CNI_PATH",
            plugin.parent().context("the plugin's directory")?,
        )
        .env("CNI_CONTAINERID", container_id)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_NETNS", &netns);
    let started = Instant::now();
    let out = output_with_stdin(&mut cmd, conf)?;
    let took = started.elapsed();
    Ok((
        CniOutput {
            success: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).trim().to_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        },
        took,
    ))
}

/// Runs `command` for every pod at once (all threads released together); returns each
/// invocation's output in pod order, the wall time of the whole batch and each one's latency.
fn all_at_once(
    node: &Node,
    command: &str,
    pods: &[(String, NetNs)],
) -> Result<(Vec<CniOutput>, Duration, Vec<Duration>)> {
    let plugin = artifacts::bin("podwire-cni")?;
    let conf = node.conf().to_string();
    let barrier = Barrier::new(pods.len() + 1);
    let node_ns = &node.ns;
    let (results, wall) = std::thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .map(|(id, ns)| {
                let (barrier, plugin, conf) = (&barrier, &plugin, &conf);
                s.spawn(move || {
                    barrier.wait();
                    exec_plugin(node_ns, plugin, command, id, ns, conf.as_bytes())
                })
            })
            .collect();
        barrier.wait();
        let started = Instant::now();
        let results: Vec<Result<(CniOutput, Duration)>> = handles
            .into_iter()
            .map(|h| h.join().expect("a plugin thread panicked"))
            .collect();
        (results, started.elapsed())
    });
    let mut outputs = Vec::new();
    let mut latencies = Vec::new();
    for r in results {
        let (out, took) = r?;
        outputs.push(out);
        latencies.push(took);
    }
    Ok((outputs, wall, latencies))
}

fn summary(what: &str, wall: Duration, latencies: &mut [Duration]) -> String {
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
    format!(
        "{what}: {} in parallel took {:.2} s wall; per invocation min {:.0} ms, median {:.0} ms, \
         p99 {:.0} ms, max {:.0} ms",
        latencies.len(),
        wall.as_secs_f64(),
        at(0.0).as_secs_f64() * 1e3,
        at(0.5).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3,
        at(1.0).as_secs_f64() * 1e3,
    )
}

/// ifindex of every link in the node, by name.
fn ifindexes(node: &Node) -> Result<HashMap<String, u32>> {
    let links: Value = serde_json::from_slice(&node.ns.ip(&["-j", "link", "show"])?.stdout)?;
    Ok(links
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| {
            Some((
                l["ifname"].as_str()?.to_owned(),
                l["ifindex"].as_u64()? as u32,
            ))
        })
        .collect())
}

/// Names of the tc links pinned below the node's pin root.
fn pinned_links(node: &Node) -> Result<BTreeSet<String>> {
    let dir = node.pins().links_dir();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(BTreeSet::new());
    };
    entries
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect()
}

fn mac_string(mac: &[u8; 6]) -> String {
    podwire_core::mac::Mac(*mac).to_string()
}

#[test]
fn two_hundred_parallel_adds_get_unique_addresses_and_dels_leave_nothing() -> Result<()> {
    let node = Node::start(NODE_IP, POD_CIDR)?;
    let cidr: Ipv4Net = POD_CIDR.parse()?;
    let created = Instant::now();
    let pods: Vec<(String, NetNs)> = (0..PODS)
        .map(|i| Ok((format!("c-scale-{i}"), NetNs::new("pod")?)))
        .collect::<Result<_>>()?;
    eprintln!(
        "created {PODS} pod namespaces in {:.2} s",
        created.elapsed().as_secs_f64()
    );

    // ADD, all at once.
    let (adds, wall, mut latencies) = all_at_once(&node, "ADD", &pods)?;
    let failed: Vec<String> = adds
        .iter()
        .zip(&pods)
        .filter(|(out, _)| !out.success)
        .map(|(out, (id, _))| format!("{id}: {} {}", out.stdout, out.stderr.trim()))
        .collect();
    ensure!(
        failed.is_empty(),
        "{} of {PODS} ADDs failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
    eprintln!("{}", summary("ADD", wall, &mut latencies));
    let results: Vec<Value> = adds
        .iter()
        .map(CniOutput::expect_success)
        .collect::<Result<_>>()?;

    // Addresses: one each, all different, all pod addresses of the CIDR.
    let ips: Vec<Ipv4Addr> = results.iter().map(pod_ip).collect::<Result<_>>()?;
    let distinct: BTreeSet<Ipv4Addr> = ips.iter().copied().collect();
    assert_eq!(distinct.len(), PODS, "an address was handed out twice");
    let reserved = [
        cidr.network(),
        Ipv4Addr::from(u32::from(cidr.network()) + 1),
        cidr.broadcast(),
    ];
    for ip in &ips {
        assert!(
            cidr.contains(ip) && !reserved.contains(ip),
            "{ip} is not a pod address of {cidr}"
        );
    }

    // Veths: one per pod, named as the results say.
    let host_veths: Vec<String> = results
        .iter()
        .map(|r| {
            r["interfaces"][0]["name"]
                .as_str()
                .map(str::to_owned)
                .context("host veth in the ADD result")
        })
        .collect::<Result<_>>()?;
    let on_node: BTreeSet<String> = node.host_veths()?.into_iter().collect();
    assert_eq!(on_node.len(), PODS, "veths on the node");
    assert_eq!(
        on_node,
        host_veths.iter().cloned().collect::<BTreeSet<_>>(),
        "the node's veths are those the results name"
    );

    // Endpoint map: one entry per pod, pointing at its veth with its MACs.
    let links = ifindexes(&node)?;
    let entries: BTreeMap<Ipv4Addr, podwire_common::Endpoint> =
        node.endpoints()?.into_iter().collect();
    assert_eq!(entries.len(), PODS, "endpoint map entries");
    for ((ip, result), veth) in ips.iter().zip(&results).zip(&host_veths) {
        let entry = entries
            .get(ip)
            .with_context(|| format!("no map entry for {ip}"))?;
        assert_eq!(Some(&entry.ifindex), links.get(veth), "{ip}: ifindex");
        assert_eq!(
            mac_string(&entry.host_mac),
            result["interfaces"][0]["mac"],
            "{ip}: host MAC"
        );
        assert_eq!(
            mac_string(&entry.pod_mac),
            result["interfaces"][1]["mac"],
            "{ip}: pod MAC"
        );
    }

    // Both programs attached to every veth (netlink tc filters).
    let filters = node.pinned_ids()?.filters;
    for veth in &host_veths {
        for program in [programs::FROM_POD, programs::TO_POD] {
            assert!(
                filters.contains_key(&format!("{program}-{veth}")),
                "{program} is not attached to {veth}"
            );
        }
    }

    // The agent's state file: the same 200 attachments with the same addresses and veths.
    let state = node.state()?;
    let records = state["endpoints"]
        .as_object()
        .context("endpoints in the state file")?;
    assert_eq!(records.len(), PODS, "records in the state file");
    for (((id, _), ip), veth) in pods.iter().zip(&ips).zip(&host_veths) {
        let record = &records
            .get(&format!("{id}/eth0"))
            .with_context(|| format!("no record of {id} in the state file"))?;
        assert_eq!(record["ip"], ip.to_string(), "{id}: address in the state");
        assert_eq!(
            record["wiring"]["host_ifname"], **veth,
            "{id}: veth in the state"
        );
    }

    // Every pod has its address, and the first and last reach each other.
    for ((id, ns), ip) in pods.iter().zip(&ips) {
        let addr: Value =
            serde_json::from_slice(&ns.ip(&["-j", "addr", "show", "dev", "eth0"])?.stdout)?;
        assert!(
            addr[0]["addr_info"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|a| a["local"] == ip.to_string()),
            "{id}'s eth0 lacks {ip}: {addr}"
        );
    }
    let (first, last) = (&pods[0].1, &pods[PODS - 1].1);
    assert!(ping(first, ips[PODS - 1])?, "first pod -> last pod");
    assert!(ping(last, ips[0])?, "last pod -> first pod");

    // DEL, all at once.
    let (dels, wall, mut latencies) = all_at_once(&node, "DEL", &pods)?;
    let failed: Vec<String> = dels
        .iter()
        .zip(&pods)
        .filter(|(out, _)| !out.success || !out.stdout.is_empty())
        .map(|(out, (id, _))| format!("{id}: {} {}", out.stdout, out.stderr.trim()))
        .collect();
    ensure!(
        failed.is_empty(),
        "{} of {PODS} DELs failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
    eprintln!("{}", summary("DEL", wall, &mut latencies));

    assert_eq!(node.host_veths()?, Vec::<String>::new(), "veths left");
    assert_eq!(node.endpoints()?.len(), 0, "endpoint map entries left");
    let left: Vec<String> = pinned_links(&node)?
        .into_iter()
        .filter(|l| host_veths.iter().any(|v| l.ends_with(v.as_str())))
        .collect();
    assert!(left.is_empty(), "pinned links left: {left:?}");
    assert_eq!(
        node.state()?["endpoints"],
        serde_json::json!({}),
        "addresses still held"
    );
    for (id, ns) in &pods {
        let links = String::from_utf8(ns.ip(&["-o", "link"])?.stdout)?;
        assert!(!links.contains("eth0"), "{id} still has eth0: {links}");
    }
    Ok(())
}
