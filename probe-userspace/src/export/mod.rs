//! Exporters: each receives finished requests, finished exchanges and probe health
//! figures, and never reaches back into attach, connections or assembly.

pub mod jsonl;
pub mod labels;
pub mod live;
pub mod otlp;
pub mod prometheus;
pub mod report;
pub mod summary;

use self::otlp::TraceHealth;
use crate::{
    assembly::{AssemblyStats, Request},
    connections::{ConnectionStats, Exchange},
};

/// Receives every finished request, in completion order.
pub trait RequestSink {
    fn record(&mut self, request: &Request);
}

/// Receives every finished exchange (inbound and upstream), in completion order.
pub trait ExchangeSink {
    fn record_exchange(&mut self, exchange: &Exchange);
}

/// The probe's own health, as totals since attach.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ProbeHealth {
    pub attached_markers: u32,
    pub attached_socket_tracepoints: u32,
    pub events: u64,
    /// Dropped in the kernel because the ring buffer was full.
    pub marker_events_lost: u64,
    pub socket_events_lost: u64,
    /// Socket I/O outside read/write-family syscalls (io_uring, sendfile): not followed.
    pub socket_io_without_syscall: u64,
    pub decode_errors: u64,
    /// Lines `--requests-out` / `--exchanges-out` could not write (after a write error).
    pub requests_out_dropped: u64,
    pub exchanges_out_dropped: u64,
    pub stages_out_dropped: u64,
    pub in_flight: usize,
    pub assembly: AssemblyStats,
    pub connections: ConnectionStats,
    /// Zero when no traces are exported.
    pub traces: TraceHealth,
}
