//! A real Kubernetes v1.20.2 for the lab: a control plane (etcd and kube-apiserver) on a host of
//! its own on the underlay, and the real kube-proxy (iptables mode, its default settings) in a
//! node's network namespace, so tests can create Services and see kube-proxy program a podwire
//! node's host stack as in a cluster.
//!
//! There is no controller manager, scheduler or kubelet: the lab writes what they would. A
//! Service has no selector and comes with the EndpointSlice the endpoint slice controller would
//! make (kube-proxy v1.20 reads EndpointSlices, not Endpoints), and every node kube-proxy runs
//! on gets the Node object its kubelet would register.
//!
//! Everything listens inside the lab's namespaces only: etcd on the control plane host's
//! loopback, kube-apiserver on its underlay address, kube-proxy's health and metrics endpoints in
//! its node. The binaries come from [`artifacts::k8s_bin`]; the processes are [`Daemon`]s, so
//! they die with their guard and with the thread that started them.

use std::{
    ffi::OsStr,
    fs,
    io::Read as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

use crate::{
    artifacts::k8s_bin,
    namespaces::{command_in, sweep_stale, unique_name, NetNs},
    nodes::{Node, Underlay, CLUSTER_CIDR},
    processes::{run, run_with_stdin, Daemon},
};

/// The Service range kube-apiserver allocates ClusterIPs from (10.96.0.1 is its own
/// `kubernetes` Service).
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
/// An underlay address for the control plane that no lab node takes (nodes count up from .1).
pub const CONTROL_PLANE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 250);
/// kube-apiserver's port on the control plane's address.
pub const API_PORT: u16 = 6443;
/// The namespace of the Services the lab creates.
pub const NAMESPACE: &str = "default";

/// Bounds the waits for a process to come up or rules to appear against hanging, generously:
/// kube-apiserver is ready 3-5 s after it starts on an idle machine, but the lab shares two CPUs
/// with builds and other tests. Tests never assert on time.
pub(crate) const TIMEOUT: Duration = Duration::from_secs(120);
pub(crate) const POLL: Duration = Duration::from_millis(250);
/// How long kube-apiserver gets to exit after SIGTERM (it needs up to 5 s) before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How much of a daemon's log an error message quotes.
const LOG_TAIL: usize = 40;

/// etcd and kube-apiserver on a host plugged into the underlay, with a kubeconfig for an admin.
/// Dropping it kills both and removes their files and the host (fields drop in order: the API
/// server before etcd, both before their files).
pub struct ControlPlane {
    /// kube-controller-manager and kube-scheduler, once started: they go before the API server.
    controllers: Vec<Daemon>,
    apiserver: Daemon,
    etcd: Daemon,
    /// etcd's data, kube-apiserver's certificates, keys and tokens, the kubeconfig, the logs.
    dir: tempfile::TempDir,
    pub ns: NetNs,
    pub ip: Ipv4Addr,
    kubectl: PathBuf,
}

impl ControlPlane {
    /// Plugs a host with `ip` into `underlay`, starts etcd and kube-apiserver there and waits
    /// until the API server is ready and has made the `default` namespace.
    pub fn start(underlay: &Underlay, ip: Ipv4Addr) -> Result<ControlPlane> {
        let etcd_bin = k8s_bin("etcd")?;
        let kubectl = k8s_bin("kubectl")?;
        let ns = underlay.plug("k8s", ip, false)?;
        let dir = lab_dir("k8s")?;
        let path = dir.path();

        // One static admin token: the lab needs no other identity (kube-proxy uses it too).
        let token = random_hex(16)?;
        write(
            &path.join("tokens.csv"),
            &format!("{token},admin,admin-uid,system:masters\n"),
        )?;
        // The key pair kube-apiserver signs and checks service account tokens with (it refuses
        // to start without one).
        let key = path.join("sa.key");
        run(Command::new("openssl")
            .args(["genrsa", "-out"])
            .arg(&key)
            .arg("2048"))?;
        run(Command::new("openssl")
            .args(["rsa", "-pubout", "-in"])
            .arg(&key)
            .arg("-out")
            .arg(path.join("sa.pub")))?;
        // The API server makes itself a certificate for its address in --cert-dir; the lab
        // skips checking it rather than running a CA.
        let kubeconfig = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{ "name": "lab", "cluster": {
                "server": format!("https://{ip}:{API_PORT}"),
                "insecure-skip-tls-verify": true,
            }}],
            "users": [{ "name": "admin", "user": { "token": token } }],
            "contexts": [{ "name": "lab", "context": { "cluster": "lab", "user": "admin" } }],
            "current-context": "lab",
        });
        write(&path.join("kubeconfig"), &kubeconfig.to_string())?;

        // Client and peer URLs on the control plane's loopback: only the API server talks to it.
        let mut cmd = ns.command(&etcd_bin);
        cmd.arg("--name=lab")
            .arg(format!("--data-dir={}", path.join("etcd").display()))
            .arg("--listen-client-urls=http://127.0.0.1:2379")
            .arg("--advertise-client-urls=http://127.0.0.1:2379")
            .arg("--listen-peer-urls=http://127.0.0.1:2380")
            .arg("--initial-advertise-peer-urls=http://127.0.0.1:2380")
            .arg("--initial-cluster=lab=http://127.0.0.1:2380");
        let mut etcd = Daemon::spawn(cmd, None)?;
        etcd.wait_for_line("ready to serve client requests")
            .context("etcd of the lab control plane")?;

        let apiserver = Daemon::spawn(apiserver_command(&ns, ip, path)?, None)?;

        let cp = ControlPlane {
            controllers: Vec::new(),
            apiserver,
            etcd,
            dir,
            ns,
            ip,
            kubectl,
        };
        cp.wait_ready()?;
        Ok(cp)
    }

    /// Waits until /readyz answers ok and the bootstrap controller has made the `default`
    /// namespace with the `kubernetes` Service in it, which the Services of tests join.
    fn wait_ready(&self) -> Result<()> {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            ensure!(
                is_running(self.etcd.pid()),
                "etcd of the lab control plane exited"
            );
            ensure!(
                is_running(self.apiserver.pid()),
                "kube-apiserver exited; its log ends:\n{}",
                self.apiserver_log()
            );
            let readyz = self
                .kubectl(["get", "--raw", "/readyz"])
                .output()
                .context("running kubectl")?;
            let last = if readyz.status.success() && readyz.stdout == b"ok" {
                let svc = self
                    .kubectl(["get", "--namespace", NAMESPACE, "service", "kubernetes"])
                    .output()
                    .context("running kubectl")?;
                if svc.status.success() {
                    return Ok(());
                }
                String::from_utf8_lossy(&svc.stderr).into_owned()
            } else {
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&readyz.stdout),
                    String::from_utf8_lossy(&readyz.stderr)
                )
            };
            if Instant::now() > deadline {
                bail!(
                    "kube-apiserver at {}:{API_PORT} is not ready after {TIMEOUT:?}: {}\nits log \
                     ends:\n{}",
                    self.ip,
                    last.trim(),
                    self.apiserver_log()
                );
            }
            thread::sleep(POLL);
        }
    }

    /// Stops kube-apiserver (SIGTERM; it takes up to 5 s to exit, and is killed after
    /// [`STOP_TIMEOUT`]) and starts it again with the same etcd, certificates, keys and flags;
    /// returns once it is ready again. Objects persist in etcd, and clients keep their
    /// kubeconfig: the API server reuses the certificate it made in its --cert-dir.
    pub fn restart_apiserver(&mut self) -> Result<()> {
        let pid = Pid::from_raw(i32::try_from(self.apiserver.pid())?);
        // It may have exited already: then there is nothing to stop.
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + STOP_TIMEOUT;
        while is_running(self.apiserver.pid()) && Instant::now() < deadline {
            thread::sleep(POLL);
        }
        // Dropping the old guard kills it if it is still there and reaps it, which frees its
        // port for the new one.
        let old = std::mem::replace(
            &mut self.apiserver,
            Daemon::spawn(apiserver_command(&self.ns, self.ip, self.dir.path())?, None)?,
        );
        drop(old);
        self.wait_ready()
            .context("kube-apiserver after its restart")
    }

    /// Starts kube-controller-manager and kube-scheduler next to the API server, as the lab's
    /// admin, for a cluster of kubelet nodes: the controller manager gives every Node a /24 of
    /// [`CLUSTER_CIDR`] as its podCIDR and mints ServiceAccount tokens (signed with the API
    /// server's key, with its certificate as the cluster's CA); the scheduler binds pods to
    /// nodes. Neither serves anything (`--port=0 --secure-port=0`).
    pub fn start_controllers(&mut self) -> Result<()> {
        let path = self.dir.path();
        let common = |name: &str| -> Result<Command> {
            let mut cmd = self.ns.command(k8s_bin(name)?);
            cmd.arg(format!("--kubeconfig={}", self.kubeconfig().display()))
                .arg(format!("--bind-address={}", self.ip))
                .args(["--port=0", "--secure-port=0", "--leader-elect=false"])
                .args(log_to_file(&path.join(format!("{name}.log"))));
            Ok(cmd)
        };
        let mut manager = common("kube-controller-manager")?;
        manager
            .arg("--allocate-node-cidrs")
            .arg(format!("--cluster-cidr={CLUSTER_CIDR}"))
            .arg("--node-cidr-mask-size=24")
            .arg(format!("--service-cluster-ip-range={SERVICE_CIDR}"))
            .arg(format!(
                "--service-account-private-key-file={}",
                path.join("sa.key").display()
            ))
            .arg(format!(
                "--root-ca-file={}",
                path.join("certs/apiserver.crt").display()
            ))
            // No cloud: nothing programs routes for the podCIDRs but the lab.
            .arg("--configure-cloud-routes=false");
        let scheduler = common("kube-scheduler")?;
        self.controllers = vec![
            Daemon::spawn(manager, None)?,
            Daemon::spawn(scheduler, None)?,
        ];
        Ok(())
    }

    /// The last lines of the log of `name`, kube-controller-manager or kube-scheduler.
    pub fn controller_log(&self, name: &str) -> String {
        tail(&self.dir.path().join(format!("{name}.log")))
    }

    /// Fails with its log if kube-apiserver, kube-controller-manager or kube-scheduler exited.
    pub fn check_running(&self) -> Result<()> {
        ensure!(
            is_running(self.apiserver.pid()),
            "kube-apiserver exited; its log ends:\n{}",
            self.apiserver_log()
        );
        for (daemon, name) in self
            .controllers
            .iter()
            .zip(["kube-controller-manager", "kube-scheduler"])
        {
            ensure!(
                is_running(daemon.pid()),
                "{name} exited; its log ends:\n{}",
                self.controller_log(name)
            );
        }
        Ok(())
    }

    /// The kubeconfig of the lab's admin (a token of group system:masters).
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    /// kubectl 1.20.2 with `args` against this control plane, in its namespace (the API server
    /// listens on the underlay only).
    pub fn kubectl<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.ns.command(&self.kubectl);
        cmd.arg("--kubeconfig").arg(self.kubeconfig()).args(args);
        cmd
    }

    /// `kubectl apply` of one object; creates it or brings it to `manifest`.
    pub fn apply(&self, manifest: &Value) -> Result<()> {
        let what = format!(
            "{} {}",
            manifest["kind"].as_str().unwrap_or("object"),
            manifest["metadata"]["name"].as_str().unwrap_or_default()
        );
        run_with_stdin(
            &mut self.kubectl(["apply", "-f", "-"]),
            manifest.to_string().as_bytes(),
        )
        .with_context(|| format!("kubectl apply of {what}"))?;
        Ok(())
    }

    /// Creates or updates `svc` and the EndpointSlice listing its backends, as the endpoint
    /// slice controller would for a Service selecting them.
    pub fn apply_service(&self, svc: &Service) -> Result<()> {
        self.apply(&svc.manifest())?;
        self.apply(&svc.endpoint_slice())
    }

    /// Registers the Node `name` with its InternalIP `ip`, as its kubelet would.
    pub fn add_node(&self, name: &str, ip: Ipv4Addr) -> Result<()> {
        // A Node's status may be set when it is created (not by a later apply): that is how a
        // kubelet registers.
        self.apply(&json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": { "name": name, "labels": { "kubernetes.io/hostname": name } },
            "status": { "addresses": [
                { "type": "InternalIP", "address": ip.to_string() },
                { "type": "Hostname", "address": name },
            ]},
        }))
    }

    /// The process id of the running kube-apiserver.
    pub fn apiserver_pid(&self) -> u32 {
        self.apiserver.pid()
    }

    /// The last lines of kube-apiserver's log.
    pub fn apiserver_log(&self) -> String {
        tail(&self.dir.path().join("kube-apiserver.log"))
    }
}

/// A Service's transport protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// As the Kubernetes API spells it.
    fn api(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        }
    }

    /// As iptables and kube-proxy's chain names spell it.
    pub fn iptables(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// One port of a Service.
#[derive(Clone, Debug)]
pub struct ServicePort {
    /// Names the port in the Service and its EndpointSlice; may be empty if it is the only one.
    pub name: String,
    pub protocol: Protocol,
    /// The port on the ClusterIP.
    pub port: u16,
    /// The backends' port.
    pub target_port: u16,
    /// For a NodePort Service: the port on every node, or `None` to have one allocated
    /// (30000-32767).
    pub node_port: Option<u16>,
}

impl ServicePort {
    pub fn tcp(name: &str, port: u16, target_port: u16) -> ServicePort {
        ServicePort {
            name: name.to_owned(),
            protocol: Protocol::Tcp,
            port,
            target_port,
            node_port: None,
        }
    }

    pub fn udp(name: &str, port: u16, target_port: u16) -> ServicePort {
        ServicePort {
            protocol: Protocol::Udp,
            ..ServicePort::tcp(name, port, target_port)
        }
    }
}

/// A Service's type: the lab's datapath serves these two.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServiceType {
    ClusterIp,
    NodePort,
}

/// A pod behind a Service.
#[derive(Clone, Debug)]
pub struct Backend {
    pub ip: Ipv4Addr,
    /// The node the pod runs on, which tells kube-proxy whether the endpoint is local.
    pub node: String,
}

/// A Service in [`NAMESPACE`] with a chosen ClusterIP and its backends.
#[derive(Clone, Debug)]
pub struct Service {
    pub name: String,
    pub kind: ServiceType,
    /// In [`SERVICE_CIDR`], not 10.96.0.1.
    pub cluster_ip: Ipv4Addr,
    pub ports: Vec<ServicePort>,
    pub backends: Vec<Backend>,
}

impl Service {
    /// The Service object: without a selector, so no controller would touch its endpoints.
    pub fn manifest(&self) -> Value {
        let ports: Vec<Value> = self
            .ports
            .iter()
            .map(|p| {
                let mut port = json!({
                    "name": p.name,
                    "protocol": p.protocol.api(),
                    "port": p.port,
                    "targetPort": p.target_port,
                });
                if let Some(node_port) = p.node_port {
                    port["nodePort"] = json!(node_port);
                }
                port
            })
            .collect();
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": { "name": self.name, "namespace": NAMESPACE },
            "spec": {
                "type": match self.kind {
                    ServiceType::ClusterIp => "ClusterIP",
                    ServiceType::NodePort => "NodePort",
                },
                "clusterIP": self.cluster_ip.to_string(),
                "ports": ports,
            },
        })
    }

    /// The EndpointSlice the endpoint slice controller would write for the Service's backends
    /// (discovery.k8s.io/v1beta1, the version kube-proxy v1.20 reads). The backend's node goes
    /// into the `kubernetes.io/hostname` topology key, where kube-proxy v1.20 looks for it: the
    /// API server drops the newer `nodeName` field unless the alpha feature gate
    /// EndpointSliceNodeName is on.
    pub fn endpoint_slice(&self) -> Value {
        let endpoints: Vec<Value> = self
            .backends
            .iter()
            .map(|b| {
                json!({
                    "addresses": [b.ip.to_string()],
                    "conditions": { "ready": true },
                    "topology": { "kubernetes.io/hostname": b.node },
                })
            })
            .collect();
        let ports: Vec<Value> = self
            .ports
            .iter()
            .map(|p| json!({ "name": p.name, "protocol": p.protocol.api(), "port": p.target_port }))
            .collect();
        json!({
            "apiVersion": "discovery.k8s.io/v1beta1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": self.name,
                "namespace": NAMESPACE,
                "labels": {
                    // What ties the slice to its Service for kube-proxy.
                    "kubernetes.io/service-name": self.name,
                    "endpointslice.kubernetes.io/managed-by": "podwire-lab",
                },
            },
            "addressType": "IPv4",
            "endpoints": endpoints,
            "ports": ports,
        })
    }

    /// kube-proxy's name of `port`: `namespace/service:port`, without the colon for an unnamed
    /// port.
    fn port_name(&self, port: &ServicePort) -> String {
        match port.name.as_str() {
            "" => format!("{NAMESPACE}/{}", self.name),
            name => format!("{NAMESPACE}/{}:{name}", self.name),
        }
    }

    /// The nat chain kube-proxy balances `port` over the backends in: `KUBE-SVC-` and the first
    /// 16 base32 characters of sha256(port name + protocol).
    pub fn svc_chain(&self, port: &ServicePort) -> String {
        let name = self.port_name(port) + port.protocol.iptables();
        format!("KUBE-SVC-{}", chain_hash(&name))
    }

    /// The nat chain kube-proxy DNATs `port`'s traffic to `backend` in: `KUBE-SEP-` and the hash
    /// of port name, protocol and `ip:target port`.
    pub fn sep_chain(&self, port: &ServicePort, backend: &Backend) -> String {
        let name = format!(
            "{}{}{}:{}",
            self.port_name(port),
            port.protocol.iptables(),
            backend.ip,
            port.target_port
        );
        format!("KUBE-SEP-{}", chain_hash(&name))
    }

    /// Whether the rules kube-proxy writes for this Service, for exactly these backends, are
    /// all in `nat` and `filter` (iptables-save of each table).
    fn is_programmed(&self, nat: &str, filter: &str) -> bool {
        self.ports.iter().all(|port| {
            let to_svc = format!("-j {}", self.svc_chain(port));
            // The trailing space keeps port 80 from matching 8080.
            let matches = [
                format!("-d {}/32 ", self.cluster_ip),
                format!("-p {} ", port.protocol.iptables()),
                format!("--dport {} ", port.port),
            ];
            let for_cluster_ip = |rule: &&str| matches.iter().all(|m| rule.contains(m.as_str()));
            if self.backends.is_empty() {
                // No endpoints: kube-proxy rejects in the filter table and has nothing in nat.
                return rules(filter, "KUBE-SERVICES")
                    .any(|r| for_cluster_ip(&r) && r.contains(" -j REJECT"))
                    && !rules(nat, "KUBE-SERVICES").any(|r| r.ends_with(&to_svc));
            }
            let cluster_ip =
                rules(nat, "KUBE-SERVICES").any(|r| for_cluster_ip(&r) && r.ends_with(&to_svc));
            let node_port = match self.kind {
                ServiceType::ClusterIp => true,
                ServiceType::NodePort => rules(nat, "KUBE-NODEPORTS").any(|r| {
                    r.ends_with(&to_svc)
                        && port
                            .node_port
                            .is_none_or(|np| r.contains(&format!("--dport {np} ")))
                }),
            };
            // One jump per backend, to its own chain, and no other.
            let mut seps: Vec<&str> = rules(nat, &self.svc_chain(port))
                .filter_map(|r| r.rsplit_once("-j ").map(|(_, target)| target))
                .filter(|target| target.starts_with("KUBE-SEP-"))
                .collect();
            seps.sort_unstable();
            let mut wanted: Vec<String> = self
                .backends
                .iter()
                .map(|b| self.sep_chain(port, b))
                .collect();
            wanted.sort_unstable();
            let dnats = self.backends.iter().all(|b| {
                let to = format!("-j DNAT --to-destination {}:{}", b.ip, port.target_port);
                rules(nat, &self.sep_chain(port, b)).any(|r| r.contains(&to))
            });
            cluster_ip && node_port && seps == wanted && dnats
        })
    }
}

/// The rules of `chain` in `table`, an iptables-save output.
fn rules<'a>(table: &'a str, chain: &str) -> impl Iterator<Item = &'a str> {
    let prefix = format!("-A {chain} ");
    table.lines().filter(move |line| line.starts_with(&prefix))
}

/// kube-proxy's chain name hash: base32 (RFC 4648 alphabet) of sha256(`name`), first 16
/// characters, which encode the first 10 bytes.
fn chain_hash(name: &str) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let digest = Sha256::digest(name.as_bytes());
    let bits = digest[..10]
        .iter()
        .fold(0u128, |acc, &byte| (acc << 8) | u128::from(byte));
    (0..16)
        .map(|i| char::from(ALPHABET[((bits >> (75 - 5 * i)) & 31) as usize]))
        .collect()
}

/// The real kube-proxy in a node's network namespace, where it writes its iptables rules.
/// Killed when dropped.
pub struct KubeProxy {
    daemon: Daemon,
    /// The node's namespace, where iptables-save shows the rules.
    netns: PathBuf,
    pub node_name: String,
    /// Its log file.
    dir: tempfile::TempDir,
}

impl KubeProxy {
    /// Registers `node` as the Node `name` with `cp`, starts kube-proxy for it in the node's
    /// namespace and waits for its first full sync of the rules.
    ///
    /// Flags beyond kube-proxy's defaults (iptables mode, not masquerading everything): the
    /// node's address for its listeners, the cluster's pod range (Service traffic from outside it
    /// is masqueraded), and conntrack settings of 0, which stop it from writing sysctls that are
    /// global to the machine rather than the node's namespace.
    pub fn start(node: &Node, name: &str, cp: &ControlPlane) -> Result<KubeProxy> {
        let binary = k8s_bin("kube-proxy")?;
        cp.add_node(name, node.ip)?;
        let dir = lab_dir("kube-proxy")?;
        let log = dir.path().join("kube-proxy.log");
        let mut cmd = node.command(&binary);
        cmd.args(kube_proxy_args(node.ip, name, &cp.kubeconfig()))
            .args(log_to_file(&log));
        let proxy = KubeProxy {
            daemon: Daemon::spawn(cmd, None)?,
            netns: node.ns.path(),
            node_name: name.to_owned(),
            dir,
        };
        // The rule that closes KUBE-SERVICES is written by every full sync, and the first one
        // waits until kube-proxy has read all Services and EndpointSlices.
        proxy.wait_until("its first sync of the nat table", |nat, _| {
            nat.lines()
                .any(|l| l.starts_with("-A KUBE-SERVICES ") && l.ends_with("-j KUBE-NODEPORTS"))
        })?;
        Ok(proxy)
    }

    /// `iptables-save -t <table>` in the node's namespace.
    pub fn iptables_save(&self, table: &str) -> Result<String> {
        let mut cmd = command_in(&self.netns, "iptables-save");
        Ok(String::from_utf8(run(cmd.args(["-t", table]))?.stdout)?)
    }

    /// Waits until the node's rules for `svc` are all there, for exactly its backends (after
    /// [`ControlPlane::apply_service`]); returns the nat table.
    pub fn wait_for_service(&self, svc: &Service) -> Result<String> {
        self.wait_until(
            &format!("the rules of Service {}", svc.name),
            |nat, filter| svc.is_programmed(nat, filter),
        )
    }

    /// The last lines of kube-proxy's log.
    pub fn log(&self) -> String {
        tail(&self.dir.path().join("kube-proxy.log"))
    }

    /// Polls the node's nat and filter tables until `done` holds for them; returns the nat table.
    fn wait_until(&self, what: &str, done: impl Fn(&str, &str) -> bool) -> Result<String> {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            ensure!(
                is_running(self.daemon.pid()),
                "kube-proxy on {} exited; its log ends:\n{}",
                self.node_name,
                self.log()
            );
            let nat = self.iptables_save("nat")?;
            let filter = self.iptables_save("filter")?;
            if done(&nat, &filter) {
                return Ok(nat);
            }
            if Instant::now() > deadline {
                bail!(
                    "kube-proxy on {} has not written {what} after {TIMEOUT:?}; nat \
                     table:\n{nat}\nfilter table:\n{filter}\nkube-proxy's log ends:\n{}",
                    self.node_name,
                    self.log()
                );
            }
            thread::sleep(POLL);
        }
    }
}

/// kube-apiserver in `ns` on `ip`, with etcd on the namespace's loopback and its certificates,
/// keys, tokens and log in `dir`.
fn apiserver_command(ns: &NetNs, ip: Ipv4Addr, dir: &Path) -> Result<Command> {
    let mut cmd = ns.command(k8s_bin("kube-apiserver")?);
    cmd.arg("--etcd-servers=http://127.0.0.1:2379")
        .arg(format!("--bind-address={ip}"))
        .arg(format!("--advertise-address={ip}"))
        .arg(format!("--secure-port={API_PORT}"))
        .arg(format!("--cert-dir={}", dir.join("certs").display()))
        .arg(format!(
            "--token-auth-file={}",
            dir.join("tokens.csv").display()
        ))
        .arg("--authorization-mode=RBAC")
        .arg("--service-account-issuer=https://kubernetes.default.svc")
        .arg(format!(
            "--service-account-key-file={}",
            dir.join("sa.pub").display()
        ))
        .arg(format!(
            "--service-account-signing-key-file={}",
            dir.join("sa.key").display()
        ))
        .arg(format!("--service-cluster-ip-range={SERVICE_CIDR}"))
        .arg("--allow-privileged=true")
        // Node names (node1, ...) resolve nowhere: exec, logs and port-forward reach a kubelet
        // by the InternalIP it registered.
        .arg("--kubelet-preferred-address-types=InternalIP")
        .args(log_to_file(&dir.join("kube-apiserver.log")));
    Ok(cmd)
}

/// kube-proxy's flags for the node `name` at `ip`; see [`KubeProxy::start`].
pub(crate) fn kube_proxy_args(ip: Ipv4Addr, name: &str, kubeconfig: &Path) -> Vec<String> {
    vec![
        "--proxy-mode=iptables".to_owned(),
        format!("--bind-address={ip}"),
        format!("--cluster-cidr={CLUSTER_CIDR}"),
        "--conntrack-max-per-core=0".to_owned(),
        "--conntrack-min=0".to_owned(),
        "--conntrack-tcp-timeout-established=0".to_owned(),
        "--conntrack-tcp-timeout-close-wait=0".to_owned(),
        "--metrics-bind-address=127.0.0.1:10249".to_owned(),
        format!("--healthz-bind-address={ip}:10256"),
        format!("--hostname-override={name}"),
        format!("--kubeconfig={}", kubeconfig.display()),
    ]
}

/// klog flags that send a Kubernetes binary's log to `file` (read on failure) instead of
/// stderr, where nothing would read it while the lab runs; errors still go to stderr too.
fn log_to_file(file: &Path) -> [String; 2] {
    [
        "--logtostderr=false".to_owned(),
        format!("--log-file={}", file.display()),
    ]
}

/// The last [`LOG_TAIL`] lines of the log `file`.
pub(crate) fn tail(file: &Path) -> String {
    let text = fs::read_to_string(file).unwrap_or_else(|e| format!("({}: {e})", file.display()));
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL)..].join("\n")
}

/// Whether the process `pid` (a child of ours) is still running: an exited child stays a zombie
/// until its [`Daemon`] reaps it.
pub(crate) fn is_running(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // The state follows the command name, which is in parentheses and may hold spaces.
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z")
    })
}

/// A directory for `role` in the temporary directory, removed on drop. Named as the lab names
/// namespaces, so the first call sweeps those of killed lab processes: etcd's data alone takes
/// over 100 MB (it preallocates its write-ahead log).
pub(crate) fn lab_dir(role: &str) -> Result<tempfile::TempDir> {
    static SWEEP: std::sync::Once = std::sync::Once::new();
    let tmp = std::env::temp_dir();
    SWEEP.call_once(|| sweep_stale(&tmp));
    tempfile::Builder::new()
        .prefix(&unique_name(role))
        .rand_bytes(0)
        .tempdir_in(&tmp)
        .with_context(|| format!("creating a directory for {role} in {}", tmp.display()))
}

pub(crate) fn write(path: &Path, text: &str) -> Result<()> {
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// `bytes` random bytes from the kernel, in hex.
fn random_hex(bytes: usize) -> Result<String> {
    let mut buf = vec![0u8; bytes];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .context("reading /dev/urandom")?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Chain names kube-proxy v1.20.2 computes (its Go code run on these inputs; the first is
    /// the `kubernetes` Service's chain in every cluster).
    #[test]
    fn chain_names_are_kube_proxys() {
        let mut svc = Service {
            name: "kubernetes".into(),
            kind: ServiceType::ClusterIp,
            cluster_ip: Ipv4Addr::new(10, 96, 0, 1),
            ports: vec![ServicePort::tcp("https", 443, 6443)],
            backends: vec![Backend {
                ip: Ipv4Addr::new(192, 168, 77, 250),
                node: String::new(),
            }],
        };
        assert_eq!(svc.svc_chain(&svc.ports[0]), "KUBE-SVC-NPX46M4PTMTKRN6Y");
        assert_eq!(
            svc.sep_chain(&svc.ports[0], &svc.backends[0]),
            "KUBE-SEP-6I2YRI3YRULRLNVV"
        );
        svc.name = "dns".into();
        let unnamed = ServicePort::udp("", 53, 53);
        assert_eq!(svc.svc_chain(&unnamed), "KUBE-SVC-CR2V5ZP3AXU5XYAF");
    }

    /// kube-proxy v1.20.2's nat rules for a Service `smoke` (10.96.0.50, http 80 -> 8080) with
    /// one backend, as iptables-save printed them in a lab node (other rules left out).
    const SMOKE_NAT: &str = "\
-A KUBE-SEP-MMFSA2N7Q2RAPOC7 -s 10.244.1.2/32 -m comment --comment \"default/smoke:http\" -j KUBE-MARK-MASQ
-A KUBE-SEP-MMFSA2N7Q2RAPOC7 -p tcp -m comment --comment \"default/smoke:http\" -m tcp -j DNAT --to-destination 10.244.1.2:8080
-A KUBE-SERVICES ! -s 10.244.0.0/16 -d 10.96.0.50/32 -p tcp -m comment --comment \"default/smoke:http cluster IP\" -m tcp --dport 80 -j KUBE-MARK-MASQ
-A KUBE-SERVICES -d 10.96.0.50/32 -p tcp -m comment --comment \"default/smoke:http cluster IP\" -m tcp --dport 80 -j KUBE-SVC-5XSSD4SYBFIMLKK5
-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
-A KUBE-SVC-5XSSD4SYBFIMLKK5 -m comment --comment \"default/smoke:http\" -j KUBE-SEP-MMFSA2N7Q2RAPOC7
";

    fn smoke(backends: &[[u8; 4]]) -> Service {
        Service {
            name: "smoke".into(),
            kind: ServiceType::ClusterIp,
            cluster_ip: Ipv4Addr::new(10, 96, 0, 50),
            ports: vec![ServicePort::tcp("http", 80, 8080)],
            backends: backends
                .iter()
                .map(|&ip| Backend {
                    ip: ip.into(),
                    node: "node1".into(),
                })
                .collect(),
        }
    }

    #[test]
    fn a_service_is_programmed_only_with_exactly_its_rules() {
        assert!(smoke(&[[10, 244, 1, 2]]).is_programmed(SMOKE_NAT, ""));
        // Not yet (or no longer) what kube-proxy wrote.
        assert!(!smoke(&[[10, 244, 1, 3]]).is_programmed(SMOKE_NAT, ""));
        assert!(!smoke(&[[10, 244, 1, 2], [10, 244, 1, 3]]).is_programmed(SMOKE_NAT, ""));
        assert!(!smoke(&[]).is_programmed(SMOKE_NAT, ""));
        let mut node_port = smoke(&[[10, 244, 1, 2]]);
        node_port.kind = ServiceType::NodePort;
        assert!(!node_port.is_programmed(SMOKE_NAT, ""));
        let mut other_port = smoke(&[[10, 244, 1, 2]]);
        other_port.ports[0].port = 8;
        assert!(!other_port.is_programmed(SMOKE_NAT, ""));
    }

    #[test]
    fn a_service_without_backends_is_programmed_as_a_reject() {
        let filter = "-A KUBE-SERVICES -d 10.96.0.50/32 -p tcp -m comment --comment \
                      \"default/smoke:http has no endpoints\" -m tcp --dport 80 -j REJECT \
                      --reject-with icmp-port-unreachable";
        assert!(smoke(&[]).is_programmed("", filter));
        assert!(!smoke(&[]).is_programmed(SMOKE_NAT, filter));
    }
}
