//! `--trace-ui`: an in-memory trace store (otlp-embedded) that serves the Jaeger UI and
//! Jaeger's query API, for users without a tracing backend.

use std::net::SocketAddr;

use anyhow::{Context as _, Result};
use otlp_embedded::{Config, State, StateRef, ui_app};
use tokio::net::TcpListener;

/// The store's bounds: the oldest traces go first past either.
const MAX_TRACES: u32 = 10_000;
const MAX_MEMORY_BYTES: usize = 64 << 20;

/// Binds `addr` and serves the UI and API there until the runtime ends; returns the store
/// and the UI's URL.
pub async fn serve(addr: SocketAddr) -> Result<(StateRef, String)> {
    let listener = TcpListener::bind(addr).await.with_context(|| {
        format!("binding the trace UI on {addr} (choose another with --trace-ui)")
    })?;
    let url = format!("http://{}/", listener.local_addr()?);
    let state = State::new(Config {
        max_length: MAX_TRACES,
        max_memory_usage: MAX_MEMORY_BYTES,
    });
    let app = ui_app(state.clone(), "/");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            log::warn!("trace UI stopped: {e}");
        }
    });
    Ok((state, url))
}
