//! Prometheus exposition; docs/metrics.md lists every metric. One file per family: the
//! broker's requests and stages with the OpenTelemetry GenAI metrics ([`broker`]), the
//! socket view ([`sockets`]), and brokerprobe's own health ([`health`]).

mod broker;
mod health;
mod sockets;

use std::collections::HashMap;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry};

use super::{
    ExchangeSink, ProbeHealth, RequestSink,
    labels::{LabelCap, OTHER},
};
use crate::{assembly::Request, connections::Exchange};

pub use health::TargetInfo;

/// Histogram buckets and label bounds (`brokerprobe attach --help`).
#[derive(Clone, Debug, PartialEq)]
pub struct MetricsConfig {
    /// Seconds, for every duration.
    pub latency_buckets: Vec<f64>,
    /// Tokens, for `gen_ai_client_token_usage`.
    pub token_buckets: Vec<f64>,
    /// Distinct values each client- or broker-chosen label may take before `other`.
    pub max_label_values: usize,
}

/// Seconds: from sub-millisecond broker stages up to 5-minute generations.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

/// Tokens: from one-token answers up to 128k-token contexts.
pub const TOKEN_BUCKETS: &[f64] = &[
    1.0, 4.0, 16.0, 64.0, 256.0, 1_024.0, 4_096.0, 16_384.0, 32_768.0, 65_536.0, 131_072.0,
];

/// Bytes of an upstream request or response: 64 B to 16 MiB.
const SIZE_BUCKETS: &[f64] = &[
    64.0,
    256.0,
    1_024.0,
    4_096.0,
    16_384.0,
    65_536.0,
    262_144.0,
    1_048_576.0,
    4_194_304.0,
    16_777_216.0,
];

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            latency_buckets: LATENCY_BUCKETS.to_vec(),
            token_buckets: TOKEN_BUCKETS.to_vec(),
            max_label_values: 100,
        }
    }
}

/// Checks bucket bounds given on the command line: finite, positive, increasing.
pub fn check_buckets(bounds: &[f64]) -> Result<(), String> {
    if bounds.is_empty() {
        return Err("no bucket bounds".into());
    }
    if let Some(bad) = bounds.iter().find(|b| !b.is_finite() || **b <= 0.0) {
        return Err(format!("bucket bound {bad} is not a positive number"));
    }
    if let Some(pair) = bounds.windows(2).find(|pair| pair[0] >= pair[1]) {
        return Err(format!(
            "bucket bounds must increase: {} then {}",
            pair[0], pair[1]
        ));
    }
    Ok(())
}

pub struct PrometheusExporter {
    registry: Registry,
    broker: broker::BrokerMetrics,
    sockets: sockets::SocketMetrics,
    health: health::HealthMetrics,
    labels: Labels,
    /// PID → its `replica` label value.
    replicas: HashMap<u32, String>,
}

/// The label naming which of the broker's processes a series is about: "0", "1", … in
/// the order they were attached; a process that replaces an exited one (`--follow`) takes
/// its number, so series continue across restarts.
pub const REPLICA_LABEL: &str = "replica";

impl PrometheusExporter {
    pub fn new(config: &MetricsConfig) -> prometheus::Result<Self> {
        let registry = Registry::new();
        let per_replica = Register {
            registry: &registry,
            config,
            per_replica: true,
        };
        let own = Register {
            per_replica: false,
            ..per_replica
        };
        Ok(Self {
            broker: broker::BrokerMetrics::register(&per_replica)?,
            sockets: sockets::SocketMetrics::register(&per_replica)?,
            health: health::HealthMetrics::register(&own)?,
            labels: Labels::register(&own)?,
            registry,
            replicas: HashMap::new(),
        })
    }

    /// A process of the broker is followed from now on.
    pub fn process_attached(&mut self, process: &TargetInfo) {
        self.replicas
            .insert(process.pid, process.replica.to_string());
        self.health.process_attached(process);
    }

    /// A process of the broker has exited.
    pub fn process_exited(&mut self, pid: u32) {
        self.replicas.remove(&pid);
        self.health.process_exited(pid);
    }

    /// What /metrics serves; metrics are shared, so a clone sees every update.
    pub fn registry(&self) -> Registry {
        self.registry.clone()
    }

    pub fn update_health(&mut self, health: &ProbeHealth) {
        self.health.update(health);
    }
}

impl PrometheusExporter {
    /// One call of a symbol-mapped stage function of process `pid`.
    pub fn record_stage_sample(&mut self, pid: u32, stage: &str, duration_ns: u64) {
        let replica = self.replicas.get(&pid).map_or(UNKNOWN, String::as_str);
        self.broker
            .record_stage(replica, stage, duration_ns, &mut self.labels);
    }
}

impl RequestSink for PrometheusExporter {
    fn record(&mut self, request: &Request) {
        let replica = self
            .replicas
            .get(&request.pid)
            .map_or(UNKNOWN, String::as_str);
        self.broker.record(request, replica, &mut self.labels);
    }
}

impl ExchangeSink for PrometheusExporter {
    fn record_exchange(&mut self, exchange: &Exchange) {
        let replica = self
            .replicas
            .get(&exchange.pid)
            .map_or(UNKNOWN, String::as_str);
        self.sockets.record(exchange, replica, &mut self.labels);
    }
}

/// Registers metrics in one registry, with the configured buckets.
struct Register<'a> {
    registry: &'a Registry,
    config: &'a MetricsConfig,
    /// Whether each metric gets a `replica` label first: the broker's and the sockets'
    /// metrics do (one series per process, summed for the broker), brokerprobe's own don't.
    per_replica: bool,
}

impl Register<'_> {
    fn histogram(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
        buckets: &[f64],
    ) -> prometheus::Result<HistogramVec> {
        let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
        let metric = HistogramVec::new(opts, &self.labels(labels))?;
        self.registry.register(Box::new(metric.clone()))?;
        Ok(metric)
    }

    /// A histogram of seconds, with the configured latency buckets.
    fn seconds(&self, name: &str, help: &str, labels: &[&str]) -> prometheus::Result<HistogramVec> {
        self.histogram(name, help, labels, &self.config.latency_buckets)
    }

    fn counter(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> prometheus::Result<IntCounterVec> {
        let metric = IntCounterVec::new(Opts::new(name, help), &self.labels(labels))?;
        self.registry.register(Box::new(metric.clone()))?;
        Ok(metric)
    }

    fn labels<'l>(&self, labels: &[&'l str]) -> Vec<&'l str> {
        let replica = self.per_replica.then_some(REPLICA_LABEL);
        replica.into_iter().chain(labels.iter().copied()).collect()
    }

    fn gauge(&self, name: &str, help: &str) -> prometheus::Result<IntGauge> {
        let metric = IntGauge::new(name, help)?;
        self.registry.register(Box::new(metric.clone()))?;
        Ok(metric)
    }
}

/// Labels whose values come from clients or the broker, each bounded
/// ([`MetricsConfig::max_label_values`]); a value past the bound becomes `other`, counted
/// in `brokerprobe_label_values_folded_total{label}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Label {
    Model,
    Provider,
    Stage,
    Tool,
    ErrorType,
    Upstream,
    Path,
}

impl Label {
    const ALL: [Label; 7] = [
        Label::Model,
        Label::Provider,
        Label::Stage,
        Label::Tool,
        Label::ErrorType,
        Label::Upstream,
        Label::Path,
    ];

    fn name(self) -> &'static str {
        match self {
            Label::Model => "model",
            Label::Provider => "provider",
            Label::Stage => "stage",
            Label::Tool => "tool",
            Label::ErrorType => "error_type",
            Label::Upstream => "upstream",
            Label::Path => "path",
        }
    }
}

struct Labels {
    caps: [LabelCap; Label::ALL.len()],
    folded: IntCounterVec,
}

/// A label value that is missing or empty.
const UNKNOWN: &str = "unknown";

impl Labels {
    fn register(register: &Register) -> prometheus::Result<Self> {
        let max = register.config.max_label_values;
        Ok(Self {
            caps: Label::ALL.map(|_| LabelCap::new(max)),
            folded: register.counter(
                "brokerprobe_label_values_folded_total",
                "Observations whose label value was replaced by `other`: the label had reached \
                 --max-label-values distinct values.",
                &["label"],
            )?,
        })
    }

    /// `value` (or `unknown` if empty) if the label may take it, else `other`.
    fn admit<'a>(&mut self, label: Label, value: &'a str) -> &'a str {
        let value = if value.is_empty() { UNKNOWN } else { value };
        self.caps[label as usize].admit(value).unwrap_or_else(|| {
            self.folded.with_label_values(&[label.name()]).inc();
            OTHER
        })
    }
}

fn seconds(ns: u64) -> f64 {
    ns as f64 / 1e9
}

#[cfg(test)]
mod tests {
    use probe_common::marker::Stage;

    use super::*;
    use crate::{
        assembly::{Fallback, StageSpan, TokenUsage, UpstreamCall},
        decode::StageId,
        server::render,
    };

    fn exporter(max_label_values: usize) -> PrometheusExporter {
        let config = MetricsConfig {
            max_label_values,
            ..MetricsConfig::default()
        };
        let mut exporter = PrometheusExporter::new(&config).unwrap();
        // Requests below come from PID 0.
        exporter.process_attached(&TargetInfo::default());
        exporter
    }

    fn span(id: StageId, begin_ns: u64, end_ns: u64) -> StageSpan {
        StageSpan {
            id,
            begin_ns,
            end_ns,
        }
    }

    #[test]
    fn bucket_bounds_are_checked() {
        assert!(check_buckets(LATENCY_BUCKETS).is_ok());
        assert!(check_buckets(TOKEN_BUCKETS).is_ok());
        assert!(check_buckets(&[]).is_err());
        assert!(check_buckets(&[0.1, 0.1]).unwrap_err().contains("increase"));
        assert!(check_buckets(&[-1.0]).unwrap_err().contains("positive"));
        assert!(check_buckets(&[f64::NAN]).is_err());
    }

    #[test]
    fn stages_and_requests_are_exported_with_labels() {
        let mut exporter = exporter(100);
        let request = Request {
            model: "gpt-fast".into(),
            provider: Some("openai".into()),
            status: 200,
            begin_ns: 0,
            end_ns: 3_000_000,
            stages: vec![span(StageId::Known(Stage::Route), 0, 2_000)],
            ..Request::default()
        };
        exporter.record(&request);
        exporter.record(&request);
        let text = render(&exporter.registry());
        assert!(text.contains(
            "brokerprobe_stage_duration_seconds_count{model=\"gpt-fast\",provider=\"openai\",replica=\"0\",stage=\"route\"} 2"
        ));
        assert!(text.contains(
            "brokerprobe_requests_total{model=\"gpt-fast\",provider=\"openai\",replica=\"0\",status=\"200\"} 2"
        ));
        assert!(!text.contains("brokerprobe_errors_total{"), "no error");
    }

    /// A streamed request that fell back from a failing model, ran a tool and billed
    /// tokens twice, and finally failed.
    #[test]
    fn errors_fallbacks_tools_tokens_and_gen_ai_timings() {
        let mut exporter = exporter(100);
        let upstream = StageId::Known(Stage::UpstreamChatStream);
        let request = Request {
            model: "m".into(),
            provider: Some("p".into()),
            status: 200,
            error_type: Some("tool_loop_exhausted".into()),
            begin_ns: 0,
            end_ns: 9_000_000,
            stages: vec![
                span(upstream.clone(), 1_000_000, 2_000_000),
                span(StageId::Tool("calc".into()), 2_000_000, 2_500_000),
                span(upstream, 3_000_000, 8_000_000),
            ],
            fallbacks: vec![Fallback {
                from: "flaky".into(),
                to: "m".into(),
                ts_ns: 2_500_000,
            }],
            upstream_calls: vec![UpstreamCall {
                stage_begin_ns: 1_000_000,
                status: Some(500),
                ..UpstreamCall::default()
            }],
            chunks: 3,
            first_chunk_ns: Some(4_000_000),
            last_chunk_ns: Some(8_000_000),
            output_tokens: 5,
            token_usage: vec![
                TokenUsage {
                    input: 10,
                    output: 1,
                    ts_ns: 2_000_000,
                },
                TokenUsage {
                    input: 20,
                    output: 4,
                    ts_ns: 8_000_000,
                },
            ],
            ..Request::default()
        };
        exporter.record(&request);
        let text = render(&exporter.registry());
        for line in [
            "brokerprobe_errors_total{error_type=\"tool_loop_exhausted\",model=\"m\",replica=\"0\"} 1",
            "brokerprobe_fallbacks_total{from_model=\"flaky\",replica=\"0\",to_model=\"m\"} 1",
            "brokerprobe_tool_duration_seconds_sum{replica=\"0\",tool=\"calc\"} 0.0005",
            "gen_ai_client_token_usage_sum{gen_ai_operation_name=\"chat\",gen_ai_provider_name=\"p\",gen_ai_request_model=\"m\",gen_ai_token_type=\"input\",replica=\"0\"} 30",
            "gen_ai_client_token_usage_count{gen_ai_operation_name=\"chat\",gen_ai_provider_name=\"p\",gen_ai_request_model=\"m\",gen_ai_token_type=\"output\",replica=\"0\"} 2",
            // The first call failed with its status; the last one with the request's error.
            "gen_ai_client_operation_duration_seconds_count{error_type=\"500\",gen_ai_operation_name=\"chat\",gen_ai_provider_name=\"p\",gen_ai_request_model=\"m\",replica=\"0\"} 1",
            "gen_ai_client_operation_duration_seconds_sum{error_type=\"tool_loop_exhausted\",gen_ai_operation_name=\"chat\",gen_ai_provider_name=\"p\",gen_ai_request_model=\"m\",replica=\"0\"} 0.005",
        ] {
            assert!(text.contains(line), "{line} not in:\n{text}");
        }
        assert!(
            !text.contains("gen_ai_server_time_per_output_token_seconds_count{")
                && !text.contains("gen_ai_server_time_to_first_token_seconds_count{"),
            "only successful requests have a time to first token and per output token"
        );
    }

    #[test]
    fn time_per_output_token_spreads_the_stream_over_tokens_after_the_first() {
        let mut exporter = exporter(100);
        let request = Request {
            model: "m".into(),
            status: 200,
            first_chunk_ns: Some(1_000_000),
            last_chunk_ns: Some(5_000_000),
            output_tokens: 7,
            // The last answer (the one streamed to the client) had 5 tokens.
            token_usage: vec![
                TokenUsage {
                    input: 1,
                    output: 2,
                    ts_ns: 500_000,
                },
                TokenUsage {
                    input: 1,
                    output: 5,
                    ts_ns: 5_000_000,
                },
            ],
            ..Request::default()
        };
        exporter.record(&request);
        let text = render(&exporter.registry());
        assert!(text.contains(
            "gen_ai_server_time_per_output_token_seconds_sum{gen_ai_operation_name=\"chat\",gen_ai_provider_name=\"unknown\",gen_ai_request_model=\"m\",replica=\"0\"} 0.001"
        ), "{text}");
    }

    #[test]
    fn client_chosen_models_cannot_grow_series_without_bound() {
        let mut exporter = exporter(10);
        for i in 0..1_000 {
            let request = Request {
                model: format!("model-{i}"),
                status: 404,
                error_type: Some(format!("error-{i}")),
                ..Request::default()
            };
            exporter.record(&request);
        }
        let text = render(&exporter.registry());
        let series = |prefix: &str| text.lines().filter(|l| l.starts_with(prefix)).count();
        assert_eq!(
            series("brokerprobe_requests_total{"),
            11,
            "10 models and `other`"
        );
        assert!(series("brokerprobe_errors_total{") <= 11 * 11);
        assert!(text.contains(
            "brokerprobe_requests_total{model=\"other\",provider=\"unknown\",replica=\"0\",status=\"404\"} 990"
        ));
        assert!(text.contains("brokerprobe_label_values_folded_total{label=\"model\"} 990"));
        assert!(text.contains("brokerprobe_label_values_folded_total{label=\"error_type\"} 990"));
    }

    #[test]
    fn health_counters_follow_totals() {
        let mut exporter = exporter(100);
        exporter.update_health(&ProbeHealth {
            events: 10,
            marker_events_lost: 2,
            ..ProbeHealth::default()
        });
        exporter.update_health(&ProbeHealth {
            events: 15,
            marker_events_lost: 2,
            requests_out_dropped: 3,
            stages_out_dropped: 0,
            ..ProbeHealth::default()
        });
        let text = render(&exporter.registry());
        assert!(text.contains("brokerprobe_events_total 15"));
        assert!(text.contains("brokerprobe_events_lost_total{family=\"marker\"} 2"));
        assert!(text.contains("brokerprobe_export_dropped_total{exporter=\"requests_out\"} 3"));
    }
}
