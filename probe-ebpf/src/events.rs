//! What every probe family shares: the one ring buffer (so records keep the order in
//! which they happened) and the per-CPU counters.

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid,
    macros::map,
    maps::{PerCpuArray, RingBuf},
};
use probe_common::{event::Counter, maps::EVENTS_BYTES};

#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

/// Indexed by [`Counter`]; user space sums the CPUs.
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

/// Adds one; returns the count before, so callers can say something on the first one.
#[inline(always)]
pub fn count(counter: Counter) -> u64 {
    match COUNTERS.get_ptr_mut(counter as u32) {
        Some(slot) => {
            // SAFETY: per-CPU slot, only this CPU writes it while this program runs.
            let slot = unsafe { &mut *slot };
            let before = *slot;
            *slot += 1;
            before
        }
        None => 0,
    }
}

/// (tgid, tid) of the current task.
#[inline(always)]
pub fn current_task() -> (u32, u32) {
    let pid_tgid = bpf_get_current_pid_tgid();
    ((pid_tgid >> 32) as u32, pid_tgid as u32)
}
