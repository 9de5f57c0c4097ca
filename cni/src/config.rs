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
    /// Filled in by `parse_for` when a DEL's configuration has none.
    #[serde(default)]
    pub cni_version: String,
    /// The network's name (required by the spec: serde rejects a configuration without it);
    /// endpoints are recorded under it, and GC collects only its own.
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
    /// GC: the attachments the runtime still uses. `None` when the key is missing, which is not
    /// the empty list: see [`NetConf::valid_attachments`].
    #[serde(rename = "cni.dev/valid-attachments", default)]
    pub valid_attachments: Option<Vec<Attachment>>,
    /// The same list under the name spec 1.1's drafts gave it; libcni sends both.
    #[serde(rename = "cni.dev/attachments", default)]
    attachments: Option<Vec<Attachment>>,
}

impl NetConf {
    /// Parses and validates the configuration from stdin for the command in CNI_COMMAND.
    pub fn parse(stdin: &[u8]) -> Result<NetConf, CniError> {
        Self::parse_for(&env::var("CNI_COMMAND").unwrap_or_default(), stdin)
    }

    /// Parses and validates the configuration for `command`. DEL checks only what it needs: it
    /// is best effort by the spec, and a DEL refused for a setting only ADD uses (a version,
    /// an MTU, an `ipam` section that changed since) would leak the pod's address and veth.
    pub fn parse_for(command: &str, stdin: &[u8]) -> Result<NetConf, CniError> {
        let del = command == "DEL";
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
        let v = match versioned.cni_version {
            Some(v) => v,
            // Configurations before 0.2.0 had none; libcni reads them as 0.1.0.
            None if del => "0.1.0".to_owned(),
            None => {
                return Err(CniError::new(
                    code::INVALID_CONFIG,
                    "network configuration has no cniVersion",
                ))
            }
        };
        version::accepts(command, &v)?;
        let mut conf: NetConf = match serde_json::from_slice(stdin) {
            Ok(conf) => conf,
            // DEL does not need prevResult: one it cannot read does not stop it.
            Err(_) if del => Self::without_prev_result(stdin)?,
            Err(e) => {
                return Err(CniError::new(
                    code::INVALID_CONFIG,
                    format!("invalid network configuration: {e}"),
                ))
            }
        };
        conf.cni_version = v;
        if del {
            return Ok(conf);
        }
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

    /// The configuration in `stdin` without its `prevResult`. The first parse read only
    /// cniVersion and skipped the rest unchecked (invalid UTF-8 in a skipped string passes it),
    /// so this one can still find it undecodable.
    fn without_prev_result(stdin: &[u8]) -> Result<NetConf, CniError> {
        let mut value: serde_json::Value = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                code::DECODE_FAILURE,
                format!("network configuration is not valid JSON: {e}"),
            )
        })?;
        if let Some(fields) = value.as_object_mut() {
            fields.remove("prevResult");
        }
        serde_json::from_value(value).map_err(|e| {
            CniError::new(
                code::INVALID_CONFIG,
                format!("invalid network configuration: {e}"),
            )
        })
    }

    pub fn socket(&self) -> PathBuf {
        self.agent_socket
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
    }

    /// GC's list of the attachments the runtime still uses. A configuration without it is
    /// refused, not read as an empty list: that would mean nothing is valid and remove every
    /// pod of the node.
    pub fn valid_attachments(&self) -> Result<Vec<Attachment>, CniError> {
        self.valid_attachments
            .as_ref()
            .or(self.attachments.as_ref())
            .cloned()
            .ok_or_else(|| {
                CniError::new(
                    code::INVALID_CONFIG,
                    "GC needs \"cni.dev/valid-attachments\", the attachments the runtime still \
                     uses; without it nothing is known to be valid and no pod is collected",
                )
            })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(extra: serde_json::Value) -> Vec<u8> {
        let mut conf =
            serde_json::json!({ "cniVersion": "1.1.0", "name": "podwire", "type": "podwire-cni" });
        for (k, v) in extra.as_object().expect("an object") {
            conf[k] = v.clone();
        }
        conf.to_string().into_bytes()
    }

    /// Found by tests/fuzz.rs: invalid UTF-8 in a field the version probe skips made the
    /// plugin panic (exit 101, no JSON) instead of answering with a decoding error.
    #[test]
    fn invalid_utf8_past_the_version_is_a_decoding_error() {
        let stdin = b"{\"cniVersion\":\"1.1.0\",\"name\":\"\x80podwire\",\"type\":\"podwire-cni\"}";
        let err = NetConf::parse_for("DEL", stdin).unwrap_err();
        assert_eq!(err.code, code::DECODE_FAILURE, "{}", err.msg);
        assert!(
            err.msg.contains("invalid unicode code point"),
            "{}",
            err.msg
        );
        let err = NetConf::parse_for("ADD", stdin).unwrap_err();
        assert_eq!(err.code, code::INVALID_CONFIG, "{}", err.msg);
    }

    #[test]
    fn del_takes_any_spec_version_and_settings_only_add_uses() {
        let changed = conf(serde_json::json!({
            "cniVersion": "0.2.0", "ipam": { "type": "host-local" }, "mtu": 100,
        }));
        let parsed = NetConf::parse_for("DEL", &changed).expect("DEL parses it");
        assert_eq!(parsed.cni_version, "0.2.0");
        assert_eq!(
            NetConf::parse_for("ADD", &changed).unwrap_err().code,
            code::INCOMPATIBLE_VERSION
        );
        let mut versionless: serde_json::Value =
            serde_json::from_slice(&conf(serde_json::json!({}))).unwrap();
        versionless.as_object_mut().unwrap().remove("cniVersion");
        let versionless = versionless.to_string().into_bytes();
        assert_eq!(
            NetConf::parse_for("DEL", &versionless).unwrap().cni_version,
            "0.1.0"
        );
        assert_eq!(
            NetConf::parse_for("ADD", &versionless).unwrap_err().code,
            code::INVALID_CONFIG
        );
        // Nor does a prevResult it cannot read.
        let odd = conf(serde_json::json!({ "prevResult": { "ips": "not a list" } }));
        assert!(NetConf::parse_for("DEL", &odd)
            .unwrap()
            .prev_result
            .is_none());
        assert_eq!(
            NetConf::parse_for("CHECK", &odd).unwrap_err().code,
            code::INVALID_CONFIG
        );
        // What DEL cannot read at all is still an error.
        assert_eq!(
            NetConf::parse_for("DEL", b"{").unwrap_err().code,
            code::DECODE_FAILURE
        );
        let e = NetConf::parse_for("DEL", &conf(serde_json::json!({ "cniVersion": "9.0.0" })))
            .unwrap_err();
        assert_eq!(e.code, code::INCOMPATIBLE_VERSION);
    }

    #[test]
    fn gc_tells_a_missing_list_from_an_empty_one() {
        let missing = NetConf::parse_for("GC", &conf(serde_json::json!({}))).unwrap();
        let e = missing.valid_attachments().unwrap_err();
        assert_eq!(e.code, code::INVALID_CONFIG);
        assert!(e.msg.contains("cni.dev/valid-attachments"), "{}", e.msg);

        let empty = conf(serde_json::json!({ "cni.dev/valid-attachments": [] }));
        let empty = NetConf::parse_for("GC", &empty).unwrap();
        assert!(empty.valid_attachments().unwrap().is_empty());

        // libcni sends the list under both names.
        let both = conf(serde_json::json!({
            "cni.dev/valid-attachments": [{ "containerID": "a", "ifname": "eth0" }],
            "cni.dev/attachments": [{ "containerID": "a", "ifname": "eth0" }],
        }));
        let both = NetConf::parse_for("GC", &both)
            .unwrap()
            .valid_attachments()
            .unwrap();
        assert_eq!(both.len(), 1);
        assert_eq!(both[0].container_id, "a");
        let draft = conf(
            serde_json::json!({ "cni.dev/attachments": [{ "containerID": "b", "ifname": "eth0" }] }),
        );
        let draft = NetConf::parse_for("GC", &draft)
            .unwrap()
            .valid_attachments()
            .unwrap();
        assert_eq!(draft[0].container_id, "b");
    }
}
