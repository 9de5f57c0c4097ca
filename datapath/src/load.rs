//! Loading the eBPF object: its load-time configuration, its programs through the verifier, its
//! maps pinned (or reused) in bpffs, and the reader of its log records.
//!
//! A pinned map is reused only when the kernel's record of it (type, key and value sizes,
//! capacity, flags) is what the object defines: aya would reopen any map pinned under the name.
//! A layout change comes with a new version suffix on the map's name, so an upgraded agent
//! creates the new map, and the pins of versions the object no longer uses are removed (the
//! programs still attached keep their maps until they are swapped).

use std::{
    fmt, io,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use aya::{
    programs::{Program, SchedClassifier, Xdp},
    Ebpf, EbpfLoader,
};
use aya_log::EbpfLogger;
use podwire_common::CrossNode;
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
    /// The object's ELF could not be parsed for its map definitions.
    #[error("parsing the eBPF object's map definitions")]
    Parse(#[source] Box<aya_obj::ParseError>),
    /// A map pinned under one of the object's map names has another layout: reusing it would
    /// misread its entries, or ignore a new capacity.
    #[error(
        "map {name} pinned at {path} is {pinned}, but this podwire's object defines it as \
         {object}: it was pinned by an incompatible podwire build (a map's layout changes only \
         with a new version suffix on its name). Remove the pin (rm {path}) and restart the \
         agent, which creates the map afresh and refills it; programs still attached keep the \
         old map until they are swapped"
    )]
    IncompatiblePin {
        name: &'static str,
        path: PathBuf,
        pinned: MapLayout,
        object: MapLayout,
    },
    /// A pin in the maps directory could not be read as a map, or removed.
    #[error("pinned map {path}")]
    Pin {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
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

/// How the programs carry other nodes' pods' packets across the underlay, fixed at load time
/// next to the [`Tunnel`] (which the modes but native use, and native keeps for nodes still
/// tunnelling).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Crossing {
    pub mode: CrossNode,
    /// ifindex of the underlay interface, where the programs' tunnel and native routing leave.
    pub underlay_ifindex: u32,
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
        Self::load_crossing(object, options, None)
    }

    /// [`Datapath::load`] with the programs crossing the underlay as `crossing` says; `None` is
    /// the VXLAN device (or, without a tunnel, the host stack).
    pub fn load_crossing(
        object: &[u8],
        options: LoadOptions<'_>,
        crossing: Option<Crossing>,
    ) -> Result<Datapath, LoadError> {
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
        let (mode, underlay_ifindex) = match crossing {
            Some(c) => (c.mode as u32, c.underlay_ifindex),
            None => (CrossNode::TunnelDevice as u32, 0),
        };
        loader
            .override_global("CROSS_NODE", &mode, true)
            .override_global("UNDERLAY_IFINDEX", &underlay_ifindex, true);
        if let Some(pins) = options.pins {
            crate::bpffs::prepare(pins)?;
            check_pinned_layouts(object, pins)?;
            remove_unused_pins(pins)?;
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

/// A map's layout, as the kernel records it and as the object defines it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapLayout {
    /// `bpf_map_type`.
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

impl fmt::Display for MapLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match aya_obj::generated::bpf_map_type::try_from(self.map_type) {
            Ok(t) => write!(f, "{t:?}")?,
            Err(_) => write!(f, "map type {}", self.map_type)?,
        }
        write!(
            f,
            ", key {} B, value {} B, {} entries, flags {:#x}",
            self.key_size, self.value_size, self.max_entries, self.flags
        )
    }
}

impl MapLayout {
    /// The layout of the map pinned at `path`.
    fn of_pin(path: &Path) -> Result<MapLayout, LoadError> {
        let info = aya::maps::MapInfo::from_pin(path).map_err(|e| LoadError::Pin {
            path: path.to_path_buf(),
            source: e.into(),
        })?;
        Ok(MapLayout {
            map_type: info.map_type().map_err(|e| LoadError::Pin {
                path: path.to_path_buf(),
                source: e.into(),
            })? as u32,
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
            flags: info.map_flags(),
        })
    }

    /// The layout aya creates `map` with: a ring buffer's size rounded up to a power-of-two
    /// multiple of the page size, with no key or value.
    fn of_definition(map: &aya_obj::Map, page_size: u32) -> MapLayout {
        let mut layout = MapLayout {
            map_type: map.map_type(),
            key_size: map.key_size(),
            value_size: map.value_size(),
            max_entries: map.max_entries(),
            flags: map.map_flags(),
        };
        if layout.map_type == aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_RINGBUF as u32 {
            layout.max_entries = layout.max_entries.next_power_of_two().max(page_size);
            layout.key_size = 0;
            layout.value_size = 0;
        }
        layout
    }
}

/// Refuses to load over a map pinned under one of the object's names with another layout.
fn check_pinned_layouts(object: &[u8], pins: &Pins) -> Result<(), LoadError> {
    let parsed = aya_obj::Object::parse(object).map_err(|e| LoadError::Parse(e.into()))?;
    // SAFETY: sysconf has no preconditions.
    let page_size = u32::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    for name in maps::PINNED {
        let path = pins.map(name);
        if !path.exists() {
            continue;
        }
        let definition = parsed
            .maps
            .get(name)
            .ok_or(LoadError::Map(MapError::NotInObject { name, source: None }))?;
        let object = MapLayout::of_definition(definition, page_size);
        let pinned = MapLayout::of_pin(&path)?;
        if pinned != object {
            return Err(LoadError::IncompatiblePin {
                name,
                path,
                pinned,
                object,
            });
        }
    }
    Ok(())
}

/// Removes the pins in the maps directory that the object does not use: earlier versions of its
/// maps (`ENDPOINTS_V1` once `ENDPOINTS_V2` replaced it), maps it dropped. Programs attached
/// with them keep them until this agent swaps its own in.
fn remove_unused_pins(pins: &Pins) -> Result<(), LoadError> {
    let dir = pins.maps_dir();
    let pin_error = |path: &Path| {
        let path = path.to_path_buf();
        move |e: io::Error| LoadError::Pin {
            path,
            source: e.into(),
        }
    };
    for entry in std::fs::read_dir(&dir).map_err(pin_error(&dir))? {
        let entry = entry.map_err(pin_error(&dir))?;
        let name = entry.file_name();
        if maps::PINNED.iter().any(|used| name == **used) {
            continue;
        }
        let path = entry.path();
        log::info!(
            "removing the pinned map {}: this podwire's object does not use it (an earlier \
             version's)",
            path.display()
        );
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(pin_error(&path)(e)),
            _ => {}
        }
    }
    Ok(())
}
