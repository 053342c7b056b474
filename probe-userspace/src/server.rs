//! The HTTP endpoint Prometheus scrapes.

use axum::{Router, http::header, response::IntoResponse, routing::get};
use prometheus::{Encoder as _, Registry, TextEncoder};
use tokio::net::TcpListener;

/// Serves `/metrics` from `registry` until the task is dropped.
pub async fn serve(listener: TcpListener, registry: Registry) -> std::io::Result<()> {
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
    let app = Router::new().route("/metrics", get(metrics));
    axum::serve(listener, app).await
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
