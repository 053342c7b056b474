//! Uprobes on the broker's marker functions (docs/markers.md): each hit becomes one
//! [`MarkerEvent`] in the ring buffer, timestamped here, never by the broker.
//!
//! Program names equal the marker symbol suffixes, so user space attaches program
//! `request_begin` to `brokerprobe_v1_request_begin`.

use aya_ebpf::{
    helpers::{
        bpf_ktime_get_ns,
        generated::{bpf_probe_read_user, bpf_probe_read_user_str},
    },
    macros::uprobe,
    programs::ProbeContext,
};
use aya_log_ebpf::warn;
use probe_common::{
    event::{Counter, Source},
    marker::{MarkerEvent, MarkerKind, TEXT_CAP},
};

use crate::events::{EVENTS, armed, count_loss, current_task, put, submit_flags, write_header};

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

/// The shape request_end and stage_begin/end share: a 32-bit value (status or stage),
/// then one string (error type, or custom stage / tool name).
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
    emit_event(ctx, (kind, ts_ns), arg(ctx, 0), values, texts)
}

/// Writes one [`MarkerEvent`] of a hit at `ts_ns`, whichever probe family saw it.
#[inline(always)]
pub fn emit_event(
    ctx: &ProbeContext,
    (kind, ts_ns): (MarkerKind, u64),
    request_id: u64,
    values: [u64; 2],
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
    put(&mut event._reserved, 0);
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
    emit(&ctx, MarkerKind::RequestBegin, [0; 2], texts)
}

#[uprobe]
pub fn request_end(ctx: ProbeContext) -> u32 {
    emit_value_and_text(&ctx, MarkerKind::RequestEnd)
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

#[uprobe]
pub fn chunk(ctx: ProbeContext) -> u32 {
    emit(&ctx, MarkerKind::Chunk, [0; 2], [Text::None, Text::None])
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
