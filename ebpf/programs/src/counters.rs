//! The one exit every verdict goes through: counted per reason, per CPU.

use aya_ebpf::{macros::map, maps::PerCpuArray, programs::TcContext};
use podwire_common::{Counter, Reason};

/// Packets and bytes per verdict reason (index: `Reason as u32`), per CPU.
#[map]
static COUNTERS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(Reason::SLOTS, 0);

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
    action
}
