//! One uprobe program for every USDT probe site (docs/modes/usdt.md): the site's
//! [`UsdtSpec`], looked up by (process, instruction pointer), says which marker event a
//! hit is and where its values are; the event written is the one a marker hit writes.

use aya_ebpf::{
    bindings::pt_regs,
    helpers::{bpf_probe_read_kernel, bpf_probe_read_user},
    macros::{map, uprobe},
    programs::ProbeContext,
};
use probe_common::{
    maps::MAX_USDT_SITES,
    marker::MarkerKind,
    usdt::{ArgKind, UsdtArg, UsdtSite, UsdtSpec},
};

use crate::{
    events::current_task,
    markers::{Text, emit_event},
    trap_time::hit_time,
};

/// Written by brokerprobe when it attaches a process's USDT probes, removed when it
/// lets the process go.
#[map]
static USDT_SITES: aya_ebpf::maps::HashMap<UsdtSite, UsdtSpec> =
    aya_ebpf::maps::HashMap::with_max_entries(MAX_USDT_SITES, 0);

#[uprobe]
pub fn usdt(ctx: ProbeContext) -> u32 {
    let (pid, tid) = current_task();
    // SAFETY: the context is the kernel's pt_regs of the hit; rip is within it. A uprobe
    // sees rip at the probed instruction.
    let address = unsafe { (*ctx.regs).rip };
    let ts_ns = hit_time(tid, address);
    let site = UsdtSite {
        pid,
        _reserved: 0,
        address,
    };
    // SAFETY: a hash map value, read while this program runs.
    let Some(spec) = (unsafe { USDT_SITES.get(&site) }) else {
        return 0;
    };
    let Some(kind) = MarkerKind::from_wire(spec.marker) else {
        return 0;
    };
    let request_id = read(&ctx, &spec.request_id);
    let values = [read(&ctx, &spec.values[0]), read(&ctx, &spec.values[1])];
    let first = if spec.fixed_text_len > 0 {
        Text::Fixed(&spec.fixed_text, spec.fixed_text_len)
    } else {
        text(&ctx, &spec.texts[0])
    };
    emit_event(
        &ctx,
        (kind, ts_ns),
        request_id,
        (values, 0),
        [first, text(&ctx, &spec.texts[1])],
    )
}

fn text(ctx: &ProbeContext, arg: &UsdtArg) -> Text<'static> {
    match read(ctx, arg) {
        0 => Text::None,
        ptr => Text::Terminated(ptr as usize),
    }
}

/// The argument's value, 0 if it is absent or cannot be read.
#[inline(always)]
fn read(ctx: &ProbeContext, arg: &UsdtArg) -> u64 {
    let register = || -> Option<u64> {
        let offset = arg.reg_offset as usize;
        if offset > size_of::<pt_regs>() - size_of::<u64>() {
            return None;
        }
        // SAFETY: an aligned u64 within the context's pt_regs (bounds checked above); the
        // helper cannot fault.
        unsafe { bpf_probe_read_kernel(ctx.regs.cast::<u8>().add(offset).cast::<u64>()).ok() }
    };
    let value = if arg.kind == ArgKind::Constant as u32 {
        Some(arg.value as u64)
    } else if arg.kind == ArgKind::Register as u32 {
        register()
    } else if arg.kind == ArgKind::Memory as u32 {
        register().and_then(|base| {
            let at = base.wrapping_add(arg.value as u64);
            // SAFETY: reads the broker's memory through the helper, which fails rather
            // than faults on a bad address; exactly the operand's size is read.
            unsafe {
                match arg.size.unsigned_abs() {
                    1 => bpf_probe_read_user(at as *const u8).ok().map(u64::from),
                    2 => bpf_probe_read_user(at as *const u16).ok().map(u64::from),
                    4 => bpf_probe_read_user(at as *const u32).ok().map(u64::from),
                    _ => bpf_probe_read_user(at as *const u64).ok(),
                }
            }
        })
    } else {
        None
    };
    value.map_or(0, |v| extend(v, arg.size))
}

/// The operand's bytes as a u64: zero-extended, or sign-extended when the size is negative.
#[inline(always)]
fn extend(value: u64, size: i32) -> u64 {
    let bits = match size.unsigned_abs() {
        1 => 8,
        2 => 16,
        4 => 32,
        _ => return value,
    };
    let shift = 64 - bits;
    if size < 0 {
        (((value << shift) as i64) >> shift) as u64
    } else {
        (value << shift) >> shift
    }
}
