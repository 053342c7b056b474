//! `trace-store`: otlp-embedded's in-memory trace store with its Jaeger UI and query API
//! (`/api/traces`), receiving OTLP over gRPC (its own service) and over HTTP/protobuf
//! (`POST /v1/traces`, gzip or not, decoded here into the same service).

use std::net::SocketAddr;

use anyhow::Context as _;
use std::io::Read as _;

use axum::{
    Router,
    body::Bytes,
    extract::State as Extract,
    http::{HeaderMap, StatusCode, header},
    routing::post,
};
use clap::Parser;
use flate2::read::GzDecoder;
use otlp_embedded::{
    Config, State, StateRef, TraceService as _, TraceServiceImpl, TraceServiceServer,
    proto::collector::trace::v1::ExportTraceServiceRequest, ui_app,
};
use prost::Message as _;
use tokio::net::TcpListener;

#[derive(Parser)]
#[command(
    version,
    about = "In-memory OTLP trace store with Jaeger's query API, for tests"
)]
struct Cli {
    /// OTLP/gRPC listen address (port 0 picks one; the bound address is printed).
    #[arg(long, default_value = "127.0.0.1:0")]
    grpc: SocketAddr,
    /// OTLP/HTTP listen address (POST /v1/traces, application/x-protobuf).
    #[arg(long, default_value = "127.0.0.1:0")]
    http: SocketAddr,
    /// Jaeger UI and query API listen address.
    #[arg(long, default_value = "127.0.0.1:0")]
    ui: SocketAddr,
    /// Traces kept at most (the oldest go first).
    #[arg(long, default_value_t = 100_000)]
    max_traces: u32,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let state = State::new(Config {
        max_length: cli.max_traces,
        max_memory_usage: 1 << 30,
    });
    let grpc = TcpListener::bind(cli.grpc)
        .await
        .context("binding --grpc")?;
    let http = TcpListener::bind(cli.http)
        .await
        .context("binding --http")?;
    let ui = TcpListener::bind(cli.ui).await.context("binding --ui")?;
    // The lines tests wait for.
    println!("grpc on {}", grpc.local_addr()?);
    println!("http on {}", http.local_addr()?);
    println!("listening on {}", ui.local_addr()?);

    let ui_server = axum::serve(ui, ui_app(state.clone(), "/"));
    let http_app = Router::new()
        .route("/v1/traces", post(export_http))
        .with_state(state.clone());
    let http_server = axum::serve(http, http_app);
    let grpc_server = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(TraceServiceImpl::new(state)))
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(grpc));
    tokio::select! {
        r = ui_server => r.context("UI server")?,
        r = http_server => r.context("OTLP/HTTP server")?,
        r = grpc_server => r.context("OTLP/gRPC server")?,
    }
    Ok(())
}

/// OTLP/HTTP with a protobuf body, gzipped or not: the same request the gRPC service
/// takes.
async fn export_http(
    Extract(state): Extract<StateRef>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let gzipped = headers
        .get(header::CONTENT_ENCODING)
        .is_some_and(|encoding| encoding == "gzip");
    let body = if gzipped {
        let mut plain = Vec::new();
        if GzDecoder::new(&body[..]).read_to_end(&mut plain).is_err() {
            return StatusCode::BAD_REQUEST;
        }
        Bytes::from(plain)
    } else {
        body
    };
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        return StatusCode::BAD_REQUEST;
    };
    match TraceServiceImpl::new(state)
        .export(tonic::Request::new(request))
        .await
    {
        Ok(_) => StatusCode::OK,
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}
