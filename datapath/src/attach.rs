//! Attaching the loaded programs: tc hooks for as long as the [`Datapath`] lives (a developer's
//! interface), or for good through a link pinned in bpffs (pods and the overlay device), which a
//! restarted agent swaps its own program into; and XDP on the underlay interface, pinned alike.

use std::{io, path::Path};

use aya::{
    programs::{
        links::{FdLink, LinkError, PinnedLink},
        tc::{self, SchedClassifierLink},
        xdp::{XdpLink, XdpMode},
        ProgramError, TcAttachType,
    },
    util::KernelVersion,
};
use podwire_core::{object::programs, pins::Pins};

use crate::load::Datapath;

/// Errors of attaching and detaching programs.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The object lacks the program: binary and object are out of step.
    #[error("the eBPF object has no tc program named {0}")]
    NoProgram(&'static str),
    /// The clsact qdisc that netlink tc attachment needs (kernels before 6.6) could not be added.
    #[error("adding the clsact qdisc to {iface}")]
    Qdisc {
        iface: String,
        #[source]
        source: Box<tc::TcError>,
    },
    /// The kernel refused the attachment (e.g. no such interface).
    #[error("program {program}: attaching to tc {direction:?} of {iface}")]
    Attach {
        program: &'static str,
        iface: String,
        direction: TcAttachType,
        #[source]
        source: Box<ProgramError>,
    },
    /// The kernel refused `from_netdev` on the underlay interface, native and generic.
    #[error("program from_netdev: attaching XDP to {iface}")]
    Xdp {
        iface: String,
        #[source]
        source: Box<ProgramError>,
    },
    /// The program could not be swapped into the link pinned for its hook.
    #[error("program {program}: replacing the program of the link pinned at {path}")]
    Replace {
        program: &'static str,
        path: String,
        #[source]
        source: Box<ProgramError>,
    },
    /// A link could not be pinned, opened from its pin, or unpinned.
    #[error("pinned link {path}")]
    Pin {
        path: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
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

    /// `to_pod` at egress of a pod's host-side veth.
    pub fn to_pod(iface: &'a str) -> Hook<'a> {
        Hook {
            program: programs::TO_POD,
            iface,
            direction: TcAttachType::Egress,
        }
    }

    /// Both hooks of a pod's host-side veth: `from_pod` and `to_pod`.
    pub fn pod(iface: &'a str) -> [Hook<'a>; 2] {
        [Self::from_pod(iface), Self::to_pod(iface)]
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

    /// Where the link of this hook is pinned below `pins`.
    pub fn pin(&self, pins: &Pins) -> std::path::PathBuf {
        pins.link(self.program, self.iface)
    }
}

/// Whether this kernel has TCX links (6.6, commit e420bed02507); before it aya attaches through
/// netlink tc, which needs a clsact qdisc and has no links to pin.
pub fn tcx_supported() -> bool {
    KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0))
}

impl Datapath {
    /// Attaches `hook` until this Datapath drops.
    pub fn attach(&mut self, hook: Hook<'_>) -> Result<(), AttachError> {
        let link = self.attach_link(hook)?;
        self.links.push(link);
        Ok(())
    }

    /// Attaches `hook` for good: the link is pinned at `pin`, so it stays attached when the agent
    /// exits, until the pin is removed or the interface deleted. A link already pinned there gets
    /// this program atomically instead of its old one (agent upgrade).
    ///
    /// Kernels before 6.6 have no tc links to pin: the netlink filter simply stays (it holds the
    /// program), and an existing one is replaced by detaching and attaching again.
    pub fn attach_pinned(&mut self, hook: Hook<'_>, pin: &Path) -> Result<(), AttachError> {
        if !tcx_supported() {
            // Ignoring NotFound: there was no filter to replace.
            let _ = tc::qdisc_detach_program(hook.iface, hook.direction, hook.program);
            std::mem::forget(self.attach_link(hook)?);
            return Ok(());
        }
        match open_pinned::<SchedClassifierLink>(pin)? {
            Some(link) => {
                let program = self.classifier(hook.program)?;
                let id = program
                    .attach_to_link(link)
                    .map_err(|source| replace_error(hook.program, pin, source))?;
                // Closing our descriptor leaves the pinned link attached.
                drop(program.take_link(id));
            }
            None => pin_link(self.attach_link(hook)?, pin)?,
        }
        Ok(())
    }

    /// Removes the link pinned at `pin`, detaching its program (no-op when there is none).
    pub fn detach_pinned(pin: &Path) -> Result<(), AttachError> {
        match std::fs::remove_file(pin) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(pin_error(pin, e)),
            _ => Ok(()),
        }
    }

    /// Attaches `from_netdev` (XDP) to `iface` for good, its link pinned at `pin`, in `mode`; with
    /// `XdpMode::Default`, in the driver where it runs XDP (native), else in the stack (generic).
    /// A link already pinned there gets this program atomically instead of its old one (agent
    /// upgrade), keeping its mode. Returns the mode it runs in, `None` when it replaced a pinned
    /// link's program.
    pub fn attach_from_netdev(
        &mut self,
        iface: &str,
        pin: &Path,
        mode: XdpMode,
    ) -> Result<Option<XdpMode>, AttachError> {
        let program = self
            .from_netdev()
            .map_err(|_| AttachError::NoProgram(programs::FROM_NETDEV))?;
        if let Some(link) = open_pinned::<XdpLink>(pin)? {
            let id = program
                .attach_to_link(link)
                .map_err(|source| replace_error(programs::FROM_NETDEV, pin, source))?;
            // Closing our descriptor leaves the pinned link attached.
            drop(program.take_link(id));
            return Ok(None);
        }
        let attach_err = |source: ProgramError| AttachError::Xdp {
            iface: iface.into(),
            source: source.into(),
        };
        let (id, mode) = match mode {
            XdpMode::Default => match program.attach(iface, XdpMode::Driver) {
                Ok(id) => (id, XdpMode::Driver),
                // The driver has no XDP of its own (or refuses this program): the stack runs it.
                Err(_) => (
                    program.attach(iface, XdpMode::Skb).map_err(attach_err)?,
                    XdpMode::Skb,
                ),
            },
            mode => (program.attach(iface, mode).map_err(attach_err)?, mode),
        };
        pin_link(program.take_link(id).map_err(attach_err)?, pin)?;
        Ok(Some(mode))
    }

    fn attach_link(&mut self, hook: Hook<'_>) -> Result<SchedClassifierLink, AttachError> {
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
                    return Err(AttachError::Qdisc {
                        iface: iface.into(),
                        source: source.into(),
                    })
                }
            }
        }
        let program = self.classifier(name)?;
        let attach_err = |source: ProgramError| AttachError::Attach {
            program: name,
            iface: iface.into(),
            direction,
            source: source.into(),
        };
        let id = program.attach(iface, direction).map_err(attach_err)?;
        program.take_link(id).map_err(attach_err)
    }

    fn classifier(
        &mut self,
        name: &'static str,
    ) -> Result<&mut aya::programs::SchedClassifier, AttachError> {
        self.program(name).map_err(|_| AttachError::NoProgram(name))
    }
}

/// The link pinned at `pin` as a link of type `L`; `None` when nothing is pinned there.
fn open_pinned<L>(pin: &Path) -> Result<Option<L>, AttachError>
where
    L: TryFrom<FdLink, Error = LinkError>,
{
    let Ok(pinned) = PinnedLink::from_pin(pin) else {
        return Ok(None);
    };
    L::try_from(FdLink::from(pinned))
        .map(Some)
        .map_err(|e| pin_error(pin, e))
}

/// Pins `link` at `pin`, where it outlives this process.
fn pin_link<L>(link: L, pin: &Path) -> Result<(), AttachError>
where
    FdLink: TryFrom<L, Error = LinkError>,
{
    let fd_link = FdLink::try_from(link).map_err(|e| pin_error(pin, e))?;
    fd_link.pin(pin).map_err(|e| pin_error(pin, e))?;
    Ok(())
}

fn pin_error(
    pin: &Path,
    source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
) -> AttachError {
    AttachError::Pin {
        path: pin.display().to_string(),
        source: source.into(),
    }
}

fn replace_error(program: &'static str, pin: &Path, source: ProgramError) -> AttachError {
    AttachError::Replace {
        program,
        path: pin.display().to_string(),
        source: source.into(),
    }
}
