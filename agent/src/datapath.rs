//! The eBPF datapath: the embedded object, loading it, attaching its programs, reading counters.

use std::{io, net::Ipv4Addr, path::Path};

use aya::{
    maps::{
        lpm_trie::{Key as LpmKey, LpmTrie},
        HashMap, Map, MapData, PerCpuArray,
    },
    programs::{
        links::{FdLink, PinnedLink},
        tc::{self, SchedClassifierLink},
        SchedClassifier, TcAttachType,
    },
    util::KernelVersion,
    Ebpf, EbpfLoader,
};
use aya_log::EbpfLogger;

/// Reader of the programs' log records, forwarding them to the `log` facade.
pub type Logger = EbpfLogger<&'static dyn log::Log>;
use ipnet::Ipv4Net;
use podwire_common::{Counter, Endpoint, EndpointKey, NodeEntry, Reason};

use crate::pins::Pins;

/// The compiled kernel programs, built by `cargo xtask build` and embedded at compile time.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("PODWIRE_EBPF_OBJECT"));

/// Names of the programs in [`OBJECT`].
pub mod programs {
    /// tc ingress of a pod's host-side veth: everything the pod sends.
    pub const FROM_POD: &str = "from_pod";
    /// tc ingress of the VXLAN device: what other nodes tunnelled here.
    pub const FROM_OVERLAY: &str = "from_overlay";
    /// tc egress of the VXLAN device: what goes into the tunnel.
    pub const TO_OVERLAY: &str = "to_overlay";
    /// Every program, in load order.
    pub const ALL: [&str; 3] = [FROM_POD, FROM_OVERLAY, TO_OVERLAY];
}

/// Names of the maps in [`OBJECT`].
pub mod maps {
    /// Per-CPU packet and byte counts per verdict reason.
    pub const COUNTERS: &str = "COUNTERS";
    /// Pods on this node by IPv4 address.
    pub const ENDPOINTS: &str = "ENDPOINTS_V1";
    /// Pod CIDRs and underlay addresses to the node owning them (LPM trie).
    pub const NODES: &str = "NODES_V1";
    /// Ring of dropped packets (read by `podwire events`, not by the agent).
    pub const EVENTS: &str = "EVENTS_V1";
    /// The maps pinned in bpffs so they outlive the agent.
    pub const PINNED: [&str; 4] = [COUNTERS, ENDPOINTS, NODES, EVENTS];
}

/// The VXLAN tunnel the programs send remote traffic into, fixed at load time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Overlay {
    /// ifindex of the collect_md VXLAN device.
    pub ifindex: u32,
    /// VXLAN network identifier.
    pub vni: u32,
}

/// A tc hook: program, interface and direction.
#[derive(Clone, Copy, Debug)]
pub struct Hook<'a> {
    pub program: &'static str,
    pub iface: &'a str,
    pub direction: TcAttachType,
}

impl<'a> Hook<'a> {
    /// `from_pod` at ingress of a pod's host-side veth.
    pub fn from_pod(iface: &'a str) -> Hook<'a> {
        Hook {
            program: programs::FROM_POD,
            iface,
            direction: TcAttachType::Ingress,
        }
    }

    /// `from_overlay` at ingress and `to_overlay` at egress of the VXLAN device.
    pub fn overlay(iface: &'a str) -> [Hook<'a>; 2] {
        [
            Hook {
                program: programs::FROM_OVERLAY,
                iface,
                direction: TcAttachType::Ingress,
            },
            Hook {
                program: programs::TO_OVERLAY,
                iface,
                direction: TcAttachType::Egress,
            },
        ]
    }
}

/// Errors of loading, attaching and reading the datapath.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// The object could not be parsed or its maps created.
    #[error("loading the eBPF object")]
    Load(#[from] aya::EbpfError),
    /// The object lacks a program or map this agent expects: agent and object are out of step.
    #[error("the eBPF object has no {kind} named {name}")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    /// The verifier rejected a program, or it could not be attached; the source holds the
    /// verifier log when there is one.
    #[error("program {program}: {action}")]
    Program {
        program: &'static str,
        action: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    /// The clsact qdisc that netlink tc attachment needs (kernels before 6.6) could not be added.
    #[error("adding the clsact qdisc to {iface}")]
    Qdisc {
        iface: String,
        #[source]
        source: tc::TcError,
    },
    /// A map could not be opened, read or written.
    #[error("map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    /// A link could not be pinned, opened from its pin, or unpinned.
    #[error("pinned link {path}")]
    Pin {
        path: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The log ring buffer could not be set up.
    #[error("setting up the eBPF log reader")]
    Log(#[from] aya_log::Error),
}

/// Severity of eBPF log statements to keep; the rest are removed by the verifier at load time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum LogLevel {
    Off = 0,
    Error = 1,
    Warn = 2,
    Info = 3,
    Debug = 4,
    Trace = 5,
}

impl LogLevel {
    /// The most verbose level `filter` (a tracing `EnvFilter` directive such as "info" or
    /// "podwire=debug") enables anywhere.
    pub fn from_filter(filter: &str) -> LogLevel {
        filter
            .split(',')
            .filter_map(|directive| {
                let level = directive.rsplit('=').next().unwrap_or(directive);
                match level.trim().to_ascii_lowercase().as_str() {
                    "off" => Some(LogLevel::Off),
                    "error" => Some(LogLevel::Error),
                    "warn" => Some(LogLevel::Warn),
                    "info" => Some(LogLevel::Info),
                    "debug" => Some(LogLevel::Debug),
                    "trace" => Some(LogLevel::Trace),
                    _ => None,
                }
            })
            .max()
            .unwrap_or(LogLevel::Info)
    }
}

/// Whether this kernel has TCX links (6.6, commit e420bed02507); before it aya attaches through
/// netlink tc, which needs a clsact qdisc and has no links to pin.
pub fn tcx_supported() -> bool {
    KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0))
}

/// The loaded (not yet attached) datapath.
pub struct Datapath {
    ebpf: Ebpf,
    /// Must outlive the programs' load: it owns the log map they reference.
    logger: Option<Logger>,
    /// Attachments made by [`Datapath::attach_from_pod`]; dropping them detaches.
    links: Vec<SchedClassifierLink>,
}

impl Datapath {
    /// Loads [`OBJECT`] and every program in it (the verifier runs here).
    /// With `pins`, the maps are pinned there (and reused if already pinned), so endpoints and
    /// counters survive agent restarts.
    /// With `overlay`, traffic for other nodes' pods goes into that tunnel; without, it goes up
    /// the host stack.
    pub fn load(
        log_level: LogLevel,
        pins: Option<&Pins>,
        overlay: Option<Overlay>,
    ) -> Result<Datapath, DatapathError> {
        let level = log_level as u8;
        let (ifindex, vni) = overlay.map_or((0, 1), |o| (o.ifindex, o.vni));
        let mut loader = EbpfLoader::new();
        loader
            .override_global(aya_log::LEVEL, &level, true)
            .override_global("VXLAN_IFINDEX", &ifindex, true)
            .override_global("VNI", &vni, true);
        if let Some(pins) = pins {
            for name in maps::PINNED {
                loader.map_pin_path(name, pins.map(name));
            }
        }
        let mut ebpf = loader.load(OBJECT)?;
        let logger = match log_level {
            LogLevel::Off => None,
            _ => Some(EbpfLogger::init(&mut ebpf)?),
        };
        let mut datapath = Datapath {
            ebpf,
            logger,
            links: Vec::new(),
        };
        for name in programs::ALL {
            datapath
                .classifier(name)?
                .load()
                .map_err(|source| DatapathError::Program {
                    program: name,
                    action: "loading (verifier)".into(),
                    source,
                })?;
        }
        Ok(datapath)
    }

    /// Hands out the log reader, to be polled for records (see aya_log::EbpfLogger::flush).
    pub fn take_logger(&mut self) -> Option<Logger> {
        self.logger.take()
    }

    /// Attaches `from_pod` to tc ingress of `iface`. It stays attached until this Datapath drops.
    pub fn attach_from_pod(&mut self, iface: &str) -> Result<(), DatapathError> {
        let link = self.attach_link(Hook::from_pod(iface))?;
        self.links.push(link);
        Ok(())
    }

    /// Attaches `hook` for good: the link is pinned at `pin`, so it stays attached when the agent
    /// exits, until the pin is removed or the interface deleted. A link already pinned there gets
    /// this program atomically instead of its old one (agent upgrade).
    ///
    /// Kernels before 6.6 have no tc links to pin: the netlink filter simply stays (it holds the
    /// program), and an existing one is replaced by detaching and attaching again.
    pub fn attach_pinned(&mut self, hook: Hook<'_>, pin: &Path) -> Result<(), DatapathError> {
        let pin_err = |source: Box<dyn std::error::Error + Send + Sync>| DatapathError::Pin {
            path: pin.display().to_string(),
            source,
        };
        if !tcx_supported() {
            // Ignoring NotFound: there was no filter to replace.
            let _ = tc::qdisc_detach_program(hook.iface, hook.direction, hook.program);
            std::mem::forget(self.attach_link(hook)?);
            return Ok(());
        }
        match PinnedLink::from_pin(pin) {
            Ok(pinned) => {
                let link = SchedClassifierLink::try_from(FdLink::from(pinned))
                    .map_err(|e| pin_err(e.into()))?;
                let program = self.classifier(hook.program)?;
                let id = program
                    .attach_to_link(link)
                    .map_err(|source| DatapathError::Program {
                        program: hook.program,
                        action: format!(
                            "replacing the program of the link pinned at {}",
                            pin.display()
                        ),
                        source,
                    })?;
                // Closing our descriptor leaves the pinned link attached.
                drop(program.take_link(id));
            }
            Err(_) => {
                let link = self.attach_link(hook)?;
                let fd_link = FdLink::try_from(link).map_err(|e| pin_err(e.into()))?;
                fd_link.pin(pin).map_err(|e| pin_err(e.into()))?;
            }
        }
        Ok(())
    }

    /// Removes the link pinned at `pin`, detaching `from_pod` (no-op when there is none).
    pub fn detach_pinned(pin: &Path) -> Result<(), DatapathError> {
        match std::fs::remove_file(pin) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(DatapathError::Pin {
                path: pin.display().to_string(),
                source: e.into(),
            }),
            _ => Ok(()),
        }
    }

    fn attach_link(&mut self, hook: Hook<'_>) -> Result<SchedClassifierLink, DatapathError> {
        let Hook {
            program: name,
            iface,
            direction,
        } = hook;
        if !tcx_supported() {
            match tc::qdisc_add_clsact(iface) {
                Ok(()) => {}
                Err(tc::TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(source) => {
                    return Err(DatapathError::Qdisc {
                        iface: iface.into(),
                        source,
                    })
                }
            }
        }
        let program = self.classifier(name)?;
        let program_err = |source| DatapathError::Program {
            program: name,
            action: format!("attaching to tc {direction:?} of {iface}"),
            source,
        };
        let id = program.attach(iface, direction).map_err(program_err)?;
        program.take_link(id).map_err(program_err)
    }

    /// The map `name` as `M` (a typed aya map borrowing it).
    fn typed_map<'a, M>(&'a mut self, name: &'static str) -> Result<M, DatapathError>
    where
        M: TryFrom<&'a mut Map, Error = aya::maps::MapError>,
    {
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(DatapathError::Missing { kind: "map", name })?;
        M::try_from(map).map_err(|source| DatapathError::Map { name, source })
    }

    fn nodes_map(&mut self) -> Result<LpmTrie<&mut MapData, [u8; 4], NodeEntry>, DatapathError> {
        self.typed_map(maps::NODES)
    }

    /// Every entry of the node table.
    pub fn nodes(&mut self) -> Result<Vec<(Ipv4Net, NodeEntry)>, DatapathError> {
        self.nodes_map()?
            .iter()
            .map(|entry| {
                entry
                    .map(|(key, node)| {
                        let net = Ipv4Net::new(Ipv4Addr::from(key.data()), key.prefix_len() as u8)
                            .expect("the kernel keeps prefixes within 32 bits");
                        (net, node)
                    })
                    .map_err(|source| DatapathError::Map {
                        name: maps::NODES,
                        source,
                    })
            })
            .collect()
    }

    /// Writes (or replaces) the node table entry of `net`.
    pub fn set_node(&mut self, net: Ipv4Net, node: NodeEntry) -> Result<(), DatapathError> {
        let key = LpmKey::new(u32::from(net.prefix_len()), net.network().octets());
        self.nodes_map()?
            .insert(&key, node, 0)
            .map_err(|source| DatapathError::Map {
                name: maps::NODES,
                source,
            })
    }

    /// Removes the node table entry of `net`, if there is one.
    pub fn remove_node(&mut self, net: Ipv4Net) -> Result<(), DatapathError> {
        let key = LpmKey::new(u32::from(net.prefix_len()), net.network().octets());
        match self.nodes_map()?.remove(&key) {
            Err(aya::maps::MapError::KeyNotFound) | Ok(()) => Ok(()),
            Err(source) => Err(DatapathError::Map {
                name: maps::NODES,
                source,
            }),
        }
    }

    fn endpoints_map(
        &mut self,
    ) -> Result<HashMap<&mut MapData, EndpointKey, Endpoint>, DatapathError> {
        self.typed_map(maps::ENDPOINTS)
    }

    /// Writes (or replaces) the endpoint of `ip`.
    pub fn set_endpoint(&mut self, ip: Ipv4Addr, endpoint: Endpoint) -> Result<(), DatapathError> {
        self.endpoints_map()?
            .insert(ip.octets(), endpoint, 0)
            .map_err(|source| DatapathError::Map {
                name: maps::ENDPOINTS,
                source,
            })
    }

    /// Removes the endpoint of `ip`, if there is one.
    pub fn remove_endpoint(&mut self, ip: Ipv4Addr) -> Result<(), DatapathError> {
        match self.endpoints_map()?.remove(&ip.octets()) {
            Err(aya::maps::MapError::KeyNotFound) | Ok(()) => Ok(()),
            Err(source) => Err(DatapathError::Map {
                name: maps::ENDPOINTS,
                source,
            }),
        }
    }

    /// The endpoint of `ip`, if the map has one.
    pub fn endpoint(&mut self, ip: Ipv4Addr) -> Result<Option<Endpoint>, DatapathError> {
        match self.endpoints_map()?.get(&ip.octets(), 0) {
            Ok(endpoint) => Ok(Some(endpoint)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(DatapathError::Map {
                name: maps::ENDPOINTS,
                source,
            }),
        }
    }

    /// Every endpoint in the map.
    pub fn endpoints(&mut self) -> Result<Vec<(Ipv4Addr, Endpoint)>, DatapathError> {
        self.endpoints_map()?
            .iter()
            .map(|entry| {
                entry
                    .map(|(key, ep)| (Ipv4Addr::from(key), ep))
                    .map_err(|source| DatapathError::Map {
                        name: maps::ENDPOINTS,
                        source,
                    })
            })
            .collect()
    }

    /// The program named `name`, which must be a tc classifier.
    pub fn classifier(
        &mut self,
        name: &'static str,
    ) -> Result<&mut SchedClassifier, DatapathError> {
        self.ebpf
            .program_mut(name)
            .and_then(|p| p.try_into().ok())
            .ok_or(DatapathError::Missing {
                kind: "tc program",
                name,
            })
    }

    /// Counters summed over CPUs, one row per known reason.
    pub fn counters(&self) -> Result<Vec<(Reason, Counter)>, DatapathError> {
        let map = self
            .ebpf
            .map(maps::COUNTERS)
            .ok_or(DatapathError::Missing {
                kind: "map",
                name: maps::COUNTERS,
            })?;
        let map_err = |source| DatapathError::Map {
            name: maps::COUNTERS,
            source,
        };
        let counters: PerCpuArray<_, Counter> = PerCpuArray::try_from(map).map_err(map_err)?;
        Reason::ALL
            .into_iter()
            .map(|reason| {
                let per_cpu = counters.get(&(reason as u32), 0).map_err(map_err)?;
                Ok((reason, per_cpu.iter().copied().sum()))
            })
            .collect()
    }
}
