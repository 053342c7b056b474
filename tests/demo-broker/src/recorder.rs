//! The only place the broker marks its timeline ([`crate::instrument`]: markers, or USDT
//! probes): every call goes through [`Recorder`],
//! which, with `--ground-truth`, reads CLOCK_MONOTONIC immediately before the marker (the
//! clock brokerprobe's eBPF timestamps use) and records the broker's own view of the
//! request. Without `--ground-truth` it reads no clock and records nothing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use fake_upstream::monotonic_ns;
use probe_markers::{RequestId, Stage};
use serde::Serialize;

use crate::{ground_truth::GroundTruthSink, instrument};

/// Status and error type recorded for a request whose response was abandoned midway
/// (nginx's "client closed request").
const CLIENT_CLOSED_STATUS: u16 = 499;
const CLIENT_CLOSED_ERROR: &str = "client_disconnected";

/// The marker API of one request. Cheap to clone: an id and, with ground truth, an `Arc`.
#[derive(Clone)]
pub struct Recorder {
    id: RequestId,
    trace: Option<Arc<TraceSlot>>,
    #[cfg(feature = "inprocess")]
    inprocess: crate::inprocess::RequestSpan,
}

struct TraceSlot {
    trace: Mutex<Trace>,
    sink: GroundTruthSink,
}

/// One ground-truth line.
#[derive(Serialize)]
struct Trace {
    request_id: u64,
    model: String,
    provider: Option<String>,
    status: u16,
    error_type: Option<String>,
    begin_ns: u64,
    end_ns: u64,
    stages: Vec<StageSpan>,
    fallback: Option<FallbackRecord>,
    first_byte_ns: Vec<u64>,
    chunks: u32,
    first_chunk_ns: Option<u64>,
    last_chunk_ns: Option<u64>,
    input_tokens: u64,
    output_tokens: u64,
}

#[derive(Serialize)]
struct StageSpan {
    stage: &'static str,
    name: Option<String>,
    begin_ns: u64,
    end_ns: u64,
}

#[derive(Serialize)]
struct FallbackRecord {
    from: String,
    to: String,
}

/// Off with `--no-markers`: the broker then runs as if it had never linked probe-markers
/// (the socket-only mode tests use it).
static MARKERS_ENABLED: AtomicBool = AtomicBool::new(true);

pub fn disable_markers() {
    MARKERS_ENABLED.store(false, Ordering::Relaxed);
}

fn markers_enabled() -> bool {
    MARKERS_ENABLED.load(Ordering::Relaxed)
}

impl Recorder {
    pub fn id(&self) -> RequestId {
        self.id
    }

    /// A clock reading, only when someone will record it.
    fn clock(&self) -> Option<u64> {
        self.trace.as_ref().map(|_| monotonic_ns())
    }

    fn record(&self, at: Option<u64>, apply: impl FnOnce(&mut Trace, u64)) {
        if let (Some(slot), Some(at)) = (&self.trace, at) {
            apply(
                &mut slot.trace.lock().unwrap_or_else(PoisonError::into_inner),
                at,
            );
        }
    }

    /// Begins `stage`; it ends when the guard is dropped.
    pub fn stage(&self, stage: Stage) -> StageGuard {
        // The span is added (which may allocate) before the clock is read, so the clock
        // is read right before the stage's work: a probe on the function doing that work
        // (brokerprobe's symbol mode) sees nearly the same begin.
        self.record(self.clock(), |trace, _| {
            trace.begin_stage(stage.name(), None, 0)
        });
        let at = self.clock();
        if markers_enabled() {
            instrument::stage_begin(self.id, stage);
        }
        self.record(at, |trace, at| trace.stage_began(stage.name(), at));
        StageGuard {
            recorder: self.clone(),
            stage,
            #[cfg(feature = "inprocess")]
            _inprocess: self.inprocess.stage(stage.name()),
        }
    }

    fn stage_end(&self, stage: Stage) {
        let at = self.clock();
        if markers_enabled() {
            instrument::stage_end(self.id, stage);
        }
        self.record(at, |trace, at| trace.end_stage(stage.name(), None, at));
    }

    /// Begins executing tool `name` (stage `tool.execute`); it ends when the guard is dropped.
    pub fn tool<'a>(&'a self, name: &'a str) -> ToolGuard<'a> {
        let at = self.clock();
        if markers_enabled() {
            instrument::tool_begin(self.id, name);
        }
        self.record(at, |trace, at| {
            trace.begin_stage(Stage::ToolExecute.name(), Some(name), at)
        });
        ToolGuard {
            recorder: self,
            name,
            #[cfg(feature = "inprocess")]
            _inprocess: self.inprocess.stage(Stage::ToolExecute.name()),
        }
    }

    fn tool_end(&self, name: &str) {
        let at = self.clock();
        if markers_enabled() {
            instrument::tool_end(self.id, name);
        }
        self.record(at, |trace, at| {
            trace.end_stage(Stage::ToolExecute.name(), Some(name), at)
        });
    }

    pub fn provider(&self, provider: &str) {
        let at = self.clock();
        if markers_enabled() {
            instrument::provider(self.id, provider);
        }
        self.record(at, |trace, _| trace.provider = Some(provider.to_owned()));
    }

    pub fn first_byte(&self) {
        let at = self.clock();
        if markers_enabled() {
            instrument::first_byte(self.id);
        }
        self.record(at, |trace, at| trace.first_byte_ns.push(at));
    }

    pub fn chunk(&self) {
        let at = self.clock();
        if markers_enabled() {
            instrument::chunk(self.id);
        }
        self.record(at, |trace, at| {
            trace.chunks += 1;
            trace.first_chunk_ns.get_or_insert(at);
            trace.last_chunk_ns = Some(at);
        });
    }

    pub fn token_usage(&self, input_tokens: u64, output_tokens: u64) {
        let at = self.clock();
        if markers_enabled() {
            instrument::token_usage(self.id, input_tokens, output_tokens);
        }
        self.record(at, |trace, _| {
            trace.input_tokens += input_tokens;
            trace.output_tokens += output_tokens;
        });
    }

    pub fn fallback(&self, from: &str, to: &str) {
        let at = self.clock();
        if markers_enabled() {
            instrument::fallback(self.id, from, to);
        }
        self.record(at, |trace, _| {
            trace.fallback = Some(FallbackRecord {
                from: from.to_owned(),
                to: to.to_owned(),
            })
        });
    }
}

impl Trace {
    fn new(id: RequestId, model: &str) -> Self {
        Self {
            request_id: id.get(),
            model: model.to_owned(),
            provider: None,
            status: 0,
            error_type: None,
            begin_ns: 0,
            end_ns: 0,
            stages: Vec::new(),
            fallback: None,
            first_byte_ns: Vec::new(),
            chunks: 0,
            first_chunk_ns: None,
            last_chunk_ns: None,
            input_tokens: 0,
            output_tokens: 0,
        }
    }

    fn begin_stage(&mut self, stage: &'static str, name: Option<&str>, at: u64) {
        self.stages.push(StageSpan {
            stage,
            name: name.map(str::to_owned),
            begin_ns: at,
            end_ns: 0,
        });
    }

    /// Sets the begin of the span of `stage` just added by `begin_stage(.., 0)`.
    fn stage_began(&mut self, stage: &'static str, at: u64) {
        let added = self
            .stages
            .iter_mut()
            .rev()
            .find(|span| span.begin_ns == 0 && span.stage == stage && span.name.is_none());
        if let Some(span) = added {
            span.begin_ns = at;
        }
    }

    /// Closes the innermost open span of `stage` (and tool `name`).
    fn end_stage(&mut self, stage: &'static str, name: Option<&str>, at: u64) {
        let open =
            self.stages.iter_mut().rev().find(|span| {
                span.end_ns == 0 && span.stage == stage && span.name.as_deref() == name
            });
        if let Some(span) = open {
            span.end_ns = at;
        }
    }
}

/// Ends its stage when dropped, so `?` and cancellation still close it. Owns a
/// [`Recorder`] clone so a stage can outlive the function that began it.
#[must_use = "the stage ends when this guard is dropped"]
pub struct StageGuard {
    recorder: Recorder,
    stage: Stage,
    #[cfg(feature = "inprocess")]
    _inprocess: crate::inprocess::StageSpan,
}

impl Drop for StageGuard {
    fn drop(&mut self) {
        self.recorder.stage_end(self.stage);
    }
}

#[must_use = "the tool stage ends when this guard is dropped"]
pub struct ToolGuard<'a> {
    recorder: &'a Recorder,
    name: &'a str,
    #[cfg(feature = "inprocess")]
    _inprocess: crate::inprocess::StageSpan,
}

impl Drop for ToolGuard<'_> {
    fn drop(&mut self) {
        self.recorder.tool_end(self.name);
    }
}

/// A request between `request_begin` and `request_end`: ending it consumes it, and
/// dropping it unended (client gone, task cancelled) ends it as disconnected, so
/// `request_end` happens exactly once. Declare stage guards after it so they drop first.
pub struct RequestScope {
    recorder: Recorder,
    ended: bool,
}

impl RequestScope {
    pub fn begin(
        id: RequestId,
        model: &str,
        traceparent: Option<&str>,
        sink: Option<&GroundTruthSink>,
    ) -> Self {
        let trace = sink.map(|sink| {
            Arc::new(TraceSlot {
                trace: Mutex::new(Trace::new(id, model)),
                sink: sink.clone(),
            })
        });
        let recorder = Recorder {
            id,
            trace,
            #[cfg(feature = "inprocess")]
            inprocess: crate::inprocess::RequestSpan::begin(model),
        };
        let at = recorder.clock();
        if markers_enabled() {
            instrument::request_begin(id, model, traceparent);
        }
        recorder.record(at, |trace, at| trace.begin_ns = at);
        Self {
            recorder,
            ended: false,
        }
    }

    pub fn recorder(&self) -> &Recorder {
        &self.recorder
    }

    pub fn end(mut self, status: u16, error_type: Option<&str>) {
        self.finish(status, error_type);
    }

    fn finish(&mut self, status: u16, error_type: Option<&str>) {
        self.ended = true;
        let recorder = &self.recorder;
        let at = recorder.clock();
        if markers_enabled() {
            instrument::request_end(recorder.id, status, error_type);
        }
        recorder.record(at, |trace, at| {
            trace.end_ns = at;
            trace.status = status;
            trace.error_type = error_type.map(str::to_owned);
        });
        #[cfg(feature = "inprocess")]
        recorder.inprocess.end(status);
        if let Some(slot) = &recorder.trace {
            let trace = slot.trace.lock().unwrap_or_else(PoisonError::into_inner);
            slot.sink.write(&*trace);
        }
    }
}

impl Drop for RequestScope {
    fn drop(&mut self) {
        if !self.ended {
            self.finish(CLIENT_CLOSED_STATUS, Some(CLIENT_CLOSED_ERROR));
        }
    }
}
