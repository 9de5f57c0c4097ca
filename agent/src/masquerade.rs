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
    #[error("installing the masquerade rules with nft: {0}")]
    Refused(String),
}

/// Replaces podwire's nftables table: traffic from this node's pods (`pod_cidr`) to anything
/// outside `pod_ranges` that leaves through the host stack takes the node's address. Written as
/// one `nft -f` transaction, so the rules never disappear midway.
pub fn sync(pod_cidr: Ipv4Net, pod_ranges: &[Ipv4Net]) -> Result<(), MasqueradeError> {
    let exempt: Vec<String> = pod_ranges.iter().map(Ipv4Net::to_string).collect();
    let ruleset = format!(
        "table ip podwire\n\
         delete table ip podwire\n\
         table ip podwire {{\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tip saddr {pod_cidr} ip daddr != {{ {} }} oifname != \"{VXLAN_DEV}\" masquerade\n\
         \t}}\n\
         }}\n",
        exempt.join(", ")
    );
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
