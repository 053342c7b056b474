//! Uprobes on the broker's marker functions (docs/markers.md): each hit becomes one
//! [`MarkerEvent`] in the ring buffer, timestamped here, never by the broker — but for a
//! stream's later chunks, which are counted (below).
//!
//! Program names equal the marker symbol suffixes, so user space attaches program
//! `request_begin` to `brokerprobe_v1_request_begin`.
//!
//! A stream's chunks after its first are counted here, not sent one by one: the chunk is the
//! marker a streaming broker hits most, and its record, and decoding it, cost more than a
//! count. The count and the last chunk's time ride on the request's end.

use aya_ebpf::{
    helpers::{
        bpf_ktime_get_ns,
        generated::{bpf_probe_read_user, bpf_probe_read_user_str},
    },
    macros::{map, uprobe},
    maps::HashMap,
    programs::ProbeContext,
};
use aya_log_ebpf::warn;
use probe_common::{
    event::{Counter, Source},
    maps::MAX_TALLIED_STREAMS,
    marker::{ChunkTally, MarkerEvent, MarkerKind, TEXT_CAP, TallyKey},
};

use crate::events::{
    EVENTS, armed, atomic_add_one, count_loss, current_task, put, submit_flags, write_header,
};

/// Streams whose first chunk was sent: their later chunks are counted here until the
/// request ends (user space removes a process's entries when it lets the process go). A
/// hash, not an LRU: an evicted count would be lost silently, where a full map only sends
/// chunks one record each again.
#[map]
static CHUNK_TALLIES: HashMap<TallyKey, ChunkTally> =
    HashMap::with_max_entries(MAX_TALLIED_STREAMS, 0);

/// `BPF_NOEXIST`: insert only if absent.
const BPF_NOEXIST: u64 = 1;

#[inline(always)]
fn tally_key(ctx: &ProbeContext) -> TallyKey {
    TallyKey {
        tgid: current_task().0,
        _pad: 0,
        request_id: arg(ctx, 0),
    }
}

/// Where a string of a hit comes from.
pub enum Text<'a> {
    None,
    /// (pointer, length) in the broker's memory: the marker ABI.
    Sized(usize, usize),
    /// A NUL-terminated string in the broker's memory: SDT probes.
    Terminated(usize),
    /// Bytes brokerprobe gave the kernel (a stage named by a USDT stage map).
    Fixed(&'a [u8; TEXT_CAP], u32),
}

#[inline(always)]
fn arg(ctx: &ProbeContext, n: usize) -> u64 {
    ctx.arg::<u64>(n).unwrap_or(0)
}

#[inline(always)]
fn text_arg(ctx: &ProbeContext, ptr: usize, len: usize) -> Text<'static> {
    match (arg(ctx, ptr) as usize, arg(ctx, len) as usize) {
        (0, _) | (_, 0) => Text::None,
        (ptr, len) => Text::Sized(ptr, len),
    }
}

/// The shape of stage_begin/end: a 32-bit value (the stage), then one string (custom
/// stage or tool name).
#[inline(always)]
fn emit_value_and_text(ctx: &ProbeContext, kind: MarkerKind) -> u32 {
    let values = [arg(ctx, 1) as u32 as u64, 0];
    emit(ctx, kind, values, [text_arg(ctx, 2, 3), Text::None])
}

/// A marker hit: its request id is the first argument.
#[inline(always)]
fn emit(ctx: &ProbeContext, kind: MarkerKind, values: [u64; 2], texts: [Text; 2]) -> u32 {
    // SAFETY: reading the clock has no preconditions.
    let ts_ns = unsafe { bpf_ktime_get_ns() };
    emit_event(ctx, (kind, ts_ns), arg(ctx, 0), (values, 0), texts)
}

/// Writes one [`MarkerEvent`] of a hit at `ts_ns`, whichever probe family saw it, with
/// its values and (request ends only) its tallied chunks.
#[inline(always)]
pub fn emit_event(
    ctx: &ProbeContext,
    (kind, ts_ns): (MarkerKind, u64),
    request_id: u64,
    (values, tallied): ([u64; 2], u32),
    texts: [Text; 2],
) -> u32 {
    if !armed() {
        return 0;
    }
    let (pid, tid) = current_task();
    let Some(mut entry) = EVENTS.reserve::<MarkerEvent>(0) else {
        if count_loss(Counter::MarkerEventsLost) == 0 {
            warn!(
                ctx,
                "ring buffer full: marker events are being dropped (counted)"
            );
        }
        return 0;
    };
    // SAFETY: the reservation is sized and aligned for a MarkerEvent; every field that
    // user space reads is written below before submit.
    let event = unsafe { &mut *entry.as_mut_ptr() };
    write_header(
        &mut event.header,
        Source::Marker,
        kind as u32,
        (pid, tid),
        ts_ns,
    );
    put(&mut event.request_id, request_id);
    put(&mut event.values[0], values[0]);
    put(&mut event.values[1], values[1]);
    put(&mut event.read_failed, 0);
    put(&mut event.tallied, tallied);
    for (slot, text) in texts.iter().enumerate() {
        put(&mut event.text_len[slot], 0);
        let buffer = &mut event.text[slot];
        match *text {
            Text::None => {}
            Text::Sized(ptr, len) => {
                let copy = if len < TEXT_CAP { len } else { TEXT_CAP };
                // SAFETY: copies at most TEXT_CAP bytes into the event's own buffer; a bad
                // user pointer makes the helper fail, it cannot fault.
                let rc = unsafe {
                    bpf_probe_read_user(
                        buffer.as_mut_ptr().cast(),
                        copy as u32,
                        ptr as *const core::ffi::c_void,
                    )
                };
                if rc == 0 {
                    event.text_len[slot] = len.min(u32::MAX as usize) as u32;
                } else {
                    event.read_failed |= 1 << slot;
                }
            }
            Text::Terminated(ptr) => {
                // SAFETY: as above; the helper stops at TEXT_CAP bytes, NUL included.
                let rc = unsafe {
                    bpf_probe_read_user_str(
                        buffer.as_mut_ptr().cast(),
                        TEXT_CAP as u32,
                        ptr as *const core::ffi::c_void,
                    )
                };
                if rc <= 0 {
                    event.read_failed |= 1 << slot;
                } else if rc as usize >= TEXT_CAP {
                    // The buffer filled up: the string may go on (its length is unknown).
                    event.text_len[slot] = TEXT_CAP as u32 + 1;
                } else {
                    event.text_len[slot] = rc as u32 - 1;
                }
            }
            Text::Fixed(bytes, len) => {
                *buffer = *bytes;
                event.text_len[slot] = len;
            }
        }
    }
    entry.submit(submit_flags());
    0
}

#[uprobe]
pub fn request_begin(ctx: ProbeContext) -> u32 {
    let texts = [text_arg(&ctx, 1, 2), text_arg(&ctx, 3, 4)];
    emit(&ctx, MarkerKind::RequestBegin, [0; 2], texts);
    // A count left by an earlier request with this id that never ended is not this one's
    // (after the record: the begin's time is taken first).
    let _ = CHUNK_TALLIES.remove(&tally_key(&ctx));
    0
}

#[uprobe]
pub fn request_end(ctx: ProbeContext) -> u32 {
    // SAFETY: reading the clock has no preconditions.
    let ts_ns = unsafe { bpf_ktime_get_ns() };
    let key = tally_key(&ctx);
    // SAFETY: copied out at once.
    let tally = unsafe { CHUNK_TALLIES.get(&key) }.copied();
    if tally.is_some() {
        let _ = CHUNK_TALLIES.remove(&key);
    }
    let (tallied, last_ns) =
        tally.map_or((0, 0), |t| (t.count.min(u32::MAX.into()) as u32, t.last_ns));
    let values = [arg(&ctx, 1) as u32 as u64, last_ns];
    emit_event(
        &ctx,
        (MarkerKind::RequestEnd, ts_ns),
        key.request_id,
        (values, tallied),
        [text_arg(&ctx, 2, 3), Text::None],
    )
}

#[uprobe]
pub fn stage_begin(ctx: ProbeContext) -> u32 {
    emit_value_and_text(&ctx, MarkerKind::StageBegin)
}

#[uprobe]
pub fn stage_end(ctx: ProbeContext) -> u32 {
    emit_value_and_text(&ctx, MarkerKind::StageEnd)
}

#[uprobe]
pub fn provider(ctx: ProbeContext) -> u32 {
    emit(
        &ctx,
        MarkerKind::Provider,
        [0; 2],
        [text_arg(&ctx, 1, 2), Text::None],
    )
}

#[uprobe]
pub fn first_byte(ctx: ProbeContext) -> u32 {
    emit(
        &ctx,
        MarkerKind::FirstByte,
        [0; 2],
        [Text::None, Text::None],
    )
}

/// The first chunk of a request is sent (its time is the time to first chunk); later ones
/// are counted.
#[uprobe]
pub fn chunk(ctx: ProbeContext) -> u32 {
    if !armed() {
        return 0;
    }
    let key = tally_key(&ctx);
    // SAFETY: reading the clock has no preconditions.
    let ts_ns = unsafe { bpf_ktime_get_ns() };
    if let Some(tally) = CHUNK_TALLIES.get_ptr_mut(&key) {
        // SAFETY: a map value stays valid while this program runs; its words are aligned.
        // Atomic: a broker may forward one request's chunks from two threads at once.
        unsafe { atomic_add_one(&raw mut (*tally).count) };
        // SAFETY: as above; an aligned 8-byte store does not tear.
        unsafe { (*tally).last_ns = ts_ns };
        return 0;
    }
    // (The first chunk's time, though unused, keeps LLVM from zeroing it with a `memset`.)
    let first = ChunkTally {
        count: 0,
        last_ns: ts_ns,
    };
    // Full: this chunk and the next go as records, as a first one does.
    let _ = CHUNK_TALLIES.insert(&key, &first, BPF_NOEXIST);
    emit_event(
        &ctx,
        (MarkerKind::Chunk, ts_ns),
        key.request_id,
        ([0; 2], 0),
        [Text::None, Text::None],
    )
}

#[uprobe]
pub fn token_usage(ctx: ProbeContext) -> u32 {
    let values = [arg(&ctx, 1), arg(&ctx, 2)];
    emit(
        &ctx,
        MarkerKind::TokenUsage,
        values,
        [Text::None, Text::None],
    )
}

#[uprobe]
pub fn fallback(ctx: ProbeContext) -> u32 {
    let texts = [text_arg(&ctx, 1, 2), text_arg(&ctx, 3, 4)];
    emit(&ctx, MarkerKind::Fallback, [0; 2], texts)
}
