//! The CNI result object. <https://github.com/containernetworking/cni/blob/main/SPEC.md#add-success>
//!
//! A plugin in a chain must pass its `prevResult` on with its own additions, so every field a
//! previous plugin wrote is kept: the ones the spec defines as fields, anything else in `extra`.
//! Only the output version decides what is printed ([`CniResult::for_version`]).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniResult {
    #[serde(rename = "cniVersion", default)]
    pub cni_version: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub dns: Dns,
    /// Keys no spec version defines, passed on as they came.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
    /// Since spec 1.1.0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// The netns path for interfaces inside the container; absent for host interfaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    /// Since spec 1.1.0: a socket (vhost-user, say) standing for the interface.
    #[serde(
        rename = "socketPath",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub socket_path: Option<String>,
    /// Since spec 1.1.0: the PCI device behind the interface.
    #[serde(rename = "pciID", default, skip_serializing_if = "Option::is_none")]
    pub pci_id: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    /// Only in 0.x results: "4" or "6".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// CIDR notation, e.g. 10.244.1.5/32.
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// Index into `interfaces`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub dst: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<String>,
    /// Since spec 1.1.0, as `mtu`, `advmss`, `priority`, `table` and `scope` (the kernel's route
    /// attributes of those names; scope 0 global, 253 link, 254 host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advmss: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<u32>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl CniResult {
    /// Appends `ours` to this (previous) result, as a plugin in a chain must: our interface indices
    /// are shifted past the previous ones, and DNS from before is kept unless it is empty.
    pub fn merge(mut self, ours: CniResult) -> CniResult {
        let offset = self.interfaces.len();
        self.interfaces.extend(ours.interfaces);
        self.ips.extend(ours.ips.into_iter().map(|mut ip| {
            ip.interface = ip.interface.map(|i| i + offset);
            ip
        }));
        self.routes.extend(ours.routes);
        if self.dns == Dns::default() {
            self.dns = ours.dns;
        }
        for (key, value) in ours.extra {
            self.extra.entry(key).or_insert(value);
        }
        self.cni_version = ours.cni_version;
        self
    }

    /// Adjusts fields to what `version` defines: 0.x results carry an IP `version`; the 1.1.0
    /// fields (interface `mtu`, `socketPath`, `pciID`; route `mtu`, `advmss`, `priority`,
    /// `table`, `scope`) only go out in 1.1.0 and later, as the older versions' types have no
    /// place for them.
    pub fn for_version(mut self, version: &str) -> CniResult {
        let v0 = version.starts_with("0.");
        for ip in &mut self.ips {
            ip.version = v0.then(|| if ip.address.contains(':') { "6" } else { "4" }.to_owned());
        }
        if !crate::version::at_least_1_1(version) {
            for iface in &mut self.interfaces {
                iface.mtu = None;
                iface.socket_path = None;
                iface.pci_id = None;
            }
            for route in &mut self.routes {
                route.mtu = None;
                route.advmss = None;
                route.priority = None;
                route.table = None;
                route.scope = None;
            }
        }
        self.cni_version = version.to_owned();
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ours() -> CniResult {
        CniResult {
            cni_version: "1.1.0".into(),
            interfaces: vec![
                Interface {
                    name: "pwabc".into(),
                    mac: "aa:aa:aa:aa:aa:aa".into(),
                    mtu: Some(1450),
                    ..Default::default()
                },
                Interface {
                    name: "eth0".into(),
                    mac: "bb:bb:bb:bb:bb:bb".into(),
                    mtu: Some(1450),
                    sandbox: Some("/run/netns/p".into()),
                    ..Default::default()
                },
            ],
            ips: vec![IpConfig {
                address: "10.244.1.5/32".into(),
                gateway: Some("169.254.1.1".into()),
                interface: Some(1),
                ..Default::default()
            }],
            routes: vec![Route {
                dst: "0.0.0.0/0".into(),
                gw: Some("169.254.1.1".into()),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    /// A chained plugin's 1.1.0 result with every field the spec defines, and some it does not.
    fn rich() -> Value {
        serde_json::json!({
            "cniVersion": "1.1.0",
            "interfaces": [{ "name": "net0", "mac": "02:00:00:00:00:01", "mtu": 9000,
                             "sandbox": "/run/netns/p", "socketPath": "/run/vhost/net0.sock",
                             "pciID": "0000:00:1f.6", "x-iface": 1 }],
            "ips": [{ "address": "192.0.2.10/24", "gateway": "192.0.2.1", "interface": 0, "x-ip": "y" }],
            "routes": [{ "dst": "198.51.100.0/24", "gw": "192.0.2.1", "mtu": 1400, "advmss": 1360,
                         "priority": 100, "table": 50, "scope": 253, "x-route": [1, 2] }],
            "dns": { "nameservers": ["10.96.0.10"], "domain": "cluster.local",
                     "search": ["svc.cluster.local"], "options": ["ndots:5"], "x-dns": true },
            "x-vendor": { "kept": true },
        })
    }

    #[test]
    fn merge_shifts_interface_indices_past_previous_ones() {
        let prev: CniResult = serde_json::from_str(
            r#"{"cniVersion":"1.0.0","interfaces":[{"name":"lo","sandbox":"/run/netns/p"}],
                "ips":[{"address":"127.0.0.1/8","interface":0}],"dns":{"nameservers":["10.96.0.10"]}}"#,
        )
        .unwrap();
        let merged = prev.merge(ours());
        assert_eq!(merged.interfaces.len(), 3);
        assert_eq!(
            merged.ips[1].interface,
            Some(2),
            "our IP points at our eth0"
        );
        assert_eq!(merged.dns.nameservers, ["10.96.0.10"]);
    }

    #[test]
    fn every_field_of_a_chained_result_is_passed_on_at_1_1() {
        let prev: CniResult = serde_json::from_value(rich()).unwrap();
        let out = serde_json::to_value(prev.merge(ours()).for_version("1.1.0")).unwrap();
        let want = rich();
        assert_eq!(out["interfaces"][0], want["interfaces"][0]);
        assert_eq!(out["ips"][0], want["ips"][0]);
        assert_eq!(out["routes"][0], want["routes"][0]);
        assert_eq!(out["dns"], want["dns"]);
        assert_eq!(out["x-vendor"], want["x-vendor"]);
        assert_eq!(out["ips"][1]["interface"], 2);
        assert_eq!(out["routes"][1]["dst"], "0.0.0.0/0");
    }

    #[test]
    fn older_versions_get_their_own_shape() {
        let prev: CniResult = serde_json::from_value(rich()).unwrap();
        let v10 = serde_json::to_value(prev.clone().merge(ours()).for_version("1.0.0")).unwrap();
        assert_eq!(
            v10["interfaces"][0],
            serde_json::json!({ "name": "net0", "mac": "02:00:00:00:00:01", "sandbox": "/run/netns/p", "x-iface": 1 })
        );
        assert_eq!(
            v10["routes"][0],
            serde_json::json!({ "dst": "198.51.100.0/24", "gw": "192.0.2.1", "x-route": [1, 2] })
        );
        assert!(v10["ips"][0].get("version").is_none());
        assert_eq!(v10["ips"][0]["gateway"], "192.0.2.1");
        let v04 = serde_json::to_value(prev.merge(ours()).for_version("0.4.0")).unwrap();
        assert_eq!(v04["ips"][0]["version"], "4");
        assert_eq!(v04["cniVersion"], "0.4.0");
    }

    #[test]
    fn version_specific_fields() {
        let v04 = serde_json::to_value(ours().for_version("0.4.0")).unwrap();
        assert_eq!(v04["ips"][0]["version"], "4");
        assert!(v04["interfaces"][0].get("mtu").is_none());
        let v11 = serde_json::to_value(ours().for_version("1.1.0")).unwrap();
        assert!(v11["ips"][0].get("version").is_none());
        assert_eq!(v11["interfaces"][1]["mtu"], 1450);
        assert_eq!(v11["cniVersion"], "1.1.0");
    }
}
