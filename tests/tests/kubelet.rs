//! A real Kubernetes v1.20.2 in the lab: the control plane survives an API server restart, and
//! kubelet nodes (containerd, kubelet, kube-proxy in network namespaces) register, get their pod
//! CIDRs, wait for a CNI configuration and then run pods.

use anyhow::{ensure, Context as _, Result};
use podwire_lab::{
    k8s::{ControlPlane, CONTROL_PLANE_IP},
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
