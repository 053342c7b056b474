//! Prometheus exposition: per-stage and per-request histograms plus the probe's own health.
//! Every metric is listed in docs/metrics.md.

use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

use super::{
    ProbeHealth, RequestSink,
    labels::{LabelCap, OTHER},
};
use crate::assembly::Request;

/// Seconds; from sub-millisecond broker stages up to 5-minute generations.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

const UNKNOWN: &str = "unknown";

pub struct PrometheusExporter {
    registry: Registry,
    stage_duration: HistogramVec,
    request_duration: HistogramVec,
    requests: IntCounterVec,
    /// Client-influenced labels, each capped.
    models: LabelCap,
    providers: LabelCap,
    stages: LabelCap,
    folded: IntCounterVec,
    health: HealthMetrics,
}

struct HealthMetrics {
    attached_markers: IntGauge,
    events: IntCounter,
    events_lost: IntCounter,
    decode_errors: IntCounter,
    in_flight: IntGauge,
    partial: IntCounter,
    orphan_events: IntCounter,
    expired: IntCounter,
    overflow: IntCounter,
    unclosed_stages: IntCounter,
    unmatched_stage_ends: IntCounter,
    duplicate_begins: IntCounter,
    over_request_bounds: IntCounter,
    last: ProbeHealth,
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
            folded,
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
    }
}

fn non_empty(value: &str) -> &str {
    if value.is_empty() { UNKNOWN } else { value }
}

fn seconds(ns: u64) -> f64 {
    ns as f64 / 1e9
}

impl HealthMetrics {
    fn register(registry: &Registry) -> prometheus::Result<Self> {
        let counter = |name: &str, help: &str| -> prometheus::Result<IntCounter> {
            let metric = IntCounter::new(name, help)?;
            registry.register(Box::new(metric.clone()))?;
            Ok(metric)
        };
        let gauge = |name: &str, help: &str| -> prometheus::Result<IntGauge> {
            let metric = IntGauge::new(name, help)?;
            registry.register(Box::new(metric.clone()))?;
            Ok(metric)
        };
        Ok(Self {
            attached_markers: gauge(
                "brokerprobe_attached_markers",
                "Marker uprobes currently attached.",
            )?,
            events: counter(
                "brokerprobe_events_total",
                "Marker events received from the kernel.",
            )?,
            events_lost: counter(
                "brokerprobe_events_lost_total",
                "Marker events dropped in the kernel because the ring buffer was full.",
            )?,
            decode_errors: counter(
                "brokerprobe_event_decode_errors_total",
                "Marker events that could not be decoded.",
            )?,
            in_flight: gauge(
                "brokerprobe_requests_in_flight",
                "Requests begun and not yet ended.",
            )?,
            partial: counter(
                "brokerprobe_requests_partial_total",
                "Ends of requests not tracked (begun before the attach, expired or over the bound).",
            )?,
            orphan_events: counter(
                "brokerprobe_orphan_events_total",
                "Events of requests not tracked (begun before the attach, expired or over the bound).",
            )?,
            expired: counter(
                "brokerprobe_requests_expired_total",
                "Requests dropped because their end never came.",
            )?,
            overflow: counter(
                "brokerprobe_requests_overflow_total",
                "Requests not tracked because too many were open at once.",
            )?,
            unclosed_stages: counter(
                "brokerprobe_stages_unclosed_total",
                "Stages still open when their request ended (not reported).",
            )?,
            unmatched_stage_ends: counter(
                "brokerprobe_stage_ends_unmatched_total",
                "Stage ends without a matching begin.",
            )?,
            duplicate_begins: counter(
                "brokerprobe_requests_duplicate_begin_total",
                "Request begins for an id already open; the earlier request is abandoned.",
            )?,
            over_request_bounds: counter(
                "brokerprobe_request_bound_drops_total",
                "Stage begins, first bytes and fallbacks past one request's bounds (not kept).",
            )?,
            last: ProbeHealth::default(),
        })
    }

    fn update(&mut self, now: &ProbeHealth) {
        let last = self.last;
        let add = |counter: &IntCounter, now: u64, before: u64| {
            counter.inc_by(now.saturating_sub(before))
        };
        self.attached_markers.set(i64::from(now.attached_markers));
        self.in_flight.set(now.in_flight as i64);
        add(&self.events, now.events, last.events);
        add(&self.events_lost, now.events_lost, last.events_lost);
        add(&self.decode_errors, now.decode_errors, last.decode_errors);
        let (a, b) = (now.assembly, last.assembly);
        add(&self.partial, a.partial, b.partial);
        add(&self.orphan_events, a.orphan_events, b.orphan_events);
        add(&self.expired, a.expired, b.expired);
        add(&self.overflow, a.overflow, b.overflow);
        add(&self.unclosed_stages, a.unclosed_stages, b.unclosed_stages);
        add(
            &self.unmatched_stage_ends,
            a.unmatched_stage_ends,
            b.unmatched_stage_ends,
        );
        add(
            &self.duplicate_begins,
            a.duplicate_begins,
            b.duplicate_begins,
        );
        add(
            &self.over_request_bounds,
            a.over_request_bounds,
            b.over_request_bounds,
        );
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
            events_lost: 2,
            ..ProbeHealth::default()
        });
        exporter.update_health(&ProbeHealth {
            events: 15,
            events_lost: 2,
            ..ProbeHealth::default()
        });
        let text = render(&exporter.registry());
        assert!(text.contains("brokerprobe_events_total 15"));
        assert!(text.contains("brokerprobe_events_lost_total 2"));
    }
}
