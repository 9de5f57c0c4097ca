//! Maps the agent fills and the programs read.

use aya_ebpf::{macros::map, maps::HashMap};
use podwire_common::{Endpoint, EndpointKey, MAX_ENDPOINTS};

/// Pods on this node by IPv4 address: their host-side veth and MACs.
#[map]
pub static ENDPOINTS_V1: HashMap<EndpointKey, Endpoint> =
    HashMap::with_max_entries(MAX_ENDPOINTS, 0);
