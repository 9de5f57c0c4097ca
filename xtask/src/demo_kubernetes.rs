//! `cargo xtask demo --kubernetes`: podwire as users install it, on a real Kubernetes v1.20.2
//! cluster of this machine's lab (a control plane and two kubelet + containerd + kube-proxy nodes
//! in network namespaces): the image imported into each node, `helm install` of the chart, a
//! Deployment and a Service on top; then it prints how to reach the cluster with kubectl and
//! keeps it running until Ctrl-C, when everything is removed.

use std::{fs, os::unix::fs::PermissionsExt as _, path::Path, time::Duration};

use anyhow::{Context as _, Result};
use nix::sys::signal::{SigSet, Signal};
use podwire_lab::{
    dns::ClusterDns,
    kubelet::{self, KubeCluster},
};
use serde_json::json;

use crate::{
    build::{self, workspace_root, Built},
    conformance, helm, image, k8s, k8s_node,
    toolchain::Needs,
};

const NODES: usize = 2;
const READY_TIMEOUT: Duration = Duration::from_secs(300);

pub fn run() -> Result<()> {
    podwire_lab::require_root()?;
    let k8s_bin = k8s::ensure()?;
    k8s_node::ensure()?;
    let Built { bins, .. } = build::all(true, Needs::Build)?;
    podwire_lab::artifacts::set_bin_dir(&bins);
    let archive = image::archive(&bins)?;
    let helm = helm::ensure()?;
    // Ctrl-C and SIGTERM are waited for, not delivered: the guards below must run to remove
    // the cluster.
    let signals = SigSet::from_iter([Signal::SIGINT, Signal::SIGTERM]);
    signals
        .thread_block()
        .context("blocking SIGINT and SIGTERM")?;

    println!("== starting a control plane and {NODES} kubelet nodes (containerd, kube-proxy)");
    let cluster = KubeCluster::start(NODES)?;
    let _dns = ClusterDns::start(&cluster.cp.ns, cluster.cp.ip, &cluster.kubeconfig())?;
    for node in &cluster.nodes {
        node.import_image(&archive)?;
    }
    println!("== nodes before podwire (no CNI yet):");
    show(&cluster, &["get", "nodes", "-o", "wide"])?;
    println!("== helm install podwire helm/podwire --namespace kube-system");
    conformance::install_podwire(&cluster, &helm)?;
    cluster.wait_ready(READY_TIMEOUT)?;
    show(&cluster, &["get", "nodes", "-o", "wide"])?;
    show(
        &cluster,
        &[
            "rollout",
            "status",
            "-n",
            "kube-system",
            "daemonset/podwire",
            "--timeout=300s",
        ],
    )?;

    println!("== a Deployment of 4 busybox web servers and a ClusterIP Service in front of them");
    let manifest = json!({"apiVersion": "v1", "kind": "List", "items": [
        kubelet::web_deployment(4),
        kubelet::web_service(),
    ]});
    podwire_lab::processes::run_with_stdin(
        &mut cluster.kubectl(["apply", "-f", "-"]),
        manifest.to_string().as_bytes(),
    )?;
    show(
        &cluster,
        &["rollout", "status", "deployment/web", "--timeout=300s"],
    )?;
    show(&cluster, &["get", "pods", "-A", "-o", "wide"])?;
    show(&cluster, &["get", "service", "web"])?;

    let kubectl = write_kubectl_wrapper(&cluster, &k8s_bin.join("kubectl"))?;
    println!(
        "== the cluster is up. Try, as root:\n\
         \x20  {k} get nodes,pods -A -o wide\n\
         \x20  {k} exec deploy/web -- wget -q -O- http://web.default.svc.cluster.local/\n\
         \x20  {k} -n kube-system exec ds/podwire -- podwire nodes\n\
         \x20  {k} -n kube-system exec ds/podwire -- podwire counters --nonzero\n\
         \x20  {k} -n kube-system logs ds/podwire\n\
         \x20  {k} -n kube-system rollout restart ds/podwire   # pods keep their traffic\n\
         ({k} is kubectl with the admin's kubeconfig {}, run in the control plane's network \
         namespace {}, where the API server listens.)\n\
         Ctrl-C removes everything.",
        cluster.kubeconfig().display(),
        cluster.cp.ns.name(),
        k = kubectl.display(),
    );
    let signal = signals.wait().context("waiting for Ctrl-C")?;
    println!("== {signal}: removing the cluster");
    let _ = fs::remove_file(&kubectl);
    Ok(())
}

/// Prints what `kubectl args` prints.
fn show(cluster: &KubeCluster, args: &[&str]) -> Result<()> {
    let out = podwire_lab::processes::run(&mut cluster.kubectl(args))?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    Ok(())
}

/// target/demo/kubectl: kubectl with the admin's kubeconfig in the control plane's namespace.
fn write_kubectl_wrapper(cluster: &KubeCluster, kubectl: &Path) -> Result<std::path::PathBuf> {
    let dir = workspace_root().join("target/demo");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("kubectl");
    let script = format!(
        "#!/bin/sh\nexec ip netns exec {} {} --kubeconfig {} \"$@\"\n",
        cluster.cp.ns.name(),
        kubectl.display(),
        cluster.kubeconfig().display()
    );
    fs::write(&path, script).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
    Ok(path)
}
