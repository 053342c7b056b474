//! A finished request → its spans (docs/spans.md): a SERVER root, a child per stage nested
//! by time, upstream calls as CLIENT `chat {model}` spans with the GenAI and socket
//! attributes, tool executions as `execute_tool {name}`.

use std::{borrow::Cow, net::SocketAddr};

use foldhash::HashMap;

use opentelemetry::{
    InstrumentationScope, KeyValue, Value,
    trace::{SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState},
};
use opentelemetry_sdk::trace::{IdGenerator, SpanData, SpanEvents, SpanLinks};
use probe_common::marker::Stage;

use crate::{
    assembly::{Request, StageSpan, UpstreamCall},
    clock::Clock,
    connections::Exchange,
    decode::StageId,
    export::labels::{LabelCap, OTHER},
};

/// The root span's name: the route OpenAI-compatible brokers serve.
pub const ROOT_NAME: &str = "POST /v1/chat/completions";

/// Where a request's trace hangs: a new trace, or the caller's (W3C traceparent).
#[derive(Clone, Debug, PartialEq)]
pub struct TraceStart {
    pub trace_id: TraceId,
    /// The caller's span (and its tracestate), when the request carried a valid
    /// traceparent.
    pub remote_parent: Option<SpanContext>,
}

/// What the sockets told about one upstream call (its exchange, once it ended).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CallFacts {
    /// `--upstream`'s name for the peer, else its address.
    pub upstream: String,
    pub remote: Option<SocketAddr>,
    pub connect_ns: Option<u64>,
    pub read_delay_ns: Option<u64>,
    pub request_bytes: u64,
    pub response_bytes: u64,
}

impl CallFacts {
    pub fn of(exchange: &Exchange) -> Self {
        Self {
            upstream: exchange.peer_name.clone(),
            remote: exchange.remote,
            connect_ns: exchange.connect_ns,
            read_delay_ns: exchange.read_delay_ns(),
            request_bytes: exchange.request_bytes,
            response_bytes: exchange.response_bytes,
        }
    }
}

/// Builds the spans of one request.
pub struct SpanBuilder<'a> {
    pub clock: &'a Clock,
    pub ids: &'a dyn IdGenerator,
    pub scope: &'a InstrumentationScope,
}

impl SpanBuilder<'_> {
    /// The request's spans, root first. `facts` are by exchange id; `models` bounds the
    /// model names that span names take (clients choose them).
    pub fn spans(
        &self,
        request: &Request,
        start: &TraceStart,
        facts: &HashMap<u64, CallFacts>,
        models: &mut LabelCap,
    ) -> Vec<SpanData> {
        let root_id = self.ids.new_span_id();
        let trace_state = start
            .remote_parent
            .as_ref()
            .map_or_else(TraceState::default, |caller| caller.trace_state().clone());
        let span = |span_id,
                    parent,
                    kind,
                    name: Cow<'static, str>,
                    (begin_ns, end_ns),
                    attributes,
                    status| {
            SpanData {
                span_context: SpanContext::new(
                    start.trace_id,
                    span_id,
                    TraceFlags::SAMPLED,
                    false,
                    trace_state.clone(),
                ),
                parent_span_id: parent,
                parent_span_is_remote: false,
                span_kind: kind,
                name,
                start_time: self.clock.wall(begin_ns),
                end_time: self.clock.wall(end_ns),
                attributes,
                dropped_attributes_count: 0,
                events: SpanEvents::default(),
                links: SpanLinks::default(),
                status,
                instrumentation_scope: self.scope.clone(),
            }
        };
        let mut root_attributes = vec![
            KeyValue::new("http.request.method", "POST"),
            KeyValue::new("http.route", "/v1/chat/completions"),
            KeyValue::new("http.response.status_code", i64::from(request.status)),
            KeyValue::new("gen_ai.operation.name", "chat"),
            KeyValue::new("gen_ai.request.model", request.model.clone()),
            KeyValue::new("brokerprobe.request_id", id_value(request.request_id)),
            KeyValue::new("process.pid", i64::from(request.pid)),
            KeyValue::new(
                "gen_ai.usage.input_tokens",
                count_value(request.input_tokens),
            ),
            KeyValue::new(
                "gen_ai.usage.output_tokens",
                count_value(request.output_tokens),
            ),
        ];
        if let Some(provider) = &request.provider {
            root_attributes.push(KeyValue::new("gen_ai.provider.name", provider.clone()));
        }
        let error_type = request
            .error_type
            .clone()
            .unwrap_or_else(|| request.status.to_string());
        if request.failed() {
            root_attributes.push(KeyValue::new("error.type", error_type.clone()));
        }
        // HTTP conventions: a server span is an error for 5xx, not for a client's 4xx.
        let root_status = if request.server_failed() {
            Status::error(error_type)
        } else {
            Status::Unset
        };
        let mut root = span(
            root_id,
            start
                .remote_parent
                .as_ref()
                .map_or(SpanId::INVALID, SpanContext::span_id),
            SpanKind::Server,
            ROOT_NAME.into(),
            (request.begin_ns, request.end_ns),
            root_attributes,
            root_status,
        );
        root.parent_span_is_remote = start.remote_parent.is_some();
        let mut spans = vec![root];

        // Stages nest by time: each hangs under the innermost stage that contains it.
        let mut order: Vec<&StageSpan> = request.stages.iter().collect();
        order.sort_by(|a, b| a.begin_ns.cmp(&b.begin_ns).then(b.end_ns.cmp(&a.end_ns)));
        let mut open: Vec<(u64, SpanId)> = Vec::new();
        for stage in order {
            while open.last().is_some_and(|(end, _)| *end < stage.end_ns) {
                open.pop();
            }
            let parent = open.last().map_or(root_id, |(_, id)| *id);
            let span_id = self.ids.new_span_id();
            let (name, kind, attributes, status) = describe(request, stage, facts, models);
            spans.push(span(
                span_id,
                parent,
                kind,
                name,
                (stage.begin_ns, stage.end_ns),
                attributes,
                status,
            ));
            open.push((stage.end_ns, span_id));
        }
        spans
    }
}

/// A stage's span name, kind, attributes and status.
fn describe(
    request: &Request,
    stage: &StageSpan,
    facts: &HashMap<u64, CallFacts>,
    models: &mut LabelCap,
) -> (Cow<'static, str>, SpanKind, Vec<KeyValue>, Status) {
    // Known stages' names are static: no copy per span.
    let stage_name: Cow<'static, str> = match &stage.id {
        StageId::Known(known) => known.name().into(),
        StageId::Tool(_) => Stage::ToolExecute.name().into(),
        StageId::Custom(name) => name.clone().into(),
    };
    let mut attributes = vec![KeyValue::new("brokerprobe.stage", stage_name.clone())];
    match &stage.id {
        StageId::Known(Stage::UpstreamChat | Stage::UpstreamChatStream) => {
            let model = request.model_at(stage.begin_ns);
            attributes.extend(upstream_attributes(request, stage, model, facts));
            // A client span is an error whenever its call failed.
            let status = match request.call_error(stage) {
                Some(error) => {
                    attributes.push(KeyValue::new("error.type", error.clone()));
                    Status::error(error)
                }
                None => Status::Unset,
            };
            let name_model = models.admit(model).unwrap_or(OTHER);
            (
                format!("chat {name_model}").into(),
                SpanKind::Client,
                attributes,
                status,
            )
        }
        StageId::Tool(tool) => {
            attributes.push(KeyValue::new("gen_ai.operation.name", "execute_tool"));
            attributes.push(KeyValue::new("gen_ai.tool.name", tool.clone()));
            let name = format!("execute_tool {tool}");
            (name.into(), SpanKind::Internal, attributes, Status::Unset)
        }
        _ => (stage_name, SpanKind::Internal, attributes, Status::Unset),
    }
}

/// An id as an attribute: an integer where it fits, else its decimal string.
fn id_value(id: u64) -> Value {
    i64::try_from(id).map_or_else(|_| Value::from(id.to_string()), Value::I64)
}

fn count_value(count: u64) -> Value {
    Value::I64(i64::try_from(count).unwrap_or(i64::MAX))
}

fn seconds(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// GenAI and socket attributes of an upstream call's span.
fn upstream_attributes(
    request: &Request,
    stage: &StageSpan,
    model: &str,
    facts: &HashMap<u64, CallFacts>,
) -> Vec<KeyValue> {
    let mut attributes = vec![
        KeyValue::new("gen_ai.operation.name", "chat"),
        KeyValue::new("gen_ai.request.model", model.to_owned()),
    ];
    if let Some(provider) = &request.provider {
        attributes.push(KeyValue::new("gen_ai.provider.name", provider.clone()));
    }
    // The token usage the broker reported during this call (it comes with the answer).
    let (input, output) = request
        .token_usage
        .iter()
        .filter(|u| (stage.begin_ns..=stage.end_ns).contains(&u.ts_ns))
        .fold((0, 0), |(i, o), u| (i + u.input, o + u.output));
    if input + output > 0 {
        attributes.push(KeyValue::new(
            "gen_ai.usage.input_tokens",
            count_value(input),
        ));
        attributes.push(KeyValue::new(
            "gen_ai.usage.output_tokens",
            count_value(output),
        ));
    }
    // Streams only: a plain answer's first byte is not its first chunk.
    let streamed = stage.id == StageId::Known(Stage::UpstreamChatStream);
    let first_byte = request
        .first_byte_ns
        .iter()
        .find(|ts| (stage.begin_ns..=stage.end_ns).contains(*ts));
    if let (true, Some(first_byte)) = (streamed, first_byte) {
        attributes.push(KeyValue::new(
            "gen_ai.response.time_to_first_chunk",
            seconds(first_byte - stage.begin_ns),
        ));
    }
    let Some(call) = request
        .upstream_calls
        .iter()
        .find(|c| c.stage_begin_ns == stage.begin_ns)
    else {
        return attributes;
    };
    attributes.extend(call_attributes(call, facts.get(&call.exchange_id)));
    attributes
}

/// What the sockets measured of the call.
fn call_attributes(call: &UpstreamCall, facts: Option<&CallFacts>) -> Vec<KeyValue> {
    let mut attributes = vec![KeyValue::new(
        "brokerprobe.upstream.exchange_id",
        id_value(call.exchange_id),
    )];
    if let Some(how) = call.attribution {
        attributes.push(KeyValue::new(
            "brokerprobe.upstream.attribution",
            how.name(),
        ));
    }
    if let Some(ttfb) = call.network_ttfb_ns() {
        attributes.push(KeyValue::new(
            "brokerprobe.upstream.network_ttfb",
            seconds(ttfb),
        ));
    }
    if let Some(lag) = call.lag_ns() {
        attributes.push(KeyValue::new("brokerprobe.upstream.lag", seconds(lag)));
    }
    if let Some(status) = call.status {
        attributes.push(KeyValue::new(
            "http.response.status_code",
            i64::from(status),
        ));
    }
    let Some(facts) = facts else {
        return attributes;
    };
    attributes.push(KeyValue::new(
        "brokerprobe.upstream.name",
        facts.upstream.clone(),
    ));
    if let Some(remote) = facts.remote {
        attributes.push(KeyValue::new("server.address", remote.ip().to_string()));
        attributes.push(KeyValue::new("server.port", i64::from(remote.port())));
    }
    if let Some(connect) = facts.connect_ns {
        attributes.push(KeyValue::new(
            "brokerprobe.upstream.connect",
            seconds(connect),
        ));
    }
    if let Some(delay) = facts.read_delay_ns {
        attributes.push(KeyValue::new(
            "brokerprobe.upstream.read_delay",
            seconds(delay),
        ));
    }
    attributes.push(KeyValue::new(
        "brokerprobe.upstream.request_bytes",
        count_value(facts.request_bytes),
    ));
    attributes.push(KeyValue::new(
        "brokerprobe.upstream.response_bytes",
        count_value(facts.response_bytes),
    ));
    attributes
}

#[cfg(test)]
mod tests {
    use opentelemetry_sdk::trace::RandomIdGenerator;

    use super::*;
    use crate::assembly::{Fallback, TokenUsage};

    fn stage(id: StageId, begin_ns: u64, end_ns: u64) -> StageSpan {
        StageSpan {
            id,
            begin_ns,
            end_ns,
        }
    }

    fn attribute<'a>(span: &'a SpanData, key: &str) -> Option<&'a Value> {
        span.attributes
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| &kv.value)
    }

    /// A tool loop: a first call that falls back, a tool, a second call.
    #[test]
    fn stages_nest_by_time_and_upstream_calls_name_their_model() {
        let upstream = StageId::Known(Stage::UpstreamChat);
        let request = Request {
            request_id: 7,
            model: "flaky".into(),
            provider: Some("openai".into()),
            status: 200,
            begin_ns: 0,
            end_ns: 1_000,
            stages: vec![
                stage(StageId::Known(Stage::ToolLoop), 10, 900),
                stage(upstream.clone(), 20, 100),
                stage(StageId::Tool("calc".into()), 200, 300),
                stage(upstream, 400, 800),
            ],
            fallbacks: vec![Fallback {
                from: "flaky".into(),
                to: "gpt-fast".into(),
                ts_ns: 150,
            }],
            token_usage: vec![TokenUsage {
                input: 3,
                output: 4,
                ts_ns: 790,
            }],
            upstream_calls: vec![UpstreamCall {
                exchange_id: 9,
                stage_begin_ns: 400,
                sent_ns: 410,
                first_response_ns: Some(500),
                status: Some(200),
                ..UpstreamCall::default()
            }],
            ..Request::default()
        };
        let facts: HashMap<u64, CallFacts> = [(
            9,
            CallFacts {
                upstream: "openai".into(),
                remote: Some("10.0.0.5:443".parse().unwrap()),
                request_bytes: 100,
                response_bytes: 900,
                ..CallFacts::default()
            },
        )]
        .into_iter()
        .collect();
        let start = TraceStart {
            trace_id: TraceId::from_bytes([1; 16]),
            remote_parent: None,
        };
        let builder = SpanBuilder {
            clock: &Clock::now(),
            ids: &RandomIdGenerator::default(),
            scope: &InstrumentationScope::builder("test").build(),
        };
        let spans = builder.spans(&request, &start, &facts, &mut LabelCap::new(10));
        let names: Vec<&str> = spans.iter().map(|s| s.name.as_ref()).collect();
        assert_eq!(
            names,
            [
                ROOT_NAME,
                "tool_loop",
                "chat flaky",
                "execute_tool calc",
                "chat gpt-fast"
            ]
        );
        let (root, tool_loop) = (&spans[0], &spans[1]);
        assert_eq!(root.parent_span_id, SpanId::INVALID);
        assert_eq!(tool_loop.parent_span_id, root.span_context.span_id());
        for child in &spans[2..] {
            assert_eq!(child.parent_span_id, tool_loop.span_context.span_id());
        }
        let second = &spans[4];
        assert_eq!(second.span_kind, SpanKind::Client);
        assert_eq!(
            second.end_time.duration_since(second.start_time).unwrap(),
            std::time::Duration::from_nanos(400),
            "durations are the stages' exactly"
        );
        assert_eq!(
            attribute(second, "gen_ai.usage.output_tokens"),
            Some(&Value::I64(4))
        );
        assert_eq!(
            attribute(second, "server.address"),
            Some(&Value::from("10.0.0.5"))
        );
        assert_eq!(
            attribute(second, "brokerprobe.upstream.network_ttfb"),
            Some(&Value::F64(90e-9))
        );
        assert_eq!(
            attribute(&spans[2], "server.address"),
            None,
            "no exchange, no socket facts"
        );
        assert_eq!(
            attribute(&spans[3], "gen_ai.tool.name"),
            Some(&Value::from("calc"))
        );
    }
}
