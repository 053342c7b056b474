//! Prometheus exposition: per-stage and per-request histograms plus the probe's own health.
//! Every metric is listed in docs/metrics.md.

use std::collections::HashMap;

use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

use super::{
    ExchangeSink, ProbeHealth, RequestSink,
    labels::{LabelCap, OTHER},
};
use crate::{assembly::Request, connections::Exchange, procnet::Role};

/// Seconds; from sub-millisecond broker stages up to 5-minute generations.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

const UNKNOWN: &str = "unknown";

const NO_LABELS: [&str; 0] = [];

pub struct PrometheusExporter {
    registry: Registry,
    stage_duration: HistogramVec,
    request_duration: HistogramVec,
    requests: IntCounterVec,
    /// Client-influenced labels, each capped.
    models: LabelCap,
    providers: LabelCap,
    stages: LabelCap,
    /// Upstream names are addresses unless configured; paths come from clients.
    upstreams: LabelCap,
    paths: LabelCap,
    folded: IntCounterVec,
    exchanges: ExchangeMetrics,
    health: HealthMetrics,
}

struct HealthMetrics {
    attached_markers: IntGauge,
    attached_socket_tracepoints: IntGauge,
    in_flight: IntGauge,
    counters: Vec<(IntCounter, HealthTotal)>,
    last: ProbeHealth,
}

/// Per-exchange metrics: upstream calls and inbound requests seen on the sockets.
struct ExchangeMetrics {
    upstream_ttfb: HistogramVec,
    upstream_duration: HistogramVec,
    upstream_connect: HistogramVec,
    upstream_read_delay: HistogramVec,
    upstream_exchanges: IntCounterVec,
    upstream_request_bytes: IntCounterVec,
    upstream_response_bytes: IntCounterVec,
    upstream_chunks: IntCounterVec,
    upstream_lag: HistogramVec,
    inbound_duration: HistogramVec,
    inbound_accept_wait: HistogramVec,
    inbound_exchanges: IntCounterVec,
    inbound_request_bytes: IntCounterVec,
    inbound_response_bytes: IntCounterVec,
}

impl PrometheusExporter {
    /// `max_label_values`: distinct values each of `model`, `provider` and `stage` may take.
    pub fn new(max_label_values: usize) -> prometheus::Result<Self> {
        let registry = Registry::new();
        let histogram =
            |name: &str, help: &str, labels: &[&str]| -> prometheus::Result<HistogramVec> {
                let opts = HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec());
                let metric = HistogramVec::new(opts, labels)?;
                registry.register(Box::new(metric.clone()))?;
                Ok(metric)
            };
        let counter =
            |name: &str, help: &str, labels: &[&str]| -> prometheus::Result<IntCounterVec> {
                let metric = IntCounterVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(metric.clone()))?;
                Ok(metric)
            };
        let exchanges = ExchangeMetrics {
            upstream_ttfb: histogram(
                "brokerprobe_upstream_ttfb_seconds",
                "Network time to first byte of an upstream call: first request byte written to \
                 first response byte arrived on the broker's socket.",
                &["upstream"],
            )?,
            upstream_duration: histogram(
                "brokerprobe_upstream_duration_seconds",
                "Upstream call, first request byte written to last response byte arrived.",
                &["upstream"],
            )?,
            upstream_connect: histogram(
                "brokerprobe_upstream_connect_seconds",
                "TCP handshake of a new upstream connection (SYN sent to established).",
                &["upstream"],
            )?,
            upstream_read_delay: histogram(
                "brokerprobe_upstream_read_delay_seconds",
                "How long an upstream response's first bytes waited on the broker's socket \
                 before the broker read them.",
                &["upstream"],
            )?,
            upstream_exchanges: counter(
                "brokerprobe_upstream_exchanges_total",
                "Upstream calls (request/response exchanges) seen on the sockets.",
                &["upstream", "status"],
            )?,
            upstream_request_bytes: counter(
                "brokerprobe_upstream_request_bytes_total",
                "Bytes the broker wrote to upstreams (TCP payload, headers included).",
                &["upstream"],
            )?,
            upstream_response_bytes: counter(
                "brokerprobe_upstream_response_bytes_total",
                "Bytes the broker read from upstreams (TCP payload, headers included).",
                &["upstream"],
            )?,
            upstream_chunks: counter(
                "brokerprobe_upstream_response_chunks_total",
                "Reads that carried upstream response bytes (stream chunks as they arrived).",
                &["upstream"],
            )?,
            upstream_lag: histogram(
                "brokerprobe_upstream_lag_seconds",
                "Broker-seen upstream wait (upstream stage begin to first-byte marker) minus \
                 network TTFB: time lost in the broker and its executor around the call.",
                &["provider"],
            )?,
            inbound_duration: histogram(
                "brokerprobe_inbound_duration_seconds",
                "Inbound request on the broker's socket: first request byte read to last \
                 response byte written.",
                &["method", "path", "status"],
            )?,
            inbound_accept_wait: histogram(
                "brokerprobe_inbound_accept_wait_seconds",
                "New inbound connection: accept to first request byte read.",
                &[],
            )?,
            inbound_exchanges: counter(
                "brokerprobe_inbound_exchanges_total",
                "Inbound requests (request/response exchanges) seen on the sockets.",
                &["method", "path", "status"],
            )?,
            inbound_request_bytes: counter(
                "brokerprobe_inbound_request_bytes_total",
                "Bytes the broker read from clients.",
                &[],
            )?,
            inbound_response_bytes: counter(
                "brokerprobe_inbound_response_bytes_total",
                "Bytes the broker wrote to clients.",
                &[],
            )?,
        };
        let stage_duration = histogram(
            "brokerprobe_stage_duration_seconds",
            "Duration of one broker stage instance, from its begin to its end marker.",
            &["stage", "model", "provider"],
        )?;
        let request_duration = histogram(
            "brokerprobe_request_duration_seconds",
            "Broker request duration, from the request-begin to the request-end marker.",
            &["model", "provider", "status"],
        )?;
        let requests = IntCounterVec::new(
            Opts::new(
                "brokerprobe_requests_total",
                "Broker requests seen whole (begin and end).",
            ),
            &["model", "provider", "status"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        let folded = IntCounterVec::new(
            Opts::new(
                "brokerprobe_label_values_folded_total",
                "Observations whose label value was replaced by `other`: the label had reached \
                 --max-label-values distinct values.",
            ),
            &["label"],
        )?;
        registry.register(Box::new(folded.clone()))?;
        let health = HealthMetrics::register(&registry)?;
        Ok(Self {
            registry,
            stage_duration,
            request_duration,
            requests,
            models: LabelCap::new(max_label_values),
            providers: LabelCap::new(max_label_values),
            stages: LabelCap::new(max_label_values),
            upstreams: LabelCap::new(max_label_values),
            paths: LabelCap::new(max_label_values),
            folded,
            exchanges,
            health,
        })
    }

    /// What /metrics serves; metrics are shared, so a clone sees every update.
    pub fn registry(&self) -> Registry {
        self.registry.clone()
    }

    pub fn update_health(&mut self, health: &ProbeHealth) {
        self.health.update(health);
    }
}

impl RequestSink for PrometheusExporter {
    fn record(&mut self, request: &Request) {
        let fold = |cap: &mut LabelCap, label: &str, value| {
            cap.admit(value).unwrap_or_else(|| {
                self.folded.with_label_values(&[label]).inc();
                OTHER
            })
        };
        let model = fold(&mut self.models, "model", non_empty(&request.model));
        let provider_value = request.provider.as_deref().map_or(UNKNOWN, non_empty);
        let provider = fold(&mut self.providers, "provider", provider_value);
        let status = request.status.to_string();
        for stage in &request.stages {
            let stage_name = fold(&mut self.stages, "stage", stage.id.name());
            self.stage_duration
                .with_label_values(&[stage_name, model, provider])
                .observe(seconds(stage.duration_ns()));
        }
        self.request_duration
            .with_label_values(&[model, provider, &status])
            .observe(seconds(request.duration_ns()));
        self.requests
            .with_label_values(&[model, provider, &status])
            .inc();
        for call in &request.upstream_calls {
            if let Some(lag) = call.lag_ns() {
                self.exchanges
                    .upstream_lag
                    .with_label_values(&[provider])
                    .observe(seconds(lag));
            }
        }
    }
}

impl ExchangeSink for PrometheusExporter {
    fn record_exchange(&mut self, exchange: &Exchange) {
        let m = &self.exchanges;
        let status = exchange
            .status
            .map_or_else(|| UNKNOWN.to_owned(), |s| s.to_string());
        match exchange.role {
            Role::Upstream => {
                let upstream = self
                    .upstreams
                    .admit(&exchange.peer_name)
                    .unwrap_or_else(|| {
                        self.folded.with_label_values(&["upstream"]).inc();
                        OTHER
                    });
                let labels = [upstream];
                if let Some(ttfb) = exchange.ttfb_ns() {
                    m.upstream_ttfb
                        .with_label_values(&labels)
                        .observe(seconds(ttfb));
                }
                if let Some(duration) = exchange.duration_ns() {
                    m.upstream_duration
                        .with_label_values(&labels)
                        .observe(seconds(duration));
                }
                if let Some(connect) = exchange.connect_ns {
                    m.upstream_connect
                        .with_label_values(&labels)
                        .observe(seconds(connect));
                }
                if let Some(delay) = exchange.read_delay_ns() {
                    m.upstream_read_delay
                        .with_label_values(&labels)
                        .observe(seconds(delay));
                }
                m.upstream_exchanges
                    .with_label_values(&[upstream, &status])
                    .inc();
                m.upstream_request_bytes
                    .with_label_values(&labels)
                    .inc_by(exchange.request_bytes);
                m.upstream_response_bytes
                    .with_label_values(&labels)
                    .inc_by(exchange.response_bytes);
                m.upstream_chunks
                    .with_label_values(&labels)
                    .inc_by(u64::from(exchange.response_chunks));
            }
            Role::Inbound => {
                let path = exchange.path.as_deref().unwrap_or(UNKNOWN);
                let path = self.paths.admit(path).unwrap_or_else(|| {
                    self.folded.with_label_values(&["path"]).inc();
                    OTHER
                });
                let labels = [exchange.method.unwrap_or(UNKNOWN), path, &status];
                if let Some(duration) = exchange.duration_ns() {
                    m.inbound_duration
                        .with_label_values(&labels)
                        .observe(seconds(duration));
                }
                if let Some(wait) = exchange.accept_wait_ns {
                    m.inbound_accept_wait
                        .with_label_values(&NO_LABELS)
                        .observe(seconds(wait));
                }
                m.inbound_exchanges.with_label_values(&labels).inc();
                m.inbound_request_bytes
                    .with_label_values(&NO_LABELS)
                    .inc_by(exchange.request_bytes);
                m.inbound_response_bytes
                    .with_label_values(&NO_LABELS)
                    .inc_by(exchange.response_bytes);
            }
        }
    }
}

fn non_empty(value: &str) -> &str {
    if value.is_empty() { UNKNOWN } else { value }
}

fn seconds(ns: u64) -> f64 {
    ns as f64 / 1e9
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
        "Requests dropped because their end never came.",
        None,
        |h| h.assembly.expired,
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
        |h| h.assembly.attributed_adjacent,
    ),
    (
        "brokerprobe_upstream_attributions_total",
        "Upstream exchanges related to a broker request, by method (docs/sockets.md).",
        Some(("method", "only_candidate")),
        |h| h.assembly.attributed_only_candidate,
    ),
    (
        "brokerprobe_upstream_attributions_total",
        "Upstream exchanges related to a broker request, by method (docs/sockets.md).",
        Some(("method", "none")),
        |h| h.assembly.unattributed_exchanges,
    ),
    (
        "brokerprobe_attribution_votes_dropped_total",
        "Thread-adjacency votes not kept: an exchange had votes for too many requests.",
        None,
        |h| h.assembly.attribution_votes_dropped,
    ),
    (
        "brokerprobe_upstream_arrivals_untimed_total",
        "Upstream response reads whose arrival the kernel did not time: timed by the read.",
        None,
        |h| h.connections.arrivals_unknown,
    ),
];

impl HealthMetrics {
    fn register(registry: &Registry) -> prometheus::Result<Self> {
        let gauge = |name: &str, help: &str| -> prometheus::Result<IntGauge> {
            let metric = IntGauge::new(name, help)?;
            registry.register(Box::new(metric.clone()))?;
            Ok(metric)
        };
        let mut families: HashMap<&str, IntCounterVec> = HashMap::new();
        let mut counters = Vec::new();
        for (name, help, label, total) in HEALTH_COUNTERS {
            let family = match families.get(name) {
                Some(family) => family.clone(),
                None => {
                    let labels: Vec<&str> = label.iter().map(|(label, _)| *label).collect();
                    let family = IntCounterVec::new(Opts::new(*name, *help), &labels)?;
                    registry.register(Box::new(family.clone()))?;
                    families.insert(name, family.clone());
                    family
                }
            };
            let values: Vec<&str> = label.iter().map(|(_, value)| *value).collect();
            counters.push((family.with_label_values(&values), *total));
        }
        Ok(Self {
            attached_markers: gauge(
                "brokerprobe_attached_markers",
                "Marker uprobes currently attached.",
            )?,
            attached_socket_tracepoints: gauge(
                "brokerprobe_attached_socket_tracepoints",
                "Socket tracepoints currently attached.",
            )?,
            in_flight: gauge(
                "brokerprobe_requests_in_flight",
                "Requests begun and not yet ended.",
            )?,
            counters,
            last: ProbeHealth::default(),
        })
    }

    fn update(&mut self, now: &ProbeHealth) {
        self.attached_markers.set(i64::from(now.attached_markers));
        self.attached_socket_tracepoints
            .set(i64::from(now.attached_socket_tracepoints));
        self.in_flight.set(now.in_flight as i64);
        for (counter, total) in &self.counters {
            counter.inc_by(total(now).saturating_sub(total(&self.last)));
        }
        self.last = *now;
    }
}

#[cfg(test)]
mod tests {
    use probe_common::marker::Stage;

    use super::*;
    use crate::{assembly::StageSpan, decode::StageId, server::render};

    #[test]
    fn stages_and_requests_are_exported_with_labels() {
        let mut exporter = PrometheusExporter::new(100).unwrap();
        let request = Request {
            model: "gpt-fast".into(),
            provider: Some("openai".into()),
            status: 200,
            begin_ns: 0,
            end_ns: 3_000_000,
            stages: vec![StageSpan {
                id: StageId::Known(Stage::Route),
                begin_ns: 0,
                end_ns: 2_000,
            }],
            ..Request::default()
        };
        exporter.record(&request);
        exporter.record(&request);
        let text = render(&exporter.registry());
        assert!(text.contains(
            "brokerprobe_stage_duration_seconds_count{model=\"gpt-fast\",provider=\"openai\",stage=\"route\"} 2"
        ));
        assert!(text.contains(
            "brokerprobe_requests_total{model=\"gpt-fast\",provider=\"openai\",status=\"200\"} 2"
        ));
    }

    #[test]
    fn client_chosen_models_cannot_grow_series_without_bound() {
        let mut exporter = PrometheusExporter::new(10).unwrap();
        for i in 0..1_000 {
            let request = Request {
                model: format!("model-{i}"),
                status: 200,
                ..Request::default()
            };
            exporter.record(&request);
        }
        let text = render(&exporter.registry());
        let series = text
            .lines()
            .filter(|l| l.starts_with("brokerprobe_requests_total{"))
            .count();
        assert_eq!(series, 11, "10 models and `other`");
        assert!(text.contains(
            "brokerprobe_requests_total{model=\"other\",provider=\"unknown\",status=\"200\"} 990"
        ));
        assert!(text.contains("brokerprobe_label_values_folded_total{label=\"model\"} 990"));
    }

    #[test]
    fn health_counters_follow_totals() {
        let mut exporter = PrometheusExporter::new(100).unwrap();
        exporter.update_health(&ProbeHealth {
            events: 10,
            marker_events_lost: 2,
            ..ProbeHealth::default()
        });
        exporter.update_health(&ProbeHealth {
            events: 15,
            marker_events_lost: 2,
            ..ProbeHealth::default()
        });
        let text = render(&exporter.registry());
        assert!(text.contains("brokerprobe_events_total 15"));
        assert!(text.contains("brokerprobe_events_lost_total{family=\"marker\"} 2"));
    }
}
