//! podwire's kernel programs. One module per attach point, named from the endpoint's view:
//! `from_pod` and `to_pod` (host-side veth ingress and egress), `from_overlay` and `to_overlay`
//! (VXLAN device ingress and egress), `from_netdev` (XDP on the underlay interface),
//! `from_underlay` and `to_underlay` (tc ingress and egress of the underlay interface, with the
//! programs' own tunnel or native routing). Every verdict leaves through `counters::verdict`,
//! counted by reason.
// On the host (a plain `cargo check` or `cargo clippy` of the workspace) this is an ordinary
// binary that does nothing, so the programs are type-checked and linted without the BPF target.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

mod counters;
mod crossing;
mod deliver;
mod flows;
mod frame;
mod from_netdev;
mod from_overlay;
mod from_pod;
mod from_underlay;
mod maps;
mod parse;
mod to_overlay;
mod to_pod;
mod to_underlay;
mod tunnel;

use aya_ebpf::bindings::{TC_ACT_OK, TC_ACT_SHOT};
use podwire_common::Reason;

/// Why, and the tc action.
type Outcome = (Reason, i32);

/// The tc actions as the programs return them (the bindings' integer type differs between the
/// BPF target and the host, where the programs are only checked).
#[allow(clippy::unnecessary_cast)]
const TC_OK: i32 = TC_ACT_OK as i32;
#[allow(clippy::unnecessary_cast)]
const TC_SHOT: i32 = TC_ACT_SHOT as i32;

const DROP_MALFORMED: Outcome = (Reason::DropMalformed, TC_SHOT);

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach here, so this is never executed.
    loop {}
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}

/// GPL-compatible licence: needed for GPL-only helpers such as bpf_redirect_peer.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
