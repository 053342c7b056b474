//! What the markers tell: stages, requests, errors, fallbacks, tools, the upstream lag,
//! and the OpenTelemetry GenAI metrics under their Prometheus names (the broker is a
//! GenAI server to its clients and a GenAI client of its providers).

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

    /// A stage timed without its request (symbol mode): model and provider unknown.
    pub(super) fn record_stage(
        &self,
        replica: &str,
        stage: &str,
        duration_ns: u64,
        labels: &mut Labels,
    ) {
        let stage = labels.admit(Label::Stage, stage);
        self.stage_duration
            .with_label_values(&[replica, stage, "", ""])
            .observe(seconds(duration_ns));
    }

    pub(super) fn record(&self, request: &Request, replica: &str, labels: &mut Labels) {
        let model = labels.admit(Label::Model, &request.model);
        let provider = labels.admit(Label::Provider, request.provider.as_deref().unwrap_or(""));
        let status = request.status.to_string();
        let error_type = match &request.error_type {
            Some(error_type) => labels.admit(Label::ErrorType, error_type),
            None if request.failed() => &status,
            None => "",
        };
        for stage in &request.stages {
            let name = labels.admit(Label::Stage, stage.id.name());
            self.stage_duration
                .with_label_values(&[replica, name, model, provider])
                .observe(seconds(stage.duration_ns()));
            if let StageId::Tool(tool) = &stage.id {
                let tool = labels.admit(Label::Tool, tool);
                self.tool_duration
                    .with_label_values(&[replica, tool])
                    .observe(seconds(stage.duration_ns()));
            }
        }
        let by_status = [replica, model, provider, status.as_str()];
        self.request_duration
            .with_label_values(&by_status)
            .observe(seconds(request.duration_ns()));
        self.requests.with_label_values(&by_status).inc();
        if request.failed() {
            self.errors
                .with_label_values(&[replica, error_type, model])
                .inc();
        }
        for fallback in &request.fallbacks {
            let from = labels.admit(Label::Model, &fallback.from);
            let to = labels.admit(Label::Model, &fallback.to);
            self.fallbacks.with_label_values(&[replica, from, to]).inc();
        }
        for call in &request.upstream_calls {
            if let Some(lag) = call.lag_ns() {
                self.upstream_lag
                    .with_label_values(&[replica, provider])
                    .observe(seconds(lag));
            }
        }
        self.record_gen_ai(request, [replica, provider, model], error_type, labels);
    }

    /// The GenAI metrics. Client-side ones (the broker calling its providers) name the
    /// model each call asked for (after a fallback, the new one); server-side ones the
    /// model the client asked for.
    fn record_gen_ai(
        &self,
        request: &Request,
        [replica, provider, model]: [&str; 3],
        error_type: &str,
        labels: &mut Labels,
    ) {
        for usage in &request.token_usage {
            let model = labels.admit(Label::Model, request.model_at(usage.ts_ns));
            for (kind, tokens) in [("input", usage.input), ("output", usage.output)] {
                self.token_usage
                    .with_label_values(&[replica, OPERATION, provider, model, kind])
                    .observe(tokens as f64);
            }
        }
        let last_call = request
            .stages
            .iter()
            .rfind(|s| s.is_upstream_call())
            .map(|s| s.begin_ns);
        for stage in request.stages.iter().filter(|s| s.is_upstream_call()) {
            let model = labels.admit(Label::Model, request.model_at(stage.begin_ns));
            // When nothing tells how the call went, the request's failure is its last
            // call's.
            let call_error = request.call_error(stage);
            let call_error = match &call_error {
                Some(error) => error.as_str(),
                None if last_call == Some(stage.begin_ns) => error_type,
                None => "",
            };
            self.client_operation_duration
                .with_label_values(&[replica, OPERATION, provider, model, call_error])
                .observe(seconds(stage.duration_ns()));
        }
        let gen_ai = [replica, OPERATION, provider, model];
        self.server_request_duration
            .with_label_values(&[replica, OPERATION, provider, model, error_type])
            .observe(seconds(request.duration_ns()));
        // Both for successful streamed answers only, as the conventions define them.
        let (Some(first), false) = (request.first_chunk_ns, request.failed()) else {
            return;
        };
        self.server_time_to_first_token
            .with_label_values(&gen_ai)
            .observe(seconds(first.saturating_sub(request.begin_ns)));
        // The stream forwarded is the last answer's: its output tokens.
        let tokens_after_first = request
            .token_usage
            .last()
            .map_or(0, |u| u.output.saturating_sub(1));
        if let (Some(last), true) = (request.last_chunk_ns, tokens_after_first > 0) {
            self.server_time_per_output_token
                .with_label_values(&gen_ai)
                .observe(seconds(last.saturating_sub(first) / tokens_after_first));
        }
    }
}
