//! The HTTP endpoints: `/metrics` for Prometheus, `/stats` (JSON quantiles) for people
//! and scripts.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use axum::{Json, Router, http::header, response::IntoResponse, routing::get, serve::Listener};
use prometheus::{Encoder as _, Registry, TextEncoder};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tokio_io_timeout::TimeoutStream;

use crate::export::summary::{SharedSummary, lock};

/// Serves `/metrics` from `registry` and `/stats` from `summary` until the task is dropped.
pub async fn serve(
    listener: TcpListener,
    registry: Registry,
    summary: SharedSummary,
) -> std::io::Result<()> {
    let metrics = move || {
        let registry = registry.clone();
        async move {
            (
                [(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
                render(&registry),
            )
                .into_response()
        }
    };
    let stats = move || {
        let summary = summary.clone();
        async move {
            let value = serde_json::to_value(lock(&summary).stats())
                .expect("stats are plain numbers and strings");
            Json(value)
        }
    };
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/stats", get(stats));
    let listener = BoundedListener {
        listener,
        permits: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
    };
    axum::serve(listener, app).await
}

/// Connections served at once; more wait in the kernel's listen backlog. With
/// [`IDLE_TIMEOUT`], this bounds what scrapers that stall (never finish a request, never
/// read the answer) can hold of brokerprobe's memory.
const MAX_CONNECTIONS: usize = 16;

/// A connection that moves no byte for this long is closed (a scraper reconnects).
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

struct BoundedListener {
    listener: TcpListener,
    permits: Arc<Semaphore>,
}

impl Listener for BoundedListener {
    type Io = BoundedConnection;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let (stream, addr) = Listener::accept(&mut self.listener).await;
        let mut stream = TimeoutStream::new(stream);
        stream.set_read_timeout(Some(IDLE_TIMEOUT));
        stream.set_write_timeout(Some(IDLE_TIMEOUT));
        let connection = BoundedConnection {
            stream: Box::pin(stream),
            _permit: permit,
        };
        (connection, addr)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// A connection holding one of the [`MAX_CONNECTIONS`] places until it closes.
struct BoundedConnection {
    stream: Pin<Box<TimeoutStream<TcpStream>>>,
    _permit: OwnedSemaphorePermit,
}

impl AsyncRead for BoundedConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.stream.as_mut().poll_read(cx, buf)
    }
}

impl AsyncWrite for BoundedConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.stream.as_mut().poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream.as_mut().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream.as_mut().poll_shutdown(cx)
    }
}

/// The registry in Prometheus text format.
pub fn render(registry: &Registry) -> String {
    let mut out = Vec::new();
    // Encoding into a Vec fails only for metric families the registry already rejects.
    TextEncoder::new()
        .encode(&registry.gather(), &mut out)
        .expect("encoding registered metrics");
    String::from_utf8(out).expect("Prometheus text is UTF-8")
}
