//! `brokerprobe attach`: kernel events → decode → assembly → exporters, until stopped.

use std::{
    io::{IsTerminal as _, Write as _},
    net::SocketAddr,
    os::fd::AsRawFd,
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context as _, Result};
use aya::maps::{MapData, RingBuf};
use tokio::{
    io::{Interest, unix::AsyncFd},
    net::TcpListener,
    signal::unix::SignalKind,
};

use crate::{
    assembly::Assembler,
    attach::{Attached, check_privileges},
    decode::decode,
    export::{
        ProbeHealth, RequestSink as _, jsonl::JsonLines, prometheus::PrometheusExporter,
        summary::Summary,
    },
    server,
    target::{Target, marker_symbol},
};

pub struct AttachOptions {
    pub pid: u32,
    pub metrics_addr: SocketAddr,
    pub duration: Option<Duration>,
    /// Print the per-stage table this often while running.
    pub live_interval: Option<Duration>,
    pub requests_out: Option<PathBuf>,
    /// Requests open longer than this are dropped and counted as expired.
    pub request_timeout: Duration,
    pub max_open_requests: usize,
    /// Distinct values per metric label (model, provider, stage) before `other`.
    pub max_label_values: usize,
}

/// Everything downstream of the ring buffer.
struct Pipeline {
    assembler: Assembler,
    prometheus: PrometheusExporter,
    summary: Summary,
    jsonl: Option<JsonLines>,
    events: u64,
    decode_errors: u64,
}

impl Pipeline {
    fn on_record(&mut self, bytes: &[u8]) {
        self.events += 1;
        let event = match decode(bytes) {
            Ok(event) => event,
            Err(e) => {
                if self.decode_errors == 0 {
                    log::warn!("undecodable marker event (counted from now on): {e}");
                }
                self.decode_errors += 1;
                return;
            }
        };
        if let Some(request) = self.assembler.on_event(event) {
            self.prometheus.record(&request);
            self.summary.record(&request);
            if let Some(jsonl) = &mut self.jsonl {
                jsonl.record(&request);
            }
        }
    }

    fn health(&self, attached_markers: u32, events_lost: u64) -> ProbeHealth {
        ProbeHealth {
            attached_markers,
            events: self.events,
            events_lost,
            decode_errors: self.decode_errors,
            in_flight: self.assembler.in_flight(),
            assembly: self.assembler.stats(),
        }
    }
}

/// Why the run ended.
enum Stop {
    Signal(&'static str),
    Duration,
    TargetExited,
}

pub async fn attach(options: AttachOptions) -> Result<()> {
    let target = Target::open(options.pid)?;
    // Before creating any output file or port: a refused run leaves nothing changed.
    check_privileges()?;
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
    let jsonl = options
        .requests_out
        .as_deref()
        .map(|path| JsonLines::create(path).with_context(|| format!("creating {}", path.display())))
        .transpose()?;

    let attached = Attached::attach(&target)?;
    let all_attached_ns = monotonic_ns();
    println!(
        "brokerprobe: attached {} markers to PID {} ({}, {}); metrics on {metrics_url}",
        attached.markers,
        target.pid,
        target.name,
        target.exe_display.display()
    );
    if !target.missing.is_empty() {
        let names: Vec<String> = target.missing.iter().map(|k| marker_symbol(*k)).collect();
        log::info!("not in this broker (never called): {}", names.join(", "));
    }
    std::io::stdout().flush()?;

    let mut pipeline = Pipeline {
        assembler: Assembler::new(options.max_open_requests),
        prometheus: PrometheusExporter::new(options.max_label_values)?,
        summary: Summary::new(options.max_label_values),
        jsonl,
        events: 0,
        decode_errors: 0,
    };
    pipeline.assembler.open_window(all_attached_ns);
    let server = tokio::spawn(server::serve(listener, pipeline.prometheus.registry()));
    let (stop, health) = event_loop(&options, attached, &mut pipeline).await?;
    server.abort();
    match stop {
        Stop::Signal(name) => log::info!("{name}: detached"),
        Stop::Duration => log::info!("duration elapsed: detached"),
        Stop::TargetExited => println!("brokerprobe: PID {} exited; detached", options.pid),
    }
    if let Some(jsonl) = &mut pipeline.jsonl {
        jsonl.finish().context("writing --requests-out")?;
    }
    println!("{}", pipeline.summary.render());
    println!("{}", health_line(&health));
    Ok(())
}

/// Runs until a signal, the duration, or the broker's exit; detaches, reads what the kernel
/// wrote up to the detach, and returns why it stopped and the final health figures.
async fn event_loop(
    options: &AttachOptions,
    attached: Attached,
    pipeline: &mut Pipeline,
) -> Result<(Stop, ProbeHealth)> {
    let Attached {
        probes,
        events,
        mut lost,
        kernel_log,
        markers,
    } = attached;
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
    let mut live = options.live_interval.map(tokio::time::interval);
    let proc_dir = PathBuf::from(format!("/proc/{}", options.pid));

    let stop = loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                drain(guard.get_inner_mut(), pipeline);
                guard.clear_ready();
            }
            guard = readable(&mut kernel_log) => {
                let mut guard = guard?;
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
            _ = housekeeping.tick() => {
                let expired = pipeline.assembler.expire(monotonic_ns(), options.request_timeout.as_nanos() as u64);
                if expired > 0 {
                    log::warn!("{expired} requests never ended within {:?}: dropped (counted)", options.request_timeout);
                }
                pipeline.prometheus.update_health(&pipeline.health(markers, lost.total()));
                if !proc_dir.exists() {
                    break Stop::TargetExited;
                }
            }
            _ = tick(&mut live) => print_live(pipeline),
            _ = sigint.recv() => break Stop::Signal("SIGINT"),
            _ = sigterm.recv() => break Stop::Signal("SIGTERM"),
            () = &mut deadline => break Stop::Duration,
        }
    };
    // Detach first, so no hit lands after the final drain; programs already running on
    // other CPUs finish within microseconds, the grace period lets their records commit.
    pipeline.assembler.close_window(monotonic_ns());
    drop(probes);
    tokio::time::sleep(DETACH_GRACE).await;
    drain(ring.get_mut(), pipeline);
    if let Some(kernel_log) = &mut kernel_log {
        kernel_log.get_mut().flush();
    }
    let health = pipeline.health(markers, lost.total());
    pipeline.prometheus.update_health(&health);
    Ok((stop, health))
}

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
        pipeline.summary.render()
    );
    let _ = out.flush();
}

fn health_line(health: &ProbeHealth) -> String {
    let a = &health.assembly;
    format!(
        "events {} (lost {}, undecodable {}, {} of untracked requests); requests {} complete, \
         {} ended untracked, {} still open, {} expired, {} over the open-request bound, \
         {} duplicate begins; stages {} unclosed, {} unmatched, {} over a request's bounds; \
         {} events while detaching (ignored)",
        health.events,
        health.events_lost,
        health.decode_errors,
        a.orphan_events,
        a.completed,
        a.partial,
        health.in_flight,
        a.expired,
        a.overflow,
        a.duplicate_begins,
        a.unclosed_stages,
        a.unmatched_stage_ends,
        a.over_request_bounds,
        a.after_window,
    )
}

/// CLOCK_MONOTONIC, the clock bpf_ktime_get_ns() reads.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
