//! `demo-broker`: a small but realistic LLM broker (routing, key pools, fallback, tool
//! loops, SSE passthrough) that marks every stage with probe-markers.

mod api;
mod chat;
mod ground_truth;
#[cfg(feature = "inprocess")]
mod inprocess;
mod instrument;
mod keypool;
mod recorder;
mod routing;
mod streaming;
mod tools;
mod upstream;

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::{Json, Router};
use clap::Parser;
use fake_upstream::FakeConfig;
use probe_markers::RequestId;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

use crate::ground_truth::{GroundTruthSink, GroundTruthWriter};
use crate::keypool::KeyPools;
use crate::upstream::Upstream;

#[derive(Parser)]
#[command(
    version,
    about = "A demo LLM broker instrumented with brokerprobe's stage markers"
)]
struct Cli {
    /// Address to listen on (port 0 picks a free port; the bound address is printed).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Root URL of the OpenAI-compatible provider API, e.g. http://127.0.0.1:8080.
    #[arg(long, required_unless_present_any = ["fake", "list_models"], conflicts_with = "fake")]
    upstream: Option<String>,
    /// Start the fake upstream in-process (on a free loopback port) and use it.
    #[arg(long)]
    fake: bool,
    /// API keys per provider.
    #[arg(long, default_value = "4")]
    keys: NonZeroUsize,
    /// Concurrent upstream calls each key allows.
    #[arg(long, default_value = "4")]
    per_key_concurrency: NonZeroUsize,
    /// Tokio worker threads.
    #[arg(long, default_value = "2")]
    workers: NonZeroUsize,
    /// Write one JSON line per request with the broker's own CLOCK_MONOTONIC timings.
    #[arg(long, value_name = "FILE")]
    ground_truth: Option<PathBuf>,
    /// Print the routing table and exit.
    #[arg(long)]
    list_models: bool,
    /// Never call the markers: the broker behaves as one without probe-markers (ground
    /// truth is still written).
    #[arg(long)]
    no_markers: bool,
    /// Export in-process spans over OTLP/HTTP to this URL (built with feature inprocess).
    #[cfg(feature = "inprocess")]
    #[arg(long, value_name = "URL")]
    inprocess_otlp: String,
}

/// What every request handler shares.
pub struct App {
    upstream: Upstream,
    keys: KeyPools,
    ground_truth: Option<GroundTruthSink>,
}

fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    if cli.list_models {
        print_routes();
        return Ok(());
    }
    if cli.no_markers {
        recorder::disable_markers();
    }
    instrument::register();
    let writer = match &cli.ground_truth {
        Some(path) => Some(
            GroundTruthWriter::create(path)
                .with_context(|| format!("creating {}", path.display()))?,
        ),
        None => None,
    };
    #[cfg(feature = "inprocess")]
    let _provider = inprocess::init(&cli.inprocess_otlp)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.workers.get())
        .thread_name("broker-worker")
        .enable_all()
        .build()?;
    let served = runtime.block_on(serve(
        &cli,
        writer.as_ref().map(|writer| writer.sink().clone()),
    ));
    // Cancels the tasks still running (the in-process fake, abandoned streams), whose
    // requests record their end before the writer closes.
    drop(runtime);
    if let Some(writer) = writer {
        writer.close().context("writing the ground truth")?;
    }
    served
}

fn print_routes() {
    println!("{:<12} {:<10} FALLBACK", "MODEL", "PROVIDER");
    for route in routing::ROUTES {
        println!(
            "{:<12} {:<10} {}",
            route.model,
            route.provider,
            route.fallback.unwrap_or("-")
        );
    }
}

async fn serve(cli: &Cli, ground_truth: Option<GroundTruthSink>) -> anyhow::Result<()> {
    let upstream_url = match &cli.upstream {
        Some(url) => url.clone(),
        None => start_fake_upstream().await?,
    };
    let app = Arc::new(App {
        upstream: Upstream::new(&upstream_url)?,
        keys: KeyPools::new(
            routing::providers(),
            cli.keys.get(),
            cli.per_key_concurrency.get(),
        ),
        ground_truth,
    });
    let router = Router::new()
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/models", get(list_models))
        .route("/health", get(health));
    #[cfg(feature = "inprocess")]
    let router = inprocess::routes(router);
    let router = router
        .layer(middleware::from_fn(assign_request_id))
        .with_state(app);
    // Handlers go in before "listening on" is printed, so a signal sent right after it
    // still shuts down gracefully.
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let listener = fake_upstream::bind_announced(cli.listen).await?;
    let shutdown = async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
    };
    // Stream chunks go out as they come instead of waiting on delayed ACKs.
    let listener = listener.tap_io(|tcp| {
        if let Err(err) = tcp.set_nodelay(true) {
            log::debug!("cannot set TCP_NODELAY: {err}");
        }
    });
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}

/// Serves the fake provider on a free loopback port; returns its root URL.
async fn start_fake_upstream() -> anyhow::Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move {
        if let Err(err) = fake_upstream::serve(listener, FakeConfig::demo()).await {
            log::error!("fake upstream stopped: {err:#}");
        }
    });
    Ok(url)
}

/// Gives every request an id (also used by its markers) and answers it in `x-request-id`.
async fn assign_request_id(mut request: Request, next: Next) -> Response {
    let id = RequestId::next();
    request.extensions_mut().insert(id);
    let mut response = next.run(request).await;
    response
        .headers_mut()
        .insert("x-request-id", HeaderValue::from(id.get()));
    response
}

async fn list_models() -> Json<Value> {
    let data: Vec<Value> = routing::ROUTES
        .iter()
        .map(|route| json!({"id": route.model, "object": "model", "created": 0, "owned_by": route.provider}))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}
