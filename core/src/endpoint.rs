//! A pod's endpoint as the agent records it and the plugin sees it: which container attachment it
//! is, the address IPAM gave it, and the veth pair the plugin made for it.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::mac::Mac;

/// A container's network attachment, as CNI names it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

impl Attachment {
    /// Key of the attachment in the agent's state.
    pub fn key(&self) -> String {
        format!("{}/{}", self.container_id, self.ifname)
    }

    /// Name of the host-side veth of this attachment: "pw" and 11 hex digits of a hash of its
    /// key, so the plugin (at ADD, DEL and GC) and the agent (at Register, DEL and GC) derive the
    /// same name, and it fits IFNAMSIZ.
    pub fn host_ifname(&self) -> String {
        let digest = Sha256::digest(self.key().as_bytes());
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        format!("pw{}", &hex[..11])
    }
}

/// One pod attachment: its address and, once the plugin has registered it, its veth pair.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRecord {
    pub container_id: String,
    pub ifname: String,
    pub ip: Ipv4Addr,
    pub netns: String,
    /// The CNI network (configuration `name`) it was added for; absent in records of agents
    /// before it was recorded. GC of one network never collects another's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// Set when the plugin registers the veth pair. Named "wiring" in state files and on the
    /// API socket since the first release, which both still read.
    #[serde(rename = "wiring", default, skip_serializing_if = "Option::is_none")]
    pub veth: Option<VethPair>,
}

impl EndpointRecord {
    /// The attachment this record belongs to.
    pub fn attachment(&self) -> Attachment {
        Attachment {
            container_id: self.container_id.clone(),
            ifname: self.ifname.clone(),
        }
    }
}

/// The veth pair of a registered endpoint: its host side in the node, its peer in the pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VethPair {
    pub host_ifname: String,
    pub host_mac: Mac,
    pub pod_mac: Mac,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A state file written by the first release (and the API's Checked reply) reads the same.
    #[test]
    fn records_keep_their_json_names() {
        let json = r#"{"container_id":"c1","ifname":"eth0","ip":"10.244.1.2","netns":"/run/netns/p",
            "wiring":{"host_ifname":"pw0123456789a","host_mac":"0a:58:0a:f4:01:01",
            "pod_mac":"0a:58:0a:f4:01:02"}}"#;
        let record: EndpointRecord = serde_json::from_str(json).unwrap();
        let veth = record
            .veth
            .as_ref()
            .expect("the veth pair is read from \"wiring\"");
        assert_eq!(veth.host_ifname, "pw0123456789a");
        assert_eq!(veth.pod_mac.to_string(), "0a:58:0a:f4:01:02");
        let written = serde_json::to_value(&record).unwrap();
        assert_eq!(written["wiring"]["host_mac"], "0a:58:0a:f4:01:01");
        let unregistered = EndpointRecord {
            veth: None,
            ..record
        };
        assert!(serde_json::to_value(&unregistered)
            .unwrap()
            .get("wiring")
            .is_none());
    }

    /// The name every release derived: a node upgraded with pods running finds their veths.
    #[test]
    fn host_ifname_is_stable() {
        let attachment = Attachment {
            container_id: "c1".into(),
            ifname: "eth0".into(),
        };
        let name = attachment.host_ifname();
        assert_eq!(name.len(), 13, "fits IFNAMSIZ with room: {name}");
        assert_eq!(name, "pwd72e032fedd");
    }
}
