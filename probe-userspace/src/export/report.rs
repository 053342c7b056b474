//! The end-of-run report (`--report table|json|markdown`, also on SIGUSR1): the stage
//! and socket tables, what was lost or dropped, and the slowest requests with their
//! stage waterfall and trace id (docs/report.md).

use std::{
    fmt::Write as _,
    fs,
    io::Write as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use serde::Serialize;

use super::{
    ProbeHealth,
    summary::{Summary, format_ns, markdown_cell},
};
use crate::assembly::Request;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ReportFormat {
    /// Aligned text tables, 80 columns.
    #[default]
    Table,
    /// One JSON document (docs/report.schema.json), the same as /stats; alone in its
    /// file with --report-out (standard output carries brokerprobe's notices too).
    Json,
    /// Markdown tables, for a ticket or a chat.
    Markdown,
}

/// One of the slowest requests, as the report shows it.
#[derive(Clone, Debug, Serialize)]
pub struct SlowRequest {
    #[serde(skip)]
    duration_ns: u64,
    pub pid: u32,
    pub request_id: u64,
    pub model: String,
    pub provider: Option<String>,
    pub status: u16,
    pub error_type: Option<String>,
    pub duration_seconds: f64,
    /// Its trace's id when a trace was kept for export (open it in Jaeger).
    pub trace_id: Option<String>,
    /// Closed stages in begin order, from the request's begin.
    pub stages: Vec<SlowStage>,
    /// Its upstream calls the socket view saw.
    pub upstream_calls: Vec<SlowCall>,
}

#[derive(Clone, Debug, Serialize)]
pub struct SlowStage {
    pub stage: String,
    pub start_seconds: f64,
    pub duration_seconds: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct SlowCall {
    pub network_ttfb_seconds: Option<f64>,
    pub broker_wait_seconds: Option<f64>,
}

fn seconds(ns: u64) -> f64 {
    ns as f64 / 1e9
}

impl SlowRequest {
    fn of(request: &Request, trace_id: Option<String>) -> Self {
        Self {
            duration_ns: request.duration_ns(),
            pid: request.pid,
            request_id: request.request_id,
            model: request.model.clone(),
            provider: request.provider.clone(),
            status: request.status,
            error_type: request.error_type.clone(),
            duration_seconds: seconds(request.duration_ns()),
            trace_id,
            stages: request
                .stages
                .iter()
                .map(|stage| SlowStage {
                    stage: stage.id.name().to_owned(),
                    start_seconds: seconds(stage.begin_ns.saturating_sub(request.begin_ns)),
                    duration_seconds: seconds(stage.duration_ns()),
                })
                .collect(),
            upstream_calls: request
                .upstream_calls
                .iter()
                .map(|call| SlowCall {
                    network_ttfb_seconds: call.network_ttfb_ns().map(seconds),
                    broker_wait_seconds: call.broker_wait_ns().map(seconds),
                })
                .collect(),
        }
    }
}

impl SlowRequest {
    /// Each stage on a time line `width` columns wide (the whole request): the columns
    /// before its bar, and the bar's length (at least one column, never past the line).
    pub fn waterfall(&self, width: usize) -> impl Iterator<Item = (&SlowStage, usize, usize)> {
        let width = width.max(1);
        let scale = width as f64 / self.duration_seconds.max(1e-9);
        self.stages.iter().map(move |stage| {
            let lead = ((stage.start_seconds * scale).round() as usize).min(width - 1);
            let bar = ((stage.duration_seconds * scale).round() as usize).clamp(1, width - lead);
            (stage, lead, bar)
        })
    }
}

/// The `capacity` slowest requests so far, slowest first.
pub struct Slowest {
    capacity: usize,
    requests: Vec<SlowRequest>,
}

impl Slowest {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            requests: Vec::with_capacity(capacity),
        }
    }

    /// Keeps `request` if it is among the slowest; most are turned away by one comparison.
    pub fn offer(&mut self, request: &Request, trace_id: Option<String>) {
        let duration = request.duration_ns();
        let full = self.requests.len() == self.capacity;
        if self.capacity == 0 || full && self.requests[self.capacity - 1].duration_ns >= duration {
            return;
        }
        if full {
            self.requests.pop();
        }
        let at = self
            .requests
            .partition_point(|kept| kept.duration_ns >= duration);
        self.requests.insert(at, SlowRequest::of(request, trace_id));
    }

    pub fn requests(&self) -> &[SlowRequest] {
        &self.requests
    }
}

/// The report in `format`.
pub fn render(summary: &Summary, format: ReportFormat) -> String {
    match format {
        ReportFormat::Json => {
            let mut json = serde_json::to_string_pretty(&summary.stats())
                .expect("stats are plain numbers and strings");
            json.push('\n');
            json
        }
        ReportFormat::Table => {
            let mut out = summary.render(false);
            if !summary.slowest().is_empty() {
                out.push('\n');
                out.push_str(&slowest_table(summary.slowest()));
            }
            out.push('\n');
            out.push_str(&health_text(summary.health()));
            out.push('\n');
            out
        }
        ReportFormat::Markdown => {
            let mut out = String::from("# brokerprobe report\n\n## Latency\n\n");
            out.push_str(&summary.render(true).replace("\n\n", "\n\n### Sockets\n\n"));
            if !summary.slowest().is_empty() {
                out.push_str("\n## Slowest requests\n\n");
                out.push_str(&slowest_markdown(summary.slowest()));
            }
            out.push_str("\n## Probe health\n\n");
            for line in health_text(summary.health()).lines() {
                let _ = writeln!(out, "- {}", markdown_cell(line));
            }
            out
        }
    }
}

/// Width of a waterfall bar at the request's full duration: lines fit 80 columns.
const WATERFALL_WIDTH: usize = 26;

/// Each slow request, then its stages as a waterfall: offset, duration, a bar placed on
/// the request's time line.
fn slowest_table(slowest: &[SlowRequest]) -> String {
    let mut out = format!(
        "{:<4} {:>10} {:>6}  {:<22} trace id\n",
        "slow", "duration", "status", "model"
    );
    for (rank, request) in slowest.iter().enumerate() {
        let _ = writeln!(
            out,
            "{:<4} {:>10} {:>6}  {:<22.22} {}",
            rank + 1,
            format_ns(request.duration_ns),
            request.status,
            request.model,
            request.trace_id.as_deref().unwrap_or("(not traced)")
        );
        for (stage, lead, bar) in request.waterfall(WATERFALL_WIDTH) {
            let _ = writeln!(
                out,
                "     +{:>9} {:>10}  {:<24.24} {}{}",
                format_seconds(stage.start_seconds),
                format_seconds(stage.duration_seconds),
                stage.stage,
                " ".repeat(lead),
                "#".repeat(bar),
            );
        }
    }
    out
}

fn slowest_markdown(slowest: &[SlowRequest]) -> String {
    let mut out = String::from(
        "| # | duration | status | model | trace id | stages (start +duration) |\n\
         |--:|--:|--:|---|---|---|\n",
    );
    for (rank, request) in slowest.iter().enumerate() {
        let stages: Vec<String> = request
            .stages
            .iter()
            .map(|stage| {
                format!(
                    "{} {} +{}",
                    markdown_cell(&stage.stage),
                    format_seconds(stage.start_seconds),
                    format_seconds(stage.duration_seconds)
                )
            })
            .collect();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} |",
            rank + 1,
            format_ns(request.duration_ns),
            request.status,
            markdown_cell(&request.model),
            request.trace_id.as_deref().unwrap_or("(not traced)"),
            stages.join(" → ")
        );
    }
    out
}

pub fn format_seconds(seconds: f64) -> String {
    format_ns((seconds * 1e9).round() as u64)
}

/// Where the report goes, and in which format.
pub struct ReportWriter {
    format: ReportFormat,
    /// None: standard output.
    path: Option<PathBuf>,
}

impl ReportWriter {
    /// Fails now, before anything is attached, if the report could not be written
    /// where it goes (the file is written aside, then renamed over `path`).
    pub fn create(format: ReportFormat, path: Option<PathBuf>) -> Result<Self> {
        if let Some(path) = &path {
            replace(path, "").with_context(|| format!("creating {}", path.display()))?;
        }
        Ok(Self { format, path })
    }

    /// Writes the report; a file is replaced whole, so a reader never sees half of one.
    pub fn write(&self, summary: &Summary) -> Result<()> {
        let report = render(summary, self.format);
        match &self.path {
            None => {
                let mut out = std::io::stdout().lock();
                out.write_all(report.as_bytes())?;
                out.flush()?;
            }
            Some(path) => replace(path, &report)
                .with_context(|| format!("writing the report to {}", path.display()))?,
        }
        Ok(())
    }
}

fn replace(path: &Path, contents: &str) -> std::io::Result<()> {
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    fs::write(&temporary, contents)?;
    fs::rename(&temporary, path)
}

/// What was seen, lost and dropped, as lines a person reads.
pub fn health_text(health: &ProbeHealth) -> String {
    let a = &health.assembly;
    let c = &health.connections;
    let mut text = format!(
        "events {} (lost: {} marker, {} socket; undecodable {}, {} of untracked requests); \
         requests {} complete, {} ended untracked, {} still open, {} expired, {} incomplete \
         (records lost while they ran), {} over the open-request bound, {} duplicate begins; \
         stages {} unclosed, {} unmatched, {} over a request's bounds; {} events while \
         detaching (ignored)",
        health.events,
        health.marker_events_lost,
        health.socket_events_lost,
        health.decode_errors,
        a.orphan_events,
        a.completed,
        a.partial,
        health.in_flight,
        a.expired,
        a.incomplete,
        a.overflow,
        a.duplicate_begins,
        a.unclosed_stages,
        a.unmatched_stage_ends,
        a.over_request_bounds,
        a.after_window,
    );
    let dropped_lines =
        health.requests_out_dropped + health.exchanges_out_dropped + health.stages_out_dropped;
    if dropped_lines > 0 {
        let _ = write!(
            text,
            "\noutput files: lines not written: {} requests, {} exchanges, {} stages",
            health.requests_out_dropped, health.exchanges_out_dropped, health.stages_out_dropped
        );
    }
    let t = &health.traces;
    if t.sampled_head + t.sampled_tail + t.sampled_out > 0 {
        let _ = write!(
            text,
            "\ntraces: {} kept ({} by the sampler, {} failed or slow), {} sampled out, {} without \
             socket figures; spans: {} exported to OTLP, {} to the trace UI; lost: {} (queue \
             full), {} (unsent at exit), {} (OTLP export failed), {} (trace UI failed)",
            t.sampled_head + t.sampled_tail,
            t.sampled_head,
            t.sampled_tail,
            t.sampled_out,
            t.without_sockets,
            t.exported_spans[0],
            t.exported_spans[1],
            t.dropped_spans,
            t.unsent_spans,
            t.failed_spans[0],
            t.failed_spans[1],
        );
    }
    if health.attached_socket_tracepoints > 0 {
        let _ = write!(
            text,
            "\nsockets: {} exchanges, {} unanswered; {} connects ({} failed); {} connections \
             open at attach, {} learned later, {} unresolved ({} events not followed); {} stray \
             response bytes; {} I/O outside read/write syscalls; {} events outside the window; \
             {} response reads without arrival time; {} socket tallies lost; upstream exchanges \
             attributed: {} by adjacency, {} only candidate, {} not attributed",
            c.exchanges,
            c.unanswered,
            c.connects,
            c.connect_failures,
            c.learned_at_attach,
            c.learned_later,
            c.unresolved,
            c.unfollowed_events,
            c.stray_response_bytes,
            health.socket_io_without_syscall,
            c.outside_window,
            c.arrivals_unknown,
            c.tallies_lost,
            a.attribution.adjacent,
            a.attribution.only_candidate,
            a.attribution.unattributed,
        );
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(id: u64, duration_ns: u64) -> Request {
        Request {
            request_id: id,
            model: "m|x".into(),
            begin_ns: 1_000,
            end_ns: 1_000 + duration_ns,
            ..Request::default()
        }
    }

    #[test]
    fn keeps_the_slowest_in_order() {
        let mut slowest = Slowest::new(3);
        for (id, ms) in [(1, 5), (2, 50), (3, 1), (4, 20), (5, 30), (6, 2)] {
            slowest.offer(&request(id, ms * 1_000_000), None);
        }
        let ids: Vec<u64> = slowest.requests().iter().map(|r| r.request_id).collect();
        assert_eq!(ids, [2, 5, 4]);
    }

    #[test]
    fn waterfall_bars_stay_on_the_line() {
        let stage = |start: f64, duration: f64| SlowStage {
            stage: "s".into(),
            start_seconds: start,
            duration_seconds: duration,
        };
        let mut slowest = Slowest::new(1);
        slowest.offer(&request(1, 1_000_000_000), None);
        let mut slow = slowest.requests()[0].clone();
        slow.stages = vec![
            stage(0.0, 1.0),
            stage(0.5, 0.25),
            stage(1.0, 0.0),
            stage(0.9, 5.0),
        ];
        let placed: Vec<(usize, usize)> = slow
            .waterfall(20)
            .map(|(_, lead, bar)| (lead, bar))
            .collect();
        assert_eq!(placed, [(0, 20), (10, 5), (19, 1), (18, 2)]);
    }

    #[test]
    fn none_kept_when_asked_for_none() {
        let mut slowest = Slowest::new(0);
        slowest.offer(&request(1, 1), None);
        assert!(slowest.requests().is_empty());
    }

    #[test]
    fn markdown_escapes_what_would_split_a_row() {
        let mut summary = Summary::new(10, 1);
        summary.record(&request(1, 2_000_000), Some("ab".repeat(16)));
        let markdown = render(&summary, ReportFormat::Markdown);
        let row = markdown
            .lines()
            .find(|line| line.starts_with("| 1 |"))
            .unwrap();
        assert!(
            row.contains(r"m\|x") && row.contains(&"ab".repeat(16)),
            "{row}"
        );
    }
}
