//! `to_underlay`: tc egress of the node's underlay interface, attached with native routing.
//! Sees what `from_pod` sent out of it (marked in `tc_index`, which is cleared here) and what
//! the node's stack routes out of it. A flow from a pod here that the stack routed to another
//! node (a Service it NATed to a backend there) is recorded, so `from_underlay` hands its
//! replies to the stack, whose conntrack reverses the NAT (see `flows`); in tunnel mode
//! `to_overlay` does this, as the stack routes such packets into the VXLAN device.

use aya_ebpf::{macros::classifier, programs::TcContext};
use podwire_common::{Reason, TC_INDEX_FROM_POD};

use crate::{counters::verdict, flows, parse::eth_ipv4, TC_OK};

#[classifier]
pub fn to_underlay(ctx: TcContext) -> i32 {
    // SAFETY: the kernel hands the program a valid __sk_buff; tc programs may write tc_index.
    unsafe {
        if (*ctx.skb.skb).tc_index == TC_INDEX_FROM_POD {
            // Sent (and counted) by from_pod.
            (*ctx.skb.skb).tc_index = 0;
            return TC_OK;
        }
    }
    if let Ok(Some((_, ip))) = eth_ipv4(&ctx) {
        flows::record(&ctx, ip);
    }
    // Never dropped here: the stack decided.
    verdict(&ctx, Reason::PassStackOut, TC_OK)
}
