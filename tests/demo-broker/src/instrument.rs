//! Where the broker's timeline goes: probe-markers' markers, or, built with the `usdt`
//! feature, USDT (SystemTap SDT) probes of provider `demo_broker` made by the `usdt`
//! crate — the broker brokerprobe's USDT mode is tested on (docs/modes/usdt.md, whose
//! worked example maps these probes). The two builds make the same calls at the same
//! places, so one ground truth serves both.

use probe_markers::{RequestId, Stage};

#[cfg(not(feature = "usdt"))]
mod imp {
    use super::*;

    pub fn register() {}

    pub fn request_begin(id: RequestId, model: &str, traceparent: Option<&str>) {
        probe_markers::request_begin(id, model, traceparent);
    }

    pub fn request_end(id: RequestId, status: u16, error_type: Option<&str>) {
        probe_markers::request_end(id, status, error_type);
    }

    pub fn stage_begin(id: RequestId, stage: Stage) {
        probe_markers::stage_begin(id, stage);
    }

    pub fn stage_end(id: RequestId, stage: Stage) {
        probe_markers::stage_end(id, stage);
    }

    pub fn tool_begin(id: RequestId, name: &str) {
        probe_markers::tool_begin(id, name);
    }

    pub fn tool_end(id: RequestId, name: &str) {
        probe_markers::tool_end(id, name);
    }

    pub fn provider(id: RequestId, provider: &str) {
        probe_markers::provider(id, provider);
    }

    pub fn first_byte(id: RequestId) {
        probe_markers::first_byte(id);
    }

    pub fn chunk(id: RequestId) {
        probe_markers::chunk(id);
    }

    pub fn token_usage(id: RequestId, input: u64, output: u64) {
        probe_markers::token_usage(id, input, output);
    }

    pub fn fallback(id: RequestId, from: &str, to: &str) {
        probe_markers::fallback(id, from, to);
    }
}

#[cfg(feature = "usdt")]
mod imp {
    use super::*;

    /// Stages are passed by name, tools have probes of their own: the two ways a probe
    /// map can name a stage. Each probe is gated by its own semaphore (the crate's), so
    /// its arguments are only built while someone listens.
    #[usdt::provider(provider = "demo_broker")]
    mod demo_broker {
        fn request__start(request_id: u64, model: &str, traceparent: &str) {}
        fn request__done(request_id: u64, status: u16, error_type: &str) {}
        fn stage__start(request_id: u64, stage: &str) {}
        fn stage__done(request_id: u64, stage: &str) {}
        fn tool__start(request_id: u64, tool: &str) {}
        fn tool__done(request_id: u64, tool: &str) {}
        fn provider(request_id: u64, provider: &str) {}
        fn first__byte(request_id: u64) {}
        fn chunk(request_id: u64) {}
        fn token__usage(request_id: u64, input_tokens: u64, output_tokens: u64) {}
        fn fallback(request_id: u64, from: &str, to: &str) {}
    }

    pub fn register() {
        // A no-op on Linux (the probes are ELF notes); needed on other platforms.
        if let Err(e) = usdt::register_probes() {
            log::warn!("registering USDT probes: {e}");
        }
    }

    pub fn request_begin(id: RequestId, model: &str, traceparent: Option<&str>) {
        demo_broker::request__start!(|| (id.get(), model, traceparent.unwrap_or("")));
    }

    pub fn request_end(id: RequestId, status: u16, error_type: Option<&str>) {
        demo_broker::request__done!(|| (id.get(), status, error_type.unwrap_or("")));
    }

    pub fn stage_begin(id: RequestId, stage: Stage) {
        demo_broker::stage__start!(|| (id.get(), stage.name()));
    }

    pub fn stage_end(id: RequestId, stage: Stage) {
        demo_broker::stage__done!(|| (id.get(), stage.name()));
    }

    pub fn tool_begin(id: RequestId, name: &str) {
        demo_broker::tool__start!(|| (id.get(), name));
    }

    pub fn tool_end(id: RequestId, name: &str) {
        demo_broker::tool__done!(|| (id.get(), name));
    }

    pub fn provider(id: RequestId, provider: &str) {
        demo_broker::provider!(|| (id.get(), provider));
    }

    pub fn first_byte(id: RequestId) {
        demo_broker::first__byte!(|| id.get());
    }

    pub fn chunk(id: RequestId) {
        demo_broker::chunk!(|| id.get());
    }

    pub fn token_usage(id: RequestId, input: u64, output: u64) {
        demo_broker::token__usage!(|| (id.get(), input, output));
    }

    pub fn fallback(id: RequestId, from: &str, to: &str) {
        demo_broker::fallback!(|| (id.get(), from, to));
    }
}

pub use imp::*;
