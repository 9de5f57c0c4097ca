//! The network configuration on stdin and the CNI_* environment.

use std::{env, path::PathBuf};

use podwire_core::{api::DEFAULT_SOCKET, endpoint::Attachment};
use serde::Deserialize;

use crate::{
    error::{code, CniError},
    result::CniResult,
    version,
};

/// podwire's network configuration (one plugin entry of a conflist, as the runtime passes it).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    /// Required by the spec: serde rejects a configuration without it.
    #[expect(dead_code, reason = "only its presence is checked")]
    pub name: String,
    /// Required by the spec: serde rejects a configuration without it.
    #[serde(rename = "type")]
    #[expect(dead_code, reason = "only its presence is checked")]
    pub plugin_type: String,
    /// Pod interface MTU; by default the node's (its underlay MTU less the tunnel overhead).
    pub mtu: Option<u32>,
    /// Unix socket of the node's podwire agent.
    pub agent_socket: Option<PathBuf>,
    /// IPAM is the agent's: a delegated IPAM plugin is not supported.
    pub ipam: Option<serde_json::Value>,
    /// Result of the previous plugins in a conflist.
    pub prev_result: Option<CniResult>,
    /// GC: the attachments the runtime still uses.
    #[serde(rename = "cni.dev/valid-attachments", default)]
    pub valid_attachments: Vec<Attachment>,
}

impl NetConf {
    /// Parses and validates the configuration from stdin.
    pub fn parse(stdin: &[u8]) -> Result<NetConf, CniError> {
        // The version is checked first, so a config of an unknown version is reported as such
        // rather than as whatever shape difference it has.
        #[derive(Deserialize)]
        struct Versioned {
            #[serde(rename = "cniVersion")]
            cni_version: Option<String>,
        }
        let versioned: Versioned = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                code::DECODE_FAILURE,
                format!("network configuration is not valid JSON: {e}"),
            )
        })?;
        let v = versioned.cni_version.ok_or_else(|| {
            CniError::new(
                code::INVALID_CONFIG,
                "network configuration has no cniVersion",
            )
        })?;
        if !version::SUPPORTED.contains(&v.as_str()) {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!(
                    "cniVersion {v:?} is not supported; podwire supports {}",
                    version::SUPPORTED.join(", ")
                ),
            ));
        }
        let conf: NetConf = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                code::INVALID_CONFIG,
                format!("invalid network configuration: {e}"),
            )
        })?;
        if conf.ipam.is_some() {
            return Err(CniError::new(
                code::UNSUPPORTED_FIELD,
                "the podwire agent allocates pod addresses: remove the \"ipam\" section",
            ));
        }
        if let Some(mtu) = conf.mtu {
            if !(576..=65535).contains(&mtu) {
                return Err(CniError::new(
                    code::INVALID_CONFIG,
                    format!("mtu {mtu} is outside 576..=65535"),
                ));
            }
        }
        Ok(conf)
    }

    pub fn socket(&self) -> PathBuf {
        self.agent_socket
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
    }

    /// An error of this configuration's version.
    pub fn error(&self, mut e: CniError) -> CniError {
        e.cni_version = self.cni_version.clone();
        e
    }
}

/// A required CNI_* variable.
pub fn required(name: &str, command: &str) -> Result<String, CniError> {
    match env::var(name) {
        Ok(v) if !v.is_empty() => Ok(v),
        _ => Err(CniError::new(
            code::INVALID_ENV,
            format!("{name} is required for {command}"),
        )),
    }
}

/// The attachment named by CNI_CONTAINERID and CNI_IFNAME, validated as the spec asks.
pub fn attachment(command: &str) -> Result<Attachment, CniError> {
    let container_id = required("CNI_CONTAINERID", command)?;
    if !container_id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
    {
        return Err(CniError::new(
            code::INVALID_ENV,
            format!(
                "CNI_CONTAINERID {container_id:?} may hold only letters, digits, '_', '.' and '-'"
            ),
        ));
    }
    let ifname = required("CNI_IFNAME", command)?;
    let bad_ifname = ifname.len() > 15
        || ifname == "."
        || ifname == ".."
        || ifname
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace());
    if bad_ifname {
        return Err(CniError::new(
            code::INVALID_ENV,
            format!("CNI_IFNAME {ifname:?} is not a valid interface name (at most 15 characters, no '/', ':' or spaces)"),
        ));
    }
    Ok(Attachment {
        container_id,
        ifname,
    })
}
