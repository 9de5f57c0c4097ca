//! Faults injected at the named steps of ADD, DEL and GC (`podwire_core::fault`), and a census of
//! what a node holds for its pods, to prove that the runtime's next ADD, DEL or GC after a fault
//! leaves nothing behind: no address held, no host-side veth, no endpoint map entry, no pinned
//! link.

use std::{
    collections::BTreeSet,
    fmt,
    net::Ipv4Addr,
    os::unix::process::ExitStatusExt as _,
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
    time::Duration,
};

use anyhow::{bail, ensure, Context as _, Result};
use nix::sys::signal::Signal;
use podwire_core::fault;

use crate::{
    artifacts::bin,
    cni::CniOutput,
    namespaces::NetNs,
    nodes::Node,
    processes::{output_with_stdin, run, Daemon},
};

/// What happens at a fault point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The process dies there by SIGKILL, as `kill -9` or the OOM killer would do it.
    Kill,
    /// The step fails there, as a netlink or disk error would make it.
    Error,
}

/// A fault point and what happens there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    pub point: &'static str,
    pub mode: Mode,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mode = match self.mode {
            Mode::Kill => "kill",
            Mode::Error => "error",
        };
        write!(f, "{}:{mode}", self.point)
    }
}

impl Fault {
    /// Both modes of each of `points`.
    pub fn all(points: &[&'static str]) -> Vec<Fault> {
        points
            .iter()
            .flat_map(|&point| [Mode::Kill, Mode::Error].map(|mode| Fault { point, mode }))
            .collect()
    }

    /// The value of `PODWIRE_FAULT` that arms it.
    pub fn env(&self) -> (&'static str, String) {
        (fault::ENV, self.to_string())
    }

    /// Whether the point is in the agent (else in the plugin): the process names its points.
    pub fn in_agent(&self) -> bool {
        self.point.starts_with("agent.")
    }

    /// What an `:error` fault's message says.
    pub fn message(&self) -> String {
        format!("injected fault at {}", self.point)
    }
}

/// What a node holds for its pods: the state every ADD creates and every DEL, GC or failed ADD
/// must remove again.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Census {
    /// Addresses held in the agent's state file, as `<container>/<ifname> <ip>`.
    pub addresses: BTreeSet<String>,
    /// Host-side veths the plugin made (named `pw…`).
    pub veths: BTreeSet<String>,
    /// Keys of the pinned endpoint map.
    pub endpoints: BTreeSet<Ipv4Addr>,
    /// tc attachments, `<program>-<interface>`: the links pinned below the pin root's `links/`
    /// (the node's devices) and podwire's tc filters on the pods' veths, which hold their programs
    /// without a pin.
    pub links: BTreeSet<String>,
}

impl Census {
    /// Counts what `node` holds now, from its state file, its namespace and its pins (readable
    /// while its agent is down).
    pub fn of(node: &Node) -> Result<Census> {
        Ok(Census {
            addresses: addresses(&node.state()?)?,
            veths: node.host_veths()?.into_iter().collect(),
            endpoints: node.endpoints()?.into_iter().map(|(ip, _)| ip).collect(),
            links: file_names(&node.pins().links_dir())?
                .into_iter()
                .chain(node.pinned_ids()?.filters.into_keys())
                .collect(),
        })
    }

    /// What differs from `before`, one line per item: what is here and was not ("leaked"), and
    /// what was there and is gone ("lost"). Empty when nothing differs.
    pub fn diff(&self, before: &Census) -> Vec<String> {
        let mut lines = Vec::new();
        let mut compare = |what: &str, now: BTreeSet<String>, then: BTreeSet<String>| {
            lines.extend(now.difference(&then).map(|i| format!("leaked {what} {i}")));
            lines.extend(then.difference(&now).map(|i| format!("lost {what} {i}")));
        };
        compare("address", self.addresses.clone(), before.addresses.clone());
        compare("veth", self.veths.clone(), before.veths.clone());
        let ips = |s: &BTreeSet<Ipv4Addr>| s.iter().map(Ipv4Addr::to_string).collect();
        compare(
            "endpoint map entry",
            ips(&self.endpoints),
            ips(&before.endpoints),
        );
        compare("tc attachment", self.links.clone(), before.links.clone());
        lines
    }
}

/// The addresses a state file holds, as `<container>/<ifname> <ip>`.
pub fn addresses(state: &serde_json::Value) -> Result<BTreeSet<String>> {
    let endpoints = state["endpoints"]
        .as_object()
        .with_context(|| format!("the state file has no endpoints object: {state}"))?;
    endpoints
        .iter()
        .map(|(key, record)| {
            let ip = record["ip"]
                .as_str()
                .with_context(|| format!("endpoint {key} has no ip: {record}"))?;
            Ok(format!("{key} {ip}"))
        })
        .collect()
}

/// Names of the entries of `dir`; none if it does not exist.
fn file_names(dir: &Path) -> Result<BTreeSet<String>> {
    match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeSet::new()),
        Err(e) => Err(e).with_context(|| format!("listing {}", dir.display())),
    }
}

/// Interfaces in `ns` other than loopback: what a pod's namespace still holds.
pub fn interfaces(ns: &NetNs) -> Result<Vec<String>> {
    let mut names = ns.link_names(&[])?;
    names.retain(|n| n != "lo");
    Ok(names)
}

/// One exec of the plugin with its exit status, which [`CniOutput`] does not keep: a plugin
/// killed by a fault exits by SIGKILL.
#[derive(Debug)]
pub struct Exec {
    pub status: ExitStatus,
    pub out: CniOutput,
}

impl Exec {
    /// Whether the process died by SIGKILL.
    pub fn killed(&self) -> bool {
        self.status.signal() == Some(Signal::SIGKILL as i32)
    }
}

/// Execs the plugin on `node` as [`Node::cni`] does, with `fault` armed in its environment if
/// given.
pub fn cni(
    node: &Node,
    command: &str,
    env: &[(&str, &str)],
    stdin: &[u8],
    fault: Option<&Fault>,
) -> Result<Exec> {
    let plugin = bin("podwire-cni")?;
    let mut cmd: Command = node.command(&plugin);
    cmd.env("CNI_COMMAND", command)
        .env(
            "CNI_PATH",
            plugin.parent().expect("a binary lives in a directory"),
        )
        .envs(env.iter().copied());
    if let Some(fault) = fault {
        let (key, value) = fault.env();
        cmd.env(key, value);
    }
    let out = output_with_stdin(&mut cmd, stdin).context("exec podwire-cni")?;
    Ok(Exec {
        status: out.status,
        out: CniOutput {
            success: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).trim().to_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        },
    })
}

/// An agent started with a fault armed, in place of its node's own (stopped first). Killed on
/// drop; [`ArmedAgent::disarm`] checks the fault fired and starts the node's agent again
/// without it, as kubelet or systemd restarts a crashed or failing agent.
pub struct ArmedAgent {
    daemon: Daemon,
    fault: Fault,
}

impl ArmedAgent {
    /// Stops `node`'s agent and starts it again as the node runs it ([`Node::agent_command`]),
    /// with `fault` armed.
    pub fn start(node: &mut Node, fault: Fault) -> Result<ArmedAgent> {
        node.stop_agent()?;
        let (key, value) = fault.env();
        let mut cmd = node.agent_command()?;
        cmd.env(key, value);
        let mut daemon = Daemon::spawn(cmd, None)?;
        daemon
            .wait_for_line("serving CNI requests")
            .with_context(|| format!("podwire-agent with {fault} armed"))?;
        Ok(ArmedAgent { daemon, fault })
    }

    /// Checks the fault fired (the agent died by SIGKILL, or logged the injected error), and
    /// starts `node`'s own agent again. Its log, for failure messages.
    pub fn disarm(self, node: &mut Node) -> Result<Vec<String>> {
        let pid = self.daemon.pid();
        let fault = self.fault;
        let (status, log) = match fault.mode {
            // The request that reached the point has failed by now; the agent is a zombie.
            Mode::Kill => {
                let exited = crate::eventually(Duration::from_secs(5), || exited(pid))?;
                match exited {
                    true => self.daemon.wait()?,
                    false => self.daemon.stop(Signal::SIGTERM)?,
                }
            }
            Mode::Error => self.daemon.stop(Signal::SIGTERM)?,
        };
        node.start_agent()?;
        let fired = match fault.mode {
            Mode::Kill => status.signal() == Some(Signal::SIGKILL as i32),
            Mode::Error => log.iter().any(|l| l.contains(&fault.message())),
        };
        ensure!(
            fired,
            "{fault} did not fire in the agent (exit {status}); does the point still exist? \
             Its log:\n{}",
            log.join("\n")
        );
        Ok(log)
    }
}

/// Whether process `pid`, a child of ours, has exited (is a zombie, not yet reaped).
fn exited(pid: u32) -> Result<bool> {
    let stat = match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(true),
        Err(e) => return Err(e).context("reading the agent's /proc stat"),
    };
    // "pid (comm) state ...": comm may hold spaces and parentheses, the state follows the last.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .unwrap_or_default();
    Ok(state == "Z")
}

/// A tmpfs of `size_kib` mounted on `dir` (its files copied in first), unmounted on drop: a
/// small real disk for the agent's state directory, to be filled.
pub struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    pub fn mount(dir: &Path, size_kib: u32) -> Result<Tmpfs> {
        let saved = tempfile::tempdir().context("a directory to keep the state in meanwhile")?;
        let files = file_names(dir)?;
        for name in &files {
            let from = dir.join(name);
            if from.is_file() {
                std::fs::copy(&from, saved.path().join(name))
                    .with_context(|| format!("saving {}", from.display()))?;
            }
        }
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size_kib}k,mode=0700"))
            .arg("podwire-lab-state")
            .arg(dir))?;
        let tmpfs = Tmpfs {
            dir: dir.to_path_buf(),
        };
        for name in file_names(saved.path())? {
            std::fs::copy(saved.path().join(&name), dir.join(&name))
                .with_context(|| format!("restoring {name} onto the tmpfs"))?;
        }
        Ok(tmpfs)
    }

    /// Fills the file system with a file `filler` until no byte more fits; returns its path.
    pub fn fill(&self) -> Result<PathBuf> {
        use std::io::Write as _;
        let path = self.dir.join("filler");
        let mut file =
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let block = vec![0u8; 4096];
        loop {
            match file.write(&block) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => bail!("filling {}: {e}", path.display()),
            }
        }
        // The last partial block too: byte by byte.
        while let Ok(1) = file.write(&[0]) {}
        Ok(path)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("--lazy").arg(&self.dir).status();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn census(veths: &[&str], ips: &[[u8; 4]]) -> Census {
        Census {
            addresses: ips
                .iter()
                .map(|ip| format!("c/eth0 {}", Ipv4Addr::from(*ip)))
                .collect(),
            veths: veths.iter().map(|v| v.to_string()).collect(),
            endpoints: ips.iter().map(|ip| Ipv4Addr::from(*ip)).collect(),
            links: veths.iter().map(|v| format!("from_pod-{v}")).collect(),
        }
    }

    #[test]
    fn the_same_census_has_no_diff() {
        let c = census(&["pwa"], &[[10, 244, 0, 2]]);
        assert!(c.diff(&c.clone()).is_empty());
    }

    #[test]
    fn the_diff_names_what_leaked_and_what_was_lost() {
        let before = census(&["pwa"], &[[10, 244, 0, 2]]);
        let mut after = census(&["pwb"], &[[10, 244, 0, 2], [10, 244, 0, 3]]);
        after.links.clear();
        assert_eq!(
            after.diff(&before),
            [
                "leaked address c/eth0 10.244.0.3",
                "leaked veth pwb",
                "lost veth pwa",
                "leaked endpoint map entry 10.244.0.3",
                "lost tc attachment from_pod-pwa",
            ]
        );
    }

    #[test]
    fn addresses_are_read_from_the_state_files_endpoints() {
        let state = serde_json::json!({
            "pod_cidr": "10.244.0.0/24",
            "endpoints": { "c1/eth0": { "container_id": "c1", "ip": "10.244.0.2" } },
        });
        assert_eq!(
            addresses(&state).unwrap().into_iter().collect::<Vec<_>>(),
            ["c1/eth0 10.244.0.2"]
        );
        assert!(addresses(&serde_json::json!({})).is_err());
    }

    #[test]
    fn a_fault_arms_as_point_colon_mode() {
        let [kill, error] = Fault::all(&["agent.register.after-map"])[..] else {
            panic!("two modes")
        };
        assert_eq!(
            kill.env(),
            ("PODWIRE_FAULT", "agent.register.after-map:kill".into())
        );
        assert_eq!(error.to_string(), "agent.register.after-map:error");
        assert!(kill.in_agent());
        assert_eq!(
            error.message(),
            "injected fault at agent.register.after-map"
        );
    }
}
