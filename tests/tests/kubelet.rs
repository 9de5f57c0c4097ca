//! A real Kubernetes v1.20.2 in the lab: the control plane survives an API server restart, and
//! kubelet nodes (containerd, kubelet, kube-proxy in network namespaces) register, get their pod
//! CIDRs, wait for a CNI configuration and then run pods.

use std::{
    fs,
    net::Ipv4Addr,
    path::Path,
    thread,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context as _, Result};
use ipnet::Ipv4Net;
use podwire_lab::{
    eventually,
    images::BUSYBOX_IMAGE,
    k8s::{ControlPlane, CONTROL_PLANE_IP},
    kubelet::{KubeCluster, Log},
    nodes::Underlay,
    processes::run,
};
use serde_json::json;

/// What a restart must keep: objects (in etcd) and the clients' kubeconfig (the certificate the
/// API server made for itself in its cert directory).
#[test]
fn apiserver_restart_keeps_objects_and_clients() -> Result<()> {
    let underlay = Underlay::new()?;
    let mut cp = ControlPlane::start(&underlay, CONTROL_PLANE_IP)?;
    cp.apply(&json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": { "name": "survivor", "namespace": "default" },
        "data": { "said": "before the restart" },
    }))?;
    let pid_before = cp.apiserver_pid();
    cp.restart_apiserver()?;
    ensure!(
        cp.apiserver_pid() != pid_before,
        "restart_apiserver kept the old process {pid_before}"
    );
    let out = run(&mut cp.kubectl([
        "get",
        "configmap",
        "survivor",
        "-o",
        "jsonpath={.data.said}",
    ]))
    .context("reading the ConfigMap back after the restart")?;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "before the restart");
    Ok(())
}

/// The pod range the controller manager cuts the nodes' podCIDRs from.
const CLUSTER_CIDR: &str = "10.244.0.0/16";

/// How long nodes get to turn Ready once they have a CNI configuration (about 10 s here).
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// Without a CNI, as on a fresh kubeadm cluster: both nodes register with their addresses, get
/// distinct /24s of the cluster range (the control plane routes each via its node), and stay
/// NotReady because the runtime's network is not ready. Kubelet changes no machine-wide sysctl,
/// and each node's /sys/fs/bpf is a bpffs of its own.
#[test]
fn kubelet_nodes_register_with_pod_cidrs_and_wait_for_a_cni() -> Result<()> {
    let sysctls_before = host_sysctls()?;
    let started = Instant::now();
    let cluster = KubeCluster::start(2)?;
    eprintln!(
        "cluster of 2 kubelet nodes registered with podCIDRs in {:.1} s (with any wait for another cluster)",
        started.elapsed().as_secs_f64()
    );
    let range: Ipv4Net = CLUSTER_CIDR.parse()?;
    let nodes = cluster.api_nodes()?;
    let mut cidrs = Vec::new();
    for node in &cluster.nodes {
        let api = nodes
            .iter()
            .find(|n| n.name == node.name)
            .with_context(|| format!("{} did not register", node.name))?;
        assert_eq!(api.internal_ip, Some(node.ip), "{}'s InternalIP", node.name);
        let cidr: Ipv4Net = api
            .pod_cidr
            .as_deref()
            .with_context(|| format!("{} has no podCIDR", node.name))?
            .parse()?;
        assert_eq!(cidr.prefix_len(), 24, "{}'s podCIDR {cidr}", node.name);
        assert!(range.contains(&cidr), "{}'s podCIDR {cidr}", node.name);
        // The control plane reaches the node's pods through it.
        let route = cluster
            .cp
            .ns
            .ip(&["-4", "route", "show", &cidr.to_string()])?;
        let route = String::from_utf8_lossy(&route.stdout);
        assert!(
            route.contains(&format!("via {} ", node.ip)),
            "control plane route to {cidr}: {route:?}"
        );
        cidrs.push(cidr);
    }
    assert_ne!(cidrs[0], cidrs[1], "the nodes' podCIDRs");

    // Long enough for kubelet to report its status more than once (every 10 s).
    thread::sleep(Duration::from_secs(15));
    for node in cluster.api_nodes()? {
        assert!(
            !node.ready,
            "{} is Ready without any CNI configuration",
            node.name
        );
        assert!(
            node.ready_message.contains("network plugin") || node.ready_message.contains("cni"),
            "{} is NotReady for another reason than its missing CNI: {:?}",
            node.name,
            node.ready_message
        );
    }

    // Each node's bpffs is its own: a pin there is not on the machine's.
    let node = &cluster.nodes[0];
    let pin = format!("pwlab-kubelet-test-{}", std::process::id());
    run(node.command("mkdir").arg(format!("/sys/fs/bpf/{pin}")))?;
    assert!(
        !Path::new("/sys/fs/bpf").join(&pin).exists(),
        "a directory made in {}'s /sys/fs/bpf appeared on the machine's",
        node.name
    );
    let fs_type = run(node.command("stat").args(["-f", "-c", "%T", "/sys/fs/bpf"]))?;
    assert_eq!(String::from_utf8_lossy(&fs_type.stdout).trim(), "bpf_fs");

    assert_eq!(
        host_sysctls()?,
        sysctls_before,
        "kubelet changed the machine's sysctls"
    );
    Ok(())
}

/// The cluster works without podwire: with the reference `bridge` and `host-local` plugins
/// configured on node1, that node turns Ready (node2 stays NotReady), a busybox pod runs there
/// with an address of node1's podCIDR, its log reaches kubectl, `kubectl exec` runs in it, and
/// the control plane's host reaches it; a privileged pod's Bidirectional mount propagates into
/// the node but not onto the machine.
#[test]
fn kubelet_node_runs_a_busybox_pod_on_the_reference_bridge_cni() -> Result<()> {
    let cluster = KubeCluster::start(2)?;
    let node = &cluster.nodes[0];
    let cidr = cluster.pod_cidr(&node.name)?;
    node.install_reference_bridge(&cidr)?;
    let started = Instant::now();
    wait_node_ready(&cluster, &node.name)?;
    eprintln!(
        "{} Ready {:.1} s after its CNI configuration appeared",
        node.name,
        started.elapsed().as_secs_f64()
    );
    let other = cluster
        .pod_cidr(&cluster.nodes[1].name)
        .map(|_| &cluster.nodes[1])?;
    let other_api = cluster
        .api_nodes()?
        .into_iter()
        .find(|n| n.name == other.name)
        .context("node2's Node")?;
    assert!(
        !other_api.ready,
        "node2 is Ready without a CNI configuration"
    );

    cluster.cp.apply(&json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": "bb", "namespace": "default" },
        "spec": {
            "nodeName": node.name,
            "terminationGracePeriodSeconds": 0,
            "containers": [{
                "name": "bb",
                "image": BUSYBOX_IMAGE,
                "imagePullPolicy": "Never",
                "command": ["sh", "-c", "echo hello from the pod; exec sleep 3600"],
            }],
        },
    }))?;
    let wait = cluster
        .kubectl(["wait", "--for=condition=Ready", "pod/bb", "--timeout=120s"])
        .output()?;
    ensure!(
        wait.status.success(),
        "pod bb did not become Ready: {}\n{}\nkubelet log ends:\n{}\ncontainerd log ends:\n{}",
        String::from_utf8_lossy(&wait.stderr),
        String::from_utf8_lossy(&cluster.kubectl(["describe", "pod", "bb"]).output()?.stdout),
        node.log(Log::Kubelet),
        node.log(Log::Containerd)
    );
    let ip = run(&mut cluster.kubectl(["get", "pod", "bb", "-o", "jsonpath={.status.podIP}"]))?;
    let ip: Ipv4Addr = String::from_utf8_lossy(&ip.stdout).trim().parse()?;
    let net: Ipv4Net = cidr.parse()?;
    assert!(
        net.contains(&ip),
        "pod address {ip} outside {node}'s {cidr}",
        node = node.name
    );

    let logs = run(&mut cluster.kubectl(["logs", "bb"]))?;
    assert_eq!(
        String::from_utf8_lossy(&logs.stdout),
        "hello from the pod\n"
    );
    let exec = run(&mut cluster.kubectl(["exec", "bb", "--", "ip", "-4", "addr", "show", "eth0"]))?;
    let exec = String::from_utf8_lossy(&exec.stdout);
    assert!(
        exec.contains(&format!("inet {ip}/24")),
        "kubectl exec ip addr in the pod: {exec}"
    );
    run(cluster
        .cp
        .ns
        .command("ping")
        .args(["-c", "1", "-W", "5", &ip.to_string()]))
    .context("pinging the pod from the control plane's host")?;

    // A privileged pod's Bidirectional mount below the node's /sys/fs/bpf (as a CNI agent's
    // DaemonSet mounts a bpffs there) reaches the node, and only the node.
    let dir = format!("pwlab-bidirectional-{}", std::process::id());
    cluster.cp.apply(&json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": "mounter", "namespace": "default" },
        "spec": {
            "nodeName": node.name,
            "hostNetwork": true,
            "terminationGracePeriodSeconds": 0,
            "containers": [{
                "name": "mounter",
                "image": BUSYBOX_IMAGE,
                "imagePullPolicy": "Never",
                "securityContext": { "privileged": true },
                "command": ["sh", "-c", format!(
                    "mkdir -p /host-bpf/{dir} && mount -t tmpfs tmpfs /host-bpf/{dir} && \
                     touch /host-bpf/{dir}/marker && exec sleep 3600"
                )],
                "volumeMounts": [{
                    "name": "bpffs",
                    "mountPath": "/host-bpf",
                    "mountPropagation": "Bidirectional",
                }],
            }],
            "volumes": [{ "name": "bpffs", "hostPath": { "path": "/sys/fs/bpf" } }],
        },
    }))?;
    let marker = format!("/sys/fs/bpf/{dir}/marker");
    let propagated = eventually(READY_TIMEOUT, || {
        Ok(node
            .command("test")
            .args(["-e", &marker])
            .status()?
            .success())
    })?;
    ensure!(
        propagated,
        "the pod's mount at {marker} did not reach {}: {}",
        node.name,
        String::from_utf8_lossy(
            &cluster
                .kubectl(["describe", "pod", "mounter"])
                .output()?
                .stdout
        )
    );
    assert!(
        !Path::new("/sys/fs/bpf").join(&dir).exists(),
        "the pod's mount below {}'s /sys/fs/bpf appeared on the machine",
        node.name
    );
    Ok(())
}

/// Waits until the Node `name` is Ready.
fn wait_node_ready(cluster: &KubeCluster, name: &str) -> Result<()> {
    let ready = eventually(READY_TIMEOUT, || {
        Ok(cluster
            .api_nodes()?
            .iter()
            .any(|n| n.name == name && n.ready))
    })?;
    ensure!(
        ready,
        "{name} is not Ready {READY_TIMEOUT:?} after its CNI configuration: {:?}\nkubelet log \
         ends:\n{}\ncontainerd log ends:\n{}",
        cluster.api_nodes()?,
        cluster.node(name)?.log(Log::Kubelet),
        cluster.node(name)?.log(Log::Containerd)
    );
    Ok(())
}

/// The machine-wide sysctls kubelet would set.
fn host_sysctls() -> Result<Vec<String>> {
    [
        "vm/overcommit_memory",
        "vm/panic_on_oom",
        "kernel/panic",
        "kernel/panic_on_oops",
        "kernel/keys/root_maxkeys",
        "kernel/keys/root_maxbytes",
    ]
    .iter()
    .map(|key| {
        fs::read_to_string(Path::new("/proc/sys").join(key))
            .with_context(|| format!("reading /proc/sys/{key}"))
    })
    .collect()
}
