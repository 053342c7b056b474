//! Stage markers for LLM brokers, read from outside by brokerprobe.
//!
//! Each marker is a tiny function whose first instruction is a 5-byte NOP, called only
//! while brokerprobe is attached: nobody attached, a marker is one load of its semaphore and
//! a branch (well under a nanosecond, BENCHMARKS.md). When brokerprobe attaches, the kernel
//! raises the semaphore and turns each NOP into a call to its uprobe trampoline, which
//! timestamps the hit. Markers only pass identities and values (request id, stage, model).
//!
//! Correlation never relies on threads: every marker carries a [`RequestId`], so a request
//! whose task hops between tokio workers is still one timeline.
//!
//! ```
//! use probe_markers::{RequestId, Stage};
//! let id = RequestId::next();
//! probe_markers::request_begin(id, "gpt-4o-mini", None);
//! {
//!     let _route = probe_markers::stage(id, Stage::Route);
//!     // ... pick a provider ...
//! }
//! probe_markers::provider(id, "openai");
//! probe_markers::request_end(id, 200, None);
//! ```
//!
//! The ABI (symbol names, argument registers, string encoding, versioning) is specified in
//! docs/markers.md so that brokers in other languages can implement it.
#![no_std]

use core::sync::atomic::{AtomicU64, Ordering};

pub mod abi;

/// Identifies one broker request in every marker it emits. Unique within the process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RequestId(u64);

static NEXT_REQUEST_ID: AtomicU64 = AtomicU64::new(1);

impl RequestId {
    /// A fresh id (a relaxed atomic increment; no clock, no allocation).
    #[inline]
    pub fn next() -> Self {
        Self(NEXT_REQUEST_ID.fetch_add(1, Ordering::Relaxed))
    }

    /// Wraps an id the broker already has (it must be unique among in-flight requests).
    pub const fn from_raw(id: u64) -> Self {
        Self(id)
    }

    pub const fn get(self) -> u64 {
        self.0
    }
}

/// Well-known broker stages; anything else goes through [`custom_stage`].
/// Wire values are fixed by the ABI (docs/markers.md).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stage {
    /// Choosing model and provider.
    Route = 1,
    /// Waiting for an API key from the pool.
    KeypoolAcquire = 2,
    /// A non-streaming upstream call, from sending the request to the full response.
    UpstreamChat = 3,
    /// A streaming upstream call, from sending the request to the last chunk.
    UpstreamChatStream = 4,
    /// Serializing the answer for the client.
    ResponseSerialize = 5,
    /// The whole tool loop (upstream turns and tool executions).
    ToolLoop = 6,
    /// One tool execution; use [`tool`] to name the tool.
    ToolExecute = 7,
    /// The whole streaming tool loop.
    StreamingToolLoop = 8,
    /// One turn of the streaming tool loop.
    StreamingToolTurn = 9,
}

impl Stage {
    /// The name brokerprobe reports for this stage.
    pub const fn name(self) -> &'static str {
        match self {
            Stage::Route => "route",
            Stage::KeypoolAcquire => "keypool.acquire",
            Stage::UpstreamChat => "upstream.chat",
            Stage::UpstreamChatStream => "upstream.chat_stream",
            Stage::ResponseSerialize => "response.serialize",
            Stage::ToolLoop => "tool_loop",
            Stage::ToolExecute => "tool.execute",
            Stage::StreamingToolLoop => "streaming_tool_loop",
            Stage::StreamingToolTurn => "streaming_tool_turn",
        }
    }
}

/// Wire value of a broker-named stage (its name travels as the marker's string).
const CUSTOM_STAGE: u32 = 0;

#[cfg(not(feature = "disabled"))]
macro_rules! hit {
    ($marker:ident($($arg:expr),*)) => {
        if abi::attached() {
            abi::$marker($($arg),*)
        }
    };
}
#[cfg(feature = "disabled")]
macro_rules! hit {
    // Type-checked like the real call, then compiled away.
    ($marker:ident($($arg:expr),*)) => {
        if false {
            abi::$marker($($arg),*)
        }
    };
}

#[inline(always)]
fn raw(text: &str) -> (*const u8, usize) {
    (text.as_ptr(), text.len())
}

#[inline(always)]
fn raw_opt(text: Option<&str>) -> (*const u8, usize) {
    text.map_or((core::ptr::null(), 0), raw)
}

/// A request arrived for `model`; `traceparent` is the caller's W3C header, if any.
#[inline(always)]
pub fn request_begin(id: RequestId, model: &str, traceparent: Option<&str>) {
    let (model_ptr, model_len) = raw(model);
    let (tp_ptr, tp_len) = raw_opt(traceparent);
    hit!(brokerprobe_v1_request_begin(
        id.0, model_ptr, model_len, tp_ptr, tp_len
    ));
}

/// The request finished with HTTP `status`; `error_type` names the failure, if any
/// (e.g. `upstream_timeout`, `rate_limited`). Call it after the last byte is handed to
/// the client (for streams: when the stream ends).
#[inline(always)]
pub fn request_end(id: RequestId, status: u16, error_type: Option<&str>) {
    let (err_ptr, err_len) = raw_opt(error_type);
    hit!(brokerprobe_v1_request_end(
        id.0,
        status as u32,
        err_ptr,
        err_len
    ));
}

/// A well-known stage starts. Pair with [`stage_end`], or use the guard of [`stage`].
#[inline(always)]
pub fn stage_begin(id: RequestId, stage: Stage) {
    hit!(brokerprobe_v1_stage_begin(
        id.0,
        stage as u32,
        core::ptr::null(),
        0
    ));
}

#[inline(always)]
pub fn stage_end(id: RequestId, stage: Stage) {
    hit!(brokerprobe_v1_stage_end(
        id.0,
        stage as u32,
        core::ptr::null(),
        0
    ));
}

/// A broker-defined stage starts; `name` should be a short constant like `cache.lookup`.
#[inline(always)]
pub fn custom_stage_begin(id: RequestId, name: &str) {
    let (ptr, len) = raw(name);
    hit!(brokerprobe_v1_stage_begin(id.0, CUSTOM_STAGE, ptr, len));
}

#[inline(always)]
pub fn custom_stage_end(id: RequestId, name: &str) {
    let (ptr, len) = raw(name);
    hit!(brokerprobe_v1_stage_end(id.0, CUSTOM_STAGE, ptr, len));
}

/// Execution of tool `name` starts (stage `tool.execute`).
#[inline(always)]
pub fn tool_begin(id: RequestId, name: &str) {
    let (ptr, len) = raw(name);
    hit!(brokerprobe_v1_stage_begin(
        id.0,
        Stage::ToolExecute as u32,
        ptr,
        len
    ));
}

#[inline(always)]
pub fn tool_end(id: RequestId, name: &str) {
    let (ptr, len) = raw(name);
    hit!(brokerprobe_v1_stage_end(
        id.0,
        Stage::ToolExecute as u32,
        ptr,
        len
    ));
}

/// The request was routed to `provider` (e.g. `openai`, `anthropic`).
#[inline(always)]
pub fn provider(id: RequestId, provider: &str) {
    let (ptr, len) = raw(provider);
    hit!(brokerprobe_v1_provider(id.0, ptr, len));
}

/// The broker read the first byte of the upstream response.
#[inline(always)]
pub fn first_byte(id: RequestId) {
    hit!(brokerprobe_v1_first_byte(id.0));
}

/// The broker forwarded one stream chunk to the client.
#[inline(always)]
pub fn chunk(id: RequestId) {
    hit!(brokerprobe_v1_chunk(id.0));
}

/// Token usage reported by the upstream for this request (summed if called per turn).
#[inline(always)]
pub fn token_usage(id: RequestId, input_tokens: u64, output_tokens: u64) {
    hit!(brokerprobe_v1_token_usage(
        id.0,
        input_tokens,
        output_tokens
    ));
}

/// The broker fell back from model `from` to model `to`.
#[inline(always)]
pub fn fallback(id: RequestId, from: &str, to: &str) {
    let (from_ptr, from_len) = raw(from);
    let (to_ptr, to_len) = raw(to);
    hit!(brokerprobe_v1_fallback(
        id.0, from_ptr, from_len, to_ptr, to_len
    ));
}

/// Ends its stage when dropped, so early returns and `?` still close the stage.
/// Holds only an id and a borrowed name: `Send`, fine across `.await`.
#[must_use = "the stage ends when this guard is dropped"]
pub struct StageGuard<'a> {
    id: RequestId,
    stage: u32,
    name: &'a str,
}

impl Drop for StageGuard<'_> {
    #[inline(always)]
    fn drop(&mut self) {
        let (ptr, len) = raw(self.name);
        hit!(brokerprobe_v1_stage_end(self.id.0, self.stage, ptr, len));
    }
}

/// Begins `stage` and returns the guard that ends it.
#[inline(always)]
pub fn stage(id: RequestId, stage: Stage) -> StageGuard<'static> {
    stage_begin(id, stage);
    StageGuard {
        id,
        stage: stage as u32,
        name: "",
    }
}

/// Begins a broker-named stage and returns the guard that ends it.
#[inline(always)]
pub fn custom_stage(id: RequestId, name: &str) -> StageGuard<'_> {
    custom_stage_begin(id, name);
    StageGuard {
        id,
        stage: CUSTOM_STAGE,
        name,
    }
}

/// Begins the execution of tool `name` and returns the guard that ends it.
#[inline(always)]
pub fn tool(id: RequestId, name: &str) -> StageGuard<'_> {
    tool_begin(id, name);
    StageGuard {
        id,
        stage: Stage::ToolExecute as u32,
        name,
    }
}
