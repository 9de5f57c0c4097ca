//! The agent's Kubernetes side against a real kube-apiserver v1.20.2 (podwire-lab's control
//! plane on the underlay): the node table follows the API's Nodes (added, given a pod CIDR,
//! readdressed, deleted, recreated with another pod CIDR, across an API server restart), the
//! agent's own Node gets NetworkUnavailable=False, /readyz and /metrics tell the truth, and the
//! node is cleaned on uninstall (its DaemonSet deleted, then SIGTERM) or `--cleanup`, and kept
//! on a plain SIGTERM.
//!
//! What a kubelet and the controller manager would write is written by the test: Nodes with
//! kubectl, their status (addresses) through the status subresource with the lab admin's token.

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{bail, ensure, Context as _, Result};
use nix::sys::signal::Signal;
use podwire_common::Reason;
use podwire_lab::{
    artifacts::bin,
    eventually,
    k8s::{ControlPlane, API_PORT, CONTROL_PLANE_IP},
    namespaces::NetNs,
    nodes::{Node, PinRoot, Underlay, CLUSTER_CIDR},
    processes::{run, run_with_stdin, Daemon},
    traffic::ping,
};
use serde_json::{json, Value};

/// Bounds every wait for the agent to catch up; tests never assert on time.
const CATCH_UP: Duration = Duration::from_secs(60);
const ME: &str = "node1";
const MY_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 1);
const MY_CIDR: &str = "10.244.1.0/24";
/// The agent's default health and metrics address, in its node's namespace.
const HTTP: &str = "http://127.0.0.1:9962";

/// Registers a Node as its kubelet would (InternalIP in its status from the start) with the pod
/// CIDR the controller manager would give it, if any.
fn create_node(cp: &ControlPlane, name: &str, ip: &str, pod_cidr: Option<&str>) -> Result<()> {
    let spec = match pod_cidr {
        Some(cidr) => json!({ "podCIDR": cidr, "podCIDRs": [cidr] }),
        None => json!({}),
    };
    cp.apply(&json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": { "name": name },
        "spec": spec,
        "status": { "addresses": [
            { "type": "InternalIP", "address": ip },
            { "type": "Hostname", "address": name },
        ]},
    }))
}

/// Gives a Node without one its pod CIDR, as the controller manager does (the API allows
/// setting it once, never changing it).
fn assign_pod_cidr(cp: &ControlPlane, name: &str, cidr: &str) -> Result<()> {
    let patch = json!({ "spec": { "podCIDR": cidr, "podCIDRs": [cidr] } }).to_string();
    run(&mut cp.kubectl(["patch", "node", name, "--patch", &patch]))?;
    Ok(())
}

/// Replaces a Node's addresses through the status subresource, as its kubelet does (kubectl
/// 1.20 cannot patch a subresource: curl with the lab admin's token, in the control plane's
/// namespace where the API server listens).
fn set_address(cp: &ControlPlane, name: &str, ip: &str) -> Result<()> {
    let kubeconfig: Value = serde_json::from_slice(&std::fs::read(cp.kubeconfig())?)?;
    let token = kubeconfig["users"][0]["user"]["token"]
        .as_str()
        .context("a token in the lab kubeconfig")?;
    let patch = json!({ "status": { "addresses": [
        { "type": "InternalIP", "address": ip },
        { "type": "Hostname", "address": name },
    ]}});
    let out = run_with_stdin(
        cp.ns
            .command("curl")
            .args(["--silent", "--show-error", "--fail", "--insecure"])
            .args(["--request", "PATCH", "--data-binary", "@-"])
            .args(["--header", "Content-Type: application/merge-patch+json"])
            .arg("--header")
            .arg(format!("Authorization: Bearer {token}"))
            .arg(format!(
                "https://{CONTROL_PLANE_IP}:{API_PORT}/api/v1/nodes/{name}/status"
            )),
        patch.to_string().as_bytes(),
    )?;
    let node: Value = serde_json::from_slice(&out.stdout)?;
    ensure!(
        node["status"]["addresses"][0]["address"] == ip,
        "the API did not take the address: {node}"
    );
    Ok(())
}

fn delete_node(cp: &ControlPlane, name: &str) -> Result<()> {
    run(&mut cp.kubectl(["delete", "node", name, "--wait=true"]))?;
    Ok(())
}

/// One row of `podwire nodes -o json`: prefix, kind, node address.
type Row = (String, String, Option<String>);

/// The node table `node1` must have with the other nodes `others` (name-less: address, pod
/// CIDR).
fn table_for(others: &[(&str, &str)]) -> BTreeSet<Row> {
    let row = |p: &str, k: &str, n: Option<&str>| (p.to_owned(), k.to_owned(), n.map(Into::into));
    let mut rows = BTreeSet::from([
        row(CLUSTER_CIDR, "no-node", None),
        row(MY_CIDR, "local", Some(&MY_IP.to_string())),
    ]);
    for (ip, cidr) in others {
        rows.insert(row(cidr, "remote", Some(ip)));
        rows.insert(row(&format!("{ip}/32"), "remote", Some(ip)));
    }
    rows
}

/// The agent's node table as operators read it.
fn table(node: &Node) -> Result<BTreeSet<Row>> {
    let out = node.podwire(&["nodes", "-o", "json"])?;
    let rows: Value = serde_json::from_slice(&out.stdout)?;
    rows.as_array()
        .context("an array of rows")?
        .iter()
        .map(|r| {
            Ok((
                r["prefix"].as_str().context("prefix")?.to_owned(),
                r["kind"].as_str().context("kind")?.to_owned(),
                r["node"].as_str().map(Into::into),
            ))
        })
        .collect()
}

/// Waits until the node table is `want`, failing with the last one seen.
fn expect_table(node: &Node, step: &str, want: &BTreeSet<Row>) -> Result<()> {
    let mut last = BTreeSet::new();
    let caught_up = eventually(CATCH_UP, || {
        last = table(node)?;
        Ok(&last == want)
    })?;
    assert!(
        caught_up,
        "{step}: the node table is\n{last:#?}\nnot\n{want:#?}"
    );
    Ok(())
}

/// `curl` of `path` on the agent's HTTP listener in `ns`: status code and body.
fn http_get(ns: &NetNs, path: &str) -> Result<(u16, String)> {
    let out = ns
        .command("curl")
        .args([
            "--silent",
            "--max-time",
            "5",
            "--write-out",
            "\n%{http_code}",
        ])
        .arg(format!("{HTTP}{path}"))
        .output()
        .context("running curl")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').context("curl's status line")?;
    Ok((code.parse().unwrap_or(0), body.to_owned()))
}

/// The value of the sample `name{labels}` (exactly as written) in the agent's /metrics.
fn metric(ns: &NetNs, sample: &str) -> Result<f64> {
    let (code, text) = http_get(ns, "/metrics")?;
    ensure!(code == 200, "/metrics answered {code}: {text}");
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' '))
        .with_context(|| format!("no {sample} in /metrics:\n{text}"))?
        .parse()
        .with_context(|| format!("{sample}'s value"))
}

fn agent_args(kubeconfig: &Path) -> Vec<String> {
    [
        "--kubernetes",
        "--kubeconfig",
        &kubeconfig.display().to_string(),
        "--cluster-cidr",
        CLUSTER_CIDR,
        "--node-name",
        ME,
    ]
    .map(String::from)
    .to_vec()
}

#[test]
fn kubernetes_node_table_follows_the_api_servers_nodes() -> Result<()> {
    podwire_lab::require_root()?;
    let underlay = Underlay::new()?;
    let mut cp = ControlPlane::start(&underlay, CONTROL_PLANE_IP)?;
    create_node(&cp, ME, &MY_IP.to_string(), Some(MY_CIDR))?;
    create_node(&cp, "node2", "192.168.77.2", Some("10.244.2.0/24"))?;
    // Registered, no pod CIDR yet: not in the table until it has one.
    create_node(&cp, "node3", "192.168.77.3", None)?;

    let ns = underlay.plug("node", MY_IP, false)?;
    let mut node = Node::start_in(ns, MY_IP, agent_args(&cp.kubeconfig()), None)?;
    expect_table(
        &node,
        "at start",
        &table_for(&[("192.168.77.2", "10.244.2.0/24")]),
    )?;

    assign_pod_cidr(&cp, "node3", "10.244.3.0/24")?;
    expect_table(
        &node,
        "node3 given its pod CIDR",
        &table_for(&[
            ("192.168.77.2", "10.244.2.0/24"),
            ("192.168.77.3", "10.244.3.0/24"),
        ]),
    )?;

    set_address(&cp, "node2", "192.168.77.12")?;
    expect_table(
        &node,
        "node2 readdressed",
        &table_for(&[
            ("192.168.77.12", "10.244.2.0/24"),
            ("192.168.77.3", "10.244.3.0/24"),
        ]),
    )?;

    delete_node(&cp, "node3")?;
    expect_table(
        &node,
        "node3 deleted",
        &table_for(&[("192.168.77.12", "10.244.2.0/24")]),
    )?;
    // A pod CIDR never changes on a Node: a node that gets another one is a new Node.
    create_node(&cp, "node3", "192.168.77.13", Some("10.244.30.0/24"))?;
    expect_table(
        &node,
        "node3 back with another pod CIDR and address",
        &table_for(&[
            ("192.168.77.12", "10.244.2.0/24"),
            ("192.168.77.13", "10.244.30.0/24"),
        ]),
    )?;

    // The API server restarted under the agent's watch: the connection drops, and the new
    // server's watch cache starts at the latest revision, which a write elsewhere (a ConfigMap,
    // unseen by the Node watch) has moved past the agent's last one: resuming gets 410 Expired,
    // and the agent lists again. Then it follows as before.
    run(&mut cp.kubectl(["create", "configmap", "a-newer-revision"]))?;
    cp.restart_apiserver()?;
    create_node(&cp, "node4", "192.168.77.4", Some("10.244.4.0/24"))?;
    delete_node(&cp, "node2")?;
    expect_table(
        &node,
        "after the API server restarted: node4 added, node2 deleted",
        &table_for(&[
            ("192.168.77.13", "10.244.30.0/24"),
            ("192.168.77.4", "10.244.4.0/24"),
        ]),
    )?;

    // The agent's own Node is marked ready for pods' networking.
    let mut condition = Value::Null;
    let marked = eventually(CATCH_UP, || {
        let out = run(&mut cp.kubectl(["get", "node", ME, "--output", "json"]))?;
        let node: Value = serde_json::from_slice(&out.stdout)?;
        condition = node["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["type"] == "NetworkUnavailable")
            .cloned()
            .unwrap_or(Value::Null);
        Ok(!condition.is_null())
    })?;
    assert!(marked, "{ME} has no NetworkUnavailable condition");
    assert_eq!(condition["status"], "False", "{condition}");
    assert_eq!(condition["reason"], "PodwireIsUp", "{condition}");
    assert!(condition["lastTransitionTime"].is_string(), "{condition}");

    // The metrics: the cluster as applied, the CNI requests of two ADDs (an allocate and a
    // register each), and the datapath's counter of pod-to-pod traffic on the node, which
    // moves with a ping and is what the pinned map holds.
    assert_eq!(metric(&node.ns, "podwire_cluster_nodes")?, 3.0);
    assert!(metric(&node.ns, "podwire_cluster_syncs_total")? >= 6.0);
    assert!(metric(&node.ns, "podwire_cluster_last_sync_timestamp_seconds")? > 1.7e9);
    assert_eq!(metric(&node.ns, "podwire_endpoints")?, 0.0);
    let a = node.add_pod("metrics-a")?;
    let b = node.add_pod("metrics-b")?;
    for request in ["allocate", "register"] {
        let sample = format!(
            "podwire_cni_request_duration_seconds_count{{command=\"ADD\",request=\"{request}\",result=\"ok\"}}"
        );
        assert_eq!(metric(&node.ns, &sample)?, 2.0, "{sample}");
    }
    assert_eq!(metric(&node.ns, "podwire_endpoints")?, 2.0);
    assert_eq!(metric(&node.ns, "podwire_node_table_entries")?, 6.0);
    let local = "podwire_datapath_packets_total{reason=\"redirect-local\"}";
    let before = metric(&node.ns, local).unwrap_or(0.0);
    assert!(ping(&a.ns, b.ip)?, "pod to pod on the node");
    let after = metric(&node.ns, local)?;
    assert!(
        after >= before + 2.0,
        "{local}: {before} before the ping, {after} after"
    );
    assert_eq!(
        after,
        node.counter(Reason::RedirectLocal)?.packets as f64,
        "the metric is the pinned counter"
    );
    assert!(
        metric(
            &node.ns,
            "podwire_datapath_bytes_total{reason=\"redirect-local\"}"
        )? > 0.0
    );
    // The restart's 410 (and the refused reconnects, if the watch retried while the server was
    // down) were counted and logged.
    let errors = metric(&node.ns, "podwire_cluster_sync_errors_total")?;
    assert!(errors >= 1.0, "podwire_cluster_sync_errors_total {errors}");
    let log = node.stop_agent()?;
    let expired = log
        .iter()
        .any(|l| l.contains("watching Nodes") && l.contains("too old resource version"));
    assert!(expired, "no 410 in the agent's log:\n{}", log.join("\n"));
    Ok(())
}

/// An agent in `ns` started by hand (the lab's Node waits for it to serve, which it does not
/// before its Node exists), with everything it puts on the node where the test can see it.
struct HandAgent {
    kubeconfig: PathBuf,
    state_dir: tempfile::TempDir,
    files: tempfile::TempDir,
    pins: PinRoot,
}

impl HandAgent {
    fn new(cp: &ControlPlane) -> Result<HandAgent> {
        let files = tempfile::tempdir()?;
        std::fs::write(files.path().join("10-podwire.conflist"), "{}")?;
        std::fs::write(files.path().join("podwire-cni"), "plugin")?;
        Ok(HandAgent {
            kubeconfig: cp.kubeconfig(),
            state_dir: tempfile::tempdir()?,
            files,
            pins: PinRoot::new(),
        })
    }

    fn conf_file(&self) -> PathBuf {
        self.files.path().join("10-podwire.conflist")
    }

    fn bin_file(&self) -> PathBuf {
        self.files.path().join("podwire-cni")
    }

    /// podwire-agent in `ns` with `extra` arguments (e.g. --cleanup).
    fn command(&self, ns: &NetNs, extra: &[&str]) -> Result<Command> {
        let mut cmd = ns.command(bin("podwire-agent")?);
        cmd.args(agent_args(&self.kubeconfig))
            .args(["--daemonset", "podwire"])
            .arg("--cni-conf-file")
            .arg(self.conf_file())
            .arg("--cni-bin-file")
            .arg(self.bin_file())
            .arg("--state-dir")
            .arg(self.state_dir.path())
            .arg("--socket")
            .arg(self.state_dir.path().join("agent.sock"))
            .arg("--bpffs")
            .arg(self.pins.path())
            .args(extra)
            .env("POD_NAMESPACE", "default")
            .env("PODWIRE_LOG", "info");
        Ok(cmd)
    }

    /// What of podwire is on the node: the CNI files, pinned links and maps, the overlay
    /// device, the masquerade table, the state directory.
    fn installed(&self, ns: &NetNs) -> Result<Vec<String>> {
        let mut found = Vec::new();
        for file in [self.conf_file(), self.bin_file()] {
            if file.exists() {
                found.push(file.display().to_string());
            }
        }
        for dir in ["links", "maps"] {
            let path = self.pins.path().join(dir);
            if let Ok(entries) = std::fs::read_dir(&path) {
                found.extend(entries.flatten().map(|e| e.path().display().to_string()));
            }
        }
        if ns.ip(&["link", "show", "pw-vxlan"]).is_ok() {
            found.push("pw-vxlan".into());
        }
        let nft = ns
            .command("nft")
            .args(["list", "table", "ip", "podwire"])
            .output()?;
        if nft.status.success() {
            found.push("nft table ip podwire".into());
        }
        if self.state_dir.path().exists() {
            found.push(self.state_dir.path().display().to_string());
        }
        Ok(found)
    }
}

fn daemonset() -> Value {
    let labels = json!({ "app": "podwire" });
    json!({
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": { "name": "podwire", "namespace": "default" },
        "spec": {
            "selector": { "matchLabels": labels },
            "template": {
                "metadata": { "labels": labels },
                "spec": { "containers": [{ "name": "agent", "image": "podwire:lab" }] },
            },
        },
    })
}

fn stop(agent: Daemon) -> Result<Vec<String>> {
    let (status, log) = agent.stop(Signal::SIGTERM)?;
    ensure!(status.success(), "agent exit: {status}\n{}", log.join("\n"));
    Ok(log)
}

#[test]
fn kubernetes_readiness_waits_for_the_node_and_uninstall_cleans_it() -> Result<()> {
    podwire_lab::require_root()?;
    let underlay = Underlay::new()?;
    let cp = ControlPlane::start(&underlay, CONTROL_PLANE_IP)?;
    cp.apply(&daemonset())?;
    let ns = underlay.plug("node", MY_IP, false)?;
    let hand = HandAgent::new(&cp)?;

    // No Node yet: the agent waits, alive and saying why it is not ready.
    let mut agent = Daemon::spawn(hand.command(&ns, &[])?, None)?;
    agent.wait_for_line("waiting for Node node1")?;
    let (code, body) = http_get(&ns, "/healthz")?;
    assert_eq!((code, body.as_str()), (200, "ok\n"));
    let (code, body) = http_get(&ns, "/readyz")?;
    assert_eq!(code, 503, "{body}");
    assert_eq!(
        body,
        "not ready: datapath not loaded, cluster not synced, CNI socket not serving\n"
    );

    // Registered without a pod CIDR, then given one (as the controller manager does).
    create_node(&cp, ME, &MY_IP.to_string(), None)?;
    let line = agent.wait_for_line("no IPv4 podCIDR yet")?;
    assert!(line.contains("node=node1"), "{line}");
    assign_pod_cidr(&cp, ME, MY_CIDR)?;
    agent.wait_for_line("serving CNI requests")?;
    let ready = eventually(CATCH_UP, || Ok(http_get(&ns, "/readyz")?.0 == 200))?;
    assert!(ready, "/readyz: {:?}", http_get(&ns, "/readyz")?);

    // A SIGTERM with the DaemonSet in place (a restart, a rolling update) keeps everything.
    let installed = hand.installed(&ns)?;
    for what in ["pw-vxlan", "nft table ip podwire", "10-podwire.conflist"] {
        assert!(
            installed.iter().any(|i| i.ends_with(what)),
            "{what} in {installed:#?}"
        );
    }
    stop(agent)?;
    assert_eq!(
        hand.installed(&ns)?,
        installed,
        "a plain SIGTERM keeps it all"
    );

    // `--cleanup` removes it all, and says what it removed.
    let out = run(&mut hand.command(&ns, &["--cleanup"])?)?;
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(hand.installed(&ns)?, Vec::<String>::new(), "{log}");
    for what in ["10-podwire.conflist", "pw-vxlan", "nft", "pins"] {
        assert!(
            log.lines()
                .any(|l| l.contains("removed") && l.contains(what)),
            "no removal of {what} logged:\n{log}"
        );
    }

    // Installed again; then the DaemonSet is deleted (helm uninstall) and the pod stopped.
    std::fs::write(hand.conf_file(), "{}")?;
    std::fs::write(hand.bin_file(), "plugin")?;
    let mut agent = Daemon::spawn(hand.command(&ns, &[])?, None)?;
    agent.wait_for_line("serving CNI requests")?;
    ensure!(!hand.installed(&ns)?.is_empty(), "reinstalled");
    run(&mut cp.kubectl(["delete", "daemonset", "podwire", "--namespace", "default"]))?;
    agent.wait_for_line("podwire is being uninstalled")?;
    let log = stop(agent)?;
    let installed = hand.installed(&ns)?;
    if !installed.is_empty() {
        bail!(
            "left after uninstall: {installed:#?}\nagent log:\n{}",
            log.join("\n")
        );
    }
    assert!(
        log.iter()
            .any(|l| l.contains("podwire removed from this node")),
        "{}",
        log.join("\n")
    );
    Ok(())
}
