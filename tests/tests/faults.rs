//! Faults at every step of ADD, DEL and GC: the plugin or the agent killed (SIGKILL) or failing
//! at each named fault point (`podwire_core::fault`), then what a runtime does next (DEL after a
//! failed ADD, and the second DEL with an empty CNI_NETNS; a GC that no longer lists the
//! attachment; a retried ADD; a retried DEL or GC), after which the node must hold exactly what it
//! held before: no address, host veth, endpoint map entry or tc attachment left (see
//! `podwire_lab::faults::Census`), and a control pod on the node still reachable.
//!
//! A fault in the agent is armed by restarting the agent with it, and the agent is restarted
//! without it once it fired, as kubelet restarts a crashed or failing agent. Every case checks
//! its fault fired, so a point that no longer exists fails its case; and
//! `every_fault_point_in_the_code_has_a_case` fails when the code has a point no case covers.

use std::{collections::BTreeSet, net::Ipv4Addr, path::Path};

use anyhow::{ensure, Context as _, Result};
use podwire_lab::{
    cni::{pod_ip, Pod},
    faults::{interfaces, ArmedAgent, Census, Exec, Fault, Mode, Tmpfs},
    namespaces::NetNs,
    nodes::Node,
    traffic::{ping, tcp_echo},
};

const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 10);
const POD_CIDR: &str = "10.244.0.0/24";
const CONTROL: &str = "c-control";

/// One case per fault point and the command that reaches it; each runs both modes (kill,
/// error). `TABLE` lists the points, for the check against the code.
macro_rules! cases {
    ($($name:ident: $scenario:ident($point:literal),)*) => {
        $(
            #[test]
            fn $name() -> Result<()> {
                both_modes($point, $scenario)
            }
        )*
        const TABLE: &[&str] = &[$($point),*];
    };
}

cases! {
    fault_add_plugin_after_allocate: add_fault("cni.add.after-allocate"),
    fault_add_plugin_after_veth: add_fault("cni.add.after-veth"),
    fault_add_plugin_after_address: add_fault("cni.add.after-address"),
    fault_add_plugin_after_register: add_fault("cni.add.after-register"),
    fault_add_agent_register_after_map: add_fault("agent.register.after-map"),
    fault_add_agent_register_after_attach: add_fault("agent.register.after-attach"),
    fault_add_agent_store_save: add_fault("agent.store.save"),
    fault_add_agent_store_after_rename: add_fault("agent.store.after-rename"),
    fault_del_plugin_after_veth_delete: del_fault("cni.del.after-veth-delete"),
    fault_del_agent_release_after_detach: del_fault("agent.release.after-detach"),
    fault_del_agent_store_save: del_fault("agent.store.save"),
    fault_del_agent_store_after_rename: del_fault("agent.store.after-rename"),
    fault_gc_plugin_before_call: gc_fault("cni.gc.before-call"),
    fault_gc_agent_after_veth_delete: gc_fault("agent.gc.after-veth-delete"),
    fault_gc_agent_release_after_detach: gc_fault("agent.release.after-detach"),
}

/// Runs `scenario` with `point` killing, then failing, each on a node of its own; fails with
/// every mode that failed, named.
fn both_modes(point: &'static str, scenario: fn(&mut Bed, Fault) -> Result<()>) -> Result<()> {
    let mut failed = Vec::new();
    for fault in Fault::all(&[point]) {
        let outcome = Bed::new().and_then(|mut bed| scenario(&mut bed, fault));
        match &outcome {
            Ok(()) => eprintln!("fault {fault}: nothing leaked"),
            Err(e) => {
                eprintln!("fault {fault}: FAILED: {e:#}");
                failed.push(format!("{fault}: {e:#}"));
            }
        }
    }
    ensure!(failed.is_empty(), "{}", failed.join("\n\n"));
    Ok(())
}

/// A node with a control pod, and what it held before the case.
struct Bed {
    node: Node,
    control: Pod,
    before: Census,
}

impl Bed {
    fn new() -> Result<Bed> {
        let node = Node::start(NODE_IP, POD_CIDR)?;
        let control = node.add_pod(CONTROL)?;
        let bed = Bed {
            before: Census::of(&node)?,
            node,
            control,
        };
        bed.control_works("before the fault")?;
        Ok(bed)
    }

    /// The control pod is reached from the node by ping and TCP.
    fn control_works(&self, when: &str) -> Result<()> {
        let ip = self.control.ip;
        ensure!(
            ping(&self.node.ns, ip)?,
            "{when}: the control pod {ip} does not answer ping"
        );
        tcp_echo(&self.node.ns, &self.control.ns, ip, 64 * 1024)
            .with_context(|| format!("{when}: TCP to the control pod {ip}"))
    }

    /// Fails with what leaked or was lost since the case began, and unless the control pod
    /// still works.
    fn clean(&self, after: &str) -> Result<()> {
        let diff = Census::of(&self.node)?.diff(&self.before);
        ensure!(
            diff.is_empty(),
            "after {after}: {}\nstate file: {}",
            diff.join(", "),
            self.node.state()?
        );
        self.control_works(&format!("after {after}"))
    }

    /// `command` for `container` in `netns` (None: an empty CNI_NETNS) with `fault` armed in the
    /// process that has its point; checks it fired and the command failed. An agent fault's
    /// agent is replaced by one without it afterwards.
    fn faulted(
        &mut self,
        fault: Fault,
        command: &str,
        container: &str,
        netns: Option<&NetNs>,
    ) -> Result<Exec> {
        let exec = if fault.in_agent() {
            let armed = ArmedAgent::start(&mut self.node, fault)?;
            let exec = self.exec(command, container, netns, None);
            armed.disarm(&mut self.node)?;
            exec?
        } else {
            let exec = self.exec(command, container, netns, Some(&fault))?;
            let fired = match fault.mode {
                Mode::Kill => exec.killed(),
                Mode::Error => exec.out.stdout.contains(&fault.message()),
            };
            ensure!(
                fired,
                "{command} with {fault} armed: the fault did not fire (does the point still \
                 exist?): {exec:?}"
            );
            exec
        };
        ensure!(
            !exec.out.success,
            "{command} with {fault} armed succeeded: {exec:?}"
        );
        Ok(exec)
    }

    /// Execs the plugin: `command` (ADD, DEL; GC lists only the control pod as valid) for
    /// `container`.
    fn exec(
        &self,
        command: &str,
        container: &str,
        netns: Option<&NetNs>,
        fault: Option<&Fault>,
    ) -> Result<Exec> {
        let mut conf = self.node.conf();
        if command == "GC" {
            conf["cni.dev/valid-attachments"] =
                serde_json::json!([{ "containerID": CONTROL, "ifname": "eth0" }]);
            return podwire_lab::faults::cni(
                &self.node,
                command,
                &[],
                conf.to_string().as_bytes(),
                fault,
            );
        }
        let netns = netns
            .map(|ns| ns.path().display().to_string())
            .unwrap_or_default();
        let env = [
            ("CNI_CONTAINERID", container),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", netns.as_str()),
        ];
        podwire_lab::faults::cni(
            &self.node,
            command,
            &env,
            conf.to_string().as_bytes(),
            fault,
        )
    }

    /// `command` as the runtime sends it next, which must succeed.
    fn then(&self, command: &str, container: &str, netns: Option<&NetNs>) -> Result<Exec> {
        let exec = self.exec(command, container, netns, None)?;
        ensure!(
            exec.out.success,
            "{command} of {container} afterwards failed: {exec:?}"
        );
        Ok(exec)
    }

    /// A pod wired by ADD reaches the control pod and is reached by it.
    fn pod_works(&self, ns: &NetNs, result: &serde_json::Value) -> Result<()> {
        let ip = pod_ip(result)?;
        ensure!(
            ping(ns, self.control.ip)?,
            "{ip} cannot ping the control pod"
        );
        ensure!(
            ping(&self.control.ns, ip)?,
            "the control pod cannot ping {ip}"
        );
        tcp_echo(&self.control.ns, ns, ip, 64 * 1024)
    }
}

/// ADD with the fault, then each thing a runtime does next: DEL (and DEL with an empty
/// CNI_NETNS); GC without the attachment; ADD again, which must wire a working pod.
fn add_fault(bed: &mut Bed, fault: Fault) -> Result<()> {
    let pod = NetNs::new("pod")?;
    bed.faulted(fault, "ADD", "c-del", Some(&pod))?;
    bed.then("DEL", "c-del", Some(&pod))?;
    bed.then("DEL", "c-del", None)?;
    bed.clean("the failed ADD and DEL")?;
    let left = interfaces(&pod)?;
    ensure!(left.is_empty(), "the pod's namespace still holds {left:?}");

    let pod = NetNs::new("pod")?;
    bed.faulted(fault, "ADD", "c-gc", Some(&pod))?;
    bed.then("GC", "", None)?;
    bed.clean("the failed ADD and GC")?;

    let pod = NetNs::new("pod")?;
    bed.faulted(fault, "ADD", "c-retry", Some(&pod))?;
    let added = bed.then("ADD", "c-retry", Some(&pod))?;
    bed.pod_works(&pod, &added.out.json()?)
        .context("the pod of the retried ADD")?;
    bed.then("DEL", "c-retry", Some(&pod))?;
    bed.clean("the failed ADD, the retried ADD and DEL")
}

/// DEL of a wired pod with the fault, then DEL again (and with an empty CNI_NETNS); and with the
/// fault again, GC without the attachment.
fn del_fault(bed: &mut Bed, fault: Fault) -> Result<()> {
    let pod = bed.node.add_pod("c-del")?;
    bed.faulted(fault, "DEL", "c-del", Some(&pod.ns))?;
    bed.then("DEL", "c-del", Some(&pod.ns))?;
    bed.then("DEL", "c-del", None)?;
    bed.clean("the failed DEL and DEL again")?;

    let pod = bed.node.add_pod("c-gc")?;
    bed.faulted(fault, "DEL", "c-gc", Some(&pod.ns))?;
    bed.then("GC", "", None)?;
    bed.clean("the failed DEL and GC")
}

/// GC without a wired pod's attachment with the fault, then GC again.
fn gc_fault(bed: &mut Bed, fault: Fault) -> Result<()> {
    let _pod = bed.node.add_pod("c-gc")?;
    bed.faulted(fault, "GC", "", None)?;
    bed.then("GC", "", None)?;
    bed.clean("the failed GC and GC again")
}

/// The census sees what one pod holds, each kind of it, and it gone again after DEL: a leak of
/// any of them would show.
#[test]
fn fault_census_counts_every_kind_of_state_a_pod_holds() -> Result<()> {
    let bed = Bed::new()?;
    let pod = NetNs::new("pod")?;
    let added = bed.then("ADD", "c-census", Some(&pod))?.out.json()?;
    let ip = pod_ip(&added)?;
    let veth = added["interfaces"][0]["name"]
        .as_str()
        .context("the host veth in the ADD result")?;
    let diff = Census::of(&bed.node)?.diff(&bed.before);
    let want = [
        format!("leaked address c-census/eth0 {ip}"),
        format!("leaked veth {veth}"),
        format!("leaked endpoint map entry {ip}"),
        format!("leaked tc attachment from_pod-{veth}"),
        format!("leaked tc attachment to_pod-{veth}"),
    ];
    ensure!(diff == want, "census of one more pod: {diff:?}");
    bed.then("DEL", "c-census", Some(&pod))?;
    bed.clean("DEL")
}

/// The agent's state directory on a real, full disk (a tiny tmpfs): ADD fails and leaves
/// nothing behind, DEL of a wired pod leaves the node consistent, and once there is space again
/// everything works and nothing leaked.
#[test]
fn add_and_del_on_a_full_state_disk_leave_nothing_behind() -> Result<()> {
    let mut bed = Bed::new()?;
    let empty = {
        let mut census = bed.before.clone();
        census.addresses.clear();
        census.veths.clear();
        census.endpoints.clear();
        census.links.clear();
        census
    };
    bed.node.stop_agent()?;
    let disk = Tmpfs::mount(bed.node.state_dir.path(), 64)?;
    bed.node.start_agent()?;
    bed.control_works("on the tmpfs")?;
    let filler = disk.fill()?;

    let pod = NetNs::new("pod")?;
    let add = bed.exec("ADD", "c-full", Some(&pod), None)?;
    ensure!(!add.out.success, "ADD on a full disk succeeded: {add:?}");
    let msg = add.out.json()?["msg"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    ensure!(
        msg.contains("No space left on device"),
        "the ADD's error says why: {msg}"
    );
    bed.clean("ADD on a full disk")?;
    ensure!(
        interfaces(&pod)?.is_empty(),
        "ADD left an interface in the pod"
    );
    bed.then("DEL", "c-full", Some(&pod))?;
    bed.then("DEL", "c-full", None)?;
    bed.clean("ADD and DEL on a full disk")?;

    // DEL of the control pod on the full disk may fail (the runtime retries), but what it
    // reports must be what the node holds: after a restart, the same.
    let del = bed.exec("DEL", CONTROL, Some(&bed.control.ns), None)?;
    eprintln!("DEL on a full disk: {:?}", del.out);
    let during = Census::of(&bed.node)?;
    bed.node.stop_agent()?;
    bed.node.start_agent()?;
    let restarted = Census::of(&bed.node)?;
    ensure!(
        restarted == during,
        "DEL on a full disk ({del:?}): the agent restarted differs from what it held: {}",
        restarted.diff(&during).join(", ")
    );

    std::fs::remove_file(&filler)?;
    bed.then("DEL", CONTROL, Some(&bed.control.ns))?;
    let after = Census::of(&bed.node)?;
    ensure!(
        after == empty,
        "after DEL with space again: {}",
        after.diff(&empty).join(", ")
    );
    let pod = NetNs::new("pod")?;
    let added = bed.then("ADD", "c-after", Some(&pod))?;
    let ip = pod_ip(&added.out.json()?)?;
    ensure!(ping(&bed.node.ns, ip)?, "the pod added after is reachable");
    bed.then("DEL", "c-after", Some(&pod))?;
    let after = Census::of(&bed.node)?;
    ensure!(
        after == empty,
        "after ADD and DEL with space again: {}",
        after.diff(&empty).join(", ")
    );
    // The tmpfs goes first (declared after the node), then the node removes its state
    // directory: also when the test fails.
    Ok(())
}

/// The points the code reaches: `point("…")` calls in the plugin's and agent's sources.
fn points_in_code() -> Result<BTreeSet<String>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut points = BTreeSet::new();
    for dir in [
        "agent/src",
        "cni/src",
        "netlink/src",
        "datapath/src",
        "core/src",
    ] {
        scan(&root.join(dir), &mut points)?;
    }
    Ok(points)
}

fn scan(dir: &Path, points: &mut BTreeSet<String>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            scan(&path, points)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path)?;
            // Not the fault module's own unit test.
            let code = text.split("#[cfg(test)]").next().unwrap_or_default();
            for (at, call) in code.match_indices("point(\"") {
                let rest = &code[at + call.len()..];
                if let Some(name) = rest.split('"').next() {
                    points.insert(name.to_owned());
                }
            }
        }
    }
    Ok(())
}

/// Points of other flows than ADD, DEL and GC, with the tests that cover them.
const ELSEWHERE: &[(&str, &str)] = &[("agent.apply.", "tests/cluster_apply.rs")];

#[test]
fn every_fault_point_in_the_code_has_a_case() -> Result<()> {
    let code: BTreeSet<String> = points_in_code()?
        .into_iter()
        .filter(|p| !ELSEWHERE.iter().any(|(prefix, _)| p.starts_with(prefix)))
        .collect();
    let table: BTreeSet<String> = TABLE.iter().map(|p| p.to_string()).collect();
    let untested: Vec<&String> = code.difference(&table).collect();
    let gone: Vec<&String> = table.difference(&code).collect();
    ensure!(
        untested.is_empty() && gone.is_empty(),
        "fault points in the code without a case: {untested:?}; cases of points the code no \
         longer has: {gone:?}"
    );
    Ok(())
}
