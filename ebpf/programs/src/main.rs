//! podwire's kernel programs. One module per attach point, named from the endpoint's view.
#![no_std]
#![no_main]

mod counters;
mod from_pod;
mod maps;
mod parse;

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
