//! podwire installed the way users install it, on real kubelet nodes: the image built by `cargo
//! xtask image` imported into each node's containerd, `helm install` of helm/podwire, and from
//! then on nothing configured by hand. The real kubelet runs the DaemonSet's pods with their init
//! containers; the nodes turn Ready only then; a Deployment's pods on both nodes reach each other,
//! pass kubelet's HTTP readiness probes, answer `kubectl exec` and `kubectl logs`; a ClusterIP
//! Service through the real kube-proxy answers from pods and from the host of every node; a
//! rolling restart of the DaemonSet loses no TCP connection of running pods; a Node deleted from
//! the API leaves every node's table; `helm uninstall` leaves the nodes clean.
//!
//! One test: the cluster takes most of a minute to start, and every step builds on the last.

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{bail, ensure, Context as _, Result};
use ipnet::Ipv4Net;
use podwire_core::object::programs;
use podwire_lab::{
    artifacts, eventually,
    images::BUSYBOX_IMAGE,
    kubelet::{self, KubeCluster, KubeNode},
    processes::{run, run_with_stdin},
};
use serde_json::{json, Value};

const NAMESPACE: &str = "kube-system";
const RELEASE: &str = "podwire";
/// Generous bounds against hanging on two busy CPUs; nothing here asserts on time.
const WAIT: Duration = Duration::from_secs(180);
/// Where the chart pins podwire's maps and links in each node.
const PINS: &str = "/sys/fs/bpf/podwire";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn stdout(cmd: &mut Command) -> Result<String> {
    Ok(String::from_utf8_lossy(&run(cmd)?.stdout).into_owned())
}

fn kubectl_json(cluster: &KubeCluster, args: &[&str]) -> Result<Value> {
    let mut cmd = cluster.kubectl(args);
    cmd.args(["-o", "json"]);
    serde_json::from_str(&stdout(&mut cmd)?).with_context(|| format!("kubectl {args:?}"))
}

fn apply(cluster: &KubeCluster, manifest: &Value) -> Result<()> {
    run_with_stdin(
        &mut cluster.kubectl(["apply", "-f", "-"]),
        manifest.to_string().as_bytes(),
    )?;
    Ok(())
}

/// helm with the admin's kubeconfig, in the control plane's namespace (where the API server is
/// reachable).
fn helm(cluster: &KubeCluster, args: &[&str]) -> Result<String> {
    let helm = artifacts::helm()?;
    let mut cmd = cluster.cp.ns.command(helm);
    cmd.arg("--kubeconfig")
        .arg(cluster.kubeconfig())
        .args(["--namespace", NAMESPACE])
        .args(args);
    stdout(&mut cmd)
}

/// A running pod, as the API reports it.
#[derive(Debug, Clone)]
struct PodInfo {
    name: String,
    node: String,
    ip: Ipv4Addr,
    ready: bool,
    restarts: u64,
}

fn pods(cluster: &KubeCluster, namespace: &str, selector: &str) -> Result<Vec<PodInfo>> {
    let list = kubectl_json(cluster, &["get", "pods", "-n", namespace, "-l", selector])?;
    Ok(list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .filter_map(|p| {
            let statuses = p["status"]["containerStatuses"].as_array();
            Some(PodInfo {
                name: p["metadata"]["name"].as_str()?.to_owned(),
                node: p["spec"]["nodeName"].as_str()?.to_owned(),
                ip: p["status"]["podIP"].as_str()?.parse().ok()?,
                ready: p["status"]["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True"),
                restarts: statuses
                    .into_iter()
                    .flatten()
                    .filter_map(|s| s["restartCount"].as_u64())
                    .sum(),
            })
        })
        .collect())
}

/// Waits until `count` pods match `selector`, all Ready.
fn wait_pods_ready(
    cluster: &KubeCluster,
    namespace: &str,
    selector: &str,
    count: usize,
) -> Result<Vec<PodInfo>> {
    let mut last = Vec::new();
    let ready = eventually(WAIT, || {
        last = pods(cluster, namespace, selector)?;
        Ok(last.len() == count && last.iter().all(|p| p.ready))
    })?;
    if !ready {
        let mut report = format!("{count} pods {selector} in {namespace} not all Ready: {last:#?}");
        for pod in &last {
            for previous in [false, true] {
                let mut logs = cluster.kubectl(["logs", "-n", namespace, &pod.name]);
                logs.args(["--all-containers", "--tail=40"]);
                if previous {
                    logs.arg("--previous");
                }
                let text = stdout(&mut logs).unwrap_or_else(|e| format!("{e:#}"));
                report += &format!("\n{} logs (previous: {previous}):\n{text}", pod.name);
            }
        }
        let events =
            stdout(&mut cluster.kubectl(["get", "events", "-n", namespace])).unwrap_or_default();
        bail!("{report}\nevents:\n{events}");
    }
    Ok(last)
}

/// `kubectl exec` of `command` in `pod`; its stdout.
fn exec(cluster: &KubeCluster, pod: &str, command: &[&str]) -> Result<String> {
    let mut cmd = cluster.kubectl(["exec", "-n", "default", pod, "--"]);
    cmd.args(command);
    stdout(&mut cmd)
}

/// The node table a node's agent keeps, read from its pins by the podwire CLI: CIDR → node
/// address of remote entries.
fn node_table(node: &KubeNode) -> Result<Vec<(Ipv4Net, String)>> {
    let mut cmd = node.command(artifacts::bin("podwire")?);
    cmd.args(["--bpffs", PINS, "nodes", "-o", "json"]);
    let table: Value = serde_json::from_str(&stdout(&mut cmd)?).context("podwire nodes -o json")?;
    let mut rows: Vec<(Ipv4Net, String)> = table
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|row| Some((row["prefix"].as_str()?.parse().ok()?, row.to_string())))
        .collect();
    rows.sort();
    Ok(rows)
}

fn node_table_has(node: &KubeNode, cidr: &str) -> Result<bool> {
    let cidr: Ipv4Net = cidr.parse()?;
    Ok(node_table(node)?.iter().any(|(c, _)| *c == cidr))
}

/// Ids of the loaded programs with podwire's names: the cluster's are those that appear while it
/// runs (other podwire datapaths on this machine keep theirs).
fn podwire_programs() -> Result<BTreeSet<u32>> {
    let mut ids = BTreeSet::new();
    for program in aya::programs::loaded_programs() {
        let program = program.context("listing the loaded eBPF programs")?;
        if program
            .name_as_str()
            .is_some_and(|name| programs::ALL.contains(&name))
        {
            ids.insert(program.id());
        }
    }
    Ok(ids)
}

/// Whether `path` exists in the node's mount namespace.
fn exists_in(node: &KubeNode, path: &str) -> Result<bool> {
    let status = node
        .command("test")
        .args(["-e", path])
        .status()
        .with_context(|| format!("test -e {path} in {}", node.name))?;
    Ok(status.success())
}

/// What podwire leaves on a node: pins, its device, XDP on the uplink, CNI files.
fn podwire_leftovers(node: &KubeNode) -> Result<Vec<String>> {
    let mut found = Vec::new();
    if exists_in(node, PINS)? {
        found.push(format!("{PINS} exists"));
    }
    let links = stdout(node.command("ip").args(["-d", "-o", "link", "show"]))?;
    for line in links.lines() {
        if line.contains("pw-vxlan") || line.contains("xdp") {
            found.push(format!("link: {line}"));
        }
    }
    for file in [
        node.cni_conf_dir().join("10-podwire.conflist"),
        node.cni_bin_dir().join("podwire-cni"),
    ] {
        if file.exists() {
            found.push(format!("{} exists", file.display()));
        }
    }
    Ok(found)
}

#[test]
fn helm_installed_podwire_carries_a_real_cluster() -> Result<()> {
    let image = artifacts::image_archive()?;
    let programs_before = podwire_programs()?;
    let cluster = KubeCluster::start(2)?;
    for node in &cluster.nodes {
        node.import_image(&image)?;
    }

    // Without a CNI the nodes are NotReady, as on any new cluster.
    for node in cluster.api_nodes()? {
        ensure!(
            !node.ready,
            "{} Ready before podwire was installed",
            node.name
        );
    }

    helm(
        &cluster,
        &[
            "install",
            RELEASE,
            &repo().join("helm/podwire").display().to_string(),
        ],
    )?;
    let agents = wait_pods_ready(&cluster, NAMESPACE, "app.kubernetes.io/name=podwire", 2)?;
    cluster.wait_ready(WAIT)?;
    for node in &cluster.nodes {
        ensure!(
            agents.iter().any(|a| a.node == node.name),
            "no podwire agent on {}: {agents:#?}",
            node.name
        );
        let api = kubectl_json(&cluster, &["get", "node", &node.name])?;
        let condition = api["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["type"] == "NetworkUnavailable")
            .cloned();
        ensure!(
            condition.as_ref().is_some_and(|c| c["status"] == "False"),
            "{}'s NetworkUnavailable condition is {condition:?}, not False",
            node.name
        );
        let forwarding = stdout(node.command("cat").arg("/proc/sys/net/ipv4/ip_forward"))?;
        ensure!(
            forwarding.trim() == "1",
            "{}: ip_forward {forwarding}",
            node.name
        );
    }

    // A Deployment spread over both nodes, with HTTP readiness probes kubelet runs.
    apply(&cluster, &kubelet::web_deployment(4))?;
    let web = wait_pods_ready(&cluster, "default", "app=web", 4)?;
    for node in &cluster.nodes {
        let cidr: Ipv4Net = cluster.pod_cidr(&node.name)?.parse()?;
        let on_node: Vec<_> = web.iter().filter(|p| p.node == node.name).collect();
        ensure!(!on_node.is_empty(), "no web pod on {}: {web:#?}", node.name);
        for pod in on_node {
            ensure!(
                cidr.contains(&pod.ip),
                "{} on {} has {} outside the node's podCIDR {cidr}",
                pod.name,
                node.name,
                pod.ip
            );
        }
    }
    for from in &web {
        for to in &web {
            let page = exec(
                &cluster,
                &from.name,
                &[
                    "timeout",
                    "10",
                    "wget",
                    "-q",
                    "-O-",
                    &format!("http://{}:8080/", to.ip),
                ],
            )
            .with_context(|| {
                format!("{} ({}) to {} ({})", from.name, from.node, to.name, to.node)
            })?;
            ensure!(
                page.trim() == to.name,
                "{} asked {} ({}) and got {page:?}",
                from.name,
                to.name,
                to.ip
            );
        }
    }
    let logs = stdout(&mut cluster.kubectl(["logs", "-n", "default", &web[0].name]))?;
    ensure!(
        logs.contains("serving"),
        "kubectl logs of {} gave {logs:?}",
        web[0].name
    );

    // A ClusterIP Service through kube-proxy, from a pod and from the host of every node.
    apply(&cluster, &kubelet::web_service())?;
    let svc = kubectl_json(&cluster, &["get", "service", "-n", "default", "web"])?;
    let cluster_ip = svc["spec"]["clusterIP"]
        .as_str()
        .context("the web Service has no clusterIP")?
        .to_owned();
    let url = format!("http://{cluster_ip}/");
    for node in &cluster.nodes {
        let pod = web
            .iter()
            .find(|p| p.node == node.name)
            .expect("checked above");
        let mut answered = String::new();
        let ok = eventually(WAIT, || {
            answered = exec(
                &cluster,
                &pod.name,
                &["timeout", "5", "wget", "-q", "-O-", &url],
            )
            .unwrap_or_default();
            Ok(web.iter().any(|p| answered.trim() == p.name))
        })?;
        ensure!(ok, "{url} from {} on {}: {answered:?}", pod.name, node.name);
        let mut host = node.command("busybox");
        host.args(["timeout", "5", "wget", "-q", "-O-", &url]);
        let page = stdout(&mut host).with_context(|| format!("{url} from {}'s host", node.name))?;
        ensure!(
            web.iter().any(|p| page.trim() == p.name),
            "{url} from {}'s host: {page:?}",
            node.name
        );
    }

    // Long TCP connections, one within a node and one across nodes, through a rolling restart
    // of every agent: a lost connection ends its nc, and kubelet restarts the container.
    let node1 = &cluster.nodes[0].name;
    let node2 = &cluster.nodes[1].name;
    for (name, node) in [("sink-a", node1.as_str()), ("sink-b", node1.as_str())] {
        apply(&cluster, &pinned_pod(name, node, "nc -l -p 9000"))?;
    }
    let sinks = wait_pods_ready(&cluster, "default", "role=sink", 2)?;
    let ip_of = |name: &str| {
        sinks
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.ip)
            .expect("sink")
    };
    for (name, node, sink) in [
        ("source-same", node1.as_str(), ip_of("sink-a")),
        ("source-cross", node2.as_str(), ip_of("sink-b")),
    ] {
        // busybox's nc sends only the first line of a pipe; with -e it runs the counter with
        // its stdout on the connection.
        let script = format!(
            "exec nc {sink} 9000 -e sh -c \
             'i=0; while true; do echo $i; i=$((i+1)); sleep 0.1; done'"
        );
        let mut pod = pinned_pod(name, node, &script);
        pod["metadata"]["labels"]["role"] = json!("source");
        apply(&cluster, &pod)?;
    }
    wait_pods_ready(&cluster, "default", "role=source", 2)?;
    let before: Vec<u64> = ["sink-a", "sink-b"]
        .iter()
        .map(|s| last_number(&cluster, s))
        .collect::<Result<_>>()?;
    run(&mut cluster.kubectl(["rollout", "restart", "-n", NAMESPACE, "daemonset/podwire"]))?;
    run(&mut cluster.kubectl([
        "rollout",
        "status",
        "-n",
        NAMESPACE,
        "daemonset/podwire",
        "--timeout=300s",
    ]))?;
    wait_pods_ready(&cluster, NAMESPACE, "app.kubernetes.io/name=podwire", 2)?;
    std::thread::sleep(Duration::from_secs(2));
    for (sink, before) in ["sink-a", "sink-b"].iter().zip(before) {
        let after = last_number(&cluster, sink)?;
        ensure!(
            after > before + 10,
            "{sink} received up to {before} before the rolling restart and {after} after"
        );
        check_contiguous(&cluster, sink)?;
    }
    for pod in pods(&cluster, "default", "role in (sink,source)")? {
        ensure!(
            pod.restarts == 0,
            "{} on {} restarted {} times: its TCP connection broke",
            pod.name,
            pod.node,
            pod.restarts
        );
    }

    // A Node that leaves the API leaves every node's table.
    let ghost = json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": "ghost"},
        "spec": {"podCIDR": "10.244.99.0/24", "podCIDRs": ["10.244.99.0/24"]},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.168.77.99"}]},
    });
    run_with_stdin(
        &mut cluster.kubectl(["create", "-f", "-"]),
        ghost.to_string().as_bytes(),
    )?;
    for node in &cluster.nodes {
        let seen = eventually(WAIT, || node_table_has(node, "10.244.99.0/24"))?;
        ensure!(
            seen,
            "{}'s table never got ghost: {:?}",
            node.name,
            node_table(node)?
        );
    }
    run(&mut cluster.kubectl(["delete", "node", "ghost"]))?;
    for node in &cluster.nodes {
        let gone = eventually(WAIT, || Ok(!node_table_has(node, "10.244.99.0/24")?))?;
        ensure!(
            gone,
            "{}'s table kept ghost: {:?}",
            node.name,
            node_table(node)?
        );
    }

    // helm uninstall: the agents see their DaemonSet go and clean their nodes on the way out.
    let ours: BTreeSet<u32> = podwire_programs()?
        .difference(&programs_before)
        .copied()
        .collect();
    ensure!(
        !ours.is_empty(),
        "no podwire program loaded while the cluster ran"
    );
    helm(
        &cluster,
        &["uninstall", RELEASE, "--wait", "--timeout", "300s"],
    )?;
    let gone = eventually(WAIT, || {
        Ok(pods(&cluster, NAMESPACE, "app.kubernetes.io/name=podwire")?.is_empty())
    })?;
    ensure!(gone, "podwire's pods outlived helm uninstall");
    for node in &cluster.nodes {
        let mut left = Vec::new();
        let clean = eventually(WAIT, || {
            left = podwire_leftovers(node)?;
            Ok(left.is_empty())
        })?;
        ensure!(clean, "helm uninstall left on {}: {left:#?}", node.name);
    }
    let mut still = BTreeSet::new();
    let unloaded = eventually(WAIT, || {
        still = podwire_programs()?.intersection(&ours).copied().collect();
        Ok(still.is_empty())
    })?;
    ensure!(
        unloaded,
        "programs {still:?} of the uninstalled datapath are still loaded"
    );
    Ok(())
}

/// The highest number a sink received, from its log.
fn last_number(cluster: &KubeCluster, sink: &str) -> Result<u64> {
    let logs = stdout(&mut cluster.kubectl(["logs", "-n", "default", sink]))?;
    logs.lines()
        .filter_map(|l| l.trim().parse().ok())
        .max()
        .with_context(|| format!("{sink} received nothing: {logs:?}"))
}

/// Fails unless a sink received 0, 1, 2, ... without a gap: a connection that broke and was
/// made again would start over at 0.
fn check_contiguous(cluster: &KubeCluster, sink: &str) -> Result<()> {
    let logs = stdout(&mut cluster.kubectl(["logs", "-n", "default", sink]))?;
    for (expected, line) in logs.lines().enumerate() {
        ensure!(
            line.trim() == expected.to_string(),
            "{sink}'s line {expected} is {line:?}: the stream broke"
        );
    }
    Ok(())
}

/// A busybox pod on `node` running `script`, labelled role=sink.
fn pinned_pod(name: &str, node: &str, script: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": {"role": "sink"}},
        "spec": {
            "nodeName": node,
            "terminationGracePeriodSeconds": 0,
            "containers": [{
                "name": "main",
                "image": BUSYBOX_IMAGE,
                "imagePullPolicy": "Never",
                "command": ["sh", "-c", script],
            }],
        },
    })
}
