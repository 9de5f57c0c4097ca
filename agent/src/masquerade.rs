//! The masquerade of pod traffic leaving the cluster: an nftables table the agent owns, replaced
//! as a whole. It shells out to `nft` (as the `nftables` crate would too).

use std::{io::Write as _, process::Stdio};

use ipnet::Ipv4Net;

use crate::overlay::VXLAN_DEV;

/// Errors of installing the masquerade rules.
#[derive(Debug, thiserror::Error)]
pub enum MasqueradeError {
    /// `nft` could not be run.
    #[error("running nft (is the nftables package installed?)")]
    Spawn(#[source] std::io::Error),
    /// `nft` refused the rules.
    #[error("nft refused the masquerade table: {0}")]
    Refused(String),
}

/// podwire's nftables table.
pub const TABLE: &str = "podwire";

/// Replaces podwire's nftables table: traffic from this node's pods (`pod_cidr`) to anything
/// outside `pod_ranges` that leaves through the host stack takes the node's address. Written as
/// one `nft -f` transaction, so the rules never disappear midway.
pub fn sync(pod_cidr: Ipv4Net, pod_ranges: &[Ipv4Net]) -> Result<(), MasqueradeError> {
    let exempt: Vec<String> = pod_ranges.iter().map(Ipv4Net::to_string).collect();
    let ruleset = format!(
        "table ip {TABLE}\n\
         delete table ip {TABLE}\n\
         table ip {TABLE} {{\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tip saddr {pod_cidr} ip daddr != {{ {} }} oifname != \"{VXLAN_DEV}\" masquerade\n\
         \t}}\n\
         }}\n",
        exempt.join(", ")
    );
    nft(&ruleset)
}

/// Removes podwire's nftables table (uninstall); true when there was one.
pub fn remove() -> Result<bool, MasqueradeError> {
    // Declaring the table first makes deleting it succeed whether or not it existed; listing
    // tells which it was.
    let existed = std::process::Command::new("nft")
        .args(["list", "table", "ip", TABLE])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(MasqueradeError::Spawn)?
        .success();
    nft(&format!("table ip {TABLE}\ndelete table ip {TABLE}\n"))?;
    Ok(existed)
}

/// Runs `nft -f -` with `ruleset`: one transaction.
fn nft(ruleset: &str) -> Result<(), MasqueradeError> {
    let mut nft = std::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(MasqueradeError::Spawn)?;
    nft.stdin
        .take()
        .expect("piped")
        .write_all(ruleset.as_bytes())
        .map_err(MasqueradeError::Spawn)?;
    let out = nft.wait_with_output().map_err(MasqueradeError::Spawn)?;
    if !out.status.success() {
        return Err(MasqueradeError::Refused(
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ));
    }
    Ok(())
}
