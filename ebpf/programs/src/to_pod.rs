//! `to_pod`: tc egress of a pod's host-side veth. Sees only what the node's host stack sends into
//! the pod: what podwire delivers with `bpf_redirect_peer` enters the pod directly and skips it.
//! So everything here took the stack's path (a Service kube-proxy NATed, the node's own traffic,
//! traffic from outside), and a flow from another pod on this node is recorded, so that
//! `from_pod` hands its replies to the stack too (see `flows`).

use aya_ebpf::{macros::classifier, programs::TcContext};
use podwire_common::Reason;

use crate::{counters::verdict, flows, parse::eth_ipv4, TC_OK};

#[classifier]
pub fn to_pod(ctx: TcContext) -> i32 {
    if let Ok(Some((_, ip))) = eth_ipv4(&ctx) {
        flows::record(&ctx, ip);
    }
    // Never dropped here: the stack decided, and the pod's own rules apply inside it.
    verdict(&ctx, Reason::PassToPod, TC_OK)
}
