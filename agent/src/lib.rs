//! podwire's node agent as a library: loading and attaching the datapath, reading its maps.
//! The `podwire-agent` binary and the integration tests drive it.

pub mod datapath;
