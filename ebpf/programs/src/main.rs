//! podwire's kernel programs. One module per attach point, named from the endpoint's view:
//! `from_pod` (host-side veth ingress), `from_overlay` and `to_overlay` (VXLAN device ingress and
//! egress). Every verdict leaves through `counters::verdict`, counted by reason.
#![no_std]
#![no_main]

mod counters;
mod deliver;
mod from_overlay;
mod from_pod;
mod maps;
mod parse;
mod to_overlay;
mod tunnel;

use aya_ebpf::bindings::TC_ACT_SHOT;
use podwire_common::Reason;

/// Why, and the TC action.
type Outcome = (Reason, i32);

const DROP_MALFORMED: Outcome = (Reason::DropMalformed, TC_ACT_SHOT as i32);

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach here, so this is never executed.
    loop {}
}

/// GPL-compatible licence: needed for GPL-only helpers such as bpf_redirect_peer.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
