//! Variant D of `cargo xtask bench` (feature `inprocess`): the demo broker instrumented
//! the usual in-process way, so brokerprobe's overhead can be set against it: a `tracing`
//! span per request and per stage exported by the OpenTelemetry SDK (batch processor,
//! OTLP/HTTP), and a Prometheus registry with per-stage and per-request histograms,
//! served on `/metrics`.

use std::sync::OnceLock;
use std::time::Instant;

use axum::routing::get;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::{Resource, trace::SdkTracerProvider};
use prometheus::{Encoder as _, HistogramOpts, HistogramVec, Registry, TextEncoder};
use tracing_subscriber::layer::SubscriberExt as _;

struct Metrics {
    registry: Registry,
    stage: HistogramVec,
    request: HistogramVec,
}

static METRICS: OnceLock<Metrics> = OnceLock::new();

/// Sets up tracing → OTLP at `endpoint` (http/protobuf) and the registry; keep the
/// provider until exit (dropping it flushes).
pub fn init(endpoint: &str) -> anyhow::Result<SdkTracerProvider> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(endpoint)
        .build()?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(Resource::builder().with_service_name("demo-broker").build())
        .build();
    let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("demo-broker"));
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer))?;
    let registry = Registry::new();
    let buckets = prometheus::exponential_buckets(0.000_05, 2.5, 20)?;
    let stage = HistogramVec::new(
        HistogramOpts::new("broker_stage_duration_seconds", "Broker stage duration.")
            .buckets(buckets.clone()),
        &["stage", "model"],
    )?;
    let request = HistogramVec::new(
        HistogramOpts::new(
            "broker_request_duration_seconds",
            "Broker request duration.",
        )
        .buckets(buckets),
        &["model", "status"],
    )?;
    registry.register(Box::new(stage.clone()))?;
    registry.register(Box::new(request.clone()))?;
    let _ = METRICS.set(Metrics {
        registry,
        stage,
        request,
    });
    Ok(provider)
}

/// `GET /metrics` on the broker's own router.
pub fn routes<S: Clone + Send + Sync + 'static>(router: axum::Router<S>) -> axum::Router<S> {
    router.route(
        "/metrics",
        get(|| async {
            let mut out = Vec::new();
            if let Some(metrics) = METRICS.get() {
                let _ = TextEncoder::new().encode(&metrics.registry.gather(), &mut out);
            }
            String::from_utf8(out).unwrap_or_default()
        }),
    )
}

/// A request's span and clock.
#[derive(Clone)]
pub struct RequestSpan {
    span: tracing::Span,
    model: String,
    started: Instant,
}

impl RequestSpan {
    pub fn begin(model: &str) -> Self {
        Self {
            span: tracing::info_span!(
                "request",
                otel.name = "POST /v1/chat/completions",
                gen_ai.request.model = model,
                http.response.status_code = tracing::field::Empty
            ),
            model: model.to_owned(),
            started: Instant::now(),
        }
    }

    pub fn stage(&self, name: &'static str) -> StageSpan {
        StageSpan {
            _span: tracing::info_span!(parent: &self.span, "stage", otel.name = name),
            name,
            model: self.model.clone(),
            started: Instant::now(),
        }
    }

    pub fn end(&self, status: u16) {
        self.span.record("http.response.status_code", status);
        if let Some(metrics) = METRICS.get() {
            metrics
                .request
                .with_label_values(&[&self.model, &status.to_string()])
                .observe(self.started.elapsed().as_secs_f64());
        }
    }
}

/// A stage's span (ends when dropped) and its histogram observation.
pub struct StageSpan {
    _span: tracing::Span,
    name: &'static str,
    model: String,
    started: Instant,
}

impl Drop for StageSpan {
    fn drop(&mut self) {
        if let Some(metrics) = METRICS.get() {
            metrics
                .stage
                .with_label_values(&[self.name, &self.model])
                .observe(self.started.elapsed().as_secs_f64());
        }
    }
}
