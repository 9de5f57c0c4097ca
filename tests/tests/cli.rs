//! The `podwire` CLI reads the node's pinned maps with the agent down, as an operator would run it
//! on the node: tables for people, JSON for scripts. The maps are real (pinned by the datapath
//! loader or by the agent), the counts come from packets the kernel program judged, and the CLI
//! is the built binary.

use std::{
    net::Ipv4Addr,
    process::{Command, Output},
};

use anyhow::{Context as _, Result};
use aya::{
    maps::MapData,
    programs::{TestRun as _, TestRunOptions},
};
use podwire_common::{Endpoint, Reason};
use podwire_core::object::{maps, programs};
use podwire_datapath::{bpffs, Datapath, LoadOptions};
use podwire_lab::{
    artifacts,
    namespaces::NetNs,
    nodes::{Node, PinRoot},
    packets::udp_v4,
    processes::run,
    require_root,
    traffic::ping,
};
use serde_json::{json, Value};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

/// `podwire args...` in `node`'s network namespace, so interface names resolve as on the node;
/// the lab enters no mount namespace, so the bpffs pins stay visible.
fn podwire(node: &NetNs, args: &[&str]) -> Result<Command> {
    let mut cmd = node.command(artifacts::bin("podwire")?);
    cmd.args(args);
    Ok(cmd)
}

fn stdout(out: &Output) -> Result<String> {
    String::from_utf8(out.stdout.clone()).context("output is not UTF-8")
}

fn json(out: &Output) -> Result<Value> {
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "output is not JSON:\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// The whitespace-separated cells of the table rows after the header.
fn table_rows(table: &str) -> Vec<Vec<String>> {
    table
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
        .collect()
}

#[test]
fn endpoints_and_counters_read_from_the_pins_of_a_stopped_datapath() -> Result<()> {
    require_root()?;
    // The node's namespace: interface names are resolved in it.
    let node = NetNs::new("node")?;
    node.ip(&[
        "link", "add", "pwcli0", "type", "veth", "peer", "name", "pwcli0p",
    ])?;
    let (veth_ifindex, _) = node.link("pwcli0")?;

    let root = PinRoot::new();
    let pins = root.pins();
    let object = artifacts::object()?;
    let mut datapath = Datapath::load(
        object.bytes(),
        LoadOptions {
            pins: Some(&pins),
            ..LoadOptions::default()
        },
    )
    .context("loading the datapath")?;

    // Numeric order differs from string order (.9 < .10 < .100), and the map gets them unsorted.
    let a = Ipv4Addr::new(10, 244, 0, 9);
    let b = Ipv4Addr::new(10, 244, 0, 10);
    let c = Ipv4Addr::new(10, 244, 0, 100);
    let endpoint = |ifindex, last| Endpoint {
        ifindex,
        flags: 0,
        pod_mac: [0x0a, 0x58, 0, 0, 0, last],
        host_mac: [0xee, 0xee, 0, 0, 0, last],
    };
    // a sends the test packets: BPF_PROG_TEST_RUN runs tc programs on loopback, ifindex 1.
    let a_ep = endpoint(1, 0x09);
    let b_ep = endpoint(veth_ifindex, 0x10);
    // No interface has this ifindex in the node.
    let c_ep = endpoint(4000, 0x64);
    for (ip, ep) in [(c, c_ep), (a, a_ep), (b, b_ep)] {
        datapath.endpoints.set(ip, ep)?;
    }

    let to_b = udp_v4(a_ep.pod_mac, a, b, b"hello b");
    let to_b_big = udp_v4(a_ep.pod_mac, a, b, &[7; 300]);
    let to_node = udp_v4(
        a_ep.pod_mac,
        a,
        Ipv4Addr::new(192, 168, 77, 1),
        b"to the node",
    );
    let spoofed = udp_v4(a_ep.pod_mac, Ipv4Addr::new(10, 244, 0, 99), b, b"x");
    for (frame, verdict) in [
        (&to_b, TC_ACT_REDIRECT),
        (&to_b_big, TC_ACT_REDIRECT),
        (&to_node, TC_ACT_OK),
        (&spoofed, TC_ACT_SHOT),
    ] {
        let result = datapath
            .program(programs::FROM_POD)?
            .test_run(TestRunOptions {
                data_in: Some(frame),
                ..Default::default()
            })
            .context("BPF_PROG_TEST_RUN")?;
        assert_eq!(
            result.return_value,
            verdict,
            "from_pod's verdict on a {}-byte frame",
            frame.len()
        );
    }
    let len = |frame: &Vec<u8>| frame.len() as u64;
    // In Reason::ALL order, as the CLI lists them.
    let caused = json!([
        { "reason": "pass-to-stack", "verdict": "pass", "packets": 1, "bytes": len(&to_node) },
        { "reason": "redirect-local", "verdict": "redirect", "packets": 2, "bytes": len(&to_b) + len(&to_b_big) },
        { "reason": "drop-spoofed-ip", "verdict": "drop", "packets": 1, "bytes": len(&spoofed) },
    ]);
    let caused_rows = caused.as_array().context("an array")?;

    // The agent is down: only the pins remain.
    drop(datapath);
    let bpffs = root.path().display().to_string();

    let endpoints = json(&run(&mut podwire(
        &node,
        &["--bpffs", &bpffs, "endpoints", "-o", "json"],
    )?)?)?;
    assert_eq!(
        endpoints,
        json!([
            { "ip": "10.244.0.9", "ifindex": 1, "host_veth": "lo",
              "pod_mac": "0a:58:00:00:00:09", "host_mac": "ee:ee:00:00:00:09" },
            { "ip": "10.244.0.10", "ifindex": veth_ifindex, "host_veth": "pwcli0",
              "pod_mac": "0a:58:00:00:00:10", "host_mac": "ee:ee:00:00:00:10" },
            { "ip": "10.244.0.100", "ifindex": 4000, "host_veth": "-",
              "pod_mac": "0a:58:00:00:00:64", "host_mac": "ee:ee:00:00:00:64" },
        ])
    );

    let table = stdout(&run(&mut podwire(
        &node,
        &["--bpffs", &bpffs, "endpoints"],
    )?)?)?;
    // Header cells hold single spaces; columns are apart by at least two.
    let header: Vec<&str> = table
        .lines()
        .next()
        .unwrap_or_default()
        .split("  ")
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .collect();
    assert_eq!(
        header,
        ["IP", "IFINDEX", "HOST VETH", "POD MAC", "HOST MAC"],
        "{table}"
    );
    assert_eq!(
        table_rows(&table),
        [
            [
                "10.244.0.9",
                "1",
                "lo",
                "0a:58:00:00:00:09",
                "ee:ee:00:00:00:09"
            ],
            [
                "10.244.0.10",
                &veth_ifindex.to_string(),
                "pwcli0",
                "0a:58:00:00:00:10",
                "ee:ee:00:00:00:10"
            ],
            [
                "10.244.0.100",
                "4000",
                "-",
                "0a:58:00:00:00:64",
                "ee:ee:00:00:00:64"
            ],
        ],
        "{table}"
    );

    // Every reason, in order: what the packets caused, zero elsewhere; the pin root from the
    // environment this time.
    let counters = json(&run(
        podwire(&node, &["counters", "-o", "json"])?.env("PODWIRE_BPFFS", &bpffs)
    )?)?;
    let counters = counters.as_array().context("an array")?;
    let names: Vec<&str> = counters
        .iter()
        .map(|r| r["reason"].as_str().context("reason"))
        .collect::<Result<_>>()?;
    assert_eq!(names, Reason::ALL.map(Reason::name));
    for (row, reason) in counters.iter().zip(Reason::ALL) {
        match caused_rows.iter().find(|c| c["reason"] == reason.name()) {
            Some(expected) => assert_eq!(row, expected),
            None => assert_eq!(
                (&row["packets"], &row["bytes"]),
                (&json!(0), &json!(0)),
                "{row}"
            ),
        }
        assert_eq!(row["verdict"], reason.verdict().name(), "{row}");
        assert_eq!(row["verdict"] == "drop", reason.is_drop(), "{row}");
    }

    let nonzero = json(&run(&mut podwire(
        &node,
        &["--bpffs", &bpffs, "counters", "--nonzero", "-o", "json"],
    )?)?)?;
    assert_eq!(nonzero, caused);

    let table = stdout(&run(&mut podwire(
        &node,
        &["--bpffs", &bpffs, "counters", "--nonzero"],
    )?)?)?;
    let header: Vec<&str> = table
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(header, ["REASON", "VERDICT", "PACKETS", "BYTES"], "{table}");
    let cell = |v: &Value| v.as_str().map_or_else(|| v.to_string(), str::to_owned);
    let expected_rows: Vec<Vec<String>> = caused_rows
        .iter()
        .map(|c| {
            ["reason", "verdict", "packets", "bytes"]
                .iter()
                .map(|k| cell(&c[k]))
                .collect()
        })
        .collect();
    assert_eq!(table_rows(&table), expected_rows, "{table}");
    Ok(())
}

#[test]
fn a_missing_pin_root_is_an_error_naming_the_path() -> Result<()> {
    require_root()?;
    let root = PinRoot::new();
    assert!(!root.path().exists());
    let node = NetNs::new("node")?;
    let shown = root.path().display().to_string();
    for (verb, map) in [("endpoints", maps::ENDPOINTS), ("counters", maps::COUNTERS)] {
        let out = podwire(&node, &["--bpffs", &shown, verb])?
            .output()
            .context("running podwire")?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{verb}: {stderr}");
        assert!(
            out.stdout.is_empty(),
            "{verb}: nothing on stdout for scripts to misparse"
        );
        let expected = format!(
            "no pinned map at {shown}/maps/{map}: \
             is the podwire agent running on this node with --bpffs {shown}, or was it ever started?"
        );
        assert!(stderr.contains(&expected), "{verb}: {stderr}");
    }
    Ok(())
}

#[test]
fn a_pinned_map_of_another_layout_is_refused_not_misread() -> Result<()> {
    require_root()?;
    let real = PinRoot::new();
    let pins = real.pins();
    let object = artifacts::object()?;
    drop(
        Datapath::load(
            object.bytes(),
            LoadOptions {
                pins: Some(&pins),
                ..LoadOptions::default()
            },
        )
        .context("loading the datapath")?,
    );
    // A root whose endpoint pin is really the per-CPU counter array.
    let odd = PinRoot::new();
    let odd_pins = odd.pins();
    bpffs::prepare(&odd_pins).context("preparing the pin root")?;
    let counters = MapData::from_pin(pins.map(maps::COUNTERS)).context("the pinned counters")?;
    counters
        .pin(odd_pins.map(maps::ENDPOINTS))
        .context("pinning it as the endpoint map")?;

    let node = NetNs::new("node")?;
    let out = podwire(
        &node,
        &["--bpffs", &odd.path().display().to_string(), "endpoints"],
    )?
    .output()
    .context("running podwire")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    let expected = format!(
        "{} is not the map this podwire reads",
        odd_pins.map(maps::ENDPOINTS).display()
    );
    assert!(stderr.contains(&expected), "{stderr}");
    Ok(())
}

#[test]
fn completions_cover_the_verbs_and_options() -> Result<()> {
    for shell in ["bash", "zsh", "fish"] {
        let script = stdout(&run(
            Command::new(artifacts::bin("podwire")?).args(["completions", shell])
        )?)?;
        for word in [
            "endpoints",
            "counters",
            "completions",
            "nonzero",
            "bpffs",
            "output",
        ] {
            assert!(script.contains(word), "{shell} completions lack {word}");
        }
    }
    Ok(())
}

#[test]
fn endpoints_and_counters_of_pods_wired_by_the_plugin_with_the_agent_down() -> Result<()> {
    let mut node = Node::start(Ipv4Addr::new(192, 168, 77, 10), "10.244.0.0/24")?;
    let a = node.add_pod("c-cli-a")?;
    let b = node.add_pod("c-cli-b")?;
    assert!(ping(&a.ns, b.ip)?);
    node.stop_agent()?;

    let endpoints = json(&node.podwire(&["endpoints", "-o", "json"])?)?;
    let endpoints = endpoints.as_array().context("an array")?;
    assert_eq!(endpoints.len(), 2, "{endpoints:?}");
    for (row, pod) in endpoints.iter().zip([&a, &b]) {
        assert_eq!(row["ip"], pod.ip.to_string());
        assert_eq!(
            row["host_veth"],
            pod.host_veth()?,
            "ifindex resolved to the veth"
        );
        assert_eq!(row["host_mac"], pod.result["interfaces"][0]["mac"]);
        assert_eq!(row["pod_mac"], pod.result["interfaces"][1]["mac"]);
    }

    let counters = json(&node.podwire(&["counters", "--nonzero", "-o", "json"])?)?;
    let redirect = counters
        .as_array()
        .context("an array")?
        .iter()
        .find(|r| r["reason"] == "redirect-local")
        .with_context(|| format!("no redirect-local row: {counters}"))?;
    let expected = node.counter(Reason::RedirectLocal)?;
    assert!(
        expected.packets >= 2,
        "the ping request and reply were redirected"
    );
    assert_eq!(redirect["verdict"], "redirect");
    assert_eq!(redirect["packets"], expected.packets);
    assert_eq!(redirect["bytes"], expected.bytes);
    Ok(())
}
