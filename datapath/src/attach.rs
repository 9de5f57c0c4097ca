//! Attaching the loaded programs: tc hooks for as long as the [`Datapath`] lives (a developer's
//! interface), or for good through a link pinned in bpffs (pods and the overlay device), which a
//! restarted agent swaps its own program into; and XDP on the underlay interface, pinned alike.
//!
//! A pinned link outlives its device: deleting the device severs the link (its ifindex reads 0
//! and updating it fails with ENOLINK). Such a link is unpinned and the hook attached afresh, and
//! [`remove_severed_links`] unpins every one of them.
//!
//! Kernels before 6.6 have no TCX links: there a program is a netlink tc filter (direct action,
//! on the clsact qdisc) at a fixed priority and handle per hook ([`NL_PRIORITY`],
//! [`NL_HANDLE`]), so a restarted agent finds it and swaps its program in place: the hook is never
//! without a program, as with a TCX link.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
};

use aya::{
    programs::{
        links::{FdLink, Link as _, LinkError, LinkOrder, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
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
    /// A link could not be pinned, opened from its pin, inspected, or unpinned.
    #[error("pinned link {path}")]
    Pin {
        path: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The tc filters of an interface could not be listed (netlink tc, kernels before 6.6).
    #[error("listing the tc filters on {direction:?} of {iface}")]
    Filters {
        iface: String,
        direction: TcAttachType,
        #[source]
        source: io::Error,
    },
    /// One of podwire's netlink tc filters left by an earlier agent could not be removed.
    #[error(
        "removing the tc filter of {program} at priority {priority} on {direction:?} of {iface}"
    )]
    RemoveFilter {
        program: &'static str,
        iface: String,
        direction: TcAttachType,
        priority: u16,
        #[source]
        source: Box<ProgramError>,
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

    /// `from_underlay` at ingress and `to_underlay` at egress of the underlay interface.
    pub fn underlay(iface: &'a str) -> [Hook<'a>; 2] {
        [
            Hook {
                program: programs::FROM_UNDERLAY,
                iface,
                direction: TcAttachType::Ingress,
            },
            Hook {
                program: programs::TO_UNDERLAY,
                iface,
                direction: TcAttachType::Egress,
            },
        ]
    }

    /// Where the link of this hook is pinned below `pins`.
    pub fn pin(&self, pins: &Pins) -> std::path::PathBuf {
        pins.link(self.program, self.iface)
    }

    /// Whether this hook is on a pod's veth, attached once per pod (rather than on one of the
    /// node's devices, attached once per node).
    fn per_pod(&self) -> bool {
        self.program == programs::FROM_POD || self.program == programs::TO_POD
    }

    /// How this process attaches this hook: [`TC_ATTACH_ENV`], else by kernel and kind of hook.
    pub fn mode(&self) -> TcMode {
        let kernel_has_tcx =
            KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0));
        let env = std::env::var(TC_ATTACH_ENV).ok();
        tc_mode_of(env.as_deref(), kernel_has_tcx, self.per_pod()).unwrap_or_else(|other| {
            log::warn!(
                "{TC_ATTACH_ENV}={other:?} is none of netlink, tcx, auto: choosing by kernel"
            );
            tc_mode_of(None, kernel_has_tcx, self.per_pod()).expect("no value is always known")
        })
    }
}

/// The environment variable that chooses how tc programs are attached: `netlink` forces netlink
/// tc filters everywhere (what kernels before 6.6 have; for testing that path on a newer kernel,
/// or to work around a TCX problem), `tcx` forces TCX links everywhere, `auto` (or unset) takes
/// netlink tc filters for pods' veths and TCX for the node's devices where the kernel has it
/// (see [`tc_mode_of`]). An operator knob: every process of a node must see the same value.
pub const TC_ATTACH_ENV: &str = "PODWIRE_TC_ATTACH";

/// Priority of podwire's netlink tc filters: first on the hook, before any other filter.
pub const NL_PRIORITY: u16 = 1;
/// Handle of podwire's netlink tc filters ("pw"), at [`NL_PRIORITY`] on every hook; a restarted
/// agent replaces the program of the filter there.
pub const NL_HANDLE: TcHandle = TcHandle::new(0, 0x7077);

/// How tc programs are attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcMode {
    /// TCX links, pinned in bpffs (kernels from 6.6, commit e420bed02507).
    Tcx,
    /// Netlink tc filters on the clsact qdisc, which hold the program without a pin.
    Netlink,
}

/// The mode [`TC_ATTACH_ENV`] set to `env` chooses on a kernel that has TCX or not, for a hook on
/// a pod's veth (`per_pod`) or on a node's device; `Err` names a value it does not know.
///
/// Left to choose, pods' veths get netlink tc filters even where TCX exists: a TCX attach waits
/// for an RCU grace period under the rtnl lock (`tcx_entry_sync()` in `tcx_prog_attach` and the
/// link's attach, kernel 6.6, commit e420bed02507), 9 to 24 ms per hook on a busy 2-vCPU node,
/// which made the two attaches 70% of a CNI ADD and serialised every pod's ADD (and every other
/// link change of the node) behind them. A filter on a veth podwire created and alone uses loses
/// nothing TCX would give it; the node's devices, attached once, keep TCX's links.
pub fn tc_mode_of(
    env: Option<&str>,
    kernel_has_tcx: bool,
    per_pod: bool,
) -> Result<TcMode, String> {
    match env.map(str::trim) {
        Some("netlink") => Ok(TcMode::Netlink),
        Some("tcx") => Ok(TcMode::Tcx),
        None | Some("" | "auto") if kernel_has_tcx && !per_pod => Ok(TcMode::Tcx),
        None | Some("" | "auto") => Ok(TcMode::Netlink),
        Some(other) => Err(other.to_owned()),
    }
}

/// Whether the node's devices get their tc programs through TCX links (pinned), not netlink
/// filters: kernels from 6.6, unless [`TC_ATTACH_ENV`] says otherwise.
pub fn tcx_supported() -> bool {
    Hook::overlay("")
        .iter()
        .all(|hook| hook.mode() == TcMode::Tcx)
}

/// Whether `hook` has its program attached, as pinned below `pins`: with TCX, a link pinned for
/// it that is attached to the hook's interface (in the calling thread's network namespace); with
/// netlink tc, a filter of the hook's program on the interface's clsact hook. `false` when the
/// interface does not exist.
pub fn attached(hook: Hook<'_>, pins: &Pins) -> Result<bool, AttachError> {
    let Ok(ifindex) = nix::net::if_::if_nametoindex(hook.iface) else {
        return Ok(false);
    };
    match hook.mode() {
        TcMode::Tcx => Ok(pinned(&hook.pin(pins))? == Pinned::Device(ifindex)),
        TcMode::Netlink => Ok(filters(hook)?.iter().any(|f| f.name == hook.program)),
    }
}

/// Unpins every link below `pins` whose device is gone (a deleted pod veth, VXLAN device or
/// underlay interface), which detaches nothing but frees the link; returns their pins. Safe at
/// any time: a live link is never touched.
pub fn remove_severed_links(pins: &Pins) -> Result<Vec<PathBuf>, AttachError> {
    let dir = pins.links_dir();
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(pin_error(&dir, e)),
    };
    let mut removed = Vec::new();
    for entry in entries {
        let pin = entry.map_err(|e| pin_error(&dir, e))?.path();
        if pinned(&pin)? == Pinned::Severed {
            log::info!("unpinning {}: its device is gone", pin.display());
            Datapath::detach_pinned(&pin)?;
            removed.push(pin);
        }
    }
    Ok(removed)
}

/// Detaches `hook` for good (a mode that no longer uses it): unpins its TCX link, or removes
/// the netlink tc filters of its program on the hook. Nothing to do when the interface, the
/// qdisc or the attachment is gone.
pub fn detach(hook: Hook<'_>, pins: &Pins) -> Result<(), AttachError> {
    Datapath::detach_pinned(&hook.pin(pins))?;
    if hook.mode() == TcMode::Tcx || nix::net::if_::if_nametoindex(hook.iface).is_err() {
        return Ok(());
    }
    // Without a clsact qdisc the dump fails: nothing is attached.
    let Ok(filters) = filters(hook) else {
        return Ok(());
    };
    for filter in filters.iter().filter(|f| f.name == hook.program) {
        remove_filter(hook, filter)?;
    }
    Ok(())
}

/// Removes `filter` from the clsact hook of `hook`.
fn remove_filter(hook: Hook<'_>, filter: &Filter) -> Result<(), AttachError> {
    let remove_error = |source: ProgramError| AttachError::RemoveFilter {
        program: hook.program,
        iface: hook.iface.into(),
        direction: hook.direction,
        priority: filter.priority,
        source: source.into(),
    };
    SchedClassifierLink::attached(
        hook.iface,
        hook.direction,
        filter.priority,
        filter.handle,
        None,
    )
    .map_err(|e| remove_error(tc::TcError::IoError(e).into()))?
    .detach()
    .map_err(remove_error)
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
    /// this program atomically instead of its old one (agent upgrade); one whose device was
    /// deleted (severed) is unpinned and the hook attached afresh.
    ///
    /// With netlink tc (kernels before 6.6) nothing is pinned: the filter at [`NL_PRIORITY`] and
    /// [`NL_HANDLE`] holds the program, and an existing one gets this program in place (the kernel
    /// swaps it under RCU). Filters of the same program that earlier agents left elsewhere on the
    /// hook are removed after, and so is a TCX link pinned at `pin`.
    pub fn attach_pinned(&mut self, hook: Hook<'_>, pin: &Path) -> Result<(), AttachError> {
        if hook.mode() == TcMode::Netlink {
            self.replace_filter(hook)?;
            return Datapath::detach_pinned(pin);
        }
        if pinned(pin)? == Pinned::Severed {
            log::info!(
                "{}: its device was deleted; attaching afresh",
                pin.display()
            );
            Datapath::detach_pinned(pin)?;
        } else if let Some(link) = open_pinned::<SchedClassifierLink>(pin)? {
            let program = self.classifier(hook.program)?;
            match program.attach_to_link(link) {
                Ok(id) => {
                    // Closing our descriptor leaves the pinned link attached.
                    drop(program.take_link(id));
                    return Ok(());
                }
                // The device went between the look and the update.
                Err(ProgramError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::ENOLINK) =>
                {
                    log::info!(
                        "{}: its device was deleted; attaching afresh",
                        pin.display()
                    );
                    Datapath::detach_pinned(pin)?;
                }
                Err(source) => return Err(replace_error(hook.program, pin, source)),
            }
        }
        pin_link(self.attach_link(hook)?, pin)
    }

    /// Attaches `hook` as podwire's netlink tc filter, replacing the program of the one already
    /// there in place; then removes filters of the same program elsewhere on the hook.
    fn replace_filter(&mut self, hook: Hook<'_>) -> Result<(), AttachError> {
        add_clsact(hook.iface)?;
        let program = self.classifier(hook.program)?;
        let ours =
            SchedClassifierLink::attached(hook.iface, hook.direction, NL_PRIORITY, NL_HANDLE, None)
                .map_err(|e| attach_error(hook, ProgramError::from(tc::TcError::IoError(e))))?;
        let id = match program.attach_to_link(ours) {
            Ok(id) => id,
            // No filter there yet: this creates it.
            Err(ProgramError::TcError(tc::TcError::NetlinkError(e)))
                if e.raw_os_error() == Some(libc::ENOENT) =>
            {
                program
                    .attach_with_options(
                        hook.iface,
                        hook.direction,
                        TcAttachOptions::Netlink(NlOptions {
                            priority: NL_PRIORITY,
                            handle: NL_HANDLE,
                            classid: None,
                        }),
                    )
                    .map_err(|e| attach_error(hook, e))?
            }
            Err(e) => return Err(attach_error(hook, e)),
        };
        // The filter holds the program: dropping the link would delete it.
        std::mem::forget(program.take_link(id).map_err(|e| attach_error(hook, e))?);
        for filter in filters(hook)? {
            let ours = (filter.priority, filter.handle) == (NL_PRIORITY, NL_HANDLE);
            if filter.name != hook.program || ours {
                continue;
            }
            log::info!(
                "removing {} at priority {} on {:?} of {}: left by an earlier agent",
                hook.program,
                filter.priority,
                hook.direction,
                hook.iface
            );
            remove_filter(hook, &filter)?;
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
    /// upgrade), keeping its mode; one whose device was deleted is unpinned first. Returns the
    /// mode it runs in, `None` when it replaced a pinned link's program.
    pub fn attach_from_netdev(
        &mut self,
        iface: &str,
        pin: &Path,
        mode: XdpMode,
    ) -> Result<Option<XdpMode>, AttachError> {
        let program = self
            .from_netdev()
            .map_err(|_| AttachError::NoProgram(programs::FROM_NETDEV))?;
        if pinned(pin)? == Pinned::Severed {
            log::info!(
                "{}: its device was deleted; attaching afresh",
                pin.display()
            );
            Datapath::detach_pinned(pin)?;
        }
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

    /// Attaches `hook` in this process's mode; the link detaches when dropped.
    fn attach_link(&mut self, hook: Hook<'_>) -> Result<SchedClassifierLink, AttachError> {
        let options = match hook.mode() {
            TcMode::Tcx => TcAttachOptions::TcxOrder(LinkOrder::default()),
            TcMode::Netlink => {
                add_clsact(hook.iface)?;
                TcAttachOptions::Netlink(NlOptions::default())
            }
        };
        let program = self.classifier(hook.program)?;
        let id = program
            .attach_with_options(hook.iface, hook.direction, options)
            .map_err(|e| attach_error(hook, e))?;
        program.take_link(id).map_err(|e| attach_error(hook, e))
    }

    fn classifier(
        &mut self,
        name: &'static str,
    ) -> Result<&mut aya::programs::SchedClassifier, AttachError> {
        self.program(name).map_err(|_| AttachError::NoProgram(name))
    }
}

/// Adds the clsact qdisc netlink tc filters hang from to `iface`, unless it has one.
fn add_clsact(iface: &str) -> Result<(), AttachError> {
    match tc::qdisc_add_clsact(iface) {
        Ok(()) => Ok(()),
        Err(tc::TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        Err(source) => Err(AttachError::Qdisc {
            iface: iface.into(),
            source: source.into(),
        }),
    }
}

fn attach_error(hook: Hook<'_>, source: ProgramError) -> AttachError {
    AttachError::Attach {
        program: hook.program,
        iface: hook.iface.into(),
        direction: hook.direction,
        source: source.into(),
    }
}

/// What is pinned at a link's pin.
#[derive(Debug, PartialEq, Eq)]
enum Pinned {
    Nothing,
    /// A TCX or XDP link attached to the device of this ifindex.
    Device(u32),
    /// A TCX or XDP link whose device is gone.
    Severed,
    /// Another kind of link.
    Other,
}

/// What is pinned at `pin`.
fn pinned(pin: &Path) -> Result<Pinned, AttachError> {
    use aya_obj::generated::bpf_cmd;
    /// The BPF_OBJ_GET member of `union bpf_attr`.
    #[repr(C)]
    struct ObjGetAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let path = CString::new(pin.as_os_str().as_bytes()).map_err(|e| pin_error(pin, e))?;
    let mut attr = ObjGetAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: the kernel reads the NUL-terminated path, which outlives the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            bpf_cmd::BPF_OBJ_GET as libc::c_int,
            &raw mut attr,
            std::mem::size_of::<ObjGetAttr>(),
        )
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return match e.kind() {
            io::ErrorKind::NotFound => Ok(Pinned::Nothing),
            _ => Err(pin_error(pin, e)),
        };
    }
    // SAFETY: BPF_OBJ_GET returned a new descriptor, ours alone.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    Ok(match link_ifindex(&fd).map_err(|e| pin_error(pin, e))? {
        Some(0) => Pinned::Severed,
        Some(ifindex) => Pinned::Device(ifindex),
        None => Pinned::Other,
    })
}

/// The ifindex of the device the TCX or XDP link `fd` is attached to: 0 once the device is gone
/// (the kernel severs the link); `None` for another type of link.
fn link_ifindex(fd: &OwnedFd) -> io::Result<Option<u32>> {
    use aya_obj::generated::{bpf_cmd, bpf_link_info, bpf_link_type};
    /// The `info` member of `union bpf_attr` (BPF_OBJ_GET_INFO_BY_FD).
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    // SAFETY: bpf_link_info is plain old data, valid zeroed.
    let mut info: bpf_link_info = unsafe { std::mem::zeroed() };
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of::<bpf_link_info>() as u32,
        info: (&raw mut info) as u64,
    };
    // SAFETY: the kernel writes at most info_len bytes into `info`, which outlives the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            bpf_cmd::BPF_OBJ_GET_INFO_BY_FD as libc::c_int,
            &raw mut attr,
            std::mem::size_of::<InfoAttr>(),
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel filled the union member of the link's type.
    Ok(unsafe {
        match info.type_ {
            t if t == bpf_link_type::BPF_LINK_TYPE_TCX as u32 => {
                Some(info.__bindgen_anon_1.tcx.ifindex)
            }
            t if t == bpf_link_type::BPF_LINK_TYPE_XDP as u32 => {
                Some(info.__bindgen_anon_1.xdp.ifindex)
            }
            _ => None,
        }
    })
}

/// One of the netlink tc filters on a hook.
#[derive(Debug)]
struct Filter {
    priority: u16,
    handle: TcHandle,
    /// Name of its BPF program; empty for a filter of another kind.
    name: String,
}

/// The tc filters on the clsact hook of `hook` (its interface and direction), in the calling
/// thread's network namespace.
fn filters(hook: Hook<'_>) -> Result<Vec<Filter>, AttachError> {
    dump_filters(hook.iface, hook.direction).map_err(|source| AttachError::Filters {
        iface: hook.iface.into(),
        direction: hook.direction,
        source,
    })
}

fn dump_filters(iface: &str, direction: TcAttachType) -> io::Result<Vec<Filter>> {
    use netlink_packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST};
    use netlink_packet_route::{
        tc::{TcAttribute, TcFilterBpfOption, TcMessage, TcOption},
        RouteNetlinkMessage,
    };
    use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

    let ifindex = nix::net::if_::if_nametoindex(iface)?;
    let mut request = TcMessage::with_index(ifindex as i32);
    // The clsact qdisc's ingress or egress: TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS/EGRESS).
    request.header.parent = match direction {
        TcAttachType::Egress => 0xFFFF_FFF3,
        _ => 0xFFFF_FFF2,
    }
    .into();
    let mut message = NetlinkMessage::from(RouteNetlinkMessage::GetTrafficFilter(request));
    message.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    message.header.sequence_number = 1;
    message.finalize();
    let mut bytes = vec![0; message.buffer_len()];
    message.serialize(&mut bytes);

    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    socket.send(&bytes, 0)?;
    let mut filters = Vec::new();
    let mut buf = Vec::with_capacity(64 * 1024);
    loop {
        buf.clear();
        socket.recv(&mut buf, 0)?;
        let mut offset = 0;
        while offset < buf.len() {
            let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[offset..])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            offset += reply.header.length as usize;
            match reply.payload {
                NetlinkPayload::Done(_) => return Ok(filters),
                NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io()),
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewTrafficFilter(m)) => {
                    let name = m
                        .attributes
                        .iter()
                        .filter_map(|a| match a {
                            TcAttribute::Options(options) => Some(options),
                            _ => None,
                        })
                        .flatten()
                        .find_map(|o| match o {
                            TcOption::Bpf(TcFilterBpfOption::ProgName(name)) => Some(name.clone()),
                            _ => None,
                        })
                        .unwrap_or_default();
                    filters.push(Filter {
                        priority: (m.header.info >> 16) as u16,
                        handle: TcHandle::from(u32::from(m.header.handle)),
                        name,
                    });
                }
                _ => {}
            }
            if reply.header.length == 0 {
                break;
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tc_mode_follows_kernel_and_hook_unless_the_environment_says_otherwise() {
        for (env, tcx_kernel, per_pod, mode) in [
            (None, true, false, Ok(TcMode::Tcx)),
            (None, true, true, Ok(TcMode::Netlink)),
            (None, false, false, Ok(TcMode::Netlink)),
            (None, false, true, Ok(TcMode::Netlink)),
            (Some("auto"), true, false, Ok(TcMode::Tcx)),
            (Some("auto"), true, true, Ok(TcMode::Netlink)),
            (Some(""), false, false, Ok(TcMode::Netlink)),
            (Some("netlink"), true, false, Ok(TcMode::Netlink)),
            (Some(" netlink\n"), true, false, Ok(TcMode::Netlink)),
            (Some("tcx"), false, true, Ok(TcMode::Tcx)),
            (Some("tcx"), true, true, Ok(TcMode::Tcx)),
            (Some("legacy"), true, false, Err("legacy".to_owned())),
        ] {
            assert_eq!(
                tc_mode_of(env, tcx_kernel, per_pod),
                mode,
                "{env:?} on TCX {tcx_kernel}, per pod {per_pod}"
            );
        }
    }
}
