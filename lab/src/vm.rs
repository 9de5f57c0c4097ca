//! What `podwire-verify` reports from inside the VM that `cargo xtask vm-verify` boots: one line on
//! the VM's console, [`REPORT_PREFIX`] followed by a [`VerifyReport`] as JSON, printed whether it
//! succeeds or fails. The prefix lets xtask find the line among the kernel's console output; the
//! JSON lets it check facts instead of scraping prose.
//!
//! ```text
//! podwire-verify-report {"kernel":"6.1.0-28-cloud-amd64","verified":["from_pod","from_overlay","to_overlay"],
//!   "delivery":{"datagrams":16,"min_bytes":1,"max_bytes":1472,"attach":"netlink-tc","forwarding":false},
//!   "cluster":{"attach":"netlink-tc","tunnelled_packets":23353,"from_tunnel_packets":23359,
//!     "restarts":[{"node":"node1","serving_ms":8156,"not_adopted":[],"endpoints_kept":true,"new_pod_reached":true},...],
//!     "streams":[{"name":"node1->node2","cross_node":true,"bytes":12619776,"longest_gap_ms":206,"retransmits":5,"error":null},...],
//!     "pings":[{"name":"node1->node2","cross_node":true,"sent":3183,"received":3183,"longest_loss_run":0},...]},
//!   "error":null}
//! ```
//! (one line in reality).

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

/// Starts the report's line; the JSON follows on the same line.
pub const REPORT_PREFIX: &str = "podwire-verify-report ";

/// [`Delivery::attach`] when `from_pod` was attached through netlink tc with a clsact qdisc, as
/// on kernels before 6.6 (no TCX).
pub const NETLINK_TC: &str = "netlink-tc";

/// What podwire-verify found on the kernel it ran on.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VerifyReport {
    /// The kernel release (`/proc/sys/kernel/osrelease`), e.g. `6.1.0-28-cloud-amd64`; empty if
    /// it could not be read.
    pub kernel: String,
    /// The programs that passed the verifier, in load order. The datapath loads all of them or
    /// none, so this is either every program or empty.
    pub verified: Vec<String>,
    /// Datagrams two pods exchanged through `from_pod`; absent unless every one arrived intact
    /// and was counted as delivered by `bpf_redirect_peer`.
    pub delivery: Option<Delivery>,
    /// Two nodes with the real agent and plugin, traffic across them and agent restarts under
    /// it; absent unless the check ran to its end (its findings are judged by
    /// [`ClusterCheck::problems`]).
    #[serde(default)]
    pub cluster: Option<ClusterCheck>,
    /// Why podwire-verify failed (the error chain, a verifier log included), if it did.
    pub error: Option<String>,
}

/// The share of pings that may go unanswered while agents restart.
pub const MAX_PING_LOSS: f64 = 0.001;
/// A stream that receives nothing for this long (in milliseconds) while its sender sends has
/// stalled: TCP backs off this far only after losing segments for about a second.
pub const STALL_MS: u64 = 5000;

/// The two-node check: two nodes (network namespaces joined by a veth underlay,
/// 192.168.77.0/24), each running the real `podwire-agent` fed by a cluster file, pods wired by
/// the real `podwire-cni`, continuous TCP streams and pings on one node and across nodes through
/// the VXLAN tunnel, while the agents are killed with SIGKILL and started again.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClusterCheck {
    /// How the pods' and the tunnel's programs were attached: [`NETLINK_TC`] before 6.6.
    pub attach: String,
    /// Packets the nodes' programs sent to another node (redirect-overlay, redirect-encap or
    /// redirect-native, by mode), all nodes together, read once traffic had crossed.
    pub tunnelled_packets: u64,
    /// Packets the nodes' programs delivered from another node (redirect-from-overlay,
    /// redirect-decap or redirect-from-native).
    pub from_tunnel_packets: u64,
    /// Each restart, in order.
    pub restarts: Vec<Restart>,
    /// The streams, finished after the last restart.
    pub streams: Vec<StreamResult>,
    /// The pingers, finished after the last restart.
    pub pings: Vec<PingResult>,
}

/// One agent killed with SIGKILL and started again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Restart {
    /// The node whose agent it was.
    pub node: String,
    /// From the kill to the new agent serving CNI requests, in milliseconds.
    pub serving_ms: u64,
    /// What the new agent did not adopt as it was pinned: maps or links gone or re-created.
    pub not_adopted: Vec<String>,
    /// Whether the endpoint map held exactly the same entries after the restart.
    pub endpoints_kept: bool,
    /// Whether a pod added after the restart got answers from a pod on the other node.
    pub new_pod_reached: bool,
}

/// A long-lived TCP connection carrying a counted byte pattern.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamResult {
    pub name: String,
    pub cross_node: bool,
    /// Bytes that arrived, every one in order; all that were sent unless `error` says otherwise.
    pub bytes: u64,
    /// The longest time nothing arrived while the sender sent, in milliseconds.
    pub longest_gap_ms: u64,
    /// Segments the client retransmitted.
    pub retransmits: u32,
    /// Why the stream broke (connection lost, bytes missing), if it did.
    pub error: Option<String>,
}

/// Echo requests at a fixed interval, each reply counted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PingResult {
    pub name: String,
    pub cross_node: bool,
    pub sent: u64,
    pub received: u64,
    /// The longest run of consecutive requests without a reply.
    pub longest_loss_run: u64,
}

impl ClusterCheck {
    /// What the check found wrong: a restart that did not adopt the pinned state, a stream that
    /// broke or stalled, more than [`MAX_PING_LOSS`] of a pinger's requests unanswered, traffic
    /// that never crossed the tunnel. Empty when the restarts were hitless.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.restarts.is_empty() {
            problems.push("no agent was restarted".to_owned());
        }
        if self.tunnelled_packets == 0 || self.from_tunnel_packets == 0 {
            problems.push(format!(
                "traffic did not cross the tunnel: {} packets sent into it, {} out of it",
                self.tunnelled_packets, self.from_tunnel_packets
            ));
        }
        for (i, r) in self.restarts.iter().enumerate() {
            for what in &r.not_adopted {
                problems.push(format!("restart {i} of {}: {what}", r.node));
            }
            if !r.endpoints_kept {
                problems.push(format!(
                    "restart {i} of {}: endpoint entries changed",
                    r.node
                ));
            }
            if !r.new_pod_reached {
                problems.push(format!(
                    "restart {i} of {}: a pod added afterwards reached no pod on the other node",
                    r.node
                ));
            }
        }
        if !self.streams.iter().any(|s| s.cross_node) || !self.pings.iter().any(|p| p.cross_node) {
            problems.push("no stream or no pinger across nodes".to_owned());
        }
        for s in &self.streams {
            if let Some(error) = &s.error {
                problems.push(format!("stream {}: {error}", s.name));
            } else if s.bytes == 0 {
                problems.push(format!("stream {} carried nothing", s.name));
            }
            if s.longest_gap_ms > STALL_MS {
                problems.push(format!(
                    "stream {} stalled for {} ms",
                    s.name, s.longest_gap_ms
                ));
            }
        }
        for p in &self.pings {
            let lost = p.sent.saturating_sub(p.received);
            if p.sent == 0 || lost as f64 > p.sent as f64 * MAX_PING_LOSS {
                problems.push(format!(
                    "ping {}: {lost} of {} lost (at most {}% may be), longest run {}",
                    p.name,
                    p.sent,
                    MAX_PING_LOSS * 100.0,
                    p.longest_loss_run
                ));
            }
        }
        problems
    }
}

/// The pod-to-pod check: datagrams between two pods on one node, delivered by `from_pod`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    /// Datagrams sent, both ways together; every one arrived intact.
    pub datagrams: u64,
    /// The smallest UDP payload sent, in bytes.
    pub min_bytes: usize,
    /// The largest UDP payload sent, in bytes.
    pub max_bytes: usize,
    /// How `from_pod` was attached to the pods' host-side veths: [`NETLINK_TC`].
    pub attach: String,
    /// Whether IP forwarding was on in the node, read back after the exchange. Off means only
    /// the eBPF redirect can have carried the datagrams.
    pub forwarding: bool,
}

impl VerifyReport {
    /// The report as podwire-verify prints it: [`REPORT_PREFIX`] and the JSON, on one line.
    pub fn line(&self) -> String {
        let json = serde_json::to_string(self).expect("strings, numbers and bools serialize");
        format!("{REPORT_PREFIX}{json}")
    }

    /// The report in a console line, if the line holds one. Whatever the console put before the
    /// prefix (escape sequences, a kernel message cut in) is skipped.
    pub fn from_line(line: &str) -> Option<Result<VerifyReport>> {
        let (_, json) = line.split_once(REPORT_PREFIX)?;
        Some(
            serde_json::from_str(json)
                .with_context(|| format!("podwire-verify's report is not one it writes: {json}")),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hitless() -> ClusterCheck {
        ClusterCheck {
            attach: NETLINK_TC.into(),
            tunnelled_packets: 5000,
            from_tunnel_packets: 4800,
            restarts: vec![Restart {
                node: "node1".into(),
                serving_ms: 4000,
                not_adopted: vec![],
                endpoints_kept: true,
                new_pod_reached: true,
            }],
            streams: vec![StreamResult {
                name: "node1->node2".into(),
                cross_node: true,
                bytes: 1 << 20,
                longest_gap_ms: 30,
                retransmits: 0,
                error: None,
            }],
            pings: vec![PingResult {
                name: "node2->node1".into(),
                cross_node: true,
                sent: 2000,
                received: 1998,
                longest_loss_run: 2,
            }],
        }
    }

    #[test]
    fn a_hitless_run_has_no_problems_and_each_fault_is_named() {
        assert_eq!(hitless().problems(), Vec::<String>::new());
        let problem = |change: fn(&mut ClusterCheck)| {
            let mut check = hitless();
            change(&mut check);
            check.problems()
        };
        assert_eq!(
            problem(|c| c.pings[0].received = 1997),
            ["ping node2->node1: 3 of 2000 lost (at most 0.1% may be), longest run 2"]
        );
        assert_eq!(
            problem(|c| c.streams[0].error = Some("connection reset".into())),
            ["stream node1->node2: connection reset"]
        );
        assert_eq!(
            problem(|c| c.streams[0].longest_gap_ms = 6000),
            ["stream node1->node2 stalled for 6000 ms"]
        );
        assert_eq!(
            problem(|c| c.restarts[0].not_adopted = vec!["map X was re-created".into()]),
            ["restart 0 of node1: map X was re-created"]
        );
        assert_eq!(
            problem(|c| c.restarts[0].endpoints_kept = false),
            ["restart 0 of node1: endpoint entries changed"]
        );
        assert_eq!(problem(|c| c.restarts.clear()), ["no agent was restarted"]);
        assert_eq!(
            problem(|c| c.from_tunnel_packets = 0),
            ["traffic did not cross the tunnel: 5000 packets sent into it, 0 out of it"]
        );
        assert_eq!(
            problem(|c| c.streams[0].cross_node = false),
            ["no stream or no pinger across nodes"]
        );
    }

    #[test]
    fn a_report_reads_back_from_its_console_line() {
        let report = VerifyReport {
            kernel: "6.1.0-28-cloud-amd64".into(),
            verified: vec!["from_pod".into()],
            delivery: Some(Delivery {
                datagrams: 16,
                min_bytes: 1,
                max_bytes: 1472,
                attach: NETLINK_TC.into(),
                forwarding: false,
            }),
            cluster: Some(hitless()),
            error: Some("a\nmultiline \"error\"".into()),
        };
        let line = report.line();
        assert_eq!(line.lines().count(), 1, "{line}");
        let console = format!("\x1b[0m{line}");
        assert_eq!(VerifyReport::from_line(&console).unwrap().unwrap(), report);
        assert!(VerifyReport::from_line("[    1.2] veth: loaded").is_none());
        assert!(
            VerifyReport::from_line(&format!("{REPORT_PREFIX}{{\"kernel\""))
                .unwrap()
                .is_err()
        );
    }
}
