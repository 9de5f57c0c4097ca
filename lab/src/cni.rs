//! Pods wired as a container runtime wires them: the CNI plugin exec'd in the node's namespace
//! with the CNI_* environment and the network configuration on stdin.

use std::{net::Ipv4Addr, process::Command};

use anyhow::{ensure, Context as _, Result};

use crate::{artifacts::bin, namespaces::NetNs, nodes::Node, processes::output_with_stdin};

/// The CNI version the lab's configurations use (the newest the plugin speaks).
pub const CNI_VERSION: &str = "1.1.0";

/// What one plugin invocation returned.
#[derive(Debug)]
pub struct CniOutput {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl CniOutput {
    /// Stdout as JSON (a result, or the spec's error object).
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_str(&self.stdout)
            .with_context(|| format!("plugin output is not JSON: {self:?}"))
    }

    /// Checks the invocation failed with the spec's error object carrying `code`; returns its
    /// `msg`.
    pub fn expect_error(&self, code: u64) -> Result<String> {
        ensure!(
            !self.success,
            "expected CNI error {code}, got success: {self:?}"
        );
        let json = self.json()?;
        ensure!(json["code"] == code, "error code: {json}");
        ensure!(
            json["cniVersion"].is_string(),
            "the error carries no cniVersion: {json}"
        );
        Ok(json["msg"]
            .as_str()
            .context("the error has no msg")?
            .to_owned())
    }

    /// Checks the invocation succeeded; returns its stdout as JSON.
    pub fn expect_success(&self) -> Result<serde_json::Value> {
        ensure!(self.success, "the plugin failed: {self:?}");
        self.json()
    }
}

/// A pod wired by the plugin.
pub struct Pod {
    pub ns: NetNs,
    pub container_id: String,
    pub ip: Ipv4Addr,
    /// The ADD result.
    pub result: serde_json::Value,
}

impl Pod {
    /// The host side of the pod's veth, as the ADD result names it (its first interface).
    pub fn host_veth(&self) -> Result<&str> {
        self.result["interfaces"][0]["name"]
            .as_str()
            .with_context(|| format!("no host veth in the ADD result {}", self.result))
    }
}

impl Node {
    /// podwire's network configuration for this node (no `mtu`: the node's applies).
    pub fn conf(&self) -> serde_json::Value {
        serde_json::json!({
            "cniVersion": CNI_VERSION,
            "name": "podwire",
            "type": "podwire-cni",
            "agentSocket": self.socket(),
        })
    }

    /// Execs the plugin in the node's namespace as a runtime does: CNI_COMMAND `command`, the
    /// other CNI_* variables from `env`, the configuration on stdin.
    pub fn cni(&self, command: &str, env: &[(&str, &str)], stdin: &[u8]) -> Result<CniOutput> {
        let plugin = bin("podwire-cni")?;
        let mut cmd: Command = self.command(&plugin);
        cmd.env("CNI_COMMAND", command)
            .env(
                "CNI_PATH",
                plugin.parent().expect("a binary lives in a directory"),
            )
            .envs(env.iter().copied());
        let out = output_with_stdin(&mut cmd, stdin).context("exec podwire-cni")?;
        Ok(CniOutput {
            success: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).trim().to_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// ADD, DEL or CHECK of `container_id` (interface eth0) in `pod` with this node's
    /// configuration.
    pub fn cni_pod(
        &self,
        command: &str,
        container_id: &str,
        pod: Option<&NetNs>,
    ) -> Result<CniOutput> {
        let netns = pod.map(|p| p.path().display().to_string());
        let mut env = vec![("CNI_CONTAINERID", container_id), ("CNI_IFNAME", "eth0")];
        if let Some(netns) = &netns {
            env.push(("CNI_NETNS", netns));
        }
        self.cni(command, &env, self.conf().to_string().as_bytes())
    }

    /// Creates a pod namespace and wires it with ADD, which must succeed.
    pub fn add_pod(&self, container_id: &str) -> Result<Pod> {
        let ns = NetNs::new("pod")?;
        let result = self
            .cni_pod("ADD", container_id, Some(&ns))?
            .expect_success()
            .with_context(|| format!("ADD {container_id}"))?;
        Ok(Pod {
            ns,
            container_id: container_id.to_owned(),
            ip: pod_ip(&result)?,
            result,
        })
    }

    /// Removes `pod` with DEL, which must succeed.
    pub fn del_pod(&self, pod: &Pod) -> Result<()> {
        let out = self.cni_pod("DEL", &pod.container_id, Some(&pod.ns))?;
        ensure!(out.success, "DEL {}: {out:?}", pod.container_id);
        Ok(())
    }
}

/// The pod's address from an ADD result.
pub fn pod_ip(result: &serde_json::Value) -> Result<Ipv4Addr> {
    let address = result["ips"][0]["address"]
        .as_str()
        .with_context(|| format!("no IP in {result}"))?;
    let ip = address.split('/').next().unwrap_or_default();
    ip.parse()
        .with_context(|| format!("{address} is not an IPv4 address"))
}
