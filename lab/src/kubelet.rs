//! A whole Kubernetes v1.20.2 cluster in the lab: the [`ControlPlane`] with the controller
//! manager and the scheduler on a host of its own on the underlay, and nodes that are what a
//! kubeadm node is: containerd 1.6 with runc, the real kubelet and kube-proxy. There is no CNI:
//! the nodes stay NotReady until a CNI configuration appears in their /etc/cni/net.d, written by
//! a test or installed by a DaemonSet (podwire's, say), as on a freshly made cluster.
//!
//! Each node is a network namespace on the underlay plus a private mount namespace, owned by a
//! holder process (`sleep`) that containerd, kubelet, kube-proxy and [`KubeNode::command`] enter
//! with `nsenter -t <holder> -m -n`. In it:
//! - a sysfs of its own (its network interfaces; `ip netns exec` does the same), with the
//!   machine's cgroup hierarchies mounted again below /sys/fs/cgroup (a fresh sysfs has none,
//!   and kubelet dies with "mountpoint for cpu not found"), and a bpffs of its own on
//!   /sys/fs/bpf, so what a node pins stays in that node;
//! - a tmpfs on /run (containerd's state and socket, the pods' network namespace pins);
//! - directories of the node bound over /var/lib/containerd, /var/lib/kubelet, /var/lib/cni,
//!   /etc/cni/net.d, /opt/cni/bin (with the `loopback` plugin every kubeadm node has),
//!   /var/log/pods, /var/log/containers and /var/lib/podwire; mount points missing on the
//!   machine are made first and removed when the last cluster goes;
//! - files holding the values kubelet wants bound over the machine-wide sysctls it would write
//!   (vm.overcommit_memory, vm.panic_on_oom, kernel.panic, kernel.panic_on_oops,
//!   kernel.keys.root_max*): it reads them, finds them right, and changes nothing on the host;
//! - `/` made rshared last, so a privileged pod's Bidirectional mount (a bpffs at /sys/fs/bpf)
//!   propagates into the node and no further.
//!
//! Every process of a node runs in a cgroup subtree of its own (kubelet's `--cgroup-root`, the
//! daemons in its `system` child, the containerd shims and pods below): dropping the cluster
//! kills every process in those subtrees, removes them depth-first, then the namespaces and
//! directories. A cluster killed before its guard ran is swept by the next one. Clusters are
//! serialised machine-wide by a file lock: one at a time fits the two CPUs and ~1 GiB here.
//!
//! Logs: every daemon's output goes to a file in the node's directory ([`KubeNode::log`]);
//! failures quote their tails.

use std::{
    ffi::OsStr,
    fmt::Write as _,
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use nix::{
    fcntl::Flock,
    sys::signal::{kill, Signal},
    unistd::Pid,
};
use serde_json::Value;

use crate::{
    artifacts::{k8s_bin, k8s_node_dir},
    images::{BUSYBOX_IMAGE, PAUSE_IMAGE},
    k8s::{
        is_running, kube_proxy_args, lab_dir, tail, write, ControlPlane, CONTROL_PLANE_IP, POLL,
        TIMEOUT,
    },
    namespaces::{unique_name, NetNs},
    nodes::{Cluster, Underlay},
    processes::{run, Daemon},
    PREFIX,
};

/// The cluster domain kubelet gives pods (`--cluster-domain`); their nameserver is the control
/// plane's address, where a cluster DNS may answer.
const CLUSTER_DOMAIN: &str = "cluster.local";
/// Where the machine's cgroup hierarchies are mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// The node's directories bound over these paths in its mount namespace (node directory name,
/// path).
const NODE_MOUNTS: &[(&str, &str)] = &[
    ("containerd", "/var/lib/containerd"),
    ("kubelet", "/var/lib/kubelet"),
    ("cni", "/var/lib/cni"),
    ("net.d", "/etc/cni/net.d"),
    ("cni-bin", "/opt/cni/bin"),
    ("pods", "/var/log/pods"),
    ("containers", "/var/log/containers"),
    ("podwire", "/var/lib/podwire"),
];
/// The global sysctls kubelet sets, with the values it wants: the node sees these.
const KUBELET_SYSCTLS: &[(&str, &str)] = &[
    ("vm/overcommit_memory", "1"),
    ("vm/panic_on_oom", "0"),
    ("kernel/panic", "10"),
    ("kernel/panic_on_oops", "1"),
    ("kernel/keys/root_maxkeys", "1000000"),
    ("kernel/keys/root_maxbytes", "25000000"),
];
/// Files the lab keeps machine-wide, in the temporary directory: the lock serialising clusters,
/// and the mount points clusters created on the machine, removed by the last one to go.
const LOCK_FILE: &str = "pwlab-kubecluster.lock";
const MOUNT_POINTS_FILE: &str = "pwlab-kubecluster.mountpoints";
/// The cgroup role: every node's subtree is `/pwlab-kubelet-<pid>-<n>`.
const CGROUP_ROLE: &str = "kubelet";
/// How long killing a node's processes may take before teardown gives up on its cgroups.
const KILL_TIMEOUT: Duration = Duration::from_secs(20);

/// A control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler) and kubelet
/// nodes on one underlay. Dropping it removes all of it.
pub struct KubeCluster {
    /// Dropped first: their processes, cgroups and namespaces.
    pub nodes: Vec<KubeNode>,
    pub cp: ControlPlane,
    pub underlay: Underlay,
    /// The mount points this machine lacked, made for the nodes.
    _mount_points: MountPoints,
    /// Released last.
    _lock: Flock<fs::File>,
}

impl KubeCluster {
    /// Starts a control plane at [`CONTROL_PLANE_IP`] and `nodes` kubelet nodes (`node1`, ...
    /// at the addresses of the lab's [`Cluster`]), waits until every node has registered and
    /// has its podCIDR, and routes each podCIDR via its node on the control plane's host (the
    /// API server proxies to pods). The nodes are NotReady until they get a CNI configuration.
    /// Waits while another cluster runs on this machine.
    pub fn start(nodes: usize) -> Result<KubeCluster> {
        crate::require_root()?;
        let lock = lock()?;
        sweep_stale_cgroups();
        let node_dir = k8s_node_dir()?;
        let mount_points = MountPoints::create()?;
        let underlay = Underlay::new()?;
        let mut cp = ControlPlane::start(&underlay, CONTROL_PLANE_IP)?;
        // The control plane's host routes pod traffic (its own to pods, and replies through
        // it): it forwards, as a router between the podCIDRs' nodes would.
        cp.ns.sysctl_ipv4("ip_forward", "1")?;
        cp.start_controllers()?;
        let mut cluster = KubeCluster {
            nodes: Vec::new(),
            cp,
            underlay,
            _mount_points: mount_points,
            _lock: lock,
        };
        for i in 0..nodes {
            let node = KubeNode::start(&cluster, &node_dir, i)?;
            cluster.nodes.push(node);
        }
        cluster.wait_nodes_registered_with_pod_cidr()?;
        Ok(cluster)
    }

    /// The admin's kubeconfig.
    pub fn kubeconfig(&self) -> PathBuf {
        self.cp.kubeconfig()
    }

    /// kubectl 1.20.2 with `args` as the admin, in the control plane's namespace.
    pub fn kubectl<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.cp.kubectl(args)
    }

    /// The node named `name`.
    pub fn node(&self, name: &str) -> Result<&KubeNode> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .with_context(|| format!("the cluster has no node {name}"))
    }

    /// The podCIDR the controller manager gave the Node `name`.
    pub fn pod_cidr(&self, name: &str) -> Result<String> {
        let nodes = self.api_nodes()?;
        let node = nodes
            .iter()
            .find(|n| n.name == name)
            .with_context(|| format!("no Node {name} registered"))?;
        node.pod_cidr
            .clone()
            .with_context(|| format!("Node {name} has no podCIDR yet"))
    }

    /// Waits until every node has registered its Node with its address and has a podCIDR; adds
    /// the control plane's route to each podCIDR via its node. Returns (node, podCIDR) in node
    /// order.
    pub fn wait_nodes_registered_with_pod_cidr(&self) -> Result<Vec<(String, String)>> {
        let cidrs = self.wait_until("every node registered with a podCIDR", |nodes| {
            self.nodes
                .iter()
                .map(|n| {
                    let api = nodes.iter().find(|a| a.name == n.name)?;
                    (api.internal_ip == Some(n.ip)).then_some(())?;
                    Some((n.name.clone(), api.pod_cidr.clone()?))
                })
                .collect::<Option<Vec<_>>>()
        })?;
        for ((_, cidr), node) in cidrs.iter().zip(&self.nodes) {
            self.cp
                .ns
                .ip(&["route", "replace", cidr, "via", &node.ip.to_string()])?;
        }
        Ok(cidrs)
    }

    /// Waits up to `timeout` until every node is Ready.
    pub fn wait_ready(&self, timeout: Duration) -> Result<()> {
        self.wait_until_within("every node Ready", timeout, |nodes| {
            self.nodes
                .iter()
                .all(|n| nodes.iter().any(|a| a.name == n.name && a.ready))
                .then_some(())
        })
    }

    /// The Nodes as the API reports them.
    pub fn api_nodes(&self) -> Result<Vec<ApiNode>> {
        let out = run(&mut self.kubectl(["get", "nodes", "-o", "json"]))?;
        let list: Value = serde_json::from_slice(&out.stdout).context("kubectl's Node list")?;
        Ok(list["items"]
            .as_array()
            .into_iter()
            .flatten()
            .map(ApiNode::of)
            .collect())
    }

    fn wait_until<T>(&self, what: &str, done: impl Fn(&[ApiNode]) -> Option<T>) -> Result<T> {
        self.wait_until_within(what, TIMEOUT, done)
    }

    /// Polls the Nodes until `done` gives a value, failing early if a daemon exits, and after
    /// `timeout` with the Nodes and every node's log tails.
    fn wait_until_within<T>(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&[ApiNode]) -> Option<T>,
    ) -> Result<T> {
        let deadline = Instant::now() + timeout;
        loop {
            self.cp.check_running()?;
            for node in &self.nodes {
                node.check_running()?;
            }
            let nodes = self.api_nodes()?;
            if let Some(value) = done(&nodes) {
                return Ok(value);
            }
            if Instant::now() > deadline {
                let mut report = format!("not {what} after {timeout:?}; Nodes: {nodes:#?}");
                for node in &self.nodes {
                    for daemon in [Log::Kubelet, Log::Containerd] {
                        let _ = write!(
                            report,
                            "\n{} {daemon:?} log ends:\n{}",
                            node.name,
                            node.log(daemon)
                        );
                    }
                }
                bail!(report);
            }
            thread::sleep(POLL);
        }
    }
}

/// What the API says of a Node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiNode {
    pub name: String,
    pub internal_ip: Option<Ipv4Addr>,
    pub pod_cidr: Option<String>,
    /// Its Ready condition is True.
    pub ready: bool,
    /// The Ready condition's message (why it is not ready).
    pub ready_message: String,
}

impl ApiNode {
    /// Reads a Node object.
    pub fn of(node: &Value) -> ApiNode {
        let status = &node["status"];
        let internal_ip = status["addresses"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["type"] == "InternalIP")
            .and_then(|a| a["address"].as_str()?.parse().ok());
        let ready = status["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["type"] == "Ready");
        ApiNode {
            name: node["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            internal_ip,
            pod_cidr: node["spec"]["podCIDR"].as_str().map(str::to_owned),
            ready: ready.is_some_and(|c| c["status"] == "True"),
            ready_message: ready
                .and_then(|c| c["message"].as_str())
                .unwrap_or_default()
                .to_owned(),
        }
    }
}

/// A daemon of a node whose log [`KubeNode::log`] reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Log {
    Containerd,
    Kubelet,
    KubeProxy,
}

impl Log {
    fn file(self) -> &'static str {
        match self {
            Log::Containerd => "containerd.log",
            Log::Kubelet => "kubelet.log",
            Log::KubeProxy => "kube-proxy.log",
        }
    }
}

/// One kubelet node: its network namespace on the underlay, the holder of its mount
/// namespace, containerd, kubelet and kube-proxy.
pub struct KubeNode {
    pub name: String,
    pub ip: Ipv4Addr,
    /// Its cgroup subtree's name in every hierarchy (kubelet's `--cgroup-root`).
    cgroup: String,
    /// kube-proxy, kubelet, containerd and the holder: killed (with everything else in the
    /// node's cgroups) and reaped on drop.
    daemons: Vec<Daemon>,
    holder: u32,
    /// The node's directories (bound into it), configuration and logs.
    dir: tempfile::TempDir,
    /// Dropped after the processes: deletes the node's veth and everything else in it.
    pub ns: NetNs,
}

impl KubeNode {
    /// Starts node `i` of `cluster` with the runtime in `runtime` (see
    /// [`crate::artifacts::k8s_node_dir`]) and imports the sandbox and busybox images.
    fn start(cluster: &KubeCluster, runtime: &Path, i: usize) -> Result<KubeNode> {
        let name = Cluster::node_name(i);
        let ip = Cluster::node_ip(i);
        let ns = cluster.underlay.plug("kubelet", ip, true)?;
        // Default route via the control plane's host, which routes every podCIDR: a node
        // reaches other nodes' pods and Service addresses without routes of its own.
        ns.ip(&[
            "route",
            "add",
            "default",
            "via",
            &CONTROL_PLANE_IP.to_string(),
        ])?;
        let dir = lab_dir(&format!("kubelet-{name}"))?;
        let path = dir.path();
        for (sub, _) in NODE_MOUNTS {
            let d = path.join(sub);
            fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        }
        let loopback = runtime.join("cni/loopback");
        fs::copy(&loopback, path.join("cni-bin/loopback"))
            .with_context(|| format!("copying {}", loopback.display()))?;
        for (key, value) in KUBELET_SYSCTLS {
            let file = path.join("sysctl").join(key);
            fs::create_dir_all(file.parent().expect("a file in a directory"))?;
            write(&file, &format!("{value}\n"))?;
        }
        write(
            &path.join("resolv.conf"),
            &format!("nameserver {CONTROL_PLANE_IP}\n"),
        )?;
        write(&path.join("containerd.toml"), &containerd_config(runtime))?;

        let cgroup = unique_name(CGROUP_ROLE);
        let mut node = KubeNode {
            name,
            ip,
            cgroup,
            daemons: Vec::new(),
            holder: 0,
            dir,
            ns,
        };
        // From here on, dropping `node` removes what it made.
        let hierarchies = hierarchies()?;
        node.create_cgroups(&hierarchies)?;
        node.start_holder(&hierarchies)?;
        node.start_containerd(runtime)?;
        for image in ["pause.tar", "busybox.tar"] {
            node.import_image(&runtime.join("images").join(image))?;
        }
        node.start_kubelet(cluster)?;
        let kube_proxy = node.launch(
            &k8s_bin("kube-proxy")?,
            &kube_proxy_args(node.ip, &node.name, &cluster.cp.kubeconfig()),
            Log::KubeProxy,
        )?;
        node.daemons.push(kube_proxy);
        Ok(node)
    }

    /// A command running `program` in this node: its network and mount namespaces.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg("-t")
            .arg(self.holder.to_string())
            .args(["-m", "-n"])
            .arg(program);
        cmd
    }

    /// Imports the image archive `archive` (docker or OCI) into the node's containerd, where
    /// kubelet finds it.
    pub fn import_image(&self, archive: &Path) -> Result<()> {
        let ctr = k8s_node_dir()?.join("bin/ctr");
        run(self
            .command(ctr)
            .args(["-n", "k8s.io", "images", "import"])
            .arg(archive))
        .with_context(|| format!("importing {} into {}", archive.display(), self.name))?;
        Ok(())
    }

    /// The node's /etc/cni/net.d, seen from the machine.
    pub fn cni_conf_dir(&self) -> PathBuf {
        self.dir.path().join("net.d")
    }

    /// The node's /opt/cni/bin, seen from the machine.
    pub fn cni_bin_dir(&self) -> PathBuf {
        self.dir.path().join("cni-bin")
    }

    /// Makes the reference `bridge` + `host-local` plugins (Debian's containernetworking-plugins)
    /// this node's CNI, as a cluster without podwire would have it: pods on a bridge whose
    /// address is their gateway, hairpin on (a pod reaches itself through a Service), addresses
    /// from `pod_cidr`. The conflist is written then renamed: the runtime never reads half a file.
    pub fn install_reference_bridge(&self, pod_cidr: &str) -> Result<()> {
        for plugin in ["bridge", "host-local"] {
            let from = Path::new(REFERENCE_PLUGINS).join(plugin);
            fs::copy(&from, self.cni_bin_dir().join(plugin)).with_context(|| {
                format!(
                    "copying {} into {}'s CNI plugins (Debian's containernetworking-plugins)",
                    from.display(),
                    self.name
                )
            })?;
        }
        let dir = self.cni_conf_dir();
        let partial = dir.join(".10-bridge.conflist.partial");
        write(&partial, &bridge_conflist(pod_cidr).to_string())?;
        fs::rename(&partial, dir.join("10-bridge.conflist"))
            .with_context(|| format!("renaming {}", partial.display()))
    }

    /// The node's /var/lib/podwire, seen from the machine.
    pub fn podwire_dir(&self) -> PathBuf {
        self.dir.path().join("podwire")
    }

    /// The last lines of `daemon`'s log.
    pub fn log(&self, daemon: Log) -> String {
        tail(&self.dir.path().join(daemon.file()))
    }

    /// Fails with its log if containerd, kubelet or kube-proxy exited.
    pub fn check_running(&self) -> Result<()> {
        // daemons: holder, containerd, kubelet, kube-proxy.
        for (daemon, log) in
            self.daemons
                .iter()
                .skip(1)
                .zip([Log::Containerd, Log::Kubelet, Log::KubeProxy])
        {
            ensure!(
                is_running(daemon.pid()),
                "{log:?} on {} exited; its log ends:\n{}",
                self.name,
                self.log(log)
            );
        }
        Ok(())
    }

    /// The node's subtree `/<cgroup>` and its `system` child (the daemons') in every hierarchy.
    fn create_cgroups(&self, hierarchies: &[Hierarchy]) -> Result<()> {
        for h in hierarchies {
            for sub in ["", "system"] {
                let dir = Path::new(&h.dir).join(&self.cgroup).join(sub);
                fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
                if h.options.split(',').any(|o| o == "cpuset") {
                    // A cpuset cgroup takes no process before it has CPUs and memory nodes.
                    for file in ["cpuset.cpus", "cpuset.mems"] {
                        let parent = dir.parent().expect("below the hierarchy").join(file);
                        let value = fs::read_to_string(&parent)
                            .with_context(|| format!("reading {}", parent.display()))?;
                        write(&dir.join(file), value.trim())?;
                    }
                }
            }
        }
        Ok(())
    }

    /// `cgroup.procs` of the daemons' cgroup in every hierarchy.
    fn system_procs(&self) -> Result<Vec<PathBuf>> {
        Ok(hierarchies()?
            .iter()
            .map(|h| {
                Path::new(&h.dir)
                    .join(&self.cgroup)
                    .join("system/cgroup.procs")
            })
            .collect())
    }

    /// The holder: enters the node's network namespace, makes a private mount namespace, sets
    /// it up (see the module's comment) and sleeps.
    fn start_holder(&mut self, hierarchies: &[Hierarchy]) -> Result<()> {
        let script = holder_script(self.dir.path(), hierarchies);
        let mut cmd = in_cgroups(&self.system_procs()?, None);
        cmd.arg("nsenter")
            .arg(format!("--net={}", self.ns.path().display()))
            .args(["unshare", "--mount", "--propagation", "private"])
            .args(["sh", "-c", &script]);
        let mut holder = Daemon::spawn(cmd, None)?;
        self.holder = holder.pid();
        let ready = holder.wait_for_line(HOLDER_READY);
        self.daemons.push(holder);
        ready.with_context(|| format!("setting up the mount namespace of {}", self.name))?;
        Ok(())
    }

    /// Starts `program` with `args` in the node's namespaces and daemons' cgroup, its output
    /// going to `log`'s file.
    fn launch(&self, program: &Path, args: &[String], log: Log) -> Result<Daemon> {
        let mut cmd = in_cgroups(
            &self.system_procs()?,
            Some(&self.dir.path().join(log.file())),
        );
        cmd.arg("nsenter")
            .arg("-t")
            .arg(self.holder.to_string())
            .args(["-m", "-n"])
            .arg(program)
            .args(args);
        Daemon::spawn(cmd, None)
    }

    fn start_containerd(&mut self, runtime: &Path) -> Result<()> {
        let config = self.dir.path().join("containerd.toml");
        let containerd = self.launch(
            &runtime.join("bin/containerd"),
            &[format!("--config={}", config.display())],
            Log::Containerd,
        )?;
        self.daemons.push(containerd);
        let ctr = runtime.join("bin/ctr");
        let deadline = Instant::now() + TIMEOUT;
        loop {
            self.check_running()?;
            let version = self.command(&ctr).arg("version").output()?;
            if version.status.success() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "containerd on {} does not answer after {TIMEOUT:?}: {}\nits log ends:\n{}",
                    self.name,
                    String::from_utf8_lossy(&version.stderr).trim(),
                    self.log(Log::Containerd)
                );
            }
            thread::sleep(POLL);
        }
    }

    fn start_kubelet(&mut self, cluster: &KubeCluster) -> Result<()> {
        let path = self.dir.path();
        let args = vec![
            format!("--kubeconfig={}", cluster.cp.kubeconfig().display()),
            "--container-runtime=remote".to_owned(),
            "--container-runtime-endpoint=unix:///run/containerd/containerd.sock".to_owned(),
            format!("--pod-infra-container-image={PAUSE_IMAGE}"),
            format!("--hostname-override={}", self.name),
            format!("--node-ip={}", self.ip),
            format!("--address={}", self.ip),
            "--read-only-port=0".to_owned(),
            "--healthz-bind-address=127.0.0.1".to_owned(),
            // The API server reaches kubelet (exec, logs) without a client certificate.
            "--authorization-mode=AlwaysAllow".to_owned(),
            "--authentication-token-webhook=false".to_owned(),
            "--fail-swap-on=false".to_owned(),
            "--cgroup-driver=cgroupfs".to_owned(),
            format!("--cgroup-root=/{}", self.cgroup),
            // Evicting pods of a test because the shared machine's disk or memory runs low
            // helps nobody; nor does collecting the images no registry could give back.
            "--eviction-hard=memory.available<1Mi,nodefs.available<1%,nodefs.inodesFree<1%,\
             imagefs.available<1%"
                .to_owned(),
            "--image-gc-high-threshold=100".to_owned(),
            "--image-gc-low-threshold=99".to_owned(),
            format!("--resolv-conf={}", path.join("resolv.conf").display()),
            format!("--cluster-dns={CONTROL_PLANE_IP}"),
            format!("--cluster-domain={CLUSTER_DOMAIN}"),
            // Its default is below /usr/libexec, on the machine.
            format!(
                "--volume-plugin-dir={}",
                path.join("volume-plugins").display()
            ),
        ];
        let kubelet = self.launch(&k8s_bin("kubelet")?, &args, Log::Kubelet)?;
        self.daemons.push(kubelet);
        Ok(())
    }

    /// Kills every process in the node's cgroup subtrees, repeatedly (a dying shim may leave
    /// children behind), until they are empty; whether they are.
    fn kill_all(&self) -> bool {
        let deadline = Instant::now() + KILL_TIMEOUT;
        loop {
            let pids = cgroup_pids(&self.cgroup);
            if pids.is_empty() {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            for pid in pids {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for KubeNode {
    fn drop(&mut self) {
        let killed = self.kill_all();
        // Reaps the daemons (children of this process), which frees their cgroups.
        self.daemons.clear();
        if killed {
            remove_cgroups(&self.cgroup);
        }
    }
}

/// What the holder prints once the node's mount namespace is ready.
const HOLDER_READY: &str = "podwire-lab node ready";

/// The holder's setup of the node's mount namespace in node directory `dir` (see the module's
/// comment); it ends sleeping.
fn holder_script(dir: &Path, hierarchies: &[Hierarchy]) -> String {
    let mut s = String::from("set -e\nmount -t sysfs sysfs /sys\n");
    let _ = writeln!(s, "mount -t tmpfs -o mode=755 tmpfs {CGROUP_ROOT}");
    for h in hierarchies {
        let _ = writeln!(
            s,
            "mkdir -p {dir}\nmount -t {fs} -o {options} {fs} {dir}",
            dir = h.dir,
            fs = h.fstype,
            options = h.options
        );
    }
    s.push_str("mount -t bpf bpffs /sys/fs/bpf\nmount -t tmpfs -o mode=755 tmpfs /run\n");
    for (sub, target) in NODE_MOUNTS {
        let _ = writeln!(s, "mount --bind {} {target}", dir.join(sub).display());
    }
    for (key, _) in KUBELET_SYSCTLS {
        let _ = writeln!(
            s,
            "mount --bind {} /proc/sys/{key}",
            dir.join("sysctl").join(key).display()
        );
    }
    let _ = write!(
        s,
        "mount --make-rshared /\necho '{HOLDER_READY}' >&2\nexec sleep infinity\n"
    );
    s
}

/// A shell that moves itself into the cgroups whose `cgroup.procs` are `procs`, sends its
/// stderr to `log` if given, and execs the arguments added to it.
fn in_cgroups(procs: &[PathBuf], log: Option<&Path>) -> Command {
    let mut script = String::from("for f in $PODWIRE_CGROUP_PROCS; do echo $$ > \"$f\"; done\n");
    if let Some(log) = log {
        let _ = writeln!(script, "exec 2>>'{}' >&2", log.display());
    }
    script.push_str("exec \"$@\"");
    let procs: Vec<String> = procs.iter().map(|p| p.display().to_string()).collect();
    let mut cmd = Command::new("sh");
    cmd.args(["-e", "-c", &script, "sh"])
        .env("PODWIRE_CGROUP_PROCS", procs.join(" "))
        // The node's runtime (containerd finds its shim and runc on PATH) and the machine's
        // iptables and conntrack, which kubelet and kube-proxy call.
        .env("PATH", node_path());
    cmd
}

/// PATH for a node's daemons: the runtime's binaries first, then the machine's.
fn node_path() -> String {
    let runtime = k8s_node_dir()
        .map(|d| d.join("bin").display().to_string())
        .unwrap_or_default();
    format!("{runtime}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
}

/// containerd's configuration: the CRI with the lab's sandbox image, runc from the node runtime,
/// overlayfs, CNI from the node's /opt/cni/bin and /etc/cni/net.d.
fn containerd_config(runtime: &Path) -> String {
    let runc = runtime.join("bin/runc");
    format!(
        r#"version = 2
root = "/var/lib/containerd"
state = "/run/containerd"

[grpc]
  address = "/run/containerd/containerd.sock"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # No AppArmor profiles are loaded for the lab's pods.
  disable_apparmor = true
  # CAP_SYS_RESOURCE is not in this machine's bounding set: without this, runc fails to set
  # the sandboxes' oom_score_adj of -998 ("can't get final child's PID from pipe: EOF").
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        BinaryName = "{runc}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/opt/cni/bin"
    conf_dir = "/etc/cni/net.d"
"#,
        runc = runc.display()
    )
}

/// A cgroup hierarchy of the machine, as /proc/mounts lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Hierarchy {
    dir: String,
    /// `cgroup` (v1) or `cgroup2`.
    fstype: String,
    options: String,
}

/// The machine's cgroup hierarchies below [`CGROUP_ROOT`].
fn hierarchies() -> Result<Vec<Hierarchy>> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    let found = parse_hierarchies(&mounts);
    ensure!(
        !found.is_empty(),
        "no cgroup hierarchy is mounted below {CGROUP_ROOT}: the lab's kubelet nodes need them"
    );
    Ok(found)
}

/// The cgroup hierarchies below [`CGROUP_ROOT`] in the /proc/mounts text `mounts`.
fn parse_hierarchies(mounts: &str) -> Vec<Hierarchy> {
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_, dir, fstype, options) = (
                fields.next()?,
                fields.next()?,
                fields.next()?,
                fields.next()?,
            );
            (dir.starts_with(&format!("{CGROUP_ROOT}/"))
                && (fstype == "cgroup" || fstype == "cgroup2"))
                .then(|| Hierarchy {
                    dir: dir.to_owned(),
                    fstype: fstype.to_owned(),
                    options: options.to_owned(),
                })
        })
        .collect()
}

/// Every cgroup directory of the subtree `/<name>` in every hierarchy, deepest first.
fn cgroup_dirs(name: &str) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for h in hierarchies().unwrap_or_default() {
        let root = Path::new(&h.dir).join(name);
        if root.is_dir() {
            collect_dirs(&root, &mut dirs);
        }
    }
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    dirs
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_path_buf());
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                collect_dirs(&entry.path(), out);
            }
        }
    }
}

/// The processes in the subtree `/<name>` of any hierarchy.
fn cgroup_pids(name: &str) -> Vec<i32> {
    let mut pids: Vec<i32> = cgroup_dirs(name)
        .iter()
        .filter_map(|d| fs::read_to_string(d.join("cgroup.procs")).ok())
        .flat_map(|procs| {
            procs
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// Removes the (empty) subtree `/<name>` from every hierarchy, deepest first; a cgroup whose
/// last process is still exiting is busy for a moment.
fn remove_cgroups(name: &str) {
    let deadline = Instant::now() + KILL_TIMEOUT;
    loop {
        let left: Vec<PathBuf> = cgroup_dirs(name)
            .into_iter()
            .filter(|d| fs::remove_dir(d).is_err())
            .collect();
        if left.is_empty() || Instant::now() > deadline {
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Removes the node cgroups of clusters whose process was killed. Called with the machine-wide
/// lock held, so every node cgroup there is is stale.
fn sweep_stale_cgroups() {
    let prefix = format!("{PREFIX}-{CGROUP_ROLE}-");
    let mut stale: Vec<String> = hierarchies()
        .unwrap_or_default()
        .iter()
        .filter_map(|h| fs::read_dir(&h.dir).ok())
        .flat_map(|entries| entries.flatten())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&prefix))
        .collect();
    stale.sort_unstable();
    stale.dedup();
    for name in stale {
        let deadline = Instant::now() + KILL_TIMEOUT;
        loop {
            let pids = cgroup_pids(&name);
            if pids.is_empty() || Instant::now() > deadline {
                break;
            }
            for pid in pids {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            thread::sleep(Duration::from_millis(50));
        }
        remove_cgroups(&name);
    }
}

/// Takes the machine-wide lock of kubelet clusters, waiting while another process holds it.
fn lock() -> Result<Flock<fs::File>> {
    crate::lock_exclusive(
        &std::env::temp_dir().join(LOCK_FILE),
        "podwire-lab: waiting for another kubelet cluster on this machine to go",
    )
}

/// The mount points of [`NODE_MOUNTS`] that the machine lacked, created for the nodes and
/// recorded machine-wide (a killed cluster's are removed by the next one's drop).
struct MountPoints {
    record: PathBuf,
}

impl MountPoints {
    fn create() -> Result<MountPoints> {
        let record = std::env::temp_dir().join(MOUNT_POINTS_FILE);
        let mut created: Vec<String> = fs::read_to_string(&record)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect();
        for (_, target) in NODE_MOUNTS {
            // Record each missing ancestor too (/opt/cni for /opt/cni/bin).
            let mut missing: Vec<&Path> = Path::new(target)
                .ancestors()
                .take_while(|p| !p.exists())
                .collect();
            missing.reverse();
            for dir in missing {
                fs::create_dir(dir).with_context(|| {
                    format!(
                        "creating {} (a mount point of kubelet nodes)",
                        dir.display()
                    )
                })?;
                created.push(dir.display().to_string());
            }
        }
        created.sort_unstable();
        created.dedup();
        write(&record, &(created.join("\n") + "\n"))?;
        Ok(MountPoints { record })
    }
}

impl Drop for MountPoints {
    fn drop(&mut self) {
        let text = fs::read_to_string(&self.record).unwrap_or_default();
        let mut dirs: Vec<&Path> = text.lines().map(Path::new).collect();
        // Deepest first; only empty directories go.
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for dir in dirs {
            let _ = fs::remove_dir(dir);
        }
        let _ = fs::remove_file(&self.record);
    }
}

/// busybox httpd serving the pod's own name on 8080, `replicas` spread over the nodes, Ready when
/// kubelet's HTTP probe gets the page.
pub fn web_deployment(replicas: u32) -> Value {
    serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {
                    "terminationGracePeriodSeconds": 0,
                    "affinity": {"podAntiAffinity": {
                        "preferredDuringSchedulingIgnoredDuringExecution": [{
                            "weight": 100,
                            "podAffinityTerm": {
                                "labelSelector": {"matchLabels": {"app": "web"}},
                                "topologyKey": "kubernetes.io/hostname",
                            },
                        }],
                    }},
                    "containers": [{
                        "name": "web",
                        "image": BUSYBOX_IMAGE,
                        "imagePullPolicy": "Never",
                        "command": ["sh", "-c",
                            "mkdir -p /www && hostname > /www/index.html && echo serving && \
                             exec httpd -f -p 8080 -h /www"],
                        "ports": [{"containerPort": 8080}],
                        "readinessProbe": {
                            "httpGet": {"path": "/", "port": 8080},
                            "periodSeconds": 1,
                        },
                    }],
                },
            },
        },
    })
}

/// A ClusterIP Service `web` on port 80 in front of [`web_deployment`]'s pods.
pub fn web_service() -> Value {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {
            "selector": {"app": "web"},
            "ports": [{"port": 80, "targetPort": 8080, "protocol": "TCP"}],
        },
    })
}

/// Where Debian's containernetworking-plugins installs the reference plugins.
pub const REFERENCE_PLUGINS: &str = "/usr/lib/cni";

/// The reference `bridge` conflist for a node with `pod_cidr`.
fn bridge_conflist(pod_cidr: &str) -> Value {
    serde_json::json!({
        "cniVersion": "0.4.0",
        "name": "lab-bridge",
        "plugins": [{
            "type": "bridge",
            "bridge": "cni0",
            "isGateway": true,
            "hairpinMode": true,
            "ipam": {
                "type": "host-local",
                "ranges": [[{ "subnet": pod_cidr }]],
                "routes": [{ "dst": "0.0.0.0/0" }],
            },
        }],
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_bridge_conflist_allocates_from_the_node_cidr() {
        let conf = bridge_conflist("10.244.1.0/24");
        assert_eq!(conf["plugins"][0]["type"], "bridge");
        assert_eq!(
            conf["plugins"][0]["ipam"]["ranges"][0][0]["subnet"],
            "10.244.1.0/24"
        );
    }

    #[test]
    fn hierarchies_are_the_cgroup_mounts_below_sys_fs_cgroup() {
        let mounts = "\
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup /sys/fs/cgroup/systemd cgroup rw,relatime,name=systemd 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
cgroup /elsewhere cgroup rw,memory 0 0
/dev/vda / ext4 rw,relatime 0 0
";
        assert_eq!(
            parse_hierarchies(mounts),
            [
                ("/sys/fs/cgroup/cpu", "cgroup", "rw,relatime,cpu"),
                (
                    "/sys/fs/cgroup/systemd",
                    "cgroup",
                    "rw,relatime,name=systemd"
                ),
                ("/sys/fs/cgroup/unified", "cgroup2", "rw,relatime"),
            ]
            .map(|(dir, fstype, options)| Hierarchy {
                dir: dir.into(),
                fstype: fstype.into(),
                options: options.into(),
            })
        );
    }

    #[test]
    fn api_node_reads_address_cidr_and_readiness() {
        let node = json!({
            "metadata": { "name": "node1" },
            "spec": { "podCIDR": "10.244.1.0/24" },
            "status": {
                "addresses": [
                    { "type": "InternalIP", "address": "192.168.77.1" },
                    { "type": "Hostname", "address": "node1" },
                ],
                "conditions": [
                    { "type": "MemoryPressure", "status": "False" },
                    { "type": "Ready", "status": "False",
                      "message": "runtime network not ready: cni config uninitialized" },
                ],
            },
        });
        assert_eq!(
            ApiNode::of(&node),
            ApiNode {
                name: "node1".into(),
                internal_ip: Some(Ipv4Addr::new(192, 168, 77, 1)),
                pod_cidr: Some("10.244.1.0/24".into()),
                ready: false,
                ready_message: "runtime network not ready: cni config uninitialized".into(),
            }
        );
        let fresh = json!({ "metadata": { "name": "node2" }, "spec": {}, "status": {} });
        assert_eq!(ApiNode::of(&fresh).pod_cidr, None);
        assert!(!ApiNode::of(&fresh).ready);
    }
}
