//! podwire's Helm chart (helm/podwire): `helm lint`; `helm template` with the default and with
//! non-default values, sent through the real Kubernetes v1.20.2 API server's own schemas,
//! defaulting and validation (`kubectl apply --dry-run=server`), and the values that matter read
//! back from what the server returned; values the agent or the plugin would reject refused at
//! render time; and the RBAC the chart grants, applied for real and asked with `kubectl auth
//! can-i` as the agent's ServiceAccount: every verb the agent uses is allowed, nothing wider.
//! And the capabilities the chart gives the agent: with exactly those (and no new privileges) the
//! agent runs on a lab node, and without any one of them it cannot start.
//!
//! helm comes from `cargo xtask test` (PODWIRE_HELM), or from target/helm/bin, where `cargo xtask
//! image` (and `cargo xtask test`) put it.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, ensure, Context as _, Result};
use nix::sys::signal::Signal;
use podwire_lab::{
    artifacts,
    artifacts::bin,
    k8s::{ControlPlane, CONTROL_PLANE_IP},
    namespaces::NetNs,
    nodes::{Cluster, PinRoot, Underlay, CLUSTER_CIDR},
    processes::{output_with_stdin, run, run_with_stdin, Daemon},
};
use serde_json::Value;

/// The namespace the chart is installed into, as the docs say.
const NAMESPACE: &str = "kube-system";
/// The release name; the chart names every object after it.
const RELEASE: &str = "podwire";
const SERVICE_ACCOUNT: &str = "system:serviceaccount:kube-system:podwire";
/// The Kubernetes version the lab's API server runs, and the oldest the chart admits.
const KUBE_VERSION: &str = "1.20.2";

/// The capabilities the chart gives the agent's container (checked on the rendered DaemonSet),
/// each with what fails without it: the agent's error when it runs with the others only.
const AGENT_CAPS: [(&str, &str); 3] = [
    ("BPF", "loading the eBPF object"),
    ("NET_ADMIN", "creating VXLAN device pw-vxlan"),
    ("PERFMON", "pointer comparison prohibited"),
];

/// Values other than the defaults for every setting the ConfigMap and the agent's command line
/// carry.
const CUSTOM: &[&str] = &[
    "vni=4242",
    "vxlanPort=8472",
    "mtu=1400",
    "clusterCIDR=10.200.0.0/16",
    "nodeSelector.podwire=enabled",
    "http.address=127.0.0.1",
    "http.port=9999",
    "logLevel=debug",
    "image.tag=test",
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn chart() -> PathBuf {
    repo().join("helm/podwire")
}

fn helm() -> Result<Command> {
    Ok(Command::new(artifacts::helm()?))
}

/// `helm template` of the chart for Kubernetes v1.20.2 with `set` (`--set` for each, and
/// `--set-string` for `string`), as YAML.
fn template(set: &[&str], string: &[&str]) -> Result<String> {
    let mut helm = helm()?;
    helm.args(["template", RELEASE]).arg(chart()).args([
        "--namespace",
        NAMESPACE,
        "--kube-version",
        KUBE_VERSION,
    ]);
    for value in set {
        helm.args(["--set", value]);
    }
    for value in string {
        helm.args(["--set-string", value]);
    }
    let out = run(&mut helm).context("helm template")?;
    Ok(String::from_utf8(out.stdout)?)
}

/// A control plane (etcd and kube-apiserver v1.20.2) on an underlay of its own.
struct Lab {
    cp: ControlPlane,
    _underlay: Underlay,
}

impl Lab {
    fn start() -> Result<Lab> {
        let underlay = Underlay::new()?;
        let cp = ControlPlane::start(&underlay, CONTROL_PLANE_IP)?;
        Ok(Lab {
            cp,
            _underlay: underlay,
        })
    }

    /// What the API server makes of `manifests` with `kubectl apply --dry-run=server`: its
    /// schemas, defaulting, validation and admission, nothing stored. The objects by kind.
    fn dry_run(&self, manifests: &str) -> Result<Objects> {
        let out = run_with_stdin(
            &mut self
                .cp
                .kubectl(["apply", "--dry-run=server", "--output=json", "-f", "-"]),
            manifests.as_bytes(),
        )
        .context("the API server refused the rendered chart")?;
        Objects::parse(&String::from_utf8(out.stdout)?)
    }

    /// Whether the agent's ServiceAccount (with the groups its token carries) may `verb`
    /// `resource` (`args` add e.g. `--namespace`).
    fn can_i(&self, verb: &str, resource: &str, args: &[&str]) -> Result<bool> {
        let out = self
            .cp
            .kubectl(["auth", "can-i", verb, resource])
            .arg(format!("--as={SERVICE_ACCOUNT}"))
            .args(["--as-group=system:serviceaccounts"])
            .arg(format!("--as-group=system:serviceaccounts:{NAMESPACE}"))
            .args(["--as-group=system:authenticated"])
            .args(args)
            .output()
            .context("running kubectl auth can-i")?;
        // Prints yes or no; exits 1 for no.
        match String::from_utf8_lossy(&out.stdout).trim() {
            "yes" => Ok(true),
            "no" => Ok(false),
            other => bail!(
                "kubectl auth can-i {verb} {resource}: {other:?} {}",
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    }
}

/// The objects the API server returned.
struct Objects(Vec<Value>);

impl Objects {
    /// kubectl's output: a List of several objects, or one object.
    fn parse(json: &str) -> Result<Objects> {
        let value: Value = serde_json::from_str(json).context("kubectl's output")?;
        Ok(Objects(match value["kind"].as_str() {
            Some("List") => value["items"].as_array().cloned().unwrap_or_default(),
            _ => vec![value],
        }))
    }

    fn kinds(&self) -> BTreeSet<&str> {
        self.0.iter().filter_map(|o| o["kind"].as_str()).collect()
    }

    fn get(&self, kind: &str) -> Result<&Value> {
        let mut of_kind = self.0.iter().filter(|o| o["kind"] == kind);
        match (of_kind.next(), of_kind.next()) {
            (Some(object), None) => Ok(object),
            _ => bail!("not exactly one {kind} in {:?}", self.kinds()),
        }
    }

    fn config(&self) -> Result<&Value> {
        Ok(&self.get("ConfigMap")?["data"])
    }

    /// The conflist the ConfigMap carries for the nodes, parsed.
    fn conflist(&self) -> Result<Value> {
        let text = self.config()?["10-podwire.conflist"]
            .as_str()
            .context("the ConfigMap has no 10-podwire.conflist")?;
        serde_json::from_str(text).with_context(|| format!("the conflist is no JSON: {text}"))
    }

    fn pod(&self) -> Result<&Value> {
        Ok(&self.get("DaemonSet")?["spec"]["template"]["spec"])
    }

    fn container(&self, name: &str, init: bool) -> Result<&Value> {
        let list = if init { "initContainers" } else { "containers" };
        self.pod()?[list]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["name"] == name))
            .with_context(|| format!("no {list} entry {name}"))
    }

    fn agent_args(&self) -> Result<Vec<&str>> {
        Ok(self.container("agent", false)?["args"]
            .as_array()
            .context("the agent has no args")?
            .iter()
            .filter_map(Value::as_str)
            .collect())
    }

    /// Where the agent's environment variable `name` comes from.
    fn agent_env(&self, name: &str) -> Result<&Value> {
        self.container("agent", false)?["env"]
            .as_array()
            .and_then(|env| env.iter().find(|e| e["name"] == name))
            .with_context(|| format!("the agent has no {name} in its environment"))
    }
}

/// Checks that the agent takes `flag` from the ConfigMap key `key`, which holds `want`:
/// `--flag=$(VAR)`, VAR from the key, the key with the value.
fn from_config(objects: &Objects, flag: &str, var: &str, key: &str, want: &str) -> Result<()> {
    let arg = format!("{flag}=$({var})");
    let args = objects.agent_args()?;
    ensure!(args.contains(&arg.as_str()), "no {arg} in {args:?}");
    let source = &objects.agent_env(var)?["valueFrom"]["configMapKeyRef"];
    ensure!(
        source["name"] == RELEASE && source["key"] == key,
        "{var} comes from {source}, not ConfigMap {RELEASE} key {key}"
    );
    let value = &objects.config()?[key];
    ensure!(value == want, "ConfigMap key {key} is {value}, not {want}");
    Ok(())
}

#[test]
fn helm_lint_passes() -> Result<()> {
    for set in [&[][..], CUSTOM] {
        let mut helm = helm()?;
        helm.args(["lint", "--strict"]).arg(chart());
        for value in set {
            helm.args(["--set", value]);
        }
        let out = run(&mut helm).context("helm lint")?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            text.contains("1 chart(s) linted, 0 chart(s) failed"),
            "helm lint: {text}"
        );
    }
    Ok(())
}

#[test]
fn helm_template_refuses_values_podwire_would_reject() -> Result<()> {
    let cases: &[(&[&str], &[&str], &str)] = &[
        (&[], &["cniVersion=0.3.1"], "cniVersion 0.3.1"),
        (&["vni=0"], &[], "vni 0"),
        (&["vni=16777216"], &[], "vni 16777216"),
        (&["vxlanPort=70000"], &[], "vxlanPort 70000"),
        (&["mtu=100"], &[], "mtu 100"),
        (&["clusterCIDR=10.244.0.0"], &[], "clusterCIDR 10.244.0.0"),
    ];
    for (set, string, message) in cases {
        let err = template(set, string)
            .err()
            .with_context(|| format!("helm template with {set:?} {string:?} succeeded"))?;
        ensure!(
            format!("{err:#}").contains(message),
            "helm template with {set:?} {string:?}: {err:#}"
        );
    }
    // Older than the chart's kubeVersion.
    let mut helm = helm()?;
    helm.args(["template", RELEASE])
        .arg(chart())
        .args(["--kube-version", "1.19.9"]);
    let out = helm.output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && stderr.contains("kubeVersion: >=1.20.0-0"),
        "helm template for Kubernetes 1.19.9: {stderr}"
    );
    Ok(())
}

#[test]
fn helm_chart_renders_objects_kubernetes_1_20_accepts() -> Result<()> {
    let lab = Lab::start()?;

    // The defaults.
    let default = template(&[], &[])?;
    let objects = lab.dry_run(&default)?;
    let kinds = [
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "DaemonSet",
        "Role",
        "RoleBinding",
        "ServiceAccount",
    ];
    ensure!(
        objects.kinds() == kinds.into(),
        "kinds: {:?}",
        objects.kinds()
    );
    let ds = objects.get("DaemonSet")?;
    // Defaulted by the server: the objects went through it.
    ensure!(
        ds["spec"]["revisionHistoryLimit"] == 10,
        "not defaulted by the API server: {ds}"
    );
    let conflist = objects.conflist()?;
    ensure!(conflist["cniVersion"] == "1.0.0", "conflist: {conflist}");
    ensure!(
        conflist["plugins"][0]["type"] == "podwire-cni"
            && conflist["plugins"][0]["agentSocket"] == "/run/podwire/agent.sock",
        "conflist: {conflist}"
    );
    from_config(&objects, "--vni", "PODWIRE_VNI", "vni", "1")?;
    from_config(
        &objects,
        "--vxlan-port",
        "PODWIRE_VXLAN_PORT",
        "vxlan-port",
        "4789",
    )?;
    from_config(
        &objects,
        "--cluster-cidr",
        "PODWIRE_CLUSTER_CIDR",
        "cluster-cidr",
        "10.244.0.0/16",
    )?;
    let args = objects.agent_args()?;
    ensure!(
        !args.iter().any(|a| a.starts_with("--mtu")) && objects.config()?.get("mtu").is_none(),
        "an MTU without one set: {args:?}"
    );
    for arg in [
        "--kubernetes",
        "--daemonset=podwire",
        "--http-address=0.0.0.0:9962",
        "--cni-conf-file=/host/etc/cni/net.d/10-podwire.conflist",
        "--cni-bin-file=/host/opt/cni/bin/podwire-cni",
        "--socket=/run/podwire/agent.sock",
        "--bpffs=/sys/fs/bpf/podwire",
        "--state-dir=/var/lib/podwire",
    ] {
        ensure!(args.contains(&arg), "no {arg} in {args:?}");
    }
    let node_name = &objects.agent_env("NODE_NAME")?["valueFrom"]["fieldRef"]["fieldPath"];
    ensure!(node_name == "spec.nodeName", "NODE_NAME from {node_name}");

    let pod = objects.pod()?;
    ensure!(
        pod["hostNetwork"] == true
            && pod["dnsPolicy"] == "ClusterFirstWithHostNet"
            && pod["priorityClassName"] == "system-node-critical"
            && pod["serviceAccountName"] == RELEASE,
        "pod spec: {pod}"
    );
    ensure!(
        pod["tolerations"][0] == serde_json::json!({ "operator": "Exists" }),
        "tolerations: {}",
        pod["tolerations"]
    );
    let strategy = &ds["spec"]["updateStrategy"];
    ensure!(
        strategy["type"] == "RollingUpdate" && strategy["rollingUpdate"]["maxUnavailable"] == 1,
        "update strategy: {strategy}"
    );
    let inits: Vec<&str> = pod["initContainers"]
        .as_array()
        .context("no init containers")?
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    ensure!(inits == ["prepare-node", "install-cni"], "init: {inits:?}");
    let prepare = objects.container("prepare-node", true)?;
    ensure!(
        prepare["securityContext"]["privileged"] == true
            && prepare["volumeMounts"][0]["mountPath"] == "/sys/fs/bpf"
            && prepare["volumeMounts"][0]["mountPropagation"] == "Bidirectional",
        "prepare-node: {prepare}"
    );
    let install = objects.container("install-cni", true)?;
    ensure!(
        install["securityContext"]["capabilities"]["drop"] == serde_json::json!(["ALL"]),
        "install-cni: {install}"
    );
    let agent = objects.container("agent", false)?;
    ensure!(
        agent["image"] == format!("localhost/podwire:{}", env!("CARGO_PKG_VERSION")),
        "the chart runs image {}, not the one `cargo xtask image` builds",
        agent["image"]
    );
    let caps = &agent["securityContext"]["capabilities"];
    let chart_caps: Vec<&str> = AGENT_CAPS.iter().map(|(cap, _)| *cap).collect();
    ensure!(
        caps["drop"] == serde_json::json!(["ALL"])
            && caps["add"] == serde_json::json!(chart_caps)
            && agent["securityContext"]["privileged"].is_null()
            && agent["securityContext"]["readOnlyRootFilesystem"] == true
            && agent["securityContext"]["allowPrivilegeEscalation"] == false
            && agent["securityContext"]["seccompProfile"]["type"] == "Unconfined",
        "agent capabilities: {}",
        agent["securityContext"]
    );
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &agent[probe]["httpGet"];
        ensure!(
            get["path"] == path && get["port"] == 9962 && get["host"] == "127.0.0.1",
            "{probe}: {get}"
        );
    }
    let host_paths: BTreeSet<&str> = pod["volumes"]
        .as_array()
        .context("no volumes")?
        .iter()
        .filter_map(|v| v["hostPath"]["path"].as_str())
        .collect();
    ensure!(
        host_paths
            == [
                "/etc/cni/net.d",
                "/opt/cni/bin",
                "/run/podwire",
                "/sys/fs/bpf",
                "/var/lib/podwire"
            ]
            .into(),
        "host paths: {host_paths:?}"
    );
    // A read-only root: the agent's /run (its bpffs lock) is a private tmpfs, under its socket's
    // host directory.
    let mounts: Vec<&str> = agent["volumeMounts"]
        .as_array()
        .context("the agent mounts nothing")?
        .iter()
        .filter_map(|m| m["mountPath"].as_str())
        .collect();
    ensure!(
        mounts.contains(&"/run") && mounts.contains(&"/run/podwire"),
        "agent mounts: {mounts:?}"
    );
    let private_run = pod["volumes"]
        .as_array()
        .and_then(|vs| vs.iter().find(|v| v["name"] == "private-run"))
        .context("no private-run volume")?;
    ensure!(
        private_run["emptyDir"]["medium"] == "Memory",
        "private-run: {private_run}"
    );
    let checksum = &ds["spec"]["template"]["metadata"]["annotations"]["checksum/config"];

    // Every value the ConfigMap and the command line carry changed, cniVersion 1.1.0.
    let custom = template(CUSTOM, &["cniVersion=1.1.0"])?;
    let objects = lab.dry_run(&custom)?;
    ensure!(objects.conflist()?["cniVersion"] == "1.1.0");
    from_config(&objects, "--vni", "PODWIRE_VNI", "vni", "4242")?;
    from_config(
        &objects,
        "--vxlan-port",
        "PODWIRE_VXLAN_PORT",
        "vxlan-port",
        "8472",
    )?;
    from_config(&objects, "--mtu", "PODWIRE_MTU", "mtu", "1400")?;
    from_config(
        &objects,
        "--cluster-cidr",
        "PODWIRE_CLUSTER_CIDR",
        "cluster-cidr",
        "10.200.0.0/16",
    )?;
    let args = objects.agent_args()?;
    ensure!(
        args.contains(&"--http-address=127.0.0.1:9999"),
        "args: {args:?}"
    );
    let log = &objects.agent_env("PODWIRE_LOG")?["value"];
    ensure!(log == "debug", "PODWIRE_LOG {log}");
    let pod = objects.pod()?;
    ensure!(
        pod["nodeSelector"]
            == serde_json::json!({ "kubernetes.io/os": "linux", "podwire": "enabled" }),
        "nodeSelector: {}",
        pod["nodeSelector"]
    );
    let agent = objects.container("agent", false)?;
    ensure!(
        agent["image"] == "localhost/podwire:test",
        "{}",
        agent["image"]
    );
    ensure!(
        agent["readinessProbe"]["httpGet"]["port"] == 9999,
        "{}",
        agent["readinessProbe"]
    );
    let ds = objects.get("DaemonSet")?;
    let custom_checksum = &ds["spec"]["template"]["metadata"]["annotations"]["checksum/config"];
    ensure!(
        checksum.is_string() && checksum != custom_checksum,
        "the pods' config checksum did not change with the ConfigMap: {checksum}"
    );

    // Capabilities for kernels older than 5.8 (no BPF or PERFMON) and 5.11 (memlock): the
    // API server refuses SYS_ADMIN without privilege escalation, so the chart allows it.
    let old_kernel = template(
        &["agent.capabilities={SYS_ADMIN,NET_ADMIN,SYS_RESOURCE}"],
        &[],
    )?;
    let objects = lab.dry_run(&old_kernel)?;
    let context = &objects.container("agent", false)?["securityContext"];
    ensure!(
        context["capabilities"]["add"]
            == serde_json::json!(["SYS_ADMIN", "NET_ADMIN", "SYS_RESOURCE"])
            && context["allowPrivilegeEscalation"] == true,
        "agent security context for old kernels: {context}"
    );

    // Control: the server does validate. Bidirectional propagation, which bpffs's mount needs,
    // is refused without the privileged flag the chart sets.
    let unprivileged = default.replace("privileged: true", "privileged: false");
    ensure!(unprivileged != default);
    let out = output_with_stdin(
        &mut lab.cp.kubectl(["apply", "--dry-run=server", "-f", "-"]),
        unprivileged.as_bytes(),
    )?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && stderr.contains("Bidirectional"),
        "an unprivileged Bidirectional mount was accepted: {stderr}"
    );
    Ok(())
}

#[test]
fn helm_rbac_grants_the_agent_what_it_needs_and_nothing_wider() -> Result<()> {
    let lab = Lab::start()?;
    let mut helm = helm()?;
    helm.args(["template", RELEASE])
        .arg(chart())
        .args(["--namespace", NAMESPACE, "--kube-version", KUBE_VERSION])
        .args(["--show-only", "templates/serviceaccount.yaml"])
        .args(["--show-only", "templates/rbac.yaml"]);
    let rbac = run(&mut helm).context("helm template of the RBAC objects")?;
    run_with_stdin(&mut lab.cp.kubectl(["apply", "-f", "-"]), &rbac.stdout)
        .context("applying the chart's ServiceAccount and RBAC")?;

    let ns = ["--namespace", NAMESPACE];
    let allowed: &[(&str, &str, &[&str])] = &[
        ("get", "nodes", &[]),
        ("list", "nodes", &[]),
        ("watch", "nodes", &[]),
        ("patch", "nodes", &["--subresource=status"]),
        ("get", "daemonsets.apps", &ns),
        ("list", "daemonsets.apps", &ns),
        ("watch", "daemonsets.apps", &ns),
    ];
    let denied: &[(&str, &str, &[&str])] = &[
        ("create", "nodes", &[]),
        ("update", "nodes", &[]),
        ("patch", "nodes", &[]),
        ("delete", "nodes", &[]),
        ("update", "nodes", &["--subresource=status"]),
        ("get", "pods", &ns),
        ("list", "pods", &["--all-namespaces"]),
        ("get", "secrets", &ns),
        ("list", "secrets", &["--all-namespaces"]),
        ("get", "configmaps", &ns),
        ("patch", "daemonsets.apps", &ns),
        ("update", "daemonsets.apps", &ns),
        ("delete", "daemonsets.apps", &ns),
        ("get", "daemonsets.apps", &["--namespace", "default"]),
        ("list", "daemonsets.apps", &["--all-namespaces"]),
        ("create", "events", &ns),
        ("*", "*", &[]),
    ];
    let mut wrong = Vec::new();
    for (want, cases) in [(true, allowed), (false, denied)] {
        for (verb, resource, args) in cases {
            if lab.can_i(verb, resource, args)? != want {
                wrong.push(format!(
                    "{verb} {resource} {args:?}: {}",
                    if want { "denied" } else { "allowed" }
                ));
            }
        }
    }
    ensure!(wrong.is_empty(), "RBAC of {SERVICE_ACCOUNT}: {wrong:#?}");
    Ok(())
}

/// A lab node for one run of the agent under reduced privileges: a namespace on the underlay
/// with node 1's address, a cluster file of two nodes, its own state, socket and pins.
struct CappedNode {
    ns: NetNs,
    dir: tempfile::TempDir,
    pins: PinRoot,
}

impl CappedNode {
    fn new(underlay: &Underlay) -> Result<CappedNode> {
        let ns = underlay.plug("node", Cluster::node_ip(0), false)?;
        let dir = tempfile::tempdir()?;
        let nodes: Vec<Value> = (0..2)
            .map(|i| {
                serde_json::json!({
                    "name": Cluster::node_name(i),
                    "address": Cluster::node_ip(i).to_string(),
                    "podCIDR": Cluster::pod_cidr(i),
                })
            })
            .collect();
        let file = serde_json::json!({ "clusterCIDR": CLUSTER_CIDR, "nodes": nodes });
        std::fs::write(dir.path().join("cluster.json"), file.to_string())?;
        Ok(CappedNode {
            ns,
            dir,
            pins: PinRoot::new(),
        })
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("agent.sock")
    }

    /// The agent as root with only `caps` (bounding, permitted and effective sets) and no new
    /// privileges, as the chart's container runs it; in file mode, since watching the API needs
    /// no capability.
    fn agent(&self, caps: &[&str]) -> Result<Daemon> {
        let keep: String = caps
            .iter()
            .map(|cap| format!(",+{}", cap.to_lowercase()))
            .collect();
        let mut cmd = self.ns.command("setpriv");
        cmd.arg("--no-new-privs")
            .arg(format!("--bounding-set=-all{keep}"))
            .arg(format!("--inh-caps=-all{keep}"))
            .arg("--")
            .arg(bin("podwire-agent")?)
            .arg("--cluster-file")
            .arg(self.dir.path().join("cluster.json"))
            .args(["--node-name", &Cluster::node_name(0)])
            .arg("--state-dir")
            .arg(self.dir.path().join("state"))
            .arg("--socket")
            .arg(self.socket())
            .arg("--bpffs")
            .arg(self.pins.path())
            .env("PODWIRE_LOG", "info");
        Daemon::spawn(cmd, None)
    }

    /// Execs the plugin on the node as a runtime does, for container `pod` in `netns`.
    fn cni(&self, command: &str, netns: &NetNs) -> Result<Value> {
        let conf = serde_json::json!({
            "cniVersion": "1.0.0", "name": "podwire", "type": "podwire-cni",
            "agentSocket": self.socket(),
        });
        let plugin = bin("podwire-cni")?;
        let mut cmd = self.ns.command(&plugin);
        cmd.env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", "capped-pod")
            .env("CNI_IFNAME", "eth0")
            .env("CNI_NETNS", netns.path())
            .env(
                "CNI_PATH",
                plugin.parent().context("the plugin's directory")?,
            );
        let out = output_with_stdin(&mut cmd, conf.to_string().as_bytes())?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success(),
            "CNI {command}: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(serde_json::from_str(&stdout).unwrap_or(Value::Null))
    }
}

/// Bit of capability `name` in /proc/PID/status's sets.
fn cap_bit(name: &str) -> Result<u64> {
    Ok(1 << match name {
        "NET_ADMIN" => 12,
        "PERFMON" => 38,
        "BPF" => 39,
        other => bail!("no bit known for {other}"),
    })
}

#[test]
fn helm_agent_works_with_the_charts_capabilities_and_needs_each() -> Result<()> {
    let underlay = Underlay::new()?;
    let all: Vec<&str> = AGENT_CAPS.iter().map(|(cap, _)| *cap).collect();

    // Each one left out in turn: the agent cannot start, and says why.
    for (missing, error) in AGENT_CAPS {
        let node = CappedNode::new(&underlay)?;
        let caps: Vec<&str> = all.iter().copied().filter(|c| *c != missing).collect();
        let mut agent = node.agent(&caps)?;
        agent
            .wait_for_line(error)
            .with_context(|| format!("the agent without CAP_{missing}"))?;
        let (status, log) = agent.wait()?;
        ensure!(
            !status.success() && !log.iter().any(|l| l.contains("serving CNI requests")),
            "the agent without CAP_{missing} ran: {status}\n{}",
            log.join("\n")
        );
    }

    // All of them: the agent loads, pins and attaches, writes its nftables table, wires a pod,
    // and a second agent takes over the pinned datapath and releases the pod.
    let node = CappedNode::new(&underlay)?;
    let mut agent = node.agent(&all)?;
    agent.wait_for_line("serving CNI requests")?;
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid()))?;
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .context("no CapEff")?;
    let want = all.iter().map(|c| cap_bit(c)).sum::<Result<u64>>()?;
    ensure!(
        u64::from_str_radix(eff.trim(), 16)? == want,
        "the agent's effective capabilities are {eff}, not {want:016x}"
    );
    let pod = NetNs::new("pod")?;
    let result = node.cni("ADD", &pod)?;
    let ip = result["ips"][0]["address"].as_str().unwrap_or_default();
    ensure!(ip.starts_with("10.244.1."), "ADD result: {result}");
    run(node
        .ns
        .command("nft")
        .args(["list", "table", "ip", "podwire"]))
    .context("the agent's nftables table")?;
    let (status, log) = agent.stop(Signal::SIGTERM)?;
    ensure!(status.success(), "agent exit {status}: {}", log.join("\n"));

    let mut agent = node.agent(&all)?;
    agent.wait_for_line("serving CNI requests")?;
    let endpoints = run(node
        .ns
        .command(bin("podwire")?)
        .arg("--bpffs")
        .arg(node.pins.path())
        .args(["endpoints", "-o", "json"]))?;
    let address = ip.split('/').next().unwrap_or_default();
    ensure!(
        String::from_utf8_lossy(&endpoints.stdout).contains(address),
        "the restarted agent lost the pod's endpoint: {}",
        String::from_utf8_lossy(&endpoints.stdout)
    );
    node.cni("DEL", &pod)?;
    let (status, log) = agent.stop(Signal::SIGTERM)?;
    ensure!(status.success(), "agent exit {status}: {}", log.join("\n"));
    Ok(())
}
