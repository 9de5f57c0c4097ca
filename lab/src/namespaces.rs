//! Network namespaces as the lab's hosts, and entering them. Names are unique per process and
//! call; dropping a [`NetNs`] deletes it with every interface and attachment in it.

use std::{
    ffi::OsStr,
    fs::File,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
    thread,
};

use anyhow::{Context as _, Result};
use nix::sched::{setns, CloneFlags};

use crate::{processes::run, require_root, PREFIX};

/// A named network namespace (`ip netns`), deleted with everything in it on drop.
pub struct NetNs {
    name: String,
}

/// Runs `ip` with `args`.
pub fn ip(args: &[&str]) -> Result<Output> {
    run(Command::new("ip").args(args))
}

/// A lab name for `role`, unique to this process and call: `pwlab-<role>-<pid>-<n>`.
pub(crate) fn unique_name(role: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{PREFIX}-{role}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Whether `name` is a lab name of a process that no longer runs.
fn is_stale(name: &str) -> bool {
    let pid = name
        .strip_prefix(PREFIX)
        .and_then(|rest| rest.strip_prefix('-'))
        .and_then(|rest| rest.rsplit('-').nth(1))
        .and_then(|pid| pid.parse::<u32>().ok());
    pid.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
}

/// Removes what lab processes that no longer run left in `dir` (see [`is_stale`]).
pub(crate) fn sweep_stale(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if is_stale(&entry.file_name().to_string_lossy()) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// A command running `program` in the network namespace at `netns` only (see
/// [`NetNs::command`]).
pub(crate) fn command_in(netns: &Path, program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", netns.display())).arg(program);
    cmd
}

impl NetNs {
    /// Creates a namespace for `role` with loopback up.
    pub fn new(role: &str) -> Result<NetNs> {
        require_root()?;
        static SWEEP: std::sync::Once = std::sync::Once::new();
        SWEEP.call_once(sweep);
        let name = unique_name(role);
        ip(&["netns", "add", &name])?;
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's bind mount, as CNI_NETNS names it.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// `ip -n <ns> args...`
    pub fn ip(&self, args: &[&str]) -> Result<Output> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// A veth pair: `name` here, `peer_name` in `peer`, both with `mtu` if given (both down).
    pub fn add_veth(
        &self,
        name: &str,
        peer: &NetNs,
        peer_name: &str,
        mtu: Option<u32>,
    ) -> Result<()> {
        let mtu = mtu.map(|m| m.to_string());
        let mut args = vec!["link", "add", name];
        if let Some(mtu) = &mtu {
            args.extend(["mtu", mtu]);
        }
        args.extend(["type", "veth", "peer", "name", peer_name]);
        if let Some(mtu) = &mtu {
            args.extend(["mtu", mtu]);
        }
        args.extend(["netns", peer.name()]);
        self.ip(&args)?;
        Ok(())
    }

    /// A command running `program` in this namespace's network only, not in a mount namespace of
    /// its own as `ip netns exec` would: bpffs pins stay visible, as on a real node.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        command_in(&self.path(), program)
    }

    /// Runs `f` on a thread that has entered this namespace; sockets and netlink connections
    /// made there belong to it (a socket keeps its namespace after `f` returns it).
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> Result<R> {
        let path = self.path();
        let ns = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        enter(&ns, f).with_context(|| format!("entering {}", path.display()))
    }

    /// Names of the interfaces `ip link show <selector>` lists in this namespace (every one
    /// with an empty selector).
    pub fn link_names(&self, selector: &[&str]) -> Result<Vec<String>> {
        let out = self.ip(&[&["-j", "link", "show"], selector].concat())?;
        let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        Ok(json
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| l["ifname"].as_str())
            .map(str::to_owned)
            .collect())
    }

    /// ifindex and MAC of the interface `name` in this namespace.
    pub fn link(&self, name: &str) -> Result<(u32, [u8; 6])> {
        let out = self.ip(&["-j", "link", "show", "dev", name])?;
        let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let link = &json[0];
        let mac = link["address"]
            .as_str()
            .with_context(|| format!("{name} has no MAC"))?;
        let mac: Vec<u8> = mac
            .split(':')
            .map(|octet| u8::from_str_radix(octet, 16))
            .collect::<Result<_, _>>()
            .with_context(|| format!("MAC {mac}"))?;
        let ifindex = link["ifindex"].as_u64().context("ifindex")?;
        Ok((
            u32::try_from(ifindex)?,
            mac.try_into()
                .map_err(|_| anyhow::anyhow!("MAC of {name} is not 6 octets"))?,
        ))
    }

    /// Sets an IPv4 sysctl such as `ip_forward` in this namespace.
    pub fn sysctl_ipv4(&self, key: &str, value: &str) -> Result<()> {
        self.sysctl(&format!("net.ipv4.{key}"), value)
    }

    /// Sets sysctl `key` (e.g. `net.bridge.bridge-nf-call-iptables`) in this namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        run(self
            .command("sysctl")
            .args(["-qw", &format!("{key}={value}")]))?;
        Ok(())
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace destroys its veths (and so their peers) and tc attachments.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Runs `f` on a thread inside the namespace `ns` (an open namespace file: a bind mount or
/// `/proc/<pid>/ns/net`): sockets it opens, netlink ones included, belong to it for good.
pub fn enter<R: Send>(ns: &File, f: impl FnOnce() -> R + Send) -> Result<R> {
    thread::scope(|s| {
        s.spawn(|| -> Result<R> {
            setns(ns, CloneFlags::CLONE_NEWNET).context("setns")?;
            Ok(f())
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Deletes the namespaces of lab processes that were killed before their guards ran.
fn sweep() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        if is_stale(name) {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_names_of_dead_lab_processes_are_stale() {
        let mine = unique_name("node");
        assert!(!is_stale(&mine), "{mine} belongs to this process");
        assert!(is_stale(&format!("{PREFIX}-pod-{}-3", u32::MAX)));
        assert!(!is_stale("cni-1234-5678"), "not the lab's");
        assert!(!is_stale(&format!("{PREFIX}-garbage")));
    }
}
