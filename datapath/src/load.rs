//! Loading the eBPF object: its load-time configuration, its programs through the verifier, its
//! maps pinned (or reused) in bpffs, and the reader of its log records.

use std::net::Ipv4Addr;

use aya::{
    programs::{Program, SchedClassifier, Xdp},
    Ebpf, EbpfLoader,
};
use aya_log::EbpfLogger;
use podwire_core::{
    object::{maps, programs},
    pins::Pins,
};

use crate::maps::{Counters, DatapathMap as _, Endpoints, MapError, NodeTable};

/// Reader of the programs' log records, forwarding them to the `log` facade.
pub type Logger = EbpfLogger<&'static dyn log::Log>;

/// Errors of loading the datapath.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The binary was built without the object (`cargo build` instead of `cargo xtask build`).
    #[error(
        "this binary was built without podwire's eBPF object: build it with `cargo xtask build`"
    )]
    NoObject,
    /// The object could not be parsed or its maps created or pinned.
    #[error("loading the eBPF object")]
    Object(#[source] Box<aya::EbpfError>),
    /// The object lacks a program this build expects: binary and object are out of step.
    #[error("the eBPF object has no program named {0} of the type this build expects")]
    NoProgram(&'static str),
    /// The verifier rejected a program; the source holds the verifier log.
    #[error("program {program}: loading (verifier)")]
    Verifier {
        program: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    /// The pin directories could not be prepared.
    #[error("preparing the bpffs pin directories")]
    Bpffs(#[from] crate::bpffs::BpffsError),
    /// A map of the object is missing or of another layout.
    #[error(transparent)]
    Map(#[from] MapError),
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

/// The VXLAN tunnel the programs send remote traffic into and accept from, fixed at load time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tunnel {
    /// ifindex of the collect_md VXLAN device.
    pub vxlan_ifindex: u32,
    /// VXLAN network identifier.
    pub vni: u32,
    /// UDP port of the tunnel.
    pub port: u16,
    /// This node's underlay address, the tunnel's end here.
    pub node_address: Ipv4Addr,
}

/// How to load the object.
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions<'a> {
    /// Which of the programs' log statements to keep.
    pub log_level: LogLevel,
    /// Where to pin the maps (reusing those already pinned there), so endpoints and counters
    /// survive agent restarts; unpinned without.
    pub pins: Option<&'a Pins>,
    /// The tunnel for other nodes' pods; without one their traffic goes up the host stack.
    pub tunnel: Option<Tunnel>,
    /// Also load the programs only BPF_PROG_TEST_RUN runs ([`programs::TEST_RUN`]).
    pub test_run: bool,
}

impl Default for LoadOptions<'_> {
    fn default() -> Self {
        LoadOptions {
            log_level: LogLevel::Off,
            pins: None,
            tunnel: None,
            test_run: false,
        }
    }
}

/// The loaded datapath: its programs (verified, not yet attached) and its maps, typed.
pub struct Datapath {
    pub(crate) ebpf: Ebpf,
    /// Must outlive the programs' load: it owns the log map they reference.
    logger: Option<Logger>,
    /// Attachments made by [`Datapath::attach`]; dropping them detaches.
    pub(crate) links: Vec<aya::programs::tc::SchedClassifierLink>,
    /// Pods on this node.
    pub endpoints: Endpoints,
    /// Which node owns each pod CIDR.
    pub nodes: NodeTable,
    /// Verdicts per reason.
    pub counters: Counters,
}

impl Datapath {
    /// Loads `object` and every program in it (the verifier runs here). An empty `object` is the
    /// stub of a binary built without it.
    pub fn load(object: &[u8], options: LoadOptions<'_>) -> Result<Datapath, LoadError> {
        if object.is_empty() {
            return Err(LoadError::NoObject);
        }
        let level = options.log_level as u8;
        let tunnel = options.tunnel.unwrap_or(Tunnel {
            vxlan_ifindex: 0,
            vni: 1,
            port: 4789,
            node_address: Ipv4Addr::UNSPECIFIED,
        });
        // As packets carry them.
        let port = tunnel.port.to_be();
        let node_address = tunnel.node_address.octets();
        let mut loader = EbpfLoader::new();
        loader
            .override_global(aya_log::LEVEL, &level, true)
            .override_global("VXLAN_IFINDEX", &tunnel.vxlan_ifindex, true)
            .override_global("VNI", &tunnel.vni, true)
            .override_global("VXLAN_PORT", &port, true)
            .override_global("NODE_ADDR", &node_address, true);
        if let Some(pins) = options.pins {
            crate::bpffs::prepare(pins)?;
            for name in maps::PINNED {
                loader.map_pin_path(name, pins.map(name));
            }
        }
        let mut ebpf = loader
            .load(object)
            .map_err(|e| LoadError::Object(e.into()))?;
        let logger = match options.log_level {
            LogLevel::Off => None,
            _ => Some(EbpfLogger::init(&mut ebpf)?),
        };
        let test_run = options.test_run.then_some(programs::TEST_RUN);
        for name in programs::ALL
            .into_iter()
            .chain(test_run.into_iter().flatten())
        {
            let loaded = match ebpf.program_mut(name) {
                Some(Program::SchedClassifier(p)) => p.load(),
                Some(Program::Xdp(p)) => p.load(),
                _ => return Err(LoadError::NoProgram(name)),
            };
            loaded.map_err(|source| LoadError::Verifier {
                program: name,
                source: source.into(),
            })?;
        }
        Ok(Datapath {
            endpoints: Endpoints::take(&mut ebpf)?,
            nodes: NodeTable::take(&mut ebpf)?,
            counters: Counters::take(&mut ebpf)?,
            ebpf,
            logger,
            links: Vec::new(),
        })
    }

    /// Hands out the log reader, to be polled for records (see aya_log::EbpfLogger::flush).
    pub fn take_logger(&mut self) -> Option<Logger> {
        self.logger.take()
    }

    /// The tc program named `name` (one of [`programs::ALL`], or of [`programs::TEST_RUN`]
    /// when loaded for test runs), to attach or to test-run.
    pub fn program(&mut self, name: &'static str) -> Result<&mut SchedClassifier, LoadError> {
        self.ebpf
            .program_mut(name)
            .and_then(|p| p.try_into().ok())
            .ok_or(LoadError::NoProgram(name))
    }

    /// The XDP program [`programs::FROM_NETDEV`], to attach or to test-run.
    pub fn from_netdev(&mut self) -> Result<&mut Xdp, LoadError> {
        self.ebpf
            .program_mut(programs::FROM_NETDEV)
            .and_then(|p| p.try_into().ok())
            .ok_or(LoadError::NoProgram(programs::FROM_NETDEV))
    }
}
