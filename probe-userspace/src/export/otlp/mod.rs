//! OpenTelemetry traces (docs/spans.md): one trace per broker request, exported over OTLP
//! and/or kept in an embedded store with a Jaeger UI. Requests are sampled when they end
//! ([`sampling`]), wait briefly for the socket figures of their upstream calls, become
//! spans ([`spans`]) and go through a bounded queue to the export thread ([`sender`]),
//! which has its own runtime: exports, the store and its UI never hold up the event loop.

mod sampling;
mod sender;
mod spans;
mod store;

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow};
use foldhash::{HashMap, HashMapExt as _, HashSet, HashSetExt as _};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::{
    Resource,
    trace::{RandomIdGenerator, SpanData, SpanExporter as _},
};
use tokio::sync::{mpsc, oneshot};

pub use sampling::Sampling;
pub use sender::{TraceCounters, TraceTarget};

use self::{
    sampling::Verdict,
    sender::{ReqwestClient, Target},
    spans::{CallFacts, SpanBuilder, TraceStart},
};
use super::{ExchangeSink, labels::LabelCap};
use crate::{assembly::Request, clock::Clock, connections::Exchange, procnet::Role};

/// OTLP transports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    HttpProtobuf,
    Grpc,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::HttpProtobuf => "http/protobuf",
            Protocol::Grpc => "grpc",
        }
    }

    fn parse(name: &str) -> Option<Self> {
        [Protocol::HttpProtobuf, Protocol::Grpc]
            .into_iter()
            .find(|p| p.name() == name)
    }

    /// The transport: `flag`, else OTEL_EXPORTER_OTLP_TRACES_PROTOCOL, else
    /// OTEL_EXPORTER_OTLP_PROTOCOL, else http/protobuf.
    pub fn resolve(flag: Option<&str>) -> Result<Self, String> {
        let (name, from) = match flag {
            Some(name) => (name.to_owned(), "--otlp-protocol"),
            None => match env_var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") {
                Some(name) => (name, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"),
                None => match env_var("OTEL_EXPORTER_OTLP_PROTOCOL") {
                    Some(name) => (name, "OTEL_EXPORTER_OTLP_PROTOCOL"),
                    None => return Ok(Protocol::HttpProtobuf),
                },
            },
        };
        Protocol::parse(&name)
            .ok_or_else(|| format!("{from}={name}: brokerprobe exports http/protobuf or grpc"))
    }

    /// The traces URL: `flag` or the environment, as OTel SDKs read it. The traces
    /// variable is used as given; the general one, and a flag URL without a path, get
    /// `/v1/traces` for http/protobuf.
    pub fn endpoint(self, flag: Option<&str>) -> Option<String> {
        let with_path = |base: &str| match self {
            Protocol::HttpProtobuf => format!("{}/v1/traces", base.trim_end_matches('/')),
            Protocol::Grpc => base.to_owned(),
        };
        match flag {
            Some(url) if url_has_path(url) => Some(url.to_owned()),
            Some(url) => Some(with_path(url)),
            None => env_var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                .or_else(|| env_var("OTEL_EXPORTER_OTLP_ENDPOINT").map(|base| with_path(&base))),
        }
    }
}

fn url_has_path(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    rest.split_once('/')
        .is_some_and(|(_, path)| !path.is_empty())
}

/// A set, non-empty environment variable (OTel: empty means unset).
pub fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// `--otlp-*`, `--trace-*` (and the OTEL_* variables they stand for).
pub struct TracesConfig {
    /// The full OTLP traces URL; None: no OTLP export (the embedded store only).
    pub endpoint: Option<String>,
    pub protocol: Protocol,
    /// Deadline of one export call, retries included.
    pub timeout: Duration,
    /// `service.name`; None: OTEL_RESOURCE_ATTRIBUTES' if it has one, else the broker's
    /// process name.
    pub service_name: Option<String>,
    pub sampling: Sampling,
    /// Traces waiting for export before new ones are dropped (counted).
    pub queue: usize,
    /// Serve the embedded trace store's Jaeger UI and API here.
    pub ui: Option<SocketAddr>,
    /// How long a finished request waits for its upstream exchanges to end, for their
    /// socket figures (they end at the connection's next request, close, or idle timeout).
    pub wait_for_sockets: Duration,
    /// Distinct model names in span names (`chat {model}`) before `other`.
    pub max_names: usize,
}

/// Figures for the probe's health.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceHealth {
    pub sampled_head: u64,
    pub sampled_tail: u64,
    pub sampled_out: u64,
    /// Traces sent without the socket figures of some upstream call (they did not come
    /// in time, or too many requests were waiting).
    pub without_sockets: u64,
    pub queued: u64,
    /// By [`TraceTarget`].
    pub exported_spans: [u64; 2],
    pub failed_spans: [u64; 2],
    /// Spans of traces the full queue refused.
    pub dropped_spans: u64,
    /// Spans still queued when the flush at exit ran out of time.
    pub unsent_spans: u64,
}

/// Socket figures of exchanges that ended before their request, kept at most this many.
const MAX_EARLY_FACTS: usize = 4_096;

/// Requests waiting for socket figures at most; past it they go without (counted).
const MAX_WAITING: usize = 16_384;

/// A sampled request waiting for the socket figures of its upstream calls.
struct Waiting {
    request: Request,
    start: TraceStart,
    facts: HashMap<u64, CallFacts>,
    missing: HashSet<u64>,
    since: Instant,
}

pub struct TraceExporter {
    sampling: Sampling,
    clock: Clock,
    ids: RandomIdGenerator,
    scope: InstrumentationScope,
    span_models: LabelCap,
    queue: Option<mpsc::Sender<Vec<SpanData>>>,
    /// Fires when the export thread has sent everything and stopped.
    done: Option<oneshot::Receiver<()>>,
    counters: Arc<TraceCounters>,
    health: TraceHealth,
    waiting: HashMap<(u32, u64), Waiting>,
    /// Exchange id → the waiting request it completes.
    waiting_for: HashMap<u64, (u32, u64)>,
    early: HashMap<u64, CallFacts>,
    early_order: VecDeque<u64>,
    wait: Duration,
    /// Where traces go, for the attach message.
    pub destinations: Vec<String>,
}

impl TraceExporter {
    /// Builds the exporters and the trace UI on their own thread and runtime; fails on a
    /// bad endpoint or a taken UI address, before anything is attached.
    pub fn start(config: TracesConfig, process_name: &str) -> Result<Self> {
        let resource = resource(config.service_name.as_deref(), process_name);
        let (queue, receiver) = mpsc::channel(config.queue);
        let counters = Arc::new(TraceCounters::default());
        let (ready, started) = std::sync::mpsc::channel();
        let (done_tx, done) = oneshot::channel();
        let thread_counters = counters.clone();
        let (endpoint, protocol, timeout, ui) = (
            config.endpoint.clone(),
            config.protocol,
            config.timeout,
            config.ui,
        );
        std::thread::Builder::new()
            .name("brokerprobe-traces".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => return drop(ready.send(Err(anyhow!(e)))),
                };
                runtime.block_on(async move {
                    match targets(endpoint, protocol, timeout, ui, resource).await {
                        Ok((targets, destinations)) => {
                            let _ = ready.send(Ok(destinations));
                            sender::run(receiver, targets, thread_counters).await;
                        }
                        Err(e) => drop(ready.send(Err(e))),
                    }
                });
                let _ = done_tx.send(());
            })
            .context("starting the trace export thread")?;
        let destinations = started
            .recv()
            .context("the trace export thread stopped while starting")??;
        Ok(Self {
            sampling: config.sampling,
            clock: Clock::now(),
            ids: RandomIdGenerator::default(),
            scope: InstrumentationScope::builder("brokerprobe")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
            span_models: LabelCap::new(config.max_names),
            queue: Some(queue),
            done: Some(done),
            counters,
            health: TraceHealth::default(),
            waiting: HashMap::new(),
            waiting_for: HashMap::new(),
            early: HashMap::new(),
            early_order: VecDeque::new(),
            wait: config.wait_for_sockets,
            destinations,
        })
    }

    pub fn health(&self) -> TraceHealth {
        let c = &self.counters;
        let target = |counts: &[std::sync::atomic::AtomicU64; 2]| {
            [0, 1].map(|i| counts[i].load(Ordering::Relaxed))
        };
        TraceHealth {
            queued: c.queued.load(Ordering::Relaxed),
            exported_spans: target(&c.exported_spans),
            failed_spans: target(&c.failed_spans),
            ..self.health
        }
    }

    /// Each second: re-reads the wall clock (a step of it shifts later traces, never one
    /// trace's spans against each other), and sends the requests that waited long enough
    /// for their socket figures.
    pub fn tick(&mut self) {
        self.clock = Clock::now();
        let due: Vec<(u32, u64)> = self
            .waiting
            .iter()
            .filter(|(_, w)| w.since.elapsed() >= self.wait)
            .map(|(key, _)| *key)
            .collect();
        for key in due {
            self.send_waiting(key);
        }
    }

    /// Sends everything still waiting, then lets the export thread empty the queue, for
    /// `deadline` at most (Ctrl-C, SIGTERM, end of run; a second signal cuts it short).
    pub async fn finish(&mut self, deadline: Duration) {
        let keys: Vec<(u32, u64)> = self.waiting.keys().copied().collect();
        for key in keys {
            self.send_waiting(key);
        }
        drop(self.queue.take());
        let Some(done) = self.done.take() else {
            return;
        };
        let mut interrupt =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).ok();
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let again = async {
            match (&mut interrupt, &mut terminate) {
                (Some(i), Some(t)) => {
                    tokio::select! {
                        _ = i.recv() => {}
                        _ = t.recv() => {}
                    }
                }
                _ => std::future::pending().await,
            }
        };
        let finished = tokio::select! {
            r = tokio::time::timeout(deadline, done) => r.is_ok(),
            () = again => false,
        };
        if !finished {
            let unsent = self.counters.queued_spans.load(Ordering::Relaxed);
            self.health.unsent_spans += unsent;
            log::warn!(
                "trace export stopped before it was done: {unsent} spans not sent (counted)"
            );
        }
    }

    fn send_waiting(&mut self, key: (u32, u64)) {
        let Some(waiting) = self.waiting.remove(&key) else {
            return;
        };
        for id in &waiting.missing {
            self.waiting_for.remove(id);
        }
        if !waiting.missing.is_empty() {
            self.health.without_sockets += 1;
        }
        self.send(&waiting.request, &waiting.start, &waiting.facts);
    }

    fn send(&mut self, request: &Request, start: &TraceStart, facts: &HashMap<u64, CallFacts>) {
        let builder = SpanBuilder {
            clock: &self.clock,
            ids: &self.ids,
            scope: &self.scope,
        };
        let spans = builder.spans(request, start, facts, &mut self.span_models);
        let count = spans.len() as u64;
        let Some(queue) = &self.queue else {
            self.health.unsent_spans += count;
            return;
        };
        match queue.try_send(spans) {
            Ok(()) => {
                self.counters.queued.fetch_add(1, Ordering::Relaxed);
                self.counters
                    .queued_spans
                    .fetch_add(count, Ordering::Relaxed);
            }
            Err(mpsc::error::TrySendError::Full(_)) => self.health.dropped_spans += count,
            Err(mpsc::error::TrySendError::Closed(_)) => self.health.unsent_spans += count,
        }
    }
}

impl TraceExporter {
    /// Samples the request and sends (or holds) its trace; the trace id (hex) when kept,
    /// for the report to point at.
    pub fn record(&mut self, request: &Request) -> Option<String> {
        let (start, verdict) = self.sampling.decide(request, &self.ids);
        match verdict {
            Verdict::Head => self.health.sampled_head += 1,
            Verdict::Tail => self.health.sampled_tail += 1,
            Verdict::Dropped => {
                self.health.sampled_out += 1;
                return None;
            }
        }
        let mut facts = HashMap::new();
        let mut missing = HashSet::new();
        for call in &request.upstream_calls {
            match self.early.remove(&call.exchange_id) {
                Some(f) => {
                    facts.insert(call.exchange_id, f);
                }
                None => {
                    missing.insert(call.exchange_id);
                }
            }
        }
        let trace_id = Some(start.trace_id.to_string());
        if missing.is_empty() {
            self.send(request, &start, &facts);
            return trace_id;
        }
        if self.waiting.len() >= MAX_WAITING {
            self.health.without_sockets += 1;
            self.send(request, &start, &facts);
            return trace_id;
        }
        let key = (request.pid, request.request_id);
        for id in &missing {
            self.waiting_for.insert(*id, key);
        }
        let waiting = Waiting {
            request: request.clone(),
            start,
            facts,
            missing,
            since: Instant::now(),
        };
        self.waiting.insert(key, waiting);
        trace_id
    }
}

impl ExchangeSink for TraceExporter {
    fn record_exchange(&mut self, exchange: &Exchange) {
        if exchange.role != Role::Upstream || exchange.request_id.is_none() {
            return;
        }
        let facts = CallFacts::of(exchange);
        let Some(key) = self.waiting_for.remove(&exchange.id) else {
            // Its request has not ended yet (or was not sampled): keep the figures a while.
            if self.early_order.len() == MAX_EARLY_FACTS {
                if let Some(oldest) = self.early_order.pop_front() {
                    self.early.remove(&oldest);
                }
            }
            self.early.insert(exchange.id, facts);
            self.early_order.push_back(exchange.id);
            return;
        };
        let complete = self.waiting.get_mut(&key).is_some_and(|waiting| {
            waiting.facts.insert(exchange.id, facts);
            waiting.missing.remove(&exchange.id);
            waiting.missing.is_empty()
        });
        if complete {
            self.send_waiting(key);
        }
    }
}

/// The OTLP exporter and the trace UI, built on the export thread's runtime (the gRPC
/// exporter spawns its connection task there); with what to tell the user.
async fn targets(
    endpoint: Option<String>,
    protocol: Protocol,
    timeout: Duration,
    ui: Option<SocketAddr>,
    resource: Resource,
) -> Result<(Vec<Target>, Vec<String>)> {
    let mut targets = Vec::new();
    let mut destinations = Vec::new();
    if let Some(endpoint) = endpoint {
        let mut exporter = otlp_exporter(&endpoint, protocol, timeout)?;
        exporter.set_resource(&resource);
        destinations.push(format!("{endpoint} ({})", protocol.name()));
        targets.push(Target::Otlp(Box::new(exporter), endpoint));
    }
    if let Some(addr) = ui {
        let (state, url) = store::serve(addr).await?;
        destinations.push(format!("the trace UI on {url}"));
        targets.push(Target::Store(state, resource));
    }
    Ok((targets, destinations))
}

/// The resource every span shares: service (flag or OTEL_SERVICE_NAME, else
/// OTEL_RESOURCE_ATTRIBUTES', else the broker's process name), its host and executable
/// (unless OTEL_RESOURCE_ATTRIBUTES says otherwise). One brokerprobe may follow several
/// processes of the broker: each request span names its own (`process.pid`).
fn resource(service_name: Option<&str>, process_name: &str) -> Resource {
    let given: Vec<String> = env_var("OTEL_RESOURCE_ATTRIBUTES")
        .map(|attributes| {
            attributes
                .split(',')
                .filter_map(|kv| kv.split_once('='))
                .map(|(key, _)| key.trim().to_owned())
                .collect()
        })
        .unwrap_or_default();
    let gives = |key: &str| given.iter().any(|k| k == key);
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let ours = [
        KeyValue::new("host.name", host.trim().to_owned()),
        KeyValue::new("process.executable.name", process_name.to_owned()),
    ];
    // Detectors read OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; ours only fill gaps.
    let mut builder =
        Resource::builder().with_attributes(ours.into_iter().filter(|kv| !gives(kv.key.as_str())));
    match service_name {
        Some(name) => builder = builder.with_service_name(name.to_owned()),
        None if !gives("service.name") => {
            builder = builder.with_service_name(process_name.to_owned())
        }
        None => {}
    }
    builder.build()
}

fn otlp_exporter(
    endpoint: &str,
    protocol: Protocol,
    timeout: Duration,
) -> Result<opentelemetry_otlp::SpanExporter> {
    let built = match protocol {
        Protocol::HttpProtobuf => {
            // HTTP(S)_PROXY are honoured, as SDKs do.
            let client = reqwest::Client::builder()
                .timeout(timeout)
                .build()
                .context("building the OTLP/HTTP client")?;
            opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_http_client(ReqwestClient(client))
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_endpoint(endpoint)
                .with_timeout(timeout)
                .build()
        }
        Protocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_protocol(opentelemetry_otlp::Protocol::Grpc)
            .with_endpoint(endpoint)
            .with_timeout(timeout)
            .build(),
    };
    built.with_context(|| format!("OTLP endpoint {endpoint}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flag_url_without_a_path_gets_the_traces_path_for_http() {
        let http = Protocol::HttpProtobuf;
        assert_eq!(
            http.endpoint(Some("http://collector:4318")).as_deref(),
            Some("http://collector:4318/v1/traces")
        );
        assert_eq!(
            http.endpoint(Some("http://collector:4318/")).as_deref(),
            Some("http://collector:4318/v1/traces")
        );
        assert_eq!(
            http.endpoint(Some("https://c/otlp/v1/traces")).as_deref(),
            Some("https://c/otlp/v1/traces")
        );
        assert_eq!(
            Protocol::Grpc
                .endpoint(Some("http://collector:4317"))
                .as_deref(),
            Some("http://collector:4317")
        );
    }
}
