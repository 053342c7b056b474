//! Symbol-mapped stages (docs/modes/symbols.md): a uprobe at a mapped function's entry
//! notes the time per (thread, stage); a uretprobe at its return writes one
//! [`StageSampleEvent`]. The stage is the attach cookie brokerprobe gave both probes.

use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_get_attach_cookie, bpf_ktime_get_ns},
    macros::{map, uprobe, uretprobe},
    maps::LruHashMap,
    programs::{ProbeContext, RetProbeContext},
};
use probe_common::{
    event::{Counter, Source},
    maps::MAX_SYMBOL_CALLS,
    symbol::StageSampleEvent,
};

use crate::{
    events::{EVENTS, armed, count_loss, current_task, put, submit_flags, write_header},
    trap_time::hit_time,
};

/// Entry times of the calls in progress, by (thread << 32 | stage). A recursive call
/// replaces its caller's entry: the caller's return then finds none and writes nothing.
#[map]
static SYMBOL_CALLS: LruHashMap<u64, u64> = LruHashMap::with_max_entries(MAX_SYMBOL_CALLS, 0);

#[inline(always)]
fn call_key(ctx: *mut core::ffi::c_void) -> (u64, u32) {
    // SAFETY: the helper reads the cookie of the link this program runs for.
    let stage = unsafe { bpf_get_attach_cookie(ctx) } as u32;
    let (_, tid) = current_task();
    ((u64::from(tid) << 32) | u64::from(stage), stage)
}

#[uprobe]
pub fn symbol_entry(ctx: ProbeContext) -> u32 {
    if !armed() {
        return 0;
    }
    let (key, _) = call_key(ctx.as_ptr());
    // SAFETY: the context is the kernel's pt_regs of the hit: rip is the function entry.
    let now = hit_time(current_task().1, unsafe { (*ctx.regs).rip });
    let _ = SYMBOL_CALLS.insert(&key, &now, 0);
    0
}

#[uretprobe]
pub fn symbol_return(ctx: RetProbeContext) -> u32 {
    let (key, stage) = call_key(ctx.as_ptr());
    // SAFETY: an LRU map value, copied out at once.
    let Some(begin_ns) = (unsafe { SYMBOL_CALLS.get(&key) }).copied() else {
        return 0;
    };
    let _ = SYMBOL_CALLS.remove(&key);
    if !armed() {
        return 0;
    }
    // SAFETY: reading the clock has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(mut entry) = EVENTS.reserve::<StageSampleEvent>(0) else {
        count_loss(Counter::MarkerEventsLost);
        return 0;
    };
    // SAFETY: the reservation is sized and aligned for the event; every field is written
    // before submit.
    let event = unsafe { &mut *entry.as_mut_ptr() };
    write_header(&mut event.header, Source::Symbol, 0, current_task(), now);
    put(&mut event.begin_ns, begin_ns);
    put(&mut event.stage, stage);
    put(&mut event._reserved, 0);
    entry.submit(submit_flags());
    0
}
