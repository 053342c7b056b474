//! OpenTelemetry traces (docs/spans.md): one trace per broker request, exported over OTLP
//! and/or kept in an embedded store with a Jaeger UI. Requests are sampled when they end
//! ([`sampling`]), wait briefly for the socket figures of their upstream calls, become
//! spans ([`spans`]) and go through a bounded queue to the export task ([`sender`]).

mod sampling;
mod sender;
mod spans;
mod store;

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::{
    Resource,
    trace::{RandomIdGenerator, SpanData, SpanExporter as _},
};
use tokio::{sync::mpsc, task::JoinHandle};

pub use sampling::Sampling;
pub use sender::TraceCounters;

use self::{
    sampling::Verdict,
    sender::{ReqwestClient, Target},
    spans::{CallFacts, SpanBuilder, TraceStart},
};
use super::{ExchangeSink, RequestSink};
use crate::{assembly::Request, clock::Clock, connections::Exchange, procnet::Role};

/// OTLP transports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    HttpProtobuf,
    Grpc,
}

/// `--otlp-*`, `--trace-*` (and the OTEL_* variables they stand for).
pub struct TracesConfig {
    /// The full OTLP traces URL (`http://host:4318/v1/traces`, `http://host:4317`); None:
    /// no OTLP export (the embedded store only).
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
}

impl Protocol {
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
        match name.as_str() {
            "http/protobuf" => Ok(Protocol::HttpProtobuf),
            "grpc" => Ok(Protocol::Grpc),
            other => Err(format!(
                "{from}={other}: brokerprobe exports http/protobuf or grpc"
            )),
        }
    }

    /// The endpoint from the environment, as OTel SDKs read it: the traces-specific
    /// variable as given, the general one with `/v1/traces` added for http/protobuf.
    pub fn endpoint_from_env(self) -> Option<String> {
        if let Some(url) = env_var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
            return Some(url);
        }
        let base = env_var("OTEL_EXPORTER_OTLP_ENDPOINT")?;
        Some(match self {
            Protocol::HttpProtobuf => format!("{}/v1/traces", base.trim_end_matches('/')),
            Protocol::Grpc => base,
        })
    }
}

/// A set, non-empty environment variable.
fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// Traces sampled, by verdict.
#[derive(Debug, Default)]
pub struct SamplingCounts {
    pub head: AtomicU64,
    pub tail: AtomicU64,
    pub dropped: AtomicU64,
}

/// Figures for the probe's health.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceHealth {
    pub sampled_head: u64,
    pub sampled_tail: u64,
    pub sampled_out: u64,
    pub queued: u64,
    pub exported_spans: u64,
    pub dropped_spans: u64,
    pub failed_spans: u64,
}

/// Socket figures of exchanges that ended before their request, kept at most this many.
const MAX_EARLY_FACTS: usize = 4_096;

/// A sampled request waiting for the socket figures of its upstream calls.
struct Waiting {
    request: Request,
    start: TraceStart,
    facts: HashMap<u64, CallFacts>,
    missing: usize,
    since: Instant,
}

pub struct TraceExporter {
    sampling: Sampling,
    clock: Clock,
    ids: RandomIdGenerator,
    scope: InstrumentationScope,
    queue: Option<mpsc::Sender<Vec<SpanData>>>,
    task: Option<JoinHandle<()>>,
    counters: Arc<TraceCounters>,
    sampled: SamplingCounts,
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
    /// Builds the exporters and starts the export task (and the trace UI); fails on a bad
    /// endpoint or a taken UI address. `process_name` is the default `service.name`.
    pub async fn start(config: TracesConfig, pid: u32, process_name: &str) -> Result<Self> {
        let resource = resource(config.service_name.as_deref(), pid, process_name);
        let mut targets = Vec::new();
        let mut destinations = Vec::new();
        if let Some(endpoint) = &config.endpoint {
            let mut exporter = otlp_exporter(endpoint, config.protocol, config.timeout)?;
            exporter.set_resource(&resource);
            destinations.push(format!(
                "{endpoint} ({})",
                match config.protocol {
                    Protocol::HttpProtobuf => "http/protobuf",
                    Protocol::Grpc => "grpc",
                }
            ));
            targets.push(Target::Otlp {
                exporter: Box::new(exporter),
                endpoint: endpoint.clone(),
            });
        }
        if let Some(addr) = config.ui {
            let (state, url) = store::serve(addr).await?;
            destinations.push(format!("the trace UI on {url}"));
            targets.push(Target::Store {
                state,
                resource: resource.clone(),
            });
        }
        let (queue, receiver) = mpsc::channel(config.queue.max(1));
        let counters = Arc::new(TraceCounters::default());
        let task = tokio::spawn(sender::run(receiver, targets, counters.clone()));
        Ok(Self {
            sampling: config.sampling,
            clock: Clock::now(),
            ids: RandomIdGenerator::default(),
            scope: InstrumentationScope::builder("brokerprobe")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
            queue: Some(queue),
            task: Some(task),
            counters,
            sampled: SamplingCounts::default(),
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
        TraceHealth {
            sampled_head: self.sampled.head.load(Ordering::Relaxed),
            sampled_tail: self.sampled.tail.load(Ordering::Relaxed),
            sampled_out: self.sampled.dropped.load(Ordering::Relaxed),
            queued: c.queued.load(Ordering::Relaxed),
            exported_spans: c.exported_spans.load(Ordering::Relaxed),
            dropped_spans: c.dropped_spans.load(Ordering::Relaxed),
            failed_spans: c.failed_spans.load(Ordering::Relaxed),
        }
    }

    /// Sends the requests that waited long enough for their socket figures.
    pub fn tick(&mut self) {
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

    /// Sends everything still waiting, then lets the export task empty the queue, for
    /// `deadline` at most (Ctrl-C, SIGTERM, end of run).
    pub async fn finish(&mut self, deadline: Duration) {
        let keys: Vec<(u32, u64)> = self.waiting.keys().copied().collect();
        for key in keys {
            self.send_waiting(key);
        }
        drop(self.queue.take());
        if let Some(task) = self.task.take() {
            if tokio::time::timeout(deadline, task).await.is_err() {
                let lost = self.counters.queued.load(Ordering::Relaxed);
                log::warn!(
                    "trace export did not finish within {deadline:?}: {lost} traces not sent"
                );
            }
        }
    }

    fn send_waiting(&mut self, key: (u32, u64)) {
        if let Some(waiting) = self.waiting.remove(&key) {
            for id in waiting.facts.keys() {
                self.waiting_for.remove(id);
            }
            self.waiting_for.retain(|_, k| *k != key);
            self.send(&waiting.request, &waiting.start, &waiting.facts);
        }
    }

    fn send(&self, request: &Request, start: &TraceStart, facts: &HashMap<u64, CallFacts>) {
        let builder = SpanBuilder {
            clock: &self.clock,
            ids: &self.ids,
            scope: &self.scope,
        };
        let spans = builder.spans(request, start, facts);
        let count = spans.len() as u64;
        let Some(queue) = &self.queue else {
            return;
        };
        match queue.try_send(spans) {
            Ok(()) => {
                self.counters.queued.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                self.counters
                    .dropped_spans
                    .fetch_add(count, Ordering::Relaxed);
            }
        }
    }
}

impl RequestSink for TraceExporter {
    fn record(&mut self, request: &Request) {
        let (start, verdict) = self.sampling.decide(request, &self.ids);
        let counter = match verdict {
            Verdict::Head => &self.sampled.head,
            Verdict::Tail => &self.sampled.tail,
            Verdict::Dropped => &self.sampled.dropped,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if verdict == Verdict::Dropped {
            return;
        }
        let mut facts = HashMap::new();
        let mut missing = Vec::new();
        for call in &request.upstream_calls {
            match self.early.remove(&call.exchange_id) {
                Some(f) => {
                    facts.insert(call.exchange_id, f);
                }
                None => missing.push(call.exchange_id),
            }
        }
        if missing.is_empty() {
            self.send(request, &start, &facts);
            return;
        }
        let key = (request.pid, request.request_id);
        for id in &missing {
            self.waiting_for.insert(*id, key);
        }
        let waiting = Waiting {
            request: request.clone(),
            start,
            facts,
            missing: missing.len(),
            since: Instant::now(),
        };
        self.waiting.insert(key, waiting);
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
            waiting.missing -= 1;
            waiting.missing == 0
        });
        if complete {
            self.send_waiting(key);
        }
    }
}

/// The resource every span shares: service (flag or OTEL_SERVICE_NAME, else
/// OTEL_RESOURCE_ATTRIBUTES', else the broker's process name), its instance and process.
fn resource(service_name: Option<&str>, pid: u32, process_name: &str) -> Resource {
    let from_attributes = std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|attributes| {
        attributes
            .split(',')
            .any(|kv| kv.trim().starts_with("service.name="))
    });
    let mut builder = Resource::builder();
    match service_name {
        Some(name) => builder = builder.with_service_name(name.to_owned()),
        None if !from_attributes => builder = builder.with_service_name(process_name.to_owned()),
        None => {}
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    builder
        .with_attributes([
            KeyValue::new("service.instance.id", format!("{}:{pid}", host.trim())),
            KeyValue::new("process.pid", i64::from(pid)),
            KeyValue::new("process.executable.name", process_name.to_owned()),
        ])
        .build()
}

fn otlp_exporter(
    endpoint: &str,
    protocol: Protocol,
    timeout: Duration,
) -> Result<opentelemetry_otlp::SpanExporter> {
    let built = match protocol {
        Protocol::HttpProtobuf => {
            let client = reqwest::Client::builder()
                .no_proxy()
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
