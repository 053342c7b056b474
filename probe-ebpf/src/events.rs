//! What every probe family shares: the one ring buffer (so records keep the order in
//! which they happened) and the per-CPU counters.

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, pt_regs},
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_task_btf, bpf_probe_read_kernel,
        generated::bpf_task_pt_regs,
    },
    macros::map,
    maps::{Array, PerCpuArray, RingBuf},
};
use probe_common::{
    event::{Counter, EventHeader, Source},
    maps::{EVENTS_BYTES, EVENTS_WAKEUP_BYTES, TRACED_PROCESS_WORDS},
};

/// One bit per PID, set for each process brokerprobe follows (written by user space). A
/// bitmap, not a hash: every socket tracepoint of every process tests it first, and an
/// array lookup is one load where a hash lookup hashes and walks a bucket.
#[map]
static TRACED_PROCESSES: Array<u64> = Array::with_max_entries(TRACED_PROCESS_WORDS, 0);

/// Whether brokerprobe follows process `tgid`: probes on events of every process (socket
/// and scheduler tracepoints) test it first.
#[inline(always)]
pub fn traced(tgid: u32) -> bool {
    TRACED_PROCESSES
        .get(tgid / 64)
        .is_some_and(|word| word & (1 << (tgid % 64)) != 0)
}

#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

/// Flags for submitting a record: user space polls the ring buffer, so a probe wakes it
/// only once a batch is pending (see [`EVENTS_WAKEUP_BYTES`]).
#[inline(always)]
pub fn submit_flags() -> u64 {
    if EVENTS.query(BPF_RB_AVAIL_DATA.into()) >= u64::from(EVENTS_WAKEUP_BYTES) {
        BPF_RB_FORCE_WAKEUP.into()
    } else {
        BPF_RB_NO_WAKEUP.into()
    }
}

/// Slot 0 is 1 while user space wants events. Probes are attached and detached one by one;
/// events are switched on only once all are in place and off before any goes, so no
/// event reports half a picture (an end marker whose begin marker was not attached yet, for
/// instance).
#[map]
static ARMED: Array<u32> = Array::with_max_entries(1, 0);

/// Whether to emit events and count what cannot be followed (maps are kept up to date
/// either way).
#[inline(always)]
pub fn armed() -> bool {
    ARMED.get(0).is_some_and(|on| *on == 1)
}

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

/// Slot 0 counts every record lost, all families together, so that each record can carry
/// the count so far ([`probe_common::event::EventHeader::losses`]). Written only when the
/// ring buffer is full; read by every record.
#[map]
static LOSSES: Array<u64> = Array::with_max_entries(1, 0);

/// Losses so far, for a record's header.
#[inline(always)]
pub fn losses() -> u64 {
    match LOSSES.get_ptr(0) {
        // SAFETY: an aligned u64 in a map value that lives as long as the map; a racing
        // increment makes the read old or new, either is a valid value.
        Some(slot) => unsafe { core::ptr::read_volatile(slot) },
        None => 0,
    }
}

/// A record could not be written: counted per family in [`COUNTERS`] and, for the
/// headers of later records, in [`LOSSES`].
#[inline(always)]
pub fn count_loss(counter: Counter) -> u64 {
    if let Some(slot) = LOSSES.get_ptr_mut(0) {
        // SAFETY: an aligned u64 in a map value that lives as long as the map.
        unsafe { atomic_add_one(slot) };
    }
    count(counter)
}

/// Adds one to `*slot` with the BPF atomic add, for a word CPUs add to concurrently
/// (Debian's core for bpfel has no atomic read-modify-write: hence the instruction itself).
///
/// # Safety
/// `slot` points to an aligned u64 in a map value.
#[inline(always)]
pub unsafe fn atomic_add_one(slot: *mut u64) {
    // SAFETY: the caller's promise.
    unsafe {
        core::arch::asm!("lock *(u64 *)({slot} + 0) += {one}", slot = in(reg) slot, one = in(reg) 1u64);
    }
}

/// Writes the first bytes of a record: who, when, and the losses so far (which let user
/// space tell whether a request's records may have a gap).
#[inline(always)]
pub fn write_header(
    header: &mut EventHeader,
    source: Source,
    kind: u32,
    (pid, tid): (u32, u32),
    ts_ns: u64,
) {
    put(&mut header.source, source as u32);
    put(&mut header.kind, kind);
    put(&mut header.pid, pid);
    put(&mut header.tid, tid);
    put(&mut header.ts_ns, ts_ns);
    put(&mut header.losses, losses());
}

/// Stores one field of a record as one store. Zeros written plainly side by side are
/// merged by LLVM into a `memset` call, which BPF runs as a loop of byte stores: it took
/// as long as the rest of a marker probe (BENCHMARKS.md, "Changes made").
#[inline(always)]
pub fn put<T: Copy>(field: &mut T, value: T) {
    // SAFETY: a store through an exclusive reference.
    unsafe { core::ptr::write_volatile(field, value) }
}

/// Zeroes 8-byte words `FIRST..END` of a record as that many stores (see [`put`]).
#[inline(always)]
pub fn zero_words<T, const FIRST: usize, const END: usize>(record: &mut T) {
    const { assert!(FIRST <= END && END * 8 <= size_of::<T>() && align_of::<T>() >= 8) };
    let words = (record as *mut T).cast::<u64>();
    for i in FIRST..END {
        // SAFETY: within the record and 8-aligned, as the assertion above checks.
        unsafe { words.add(i).write_volatile(0) };
    }
}

/// The current task's user registers, as saved when it entered the kernel.
#[inline(always)]
pub fn user_registers() -> *const pt_regs {
    // SAFETY: the helpers take the current task, which the kernel guarantees.
    unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) as *const pt_regs }
}

/// The syscall the current task is in, as its registers held it at entry.
#[derive(Clone, Copy)]
pub struct Syscall {
    pub nr: u64,
    pub arg0: u64,
    pub arg1: u64,
}

/// `-ENOSYS`, which x86-64 puts in a syscall's saved rax at entry and which stays there
/// until the syscall returns its result.
const IN_SYSCALL_RAX: u64 = -38i64 as u64;

/// The syscall the current task is in: a probe inside one (a socket tracepoint) reads
/// its number and first two arguments here rather than keeping them from the syscall's
/// entry, which would take a program on every syscall entry of every process. None when
/// the task is not inside a syscall's own work: an io_uring worker (it starts with a copy
/// of its creator's registers, rax 0), or task work run on the way back to user space.
#[inline(always)]
pub fn current_syscall() -> Option<Syscall> {
    // x86-64 `struct pt_regs` keeps rax, rcx, rdx, rsi, rdi and orig_rax side by side: one
    // read.
    // SAFETY: read through the helper, which fails rather than faults.
    let [rax, _, _, arg1, arg0, nr] =
        unsafe { bpf_probe_read_kernel(&raw const (*user_registers()).rax as *const [u64; 6]) }
            .ok()?;
    (rax == IN_SYSCALL_RAX).then_some(Syscall { nr, arg0, arg1 })
}

/// (tgid, tid) of the current task.
#[inline(always)]
pub fn current_task() -> (u32, u32) {
    let pid_tgid = bpf_get_current_pid_tgid();
    ((pid_tgid >> 32) as u32, pid_tgid as u32)
}
