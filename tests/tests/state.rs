//! The agent's state against what a node does to it: a second agent started on the same state
//! directory (a surge rollout, a manual debug run), a full disk under the state directory, a pod
//! CIDR with no address left, faults injected where the state is written, and the directory entry
//! of the state file made durable. Real agents, real plugin execs, a real tmpfs.

use std::{
    collections::BTreeSet,
    fs,
    io::BufRead as _,
    net::Ipv4Addr,
    os::unix::{fs::MetadataExt as _, net::UnixStream},
    path::Path,
    process::{Child, Command, ExitStatus, Stdio},
    time::Duration,
};

use anyhow::{bail, ensure, Context as _, Result};
use podwire_core::{
    api::{self, ApiError, ClientError, Reply, Request},
    endpoint::Attachment,
};
use podwire_lab::{
    artifacts,
    cni::{pod_ip, Pod},
    eventually,
    faults::{addresses, interfaces, ArmedAgent, Census, Fault, Mode, Tmpfs},
    namespaces::NetNs,
    nodes::Node,
};

const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 10);
const POD_CIDR: &str = "10.244.0.0/24";

/// The pid of the process serving the API socket at `socket`, as the kernel knows its peer.
fn agent_pid(socket: &Path) -> Result<i32> {
    let stream = UnixStream::connect(socket)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    let cred = nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)?;
    Ok(cred.pid())
}

/// A second `podwire-agent` on `node`'s state directory and pins, with its own HTTP address
/// (the node's agent holds the default one in the node's namespace), its stderr in a file.
/// Killed on drop.
struct SecondAgent {
    child: Child,
    log: tempfile::NamedTempFile,
}

impl SecondAgent {
    fn spawn(node: &Node, socket: &Path) -> Result<SecondAgent> {
        let log = tempfile::NamedTempFile::new()?;
        let child = node
            .command(artifacts::bin("podwire-agent")?)
            .args(["--pod-cidr", POD_CIDR, "--http-address", "127.0.0.1:9963"])
            .arg("--state-dir")
            .arg(node.state_dir.path())
            .arg("--socket")
            .arg(socket)
            .arg("--bpffs")
            .arg(node.pins.path())
            .env("PODWIRE_LOG", "info")
            .stderr(Stdio::from(log.reopen()?))
            .spawn()
            .context("starting a second podwire-agent")?;
        Ok(SecondAgent { child, log })
    }

    fn log(&self) -> Result<String> {
        Ok(fs::read_to_string(self.log.path())?)
    }

    /// Its exit status once it has exited, else `None`.
    fn exited(&mut self) -> Result<Option<ExitStatus>> {
        Ok(self.child.try_wait()?)
    }
}

impl Drop for SecondAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A pod namespace wired through the agent at `socket` (not necessarily the node's own).
fn add_through(
    node: &Node,
    socket: &Path,
    container_id: &str,
) -> Result<(NetNs, Result<Ipv4Addr>)> {
    let ns = NetNs::new("pod")?;
    let mut conf = node.conf();
    conf["agentSocket"] = socket.display().to_string().into();
    let netns = ns.path().display().to_string();
    let env = [
        ("CNI_CONTAINERID", container_id),
        ("CNI_IFNAME", "eth0"),
        ("CNI_NETNS", netns.as_str()),
    ];
    let out = node.cni("ADD", &env, conf.to_string().as_bytes())?;
    let ip = out.expect_success().and_then(|r| pod_ip(&r));
    Ok((ns, ip))
}

fn assert_unique(ips: &[Ipv4Addr]) {
    let unique: BTreeSet<_> = ips.iter().collect();
    assert_eq!(
        unique.len(),
        ips.len(),
        "an address was handed out twice: {ips:?}"
    );
}

/// A manual debug run beside the node's agent, with its own socket: it must not serve from the
/// same state, or both hand out the same addresses.
#[test]
fn a_second_agent_on_the_same_state_directory_exits_and_addresses_stay_unique() -> Result<()> {
    let node = Node::start(NODE_IP, POD_CIDR)?;
    let first = agent_pid(&node.socket())?;
    let a = node.add_pod("c-first-a")?;

    let debug_socket = node.state_dir.path().join("debug.sock");
    let mut second = SecondAgent::spawn(&node, &debug_socket)?;
    eventually(Duration::from_secs(30), || {
        Ok(second.exited()?.is_some() || UnixStream::connect(&debug_socket).is_ok())
    })?;

    // Pods through both sockets, as runtimes pointed at either would add them: those through
    // the node's socket must succeed, and no address may be handed out twice.
    let (_c_ns, c) = add_through(&node, &debug_socket, "c-second-c")?;
    let (_b_ns, b) = add_through(&node, &node.socket(), "c-first-b")?;
    let results = format!("a: {}, c through the second agent: {c:?}, b: {b:?}", a.ip);
    let b = b.with_context(|| results.clone())?;
    let mut ips = vec![a.ip, b];
    ips.extend(c.ok());
    let unique: BTreeSet<_> = ips.iter().collect();
    assert_eq!(
        unique.len(),
        ips.len(),
        "an address handed out twice: {results}"
    );

    let status = eventually(Duration::from_secs(10), || Ok(second.exited()?.is_some()))?;
    let log = second.log()?;
    assert!(
        status,
        "the second agent still runs beside pid {first}:\n{log}"
    );
    assert!(
        !second.exited()?.context("exited")?.success(),
        "the second agent exits with an error:\n{log}"
    );
    assert!(
        log.contains("in use by another podwire-agent") && log.contains(&format!("pid {first}")),
        "the error names the lock and its holder, pid {first}:\n{log}"
    );
    assert!(!debug_socket.exists(), "the second agent bound no socket");

    // The first agent still serves, from state it alone writes.
    let d = node.add_pod("c-first-d")?;
    assert_unique(&[a.ip, b, d.ip]);
    assert_eq!(agent_pid(&node.socket())?, first);
    let expected: BTreeSet<String> = [("c-first-a", a.ip), ("c-first-b", b), ("c-first-d", d.ip)]
        .iter()
        .map(|(id, ip)| format!("{id}/eth0 {ip}"))
        .collect();
    assert_eq!(addresses(&node.state()?)?, expected);
    Ok(())
}

/// A second agent with the node's own socket (a surge rollout's new pod): the serving agent's
/// socket stays its own.
#[test]
fn a_second_agent_with_the_same_socket_leaves_the_serving_one_alone() -> Result<()> {
    let node = Node::start(NODE_IP, POD_CIDR)?;
    let socket = node.socket();
    let first = agent_pid(&socket)?;
    let inode = fs::metadata(&socket)?.ino();
    let a = node.add_pod("c-surge-a")?;

    let mut second = SecondAgent::spawn(&node, &socket)?;
    let exited = eventually(Duration::from_secs(15), || Ok(second.exited()?.is_some()))?;
    let log = second.log()?;
    let server = agent_pid(&socket)?;
    assert_eq!(
        server,
        first,
        "the socket is served by pid {server}, not by the first agent (pid {first}); second agent's log:\n{log}"
    );
    assert_eq!(
        fs::metadata(&socket)?.ino(),
        inode,
        "the socket was replaced"
    );
    assert!(exited, "the second agent still runs:\n{log}");
    assert!(log.contains(&format!("pid {first}")), "{log}");

    let b = node.add_pod("c-surge-b")?;
    assert_unique(&[a.ip, b.ip]);
    Ok(())
}

/// The agent's memory, probed through its API: the address `container_id` holds (without
/// allocating one: an attachment that holds none gets an error from the full disk).
fn held(
    node: &Node,
    container_id: &str,
    netns: &NetNs,
) -> Result<Result<(Ipv4Addr, bool), ClientError>> {
    let request = Request::Allocate {
        attachment: attachment(container_id),
        netns: netns.path().display().to_string(),
        network: None,
    };
    Ok(match api::call(&node.socket(), &request) {
        Ok(Reply::Allocated { ip, fresh, .. }) => Ok((ip, fresh)),
        Ok(other) => bail!("unexpected reply {other:?}"),
        Err(e) => Err(e),
    })
}

fn attachment(container_id: &str) -> Attachment {
    Attachment {
        container_id: container_id.into(),
        ifname: "eth0".into(),
    }
}

/// The state file's addresses (see [`addresses`]) of exactly `pods`.
fn state_addresses(pods: &[&Pod]) -> BTreeSet<String> {
    pods.iter()
        .map(|p| format!("{}/eth0 {}", p.container_id, p.ip))
        .collect()
}

#[test]
fn a_full_disk_fails_add_and_del_cleanly_and_nothing_comes_back_after_a_restart() -> Result<()> {
    let mut node = Node::start(NODE_IP, POD_CIDR)?;
    node.stop_agent()?;
    let tmpfs = Tmpfs::mount(node.state_dir.path(), 64)?;
    node.start_agent()?;
    let a = node.add_pod("c-disk-a")?;
    let b = node.add_pod("c-disk-b")?;
    let filler = tmpfs.fill()?;

    let del = node.cni_pod("DEL", &a.container_id, Some(&a.ns))?;
    let msg = del.expect_error(5)?;
    assert!(
        msg.contains("No space left on device") && msg.contains("state.json"),
        "DEL names the disk problem: {msg}"
    );
    let c_ns = NetNs::new("pod")?;
    let add = node.cni_pod("ADD", "c-disk-c", Some(&c_ns))?;
    let msg = add.expect_error(5)?;
    assert!(
        msg.contains("No space left on device"),
        "ADD names the disk problem: {msg}"
    );
    assert!(
        interfaces(&c_ns)?.is_empty(),
        "the failed ADD left no interface in the pod"
    );

    // Memory and disk agree: the disk holds a and b, and so does the agent.
    assert_eq!(addresses(&node.state()?)?, state_addresses(&[&a, &b]));
    let a_held = held(&node, &a.container_id, &a.ns)?;
    assert!(
        matches!(a_held, Ok((ip, false)) if ip == a.ip),
        "the agent still holds {} for the pod whose DEL failed: {a_held:?}",
        a.ip
    );
    let c_held = api::call(
        &node.socket(),
        &Request::Check {
            attachment: attachment("c-disk-c"),
        },
    );
    assert!(
        matches!(&c_held, Err(ClientError::Agent(ApiError { message, .. })) if message.contains("has no endpoint")),
        "the agent holds no address for the failed ADD: {c_held:?}"
    );

    // An agent restarting on the full disk starts (it writes nothing it has not changed) and
    // holds what the disk holds.
    node.stop_agent()?;
    node.start_agent()?;
    let a_held = held(&node, &a.container_id, &a.ns)?;
    assert!(
        matches!(a_held, Ok((ip, false)) if ip == a.ip),
        "after a restart on the full disk: {a_held:?}"
    );

    // Space again: the runtime retries DEL a, and the released address stays released.
    fs::remove_file(&filler)?;
    assert!(node.cni_pod("DEL", &a.container_id, Some(&a.ns))?.success);
    assert!(node.cni_pod("DEL", "c-disk-c", Some(&c_ns))?.success);
    assert_eq!(addresses(&node.state()?)?, state_addresses(&[&b]));
    let d = node.add_pod("c-disk-d")?;
    assert_eq!(addresses(&node.state()?)?, state_addresses(&[&b, &d]));

    node.stop_agent()?;
    node.start_agent()?;
    assert_eq!(
        addresses(&node.state()?)?,
        state_addresses(&[&b, &d]),
        "after a restart"
    );
    let e = node.add_pod("c-disk-e")?;
    assert_unique(&[b.ip, d.ip, e.ip]);
    assert_eq!(addresses(&node.state()?)?, state_addresses(&[&b, &d, &e]));
    drop(tmpfs);
    Ok(())
}

#[test]
fn an_exhausted_pod_cidr_gives_a_clear_cni_error_and_leaks_nothing() -> Result<()> {
    let cidr = "10.244.0.0/28";
    let node = Node::start(NODE_IP, cidr)?;
    // .0 network, .1 the node, .15 broadcast: 13 for pods.
    let pods = (0..13)
        .map(|i| node.add_pod(&format!("c-full-{i}")))
        .collect::<Result<Vec<Pod>>>()?;
    assert_unique(&pods.iter().map(|p| p.ip).collect::<Vec<_>>());
    let before = Census::of(&node)?;

    let ns = NetNs::new("pod")?;
    let out = node.cni_pod("ADD", "c-full-extra", Some(&ns))?;
    let msg = out.expect_error(11)?;
    assert!(
        msg.contains(cidr) && msg.contains("is full"),
        "the error names the pod CIDR and that it is full: {msg}"
    );
    assert_eq!(Census::of(&node)?.diff(&before), Vec::<String>::new());
    assert!(interfaces(&ns)?.is_empty(), "{:?}", interfaces(&ns)?);
    // The runtime's DEL after the failed ADD succeeds and changes nothing.
    assert!(node.cni_pod("DEL", "c-full-extra", Some(&ns))?.success);
    assert_eq!(Census::of(&node)?.diff(&before), Vec::<String>::new());

    // A pod gone frees its address for the next.
    node.del_pod(&pods[0])?;
    let again = node.add_pod("c-full-extra")?;
    assert_eq!(again.ip, pods[0].ip);
    Ok(())
}

/// A disk error before the state file is written, and the agent killed while writing it, or
/// after the rename: ADD and DEL fail, and the runtime's next DEL leaves nothing behind.
#[test]
fn store_faults_during_add_and_del_leave_nothing_behind() -> Result<()> {
    for fault in Fault::all(&["agent.store.save", "agent.store.after-rename"]) {
        store_fault(fault).with_context(|| format!("with {fault}"))?;
    }
    Ok(())
}

fn store_fault(fault: Fault) -> Result<()> {
    let mut node = Node::start(NODE_IP, POD_CIDR)?;
    let a = node.add_pod("c-fault-a")?;

    // ADD under the fault, then the runtime's DEL.
    let before = Census::of(&node)?;
    let armed = ArmedAgent::start(&mut node, fault)?;
    let ns = NetNs::new("pod")?;
    let add = node.cni_pod("ADD", "c-fault-b", Some(&ns))?;
    ensure!(!add.success, "ADD succeeded despite {fault}: {add:?}");
    if fault.mode == Mode::Error {
        let msg = add.expect_error(5)?;
        ensure!(msg.contains(&fault.message()), "{msg}");
    }
    armed.disarm(&mut node)?;
    let del = node.cni_pod("DEL", "c-fault-b", Some(&ns))?;
    ensure!(del.success, "DEL after the failed ADD: {del:?}");
    let after = Census::of(&node)?;
    ensure!(
        after.diff(&before).is_empty(),
        "after the failed ADD and its DEL: {:?}",
        after.diff(&before)
    );

    // DEL under the fault, then the runtime's retry.
    let armed = ArmedAgent::start(&mut node, fault)?;
    let del = node.cni_pod("DEL", &a.container_id, Some(&a.ns))?;
    ensure!(!del.success, "DEL succeeded despite {fault}: {del:?}");
    armed.disarm(&mut node)?;
    node.del_pod(&a)?;
    ensure!(
        addresses(&node.state()?)?.is_empty(),
        "the retried DEL released {}: {}",
        a.ip,
        node.state()?
    );
    // And the next pod gets an address held by nobody.
    let c = node.add_pod("c-fault-c")?;
    ensure!(
        addresses(&node.state()?)? == state_addresses(&[&c]),
        "{}",
        node.state()?
    );
    node.del_pod(&c)?;
    ensure!(Census::of(&node)?.veths.is_empty());
    Ok(())
}

/// The rename that replaces the state file is made durable by an fsync of its directory (a
/// power cut after an answer must not bring the old file back): the agent's own syscalls, seen
/// by strace while it handles an ADD.
#[test]
fn the_state_directory_is_fsynced_after_the_state_file_is_renamed() -> Result<()> {
    let node = Node::start(NODE_IP, POD_CIDR)?;
    let pid = agent_pid(&node.socket())?;
    let dir = tempfile::tempdir()?;
    let trace = dir.path().join("strace.log");
    let mut strace = Command::new("strace")
        .args([
            "-f",
            "-qq",
            "-e",
            "trace=openat,rename,renameat,renameat2,fsync,fdatasync",
        ])
        .arg("-o")
        .arg(&trace)
        .args(["-p", &pid.to_string()])
        .stderr(Stdio::null())
        .spawn()
        .context("starting strace")?;
    let traced = eventually(Duration::from_secs(10), || {
        let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
        Ok(status
            .lines()
            .any(|l| l.starts_with("TracerPid:") && l.split_whitespace().nth(1) != Some("0")))
    })?;
    ensure!(traced, "strace did not attach to the agent");
    // strace attaches to the threads one by one after the first.
    std::thread::sleep(Duration::from_millis(500));
    let pod = node.add_pod("c-fsync")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(strace.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )?;
    strace.wait()?;
    drop(pod);

    let state_dir = node.state_dir.path().display().to_string();
    let lines: Vec<String> = fs::read(&trace)?
        .as_slice()
        .lines()
        .collect::<Result<_, _>>()?;
    let renamed = lines
        .iter()
        .position(|l| l.contains("rename") && l.contains(&format!("{state_dir}/state.json\"")))
        .with_context(|| {
            format!(
                "no rename of the state file in the trace:\n{}",
                lines.join("\n")
            )
        })?;
    let synced = lines[renamed..].iter().any(|open| {
        let Some(fd) = open
            .contains(&format!("\"{state_dir}\""))
            .then(|| open.rsplit_once("= ").map(|(_, fd)| fd.trim().to_owned()))
            .flatten()
        else {
            return false;
        };
        lines[renamed..]
            .iter()
            .any(|l| l.contains(&format!("fsync({fd})")))
    });
    assert!(
        synced,
        "no fsync of {state_dir} after the rename:\n{}",
        lines[renamed..].join("\n")
    );
    Ok(())
}
