//! Fuzzing the cluster file's parser ([`Cluster::parse`]) with proptest: arbitrary bytes,
//! generated cluster descriptions, and those descriptions mutated as JSON values and as bytes.
//! It must never panic, must accept exactly the descriptions that are valid, and whatever it
//! accepts must hold the invariants the agent relies on (unique names and addresses, pod CIDRs
//! without host bits, inside the cluster CIDR, not overlapping), checked here independently of
//! `Cluster::validate`.
//!
//! Each target runs 256 cases (`PROPTEST_CASES=<n>` runs more or fewer). A failing case is
//! shrunk and its seed written to `tests/proptest-regressions/fuzz.txt`, which is committed: it runs
//! first on every later run, so a crash found once stays a test.

use std::{collections::HashSet, net::Ipv4Addr};

use ipnet::Ipv4Net;
use podwire_core::cluster::Cluster;
use proptest::{prelude::*, test_runner::FileFailurePersistence};
use serde_json::{json, Value};

mod mutate;
use mutate::{apply, apply_bytes, byte_mutation, mutation};

/// A node as generated: fields as plain numbers, so the oracle below can judge them.
#[derive(Clone, Debug)]
struct NodeModel {
    name: String,
    address: Ipv4Addr,
    /// Pod CIDR: an address (host bits possibly set) and a prefix length (0..=32).
    net: (Ipv4Addr, u8),
}

#[derive(Clone, Debug)]
struct ClusterModel {
    cluster_cidr: Option<(Ipv4Addr, u8)>,
    nodes: Vec<NodeModel>,
}

/// First and last address of a prefix, as numbers.
fn range((addr, len): (Ipv4Addr, u8)) -> (u32, u32) {
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    let first = u32::from(addr) & mask;
    (first, first | !mask)
}

fn has_host_bits(net: (Ipv4Addr, u8)) -> bool {
    range(net).0 != u32::from(net.0)
}

impl ClusterModel {
    /// Whether a cluster file of this model is valid, judged from its numbers.
    fn valid(&self) -> bool {
        let names: HashSet<&str> = self.nodes.iter().map(|n| n.name.as_str()).collect();
        let addresses: HashSet<Ipv4Addr> = self.nodes.iter().map(|n| n.address).collect();
        if names.len() != self.nodes.len() || addresses.len() != self.nodes.len() {
            return false;
        }
        let ranges: Vec<(u32, u32)> = self.nodes.iter().map(|n| range(n.net)).collect();
        if self.nodes.iter().any(|n| has_host_bits(n.net)) {
            return false;
        }
        if let Some(cluster) = self.cluster_cidr {
            let (lo, hi) = range(cluster);
            if ranges.iter().any(|&(a, b)| a < lo || b > hi) {
                return false;
            }
        }
        for (i, a) in ranges.iter().enumerate() {
            for b in &ranges[..i] {
                if a.0 <= b.1 && b.0 <= a.1 {
                    return false;
                }
            }
        }
        true
    }

    fn json(&self) -> Value {
        let mut cluster = json!({
            "nodes": self.nodes.iter().map(|n| json!({
                "name": n.name,
                "address": n.address.to_string(),
                "podCIDR": format!("{}/{}", n.net.0, n.net.1),
            })).collect::<Vec<_>>(),
        });
        if let Some((addr, len)) = self.cluster_cidr {
            cluster["clusterCIDR"] = format!("{addr}/{len}").into();
        }
        cluster
    }
}

/// Checks what the agent relies on in an accepted cluster, without `Cluster::validate`.
fn holds_invariants(cluster: &Cluster) -> Result<(), String> {
    let mut names = HashSet::new();
    let mut addresses = HashSet::new();
    let mut ranges: Vec<(u32, u32)> = Vec::new();
    for node in &cluster.nodes {
        if !names.insert(&node.name) {
            return Err(format!("name {:?} accepted twice", node.name));
        }
        if !addresses.insert(node.address) {
            return Err(format!("address {} accepted twice", node.address));
        }
        let net = (node.pod_cidr.addr(), node.pod_cidr.prefix_len());
        if has_host_bits(net) {
            return Err(format!("podCIDR {} with host bits accepted", node.pod_cidr));
        }
        let (lo, hi) = range(net);
        if let Some(c) = cluster.cluster_cidr {
            let (clo, chi) = range((c.addr(), c.prefix_len()));
            if lo < clo || hi > chi {
                return Err(format!("podCIDR {} outside clusterCIDR {c}", node.pod_cidr));
            }
        }
        if let Some(other) = ranges.iter().find(|(a, b)| lo <= *b && *a <= hi) {
            return Err(format!(
                "podCIDR {} overlaps {:?} and was accepted",
                node.pod_cidr, other
            ));
        }
        ranges.push((lo, hi));
    }
    // What is accepted also reads back the same once written (the lab writes it this way).
    let written = serde_json::to_vec(cluster).map_err(|e| e.to_string())?;
    match Cluster::parse(&written) {
        Ok(again) if &again == cluster => Ok(()),
        other => Err(format!("written back, it reads as {other:?}")),
    }
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => (1u8..=4).prop_map(|i| format!("node{i}")),
        1 => ".{0,12}",
    ]
}

fn address() -> impl Strategy<Value = Ipv4Addr> {
    prop_oneof![
        4 => (1u8..=5).prop_map(|i| Ipv4Addr::new(192, 168, 77, i)),
        1 => any::<u32>().prop_map(Ipv4Addr::from),
    ]
}

/// Pod CIDRs near each other in 10.244.0.0/16, so overlaps and strays are common.
fn pod_net() -> impl Strategy<Value = (Ipv4Addr, u8)> {
    let aligned = (
        0u8..8,
        prop_oneof![8 => Just(24u8), 1 => 20u8..=26, 1 => Just(16u8)],
    )
        .prop_map(|(third, len)| {
            let addr = Ipv4Addr::new(10, 244, third, 0);
            (Ipv4Addr::from(range((addr, len)).0), len)
        });
    prop_oneof![
        6 => aligned,
        1 => (0u8..8, any::<u8>(), 16u8..=32).prop_map(|(c, d, len)| (Ipv4Addr::new(10, 244, c, d), len)),
        1 => (any::<u32>(), 0u8..=32).prop_map(|(a, len)| (Ipv4Addr::from(a), len)),
    ]
}

fn cluster_model() -> impl Strategy<Value = ClusterModel> {
    let cluster_cidr = prop_oneof![
        2 => Just(None),
        4 => Just(Some((Ipv4Addr::new(10, 244, 0, 0), 16))),
        1 => (14u8..=24).prop_map(|len| Some((Ipv4Addr::new(10, 244, 0, 0), len))),
        1 => (any::<u32>(), 0u8..=32).prop_map(|(a, len)| Some((Ipv4Addr::from(a), len))),
    ];
    let node = (name(), address(), pod_net()).prop_map(|(name, address, net)| NodeModel {
        name,
        address,
        net,
    });
    (cluster_cidr, prop::collection::vec(node, 0..6)).prop_map(|(cluster_cidr, nodes)| {
        ClusterModel {
            cluster_cidr,
            nodes,
        }
    })
}

/// The cluster file's field names, for mutations that add fields.
const KEYS: &[&str] = &["name", "address", "podCIDR", "clusterCIDR", "nodes"];

/// Values that are nearly an address or a prefix.
fn near_misses() -> Vec<Value> {
    [
        "10.244.1.0/33",
        "256.0.0.1",
        "10.244.1.0",
        "::1/128",
        " 10.244.1.0/24",
        "10.244.1.0/24\u{0}",
        "10.244.01.0/24",
        "192.168.77.1/32",
    ]
    .into_iter()
    .map(Value::from)
    .collect()
}

/// Parses `bytes`, failing the case if what is accepted breaks an invariant; a panic inside the
/// parser fails it too (proptest catches it and reports this input).
fn parse_and_check(bytes: &[u8]) -> Result<Option<Cluster>, TestCaseError> {
    match Cluster::parse(bytes) {
        Ok(cluster) => {
            holds_invariants(&cluster).map_err(|e| {
                TestCaseError::fail(format!("{e}; input {:?}", String::from_utf8_lossy(bytes)))
            })?;
            Ok(Some(cluster))
        }
        Err(err) => {
            prop_assert!(!err.to_string().is_empty(), "an error says what is wrong");
            Ok(None)
        }
    }
}

/// 256 cases (or `PROPTEST_CASES`); failures persist next to this file, to be committed.
fn config() -> ProptestConfig {
    ProptestConfig {
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/proptest-regressions/fuzz.txt"
        )))),
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn fuzz_cluster_file_arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..1024)) {
        parse_and_check(&bytes)?;
    }

    /// Generated descriptions: accepted exactly when valid, and then as written.
    #[test]
    fn fuzz_cluster_file_accepts_exactly_the_valid_descriptions(model in cluster_model()) {
        let bytes = serde_json::to_vec(&model.json()).unwrap();
        let parsed = parse_and_check(&bytes)?;
        prop_assert_eq!(parsed.is_some(), model.valid(), "{}", String::from_utf8_lossy(&bytes));
        if let Some(cluster) = parsed {
            let nets: Vec<Ipv4Net> = cluster.nodes.iter().map(|n| n.pod_cidr).collect();
            let want: Vec<Ipv4Net> = model
                .nodes
                .iter()
                .map(|n| Ipv4Net::new(n.net.0, n.net.1).unwrap())
                .collect();
            prop_assert_eq!(nets, want);
        }
    }

    /// Valid-looking descriptions with fields removed, retyped, added, duplicated, and then
    /// their bytes changed: never a panic, and nothing accepted that breaks an invariant.
    #[test]
    fn fuzz_cluster_file_mutated_json_never_breaks_an_invariant(
        model in cluster_model(),
        mutations in prop::collection::vec(mutation(KEYS, near_misses()), 0..4),
        byte_mutations in prop::collection::vec(byte_mutation(), 0..3),
    ) {
        let mut value = model.json();
        for m in &mutations {
            apply(&mut value, m);
        }
        let mut bytes = serde_json::to_vec(&value).unwrap();
        parse_and_check(&bytes)?;
        for m in &byte_mutations {
            apply_bytes(&mut bytes, m);
            parse_and_check(&bytes)?;
        }
    }
}
