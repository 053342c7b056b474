//! The export thread: traces from a bounded queue, batched, to the OTLP endpoint and the
//! embedded trace store. It runs on its own runtime, so nothing here can hold up the event
//! loop: the queue is filled with `try_send` (a full queue drops the trace, counted), and
//! failed exports are counted and reported, not retried beyond the exporter's own short
//! retries.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_proto::{
    tonic::collector::trace::v1::ExportTraceServiceRequest,
    transform::{
        common::tonic::ResourceAttributesWithSchema,
        trace::tonic::group_spans_by_resource_and_scope,
    },
};
use opentelemetry_sdk::{
    Resource,
    trace::{SpanData, SpanExporter as _},
};
use otlp_embedded::{StateRef, TraceService as _, TraceServiceImpl};
use prost::Message as _;
use tokio::sync::mpsc;

/// Traces handed to one export call, at most (~3k spans: well under the 4 MiB a gRPC
/// receiver takes by default).
const TRACES_PER_BATCH: usize = 512;

/// Exports start at most this often (a backlog goes at once, in full batches). One export
/// per request would cost an HTTP round trip and a thread wake-up each: at 1,000
/// requests/s, most of brokerprobe's CPU. With the default queue (1,024 traces) this
/// keeps up with ~10k traces/s.
const BATCH_WINDOW: Duration = Duration::from_millis(100);

/// Failures are logged at most this often, with the count since the last report.
const REPORT_EVERY: Duration = Duration::from_secs(10);

/// Where spans go.
pub enum Target {
    /// An OTLP endpoint (http/protobuf or grpc), and its URL for reports. Boxed: an
    /// exporter is large next to the other target.
    Otlp(Box<opentelemetry_otlp::SpanExporter>, String),
    /// The embedded store behind `--trace-ui`.
    Store(StateRef, Resource),
}

/// The two kinds of target, as indexes of [`TraceCounters`]' per-target counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TraceTarget {
    Otlp = 0,
    Store = 1,
}

impl TraceTarget {
    pub fn name(self) -> &'static str {
        match self {
            TraceTarget::Otlp => "otlp",
            TraceTarget::Store => "store",
        }
    }
}

/// Counts shared between the exporter (queue side) and the export thread.
#[derive(Debug, Default)]
pub struct TraceCounters {
    /// Traces and spans waiting in the queue.
    pub queued: AtomicU64,
    pub queued_spans: AtomicU64,
    /// Spans delivered, and spans an export call failed to deliver (endpoint down, slow,
    /// refusing), by [`TraceTarget`].
    pub exported_spans: [AtomicU64; 2],
    pub failed_spans: [AtomicU64; 2],
}

/// Exports what comes from `queue` until it closes and is empty.
pub async fn run(
    mut queue: mpsc::Receiver<Vec<SpanData>>,
    targets: Vec<Target>,
    counters: Arc<TraceCounters>,
) {
    let mut report = FailureReport::default();
    let mut traces = Vec::with_capacity(TRACES_PER_BATCH);
    let mut last_export = tokio::time::Instant::now();
    while queue.recv_many(&mut traces, TRACES_PER_BATCH).await > 0 {
        // Let a batch gather; behind schedule (a backlog), this does not wait.
        tokio::time::sleep_until(last_export + BATCH_WINDOW).await;
        // Everything queued by now goes, in full batches back to back.
        loop {
            while traces.len() < TRACES_PER_BATCH {
                match queue.try_recv() {
                    Ok(trace) => traces.push(trace),
                    Err(_) => break,
                }
            }
            export(&targets, &mut traces, &counters, &mut report).await;
            if queue.is_empty() {
                break;
            }
        }
        last_export = tokio::time::Instant::now();
    }
    report.flush();
}

/// Sends `traces` to every target and takes them out of the queue's count.
async fn export(
    targets: &[Target],
    traces: &mut Vec<Vec<SpanData>>,
    counters: &TraceCounters,
    report: &mut FailureReport,
) {
    let taken = traces.len() as u64;
    let mut spans: Vec<SpanData> = traces.drain(..).flatten().collect();
    let count = spans.len() as u64;
    for (i, target) in targets.iter().enumerate() {
        let index = target.kind() as usize;
        // Exporters take the spans by value: only a target before the last gets a copy.
        let batch = if i + 1 < targets.len() {
            spans.clone()
        } else {
            std::mem::take(&mut spans)
        };
        match target.export(batch).await {
            Ok(()) => counters.exported_spans[index].fetch_add(count, Ordering::Relaxed),
            Err(e) => {
                report.failed(target.name(), count, &e);
                counters.failed_spans[index].fetch_add(count, Ordering::Relaxed)
            }
        };
    }
    // Out of the queue once every target had them: what is left at an exit cut short is
    // what was not sent.
    counters.queued.fetch_sub(taken, Ordering::Relaxed);
    counters.queued_spans.fetch_sub(count, Ordering::Relaxed);
}

impl Target {
    fn name(&self) -> &str {
        match self {
            Target::Otlp(_, endpoint) => endpoint,
            Target::Store(..) => "the embedded trace store",
        }
    }

    fn kind(&self) -> TraceTarget {
        match self {
            Target::Otlp(..) => TraceTarget::Otlp,
            Target::Store(..) => TraceTarget::Store,
        }
    }

    async fn export(&self, spans: Vec<SpanData>) -> Result<(), String> {
        match self {
            Target::Otlp(exporter, _) => exporter.export(spans).await.map_err(|e| e.to_string()),
            Target::Store(state, resource) => {
                // Our spans in OTLP's own protobuf, read back as the store's generated
                // types (the same .proto, another prost build).
                let request = ExportTraceServiceRequest {
                    resource_spans: group_spans_by_resource_and_scope(
                        spans,
                        &ResourceAttributesWithSchema::from(resource),
                    ),
                };
                let bytes = request.encode_to_vec();
                let request =
                    otlp_embedded::proto::collector::trace::v1::ExportTraceServiceRequest::decode(
                        bytes.as_slice(),
                    )
                    .map_err(|e| e.to_string())?;
                TraceServiceImpl::new(state.clone())
                    .export(tonic::Request::new(request))
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string())
            }
        }
    }
}

/// Says what failed, once per [`REPORT_EVERY`], with how much since the last report.
#[derive(Default)]
struct FailureReport {
    last: Option<Instant>,
    /// (target, spans, last error) since the last report.
    pending: Vec<(String, u64, String)>,
}

impl FailureReport {
    fn failed(&mut self, target: &str, spans: u64, error: &str) {
        match self.pending.iter_mut().find(|(t, _, _)| t == target) {
            Some(entry) => {
                entry.1 += spans;
                entry.2 = error.to_owned();
            }
            None => self
                .pending
                .push((target.to_owned(), spans, error.to_owned())),
        }
        if self.last.is_none_or(|last| last.elapsed() >= REPORT_EVERY) {
            self.flush();
        }
    }

    fn flush(&mut self) {
        for (target, spans, error) in self.pending.drain(..) {
            log::warn!("trace export to {target} failed, {spans} spans lost (counted): {error}");
        }
        self.last = Some(Instant::now());
    }
}

/// The OTLP/HTTP exporter's client: the reqwest (0.12) brokerprobe already links, on
/// brokerprobe's own runtime.
#[derive(Debug)]
pub struct ReqwestClient(pub reqwest::Client);

#[async_trait]
impl HttpClient for ReqwestClient {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let (parts, body) = request.into_parts();
        let response = self
            .0
            .request(parts.method, parts.uri.to_string())
            .headers(parts.headers)
            .body(body)
            .send()
            .await?;
        let mut out = Response::builder()
            .status(response.status())
            .body(Bytes::new())?;
        *out.headers_mut() = response.headers().clone();
        *out.body_mut() = response.bytes().await?;
        Ok(out)
    }
}
