//! The CNI plugin against the letter of the spec (1.1): what it answers an agent that misbehaves
//! (hangs, or answers what it should not), configurations of other spec versions than the one at
//! ADD, a chained plugin's 1.1 result fields, CHECK of what prevResult says, and GC's
//! `cni.dev/valid-attachments`. The plugin is exec'd as a runtime execs it: CNI_* variables and
//! the configuration on stdin. Every test name starts with `cni_spec_`, so
//! `cargo xtask test -- cni_spec_` runs them all.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::Ipv4Addr,
    os::unix::net::{UnixListener, UnixStream},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use podwire_core::{
    api::{self, Reply, Request},
    endpoint::Attachment,
};
use podwire_lab::{
    artifacts,
    cni::{pod_ip, CniOutput},
    namespaces::NetNs,
    nodes::Node,
    processes::output_with_stdin,
};
use serde_json::{json, Value};

const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 10);
const POD_CIDR: &str = "10.244.0.0/24";

/// How long the plugin waits for the agent's answer (everything but GC); see
/// `podwire_core::api::CALL_TIMEOUT`.
const CALL_TIMEOUT: Duration = api::CALL_TIMEOUT;

fn node() -> Result<Node> {
    Node::start(NODE_IP, POD_CIDR)
}

/// CNI_NETNS of `ns`, as a runtime passes it.
fn cni_netns(ns: &NetNs) -> String {
    ns.path().display().to_string()
}

/// Execs the plugin in `ns` (a node without an agent: the tests' fake sockets stand in for it).
fn exec_plugin(
    ns: &NetNs,
    command: &str,
    env: &[(&str, &str)],
    stdin: &Value,
) -> Result<CniOutput> {
    let plugin = artifacts::bin("podwire-cni")?;
    let mut cmd = ns.command(&plugin);
    cmd.env("CNI_COMMAND", command)
        .env(
            "CNI_PATH",
            plugin.parent().context("the plugin's directory")?,
        )
        .envs(env.iter().copied());
    let out = output_with_stdin(&mut cmd, stdin.to_string().as_bytes())?;
    Ok(CniOutput {
        success: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// A configuration of `version` pointing the plugin at `socket`.
fn conf_for(socket: &Path, version: &str) -> Value {
    json!({
        "cniVersion": version,
        "name": "podwire",
        "type": "podwire-cni",
        "agentSocket": socket,
    })
}

/// A Unix socket that stands in for a broken agent: every connection is handed to `serve` on a
/// thread of its own. Stops accepting (and drops what it holds) when dropped.
struct FakeAgent {
    dir: tempfile::TempDir,
    stop: Arc<AtomicBool>,
    acceptor: Option<thread::JoinHandle<()>>,
}

impl FakeAgent {
    fn start(serve: fn(UnixStream)) -> Result<FakeAgent> {
        let dir = tempfile::tempdir()?;
        let listener = UnixListener::bind(dir.path().join("agent.sock"))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let acceptor = thread::spawn(move || {
            let mut held = Vec::new();
            while !stopping.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let _ = stream.set_nonblocking(false);
                        let stopping = stopping.clone();
                        held.push(thread::spawn(move || {
                            serve(stream.try_clone().expect("cloning a Unix stream"));
                            // Keep the connection open (a hung agent) until the test ends.
                            while !stopping.load(Ordering::Relaxed) {
                                thread::sleep(Duration::from_millis(50));
                            }
                            drop(stream);
                        }));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(20)),
                }
            }
            for h in held {
                let _ = h.join();
            }
        });
        Ok(FakeAgent {
            dir,
            stop,
            acceptor: Some(acceptor),
        })
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("agent.sock")
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

/// Reads the request line and answers it with a registered-looking endpoint that has no wiring,
/// which the agent's CHECK never returns but an agent of another release (or a bug) may.
fn answer_check_without_wiring(stream: UnixStream) {
    let mut line = String::new();
    let _ = BufReader::new(&stream).read_line(&mut line);
    let reply: std::result::Result<Reply, api::ApiError> = Ok(Reply::Checked {
        endpoint: serde_json::from_value(json!({
            "container_id": "c-unwired", "ifname": "eth0", "ip": "10.244.0.2", "netns": "/run/netns/x",
        }))
        .expect("an endpoint record"),
    });
    let mut out = serde_json::to_string(&reply).expect("replies serialise");
    out.push('\n');
    let _ = (&stream).write_all(out.as_bytes());
}

/// Accepts and never answers.
fn hang(_: UnixStream) {}

#[test]
fn cni_spec_check_of_an_endpoint_without_wiring_is_a_cni_error_not_a_panic() -> Result<()> {
    // The real agent holding an allocated but never registered attachment (an ADD that died
    // between Allocate and Register).
    let node = node()?;
    let pod = NetNs::new("pod")?;
    let netns = cni_netns(&pod);
    let allocated = api::call(
        &node.socket(),
        &Request::Allocate {
            attachment: Attachment {
                container_id: "c-unwired".into(),
                ifname: "eth0".into(),
            },
            netns: netns.clone(),
            network: None,
        },
    )?;
    let Reply::Allocated { ip, .. } = allocated else {
        anyhow::bail!("Allocate answered {allocated:?}");
    };
    let env = [
        ("CNI_CONTAINERID", "c-unwired"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_NETNS", netns.as_str()),
    ];
    let mut conf = node.conf();
    conf["prevResult"] =
        json!({ "cniVersion": "1.1.0", "ips": [{ "address": format!("{ip}/32") }] });
    let msg = node
        .cni("CHECK", &env, conf.to_string().as_bytes())?
        .expect_error(100)
        .context("CHECK of an allocated, never registered attachment (the real agent)")?;
    assert!(msg.contains("never registered"), "{msg}");

    // An agent that answers CHECK with an endpoint without wiring.
    let fake = FakeAgent::start(answer_check_without_wiring)?;
    let mut conf = conf_for(&fake.socket(), "1.1.0");
    conf["prevResult"] = json!({ "cniVersion": "1.1.0", "ips": [{ "address": "10.244.0.2/32" }] });
    let out = exec_plugin(&node.ns, "CHECK", &env, &conf)?;
    let msg = out
        .expect_error(100)
        .context("CHECK answered with an endpoint without wiring (a fake agent)")?;
    assert!(
        msg.contains("c-unwired") && msg.contains("no veth"),
        "names the attachment and what it lacks: {msg}"
    );
    Ok(())
}

#[test]
fn cni_spec_a_hung_agent_is_try_again_later_within_the_timeout() -> Result<()> {
    let node = NetNs::new("node")?;
    let pod = NetNs::new("pod")?;
    let fake = FakeAgent::start(hang)?;
    let socket = fake.socket();
    let netns = cni_netns(&pod);
    let mut check = conf_for(&socket, "1.1.0");
    check["prevResult"] = json!({ "cniVersion": "1.1.0", "ips": [{ "address": "10.244.0.2/32" }] });
    let runs = [
        ("ADD", conf_for(&socket, "1.1.0")),
        ("DEL", conf_for(&socket, "1.1.0")),
        ("CHECK", check),
        ("STATUS", conf_for(&socket, "1.1.0")),
    ];
    // In parallel: each waits out the timeout.
    let outcomes = thread::scope(|s| {
        let handles: Vec<_> = runs
            .iter()
            .map(|(command, conf)| {
                let (node, netns) = (&node, netns.as_str());
                s.spawn(move || -> Result<(Duration, CniOutput)> {
                    let env = [
                        ("CNI_CONTAINERID", "c-hung"),
                        ("CNI_IFNAME", "eth0"),
                        ("CNI_NETNS", netns),
                    ];
                    let started = Instant::now();
                    let out = exec_plugin(node, command, &env, conf)?;
                    Ok((started.elapsed(), out))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("no panic"))
            .collect::<Result<Vec<_>>>()
    })?;
    for ((command, _), (took, out)) in runs.iter().zip(outcomes) {
        // STATUS reports an agent that cannot serve ADD as "not available".
        let code = if *command == "STATUS" { 50 } else { 11 };
        let msg = out
            .expect_error(code)
            .with_context(|| format!("{command} after {took:?}"))?;
        assert!(
            msg.contains(&socket.display().to_string()) && msg.contains("did not answer"),
            "{command}: names the socket and what happened: {msg}"
        );
        assert!(
            took < CALL_TIMEOUT + Duration::from_secs(5),
            "{command} gave up after {took:?}, the timeout is {CALL_TIMEOUT:?}"
        );
    }
    Ok(())
}

#[test]
fn cni_spec_del_accepts_configs_of_other_versions_than_the_add() -> Result<()> {
    let node = node()?;
    // Every version of the spec: a node's configuration may change between ADD and DEL (an
    // upgrade rolled back, a runtime that negotiates down), and a DEL refused leaks the pod.
    for version in [
        "0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0",
    ] {
        let id = format!("c-del-{}", version.replace('.', "-"));
        let pod = node.add_pod(&id)?;
        let veth = pod.host_veth()?.to_owned();
        let mut conf = node.conf();
        conf["cniVersion"] = version.into();
        conf["prevResult"] = pod.result.clone();
        let netns = cni_netns(&pod.ns);
        let env = [
            ("CNI_CONTAINERID", id.as_str()),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", netns.as_str()),
        ];
        let out = node.cni("DEL", &env, conf.to_string().as_bytes())?;
        assert!(
            out.success && out.stdout.is_empty(),
            "DEL with cniVersion {version} after ADD with 1.1.0: {out:?}"
        );
        assert!(
            !node.host_veths()?.contains(&veth),
            "{version}: veth removed"
        );
        assert!(
            !node.state()?.to_string().contains(&id),
            "{version}: address released"
        );
    }

    // A configuration that changed in what ADD validates does not block DEL either.
    let pod = node.add_pod("c-del-changed")?;
    let mut changed = node.conf();
    changed["ipam"] = json!({ "type": "host-local" });
    changed["mtu"] = 100.into();
    let netns = cni_netns(&pod.ns);
    let env = [
        ("CNI_CONTAINERID", "c-del-changed"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_NETNS", netns.as_str()),
    ];
    let out = node.cni("DEL", &env, changed.to_string().as_bytes())?;
    assert!(out.success, "DEL with a changed configuration: {out:?}");
    assert!(!node.state()?.to_string().contains("c-del-changed"));

    // CHECK: every version that has CHECK (0.4.0 on) accepts a 1.1.0 prevResult; older ones are
    // refused as the incompatible version they are.
    let pod = node.add_pod("c-check-versions")?;
    let netns = cni_netns(&pod.ns);
    let env = [
        ("CNI_CONTAINERID", "c-check-versions"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_NETNS", netns.as_str()),
    ];
    for version in ["0.4.0", "1.0.0", "1.1.0"] {
        let mut conf = node.conf();
        conf["cniVersion"] = version.into();
        conf["prevResult"] = pod.result.clone();
        let out = node.cni("CHECK", &env, conf.to_string().as_bytes())?;
        assert!(out.success, "CHECK with {version}: {out:?}");
    }
    let mut old = node.conf();
    old["cniVersion"] = "0.3.1".into();
    old["prevResult"] = pod.result.clone();
    let msg = node
        .cni("CHECK", &env, old.to_string().as_bytes())?
        .expect_error(1)?;
    assert!(
        msg.contains("CHECK") && msg.contains("0.4.0") && msg.contains("0.3.1"),
        "{msg}"
    );
    Ok(())
}

/// A 1.1.0 result of a plugin before podwire in a chain, with every field 1.1 defines and one
/// no version defines.
fn rich_prev_result() -> Value {
    json!({
        "cniVersion": "1.1.0",
        "interfaces": [
            { "name": "dpdk0", "mac": "02:11:22:33:44:55", "mtu": 9000, "sandbox": "/run/netns/other",
              "socketPath": "/run/vhost/dpdk0.sock", "pciID": "0000:00:1f.6" },
        ],
        "ips": [{ "address": "192.0.2.10/24", "gateway": "192.0.2.1", "interface": 0 }],
        "routes": [
            { "dst": "198.51.100.0/24", "gw": "192.0.2.1", "mtu": 1400, "advmss": 1360,
              "priority": 100, "table": 50, "scope": 0 },
        ],
        "dns": { "nameservers": ["10.96.0.10"], "domain": "cluster.local",
                 "search": ["svc.cluster.local"], "options": ["ndots:5"] },
        "x-vendor": { "kept": true },
    })
}

#[test]
fn cni_spec_add_keeps_every_field_of_a_chained_plugins_prev_result() -> Result<()> {
    let node = node()?;
    let pod = NetNs::new("pod")?;
    let netns = cni_netns(&pod);
    let env = [
        ("CNI_CONTAINERID", "c-chained"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_NETNS", netns.as_str()),
    ];
    let prev = rich_prev_result();
    let mut conf = node.conf();
    conf["prevResult"] = prev.clone();
    let result = node
        .cni("ADD", &env, conf.to_string().as_bytes())?
        .expect_success()?;
    assert_eq!(result["interfaces"][0], prev["interfaces"][0], "{result}");
    assert_eq!(result["ips"][0], prev["ips"][0], "{result}");
    assert_eq!(result["routes"][0], prev["routes"][0], "{result}");
    assert_eq!(result["dns"], prev["dns"], "{result}");
    assert_eq!(result["x-vendor"], prev["x-vendor"], "{result}");
    // Ours after them, our IP pointing at our pod interface (the third).
    assert_eq!(result["interfaces"][2]["name"], "eth0");
    assert_eq!(result["ips"][1]["interface"], 2);
    let ip = result["ips"][1]["address"].as_str().context("our IP")?;
    assert!(ip.starts_with("10.244.0."), "{result}");
    assert!(
        node.cni("DEL", &env, node.conf().to_string().as_bytes())?
            .success
    );
    Ok(())
}

#[test]
fn cni_spec_check_verifies_prev_results_interfaces_and_routes() -> Result<()> {
    let node = node()?;
    let pod = node.add_pod("c-verify")?;
    let netns = cni_netns(&pod.ns);
    let env = [
        ("CNI_CONTAINERID", "c-verify"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_NETNS", netns.as_str()),
    ];
    let check = |prev: &Value| -> Result<CniOutput> {
        let mut conf = node.conf();
        conf["prevResult"] = prev.clone();
        node.cni("CHECK", &env, conf.to_string().as_bytes())
    };
    let out = check(&pod.result)?;
    assert!(out.success, "CHECK of ADD's own result: {out:?}");

    // The pod's interface with another MAC than prevResult says.
    let mut wrong_mac = pod.result.clone();
    let real_mac = wrong_mac["interfaces"][1]["mac"].clone();
    wrong_mac["interfaces"][1]["mac"] = "02:00:00:00:00:01".into();
    let msg = check(&wrong_mac)?.expect_error(100)?;
    assert!(
        msg.contains("eth0")
            && msg.contains("02:00:00:00:00:01")
            && msg.contains(real_mac.as_str().context("MAC")?),
        "names the interface and both MACs: {msg}"
    );
    // So does the host side.
    let mut wrong_host_mac = pod.result.clone();
    wrong_host_mac["interfaces"][0]["mac"] = "02:00:00:00:00:02".into();
    let msg = check(&wrong_host_mac)?.expect_error(100)?;
    assert!(
        msg.contains(pod.host_veth()?) && msg.contains("02:00:00:00:00:02"),
        "{msg}"
    );
    // An interface prevResult puts in the pod that is not there.
    let mut extra_if = pod.result.clone();
    extra_if["interfaces"]
        .as_array_mut()
        .context("interfaces")?
        .push(json!({ "name": "net1", "sandbox": netns }));
    let msg = check(&extra_if)?.expect_error(100)?;
    assert!(msg.contains("net1"), "{msg}");

    // Routes prevResult lists that the pod lacks, in the main table and in another; once they
    // are there, CHECK passes.
    let mut more_routes = pod.result.clone();
    let routes = more_routes["routes"].as_array_mut().context("routes")?;
    routes.push(json!({ "dst": "10.10.0.0/16", "gw": "169.254.1.1" }));
    routes.push(json!({ "dst": "10.20.0.0/16", "gw": "169.254.1.1", "table": 100 }));
    let msg = check(&more_routes)?.expect_error(100)?;
    assert!(
        msg.contains("10.10.0.0/16"),
        "names the missing route: {msg}"
    );
    pod.ns.ip(&[
        "route",
        "add",
        "10.10.0.0/16",
        "via",
        "169.254.1.1",
        "dev",
        "eth0",
        "onlink",
    ])?;
    let msg = check(&more_routes)?.expect_error(100)?;
    assert!(
        msg.contains("10.20.0.0/16") && msg.contains("table 100"),
        "names the missing route and its table: {msg}"
    );
    // In the main table it is not the route prevResult asks for.
    pod.ns.ip(&[
        "route",
        "add",
        "10.20.0.0/16",
        "via",
        "169.254.1.1",
        "dev",
        "eth0",
        "onlink",
    ])?;
    check(&more_routes)?.expect_error(100)?;
    pod.ns.ip(&[
        "route",
        "add",
        "10.20.0.0/16",
        "via",
        "169.254.1.1",
        "dev",
        "eth0",
        "onlink",
        "table",
        "100",
    ])?;
    let out = check(&more_routes)?;
    assert!(out.success, "CHECK with every route in place: {out:?}");

    // A route with another gateway than prevResult says.
    let mut wrong_gw = pod.result.clone();
    wrong_gw["routes"]
        .as_array_mut()
        .context("routes")?
        .push(json!({ "dst": "10.10.0.0/16", "gw": "169.254.1.2" }));
    let msg = check(&wrong_gw)?.expect_error(100)?;
    assert!(
        msg.contains("10.10.0.0/16") && msg.contains("169.254.1.2"),
        "{msg}"
    );

    // Our default route gone.
    pod.ns.ip(&["route", "del", "default"])?;
    let msg = check(&pod.result)?.expect_error(100)?;
    assert!(
        msg.contains("0.0.0.0/0") || msg.contains("default"),
        "{msg}"
    );
    Ok(())
}

#[test]
fn cni_spec_gc_without_valid_attachments_is_an_invalid_config() -> Result<()> {
    let node = node()?;
    let a = node.add_pod("c-gc-a")?;
    let b = node.add_pod("c-gc-b")?;
    let msg = node
        .cni("GC", &[], node.conf().to_string().as_bytes())?
        .expect_error(7)?;
    assert!(
        msg.contains("cni.dev/valid-attachments"),
        "names the key: {msg}"
    );
    // Nothing was collected.
    let mut ips: Vec<Ipv4Addr> = node.endpoints()?.into_iter().map(|(ip, _)| ip).collect();
    ips.sort();
    assert_eq!(ips, [a.ip, b.ip]);
    let veths = node.host_veths()?;
    assert!(
        veths.contains(&a.host_veth()?.to_owned()) && veths.contains(&b.host_veth()?.to_owned()),
        "{veths:?}"
    );
    assert_eq!(pod_ip(&a.result)?, a.ip);

    // An empty list is a list: nothing is valid any more.
    let mut conf = node.conf();
    conf["cni.dev/valid-attachments"] = json!([]);
    let out = node.cni("GC", &[], conf.to_string().as_bytes())?;
    assert!(out.success, "GC with an empty list: {out:?}");
    assert!(node.endpoints()?.is_empty());
    Ok(())
}
