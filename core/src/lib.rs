//! What podwire's node agent, CNI plugin, CLI and test lab share, with no eBPF loader and no
//! async runtime: the agent's local API and a blocking client for it ([`api`]), where the datapath
//! is pinned in bpffs ([`pins`]), the names of the programs and maps in the eBPF object
//! ([`object`]), and the model of the cluster ([`cluster`]) and of a pod's endpoint
//! ([`endpoint`]).

pub mod api;
pub mod cluster;
pub mod endpoint;
pub mod mac;
pub mod object;
pub mod pins;
