//! brokerprobe's own health: what it attached, what it received and could not place.

use std::collections::HashMap;

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts};

use super::{ProbeHealth, Register};

/// A process brokerprobe profiles, for `brokerprobe_target_info`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TargetInfo {
    pub pid: u32,
    /// Its `replica` label value.
    pub replica: usize,
    /// The process name (comm).
    pub name: String,
    /// `markers+sockets`, `markers` or `sockets`.
    pub mode: &'static str,
}

pub(super) struct HealthMetrics {
    target_info: IntGaugeVec,
    /// PID → the label values of its `brokerprobe_target_info` series.
    targets: HashMap<u32, [String; 4]>,
    attached_markers: IntGauge,
    attached_socket_tracepoints: IntGauge,
    in_flight: IntGauge,
    trace_queue: IntGauge,
    counters: Vec<(IntCounter, HealthTotal)>,
    last: ProbeHealth,
}

/// Reads one total out of the health figures.
type HealthTotal = fn(&ProbeHealth) -> u64;

/// A health counter: metric name, help, an optional (label, value), and its total.
type HealthCounter = (
    &'static str,
    &'static str,
    Option<(&'static str, &'static str)>,
    HealthTotal,
);

/// Every health counter, exported as the increase of a [`ProbeHealth`] total.
const HEALTH_COUNTERS: &[HealthCounter] = &[
    (
        "brokerprobe_events_total",
        "Events received from the kernel (markers and sockets).",
        None,
        |h| h.events,
    ),
    (
        "brokerprobe_events_lost_total",
        "Events dropped in the kernel because the ring buffer was full.",
        Some(("family", "marker")),
        |h| h.marker_events_lost,
    ),
    (
        "brokerprobe_events_lost_total",
        "Events dropped in the kernel because the ring buffer was full.",
        Some(("family", "socket")),
        |h| h.socket_events_lost,
    ),
    (
        "brokerprobe_event_decode_errors_total",
        "Events that could not be decoded.",
        None,
        |h| h.decode_errors,
    ),
    (
        "brokerprobe_requests_partial_total",
        "Ends of requests not tracked (begun before the attach, expired or over the bound).",
        None,
        |h| h.assembly.partial,
    ),
    (
        "brokerprobe_orphan_events_total",
        "Events of requests not tracked (begun before the attach, expired or over the bound).",
        None,
        |h| h.assembly.orphan_events,
    ),
    (
        "brokerprobe_requests_expired_total",
        "Requests dropped because their end never came (timeout, or their process exited).",
        None,
        |h| h.assembly.expired,
    ),
    (
        "brokerprobe_requests_incomplete_total",
        "Requests not reported because the ring buffer lost records while they ran (one may have been theirs).",
        None,
        |h| h.assembly.incomplete,
    ),
    (
        "brokerprobe_requests_overflow_total",
        "Requests not tracked because too many were open at once.",
        None,
        |h| h.assembly.overflow,
    ),
    (
        "brokerprobe_stages_unclosed_total",
        "Stages still open when their request ended (not reported).",
        None,
        |h| h.assembly.unclosed_stages,
    ),
    (
        "brokerprobe_stage_ends_unmatched_total",
        "Stage ends without a matching begin.",
        None,
        |h| h.assembly.unmatched_stage_ends,
    ),
    (
        "brokerprobe_requests_duplicate_begin_total",
        "Request begins for an id already open; the earlier request is abandoned.",
        None,
        |h| h.assembly.duplicate_begins,
    ),
    (
        "brokerprobe_request_bound_drops_total",
        "Stage begins, first bytes, fallbacks and upstream calls past one request's bounds (not kept).",
        None,
        |h| h.assembly.over_request_bounds,
    ),
    (
        "brokerprobe_socket_io_unfollowed_total",
        "Socket reads/writes outside read/write-family syscalls (io_uring, sendfile): not followed.",
        None,
        |h| h.socket_io_without_syscall,
    ),
    (
        "brokerprobe_sockets_unresolved_total",
        "Sockets whose role could not be learned from /proc: their I/O is not followed.",
        None,
        |h| h.connections.unresolved,
    ),
    (
        "brokerprobe_exchanges_unanswered_total",
        "Exchanges whose request got no response before close or detach (not reported).",
        None,
        |h| h.connections.unanswered,
    ),
    (
        "brokerprobe_stray_response_bytes_total",
        "Response bytes outside any observed exchange (under way at attach, or after the idle timeout).",
        None,
        |h| h.connections.stray_response_bytes,
    ),
    (
        "brokerprobe_upstream_attributions_total",
        "Upstream exchanges related to a broker request, by method (docs/sockets.md).",
        Some(("method", "adjacent")),
        |h| h.assembly.attribution.adjacent,
    ),
    (
        "brokerprobe_upstream_attributions_total",
        "Upstream exchanges related to a broker request, by method (docs/sockets.md).",
        Some(("method", "only_candidate")),
        |h| h.assembly.attribution.only_candidate,
    ),
    (
        "brokerprobe_upstream_attributions_total",
        "Upstream exchanges related to a broker request, by method (docs/sockets.md).",
        Some(("method", "none")),
        |h| h.assembly.attribution.unattributed,
    ),
    (
        "brokerprobe_export_dropped_total",
        "Records an exporter could not write (after a write error to its file), by exporter.",
        Some(("exporter", "requests_out")),
        |h| h.requests_out_dropped,
    ),
    (
        "brokerprobe_export_dropped_total",
        "Records an exporter could not write (after a write error to its file), by exporter.",
        Some(("exporter", "exchanges_out")),
        |h| h.exchanges_out_dropped,
    ),
    (
        "brokerprobe_export_dropped_total",
        "Records an exporter could not write (after a write error to its file), by exporter.",
        Some(("exporter", "stages_out")),
        |h| h.stages_out_dropped,
    ),
    (
        "brokerprobe_traces_total",
        "Requests judged for tracing, by verdict: kept by the sampler (head), kept because they failed or were slow (tail), or sampled out.",
        Some(("verdict", "head")),
        |h| h.traces.sampled_head,
    ),
    (
        "brokerprobe_traces_total",
        "Requests judged for tracing, by verdict: kept by the sampler (head), kept because they failed or were slow (tail), or sampled out.",
        Some(("verdict", "tail")),
        |h| h.traces.sampled_tail,
    ),
    (
        "brokerprobe_traces_total",
        "Requests judged for tracing, by verdict: kept by the sampler (head), kept because they failed or were slow (tail), or sampled out.",
        Some(("verdict", "sampled_out")),
        |h| h.traces.sampled_out,
    ),
    (
        "brokerprobe_trace_spans_exported_total",
        "Spans delivered, by target: the OTLP endpoint (otlp) or the embedded store (store).",
        Some(("target", "otlp")),
        |h| h.traces.exported_spans[0],
    ),
    (
        "brokerprobe_trace_spans_exported_total",
        "Spans delivered, by target: the OTLP endpoint (otlp) or the embedded store (store).",
        Some(("target", "store")),
        |h| h.traces.exported_spans[1],
    ),
    (
        "brokerprobe_trace_spans_dropped_total",
        "Spans not delivered, by reason: the export queue was full; still queued when the flush at exit ran out of time; or the export to the OTLP endpoint or the embedded store failed (down, slow, refusing).",
        Some(("reason", "queue_full")),
        |h| h.traces.dropped_spans,
    ),
    (
        "brokerprobe_trace_spans_dropped_total",
        "Spans not delivered, by reason: the export queue was full; still queued when the flush at exit ran out of time; or the export to the OTLP endpoint or the embedded store failed (down, slow, refusing).",
        Some(("reason", "unsent_at_exit")),
        |h| h.traces.unsent_spans,
    ),
    (
        "brokerprobe_trace_spans_dropped_total",
        "Spans not delivered, by reason: the export queue was full; still queued when the flush at exit ran out of time; or the export to the OTLP endpoint or the embedded store failed (down, slow, refusing).",
        Some(("reason", "otlp_export_failed")),
        |h| h.traces.failed_spans[0],
    ),
    (
        "brokerprobe_trace_spans_dropped_total",
        "Spans not delivered, by reason: the export queue was full; still queued when the flush at exit ran out of time; or the export to the OTLP endpoint or the embedded store failed (down, slow, refusing).",
        Some(("reason", "store_export_failed")),
        |h| h.traces.failed_spans[1],
    ),
    (
        "brokerprobe_traces_without_socket_figures_total",
        "Traces sent without the socket figures of some upstream call (they did not come within --exchange-idle + 1 s, or too many requests were waiting for theirs).",
        None,
        |h| h.traces.without_sockets,
    ),
    (
        "brokerprobe_upstream_arrivals_untimed_total",
        "Upstream response reads whose arrival the kernel did not time: timed by the read.",
        None,
        |h| h.connections.arrivals_unknown,
    ),
    (
        "brokerprobe_socket_tallies_lost_total",
        "Times the kernel's tallies of a socket's continued reads and writes started over (its map entry evicted): what they held since the last look is not counted.",
        None,
        |h| h.connections.tallies_lost,
    ),
];

impl HealthMetrics {
    pub(super) fn register(r: &Register) -> prometheus::Result<Self> {
        let target_info = IntGaugeVec::new(
            Opts::new(
                "brokerprobe_target_info",
                "A process brokerprobe is attached to (value 1), its replica label and with \
                 which probes.",
            ),
            &["replica", "pid", "name", "mode"],
        )?;
        r.registry.register(Box::new(target_info.clone()))?;
        let mut families: HashMap<&str, IntCounterVec> = HashMap::new();
        let mut counters = Vec::new();
        for (name, help, label, total) in HEALTH_COUNTERS {
            let family = match families.get(name) {
                Some(family) => family.clone(),
                None => {
                    let labels: Vec<&str> = label.iter().map(|(label, _)| *label).collect();
                    let family = r.counter(name, help, &labels)?;
                    families.insert(name, family.clone());
                    family
                }
            };
            let values: Vec<&str> = label.iter().map(|(_, value)| *value).collect();
            counters.push((family.with_label_values(&values), *total));
        }
        Ok(Self {
            target_info,
            targets: HashMap::new(),
            attached_markers: r.gauge(
                "brokerprobe_attached_markers",
                "Marker uprobes currently attached.",
            )?,
            attached_socket_tracepoints: r.gauge(
                "brokerprobe_attached_socket_tracepoints",
                "Socket tracepoints currently attached.",
            )?,
            in_flight: r.gauge(
                "brokerprobe_requests_in_flight",
                "Broker requests begun and not yet ended.",
            )?,
            trace_queue: r.gauge(
                "brokerprobe_trace_queue",
                "Traces waiting in the export queue.",
            )?,
            counters,
            last: ProbeHealth::default(),
        })
    }

    pub(super) fn process_attached(&mut self, process: &TargetInfo) {
        let values = [
            process.replica.to_string(),
            process.pid.to_string(),
            process.name.clone(),
            process.mode.to_owned(),
        ];
        self.target_info.with_label_values(&values).set(1);
        self.targets.insert(process.pid, values);
    }

    pub(super) fn process_exited(&mut self, pid: u32) {
        if let Some(values) = self.targets.remove(&pid) {
            let _ = self.target_info.remove_label_values(&values);
        }
    }

    pub(super) fn update(&mut self, now: &ProbeHealth) {
        self.attached_markers.set(i64::from(now.attached_markers));
        self.attached_socket_tracepoints
            .set(i64::from(now.attached_socket_tracepoints));
        self.in_flight.set(now.in_flight as i64);
        self.trace_queue.set(now.traces.queued as i64);
        for (counter, total) in &self.counters {
            counter.inc_by(total(now).saturating_sub(total(&self.last)));
        }
        self.last = *now;
    }
}
