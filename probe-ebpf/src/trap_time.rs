//! When a trapped probe was hit. USDT sites and mapped function entries are `int3` traps,
//! and the kernel runs their program only on the thread's way back to user space, after
//! any reschedule pending there. A thread preempted in between is stamped late by the
//! time it spent off the CPU (40-150 µs, for 1-2% of hits on a busy 2-core machine). So
//! `sched:sched_switch` notes when a followed thread leaves the CPU with a trap pending,
//! its user instruction pointer just past an `int3`, and the trapped probe takes that
//! moment as its time (docs/modes/symbols.md, "Timing").

use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_user},
    macros::{map, tracepoint},
    maps::LruHashMap,
    programs::TracePointContext,
};
use probe_common::maps::MAX_TRACED_THREADS;

use crate::events::{current_task, traced, user_registers};

const INT3: u8 = 0xcc;

#[repr(C)]
#[derive(Clone, Copy)]
struct TrapState {
    /// Address of the last trapped hit since the thread last left the CPU, 0 if none.
    last_hit: u64,
    /// Address of the trap the thread left the CPU with, pending, 0 if none.
    pending: u64,
    switched_out_ns: u64,
}

/// Per thread of a followed process that hit a trapped probe.
#[map]
static TRAP_STATES: LruHashMap<u32, TrapState> =
    LruHashMap::with_max_entries(MAX_TRACED_THREADS, 0);

#[tracepoint]
pub fn trap_preempted(_ctx: TracePointContext) -> u32 {
    // The tracepoint runs in the thread leaving the CPU.
    let (tgid, tid) = current_task();
    if !traced(tgid) {
        return 0;
    }
    let Some(state) = TRAP_STATES.get_ptr_mut(&tid) else {
        // Never hit a trapped probe: its first hit is timed as it runs.
        return 0;
    };
    // SAFETY: a map value stays valid while this program runs; only this thread's own
    // programs use its entry, one at a time.
    let state = unsafe { &mut *state };
    let last_hit = core::mem::replace(&mut state.last_hit, 0);
    // SAFETY: read through the helper, which fails rather than faults.
    let ip = unsafe { bpf_probe_read_kernel(&(*user_registers()).rip) };
    let Ok(ip) = ip else {
        return 0;
    };
    // SAFETY: two bytes of the current process's code, read through the helper.
    let Ok(around) = (unsafe { bpf_probe_read_user((ip - 1) as *const [u8; 2]) }) else {
        return 0;
    };
    let trap = if around[0] == INT3 {
        // Trapped, its probe not run yet. Or: just past a probed one-byte instruction (a
        // USDT `nop`, a `push`) whose probe already ran since the thread got the CPU.
        // (Hits of one probe with no switch in between lose the correction, never gain
        // a wrong one.)
        if last_hit == ip - 1 {
            return 0;
        }
        ip - 1
    } else if around[1] == INT3 {
        // About to trap (or trapped and set back to it, the probe not run yet).
        ip
    } else {
        return 0;
    };
    // Off the CPU again before the probe ran: the first time counts.
    if state.pending != trap {
        state.pending = trap;
        // SAFETY: reading the clock has no preconditions.
        state.switched_out_ns = unsafe { bpf_ktime_get_ns() };
    }
    0
}

/// The time of a hit of the trap at `probe_ip` on thread `tid`: when the thread left the
/// CPU with that trap pending, else now.
#[inline(always)]
pub fn hit_time(tid: u32, probe_ip: u64) -> u64 {
    // SAFETY: reading the clock has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(state) = TRAP_STATES.get_ptr_mut(&tid) else {
        let first = TrapState {
            last_hit: probe_ip,
            pending: 0,
            switched_out_ns: 0,
        };
        let _ = TRAP_STATES.insert(&tid, &first, 0);
        return now;
    };
    // SAFETY: as in trap_preempted.
    let state = unsafe { &mut *state };
    let pending = core::mem::replace(&mut state.pending, 0);
    state.last_hit = probe_ip;
    if pending == probe_ip {
        state.switched_out_ns
    } else {
        now
    }
}
