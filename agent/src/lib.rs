//! podwire's node agent as a library: loading and attaching the datapath, its pinned maps and
//! links, IPAM and endpoint state, and the local API the CNI plugin calls.
//! The `podwire-agent` binary, the CNI plugin and the integration tests use it.

pub mod api;
pub mod cluster;
pub mod daemon;
pub mod datapath;
pub mod mac;
pub mod overlay;
pub mod pins;
pub mod state;
pub mod wiring;
