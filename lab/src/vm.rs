//! What `podwire-verify` reports from inside the VM that `cargo xtask vm-verify` boots: one line on
//! the VM's console, [`REPORT_PREFIX`] followed by a [`VerifyReport`] as JSON, printed whether it
//! succeeds or fails. The prefix lets xtask find the line among the kernel's console output; the
//! JSON lets it check facts instead of scraping prose.
//!
//! ```text
//! podwire-verify-report {"kernel":"6.1.0-28-cloud-amd64","verified":["from_pod","from_overlay","to_overlay"],
//!   "delivery":{"datagrams":16,"min_bytes":1,"max_bytes":1472,"attach":"netlink-tc","forwarding":false},"error":null}
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
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
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
    /// Why podwire-verify failed (the error chain, a verifier log included), if it did.
    pub error: Option<String>,
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
