//! Loads brokerprobe's eBPF object and attaches one uprobe per marker to one process.
//! Dropping [`Probes`] detaches them.

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

/// What attaching yields: the probes, and the maps they write, which outlive them so that
/// what was written before the detach can still be read.
pub struct Attached {
    pub probes: Probes,
    /// Marker events.
    pub events: RingBuf<MapData>,
    pub lost: LostCounter,
    /// Kernel-side diagnostics (aya-log), forwarded to our logger.
    pub kernel_log: Option<EbpfLogger<&'static dyn log::Log>>,
    pub markers: u32,
}

/// Owns the programs and their links: the uprobes stay attached until this is dropped.
pub struct Probes(#[allow(dead_code, reason = "held for its Drop")] Ebpf);

/// Events the kernel dropped because the ring buffer was full.
pub struct LostCounter {
    map: PerCpuArray<MapData, u64>,
    last_total: u64,
}

impl Attached {
    /// Call [`check_privileges`] first: it says what is missing in one line.
    pub fn attach(target: &Target) -> Result<Self> {
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
        Ok(Self {
            probes: Probes(ebpf),
            events,
            lost: LostCounter {
                map: lost,
                last_total: 0,
            },
            kernel_log,
            markers: target.markers.len() as u32,
        })
    }
}

impl LostCounter {
    /// The total since attach; if the map cannot be read, the last total read (a counter
    /// must not fall back to 0 and then count everything again).
    pub fn total(&mut self) -> u64 {
        match self.map.get(&0, 0) {
            Ok(per_cpu) => self.last_total = per_cpu.iter().sum(),
            Err(e) => log::warn!("reading the lost-events counter: {e}"),
        }
        self.last_total
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
pub fn check_privileges() -> Result<()> {
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
