//! What the markers tell: stages, requests, errors, fallbacks, tools, the upstream lag,
//! and the OpenTelemetry GenAI metrics under their Prometheus names (the broker is a
//! GenAI server to its clients and a GenAI client of its providers).

use probe_common::marker::Stage;
use prometheus::{HistogramVec, IntCounterVec};

use super::{Label, Labels, Register, seconds};
use crate::{assembly::Request, decode::StageId};

/// `gen_ai.operation.name`: brokers answer chat completions.
const OPERATION: &str = "chat";

pub(super) struct BrokerMetrics {
    stage_duration: HistogramVec,
    request_duration: HistogramVec,
    requests: IntCounterVec,
    errors: IntCounterVec,
    fallbacks: IntCounterVec,
    tool_duration: HistogramVec,
    upstream_lag: HistogramVec,
    token_usage: HistogramVec,
    client_operation_duration: HistogramVec,
    server_request_duration: HistogramVec,
    server_time_to_first_token: HistogramVec,
    server_time_per_output_token: HistogramVec,
}

/// The GenAI metrics' common labels (OTel attributes, dots as underscores).
const GEN_AI: [&str; 3] = [
    "gen_ai_operation_name",
    "gen_ai_provider_name",
    "gen_ai_request_model",
];

impl BrokerMetrics {
    pub(super) fn register(r: &Register) -> prometheus::Result<Self> {
        let gen_ai_and = |extra: &'static str| [GEN_AI[0], GEN_AI[1], GEN_AI[2], extra];
        Ok(Self {
            stage_duration: r.seconds(
                "brokerprobe_stage_duration_seconds",
                "Duration of one broker stage instance, from its begin to its end marker.",
                &["stage", "model", "provider"],
            )?,
            request_duration: r.seconds(
                "brokerprobe_request_duration_seconds",
                "Broker request duration, from the request-begin to the request-end marker.",
                &["model", "provider", "status"],
            )?,
            requests: r.counter(
                "brokerprobe_requests_total",
                "Broker requests seen whole (begin and end).",
                &["model", "provider", "status"],
            )?,
            errors: r.counter(
                "brokerprobe_errors_total",
                "Broker requests that failed: an error type at request end, or a status of 400 \
                 or more (then the status is the error type).",
                &["error_type", "model"],
            )?,
            fallbacks: r.counter(
                "brokerprobe_fallbacks_total",
                "Fallbacks from one model to another (fallback markers).",
                &["from_model", "to_model"],
            )?,
            tool_duration: r.seconds(
                "brokerprobe_tool_duration_seconds",
                "One tool execution (tool.execute stage), by tool name.",
                &["tool"],
            )?,
            upstream_lag: r.seconds(
                "brokerprobe_upstream_lag_seconds",
                "Broker-seen upstream wait (upstream stage begin to first-byte marker) minus \
                 network TTFB: time lost in the broker and its executor around the call.",
                &["provider"],
            )?,
            token_usage: r.histogram(
                "gen_ai_client_token_usage",
                "OTel gen_ai.client.token.usage: tokens one upstream answer billed, by type \
                 (input, output).",
                &gen_ai_and("gen_ai_token_type"),
                &r.config.token_buckets,
            )?,
            client_operation_duration: r.seconds(
                "gen_ai_client_operation_duration_seconds",
                "OTel gen_ai.client.operation.duration: one upstream call (upstream.chat or \
                 upstream.chat_stream stage instance).",
                &gen_ai_and("error_type"),
            )?,
            server_request_duration: r.seconds(
                "gen_ai_server_request_duration_seconds",
                "OTel gen_ai.server.request.duration: one broker request.",
                &gen_ai_and("error_type"),
            )?,
            server_time_to_first_token: r.seconds(
                "gen_ai_server_time_to_first_token_seconds",
                "OTel gen_ai.server.time_to_first_token: request begin to the first streamed \
                 chunk the broker forwarded (streaming requests).",
                &GEN_AI,
            )?,
            server_time_per_output_token: r.seconds(
                "gen_ai_server_time_per_output_token_seconds",
                "OTel gen_ai.server.time_per_output_token: first to last streamed chunk, per \
                 output token after the first (successful streaming requests).",
                &GEN_AI,
            )?,
        })
    }

    pub(super) fn record(&self, request: &Request, labels: &mut Labels) {
        let model = labels.admit(Label::Model, &request.model);
        let provider = labels.admit(Label::Provider, request.provider.as_deref().unwrap_or(""));
        let status = request.status.to_string();
        let failed = request.error_type.is_some() || request.status >= 400;
        let error_type = match &request.error_type {
            Some(error_type) => labels.admit(Label::ErrorType, error_type),
            None if failed => &status,
            None => "",
        };
        for stage in &request.stages {
            let name = labels.admit(Label::Stage, stage.id.name());
            self.stage_duration
                .with_label_values(&[name, model, provider])
                .observe(seconds(stage.duration_ns()));
            if let StageId::Tool(tool) = &stage.id {
                let tool = labels.admit(Label::Tool, tool);
                self.tool_duration
                    .with_label_values(&[tool])
                    .observe(seconds(stage.duration_ns()));
            }
        }
        let by_status = [model, provider, status.as_str()];
        self.request_duration
            .with_label_values(&by_status)
            .observe(seconds(request.duration_ns()));
        self.requests.with_label_values(&by_status).inc();
        if failed {
            self.errors.with_label_values(&[error_type, model]).inc();
        }
        for fallback in &request.fallbacks {
            let from = labels.admit(Label::Model, &fallback.from);
            let to = labels.admit(Label::Model, &fallback.to);
            self.fallbacks.with_label_values(&[from, to]).inc();
        }
        for call in &request.upstream_calls {
            if let Some(lag) = call.lag_ns() {
                self.upstream_lag
                    .with_label_values(&[provider])
                    .observe(seconds(lag));
            }
        }
        let gen_ai = [OPERATION, provider, model];
        self.record_gen_ai(request, &gen_ai, error_type);
    }

    fn record_gen_ai(&self, request: &Request, gen_ai: &[&str; 3], error_type: &str) {
        let [operation, provider, model] = *gen_ai;
        for usage in &request.token_usage {
            for (kind, tokens) in [("input", usage.input), ("output", usage.output)] {
                self.token_usage
                    .with_label_values(&[operation, provider, model, kind])
                    .observe(tokens as f64);
            }
        }
        for stage in request.stages.iter().filter(|s| is_upstream_call(&s.id)) {
            // An upstream call failed if its response said so; the request's own error
            // is the last call's, when the sockets could not tell.
            let call = request
                .upstream_calls
                .iter()
                .find(|c| c.stage_begin_ns == stage.begin_ns);
            let status_error = call
                .and_then(|c| c.status)
                .filter(|status| *status >= 400)
                .map(|status| status.to_string());
            let is_last = request
                .stages
                .iter()
                .rfind(|s| is_upstream_call(&s.id))
                .is_some_and(|last| last.begin_ns == stage.begin_ns);
            let call_error = match (&status_error, call.and_then(|c| c.status)) {
                (Some(status), _) => status.as_str(),
                (None, None) if is_last => error_type,
                _ => "",
            };
            self.client_operation_duration
                .with_label_values(&[operation, provider, model, call_error])
                .observe(seconds(stage.duration_ns()));
        }
        self.server_request_duration
            .with_label_values(&[operation, provider, model, error_type])
            .observe(seconds(request.duration_ns()));
        if let Some(first) = request.first_chunk_ns {
            self.server_time_to_first_token
                .with_label_values(gen_ai)
                .observe(seconds(first.saturating_sub(request.begin_ns)));
            let after_first = request.output_tokens.saturating_sub(1);
            if let (Some(last), true) = (
                request.last_chunk_ns,
                after_first > 0 && error_type.is_empty(),
            ) {
                let per_token = last.saturating_sub(first) / after_first;
                self.server_time_per_output_token
                    .with_label_values(gen_ai)
                    .observe(seconds(per_token));
            }
        }
    }
}

fn is_upstream_call(id: &StageId) -> bool {
    matches!(
        id,
        StageId::Known(Stage::UpstreamChat | Stage::UpstreamChatStream)
    )
}
