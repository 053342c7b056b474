//! `POST /v1/chat/completions`: routing, key pool, upstream calls with fallback, the tool
//! loop and the non-streaming answer. Streaming answers continue in [`crate::streaming`].

use std::sync::Arc;

use axum::Extension;
use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use probe_markers::{RequestId, Stage};
use serde_json::Value;

use crate::App;
use crate::api::{ApiError, ChatRequest, ToolCall, Usage};
use crate::keypool::KeyLease;
use crate::recorder::{Recorder, RequestScope};
use crate::routing::{self, Route};
use crate::upstream::UpstreamFailure;
use crate::{streaming, tools};

/// Upstream turns a tool loop may take before the broker gives up.
pub const MAX_TOOL_TURNS: u32 = 4;

pub async fn chat_completions(
    State(app): State<Arc<App>>,
    Extension(id): Extension<RequestId>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let traceparent = headers
        .get("traceparent")
        .and_then(|value| value.to_str().ok());
    let parsed = serde_json::from_slice::<ChatRequest>(&body);
    let model = parsed.as_ref().map_or("", |request| request.model.as_str());
    let scope = RequestScope::begin(id, model, traceparent, app.ground_truth.as_ref());
    let request = match parsed {
        Ok(request) => request,
        Err(err) => return json_reply(scope, Err(ApiError::invalid_request(&err))),
    };
    if request.stream {
        return streaming::respond(app, scope, request).await;
    }
    let completion = complete(&app, scope.recorder(), request).await;
    json_reply(scope, completion)
}

/// Serializes the answer (stage `response.serialize`) and ends the request.
pub fn json_reply(scope: RequestScope, answer: Result<Value, ApiError>) -> Response {
    let (status, error_type, body) = match answer {
        Ok(completion) => (axum::http::StatusCode::OK, None, completion),
        Err(error) => {
            log::debug!("request {} failed: {error:?}", scope.recorder().id().get());
            (error.status, Some(error.error_type), error.body())
        }
    };
    let bytes = {
        let _serialize = scope.recorder().stage(Stage::ResponseSerialize);
        serialize(&body)
    };
    scope.end(status.as_u16(), error_type);
    (status, [(header::CONTENT_TYPE, "application/json")], bytes).into_response()
}

/// The `response.serialize` stage's work (a function of its own, like `routing::lookup`).
#[inline(never)]
fn serialize(body: &Value) -> String {
    body.to_string()
}

async fn complete(
    app: &App,
    recorder: &Recorder,
    mut request: ChatRequest,
) -> Result<Value, ApiError> {
    let mut route = route_model(recorder, &request.model)?;
    if request.tools.is_empty() {
        return chat_turn(app, recorder, &mut route, &mut request).await;
    }
    let _tool_loop = recorder.stage(Stage::ToolLoop);
    let mut turn = 1;
    loop {
        let completion = chat_turn(app, recorder, &mut route, &mut request).await?;
        let calls = ToolCall::all_of_completion(&completion);
        if calls.is_empty() {
            return Ok(completion);
        }
        if turn == MAX_TOOL_TURNS {
            return Err(ApiError::tool_loop_exhausted(turn));
        }
        tools::run_calls(recorder, &calls, &mut request.messages).await;
        turn += 1;
    }
}

/// Stage `route`, then the `provider` marker.
pub fn route_model(recorder: &Recorder, model: &str) -> Result<&'static Route, ApiError> {
    let route = {
        let _route = recorder.stage(Stage::Route);
        routing::lookup(model)
    };
    let route = route.ok_or_else(|| ApiError::model_not_found(model))?;
    recorder.provider(route.provider);
    Ok(route)
}

/// Switches `route` to its fallback model if `failure` warrants one; otherwise the
/// failure is the request's answer.
pub fn reroute(
    recorder: &Recorder,
    route: &mut &'static Route,
    failure: UpstreamFailure,
) -> Result<(), ApiError> {
    match route.fallback {
        Some(fallback) if failure.warrants_fallback() => {
            recorder.fallback(route.model, fallback);
            *route = route_model(recorder, fallback)?;
            Ok(())
        }
        _ => Err(failure.into()),
    }
}

/// Stage `keypool.acquire`: waits for a key of `provider` with a free slot.
pub async fn acquire_key(app: &App, recorder: &Recorder, provider: &str) -> KeyLease {
    let _acquire = recorder.stage(Stage::KeypoolAcquire);
    app.keys.get(provider).acquire().await
}

/// One upstream completion, falling back to other models as the routes allow.
async fn chat_turn(
    app: &App,
    recorder: &Recorder,
    route: &mut &'static Route,
    request: &mut ChatRequest,
) -> Result<Value, ApiError> {
    loop {
        request.model = route.model.to_owned();
        match call_upstream(app, recorder, route, request).await {
            Ok(completion) => return Ok(completion),
            Err(failure) => reroute(recorder, route, failure)?,
        }
    }
}

async fn call_upstream(
    app: &App,
    recorder: &Recorder,
    route: &Route,
    request: &ChatRequest,
) -> Result<Value, UpstreamFailure> {
    let lease = acquire_key(app, recorder, route.provider).await;
    let upstream_call = recorder.stage(Stage::UpstreamChat);
    let response = app
        .upstream
        .send(recorder.id(), &lease.secret, request)
        .await?;
    recorder.first_byte();
    let status = response.status();
    let body = response.bytes().await?;
    drop(upstream_call);
    drop(lease);
    if !status.is_success() {
        return Err(UpstreamFailure::Status(status));
    }
    let completion: Value = serde_json::from_slice(&body)?;
    if let Some(usage) = Usage::of_completion(&completion) {
        recorder.token_usage(usage.prompt_tokens, usage.completion_tokens);
    }
    Ok(completion)
}
