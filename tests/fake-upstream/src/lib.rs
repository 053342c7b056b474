//! An OpenAI-compatible fake LLM provider with scripted latency, failures and tool calls.
//!
//! Every answer is a deterministic function of the request and the model's
//! [`ModelBehaviour`], so tests can predict token counts and timings. `GET /fake/stats`
//! exposes what the fake served, and `GET /fake/exchanges` what crossed its sockets per
//! request ([`Exchange`]), the ground truth for brokerprobe's socket measurements.

mod wire;

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use bytes::Bytes;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceExt as _;

use wire::{ConnLedger, CountingStream, WireLedger};
pub use wire::{Exchange, monotonic_ns};

/// How the fake answers for one model.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelBehaviour {
    /// Delay from the first request byte read to the response head. Non-streaming answers
    /// also wait out the whole generation (`chunks × chunk_interval_ms`) before the head,
    /// like a real provider.
    pub ttfb_ms: u64,
    /// Content chunks of a streamed answer (and completion tokens of any answer).
    pub chunks: u32,
    /// Pause between two streamed chunks.
    pub chunk_interval_ms: u64,
    /// Answer this status with an OpenAI-style error instead of a completion.
    pub fail_status: Option<u16>,
    /// Fail only the Nth, 2Nth, ... request for this model (status `fail_status`, or 500).
    pub fail_every: Option<u32>,
}

impl Default for ModelBehaviour {
    fn default() -> Self {
        Self {
            ttfb_ms: 10,
            chunks: 4,
            chunk_interval_ms: 5,
            fail_status: None,
            fail_every: None,
        }
    }
}

impl ModelBehaviour {
    /// The status to fail the `nth` (1-based) request for this model with, if any.
    fn failure(&self, nth: u64) -> Option<u16> {
        match self.fail_every {
            None => self.fail_status,
            Some(every) => nth
                .is_multiple_of(u64::from(every))
                .then(|| self.fail_status.unwrap_or(500)),
        }
    }

    fn generation_time(&self) -> Duration {
        Duration::from_millis(self.chunk_interval_ms * u64::from(self.chunks))
    }
}

/// Per-model behaviour; models not listed get `default`. Also the `--config` file format.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct FakeConfig {
    pub default: ModelBehaviour,
    pub models: HashMap<String, ModelBehaviour>,
}

impl FakeConfig {
    /// The demo broker's models, each with a recognisable latency profile; `flaky`
    /// always fails (the demo falls back from it).
    pub fn demo() -> Self {
        let streams = |ttfb_ms, chunks, chunk_interval_ms| ModelBehaviour {
            ttfb_ms,
            chunks,
            chunk_interval_ms,
            ..ModelBehaviour::default()
        };
        let failing = ModelBehaviour {
            ttfb_ms: 2,
            fail_status: Some(500),
            ..ModelBehaviour::default()
        };
        FakeConfig {
            default: ModelBehaviour::default(),
            models: HashMap::from([
                ("gpt-fast".to_owned(), streams(5, 5, 2)),
                ("claude-slow".to_owned(), streams(30, 8, 5)),
                ("flaky".to_owned(), failing),
            ]),
        }
    }

    fn behaviour(&self, model: &str) -> &ModelBehaviour {
        self.models.get(model).unwrap_or(&self.default)
    }
}

/// Binds `addr` and prints `listening on ADDR` (the line tests and xtask wait for) once
/// bound, so port 0 can be used and the caller learns the real port.
pub async fn bind_announced(addr: std::net::SocketAddr) -> anyhow::Result<TcpListener> {
    use std::io::Write as _;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("binding {addr}: {e}"))?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "listening on {}", listener.local_addr()?)?;
    stdout.flush()?;
    Ok(listener)
}

/// Serves the fake API on `listener` until the task is dropped.
///
/// Serves each connection like `axum::serve` does (hyper's HTTP/1.1 with keep-alive),
/// but through a [`CountingStream`], so `/fake/exchanges` can tell what crossed the
/// socket.
pub async fn serve(listener: TcpListener, config: FakeConfig) -> anyhow::Result<()> {
    let state = Arc::new(Fake {
        config,
        stats: Stats::default(),
        wire: Arc::default(),
    });
    let app = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(list_models))
        .route("/fake/stats", get(stats))
        .route("/fake/exchanges", get(exchanges))
        .with_state(state.clone());
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                wait_after_accept_error(err).await;
                continue;
            }
        };
        // Without TCP_NODELAY, small SSE chunks wait on delayed ACKs (~40 ms on Linux).
        _ = tcp.set_nodelay(true);
        serve_connection(tcp, peer, &state.wire, app.clone());
    }
}

/// Like `axum::serve`: errors of one connection are skipped, others (e.g. out of file
/// descriptors) paused on, so the fake outlives them.
async fn wait_after_accept_error(err: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if !matches!(
        err.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    ) {
        eprintln!("fake-upstream: accept error: {err}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn serve_connection(tcp: TcpStream, peer: SocketAddr, wire: &Arc<WireLedger>, app: Router) {
    let conn = Arc::new(ConnLedger::open(wire, peer));
    let service = app.map_request({
        let conn = conn.clone();
        move |mut request: Request<Incoming>| {
            let request_id = request
                .headers()
                .get("x-request-id")
                .map(|id| String::from_utf8_lossy(id.as_bytes()).into_owned());
            conn.dispatched(request.uri().path(), request_id);
            request.extensions_mut().insert(conn.clone());
            request
        }
    });
    let io = TokioIo::new(CountingStream::new(tcp, conn));
    tokio::spawn(async move {
        let builder = auto::Builder::new(TokioExecutor::new());
        // A connection's error (e.g. the peer going away) ends only that connection.
        _ = builder
            .serve_connection_with_upgrades(io, TowerToHyperService::new(service))
            .await;
    });
}

struct Fake {
    config: FakeConfig,
    stats: Stats,
    wire: Arc<WireLedger>,
}

#[derive(Default)]
struct Stats {
    requests: AtomicU64,
    response_bytes: AtomicU64,
    by_model: Mutex<BTreeMap<String, u64>>,
}

impl Stats {
    /// Counts a chat request; returns its 1-based number for `model` and overall.
    fn count_request(&self, model: &str) -> (u64, u64) {
        let overall = self.requests.fetch_add(1, Ordering::Relaxed) + 1;
        let mut by_model = self.by_model.lock().unwrap_or_else(PoisonError::into_inner);
        let for_model = by_model.entry(model.to_owned()).or_default();
        *for_model += 1;
        (*for_model, overall)
    }

    fn count_body(&self, bytes: usize) {
        self.response_bytes
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }
}

#[derive(Deserialize)]
struct ChatRequest {
    model: String,
    messages: Vec<Message>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    tools: Vec<Tool>,
}

#[derive(Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: Value,
}

#[derive(Deserialize)]
struct Tool {
    function: ToolFunction,
}

#[derive(Deserialize)]
struct ToolFunction {
    name: String,
}

/// The tool calls a request gets, by the fake's rule: one per offered tool (at most
/// two), unless the conversation already ends with a tool result.
const MAX_TOOL_CALLS: usize = 2;

/// Tokens billed per tool call in an answer (a fixed, predictable number).
const TOKENS_PER_TOOL_CALL: u64 = 5;

const WORDS: [&str; 8] = [
    "The ",
    "broker ",
    "answers ",
    "quickly ",
    "and ",
    "the ",
    "probe ",
    "watches. ",
];

enum Answer {
    Text(Vec<&'static str>),
    ToolCalls(Vec<ToolCall>),
}

struct ToolCall {
    id: String,
    name: String,
}

impl Answer {
    fn for_request(request: &ChatRequest, behaviour: &ModelBehaviour, serial: u64) -> Self {
        let after_tool_result = request.messages.last().is_some_and(|m| m.role == "tool");
        if request.tools.is_empty() || after_tool_result {
            let words = (0..behaviour.chunks as usize)
                .map(|i| WORDS[i % WORDS.len()])
                .collect();
            return Answer::Text(words);
        }
        let calls = request.tools.iter().take(MAX_TOOL_CALLS).enumerate();
        Answer::ToolCalls(
            calls
                .map(|(i, tool)| ToolCall {
                    id: format!("call_{serial}_{i}"),
                    name: tool.function.name.clone(),
                })
                .collect(),
        )
    }

    fn completion_tokens(&self) -> u64 {
        match self {
            Answer::Text(words) => words.len() as u64,
            Answer::ToolCalls(calls) => calls.len() as u64 * TOKENS_PER_TOOL_CALL,
        }
    }

    fn finish_reason(&self) -> &'static str {
        match self {
            Answer::Text(_) => "stop",
            Answer::ToolCalls(_) => "tool_calls",
        }
    }
}

/// Roughly "4 characters per token" over the message contents, at least 1.
fn prompt_tokens(messages: &[Message]) -> u64 {
    let chars: usize = messages.iter().map(|m| content_chars(&m.content)).sum();
    (chars as u64 / 4).max(1)
}

/// Characters of a content that is a string or an array of `{"text": ...}` parts.
fn content_chars(content: &Value) -> usize {
    match content {
        Value::String(text) => text.chars().count(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p["text"].as_str())
            .map(|t| t.chars().count())
            .sum(),
        _ => 0,
    }
}

async fn chat_completions(
    State(fake): State<Arc<Fake>>,
    Extension(conn): Extension<Arc<ConnLedger>>,
    Json(request): Json<ChatRequest>,
) -> Response {
    // Stamped once the body is read, so `received_ns` is after the last request byte came;
    // the delays count from the first request byte read.
    let since_first_read = conn.handler_started();
    let received = tokio::time::Instant::now() - since_first_read;
    let (nth_for_model, serial) = fake.stats.count_request(&request.model);
    let behaviour = fake.config.behaviour(&request.model);
    sleep_precisely(received + Duration::from_millis(behaviour.ttfb_ms)).await;
    if let Some(status) = behaviour.failure(nth_for_model) {
        return error_response(&fake.stats, status);
    }
    let answer = Answer::for_request(&request, behaviour, serial);
    let usage = usage(prompt_tokens(&request.messages), answer.completion_tokens());
    let meta = CompletionMeta {
        id: format!("chatcmpl-{serial}"),
        created: unix_seconds(),
        model: request.model,
    };
    if request.stream {
        let events = sse_events(&meta, &answer, usage, behaviour);
        return stream_response(fake.clone(), events);
    }
    tokio::time::sleep(behaviour.generation_time()).await;
    let body = completion_body(&meta, &answer, usage);
    fake.stats.count_body(body.len());
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// Sleeps until `deadline` to within tens of microseconds: tokio's timer rounds up to
/// whole milliseconds, which would make the scripted first-byte delay up to 1 ms longer
/// than configured, so the last milliseconds are slept on a blocking thread (nanosleep).
async fn sleep_precisely(deadline: tokio::time::Instant) {
    if let Some(coarse) = deadline.checked_sub(Duration::from_millis(2)) {
        tokio::time::sleep_until(coarse).await;
    }
    let rest = deadline.saturating_duration_since(tokio::time::Instant::now());
    if !rest.is_zero() {
        // A failed join only means the runtime is shutting down.
        let _ = tokio::task::spawn_blocking(move || std::thread::sleep(rest)).await;
    }
}

fn error_response(stats: &Stats, status: u16) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let error_type = match status.as_u16() {
        429 => "rate_limit_error",
        400..=499 => "invalid_request_error",
        _ => "server_error",
    };
    let body = json!({"error": {
        "message": format!("fake upstream: scripted failure ({status})"),
        "type": error_type,
        "param": null,
        "code": null,
    }})
    .to_string();
    stats.count_body(body.len());
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

struct CompletionMeta {
    id: String,
    created: u64,
    model: String,
}

fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn usage(prompt_tokens: u64, completion_tokens: u64) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    })
}

fn completion_body(meta: &CompletionMeta, answer: &Answer, usage: Value) -> String {
    let message = match answer {
        Answer::Text(words) => json!({"role": "assistant", "content": words.concat()}),
        Answer::ToolCalls(calls) => {
            let calls: Vec<Value> = calls
                .iter()
                .map(|c| json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": "{}"}}))
                .collect();
            json!({"role": "assistant", "content": null, "tool_calls": calls})
        }
    };
    json!({
        "id": meta.id,
        "object": "chat.completion",
        "created": meta.created,
        "model": meta.model,
        "choices": [{"index": 0, "message": message, "finish_reason": answer.finish_reason()}],
        "usage": usage,
    })
    .to_string()
}

/// One SSE event and how long to wait before sending it.
struct PacedEvent {
    delay: Duration,
    bytes: Bytes,
}

fn sse_events(
    meta: &CompletionMeta,
    answer: &Answer,
    usage: Value,
    behaviour: &ModelBehaviour,
) -> Vec<PacedEvent> {
    let chunk = |delta: Value, finish_reason: Option<&str>| {
        json!({
            "id": meta.id,
            "object": "chat.completion.chunk",
            "created": meta.created,
            "model": meta.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        })
    };
    let mut deltas = Vec::new();
    match answer {
        Answer::Text(words) => deltas.extend(words.iter().map(|word| json!({"content": word}))),
        Answer::ToolCalls(calls) => {
            for (index, call) in calls.iter().enumerate() {
                let name = json!({"index": index, "id": call.id, "type": "function",
                    "function": {"name": call.name, "arguments": ""}});
                deltas.push(json!({"tool_calls": [name]}));
                deltas.push(
                    json!({"tool_calls": [{"index": index, "function": {"arguments": "{}"}}]}),
                );
            }
        }
    }
    if let Some(first) = deltas.first_mut() {
        first["role"] = json!("assistant");
    }
    let interval = Duration::from_millis(behaviour.chunk_interval_ms);
    let mut events: Vec<PacedEvent> = deltas
        .into_iter()
        .enumerate()
        .map(|(i, delta)| PacedEvent {
            delay: if i == 0 { Duration::ZERO } else { interval },
            bytes: sse_data(&chunk(delta, None).to_string()),
        })
        .collect();
    let mut last = chunk(json!({}), Some(answer.finish_reason()));
    last["usage"] = usage;
    events.push(PacedEvent {
        delay: Duration::ZERO,
        bytes: sse_data(&last.to_string()),
    });
    events.push(PacedEvent {
        delay: Duration::ZERO,
        bytes: sse_data("[DONE]"),
    });
    events
}

fn sse_data(payload: &str) -> Bytes {
    Bytes::from(format!("data: {payload}\n\n"))
}

fn stream_response(fake: Arc<Fake>, events: Vec<PacedEvent>) -> Response {
    let body = futures_util::stream::unfold(
        (fake, events.into_iter()),
        |(fake, mut events)| async move {
            let event = events.next()?;
            if !event.delay.is_zero() {
                tokio::time::sleep(event.delay).await;
            }
            // Counted when handed to the server: the bytes of a stream the client abandons
            // midway are not counted.
            fake.stats.count_body(event.bytes.len());
            Some((Ok::<_, Infallible>(event.bytes), (fake, events)))
        },
    );
    let headers = [
        (header::CONTENT_TYPE, "text/event-stream"),
        (header::CACHE_CONTROL, "no-cache"),
    ];
    (headers, Body::from_stream(body)).into_response()
}

async fn list_models(State(fake): State<Arc<Fake>>) -> Json<Value> {
    let mut models: Vec<&String> = fake.config.models.keys().collect();
    models.sort();
    let data: Vec<Value> = models
        .iter()
        .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "fake-upstream"}))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

/// What the fake served. The `wire_*` totals count all connections' socket IO,
/// including this stats request itself (its request bytes, not yet its response).
async fn stats(State(fake): State<Arc<Fake>>) -> Json<Value> {
    let stats = &fake.stats;
    let by_model = stats
        .by_model
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let wire = fake.wire.totals();
    Json(json!({
        "requests": stats.requests.load(Ordering::Relaxed),
        "by_model": by_model,
        "response_bytes": stats.response_bytes.load(Ordering::Relaxed),
        "wire_bytes_read": wire.bytes_read,
        "wire_bytes_written": wire.bytes_written,
        "wire_writes": wire.writes,
        "exchanges_dropped": fake.wire.dropped(),
    }))
}

/// Every exchange so far: finished ones in the order they finished, then each open
/// connection's current one. That includes the exchange answering this very request,
/// with its request bytes but none of its response: query on a connection of its own
/// and skip `path == "/fake/exchanges"`. Writes are booked just after their syscall
/// returns: asked right after reading a response, the fake may not have booked its last
/// write yet.
async fn exchanges(State(fake): State<Arc<Fake>>) -> Json<Vec<Exchange>> {
    Json(fake.wire.exchanges())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fail_every_fails_only_every_nth_request() {
        let behaviour = ModelBehaviour {
            fail_every: Some(3),
            fail_status: Some(429),
            ..Default::default()
        };
        let failures: Vec<Option<u16>> = (1..=6).map(|nth| behaviour.failure(nth)).collect();
        assert_eq!(failures, [None, None, Some(429), None, None, Some(429)]);
    }

    #[test]
    fn prompt_tokens_count_text_of_strings_and_parts() {
        let messages = vec![
            Message {
                role: "user".into(),
                content: json!("12345678"),
            },
            Message {
                role: "user".into(),
                content: json!([{"type": "text", "text": "abcd"}]),
            },
            Message {
                role: "assistant".into(),
                content: Value::Null,
            },
        ];
        assert_eq!(prompt_tokens(&messages), 3);
        assert_eq!(prompt_tokens(&[]), 1);
    }
}
