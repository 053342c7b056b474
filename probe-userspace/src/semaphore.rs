//! Raising the broker's marker semaphore (docs/markers.md): its markers are called only
//! while `brokerprobe_v1_semaphore` is non-zero. The kernel keeps that count for us: a
//! uprobe opened with a reference-counter offset increments the counter in the traced
//! process while the uprobe exists and decrements it when the uprobe goes, so the gate
//! closes even if brokerprobe is killed. The uprobe sits on `brokerprobe_v1_semaphore_anchor`,
//! an instruction after a `ret` that never runs: it costs nothing and no other tool's
//! uprobe on a marker can clash with its counter offset.

use std::{
    ffi::CString,
    fs,
    os::{
        fd::{FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

use anyhow::{Context as _, Result};

/// Where the semaphore and its anchor are, as file offsets of the broker's executable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Semaphore {
    pub anchor_offset: u64,
    pub counter_offset: u64,
}

/// The uprobe PMU's dynamic type id.
const UPROBE_PMU_TYPE: &str = "/sys/bus/event_source/devices/uprobe/type";
/// `PERF_UPROBE_REF_CTR_OFFSET_SHIFT`: the counter's offset goes in `config`'s top half.
const REF_CTR_OFFSET_SHIFT: u32 = 32;
/// `PERF_FLAG_FD_CLOEXEC` (not in the libc crate).
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 1 << 3;
/// `PERF_ATTR_SIZE_VER1`: the attribute layout below, enough for a uprobe.
const ATTR_SIZE_VER1: u32 = 72;

/// `struct perf_event_attr` up to `config2` (its first version).
#[repr(C)]
#[derive(Default)]
struct PerfEventAttr {
    kind: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    /// For uprobes: the path of the probed file.
    config1: u64,
    /// For uprobes: the probe's file offset.
    config2: u64,
}

/// Raises the semaphore of process `pid` until the returned fd is closed.
pub fn raise(exe: &Path, pid: u32, semaphore: Semaphore) -> Result<OwnedFd> {
    let pmu_type: u32 = fs::read_to_string(UPROBE_PMU_TYPE)
        .with_context(|| format!("reading {UPROBE_PMU_TYPE} (no uprobe support?)"))?
        .trim()
        .parse()
        .with_context(|| format!("parsing {UPROBE_PMU_TYPE}"))?;
    let path = CString::new(exe.as_os_str().as_bytes()).context("executable path has a NUL")?;
    let attr = PerfEventAttr {
        kind: pmu_type,
        size: ATTR_SIZE_VER1,
        config: semaphore.counter_offset << REF_CTR_OFFSET_SHIFT,
        config1: path.as_ptr() as u64,
        config2: semaphore.anchor_offset,
        ..PerfEventAttr::default()
    };
    let pid = i32::try_from(pid).context("PID out of range")?;
    // SAFETY: perf_event_open reads `attr` (ATTR_SIZE_VER1 bytes, all initialised) and the
    // NUL-terminated path it points to, both alive for the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            &attr as *const PerfEventAttr,
            pid,
            -1,
            -1,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| {
            format!(
                "raising the marker semaphore (uprobe at {:#x} with counter at {:#x})",
                semaphore.anchor_offset, semaphore.counter_offset
            )
        });
    }
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attribute_layout_is_the_kernels_first_version() {
        assert_eq!(size_of::<PerfEventAttr>(), ATTR_SIZE_VER1 as usize);
    }
}
