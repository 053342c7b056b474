//! Loads brokerprobe's eBPF object and attaches it to the broker's processes: per process,
//! one uprobe per marker, mapped USDT probe site, or mapped function (at its entry and
//! return), and the socket tracepoints (filtered in the kernel to those processes).
//! Dropping [`Probes`] detaches them.

use std::{
    fs,
    num::NonZeroU32,
    os::fd::{AsFd as _, OwnedFd},
};

use anyhow::{Context as _, Result, bail};
use aya::{
    Btf, BtfError, Ebpf, EbpfLoader,
    maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, RingBuf},
    programs::{
        BtfTracePoint, Program, ProgramError, TracePoint, UProbe,
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeLinkId, UProbeScope},
    },
};
use aya_log::EbpfLogger;
use probe_common::{
    event::Counter,
    marker::{ChunkTally, MarkerKind, TallyKey},
    socket::{Skipped, SocketState, socket_key},
    usdt::{UsdtSite, UsdtSpec},
};

use crate::{
    procnet::OpenSocket,
    semaphore,
    symbols::SymbolProbe,
    target::{Target, marker_symbol},
    usdt::{MappedProbe, runtime_address},
};

/// The eBPF program every USDT probe site runs (probe-ebpf/src/usdt.rs).
const USDT_PROGRAM: &str = "usdt";
/// The eBPF programs at a symbol-mapped function's entry and return
/// (probe-ebpf/src/symbols.rs).
const SYMBOL_PROGRAMS: [&str; 2] = ["symbol_entry", "symbol_return"];
/// Notes threads preempted with a trapped probe pending, so that USDT and symbol-mapped
/// hits are timed when they happened (probe-ebpf/src/trap_time.rs). Attached with the
/// first such probe: markers are called into, not trapped, and do not need it.
const TRAP_PREEMPTED: (&str, &str, &str) = ("trap_preempted", "sched", "sched_switch");

/// The eBPF object built by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/probe-ebpf"));

/// `BPF_NOEXIST`: a map insert that leaves an existing entry as it is.
const BPF_NOEXIST: u64 = 1;

/// Socket tracepoints: (program, category, tracepoints). docs/sockets.md says why each.
/// Accept's exit and close's entry are the only syscall tracepoints: the socket layer has
/// none that names the fd there.
const SOCKET_TRACEPOINTS: &[(&str, &str, &[&str])] = &[
    (
        "accept_exit",
        "syscalls",
        &["sys_exit_accept", "sys_exit_accept4"],
    ),
    ("close_enter", "syscalls", &["sys_enter_close"]),
    ("tcp_state", "sock", &["inet_sock_set_state"]),
    ("sock_send", "sock", &["sock_send_length"]),
    ("sock_recv", "sock", &["sock_recv_length"]),
];

/// A socket tracepoint newer kernels have: its program, the tracepoint, the kernel that
/// added it, and what is lost without it.
struct OptionalTracepoint {
    program: &'static str,
    category: &'static str,
    name: &'static str,
    since: &'static str,
    without: &'static str,
}

impl OptionalTracepoint {
    /// This kernel lacks the tracepoint.
    fn missing(&self, why: impl std::fmt::Display) {
        let Self {
            category,
            name,
            since,
            without,
            ..
        } = self;
        log::warn!(
            "no tracepoint {category}:{name} ({why}; it needs Linux {since} or later): {without}"
        );
    }

    /// The kernel's BTF, which a BTF tracepoint is attached through, cannot be read: the
    /// kernel may well have the tracepoint.
    fn without_btf(&self, why: impl std::fmt::Display) {
        let Self {
            category,
            name,
            without,
            ..
        } = self;
        log::warn!(
            "no tracepoint {category}:{name}: attaching it needs the kernel's BTF \
             (/sys/kernel/btf/vmlinux: {why}): {without}"
        );
    }
}

/// Arrivals, attached as a classic tracepoint: its record's protocol field turns other
/// protocols away before any lookup.
const ARRIVALS: OptionalTracepoint = OptionalTracepoint {
    program: "sk_ready",
    category: "sock",
    name: "sk_data_ready",
    since: "6.3",
    without: "upstream responses are timed when the broker reads them, not when they arrive",
};

/// Write starts, attached as a BTF tracepoint: its program reads none of the record's
/// fields, so the kernel need not write one.
const WRITE_STARTS: OptionalTracepoint = OptionalTracepoint {
    program: "send_begin",
    category: "tcp",
    name: "tcp_sendmsg_locked",
    since: "6.11",
    without: "writes are timed when they are done, not when they began",
};

/// What loading yields: the probes, and the maps they write, which outlive them so that
/// what was written before the detach can still be read.
pub struct Session {
    pub probes: Probes,
    /// Every probe family's events, in the order they happened.
    pub events: RingBuf<MapData>,
    pub counters: KernelCounters,
    /// Kernel-side diagnostics (aya-log), forwarded to our logger.
    pub kernel_log: Option<EbpfLogger<&'static dyn log::Log>>,
    pub socket_tracepoints: u32,
    pub socket_tallies: SocketTallies,
}

/// The kernel's tallies of sockets' reads and writes past their messages' copied starts
/// (docs/sockets.md), through a handle of its own on `SOCKETS`: it outlives the probes,
/// so exchanges still open at detach get their last tallies too.
pub struct SocketTallies(HashMap<MapData, u64, SocketState>);

impl SocketTallies {
    /// The socket's totals; None once the kernel no longer follows it.
    pub fn get(&self, pid: u32, fd: i32) -> Option<Skipped> {
        let state = self.0.get(&socket_key(pid, fd), 0).ok()?;
        Some(state.skipped)
    }
}

/// Owns the programs and their links: the probes stay attached until this is dropped (or
/// their process is [removed](Probes::remove)). They report nothing until
/// [`Probes::arm`], and nothing after [`Probes::disarm`].
pub struct Probes {
    ebpf: Ebpf,
    armed: Array<MapData, u32>,
    /// The socket probes' process filter: one bit per PID.
    traced: Array<MapData, u64>,
    sockets: HashMap<MapData, u64, SocketState>,
    /// What each USDT probe site's hits mean, per process.
    usdt_sites: HashMap<MapData, UsdtSite, UsdtSpec>,
    /// Streams' chunk counts (docs/markers.md, "Chunks"); a process's go with it.
    chunk_tallies: HashMap<MapData, TallyKey, ChunkTally>,
    processes: std::collections::HashMap<u32, ProcessProbes>,
    /// Whether [`TRAP_PREEMPTED`] is attached.
    trap_timing: bool,
}

/// Where a process's request timelines come from.
pub enum Stages {
    /// probe-markers' marker functions.
    Markers,
    /// USDT probes, through a probe map (docs/modes/usdt.md).
    Usdt(Vec<MappedProbe>),
    /// Functions' entries and returns, through a symbol map (docs/modes/symbols.md).
    Symbols(Vec<SymbolProbe>),
    /// None: only its sockets are followed.
    None,
}

/// One process's uprobes: markers and their semaphore hold, USDT probe sites, or mapped
/// functions' entries and returns.
struct ProcessProbes {
    links: Vec<(&'static str, UProbeLinkId)>,
    /// Holds the broker's marker semaphore up (docs/markers.md).
    semaphore: Option<OwnedFd>,
    /// One perf event per USDT probe site, which also holds the site's semaphore up.
    usdt_events: Vec<OwnedFd>,
    usdt_sites: Vec<UsdtSite>,
}

/// The kernel's per-CPU counters ([`Counter`]), summed.
pub struct KernelCounters {
    map: PerCpuArray<MapData, u64>,
    last: [u64; Counter::COUNT as usize],
}

impl Session {
    /// Loads the eBPF object, and attaches the socket tracepoints if `sockets` (they
    /// follow only the processes [added](Probes::add) later). Call [`check_privileges`]
    /// first: it says what is missing in one line.
    pub fn load(sockets: bool) -> Result<Self> {
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
        let events = RingBuf::try_from(take_map(&mut ebpf, "EVENTS")?)?;
        let counters = PerCpuArray::try_from(take_map(&mut ebpf, "COUNTERS")?)?;
        let sockets_map = take_map(&mut ebpf, "SOCKETS")?;
        let socket_tallies = SocketTallies(HashMap::try_from(second_handle(&sockets_map)?)?);
        let sockets_map = HashMap::try_from(sockets_map)?;
        let armed = Array::try_from(take_map(&mut ebpf, "ARMED")?)?;
        let traced = Array::try_from(take_map(&mut ebpf, "TRACED_PROCESSES")?)?;
        let usdt_sites = HashMap::try_from(take_map(&mut ebpf, "USDT_SITES")?)?;
        let chunk_tallies = HashMap::try_from(take_map(&mut ebpf, "CHUNK_TALLIES")?)?;
        let programs = MarkerKind::ALL.map(MarkerKind::symbol_suffix);
        for name in programs
            .into_iter()
            .chain([USDT_PROGRAM])
            .chain(SYMBOL_PROGRAMS)
        {
            program::<UProbe>(&mut ebpf, name)?
                .load()
                .with_context(|| format!("loading eBPF program {name}"))?;
        }
        let socket_tracepoints = if sockets {
            attach_socket_tracepoints(&mut ebpf)?
        } else {
            0
        };
        Ok(Self {
            probes: Probes {
                ebpf,
                armed,
                traced,
                sockets: sockets_map,
                usdt_sites,
                chunk_tallies,
                processes: std::collections::HashMap::new(),
                trap_timing: false,
            },
            events,
            counters: KernelCounters {
                map: counters,
                last: [0; Counter::COUNT as usize],
            },
            kernel_log,
            socket_tracepoints,
            socket_tallies,
        })
    }
}

impl Probes {
    /// Starts following `target`: its sockets, and its `stages`. Returns the uprobes
    /// attached. On failure nothing of it stays attached.
    pub fn add(&mut self, target: &Target, stages: &Stages) -> Result<u32> {
        self.set_traced(target.pid, true)
            .context("registering the PID with the socket probes")?;
        self.processes.insert(
            target.pid,
            ProcessProbes {
                links: Vec::new(),
                semaphore: None,
                usdt_events: Vec::new(),
                usdt_sites: Vec::new(),
            },
        );
        let attached = match stages {
            Stages::Markers => self.attach_markers(target),
            Stages::Usdt(probes) => {
                self.time_traps();
                self.attach_usdt(target, probes)
            }
            Stages::Symbols(probes) => {
                self.time_traps();
                self.attach_symbols(target, probes)
            }
            Stages::None => Ok(0),
        };
        if attached.is_err() {
            self.remove(target.pid);
        }
        attached
    }

    /// Attaches [`TRAP_PREEMPTED`], once. Without it (a kernel without BTF, say) trapped
    /// probes still work, timed less exactly: said once, not fatal.
    fn time_traps(&mut self) {
        if std::mem::replace(&mut self.trap_timing, true) {
            return;
        }
        let (program_name, category, name) = TRAP_PREEMPTED;
        let attached = program::<TracePoint>(&mut self.ebpf, program_name).and_then(|tracepoint| {
            tracepoint.load()?;
            tracepoint.attach(category, name)?;
            Ok(())
        });
        if let Err(e) = attached {
            log::warn!(
                "cannot watch {category}:{name} ({e:#}): a USDT or function-entry hit whose \
                 thread is preempted before its probe runs is timed late by the preemption \
                 (docs/modes/symbols.md, \"Timing\")"
            );
        }
    }

    fn attach_markers(&mut self, target: &Target) -> Result<u32> {
        let pid = NonZeroU32::new(target.pid).context("PID 0 is not a process")?;
        // request_begin last: a request is tracked only once every other marker is probed,
        // so none is seen with some of its markers missing.
        let mut markers = target.markers.clone();
        markers.sort_by_key(|marker| marker.kind == MarkerKind::RequestBegin);
        for marker in &markers {
            let program = marker.kind.symbol_suffix();
            let link = self::program::<UProbe>(&mut self.ebpf, program)?
                .attach(
                    marker.file_offset,
                    &target.exe,
                    UProbeScope::OneProcess(pid),
                )
                .map_err(|e| uprobe_refused(e.into()))
                .with_context(|| {
                    format!(
                        "attaching to {} at file offset {:#x} of {}",
                        marker_symbol(marker.kind),
                        marker.file_offset,
                        target.exe_display.display()
                    )
                })?;
            if let Some(process) = self.processes.get_mut(&target.pid) {
                process.links.push((program, link));
            }
            log::debug!(
                "PID {pid}: attached {} at {:#x}",
                marker_symbol(marker.kind),
                marker.file_offset
            );
        }
        // After the markers: the broker calls them only once they are probed.
        if let Some(semaphore) = target.semaphore {
            let hold = semaphore::raise(&target.exe, target.pid, semaphore)?;
            if let Some(process) = self.processes.get_mut(&target.pid) {
                process.semaphore = Some(hold);
            }
        }
        Ok(markers.len() as u32)
    }

    fn attach_usdt(&mut self, target: &Target, probes: &[MappedProbe]) -> Result<u32> {
        let program = self::program::<UProbe>(&mut self.ebpf, USDT_PROGRAM)?
            .fd()?
            .as_fd()
            .try_clone_to_owned()?;
        // As with markers: a request is tracked only once every other probe is in place.
        let mut probes: Vec<&MappedProbe> = probes.iter().collect();
        probes.sort_by_key(|probe| probe.kind == MarkerKind::RequestBegin);
        for probe in &probes {
            let site = UsdtSite {
                pid: target.pid,
                _reserved: 0,
                address: runtime_address(target.pid, &target.exe, probe.file_offset)
                    .with_context(|| format!("locating USDT probe {probe} in memory"))?,
            };
            self.usdt_sites
                .insert(site, probe.spec, 0)
                .with_context(|| format!("registering USDT probe {probe}"))?;
            let process = self
                .processes
                .get_mut(&target.pid)
                .context("process not registered")?;
            process.usdt_sites.push(site);
            let event = semaphore::attach_counted(
                &target.exe,
                target.pid,
                probe.file_offset,
                probe.semaphore_offset,
                program.as_fd(),
            )
            .with_context(|| format!("attaching to USDT probe {probe}"))?;
            process.usdt_events.push(event);
            log::debug!("PID {}: attached USDT probe {probe}", target.pid);
        }
        Ok(probes.len() as u32)
    }

    fn attach_symbols(&mut self, target: &Target, probes: &[SymbolProbe]) -> Result<u32> {
        let pid = NonZeroU32::new(target.pid).context("PID 0 is not a process")?;
        for probe in probes {
            // The return probe first: an entry is never noted without its return watched.
            for program in SYMBOL_PROGRAMS.into_iter().rev() {
                let point = UProbeAttachPoint {
                    location: UProbeAttachLocation::AbsoluteOffset(probe.file_offset),
                    cookie: Some(u64::from(probe.stage)),
                };
                let link = self::program::<UProbe>(&mut self.ebpf, program)?
                    .attach(point, &target.exe, UProbeScope::OneProcess(pid))
                    .map_err(|e| uprobe_refused(e.into()))
                    .with_context(|| {
                        format!(
                            "attaching {program} to `{}` at file offset {:#x}",
                            probe.function, probe.file_offset
                        )
                    })?;
                if let Some(process) = self.processes.get_mut(&target.pid) {
                    process.links.push((program, link));
                }
            }
            log::debug!("PID {pid}: timing `{}`", probe.function);
        }
        Ok(probes.len() as u32)
    }

    /// Stops following `pid` (it exited, or attaching it failed). The kernel takes about
    /// 0.1 s to unregister each uprobe, so they go on a thread of their own while the
    /// other processes' events keep being read.
    pub fn remove(&mut self, pid: u32) {
        let Some(process) = self.processes.remove(&pid) else {
            return;
        };
        let mut links = Vec::new();
        for (name, link) in process.links {
            let taken = program::<UProbe>(&mut self.ebpf, name)
                .and_then(|uprobe| Ok(uprobe.take_link(link)?));
            match taken {
                Ok(link) => links.push(link),
                Err(e) => log::debug!("PID {pid}: detaching {name}: {e:#}"),
            }
        }
        for site in &process.usdt_sites {
            let _ = self.usdt_sites.remove(site);
        }
        // Streams it left unended would hold their entries until the map filled (a walk of
        // at most MAX_TALLIED_STREAMS keys, once per process gone).
        let mut left: Vec<TallyKey> = self
            .chunk_tallies
            .keys()
            .filter_map(Result::ok)
            .filter(|key| key.tgid == pid)
            .collect();
        // A key deleted under the walk (another process's stream ending) restarts it from
        // the first key: the same key may come twice.
        left.sort_unstable_by_key(|key| key.request_id);
        left.dedup();
        let mut kept = 0;
        for key in &left {
            kept += usize::from(self.chunk_tallies.remove(key).is_err());
        }
        if kept > 0 {
            log::warn!("PID {pid}: {kept} of its stream chunk tallies could not be removed");
        }
        let (semaphore, usdt_events) = (process.semaphore, process.usdt_events);
        std::thread::spawn(move || drop((links, semaphore, usdt_events)));
        if let Err(e) = self.set_traced(pid, false) {
            log::warn!("PID {pid} stays in the socket probes' filter: {e:#}");
        }
    }

    /// Sets or clears `pid`'s bit in the socket probes' process filter.
    fn set_traced(&mut self, pid: u32, on: bool) -> Result<()> {
        let (index, bit) = (pid / 64, 1u64 << (pid % 64));
        let word = self.traced.get(&index, 0)?;
        let word = if on { word | bit } else { word & !bit };
        self.traced.set(index, word, 0)?;
        Ok(())
    }

    /// Stage uprobes attached (markers, USDT sites, symbol entries and returns), all
    /// processes together.
    pub fn markers(&self) -> u32 {
        self.processes
            .values()
            .map(|p| (p.links.len() + p.usdt_events.len()) as u32)
            .sum()
    }

    /// Lets the kernel follow sockets opened before the attach, so that their closes and
    /// the starts of their messages are seen. A socket the kernel already follows (its
    /// I/O since the process was registered) keeps its entry, and its message count.
    pub fn follow_open_sockets(&mut self, pid: u32, sockets: &[OpenSocket]) {
        for socket in sockets {
            let key = socket_key(pid, socket.fd);
            match self.sockets.insert(key, SocketState::NEW, BPF_NOEXIST) {
                Ok(()) => {}
                Err(MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => log::warn!("following open socket fd {}: {e}", socket.fd),
            }
        }
    }

    /// Every probe is in place: events from now on.
    pub fn arm(&mut self) -> Result<()> {
        self.armed
            .set(0, 1, 0)
            .context("switching the probes' events on")
    }

    /// No events from now on, before the probes go one by one. A failure only means
    /// the last events come while detaching, where they are counted and ignored.
    pub fn disarm(&mut self) {
        if let Err(e) = self.armed.set(0, 0, 0) {
            log::warn!("switching the probes' events off: {e}");
        }
    }
}

/// Program `name` of the object, as the kind it is.
fn program<'a, P>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut P>
where
    &'a mut P: TryFrom<&'a mut Program, Error = ProgramError>,
{
    let program = ebpf
        .program_mut(name)
        .with_context(|| format!("eBPF program {name} missing"))?;
    Ok(program.try_into()?)
}

fn take_map(ebpf: &mut Ebpf, name: &str) -> Result<Map> {
    ebpf.take_map(name)
        .with_context(|| format!("eBPF map {name} missing from the object"))
}

/// Another handle on an LRU hash map (a duplicate of its fd).
fn second_handle(map: &Map) -> Result<Map> {
    let Map::LruHashMap(data) = map else {
        bail!("eBPF map is not an LRU hash map");
    };
    let fd = data
        .fd()
        .as_fd()
        .try_clone_to_owned()
        .context("duplicating an eBPF map's fd")?;
    Ok(Map::LruHashMap(MapData::from_fd(fd)?))
}

fn attach_socket_tracepoints(ebpf: &mut Ebpf) -> Result<u32> {
    let mut attached = 0;
    for (program_name, category, tracepoints) in SOCKET_TRACEPOINTS {
        let tracepoint = program::<TracePoint>(ebpf, program_name)?;
        tracepoint
            .load()
            .with_context(|| format!("loading eBPF program {program_name}"))?;
        for name in *tracepoints {
            tracepoint.attach(category, name).with_context(|| {
                format!(
                    "attaching to tracepoint {category}:{name} (is tracefs mounted at \
                     /sys/kernel/tracing?)"
                )
            })?;
            attached += 1;
        }
    }
    let arrivals = program::<TracePoint>(ebpf, ARRIVALS.program)?;
    arrivals
        .load()
        .with_context(|| format!("loading eBPF program {}", ARRIVALS.program))?;
    match arrivals.attach(ARRIVALS.category, ARRIVALS.name) {
        Ok(_) => attached += 1,
        Err(e) => ARRIVALS.missing(e),
    }
    if attach_write_starts(ebpf)? {
        attached += 1;
    }
    log::debug!("attached {attached} socket tracepoints");
    Ok(attached)
}

/// Attaches [`WRITE_STARTS`]; false if this kernel lacks the tracepoint (or its BTF
/// cannot be read), which is said, not fatal. Any other failure is.
fn attach_write_starts(ebpf: &mut Ebpf) -> Result<bool> {
    let btf = match Btf::from_sys_fs() {
        Ok(btf) => btf,
        Err(e) => {
            WRITE_STARTS.without_btf(e);
            return Ok(false);
        }
    };
    let program = program::<BtfTracePoint>(ebpf, WRITE_STARTS.program)?;
    match program.load(WRITE_STARTS.name, &btf) {
        Ok(()) => {}
        Err(ProgramError::Btf(e @ BtfError::UnknownBtfTypeName { .. })) => {
            WRITE_STARTS.missing(e);
            return Ok(false);
        }
        Err(e) => {
            return Err(e)
                .with_context(|| format!("loading eBPF program {}", WRITE_STARTS.program));
        }
    }
    program.attach().with_context(|| {
        format!(
            "attaching to tracepoint {}:{}",
            WRITE_STARTS.category, WRITE_STARTS.name
        )
    })?;
    Ok(true)
}

impl KernelCounters {
    /// The total of `counter` since attach; if the map cannot be read, the last total
    /// read (a counter must not fall back to 0 and then count everything again).
    pub fn total(&mut self, counter: Counter) -> u64 {
        let index = counter as u32;
        match self.map.get(&index, 0) {
            Ok(per_cpu) => self.last[index as usize] = per_cpu.iter().sum(),
            Err(e) => log::warn!("reading kernel counter {counter:?}: {e}"),
        }
        self.last[index as usize]
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

fn effective_capabilities() -> Result<u64> {
    let status = fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .context("no CapEff in /proc/self/status")
}

/// A uprobe the kernel refused to create. Kernels since the 2025 fix to perf's uprobe PMU
/// let only CAP_SYS_ADMIN create uprobes (CAP_PERFMON sufficed before): without it the
/// refusal is EACCES, which then gets named for what it is.
pub fn uprobe_refused(error: anyhow::Error) -> anyhow::Error {
    let access_denied = error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.raw_os_error() == Some(libc::EACCES))
    });
    let sys_admin = effective_capabilities().is_ok_and(|caps| caps & (1 << CAP_SYS_ADMIN) != 0);
    if access_denied && !sys_admin {
        return anyhow::anyhow!(
            "this kernel lets only CAP_SYS_ADMIN create uprobes (CAP_BPF and CAP_PERFMON \
             do not suffice): run brokerprobe as root or grant CAP_SYS_ADMIN too; \
             `--mode sockets` needs only CAP_BPF and CAP_PERFMON"
        );
    }
    error
}

/// Fails early with the capabilities to grant, instead of an EPERM deep in loading.
pub fn check_privileges() -> Result<()> {
    let effective = effective_capabilities()?;
    let has = |cap: u32| effective & (1 << cap) != 0;
    if !(has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON))) {
        bail!(
            "brokerprobe needs root, or the capabilities CAP_BPF and CAP_PERFMON \
             (plus CAP_SYS_PTRACE for another user's process, and CAP_SYS_ADMIN for \
             uprobes on recent kernels): run it with sudo, or `setcap \
             cap_bpf,cap_perfmon,cap_sys_ptrace,cap_sys_admin+ep $(which brokerprobe)`"
        );
    }
    Ok(())
}
