//! podwire's eBPF datapath as userspace sees it: loading the object ([`load`]), attaching its
//! programs to tc hooks ([`attach`]), pinning them in bpffs ([`bpffs`]), and its maps, typed
//! ([`maps`]). The agent drives it with the
//! object it embeds; the CLI opens the pinned maps; the tests load the object `cargo xtask`
//! built and run its programs on crafted packets.

pub mod attach;
pub mod bpffs;
pub mod load;
pub mod maps;

pub use attach::{
    attached, detach, remove_severed_links, tcx_supported, AttachError, Hook, TcMode,
};
pub use aya::programs::xdp::XdpMode;
pub use load::{Crossing, Datapath, LoadError, LoadOptions, LogLevel, Logger, MapLayout, Tunnel};
pub use maps::{Counters, DatapathMap, DropEvents, Endpoints, MapError, NodeTable};
