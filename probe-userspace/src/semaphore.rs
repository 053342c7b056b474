//! Raising the broker's marker semaphore (docs/markers.md): its markers are called only
//! while `brokerprobe_v1_semaphore` is non-zero. The kernel keeps that count for us: a
//! uprobe opened with a reference-counter offset increments the counter in the traced
//! process while the uprobe exists and decrements it when the uprobe goes, so the gate
//! closes even if brokerprobe is killed. The uprobe sits on `brokerprobe_v1_semaphore_anchor`,
//! an instruction after a `ret` that never runs: it costs nothing and no other tool's
//! uprobe on a marker can clash with its counter offset.
//!
//! USDT probes are gated the same way (their semaphores are counters of this kind), but
//! there the counted uprobe is the probe site itself, and it runs brokerprobe's program:
//! the kernel refuses two uprobes at one place with different counters, and aya opens
//! uprobes without one.

use std::{
    ffi::CString,
    fs,
    os::{
        fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
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
/// `PERF_EVENT_IOC_SET_BPF`, `_IOW('$', 8, __u32)` (not in the libc crate).
const PERF_EVENT_IOC_SET_BPF: libc::c_ulong = 0x4004_2408;
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
    open_uprobe(
        exe,
        pid,
        semaphore.anchor_offset,
        Some(semaphore.counter_offset),
    )
    .with_context(|| {
        format!(
            "raising the marker semaphore (uprobe at {:#x} with counter at {:#x})",
            semaphore.anchor_offset, semaphore.counter_offset
        )
    })
}

/// Runs `program` at each hit of the instruction at file offset `offset` in process
/// `pid`, and holds the counter at `counter_offset` (a USDT semaphore) up, until the
/// returned fd is closed.
pub fn attach_counted(
    exe: &Path,
    pid: u32,
    offset: u64,
    counter_offset: Option<u64>,
    program: BorrowedFd<'_>,
) -> Result<OwnedFd> {
    let event = open_uprobe(exe, pid, offset, counter_offset)?;
    // SAFETY: SET_BPF takes a program fd by value; both fds are open for the call.
    let rc = unsafe {
        libc::ioctl(
            event.as_raw_fd(),
            PERF_EVENT_IOC_SET_BPF,
            program.as_raw_fd(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .context("attaching the eBPF program to the uprobe (PERF_EVENT_IOC_SET_BPF)");
    }
    Ok(event)
}

/// A uprobe perf event at `offset` of `exe` in process `pid` (enabled at once), with
/// the kernel counting `counter_offset` up while it exists.
fn open_uprobe(exe: &Path, pid: u32, offset: u64, counter_offset: Option<u64>) -> Result<OwnedFd> {
    let pmu_type: u32 = fs::read_to_string(UPROBE_PMU_TYPE)
        .with_context(|| format!("reading {UPROBE_PMU_TYPE} (no uprobe support?)"))?
        .trim()
        .parse()
        .with_context(|| format!("parsing {UPROBE_PMU_TYPE}"))?;
    let path = CString::new(exe.as_os_str().as_bytes()).context("executable path has a NUL")?;
    let attr = PerfEventAttr {
        kind: pmu_type,
        size: ATTR_SIZE_VER1,
        config: counter_offset.unwrap_or(0) << REF_CTR_OFFSET_SHIFT,
        config1: path.as_ptr() as u64,
        config2: offset,
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
        let error = anyhow::Error::from(std::io::Error::last_os_error());
        return Err(crate::attach::uprobe_refused(error)).with_context(|| {
            format!(
                "opening a uprobe at file offset {offset:#x} of {}",
                exe.display()
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
