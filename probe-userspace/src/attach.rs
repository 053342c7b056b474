//! Loads brokerprobe's eBPF object and attaches one uprobe per marker to one process.
//! Dropping [`Attached`] detaches everything.

use std::{fs, num::NonZeroU32};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray, RingBuf},
    programs::{UProbe, uprobe::UProbeScope},
};
use aya_log::EbpfLogger;

use crate::target::{Target, marker_symbol};

/// The eBPF object built by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/probe-ebpf"));

/// What attaching yields: the probes themselves and the two streams they produce.
pub struct Attached {
    pub probes: Probes,
    /// Marker events.
    pub events: RingBuf<MapData>,
    /// Kernel-side diagnostics (aya-log), forwarded to our logger.
    pub kernel_log: Option<EbpfLogger<&'static dyn log::Log>>,
}

pub struct Probes {
    /// Owns the programs and their links: uprobes stay attached while this lives.
    _ebpf: Ebpf,
    lost: PerCpuArray<MapData, u64>,
    pub markers: u32,
}

impl Attached {
    pub fn attach(target: &Target) -> Result<Self> {
        check_privileges()?;
        let level = kernel_log_level();
        let mut ebpf = EbpfLoader::new()
            .override_global(aya_log::LEVEL, &level, false)
            .load(EBPF_OBJECT)
            .context("loading brokerprobe's eBPF object into the kernel")?;
        let kernel_log = match EbpfLogger::init(&mut ebpf) {
            Ok(logger) => Some(logger),
            Err(e) => {
                log::warn!("kernel-side diagnostics unavailable: {e}");
                None
            }
        };
        let events = RingBuf::try_from(
            ebpf.take_map("MARKER_EVENTS")
                .context("MARKER_EVENTS map missing")?,
        )?;
        let lost = PerCpuArray::try_from(
            ebpf.take_map("MARKER_EVENTS_LOST")
                .context("MARKER_EVENTS_LOST map missing")?,
        )?;
        let pid = NonZeroU32::new(target.pid).context("PID 0 is not a process")?;
        for marker in &target.markers {
            let program = marker.kind.symbol_suffix();
            let uprobe: &mut UProbe = ebpf
                .program_mut(program)
                .with_context(|| format!("eBPF program {program} missing"))?
                .try_into()?;
            uprobe
                .load()
                .with_context(|| format!("loading eBPF program {program}"))?;
            uprobe
                .attach(
                    marker.file_offset,
                    &target.exe,
                    UProbeScope::OneProcess(pid),
                )
                .with_context(|| {
                    format!(
                        "attaching to {} at file offset {:#x} of {}",
                        marker_symbol(marker.kind),
                        marker.file_offset,
                        target.exe_display.display()
                    )
                })?;
            log::debug!(
                "attached {} at {:#x}",
                marker_symbol(marker.kind),
                marker.file_offset
            );
        }
        let markers = target.markers.len() as u32;
        Ok(Self {
            probes: Probes {
                _ebpf: ebpf,
                lost,
                markers,
            },
            events,
            kernel_log,
        })
    }
}

impl Probes {
    /// Events the kernel dropped because the ring buffer was full, since attach.
    pub fn events_lost(&self) -> Result<u64> {
        Ok(self.lost.get(&0, 0)?.iter().sum())
    }
}

/// The kernel side logs at most as verbosely as we print.
fn kernel_log_level() -> u8 {
    let level = match log::max_level() {
        log::LevelFilter::Off => return 0,
        log::LevelFilter::Error => aya_log::Level::Error,
        log::LevelFilter::Warn => aya_log::Level::Warn,
        log::LevelFilter::Info => aya_log::Level::Info,
        log::LevelFilter::Debug => aya_log::Level::Debug,
        log::LevelFilter::Trace => aya_log::Level::Trace,
    };
    level as u8
}

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Fails early with the capabilities to grant, instead of an EPERM deep in loading.
fn check_privileges() -> Result<()> {
    let status = fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let effective = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .context("no CapEff in /proc/self/status")?;
    let has = |cap: u32| effective & (1 << cap) != 0;
    if !(has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON))) {
        bail!(
            "brokerprobe needs root, or the capabilities CAP_BPF and CAP_PERFMON \
             (plus CAP_SYS_PTRACE for another user's process): run it with sudo, or \
             `setcap cap_bpf,cap_perfmon,cap_sys_ptrace+ep $(which brokerprobe)`"
        );
    }
    Ok(())
}
