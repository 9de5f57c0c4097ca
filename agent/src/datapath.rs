//! The eBPF datapath: the embedded object, loading it, attaching its programs, reading counters.

use aya::{
    maps::PerCpuArray,
    programs::{tc, SchedClassifier, TcAttachType},
    util::KernelVersion,
    Ebpf, EbpfLoader,
};
use aya_log::EbpfLogger;

/// Reader of the programs' log records, forwarding them to the `log` facade.
pub type Logger = EbpfLogger<&'static dyn log::Log>;
use podwire_common::{Counter, Reason};

/// The compiled kernel programs, built by `cargo xtask build` and embedded at compile time.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("PODWIRE_EBPF_OBJECT"));

/// Names of the programs in [`OBJECT`].
pub mod programs {
    /// tc ingress of a pod's host-side veth: everything the pod sends.
    pub const FROM_POD: &str = "from_pod";
}

/// Names of the maps in [`OBJECT`].
pub mod maps {
    /// Per-CPU packet and byte counts per verdict reason.
    pub const COUNTERS: &str = "COUNTERS";
}

/// Errors of loading, attaching and reading the datapath.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// The object could not be parsed or its maps created.
    #[error("loading the eBPF object")]
    Load(#[from] aya::EbpfError),
    /// The object lacks a program or map this agent expects: agent and object are out of step.
    #[error("the eBPF object has no {kind} named {name}")]
    Missing { kind: &'static str, name: &'static str },
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
    /// A map could not be opened or read.
    #[error("map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
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

/// The loaded (not yet attached) datapath.
pub struct Datapath {
    ebpf: Ebpf,
    /// Must outlive the programs' load: it owns the log map they reference.
    logger: Option<Logger>,
}

impl Datapath {
    /// Loads [`OBJECT`] and every program in it (the verifier runs here).
    pub fn load(log_level: LogLevel) -> Result<Datapath, DatapathError> {
        Self::load_object(OBJECT, log_level)
    }

    /// Loads an object from bytes: used with [`OBJECT`] except in tests of broken objects.
    pub fn load_object(object: &[u8], log_level: LogLevel) -> Result<Datapath, DatapathError> {
        let level = log_level as u8;
        let mut ebpf = EbpfLoader::new()
            .override_global(aya_log::LEVEL, &level, true)
            .load(object)?;
        let logger = match log_level {
            LogLevel::Off => None,
            _ => Some(EbpfLogger::init(&mut ebpf)?),
        };
        let mut datapath = Datapath { ebpf, logger };
        let program = datapath.classifier(programs::FROM_POD)?;
        program.load().map_err(|source| DatapathError::Program {
            program: programs::FROM_POD,
            action: "loading (verifier)".into(),
            source,
        })?;
        Ok(datapath)
    }

    /// Hands out the log reader, to be polled for records (see aya_log::EbpfLogger::flush).
    pub fn take_logger(&mut self) -> Option<Logger> {
        self.logger.take()
    }

    /// Attaches `from_pod` to tc ingress of `iface`. It stays attached until this Datapath drops.
    pub fn attach_from_pod(&mut self, iface: &str) -> Result<(), DatapathError> {
        // TCX (kernel 6.6, commit e420bed02507) needs no qdisc; aya falls back to netlink tc
        // before that, which needs clsact.
        let tcx = KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0));
        if !tcx {
            match tc::qdisc_add_clsact(iface) {
                Ok(()) => {}
                Err(tc::TcError::NetlinkError(e))
                    if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(source) => return Err(DatapathError::Qdisc { iface: iface.into(), source }),
            }
        }
        self.classifier(programs::FROM_POD)?
            .attach(iface, TcAttachType::Ingress)
            .map_err(|source| DatapathError::Program {
                program: programs::FROM_POD,
                action: format!("attaching to tc ingress of {iface}"),
                source,
            })?;
        Ok(())
    }

    /// The program named `name`, which must be a tc classifier.
    pub fn classifier(&mut self, name: &'static str) -> Result<&mut SchedClassifier, DatapathError> {
        self.ebpf
            .program_mut(name)
            .and_then(|p| p.try_into().ok())
            .ok_or(DatapathError::Missing { kind: "tc program", name })
    }

    /// Counters summed over CPUs, one row per known reason.
    pub fn counters(&self) -> Result<Vec<(Reason, Counter)>, DatapathError> {
        let map = self
            .ebpf
            .map(maps::COUNTERS)
            .ok_or(DatapathError::Missing { kind: "map", name: maps::COUNTERS })?;
        let map_err = |source| DatapathError::Map { name: maps::COUNTERS, source };
        let counters: PerCpuArray<_, Counter> = PerCpuArray::try_from(map).map_err(map_err)?;
        Reason::ALL
            .into_iter()
            .map(|reason| {
                let per_cpu = counters.get(&(reason as u32), 0).map_err(map_err)?;
                let total = per_cpu.iter().fold(Counter::default(), |sum, c| Counter {
                    packets: sum.packets + c.packets,
                    bytes: sum.bytes + c.bytes,
                });
                Ok((reason, total))
            })
            .collect()
    }

}
