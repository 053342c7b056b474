//! `brokerprobe attach`: kernel events → decode → assembly → exporters, until stopped.

use std::{
    collections::HashSet,
    fs,
    io::{IsTerminal as _, Write as _},
    net::SocketAddr,
    os::fd::AsRawFd,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use aya::maps::{MapData, RingBuf};
use aya_log::EbpfLogger;
use tokio::{
    io::{Interest, unix::AsyncFd},
    net::TcpListener,
    signal::unix::SignalKind,
    sync::mpsc,
    time::MissedTickBehavior,
};

use probe_common::{event::Counter, maps::EVENTS_POLL_MS};

use crate::{
    assembly::Assembler,
    attach::{KernelCounters, Probes, Session, Stages, check_privileges},
    clock::monotonic_ns,
    connections::{Connections, Progress, UpstreamNames},
    decode::{Record, decode},
    export::{
        ExchangeSink as _, ProbeHealth, RequestSink as _,
        jsonl::JsonLines,
        live::LiveView,
        otlp::{TraceExporter, TraceHealth, TracesConfig},
        prometheus::{MetricsConfig, PrometheusExporter, TargetInfo},
        report::{ReportFormat, ReportWriter, health_text},
        summary::{SharedSummary, Summary, lock},
    },
    notice,
    pidfd::ExitWatch,
    procnet, server,
    symbols::SymbolMap,
    target::{Selector, Target, marker_symbol},
    usdt::UsdtMap,
};

/// Which probe families to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Markers and sockets if the broker has markers, else sockets only (said once).
    Auto,
    /// Markers (and sockets); a broker without usable markers is an error.
    Markers,
    /// Sockets only, even if the broker has markers.
    Sockets,
}

/// Which processes to profile.
#[derive(Clone, Debug)]
pub enum Targets {
    /// These processes (replicas of one broker); the run ends when the last has exited.
    Pids(Vec<u32>),
    /// Every process matching, now and whenever one starts, until stopped.
    Follow(Selector),
}

pub struct AttachOptions {
    pub targets: Targets,
    pub mode: Mode,
    /// Follow the broker's TCP sockets (off: markers only).
    pub sockets: bool,
    /// Time requests from these USDT probes instead of markers.
    pub usdt: Option<UsdtMap>,
    /// Time stages from these functions' calls (no markers, no USDT probes).
    pub symbols: Option<SymbolMap>,
    /// Upstream peer address → name in metrics and reports.
    pub upstream_names: Vec<(SocketAddr, String)>,
    /// An exchange whose response has been quiet this long is over.
    pub exchange_idle: Duration,
    pub exchanges_out: Option<PathBuf>,
    /// Symbol mode: every call of a mapped function, as JSON lines.
    pub stages_out: Option<PathBuf>,
    pub metrics_addr: SocketAddr,
    pub duration: Option<Duration>,
    /// Print the per-stage table this often while running.
    pub live_interval: Option<Duration>,
    pub requests_out: Option<PathBuf>,
    /// Requests open longer than this are dropped and counted as expired.
    pub request_timeout: Duration,
    pub max_open_requests: usize,
    /// Histogram buckets and label bounds of /metrics (the bound also caps the tables).
    pub metrics: MetricsConfig,
    /// OTLP export and the embedded trace UI; None: no traces.
    pub traces: Option<TracesConfig>,
    /// The report written on exit and on SIGUSR1: its format, its file (None: standard
    /// output), and how many of the slowest requests it lists.
    pub report: ReportFormat,
    pub report_out: Option<PathBuf>,
    pub report_slowest: usize,
    /// Show the live terminal view while attached.
    pub live_view: bool,
}

/// Everything downstream of the ring buffer.
struct Pipeline {
    connections: Connections,
    assembler: Assembler,
    /// Scratch: what the connection tracker reported for the event at hand.
    progress: Vec<Progress>,
    prometheus: PrometheusExporter,
    /// Shared with the HTTP server, which renders `/stats` from it.
    summary: SharedSummary,
    requests_out: Option<JsonLines>,
    exchanges_out: Option<JsonLines>,
    stages_out: Option<JsonLines>,
    traces: Option<TraceExporter>,
    report: ReportWriter,
    /// Stage names of the symbol map, by the number stage samples carry.
    symbol_stages: Vec<String>,
    /// When `attach` began, to say how long the first event took.
    started: Instant,
    /// Whether the user was told that no event has come yet.
    told_quiet: bool,
    events: u64,
    decode_errors: u64,
}

impl Pipeline {
    fn on_record(&mut self, bytes: &[u8]) {
        self.events += 1;
        if self.events == 1 {
            notice::say(format!(
                "brokerprobe: first event {} ms after start",
                self.started.elapsed().as_millis()
            ));
        }
        match decode(bytes) {
            Ok(Record::Marker(event)) => {
                if let Some(request) = self.assembler.on_event(event) {
                    let trace_id = self
                        .traces
                        .as_mut()
                        .and_then(|traces| traces.record(&request));
                    self.prometheus.record(&request);
                    lock(&self.summary).record(&request, trace_id);
                    if let Some(out) = &mut self.requests_out {
                        out.record(&request);
                    }
                    // Exchanges held for their votes may have gone to the request.
                    self.export_exchanges();
                }
            }
            Ok(Record::Socket(io)) => {
                self.connections.on_io(io, &mut self.progress);
                self.forward_progress();
            }
            Ok(Record::StageSample(sample)) => {
                let stage = self
                    .symbol_stages
                    .get(sample.stage as usize)
                    .map_or("unknown", String::as_str);
                let duration_ns = sample.end_ns - sample.begin_ns;
                self.prometheus
                    .record_stage_sample(sample.pid, stage, duration_ns);
                lock(&self.summary).record_stage_sample(stage, duration_ns);
                if let Some(out) = &mut self.stages_out {
                    out.record_stage_sample(&sample, stage);
                }
            }
            Err(e) => {
                if self.decode_errors == 0 {
                    log::warn!("undecodable event (counted from now on): {e}");
                }
                self.decode_errors += 1;
            }
        }
    }

    /// Once, if nothing has come for a while: a silent probe looks like a broken one.
    fn tell_if_quiet(&mut self) {
        if self.events == 0 && !self.told_quiet && self.started.elapsed() >= QUIET_HINT {
            self.told_quiet = true;
            notice::say(format!(
                "brokerprobe: no event in {} s: events come with requests (send the broker \
                 one), and with socket I/O; `brokerprobe inspect` shows what was found",
                QUIET_HINT.as_secs()
            ));
        }
    }

    fn forward_progress(&mut self) {
        for progress in std::mem::take(&mut self.progress) {
            self.assembler.on_progress(progress);
        }
        self.export_exchanges();
    }

    /// Reports the exchanges that ended and are attributed (or never will be).
    fn export_exchanges(&mut self) {
        for exchange in self.assembler.take_exchanges() {
            self.prometheus.record_exchange(&exchange);
            lock(&self.summary).record_exchange(&exchange);
            if let Some(out) = &mut self.exchanges_out {
                out.record_exchange(&exchange);
            }
            if let Some(traces) = &mut self.traces {
                traces.record_exchange(&exchange);
            }
        }
    }

    fn expire(&mut self, options: &AttachOptions) {
        let now = monotonic_ns();
        let expired = self
            .assembler
            .expire(now, options.request_timeout.as_nanos() as u64);
        if expired > 0 {
            log::warn!(
                "{expired} requests never ended within {:?}: dropped (counted)",
                options.request_timeout
            );
        }
        self.connections.expire_idle(now, &mut self.progress);
        self.forward_progress();
        if let Some(traces) = &mut self.traces {
            traces.tick();
        }
    }

    fn health(&self, attached: AttachedCounts, counters: &mut KernelCounters) -> ProbeHealth {
        ProbeHealth {
            attached_markers: attached.markers,
            attached_socket_tracepoints: attached.socket_tracepoints,
            events: self.events,
            marker_events_lost: counters.total(Counter::MarkerEventsLost),
            socket_events_lost: counters.total(Counter::SocketEventsLost),
            socket_io_without_syscall: counters.total(Counter::SocketIoWithoutSyscall),
            decode_errors: self.decode_errors,
            requests_out_dropped: self.requests_out.as_ref().map_or(0, JsonLines::dropped),
            exchanges_out_dropped: self.exchanges_out.as_ref().map_or(0, JsonLines::dropped),
            stages_out_dropped: self.stages_out.as_ref().map_or(0, JsonLines::dropped),
            in_flight: self.assembler.in_flight(),
            assembly: self.assembler.stats(),
            connections: self.connections.stats(),
            traces: self
                .traces
                .as_ref()
                .map_or_else(TraceHealth::default, TraceExporter::health),
        }
    }
}

#[derive(Clone, Copy)]
struct AttachedCounts {
    markers: u32,
    socket_tracepoints: u32,
}

/// Whether the socket tracepoints are wanted at all.
fn wants_sockets(options: &AttachOptions) -> bool {
    options.mode == Mode::Sockets || options.sockets
}

/// Where this target's request timelines come from (its sockets are followed if wanted
/// at all), or why it cannot be profiled.
fn choose_stages(options: &AttachOptions, target: &Target) -> Result<Stages> {
    let executable = || -> Result<memmap2::Mmap> {
        let file = fs::File::open(&target.exe)
            .with_context(|| format!("opening the executable of PID {}", target.pid))?;
        // SAFETY: a running executable cannot be written to (ETXTBSY).
        unsafe { memmap2::Mmap::map(&file) }.context("mapping the executable")
    };
    if let Some(map) = &options.symbols {
        let probes = map
            .resolve(&executable()?)
            .with_context(|| format!("{target}: its symbol map"))?;
        return Ok(Stages::Symbols(probes));
    }
    if let Some(map) = &options.usdt {
        let probes = map
            .resolve(&executable()?)
            .with_context(|| format!("{target}: its USDT probes"))?;
        if target.marker_problem.is_none() {
            log::info!(
                "PID {}: it has markers too; timing it from its USDT probes (--usdt-map)",
                target.pid
            );
        }
        return Ok(Stages::Usdt(probes));
    }
    Ok(if uses_markers(options, target)? {
        Stages::Markers
    } else {
        Stages::None
    })
}

/// Whether this target gets its markers probed, or why it cannot be profiled.
fn uses_markers(options: &AttachOptions, target: &Target) -> Result<bool> {
    match (options.mode, target.marker_problem.as_ref()) {
        (Mode::Sockets, _) => Ok(false),
        (Mode::Markers | Mode::Auto, None) => Ok(true),
        (Mode::Markers, Some(problem)) => anyhow::bail!("{target}: {problem}"),
        (Mode::Auto, Some(problem)) if !options.sockets => {
            anyhow::bail!("{target}: {problem}; and --no-sockets leaves nothing to follow")
        }
        (Mode::Auto, Some(problem)) => {
            notice::say(format!(
                "brokerprobe: no usable markers: {target}: {problem}\nbrokerprobe: socket-only \
                 mode: timing the broker's inbound requests and upstream calls from its TCP \
                 sockets (no stages)"
            ));
            Ok(false)
        }
    }
}

/// Why the run ended.
enum Stop {
    Signal(&'static str),
    /// The user quit the live view.
    Quit,
    Duration,
    /// Every process given by PID has exited.
    TargetsExited,
}

/// The broker's processes being profiled, with their `replica` numbers.
struct Processes {
    /// Slot i holds the PID of replica i, or None once it exited (the next process
    /// attached takes the lowest free slot, so series continue across restarts).
    replicas: Vec<Option<u32>>,
    /// PIDs whose process exited, from one task per process.
    exits: mpsc::UnboundedSender<u32>,
    /// Processes `--follow` found but could not profile: said once, not retried.
    refused: HashSet<u32>,
}

impl Processes {
    fn new() -> (Self, mpsc::UnboundedReceiver<u32>) {
        let (exits, exited) = mpsc::unbounded_channel();
        let processes = Self {
            replicas: Vec::new(),
            exits,
            refused: HashSet::new(),
        };
        (processes, exited)
    }

    fn contains(&self, pid: u32) -> bool {
        self.replicas.contains(&Some(pid))
    }

    fn is_empty(&self) -> bool {
        self.replicas.iter().all(Option::is_none)
    }

    /// Takes the lowest free replica number for `pid`, and reports its exit.
    fn insert(&mut self, pid: u32, exit: ExitWatch) -> usize {
        let slot = match self.replicas.iter().position(Option::is_none) {
            Some(free) => free,
            None => {
                self.replicas.push(None);
                self.replicas.len() - 1
            }
        };
        self.replicas[slot] = Some(pid);
        let exits = self.exits.clone();
        tokio::spawn(async move {
            if let Err(e) = exit.exited().await {
                log::warn!("watching PID {pid} for its exit: {e}");
                return;
            }
            let _ = exits.send(pid);
        });
        slot
    }

    fn remove(&mut self, pid: u32) {
        for slot in &mut self.replicas {
            if *slot == Some(pid) {
                *slot = None;
            }
        }
    }
}

/// One process found: opened and checked, nothing attached yet.
struct Found {
    target: Target,
    /// Watches this very process, whatever later reuses its PID.
    exit: ExitWatch,
    /// Where its request timelines come from.
    stages: Stages,
}

/// The process `pid`, and a watch on its exit.
fn open(pid: u32) -> Result<(Target, ExitWatch)> {
    let target = Target::open(pid)?;
    let exit = ExitWatch::new(target.pid)
        .with_context(|| format!("watching PID {} for its exit", target.pid))?;
    Ok((target, exit))
}

/// Which probes an opened process gets (said when it cannot have its markers).
fn find(options: &AttachOptions, (target, exit): (Target, ExitWatch)) -> Result<Found> {
    let stages = choose_stages(options, &target)?;
    Ok(Found {
        target,
        exit,
        stages,
    })
}

/// `--follow`: a process that matches but cannot be profiled is said, not fatal.
fn refused<T>(selector: &Selector, pid: u32, result: Result<T>) -> Option<T> {
    result
        .inspect_err(|e| {
            notice::say(format!(
                "brokerprobe: PID {pid} matches {selector} but is not profiled: {e:#}"
            ));
        })
        .ok()
}

/// Everything a run holds besides the pipeline.
struct Run<'a> {
    options: &'a AttachOptions,
    probes: Probes,
    processes: Processes,
    metrics_url: String,
    socket_tracepoints: u32,
}

/// Tells the user a process is attached (stdout flushed: scripts wait for the line).
fn announce(line: String) {
    notice::say(line);
    let _ = std::io::stdout().flush();
}

impl Run<'_> {
    /// Attaches to one process; returns its announcement, to be made once its events flow
    /// (the probes armed).
    fn attach_process(&mut self, found: Found, pipeline: &mut Pipeline) -> Result<String> {
        let Found {
            target,
            exit,
            stages,
        } = found;
        let pid = target.pid;
        let markers = self.probes.add(&target, &stages)?;
        if self.socket_tracepoints > 0 {
            // After attaching: a connection opened meanwhile is listed here or, if its
            // handshake was not done yet, learned from /proc at its first I/O.
            let open = match procnet::established_sockets(pid) {
                Ok(open) => open,
                Err(e) => {
                    self.probes.remove(pid);
                    return Err(e)
                        .with_context(|| format!("listing the open sockets of PID {pid}"));
                }
            };
            self.probes.follow_open_sockets(pid, &open);
            log::info!("PID {pid}: {} TCP connections already open", open.len());
            for socket in open {
                pipeline.connections.learn(pid, socket);
            }
        }
        let replica = self.processes.insert(pid, exit);
        let sockets = self.socket_tracepoints > 0;
        let mode = match (&stages, sockets) {
            (Stages::Markers, true) => "markers+sockets",
            (Stages::Markers, false) => "markers",
            (Stages::Usdt(_), true) => "usdt+sockets",
            (Stages::Usdt(_), false) => "usdt",
            (Stages::Symbols(_), true) => "symbols+sockets",
            (Stages::Symbols(_), false) => "symbols",
            (Stages::None, _) => "sockets",
        };
        pipeline.prometheus.process_attached(&TargetInfo {
            pid,
            replica,
            name: target.name.clone(),
            mode,
        });
        let probes = match &stages {
            Stages::Markers => format!("{markers} markers"),
            Stages::Usdt(_) => format!("{markers} USDT probe sites"),
            Stages::Symbols(_) => format!("entry and return probes to {markers} functions"),
            Stages::None => String::new(),
        };
        let what = match (probes.is_empty(), sockets) {
            (false, true) => format!(
                "{probes} and {} socket tracepoints",
                self.socket_tracepoints
            ),
            (false, false) => probes,
            (true, _) => format!("{} socket tracepoints", self.socket_tracepoints),
        };
        if matches!(stages, Stages::Markers) && !target.missing.is_empty() {
            let names: Vec<String> = target.missing.iter().map(|k| marker_symbol(*k)).collect();
            log::info!("not in PID {pid} (never called): {}", names.join(", "));
        }
        Ok(format!(
            "brokerprobe: attached {what} to {target} as replica {replica}; metrics on {}",
            self.metrics_url
        ))
    }

    /// `--follow`: attaches to processes that started matching since the last look.
    fn look_for_new(&mut self, selector: &Selector, pipeline: &mut Pipeline) {
        for pid in selector.scan() {
            if self.processes.contains(pid) || self.processes.refused.contains(&pid) {
                continue;
            }
            let followed = open(pid)
                .and_then(|opened| find(self.options, opened))
                .and_then(|found| self.attach_process(found, pipeline))
                .map(announce);
            if refused(selector, pid, followed).is_none() {
                self.processes.refused.insert(pid);
            }
        }
    }

    /// A process exited: its probes go, and its requests still open are dropped (counted).
    fn exited(&mut self, pid: u32, pipeline: &mut Pipeline) {
        let dropped = pipeline.assembler.end_process(pid);
        notice::say(format!(
            "brokerprobe: PID {pid} exited ({dropped} requests in flight dropped)"
        ));
        let _ = std::io::stdout().flush();
        self.probes.remove(pid);
        self.processes.remove(pid);
        pipeline.prometheus.process_exited(pid);
    }

    fn counts(&self) -> AttachedCounts {
        AttachedCounts {
            markers: self.probes.markers(),
            socket_tracepoints: self.socket_tracepoints,
        }
    }
}

pub async fn attach(mut options: AttachOptions) -> Result<()> {
    let started = Instant::now();
    // Before anything slow: SIGUSR1's default action would end brokerprobe mid-attach.
    let report_asked = tokio::signal::unix::signal(SignalKind::user_defined1())?;
    // Every process given is checked before anything changes: a wrong PID is refused whole.
    let opened: Vec<(Target, ExitWatch)> = match &options.targets {
        Targets::Pids(pids) => {
            let mut seen = HashSet::new();
            pids.iter()
                .filter(|pid| seen.insert(**pid))
                .map(|pid| open(*pid))
                .collect::<Result<_>>()?
        }
        Targets::Follow(selector) => selector
            .scan()
            .into_iter()
            .filter_map(|pid| refused(selector, pid, open(pid)))
            .collect(),
    };
    // Before creating any output file or port: a refused run leaves nothing changed.
    check_privileges()?;
    if options.live_view && !std::io::stdout().is_terminal() {
        anyhow::bail!(
            "the live view (--tui, top) needs a terminal, and standard output is not one: \
             use --interval or --report instead"
        );
    }
    let found: Vec<Found> = match &options.targets {
        Targets::Pids(_) => opened
            .into_iter()
            .map(|opened| find(&options, opened))
            .collect::<Result<_>>()?,
        Targets::Follow(selector) => opened
            .into_iter()
            .filter_map(|opened| {
                let pid = opened.0.pid;
                refused(selector, pid, find(&options, opened))
            })
            .collect(),
    };
    // Bind before attaching, so a taken port fails before touching the broker.
    let listener = TcpListener::bind(options.metrics_addr)
        .await
        .with_context(|| {
            format!(
                "binding the metrics endpoint on {} (choose another with --metrics-addr)",
                options.metrics_addr
            )
        })?;
    let metrics_url = format!("http://{}/metrics", listener.local_addr()?);
    let create = |path: &Option<PathBuf>| {
        path.as_deref()
            .map(|path| {
                JsonLines::create(path).with_context(|| format!("creating {}", path.display()))
            })
            .transpose()
    };
    let requests_out = create(&options.requests_out)?;
    let exchanges_out = create(&options.exchanges_out)?;
    let stages_out = create(&options.stages_out)?;
    let report = ReportWriter::create(options.report, options.report_out.clone())?;
    let service = match (&options.targets, found.first()) {
        (_, Some(first)) => first.target.name.clone(),
        (Targets::Follow(Selector::Name(name)), None) => name.clone(),
        (Targets::Follow(Selector::Path(path)), None) => path
            .file_name()
            .map_or_else(|| "broker".into(), |n| n.to_string_lossy().into_owned()),
        (Targets::Pids(_), None) => "broker".into(),
    };
    let traces = match options.traces.take() {
        Some(config) => Some(TraceExporter::start(config, &service)?),
        None => None,
    };

    let session = Session::load(wants_sockets(&options))?;
    let socket_tallies = session.socket_tallies;
    let (processes, mut exited) = Processes::new();
    let mut run = Run {
        options: &options,
        probes: session.probes,
        processes,
        metrics_url,
        socket_tracepoints: session.socket_tracepoints,
    };
    let mut pipeline = Pipeline {
        connections: Connections::new(
            UpstreamNames::new(options.upstream_names.iter().cloned()),
            options.exchange_idle.as_nanos() as u64,
            Box::new(|pid, fd| {
                let sockets = procnet::established_sockets(pid).ok()?;
                sockets.into_iter().find(|s| s.fd == fd)
            }),
            Box::new(move |pid, fd| socket_tallies.get(pid, fd)),
        ),
        assembler: Assembler::new(options.max_open_requests),
        progress: Vec::new(),
        prometheus: PrometheusExporter::new(&options.metrics)?,
        summary: Arc::new(Mutex::new(Summary::new(
            options.metrics.max_label_values,
            options.report_slowest,
        ))),
        requests_out,
        exchanges_out,
        stages_out,
        traces,
        report,
        symbol_stages: options
            .symbols
            .as_ref()
            .map_or_else(Vec::new, SymbolMap::stage_names),
        started,
        told_quiet: false,
        events: 0,
        decode_errors: 0,
    };
    if let Some(traces) = &pipeline.traces {
        notice::say(format!(
            "brokerprobe: traces to {}",
            traces.destinations.join(" and ")
        ));
    }
    let mut announcements = Vec::new();
    for found in found {
        announcements.push(run.attach_process(found, &mut pipeline)?);
    }
    if let Targets::Follow(selector) = &options.targets
        && run.processes.is_empty()
    {
        notice::say(format!(
            "brokerprobe: waiting for a process with {selector}; metrics on {}",
            run.metrics_url
        ));
    }
    let all_attached_ns = monotonic_ns();
    pipeline.connections.open_window(all_attached_ns);
    pipeline.assembler.open_window(all_attached_ns);
    run.probes.arm()?;
    // Only now: whoever waits for "attached" (a user, a test) may send requests at once.
    announcements.into_iter().for_each(announce);
    let server = tokio::spawn(server::serve(
        listener,
        pipeline.prometheus.registry(),
        pipeline.summary.clone(),
    ));
    let kernel = Kernel {
        events: session.events,
        counters: session.counters,
        log: session.kernel_log,
    };
    let (quit, quit_asked) = mpsc::unbounded_channel();
    let live_view = if options.live_view {
        let title = match &options.targets {
            Targets::Pids(pids) => {
                let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
                format!("{service}[{}]", pids.join(","))
            }
            Targets::Follow(_) => format!("{service}[following]"),
        };
        Some(LiveView::start(pipeline.summary.clone(), title, quit)?)
    } else {
        None
    };
    let mut asks = Asks {
        quit: quit_asked,
        report: report_asked,
    };
    let stopped = event_loop(run, kernel, &mut exited, &mut asks, &mut pipeline).await;
    if let Some(live_view) = live_view
        && let Err(e) = live_view.stop()
    {
        // What was measured is still written out.
        log::warn!("the live view: {e:#}");
    }
    let (stop, health) = stopped?;
    server.abort();
    match stop {
        Stop::Signal(name) => log::info!("{name}: detached"),
        Stop::Quit => log::info!("quit: detached"),
        Stop::Duration => log::info!("duration elapsed: detached"),
        Stop::TargetsExited => log::info!("the broker exited: detached"),
    }
    if let Some(out) = &mut pipeline.requests_out {
        out.finish().context("writing --requests-out")?;
    }
    if let Some(out) = &mut pipeline.exchanges_out {
        out.finish().context("writing --exchanges-out")?;
    }
    if let Some(out) = &mut pipeline.stages_out {
        out.finish().context("writing --stages-out")?;
    }
    let mut summary = lock(&pipeline.summary);
    summary.update_health(&health);
    if options.report_out.is_some() {
        println!("{}\n{}", summary.render(false), health_text(&health));
    }
    pipeline.report.write(&summary)?;
    Ok(())
}

/// What the user can ask for while attached, besides stopping by signal.
struct Asks {
    /// Quit, from the live view.
    quit: mpsc::UnboundedReceiver<()>,
    /// A report now (SIGUSR1).
    report: tokio::signal::unix::Signal,
}

/// What the kernel side writes, read until the end.
struct Kernel {
    events: RingBuf<MapData>,
    counters: KernelCounters,
    log: Option<EbpfLogger<&'static dyn log::Log>>,
}

/// How long without any event before the user is told what to check.
const QUIET_HINT: Duration = Duration::from_secs(10);

/// How often `--follow` looks for new processes: a restarted broker is attached within
/// this (plus its attach time).
const FOLLOW_SCAN: Duration = Duration::from_millis(200);

/// Runs until a signal, the duration, or the broker's exit; detaches, reads what the kernel
/// wrote up to the detach, and returns why it stopped and the final health figures.
async fn event_loop(
    mut run: Run<'_>,
    kernel: Kernel,
    exited: &mut mpsc::UnboundedReceiver<u32>,
    asks: &mut Asks,
    pipeline: &mut Pipeline,
) -> Result<(Stop, ProbeHealth)> {
    let options = run.options;
    let Kernel {
        events,
        mut counters,
        log: kernel_log,
    } = kernel;
    let mut ring = watch(events)?;
    let mut kernel_log = kernel_log.map(watch).transpose()?;
    let mut sigint = tokio::signal::unix::signal(SignalKind::interrupt())?;
    let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())?;
    let deadline = async {
        match options.duration {
            Some(duration) => tokio::time::sleep(duration).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    let mut housekeeping = tokio::time::interval(Duration::from_secs(1));
    // Probes wake us only for a batch (EVENTS_WAKEUP_BYTES); anything less is read here.
    let mut poll = tokio::time::interval(Duration::from_millis(EVENTS_POLL_MS));
    poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut live = options.live_interval.map(tokio::time::interval);
    let following = match &options.targets {
        Targets::Follow(selector) => Some(selector.clone()),
        Targets::Pids(_) => None,
    };
    let mut follow_scan = following.as_ref().map(|_| {
        let mut scan = tokio::time::interval(FOLLOW_SCAN);
        scan.set_missed_tick_behavior(MissedTickBehavior::Delay);
        scan
    });

    let stop = loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                drain(guard.get_inner_mut(), pipeline);
                guard.clear_ready();
            }
            _ = poll.tick() => drain(ring.get_mut(), pipeline),
            guard = readable(&mut kernel_log) => {
                let mut guard = guard?;
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
            _ = housekeeping.tick() => {
                // Idle exchanges are judged against the kernel's tallies as they are now:
                // the records before them first.
                drain(ring.get_mut(), pipeline);
                pipeline.tell_if_quiet();
                pipeline.expire(options);
                let health = pipeline.health(run.counts(), &mut counters);
                pipeline.prometheus.update_health(&health);
                lock(&pipeline.summary).update_health(&health);
            }
            Some(pid) = exited.recv() => {
                // Its last events first.
                drain(ring.get_mut(), pipeline);
                run.exited(pid, pipeline);
                if following.is_none() && run.processes.is_empty() {
                    notice::say("brokerprobe: every process profiled has exited; writing out what was seen");
                    std::io::stdout().flush()?;
                    break Stop::TargetsExited;
                }
            }
            _ = tick(&mut follow_scan) => {
                if let Some(selector) = &following {
                    run.look_for_new(selector, pipeline);
                }
            }
            _ = tick(&mut live) => print_live(pipeline),
            _ = asks.report.recv() => {
                if options.live_view && options.report_out.is_none() {
                    notice::say("SIGUSR1: the live view holds the terminal; --report-out FILE takes the report");
                    continue;
                }
                let health = pipeline.health(run.counts(), &mut counters);
                let mut summary = lock(&pipeline.summary);
                summary.update_health(&health);
                if let Err(e) = pipeline.report.write(&summary) {
                    log::warn!("SIGUSR1: {e:#}");
                }
            }
            Some(()) = asks.quit.recv() => break Stop::Quit,
            _ = sigint.recv() => break Stop::Signal("SIGINT"),
            _ = sigterm.recv() => break Stop::Signal("SIGTERM"),
            () = &mut deadline => break Stop::Duration,
        }
    };
    // Events off, then detach, so no hit lands after the final drain; programs already
    // running on other CPUs finish within microseconds, the grace period lets their
    // records commit.
    run.probes.disarm();
    let detach_ns = monotonic_ns();
    pipeline.assembler.close_window(detach_ns);
    pipeline.connections.close_window(detach_ns);
    let counts = run.counts();
    drop(run);
    tokio::time::sleep(DETACH_GRACE).await;
    drain(ring.get_mut(), pipeline);
    pipeline.connections.finish_all(&mut pipeline.progress);
    pipeline.forward_progress();
    pipeline.assembler.finish();
    pipeline.export_exchanges();
    if let Some(traces) = &mut pipeline.traces {
        traces.finish(TRACE_FLUSH_DEADLINE).await;
    }
    if let Some(kernel_log) = &mut kernel_log {
        kernel_log.get_mut().flush();
    }
    let health = pipeline.health(counts, &mut counters);
    pipeline.prometheus.update_health(&health);
    Ok((stop, health))
}

/// How long the last traces may take to export at exit.
const TRACE_FLUSH_DEADLINE: Duration = Duration::from_secs(10);

/// Longer than any marker program runs (microseconds), short enough to go unnoticed.
const DETACH_GRACE: Duration = Duration::from_millis(20);

fn drain(ring: &mut RingBuf<MapData>, pipeline: &mut Pipeline) {
    while let Some(record) = ring.next() {
        pipeline.on_record(&record);
    }
}

/// Registers a ring buffer with tokio for read readiness.
fn watch<T: AsRawFd>(ring: T) -> std::io::Result<AsyncFd<T>> {
    // SAFETY: aya ring buffers own their map fd and keep it open, unchanged, until dropped,
    // and the AsyncFd owns the ring buffer for its whole life.
    unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
}

async fn readable<T: AsRawFd>(
    fd: &mut Option<AsyncFd<T>>,
) -> std::io::Result<tokio::io::unix::AsyncFdReadyMutGuard<'_, T>> {
    match fd {
        Some(fd) => fd.readable_mut().await,
        None => std::future::pending().await,
    }
}

async fn tick(interval: &mut Option<tokio::time::Interval>) {
    match interval {
        Some(interval) => {
            interval.tick().await;
        }
        None => std::future::pending().await,
    }
}

fn print_live(pipeline: &Pipeline) {
    let mut out = std::io::stdout().lock();
    if out.is_terminal() {
        let _ = write!(out, "\x1b[2J\x1b[H");
    }
    let requests = pipeline.assembler.stats().completed;
    let in_flight = pipeline.assembler.in_flight();
    let _ = writeln!(
        out,
        "{requests} requests, {in_flight} in flight\n{}",
        lock(&pipeline.summary).render(false)
    );
    let _ = out.flush();
}
