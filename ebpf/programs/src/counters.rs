//! The one exit every verdict goes through: counted per reason, per CPU, and every drop reported
//! on the event ring.

use aya_ebpf::{
    macros::map,
    maps::{PerCpuArray, RingBuf},
};
use podwire_common::{Counter, DropEvent, Reason};

use crate::{frame::Frame, parse::eth_ipv4};

/// Packets and bytes per verdict reason (index: `Reason as u32`), per CPU.
#[map]
static COUNTERS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(Reason::SLOTS, 0);

/// Dropped packets, for `podwire events`. When nobody reads, it fills and further drops are only
/// counted.
#[map]
static EVENTS_V1: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// Counts the packet under `reason` and returns `action` (tc's or XDP's) for the program to
/// return.
#[inline(always)]
pub fn verdict<C: Frame, A>(ctx: &C, reason: Reason, action: A) -> A {
    if let Some(counter) = COUNTERS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += u64::from(ctx.len());
        }
    }
    if reason.is_drop() {
        report_drop(ctx, reason);
    }
    action
}

#[inline(never)]
fn report_drop<C: Frame>(ctx: &C, reason: Reason) {
    // The headers are read again here, off the forwarding path; a packet that is no IPv4 (or too
    // short for it) reports zero addresses.
    let mut event = DropEvent {
        reason: reason as u32,
        ifindex: ctx.ifindex(),
        len: ctx.len(),
        ..DropEvent::default()
    };
    if let Ok(Some((_, ip))) = eth_ipv4(ctx) {
        (event.proto, event.src, event.dst) = (ip.proto, ip.src_addr, ip.dst_addr);
    }
    let _ = EVENTS_V1.output::<DropEvent>(&event, 0);
}
