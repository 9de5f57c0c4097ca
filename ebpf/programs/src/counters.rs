//! The one exit every verdict goes through: counted per reason, per CPU, and every drop reported
//! on the event ring.

use aya_ebpf::{
    macros::map,
    maps::{PerCpuArray, RingBuf},
    programs::TcContext,
};
use network_types::eth::EthHdr;
use podwire_common::{Counter, DropEvent, Reason};

/// Packets and bytes per verdict reason (index: `Reason as u32`), per CPU.
#[map]
static COUNTERS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(Reason::SLOTS, 0);

/// Dropped packets, for `podwire events`. When nobody reads, it fills and further drops are only
/// counted.
#[map]
static EVENTS_V1: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// Counts the packet under `reason` and returns `action` for the program to return.
#[inline(always)]
pub fn verdict(ctx: &TcContext, reason: Reason, action: i32) -> i32 {
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
fn report_drop(ctx: &TcContext, reason: Reason) {
    // The headers are read again here, off the forwarding path; a packet too short for them
    // reports zeros.
    const IP: usize = EthHdr::LEN;
    let mut event = DropEvent {
        reason: reason as u32,
        // SAFETY: the kernel hands the program a valid __sk_buff.
        ifindex: unsafe { (*ctx.skb.skb).ifindex },
        len: ctx.len(),
        ..DropEvent::default()
    };
    if let (Ok(proto), Ok(src), Ok(dst)) = (
        ctx.load::<u8>(IP + 9),
        ctx.load::<[u8; 4]>(IP + 12),
        ctx.load::<[u8; 4]>(IP + 16),
    ) {
        (event.proto, event.src, event.dst) = (proto, src, dst);
    }
    let _ = EVENTS_V1.output::<DropEvent>(&event, 0);
}
