//! `brokerprobe attach`: kernel events → decode → assembly → exporters, until stopped.

use std::{
    io::{IsTerminal as _, Write as _},
    net::SocketAddr,
    os::fd::AsRawFd,
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context as _, Result};
use tokio::{
    io::{Interest, unix::AsyncFd},
    net::TcpListener,
    signal::unix::SignalKind,
};

use crate::{
    assembly::Assembler,
    attach::{Attached, Probes},
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

    fn health(&self, probes: &Probes) -> ProbeHealth {
        ProbeHealth {
            attached_markers: probes.markers,
            events: self.events,
            events_lost: probes.events_lost().unwrap_or_else(|e| {
                log::warn!("reading the lost-events counter: {e}");
                0
            }),
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
    println!(
        "brokerprobe: attached {} markers to PID {} ({}, {}); metrics on {metrics_url}",
        attached.probes.markers,
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
        prometheus: PrometheusExporter::new()?,
        summary: Summary::default(),
        jsonl,
        events: 0,
        decode_errors: 0,
    };
    let server = tokio::spawn(server::serve(listener, pipeline.prometheus.registry()));
    let (stop, probes) = event_loop(&options, attached, &mut pipeline).await?;
    server.abort();

    let health = pipeline.health(&probes);
    drop(probes); // detach before printing: the broker no longer pays for us
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

/// Runs until a signal, the duration, or the broker's exit; returns why, and the probes
/// (still attached) so the caller decides when to detach.
async fn event_loop(
    options: &AttachOptions,
    attached: Attached,
    pipeline: &mut Pipeline,
) -> Result<(Stop, Probes)> {
    let Attached {
        probes,
        events,
        kernel_log,
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
                let ring = guard.get_inner_mut();
                while let Some(record) = ring.next() {
                    pipeline.on_record(&record);
                }
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
                pipeline.prometheus.update_health(&pipeline.health(&probes));
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
    // Whatever the kernel wrote before we stopped still counts.
    let ring = ring.get_mut();
    while let Some(record) = ring.next() {
        pipeline.on_record(&record);
    }
    Ok((stop, probes))
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
        "events {} (lost {}, undecodable {}); requests {} complete, {} begun before attach, \
         {} still open, {} expired, {} over the open-request bound; stages {} unclosed, {} unmatched",
        health.events,
        health.events_lost,
        health.decode_errors,
        a.completed,
        a.partial,
        health.in_flight,
        a.expired,
        a.overflow,
        a.unclosed_stages,
        a.unmatched_stage_ends,
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
