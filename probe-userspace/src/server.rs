//! The HTTP endpoints: `/metrics` for Prometheus, `/stats` (JSON quantiles) for people
//! and scripts.

use axum::{Json, Router, http::header, response::IntoResponse, routing::get};
use prometheus::{Encoder as _, Registry, TextEncoder};
use tokio::net::TcpListener;

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
