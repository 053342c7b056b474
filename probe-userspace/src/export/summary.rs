//! Quantiles kept in memory: the tables printed live and on exit, and the `/stats` JSON
//! (docs/report.md): per stage, per model, per upstream and inbound; count, p50, p95,
//! p99, max; and the slowest requests.

use std::{
    collections::HashMap,
    fmt::Write as _,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use serde::Serialize;

use super::{
    ExchangeSink, ProbeHealth,
    labels::{LabelCap, OTHER},
    report::{SlowRequest, Slowest},
};
use crate::{assembly::Request, connections::Exchange, procnet::Role};

/// The summary the event loop writes and the HTTP server reads (one thread: never
/// contended).
pub type SharedSummary = Arc<Mutex<Summary>>;

/// Locks the summary; a panic while holding it cannot leave it half-updated in a way
/// that matters for reading, so poisoning is ignored.
pub fn lock(summary: &SharedSummary) -> MutexGuard<'_, Summary> {
    summary.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The row holding whole-request durations, above the stage rows.
pub const REQUEST_ROW: &str = "(request)";

pub struct Summary {
    started: Instant,
    requests: Latency,
    errors: u64,
    /// Whole-request durations per process of the broker ("PID n"), bounded like names.
    processes: Rows<Latency>,
    process_names: LabelCap,
    stages: Rows<Latency>,
    models: Rows<ModelStats>,
    upstreams: Rows<UpstreamStats>,
    inbound: InboundStats,
    lag: Latency,
    /// Per attributed upstream call: what the broker waited, and the network's TTFB of
    /// the same calls.
    broker_wait: Latency,
    call_ttfb: Latency,
    health: ProbeHealth,
    /// Stage, model and upstream names come from the broker or its clients: bounded like
    /// metric labels.
    stage_names: LabelCap,
    model_names: LabelCap,
    upstream_names: LabelCap,
    slowest: Slowest,
}

/// The version of the `/stats` and `--report json` document (docs/report.schema.json).
const SCHEMA_VERSION: u32 = 1;

#[derive(Default)]
struct ModelStats {
    errors: u64,
    duration: Latency,
    time_to_first_chunk: Latency,
}

#[derive(Default)]
struct UpstreamStats {
    ttfb: Latency,
    duration: Latency,
    connect: Latency,
    read_delay: Latency,
}

#[derive(Default)]
struct InboundStats {
    ttfb: Latency,
    duration: Latency,
}

impl Summary {
    /// `slowest`: how many of the slowest requests to keep, with their stages.
    pub fn new(max_names: usize, slowest: usize) -> Self {
        Self {
            started: Instant::now(),
            requests: Latency::default(),
            errors: 0,
            processes: Rows::default(),
            process_names: LabelCap::new(max_names),
            stages: Rows::default(),
            models: Rows::default(),
            upstreams: Rows::default(),
            inbound: InboundStats::default(),
            lag: Latency::default(),
            broker_wait: Latency::default(),
            call_ttfb: Latency::default(),
            health: ProbeHealth::default(),
            stage_names: LabelCap::new(max_names),
            model_names: LabelCap::new(max_names),
            upstream_names: LabelCap::new(max_names),
            slowest: Slowest::new(slowest),
        }
    }

    /// The latest health figures, for `/stats`.
    pub fn update_health(&mut self, health: &ProbeHealth) {
        self.health = *health;
    }

    pub fn health(&self) -> &ProbeHealth {
        &self.health
    }

    pub fn slowest(&self) -> &[SlowRequest] {
        self.slowest.requests()
    }

    /// The tables as text or Markdown: stages, then (if any were seen) upstream calls and
    /// inbound requests.
    pub fn render(&self, markdown: bool) -> String {
        let mut stages = Table::new("stage", markdown);
        stages.row(REQUEST_ROW, &self.requests);
        // Replicas apart, when there were several.
        if self.processes.rows.len() > 1 {
            for (process, latency) in self.processes.iter() {
                stages.row(&format!("(request, {process})"), latency);
            }
        }
        for (name, latency) in self.stages.iter() {
            stages.row(name, latency);
        }
        let mut sockets = Table::new("socket view", markdown);
        for (name, upstream) in self.upstreams.iter() {
            sockets.row(&format!("{name} ttfb"), &upstream.ttfb);
            sockets.row(&format!("{name} total"), &upstream.duration);
            sockets.row(&format!("{name} connect"), &upstream.connect);
            sockets.row(&format!("{name} read delay"), &upstream.read_delay);
        }
        sockets.row("upstream lag (broker - network)", &self.lag);
        sockets.row("inbound ttfb", &self.inbound.ttfb);
        sockets.row("inbound total", &self.inbound.duration);
        let mut out = stages.text;
        if sockets.rows > 0 {
            out.push('\n');
            out.push_str(&sockets.text);
        }
        out
    }

    /// What `/stats` serves.
    pub fn stats(&self) -> Stats<'_> {
        let h = &self.health;
        let t = &h.traces;
        Stats {
            schema_version: SCHEMA_VERSION,
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            requests: RequestCounts {
                completed: self.requests.count(),
                errors: self.errors,
                in_flight: h.in_flight as u64,
            },
            request_duration: self.requests.quantiles(),
            processes: self
                .processes
                .iter()
                .map(|(process, latency)| ProcessLine {
                    process,
                    requests: latency.count(),
                    duration: latency.quantiles(),
                })
                .collect(),
            stages: self
                .stages
                .iter()
                .map(|(stage, latency)| StageLine {
                    stage,
                    duration: latency.quantiles(),
                })
                .collect(),
            models: self
                .models
                .iter()
                .map(|(model, m)| ModelLine {
                    model,
                    requests: m.duration.count(),
                    errors: m.errors,
                    duration: m.duration.quantiles(),
                    time_to_first_chunk: m.time_to_first_chunk.quantiles(),
                })
                .collect(),
            upstreams: self
                .upstreams
                .iter()
                .map(|(upstream, u)| UpstreamLine {
                    upstream,
                    exchanges: u.duration.count(),
                    ttfb: u.ttfb.quantiles(),
                    duration: u.duration.quantiles(),
                    connect: u.connect.quantiles(),
                    read_delay: u.read_delay.quantiles(),
                })
                .collect(),
            upstream_lag: self.lag.quantiles(),
            inbound: InboundLine {
                exchanges: self.inbound.duration.count(),
                ttfb: self.inbound.ttfb.quantiles(),
                duration: self.inbound.duration.quantiles(),
            },
            probe: ProbeLine {
                events: h.events,
                events_lost: h.marker_events_lost + h.socket_events_lost,
                marker_events_lost: h.marker_events_lost,
                socket_events_lost: h.socket_events_lost,
                decode_errors: h.decode_errors,
                requests_expired: h.assembly.expired,
                requests_incomplete: h.assembly.incomplete,
                requests_over_open_bound: h.assembly.overflow,
                upstream_exchanges_unattributed: h.assembly.attribution.unattributed,
                socket_io_without_syscall: h.socket_io_without_syscall,
                output_lines_dropped: h.requests_out_dropped
                    + h.exchanges_out_dropped
                    + h.stages_out_dropped,
                trace_spans_lost: t.dropped_spans
                    + t.unsent_spans
                    + t.failed_spans.iter().sum::<u64>(),
            },
            slowest_requests: self.slowest.requests(),
        }
    }
}

/// What the live view shows, copied out of the summary once a second.
pub struct LiveFigures {
    pub completed: u64,
    pub errors: u64,
    pub in_flight: u64,
    /// Whole requests first (named [`REQUEST_ROW`]), then each stage.
    pub stages: Vec<(String, Histogram<u64>)>,
    pub models: Vec<GroupLine>,
    pub upstreams: Vec<GroupLine>,
    /// Over attributed upstream calls: (p50, p99) of the broker-seen wait and of the
    /// network's TTFB.
    pub broker_wait: Option<(u64, u64)>,
    pub network_ttfb: Option<(u64, u64)>,
    pub slowest: Vec<SlowRequest>,
}

/// A model's requests, or an upstream's exchanges (`errors` None: not known there).
pub struct GroupLine {
    pub name: String,
    pub count: u64,
    pub errors: Option<u64>,
    /// p50, p95, p99 of the request duration (model) or TTFB (upstream), ns.
    pub quantiles_ns: [u64; 3],
}

impl Summary {
    pub fn live(&self, slowest: usize) -> LiveFigures {
        let quantiles = |latency: &Latency| [0.5, 0.95, 0.99].map(|q| latency.quantile_ns(q));
        let spread = |latency: &Latency| {
            (latency.count() > 0).then(|| (latency.quantile_ns(0.5), latency.quantile_ns(0.99)))
        };
        LiveFigures {
            completed: self.requests.count(),
            errors: self.errors,
            in_flight: self.health.in_flight as u64,
            stages: std::iter::once((REQUEST_ROW, &self.requests))
                .chain(self.stages.iter())
                .map(|(name, latency)| (name.to_owned(), latency.0.clone()))
                .collect(),
            models: self
                .models
                .iter()
                .map(|(name, m)| GroupLine {
                    name: name.to_owned(),
                    count: m.duration.count(),
                    errors: Some(m.errors),
                    quantiles_ns: quantiles(&m.duration),
                })
                .collect(),
            upstreams: self
                .upstreams
                .iter()
                .map(|(name, u)| GroupLine {
                    name: name.to_owned(),
                    count: u.ttfb.count(),
                    errors: None,
                    quantiles_ns: quantiles(&u.ttfb),
                })
                .collect(),
            broker_wait: spread(&self.broker_wait),
            network_ttfb: spread(&self.call_ttfb),
            slowest: self
                .slowest
                .requests()
                .iter()
                .take(slowest)
                .cloned()
                .collect(),
        }
    }
}

impl Summary {
    /// One call of a symbol-mapped stage function (no request around it).
    pub fn record_stage_sample(&mut self, stage: &str, duration_ns: u64) {
        let name = self.stage_names.admit(stage).unwrap_or(OTHER);
        self.stages.get(name).observe(duration_ns);
    }
}

impl Summary {
    /// A finished request; `trace_id` is its trace's, when one was kept for export.
    pub fn record(&mut self, request: &Request, trace_id: Option<String>) {
        self.slowest.offer(request, trace_id);
        self.requests.observe(request.duration_ns());
        let process = format!("PID {}", request.pid);
        let process = self.process_names.admit(&process).unwrap_or(OTHER);
        self.processes.get(process).observe(request.duration_ns());
        let failed = request.failed();
        self.errors += u64::from(failed);
        for stage in &request.stages {
            let name = self.stage_names.admit(stage.id.name()).unwrap_or(OTHER);
            self.stages.get(name).observe(stage.duration_ns());
        }
        let model = self.model_names.admit(&request.model).unwrap_or(OTHER);
        let model = self.models.get(model);
        model.errors += u64::from(failed);
        model.duration.observe(request.duration_ns());
        if let Some(first) = request.first_chunk_ns {
            model
                .time_to_first_chunk
                .observe(first.saturating_sub(request.begin_ns));
        }
        for call in &request.upstream_calls {
            if let (Some(wait), Some(ttfb)) = (call.broker_wait_ns(), call.network_ttfb_ns()) {
                self.broker_wait.observe(wait);
                self.call_ttfb.observe(ttfb);
                self.lag.observe(wait.saturating_sub(ttfb));
            }
        }
    }
}

impl ExchangeSink for Summary {
    fn record_exchange(&mut self, exchange: &Exchange) {
        let observe = |latency: &mut Latency, ns: Option<u64>| {
            if let Some(ns) = ns {
                latency.observe(ns);
            }
        };
        match exchange.role {
            Role::Upstream => {
                let name = self
                    .upstream_names
                    .admit(&exchange.peer_name)
                    .unwrap_or(OTHER);
                let upstream = self.upstreams.get(name);
                observe(&mut upstream.ttfb, exchange.ttfb_ns());
                observe(&mut upstream.duration, exchange.duration_ns());
                observe(&mut upstream.connect, exchange.connect_ns);
                observe(&mut upstream.read_delay, exchange.read_delay_ns());
            }
            Role::Inbound => {
                observe(&mut self.inbound.ttfb, exchange.ttfb_ns());
                observe(&mut self.inbound.duration, exchange.duration_ns());
            }
        }
    }
}

/// Named entries in order of first appearance.
struct Rows<T> {
    rows: Vec<(String, T)>,
    index: HashMap<String, usize>,
}

impl<T> Default for Rows<T> {
    fn default() -> Self {
        Self {
            rows: Vec::new(),
            index: HashMap::new(),
        }
    }
}

impl<T: Default> Rows<T> {
    fn get(&mut self, name: &str) -> &mut T {
        let index = match self.index.get(name) {
            Some(index) => *index,
            None => {
                self.rows.push((name.to_owned(), T::default()));
                self.index.insert(name.to_owned(), self.rows.len() - 1);
                self.rows.len() - 1
            }
        };
        &mut self.rows[index].1
    }

    fn iter(&self) -> impl Iterator<Item = (&str, &T)> {
        self.rows.iter().map(|(name, row)| (name.as_str(), row))
    }
}

/// Nanosecond durations, 3 significant figures, auto-resizing to the largest value seen.
struct Latency(Histogram<u64>);

impl Default for Latency {
    fn default() -> Self {
        Self(Histogram::new(3).expect("3 significant figures is valid"))
    }
}

impl Latency {
    fn observe(&mut self, ns: u64) {
        // `record` grows the histogram to fit; it can only refuse values near u64::MAX.
        if self.0.record(ns.max(1)).is_err() {
            self.0.saturating_record(ns);
        }
    }

    fn count(&self) -> u64 {
        self.0.len()
    }

    fn quantile_ns(&self, q: f64) -> u64 {
        self.0.value_at_quantile(q)
    }

    /// None when empty: no made-up zeros in `/stats`.
    fn quantiles(&self) -> Option<Quantiles> {
        let seconds = |ns: u64| Duration::from_nanos(ns).as_secs_f64();
        (self.count() > 0).then(|| Quantiles {
            count: self.count(),
            p50_seconds: seconds(self.quantile_ns(0.5)),
            p95_seconds: seconds(self.quantile_ns(0.95)),
            p99_seconds: seconds(self.quantile_ns(0.99)),
            max_seconds: seconds(self.0.max()),
        })
    }
}

/// A text or Markdown table; empty rows are left out.
struct Table {
    text: String,
    rows: usize,
    markdown: bool,
}

impl Table {
    fn new(title: &str, markdown: bool) -> Self {
        let mut table = Self {
            text: String::new(),
            rows: 0,
            markdown,
        };
        table.line(
            title,
            ["count", "p50", "p95", "p99", "max"].map(String::from),
        );
        if markdown {
            table.text.push_str("|---|--:|--:|--:|--:|--:|\n");
        }
        table
    }

    fn row(&mut self, name: &str, latency: &Latency) {
        if latency.count() == 0 {
            return;
        }
        let q = |q: f64| format_ns(latency.quantile_ns(q));
        let cells = [
            latency.count().to_string(),
            q(0.5),
            q(0.95),
            q(0.99),
            format_ns(latency.0.max()),
        ];
        self.line(name, cells);
        self.rows += 1;
    }

    fn line(&mut self, name: &str, [count, p50, p95, p99, max]: [String; 5]) {
        let _ = if self.markdown {
            writeln!(
                self.text,
                "| {} | {count} | {p50} | {p95} | {p99} | {max} |",
                markdown_cell(name)
            )
        } else {
            writeln!(
                self.text,
                "{name:<27} {count:>7} {p50:>8} {p95:>8} {p99:>8} {max:>8}"
            )
        };
    }
}

/// A Markdown table cell: names come from the broker or its clients, and a `|` in one
/// would split the row.
pub fn markdown_cell(text: &str) -> String {
    text.replace('\\', "\\\\").replace('|', "\\|")
}

/// `/stats` and `--report json` (docs/report.schema.json).
#[derive(Serialize)]
pub struct Stats<'a> {
    schema_version: u32,
    uptime_seconds: f64,
    requests: RequestCounts,
    request_duration: Option<Quantiles>,
    processes: Vec<ProcessLine<'a>>,
    stages: Vec<StageLine<'a>>,
    models: Vec<ModelLine<'a>>,
    upstreams: Vec<UpstreamLine<'a>>,
    upstream_lag: Option<Quantiles>,
    inbound: InboundLine,
    probe: ProbeLine,
    slowest_requests: &'a [SlowRequest],
}

#[derive(Serialize)]
struct RequestCounts {
    completed: u64,
    errors: u64,
    in_flight: u64,
}

#[derive(Serialize)]
struct Quantiles {
    count: u64,
    p50_seconds: f64,
    p95_seconds: f64,
    p99_seconds: f64,
    max_seconds: f64,
}

#[derive(Serialize)]
struct ProcessLine<'a> {
    process: &'a str,
    requests: u64,
    duration: Option<Quantiles>,
}

#[derive(Serialize)]
struct StageLine<'a> {
    stage: &'a str,
    duration: Option<Quantiles>,
}

#[derive(Serialize)]
struct ModelLine<'a> {
    model: &'a str,
    requests: u64,
    errors: u64,
    duration: Option<Quantiles>,
    time_to_first_chunk: Option<Quantiles>,
}

#[derive(Serialize)]
struct UpstreamLine<'a> {
    upstream: &'a str,
    exchanges: u64,
    ttfb: Option<Quantiles>,
    duration: Option<Quantiles>,
    connect: Option<Quantiles>,
    read_delay: Option<Quantiles>,
}

#[derive(Serialize)]
struct InboundLine {
    exchanges: u64,
    ttfb: Option<Quantiles>,
    duration: Option<Quantiles>,
}

#[derive(Serialize)]
struct ProbeLine {
    events: u64,
    events_lost: u64,
    marker_events_lost: u64,
    socket_events_lost: u64,
    decode_errors: u64,
    requests_expired: u64,
    requests_incomplete: u64,
    requests_over_open_bound: u64,
    upstream_exchanges_unattributed: u64,
    socket_io_without_syscall: u64,
    output_lines_dropped: u64,
    trace_spans_lost: u64,
}

/// Nanoseconds in the unit that keeps 3 significant digits readable.
pub fn format_ns(ns: u64) -> String {
    let ns = ns as f64;
    match ns {
        n if n < 1e3 => format!("{n:.0}ns"),
        n if n < 1e6 => format!("{:.1}µs", n / 1e3),
        n if n < 1e9 => format!("{:.2}ms", n / 1e6),
        n => format!("{:.2}s", n / 1e9),
    }
}

#[cfg(test)]
mod tests {
    use probe_common::marker::Stage;

    use super::*;
    use crate::{assembly::StageSpan, decode::StageId};

    fn requests() -> Summary {
        let mut summary = Summary::new(100, 3);
        for i in 1..=100u64 {
            summary.record(
                &Request {
                    model: if i % 2 == 0 { "even" } else { "odd" }.into(),
                    status: if i == 100 { 500 } else { 200 },
                    begin_ns: 0,
                    end_ns: i * 1_000_000,
                    stages: vec![StageSpan {
                        id: StageId::Known(Stage::Route),
                        begin_ns: 0,
                        end_ns: i * 1_000,
                    }],
                    ..Request::default()
                },
                None,
            );
        }
        summary
    }

    #[test]
    fn table_has_request_row_then_stages_with_quantiles() {
        let table = requests().render(false);
        let lines: Vec<&str> = table.lines().collect();
        assert!(
            lines[1].starts_with("(request)") && lines[1].contains(" 100 "),
            "{table}"
        );
        assert!(lines[2].starts_with("route"), "{table}");
        // p50 of 1..=100 µs is 50 µs, max 100 µs.
        assert!(
            lines[2].contains("50.0µs") && lines[2].contains("100.0µs"),
            "{table}"
        );
        assert!(!table.contains("socket view"), "no socket rows seen");
    }

    #[test]
    fn stats_break_requests_down_by_stage_and_model() {
        let summary = requests();
        let stats = serde_json::to_value(summary.stats()).unwrap();
        assert_eq!(stats["requests"]["completed"], 100);
        assert_eq!(stats["requests"]["errors"], 1);
        assert_eq!(stats["stages"][0]["stage"], "route");
        let route = &stats["stages"][0]["duration"];
        assert_eq!(route["count"], 100);
        assert!((route["p50_seconds"].as_f64().unwrap() - 50e-6).abs() < 0.1e-6);
        assert_eq!(stats["models"][0]["model"], "odd");
        assert_eq!(stats["models"][1]["errors"], 1);
        assert!(
            stats["models"][1]["time_to_first_chunk"].is_null(),
            "no stream, no quantiles"
        );
        assert_eq!(stats["upstreams"], serde_json::json!([]));
    }

    #[test]
    fn durations_format_in_readable_units() {
        assert_eq!(format_ns(850), "850ns");
        assert_eq!(format_ns(12_345), "12.3µs");
        assert_eq!(format_ns(4_560_000), "4.56ms");
        assert_eq!(format_ns(1_230_000_000), "1.23s");
    }
}
