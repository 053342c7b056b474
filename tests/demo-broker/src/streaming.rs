//! Streaming answers: a task per request reads the upstream SSE stream and hands each
//! event to the client's body stream as it arrives; with tools it runs the streaming tool
//! loop, forwarding only the final answer's events.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use probe_markers::Stage;
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::App;
use crate::api::{ApiError, ChatRequest, ToolCall, Usage};
use crate::chat::{self, MAX_TOOL_TURNS};
use crate::keypool::KeyLease;
use crate::recorder::{Recorder, RequestScope, StageGuard};
use crate::routing::Route;
use crate::tools;
use crate::upstream::UpstreamFailure;

/// Events buffered between the request task and the client connection.
const EVENT_BUFFER: usize = 16;

/// How the response starts: as an event stream, or as a plain (error) reply.
enum Head {
    EventStream,
    Reply(Response),
}

enum StreamError {
    Api(ApiError),
    ClientGone,
}

impl From<ApiError> for StreamError {
    fn from(error: ApiError) -> Self {
        StreamError::Api(error)
    }
}

/// Answers once the request task knows how the response starts; the task keeps feeding
/// the body and is aborted if the client drops it.
pub async fn respond(app: Arc<App>, scope: RequestScope, request: ChatRequest) -> Response {
    let (head_sender, head) = oneshot::channel();
    let (events, event_receiver) = mpsc::channel(EVENT_BUFFER);
    let client = ClientStream {
        head: Some(head_sender),
        events,
    };
    let task = AbortOnDrop(tokio::spawn(run(app, scope, request, client)));
    match head.await {
        Ok(Head::EventStream) => event_stream_response(event_receiver, task),
        Ok(Head::Reply(response)) => response,
        // The task panicked; its scope already ended the request.
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// Aborting the request task drops its [`RequestScope`], which ends the request.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn event_stream_response(events: mpsc::Receiver<Bytes>, task: AbortOnDrop) -> Response {
    let body = futures_util::stream::unfold((events, task), |(mut events, task)| async move {
        let event = events.recv().await?;
        Some((Ok::<_, Infallible>(event), (events, task)))
    });
    let headers = [
        (header::CONTENT_TYPE, "text/event-stream"),
        (header::CACHE_CONTROL, "no-cache"),
    ];
    (headers, Body::from_stream(body)).into_response()
}

/// The client side of a streaming request: the response head, then the body's events.
struct ClientStream {
    head: Option<oneshot::Sender<Head>>,
    events: mpsc::Sender<Bytes>,
}

impl ClientStream {
    /// Commits to a 200 event stream; the client gets the head now.
    fn start(&mut self) {
        if let Some(head) = self.head.take() {
            // A closed receiver means the handler is gone and this task is being aborted.
            _ = head.send(Head::EventStream);
        }
    }

    async fn send(&mut self, event: Bytes) -> Result<(), StreamError> {
        self.events
            .send(event)
            .await
            .map_err(|_| StreamError::ClientGone)
    }

    /// Hands a `data:` event to the body; `chunk` marks it as forwarded.
    async fn forward(&mut self, recorder: &Recorder, event: Bytes) -> Result<(), StreamError> {
        self.send(event).await?;
        recorder.chunk();
        Ok(())
    }
}

async fn run(app: Arc<App>, scope: RequestScope, request: ChatRequest, mut client: ClientStream) {
    let streamed = stream_answer(&app, scope.recorder(), request, &mut client).await;
    match streamed {
        Ok(()) => scope.end(200, None),
        // Dropping the scope ends the request as disconnected.
        Err(StreamError::ClientGone) => drop(scope),
        Err(StreamError::Api(error)) => match client.head.take() {
            Some(head) => _ = head.send(Head::Reply(chat::json_reply(scope, Err(error)))),
            None => {
                // The head already said 200, so the error travels in the stream.
                let event = Bytes::from(format!("data: {}\n\n", error.body()));
                if client.forward(scope.recorder(), event).await.is_ok() {
                    scope.end(200, Some(error.error_type));
                }
            }
        },
    }
}

async fn stream_answer(
    app: &App,
    recorder: &Recorder,
    mut request: ChatRequest,
    client: &mut ClientStream,
) -> Result<(), StreamError> {
    let mut route = chat::route_model(recorder, &request.model)?;
    if request.tools.is_empty() {
        let upstream = open_stream(app, recorder, &mut route, &mut request).await?;
        client.start();
        // Without tools on offer the upstream asks for none, so everything is forwarded.
        relay_turn(recorder, upstream, client).await?;
        return Ok(());
    }
    let _tool_loop = recorder.stage(Stage::StreamingToolLoop);
    let mut turn = 1;
    loop {
        let _turn = recorder.stage(Stage::StreamingToolTurn);
        let upstream = open_stream(app, recorder, &mut route, &mut request).await?;
        client.start();
        let calls = relay_turn(recorder, upstream, client).await?;
        if calls.is_empty() {
            return Ok(());
        }
        if turn == MAX_TOOL_TURNS {
            return Err(ApiError::tool_loop_exhausted(turn).into());
        }
        tools::run_calls(recorder, &calls, &mut request.messages).await;
        turn += 1;
    }
}

/// An upstream stream whose head said 200; its stage and key stay held until it ends.
struct OpenStream {
    response: reqwest::Response,
    upstream_call: StageGuard,
    lease: KeyLease,
}

/// Key + request until an upstream answers 200, falling back as the routes allow.
async fn open_stream(
    app: &App,
    recorder: &Recorder,
    route: &mut &'static Route,
    request: &mut ChatRequest,
) -> Result<OpenStream, ApiError> {
    loop {
        request.model = route.model.to_owned();
        let lease = chat::acquire_key(app, recorder, route.provider).await;
        let upstream_call = recorder.stage(Stage::UpstreamChatStream);
        let failure = match app
            .upstream
            .send(recorder.id(), &lease.secret, request)
            .await
        {
            Ok(response) => {
                recorder.first_byte();
                let status = response.status();
                if status.is_success() {
                    return Ok(OpenStream {
                        response,
                        upstream_call,
                        lease,
                    });
                }
                // Read the error body so the connection goes back to the pool.
                _ = response.bytes().await;
                UpstreamFailure::Status(status)
            }
            Err(err) => UpstreamFailure::Transport(err),
        };
        drop(upstream_call);
        drop(lease);
        chat::reroute(recorder, route, failure)?;
    }
}

/// Forwards one upstream turn's events as they arrive, keeping back the tool-call events
/// (the broker answers those itself), and returns the tool calls the turn asked for.
async fn relay_turn(
    recorder: &Recorder,
    upstream: OpenStream,
    client: &mut ClientStream,
) -> Result<Vec<ToolCall>, StreamError> {
    let OpenStream {
        response,
        upstream_call,
        lease,
    } = upstream;
    let mut body = response.bytes_stream();
    let mut events = SseSplitter::default();
    let mut tool_calls = ToolCallAssembler::default();
    while let Some(bytes) = body.next().await {
        let bytes = bytes.map_err(|err| ApiError::from(UpstreamFailure::Transport(err)))?;
        events.push(&bytes);
        while let Some(event) = events.next_event() {
            let Some(payload) = data_payload(&event) else {
                continue; // comments and keep-alives are the upstream's business
            };
            if payload == "[DONE]" {
                if tool_calls.is_empty() {
                    client.send(event).await?;
                }
                continue;
            }
            let chunk: StreamChunk = serde_json::from_str(payload)
                .map_err(|err| ApiError::from(UpstreamFailure::InvalidBody(err)))?;
            if let Some(usage) = &chunk.usage {
                recorder.token_usage(usage.prompt_tokens, usage.completion_tokens);
            }
            if !tool_calls.absorb(chunk) {
                client.forward(recorder, event).await?;
            }
        }
    }
    drop(upstream_call);
    drop(lease);
    Ok(tool_calls.calls)
}

/// Splits a byte stream into SSE events (each ending in a blank line, `\n\n`, as
/// OpenAI-compatible providers send them).
#[derive(Default)]
struct SseSplitter {
    pending: BytesMut,
}

impl SseSplitter {
    fn push(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
    }

    fn next_event(&mut self) -> Option<Bytes> {
        let end = self.pending.windows(2).position(|pair| pair == b"\n\n")? + 2;
        Some(self.pending.split_to(end).freeze())
    }
}

/// The `data:` field of an event, if it has one.
fn data_payload(event: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(event).ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix("data:"))
        .map(str::trim)
}

#[derive(Deserialize)]
struct StreamChunk {
    #[serde(default)]
    choices: Vec<StreamChoice>,
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct StreamChoice {
    #[serde(default)]
    delta: Delta,
    finish_reason: Option<String>,
}

#[derive(Default, Deserialize)]
struct Delta {
    #[serde(default)]
    tool_calls: Vec<ToolCallDelta>,
}

#[derive(Deserialize)]
struct ToolCallDelta {
    index: usize,
    id: Option<String>,
    #[serde(default)]
    function: FunctionDelta,
}

#[derive(Default, Deserialize)]
struct FunctionDelta {
    name: Option<String>,
    arguments: Option<String>,
}

/// Rebuilds tool calls from their streamed fragments.
#[derive(Default)]
struct ToolCallAssembler {
    calls: Vec<ToolCall>,
}

impl ToolCallAssembler {
    fn is_empty(&self) -> bool {
        self.calls.is_empty()
    }

    /// Takes in a chunk's tool-call fragments; true if the chunk belongs to a tool call
    /// (fragments, or the `tool_calls` finish) rather than to the answer.
    fn absorb(&mut self, chunk: StreamChunk) -> bool {
        let mut about_tools = false;
        for choice in chunk.choices {
            about_tools |= choice.finish_reason.as_deref() == Some("tool_calls");
            for fragment in choice.delta.tool_calls {
                about_tools = true;
                if self.calls.len() <= fragment.index {
                    self.calls.resize_with(fragment.index + 1, || ToolCall {
                        id: String::new(),
                        name: String::new(),
                        arguments: String::new(),
                    });
                }
                let call = &mut self.calls[fragment.index];
                if let Some(id) = fragment.id {
                    call.id = id;
                }
                if let Some(name) = fragment.function.name {
                    call.name = name;
                }
                if let Some(arguments) = fragment.function.arguments {
                    call.arguments.push_str(&arguments);
                }
            }
        }
        about_tools
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn splitter_yields_whole_events_across_reads() {
        let mut splitter = SseSplitter::default();
        splitter.push(b"data: {\"a\":1}\n\ndata: [DO");
        assert_eq!(
            splitter.next_event().as_deref(),
            Some(&b"data: {\"a\":1}\n\n"[..])
        );
        assert_eq!(splitter.next_event(), None);
        splitter.push(b"NE]\n\n");
        let done = splitter.next_event().unwrap();
        assert_eq!(data_payload(&done), Some("[DONE]"));
    }

    #[test]
    fn assembler_joins_fragments_and_flags_tool_chunks() {
        let mut assembler = ToolCallAssembler::default();
        let chunk =
            |value: serde_json::Value| serde_json::from_value::<StreamChunk>(value).unwrap();
        let name = json!({"choices": [{"delta": {"tool_calls": [{"index": 0, "id": "c0",
            "function": {"name": "get_time", "arguments": ""}}]}}]});
        assert!(assembler.absorb(chunk(name)));
        let arguments = json!({"choices": [{"delta": {"tool_calls": [{"index": 0,
            "function": {"arguments": "{}"}}]}}]});
        assert!(assembler.absorb(chunk(arguments)));
        assert!(!assembler.absorb(chunk(json!({"choices": [{"delta": {"content": "hi"}}]}))));
        assert_eq!(assembler.calls.len(), 1);
        assert_eq!(
            (
                assembler.calls[0].id.as_str(),
                assembler.calls[0].arguments.as_str()
            ),
            ("c0", "{}")
        );
    }
}
