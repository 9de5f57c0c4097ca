//! The `podwire` CLI reads the node's pinned maps, with the agent down, as an operator would run
//! it on the node: tables for people, JSON for scripts.

use std::net::Ipv4Addr;

use podwire_common::Reason;
use podwire_tests::{bin, ping, Node};

fn podwire(node: &Node, args: &[&str]) -> std::process::Output {
    node.command(bin("podwire")).arg("--bpffs").arg(&node.pins).args(args).output().expect("podwire")
}

#[test]
fn endpoints_and_counters_from_pinned_maps_with_the_agent_down() {
    let mut node = Node::start(Ipv4Addr::new(192, 168, 77, 10), "10.244.0.0/24");
    let a = node.add_pod("c-cli-a");
    let b = node.add_pod("c-cli-b");
    assert!(ping(&a.ns, b.ip));
    node.stop_agent();

    let out = podwire(&node, &["endpoints", "-o", "json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let endpoints: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let endpoints = endpoints.as_array().unwrap();
    assert_eq!(endpoints.len(), 2);
    for (row, pod) in endpoints.iter().zip([&a, &b]) {
        assert_eq!(row["ip"], pod.ip.to_string());
        assert_eq!(row["host_veth"], pod.result["interfaces"][0]["name"], "ifindex resolved to the veth");
        assert_eq!(row["host_mac"], pod.result["interfaces"][0]["mac"]);
        assert_eq!(row["pod_mac"], pod.result["interfaces"][1]["mac"]);
    }
    let table = String::from_utf8(podwire(&node, &["endpoints"]).stdout).unwrap();
    assert!(table.contains("HOST VETH") && table.contains(&a.ip.to_string()) && table.contains(&b.ip.to_string()), "{table}");

    let out = podwire(&node, &["counters", "--nonzero", "-o", "json"]);
    let counters: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let redirect = counters
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["reason"] == "redirect-local")
        .expect("redirect-local row");
    let expected = node.counter(Reason::RedirectLocal);
    assert_eq!(redirect["verdict"], "redirect");
    assert_eq!(redirect["packets"], expected.packets);
    assert_eq!(redirect["bytes"], expected.bytes);
    assert!(expected.packets >= 2, "the ping request and reply were redirected");
    assert!(counters.as_array().unwrap().iter().all(|r| r["packets"].as_u64() > Some(0)), "--nonzero");
}

#[test]
fn a_node_without_pins_gets_an_error_naming_the_path() {
    let out = std::process::Command::new(bin("podwire"))
        .args(["--bpffs", "/sys/fs/bpf/pwt-nothing-here", "counters"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/sys/fs/bpf/pwt-nothing-here/maps/COUNTERS"), "{stderr}");
    assert!(stderr.contains("is the podwire agent running"), "{stderr}");
}
